//! The migrator daemon: hosts many partitions and serves the tarpc API.
//!
//! - `api`: the service and its types (versioned); `codec`: its wire format; `client`:
//!   connecting to a daemon;
//! - `server`: the daemon's state and a thin `MigratorApi` over the rest;
//! - `registry`: partitions, incoming sessions and reservations, under one lock;
//!   `admission`: the limits every launch and incoming migration is checked against;
//! - `incoming`: the destination side of migrations; `outgoing`: the source side;
//!   `peer`: the destination daemon as the source's engine sees it;
//! - `profilers`: one shared heat profiler per partition, serving every client's window;
//!   `heat_sampling`: how they sample (epoch, fraction re-armed); `heat_view`: heat condensed for dashboards; `heat_report`: what `page_heat` and `plan`
//!   answer, and their text;
//! - `listener`: the accept loop; `memory`: the daemon's own allocator settings.

pub mod admission;
pub mod api;
mod carried;
pub mod client;
pub mod codec;
pub mod heat_report;
pub mod heat_sampling;
pub mod heat_view;
mod incoming;
mod kept;
pub mod listener;
pub mod memory;
pub mod outgoing;
pub mod peer;
pub mod profilers;
mod reconcile;
mod registry;
pub mod server;

pub use api::{ApiError, DaemonInfo, LaunchRequest, MigratorApiClient, PartitionInfo};

/// Runs `work` on tokio's blocking pool, where code that waits on the kernel (KVM, page
/// copies, loading eBPF programs) belongs; a panic in it becomes an [`ApiError`] naming `what`.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("{what} panicked: {e}")))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    heatprobe::probes::error_chain(error)
}
