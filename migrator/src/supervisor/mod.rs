//! The supervisor: `migrator serve` as a manager of partition processes.
//!
//! Each partition runs in a process of its own (`migrator vmm`, the binary's
//! `cli::partition_process`), which owns its KVM VM, vCPU threads, guest memory, dirty log, userfaultfd, heat profiler
//! and migration engine, and serves the daemon's API for that one partition on a Unix socket
//! in the runtime directory. The supervisor admits launches and incoming migrations against
//! its limits, starts a process for each, forwards every call about a partition or session
//! to its process, and notices when one dies (`crashed`, with the cause). A partition's
//! crash takes down nothing else, and the supervisor's does not take down any partition: a
//! supervisor that starts adopts the processes its predecessor left in the runtime directory.
//!
//! - `runtime_dir`: the records a successor adopts from;
//! - `process`: one partition process, started or adopted, and its death;
//! - `inventory`: the processes, the partitions that ended, and admission;
//! - `forward`: the API, forwarded; `jobs`: outgoing migrations, counted and waited for;
//! - `scrape`: what `serve --metrics` shows of it all at a scrape.

mod forward;
mod inventory;
mod jobs;
pub mod process;
pub mod runtime_dir;
mod scrape;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use thiserror::Error;
use tracing::{info, warn};

use self::{
    inventory::Inventory,
    process::{ProcessConfig, VmmProcess},
    runtime_dir::{Record, RuntimeDir},
};
use crate::{
    api::ApiError, api::PartitionInfo, api::client::context_with, host::admission::Limits,
    vmm::PartitionState,
};

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("the runtime directory {}", path.display())]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the process of partition `{id}`")]
    Start {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the process of partition `{id}` {how} before it served; its log ends:\n{log}")]
    Exited {
        id: String,
        how: String,
        log: String,
    },
    #[error("cannot reach the process of partition `{id}`: {what}")]
    Connect { id: String, what: String },
}

/// How often each idle process is asked how it is doing: its last status is what `list`
/// shows of a process too busy to answer and what a crash record keeps, and a process that
/// holds nothing any more (its partition stopped or migrated away) is ended.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How long `list` waits for one process before showing what it last said.
const LIST_WAIT: Duration = Duration::from_secs(2);
/// How long shutting down waits for each step of a process's end (a stop, its exit).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The supervisor; clones share it.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    dir: RuntimeDir,
    process: ProcessConfig,
    limits: Limits,
    inventory: Inventory,
    /// Outgoing migrations: counted while they run, their last reports kept.
    jobs: Arc<jobs::Jobs>,
    /// What the migrations that ended leave to `serve --metrics`.
    recorder: crate::metrics::Recorder,
    /// Set when a partition process found running at the start could not be adopted: a
    /// session unknown here may then still run in it.
    orphans: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
}

