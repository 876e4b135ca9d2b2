//! `migrator serve`: the daemon's start-up and its end.

use std::path::PathBuf;

use anyhow::{Context, Result};
use migrator::{
    api::listener::serve,
    host::admission::Limits,
    supervisor::{Supervisor, process::ProcessConfig},
    tls::Security,
};

use super::args::OnExit;

pub(crate) async fn run_daemon(
    mut process: ProcessConfig,
    limits: Limits,
    security: Security,
    runtime_dir: Option<PathBuf>,
    on_exit: OnExit,
) -> Result<()> {
    migrator::host::memory::keep_large_buffers_mapped();
    // Bind first: with port 0 the runtime directory and the partitions' data listeners
    // follow the port actually bound.
    let listener = migrator::api::listener::bind(process.listen, &security).await?;
    process.listen = listener.local_addr()?;
    let runtime_dir =
        runtime_dir.unwrap_or_else(|| Supervisor::default_runtime_dir(process.listen));
    let supervisor = Supervisor::start(&runtime_dir, process.clone(), limits)
        .await
        .with_context(|| format!("supervising partitions in {}", runtime_dir.display()))?;
    let serving = serve(supervisor.clone(), security, listener);
    // Scripts wait for this line.
    eprintln!("migrator: serving on {}", process.listen);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = serving => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    match on_exit {
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
