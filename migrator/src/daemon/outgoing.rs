//! The source side of migrations: starting one (within the daemon's limit), running the
//! engine on the blocking pool against the destination daemon, and what the partition becomes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use tracing::warn;

use super::{
    api::{ApiError, MigrateRequest},
    blocking, error_chain,
    peer::RemoteDestination,
    registry::info_of,
    server::Daemon,
};
use crate::{
    migration::{
        MigrationProgress, MigrationReport, MigrationStatus, Mode, Strategy, report::Phase,
        source::MigrationOptions,
    },
    vmm::{Partition, PartitionState},
};

/// The progress of every outgoing migration, by partition; finished ones stay readable until
/// their partition is forgotten.
#[derive(Clone, Default)]
pub struct Outgoing {
    migrations: Arc<Mutex<BTreeMap<String, Arc<Mutex<MigrationProgress>>>>>,
}

fn running(progress: &Mutex<MigrationProgress>) -> bool {
    !progress
        .lock()
        .map(|p| p.phase)
        .unwrap_or(Phase::Failed)
        .is_final()
}

impl Outgoing {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Mutex<MigrationProgress>>>> {
        self.migrations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a migration of partition `id`, unless it already migrates or `max` run.
    fn start(&self, id: &str, daemon: &Daemon) -> Result<Arc<Mutex<MigrationProgress>>, ApiError> {
        let mut migrations = self.lock();
        if migrations.get(id).is_some_and(|p| running(p)) {
            return Err(ApiError::Partition(format!(
                "partition `{id}` is already migrating"
            )));
        }
        let count = migrations.values().filter(|p| running(p)).count();
        daemon.limits.admit_migration(count)?;
        let progress = Arc::new(Mutex::new(MigrationProgress::default()));
        migrations.insert(id.to_string(), Arc::clone(&progress));
        Ok(progress)
    }

    /// Whether any migration runs.
    pub fn any_running(&self) -> bool {
        self.lock().values().any(|p| running(p))
    }

    pub fn progress(&self, id: &str) -> Option<MigrationProgress> {
        self.lock()
            .get(id)
            .map(|p| p.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Forgets the finished migrations of `ids` (partitions the daemon no longer remembers).
    pub fn forget_finished(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut migrations = self.lock();
        for id in ids {
            if migrations.get(id).is_some_and(|p| !running(p)) {
                migrations.remove(id);
            }
        }
    }
}

fn fail(progress: &Mutex<MigrationProgress>) {
    progress.lock().unwrap_or_else(|p| p.into_inner()).phase = Phase::Failed;
}

impl Daemon {
    /// Migrates partition `request.id` to the daemon at `request.to`.
    pub(super) async fn migrate_out(
        &self,
        request: MigrateRequest,
    ) -> Result<MigrationReport, ApiError> {
        let partition = self.registry.live(&request.id)?;
        let state = partition.state();
        if state != PartitionState::Running && state != PartitionState::Paused {
            return Err(ApiError::Partition(format!(
                "partition `{}` is {state:?}; only running or paused partitions migrate",
                request.id
            )));
        }
        let progress = self.outgoing.start(&request.id, self)?;
        // Only once the migration is registered: from then on no shared heat profiler starts
        // on the partition (they check for a running migration under the lock unwatch takes),
        // so the vCPU threads this frees stay free for the migration's own profiler.
        self.unwatch(&request.id);
        let mut destination =
            match RemoteDestination::open(request.to, &self.security, self.peer_timeout).await {
                Ok(destination) => destination,
                Err(why) => {
                    fail(&progress);
                    return Err(ApiError::Migration(why));
                }
            };
        let probes = match request.options.strategy {
            Strategy::Heat => match self.probes().await {
                Ok(probes) => Some(probes),
                Err(e) => {
                    warn!("heat strategy without probes: {e}");
                    None
                }
            },
            Strategy::Address => None,
        };
        // Heat that came with this partition, fresh enough to plan from without profiling.
        let carried = match request.options.strategy {
            Strategy::Heat => self.carried_heat.fresh(&request.id),
            Strategy::Address => None,
        };
        let engine = Arc::clone(&partition);
        let options = request.options.clone();
        let report = blocking("the migration", move || {
            crate::migration::source::migrate(
                &engine,
                &mut destination,
                probes,
                carried,
                &options,
                &progress,
            )
        })
        .await?;
        if let Some(handover) = partition.awaiting_handover() {
            warn!(
                "partition {} awaits the handover of session {} on {}: reconciling by itself",
                request.id, handover.session, handover.peer
            );
            self.reconcile_in_background(request.id.clone(), handover);
        }
        self.moved_if_completed(request.id, partition, &report, request.to);
        Ok(report)
    }

    /// Resumes the post-copy partition `id` holds the missing pages of (state
    /// `postcopy-paused`), over new connections to the destination it records.
    pub(super) async fn resume_out(
        &self,
        id: String,
        mut options: MigrationOptions,
    ) -> Result<MigrationReport, ApiError> {
        let partition = self.registry.live(&id)?;
        let Some(paused) = partition.postcopy_paused() else {
            return Err(ApiError::Partition(format!(
                "partition `{id}` is {}; only a postcopy-paused partition resumes a migration",
                partition.state().name()
            )));
        };
        let to: SocketAddr = paused.peer.parse().map_err(|_| {
            ApiError::Partition(format!(
                "partition `{id}` holds the pages of a post-copy on `{}`, which is no address",
                paused.peer
            ))
        })?;
        options.mode = Mode::Hybrid;
        options
            .validate()
            .map_err(|e| ApiError::Migration(error_chain(&e)))?;
        let progress = self.outgoing.start(&id, self)?;
        let mut destination =
            match RemoteDestination::open(to, &self.security, self.peer_timeout).await {
                Ok(destination) => destination,
                Err(why) => {
                    fail(&progress);
                    return Err(ApiError::Migration(format!(
                        "{why}; partition `{id}` stays postcopy-paused"
                    )));
                }
            };
        let engine = Arc::clone(&partition);
        let report = blocking("resuming the migration", move || {
            crate::migration::source::resume_postcopy(
                &engine,
                &mut destination,
                paused,
                &options,
                &progress,
            )
        })
        .await?;
        self.moved_if_completed(id, partition, &report, to);
        Ok(report)
    }

    /// Once a migration of partition `id` to `to` completed, the copy here is recorded as
    /// stopped, moved.
    fn moved_if_completed(
        &self,
        id: String,
        partition: Arc<Partition>,
        report: &MigrationReport,
        to: SocketAddr,
    ) {
        if report.status != MigrationStatus::Completed {
            return;
        }
        self.carried_heat.forget(&id);
        let mut info = info_of(&id, &partition);
        info.state = PartitionState::Stopped;
        info.console.push_str(&format!(
            "[vmm] migrated to {to} as {}\n",
            report.id_on_destination.as_deref().unwrap_or("?")
        ));
        drop(partition);
        self.remember_stopped(id, info);
    }
}
