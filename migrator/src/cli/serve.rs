//! `migrator serve`: the daemon's start-up and its end.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use migrator::{
    api::listener::serve,
    host::admission::Limits,
    metrics::endpoint,
    supervisor::{Supervisor, process::ProcessConfig},
    tls::Security,
};

use super::args::OnExit;

/// `serve`'s options about the daemon itself.
pub(crate) struct Daemon {
    pub(crate) runtime_dir: Option<PathBuf>,
    pub(crate) on_exit: OnExit,
    /// Where to serve the metrics, if anywhere.
    pub(crate) metrics: Option<SocketAddr>,
}

pub(crate) async fn run_daemon(
    mut process: ProcessConfig,
    limits: Limits,
    security: Security,
    daemon: Daemon,
) -> Result<()> {
    migrator::host::memory::keep_large_buffers_mapped();
    // Bind first: with port 0 the runtime directory and the partitions' data listeners
    // follow the port actually bound. Both addresses are checked before anything is adopted.
    let listener = migrator::api::listener::bind(process.listen, &security).await?;
    process.listen = listener.local_addr()?;
    let metrics_listener = match daemon.metrics {
        Some(addr) => Some(endpoint::bind(addr, &security).await?),
        None => None,
    };
    let runtime_dir = daemon
        .runtime_dir
        .unwrap_or_else(|| Supervisor::default_runtime_dir(process.listen));
    let supervisor = Supervisor::start(&runtime_dir, process.clone(), limits)
        .await
        .with_context(|| format!("supervising partitions in {}", runtime_dir.display()))?;
    let serving = serve(supervisor.clone(), security.clone(), listener);
    // Scripts wait for this line.
    eprintln!("migrator: serving on {}", process.listen);
    let metrics = async {
        let Some(listener) = metrics_listener else {
            return std::future::pending().await;
        };
        let scheme = if security.is_tls() { "https" } else { "http" };
        if let Ok(addr) = listener.local_addr() {
            eprintln!("migrator: metrics on {scheme}://{addr}{}", endpoint::PATH);
        }
        let recorder = supervisor.recorder();
        endpoint::serve(listener, security.clone(), supervisor.clone(), recorder).await
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = serving => {}
        () = metrics => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    match daemon.on_exit {
        OnExit::Keep => {
            eprintln!("migrator: shutting down; the partitions run on for the next daemon");
        }
        OnExit::Stop => {
            eprintln!("migrator: shutting down; stopping every partition");
            supervisor.stop_all().await;
        }
    }
    // Only if empty: no partition runs on for a successor to adopt.
    let _ = std::fs::remove_dir(&runtime_dir);
    Ok(())
}
