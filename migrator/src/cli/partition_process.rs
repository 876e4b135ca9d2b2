//! `migrator vmm`: one partition's process. It runs the daemon's engine for exactly one
//! partition (launched, or received by an incoming migration), with the ids its supervisor
//! chose, and serves the API for it on `RUNTIME_DIR/ID.sock`.
//!
//! It is confined before it does anything else (see [`confine`]). It outlives its
//! supervisor: a supervisor killed or restarted leaves it running, and the next one adopts
//! it. SIGTERM (its supervisor ending it, or the daemon's shutdown option) stops what it runs
//! and ends it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use thiserror::Error;
use tracing::info;

use migrator::{
    api::listener::ServeError, api::listener::serve_local, daemon::server::Daemon,
    daemon::server::Identity, host::heat_sampling::HeatSampling,
    supervisor::runtime_dir::RuntimeDir, tls::Security,
};

/// What a partition process is started with.
#[derive(Clone, Debug)]
pub struct PartitionProcess {
    pub runtime_dir: PathBuf,
    pub id: String,
    pub session: Option<u64>,
    pub listen: SocketAddr,
    pub peer_timeout: Duration,
    pub sampling: HeatSampling,
    pub security: Security,
}

#[derive(Debug, Error)]
pub enum PartitionProcessError {
    #[error("confining the partition process: {what}")]
    Confine {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    RuntimeDir(#[from] migrator::supervisor::SupervisorError),
    #[error("serving the partition's API")]
    Serve(#[from] ServeError),
    #[error("installing the SIGTERM handler")]
    Signal(#[source] std::io::Error),
}

/// Runs the partition process until SIGTERM.
pub async fn run(process: PartitionProcess) -> Result<(), PartitionProcessError> {
    confine()?;
    migrator::host::memory::keep_large_buffers_mapped();
    let dir = RuntimeDir::open(&process.runtime_dir)?;
    let daemon = Daemon::new(process.listen)
        .with_identity(Identity {
            partition: process.id.clone(),
            session: process.session,
        })
        .with_heat_sampling(process.sampling)
        .with_peer_timeout(process.peer_timeout)
        .with_security(process.security);
    let serving = serve_local(daemon.clone(), &dir.socket(&process.id))?;
    let releasing = daemon.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RELEASE_PROBES_EVERY).await;
            // On the blocking pool: detaching the programs waits on the kernel for up to
            // hundreds of milliseconds, which on an async worker stalled this partition's
            // status answers (one load-test run's p99 went over 100 ms).
            let releasing = releasing.clone();
            let released = tokio::task::spawn_blocking(move || {
                let released = releasing.release_idle_probes();
                if released {
                    // What they took (the parsed object, relocations, maps' buffers) went
                    // back to the allocator's arenas; give it back to the kernel too.
                    // SAFETY: malloc_trim only returns free memory of glibc's own arenas.
                    unsafe { libc::malloc_trim(0) };
                }
                released
            })
            .await;
            if matches!(released, Ok(true)) {
                info!("unloaded the eBPF probes: nothing uses them");
            }
        }
    });
    // The guest's pace, for the bill of a migration to come (`vmm::pace`).
    let pacing = daemon.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(migrator::vmm::pace::PACE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            pacing.record_paces();
        }
    });
    if process.sampling.warm() {
        let warming = daemon.clone();
        let epoch = process.sampling.epoch();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(epoch);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                warming.keep_heat_warm().await;
            }
        });
    }
    info!("partition process for `{}` serving", process.id);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(PartitionProcessError::Signal)?;
    tokio::select! {
        () = serving => {}
        _ = terminate.recv() => {}
    }
    info!("partition process for `{}` ending", process.id);
    let _ = tokio::task::spawn_blocking(move || daemon.stop_all()).await;
    Ok(())
}

/// What a partition process gives up before it runs a guest, in the spirit of Firecracker's
/// jailer (which also chroots and drops to an unprivileged user; this process keeps root's
/// capabilities, since it loads eBPF programs for its heat profiler):
/// - no new privileges: nothing it executes gains any (setuid, file capabilities);
/// - not dumpable: no core file of guest memory, and no ptrace or `/proc/PID/mem` by
///   processes of the same user that lack CAP_SYS_PTRACE;
/// - core files of size 0, and at most [`MAX_FILES`] descriptors.
///
/// No seccomp filter: KVM, userfaultfd, eBPF and TLS need a wide set of calls, and a filter
/// that missed one would kill a guest mid-migration. A cgroup is left to the host's manager.
pub fn confine() -> Result<(), PartitionProcessError> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let confine = |what, result: rustix::io::Result<()>| {
        result.map_err(|e| PartitionProcessError::Confine {
            what,
            source: e.into(),
        })
    };
    confine("no new privileges", rustix::thread::set_no_new_privs(true))?;
    confine(
        "not dumpable",
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable),
    )?;
    confine(
        "core files",
        setrlimit(
            Resource::Core,
            Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        ),
    )?;
    confine(
        "descriptors",
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(MAX_FILES),
                maximum: Some(MAX_FILES),
            },
        ),
    )?;
    Ok(())
}

/// How often a partition process unloads eBPF probes nothing uses.
const RELEASE_PROBES_EVERY: Duration = Duration::from_secs(5);

/// Descriptors one partition process may hold: its VM and vCPUs, memfd, userfaultfd, eBPF
/// maps and programs, and a few connections per migration stripe. Measured: under 100 for a
/// 4-vCPU partition migrating over 4 connections.
pub const MAX_FILES: u64 = 4096;
