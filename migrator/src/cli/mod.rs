//! The command-line client's parts, apart from its dispatch in `main.rs`: `args`, what each
//! command takes; `calls`, what it asks of a daemon; `render`, what it prints; `jobs`, the
//! commands about running migrations; `drain`, emptying a daemon; `serve`, the daemon's
//! start-up.

pub mod args;
pub mod calls;
pub mod drain;
pub mod jobs;
pub mod partition_process;
pub mod render;
pub mod serve;
