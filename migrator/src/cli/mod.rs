//! The command-line client's parts, apart from its dispatch in `main.rs`.

pub mod jobs;
