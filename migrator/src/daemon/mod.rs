//! The migrator daemon: hosts many partitions and serves the tarpc API (`crate::api`).
//!
//! - `server`: the daemon's state and a thin `MigratorApi` over the rest;
//! - `registry`: partitions, incoming sessions and reservations, under one lock, checked
//!   against the host's admission limits (`crate::host::admission`);
//! - `incoming`: the destination side of migrations; `outgoing`: the source side;
//!   `peer`: the destination daemon as the source's engine sees it;
//! - `profilers`: one shared heat profiler per partition, serving every client's window;
//! - `carried`: heat a migrated guest brings with it; `kept`, `reconcile`: what outlives a
//!   migration on each side.

mod carried;
mod incoming;
mod kept;
pub mod outgoing;
pub mod peer;
pub mod profilers;
mod reconcile;
mod registry;
pub mod server;

use crate::api::ApiError;

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
