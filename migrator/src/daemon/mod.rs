//! The migrator daemon: hosts many partitions and serves the tarpc API.

pub mod api;
pub mod client;
pub mod codec;
pub mod heat_view;
pub mod memory;
pub mod server;

pub use api::{ApiError, DaemonInfo, LaunchRequest, MigratorApiClient, PartitionInfo};