impl Supervisor {
    /// A supervisor keeping its records in `runtime_dir`, starting partition processes with
    /// `process`. Adopts whatever a predecessor left there (see [`Supervisor::adopt`]).
    pub async fn start(
        runtime_dir: &Path,
        process: ProcessConfig,
        limits: Limits,
    ) -> Result<Self, SupervisorError> {
        let dir = RuntimeDir::open(runtime_dir)?;
        let supervisor = Self {
            inner: Arc::new(Inner {
                dir,
                process,
                limits,
                inventory: Inventory::default(),
                jobs: Arc::default(),
                recorder: crate::metrics::Recorder::default(),
                orphans: std::sync::atomic::AtomicBool::new(false),
                next_id: AtomicU64::new(0),
            }),
        };
        supervisor.adopt().await?;
        let sweeping = supervisor.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                for vmm in sweeping.inner.inventory.processes() {
                    sweeping.sweep(&vmm).await;
                }
            }
        });
        Ok(supervisor)
    }

    /// The default runtime directory of a supervisor listening on `listen`: one per address,
    /// so that a restart on the same address finds its predecessor's partitions. Under
    /// `/run/migrator` as root; otherwise under `$XDG_RUNTIME_DIR/migrator`, the user's own
    /// runtime directory, if there is one.
    pub fn default_runtime_dir(listen: SocketAddr) -> PathBuf {
        let base = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(user) if !rustix::process::geteuid().is_root() => {
                PathBuf::from(user).join("migrator")
            }
            _ => PathBuf::from("/run/migrator"),
        };
        base.join(format!("{}-{}", listen.ip(), listen.port()))
    }

    /// Serves again every partition process a predecessor left running, with whatever it
    /// counted; records the ones that ended meanwhile as crashed. The records are adopted
    /// all at once, each within a bound: a process that does not answer its handshake is
    /// adopted all the same (it runs a guest), and `list` shows it unanswered.
    async fn adopt(&self) -> Result<(), SupervisorError> {
        let dir = &self.inner.dir;
        let mut alive = Vec::new();
        for record in dir.records()? {
            if runtime_dir::is_alive(&record) {
                alive.push(record);
                continue;
            }
            let mut info = process::described(&record);
            info.pid = None;
            info.state = PartitionState::Crashed;
            info.crash_reason = Some(format!(
                "its process {} ended while no daemon watched it",
                record.pid
            ));
            warn!(
                "partition `{}`: {}",
                record.id,
                info.crash_reason.as_deref().unwrap_or("")
            );
            dir.remove(&record.id, true);
            self.inner.inventory.ended(info);
        }
        let adoptions = alive.into_iter().map(|record| self.adopt_one(record));
        futures::future::join_all(adoptions).await;
        Ok(())
    }

    /// Adopts the running process of `record`.
    async fn adopt_one(&self, record: Record) {
        let dir = &self.inner.dir;
        let (client, answered) = match process::connect(dir, &record.id).await {
            Ok(client) => (client, true),
            Err(why) => match process::open(dir, &record.id).await {
                Ok(client) => {
                    warn!(
                        "partition `{}`: its process {} does not answer ({why}); adopted all \
                         the same, and listed as not answering",
                        record.id, record.pid
                    );
                    (client, false)
                }
                Err(e) => {
                    warn!(
                        "not adopting partition `{}` (process {}): {e}",
                        record.id, record.pid
                    );
                    self.inner.orphans.store(true, Ordering::Release);
                    return;
                }
            },
        };
        let vmm = Arc::new(process::adopted(record, client));
        info!("adopted partition `{}` (process {})", vmm.id(), vmm.pid());
        self.inner.inventory.insert(Arc::clone(&vmm));
        if answered {
            self.refresh(&vmm).await;
        }
        let watcher = self.clone();
        tokio::spawn(async move {
            process::wait_for_exit(vmm.pid()).await;
            watcher.ended(
                &vmm,
                "ended (it was adopted, so its exit status is unknown)".into(),
            );
        });
    }

    /// Starts a partition process for `record`, watches it, and returns it (not yet in the
    /// inventory: the caller adds it once its launch or prepare succeeded).
    async fn start_process(&self, record: Record) -> Result<Arc<VmmProcess>, ApiError> {
        let (vmm, mut child) = process::start(&self.inner.dir, &self.inner.process, record)
            .await
            .map_err(|e| ApiError::Partition(heatprobe::probes::error_chain(&e)))?;
        let watcher = self.clone();
        let watched = Arc::clone(&vmm);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => process::exit_cause(status),
                Err(e) => format!("could not be waited on: {e}"),
            };
            watcher.ended(&watched, how);
        });
        Ok(vmm)
    }

    /// A process ended: on purpose, or a crash to record.
    fn ended(&self, vmm: &Arc<VmmProcess>, how: String) {
        if vmm.is_retiring() {
            return;
        }
        let mut info = vmm.last_seen();
        info.pid = None;
        info.process_rss_anon_bytes = None;
        let log = self.inner.dir.log_tail(vmm.id(), 3);
        info.state = PartitionState::Crashed;
        info.crash_reason = Some(if log.is_empty() {
            format!("its process {} {how}", vmm.pid())
        } else {
            format!("its process {} {how}; its log ends: {log}", vmm.pid())
        });
        warn!(
            "partition `{}`: {}",
            vmm.id(),
            info.crash_reason.as_deref().unwrap_or("")
        );
        self.inner.dir.remove(vmm.id(), true);
        self.inner.inventory.replace(vmm, Some(info));
    }

    /// Asks an idle process how it is doing; ends it if it holds nothing any more.
    async fn sweep(&self, vmm: &Arc<VmmProcess>) {
        if !vmm.idle() || vmm.is_retiring() {
            return;
        }
        let Ok(Ok(daemon)) = vmm.client.hello(context_with(LIST_WAIT), 1, u32::MAX).await else {
            return;
        };
        let info = self.refresh(vmm).await;
        if daemon.holds == 0 && vmm.idle() {
            self.retire(vmm, info).await;
        }
    }

    /// The partition's status from its process, remembered; `None` if it has none (an
    /// incoming session not committed) or does not answer.
    async fn refresh(&self, vmm: &VmmProcess) -> Option<PartitionInfo> {
        match vmm
            .client
            .status(context_with(LIST_WAIT), vmm.id().to_string())
            .await
        {
            Ok(Ok(mut info)) => {
                annotate(vmm, &mut info);
                vmm.remember(&info);
                Some(info)
            }
            _ => None,
        }
    }

    /// Ends a process that holds nothing: its partition, if it had one, is remembered as it
    /// ended (stopped, or migrated away).
    async fn retire(&self, vmm: &Arc<VmmProcess>, last: Option<PartitionInfo>) {
        if !vmm.begin_retiring() {
            return;
        }
        let last = last.map(|mut info| {
            info.pid = None;
            info.process_rss_anon_bytes = None;
            info
        });
        self.inner.inventory.replace(vmm, last);
        info!(
            "partition process {} of `{}` holds nothing; ending it",
            vmm.pid(),
            vmm.id()
        );
        vmm.terminate();
        self.inner.dir.remove(vmm.id(), false);
    }

    fn new_id(&self) -> String {
        crate::host::new_partition_id(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// A session id no other supervisor on this host (nor a predecessor) is likely to have
    /// given: a source holding an old session's id must never reach a new session.
    fn new_session_id(&self) -> u64 {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        xxhash_rust::xxh3::xxh3_64(
            format!(
                "{}-{n}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            )
            .as_bytes(),
        ) >> 1
    }

    /// Stops every partition and ends every partition process (the shutdown option): a
    /// migration is cancelled first if it can be, and whatever still runs in a process after
    /// its stop (a migration past its handover, an incoming session, a stop refused or
    /// unanswered) ends with the process, as the operator asked.
    pub async fn stop_all(&self) {
        let stops = self
            .inner
            .inventory
            .processes()
            .into_iter()
            .map(|vmm| async move {
                let id = vmm.id().to_string();
                let _ = vmm
                    .client
                    .migration_cancel(context_with(STOP_WAIT), id.clone())
                    .await;
                let _ = vmm.client.stop(context_with(STOP_WAIT), id.clone()).await;
                self.sweep(&vmm).await;
                if runtime_dir::is_alive(&vmm.record) {
                    vmm.begin_retiring();
                    vmm.terminate();
                    let ended = tokio::time::timeout(STOP_WAIT, process::wait_for_exit(vmm.pid()));
                    if ended.await.is_err() {
                        warn!(
                            "partition process {} of `{id}` ignored SIGTERM: killing it",
                            vmm.pid()
                        );
                        vmm.kill();
                    }
                    self.inner.dir.remove(&id, false);
                }
            });
        futures::future::join_all(stops).await;
    }
}

/// Adds what the supervisor knows of a partition's process.
fn annotate(vmm: &VmmProcess, info: &mut PartitionInfo) {
    info.pid = Some(vmm.pid());
    info.process_rss_anon_bytes = process::rss_anon(vmm.pid());
}
