//! The source side of migrations, as jobs: starting one (within the daemon's limit), running
//! the engine on the blocking pool against the destination daemon in a task of its own, and
//! what the partition becomes. A migration never depends on the connection of whoever
//! started it: the task runs to its end, reconcile and bookkeeping included, whether or not
//! anyone waits for its report (`migrate --detach`, a caller that went away).

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use tracing::warn;

use super::{blocking, error_chain, peer::RemoteDestination, registry::info_of, server::Daemon};
use crate::api::{ApiError, MigrateRequest, MigrationInfo};
use crate::{
    migration::{
        MigrationProgress, MigrationReport, MigrationStatus, Mode, Strategy,
        job::{Job, LiveLimits},
        report::{Phase, PlanHeatOrigin},
        source::{MigrationOptions, PlanHeat},
    },
    vmm::{Partition, PartitionState},
};

/// How many finished migrations a daemon remembers for `migration_wait` and `migrations`.
const KEEP_FINISHED: usize = 64;

/// What a migration's task ends with: its report, or why it never started.
type Outcome = Result<MigrationReport, ApiError>;

/// One outgoing migration on this daemon.
pub struct Outbound {
    pub job: Arc<Job>,
    pub partition: String,
    pub peer: String,
    pub options: MigrationOptions,
    started_unix_ms: u64,
    outcome: watch::Sender<Option<Outcome>>,
}

impl Outbound {
    /// Whether its task still runs (the engine, or the bookkeeping after it).
    pub fn running(&self) -> bool {
        self.outcome.borrow().is_none()
    }

    pub fn info(&self) -> MigrationInfo {
        let phase = self.job.phase();
        let status = match &*self.outcome.borrow() {
            Some(Ok(report)) => Some(report.status),
            Some(Err(_)) => Some(MigrationStatus::Failed),
            None => None,
        };
        MigrationInfo {
            id: self.job.id().to_string(),
            partition: self.partition.clone(),
            peer: Some(self.peer.clone()),
            side: "source".into(),
            mode: self.options.mode,
            strategy: Some(self.options.strategy),
            phase: phase.name(),
            cancellable: phase.cancellable() && status.is_none(),
            progress: Some(self.job.progress()),
            started_unix_ms: Some(self.started_unix_ms),
            status,
        }
    }

    /// Waits until the migration's task has ended, and says how.
    pub async fn outcome(&self) -> Outcome {
        let mut watching = self.outcome.subscribe();
        match watching.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or_else(|| unreachable_outcome(self)),
            // The sender lives as long as `self`.
            Err(_) => unreachable_outcome(self),
        }
    }

    fn end(&self, outcome: Outcome) {
        self.outcome.send_replace(Some(outcome));
    }
}

fn unreachable_outcome(outbound: &Outbound) -> Outcome {
    Err(ApiError::Internal(format!(
        "migration `{}` ended without a report",
        outbound.job.id()
    )))
}

/// Every outgoing migration: the latest of each partition, and the finished ones, until
/// their partition is forgotten or [`KEEP_FINISHED`] newer ones ended.
#[derive(Clone, Default)]
pub struct Outgoing {
    inner: Arc<Mutex<Jobs>>,
    numbers: Arc<AtomicU64>,
}

#[derive(Default)]
struct Jobs {
    by_partition: BTreeMap<String, Arc<Outbound>>,
    finished: VecDeque<Arc<Outbound>>,
}

impl Outgoing {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a migration of partition `id`, unless it already migrates or `max` run.
    fn start(
        &self,
        id: &str,
        peer: String,
        options: &MigrationOptions,
        daemon: &Daemon,
    ) -> Result<Arc<Outbound>, ApiError> {
        let mut jobs = self.lock();
        if let Some(running) = jobs.by_partition.get(id).filter(|o| o.running()) {
            return Err(held_by(running));
        }
        let count = jobs.by_partition.values().filter(|o| o.running()).count();
        daemon.limits.admit_migration(count)?;
        let number = self.numbers.fetch_add(1, Ordering::Relaxed) + 1;
        let outbound = Arc::new(Outbound {
            job: Arc::new(Job::new(format!("{id}.m{number}"))),
            partition: id.to_string(),
            peer,
            options: options.clone(),
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            outcome: watch::channel(None).0,
        });
        if let Some(previous) = jobs
            .by_partition
            .insert(id.to_string(), Arc::clone(&outbound))
        {
            jobs.finished.push_back(previous);
            while jobs.finished.len() > KEEP_FINISHED {
                jobs.finished.pop_front();
            }
        }
        Ok(outbound)
    }

    /// Whether any migration runs.
    pub fn any_running(&self) -> bool {
        self.lock().by_partition.values().any(|o| o.running())
    }

    /// The running migration of partition `id`, if one holds it.
    pub fn holding(&self, id: &str) -> Option<Arc<Outbound>> {
        self.lock()
            .by_partition
            .get(id)
            .filter(|o| o.running())
            .cloned()
    }

    pub fn progress(&self, id: &str) -> Option<MigrationProgress> {
        self.lock().by_partition.get(id).map(|o| o.job.progress())
    }

    /// Every migration remembered, oldest first.
    pub fn list(&self) -> Vec<MigrationInfo> {
        let jobs = self.lock();
        let mut all: Vec<MigrationInfo> = jobs
            .finished
            .iter()
            .chain(jobs.by_partition.values())
            .map(|o| o.info())
            .collect();
        all.sort_by_key(|m| m.started_unix_ms);
        all
    }

    /// Migration `migration`, by its id, or the latest of the partition of that id.
    pub fn find(&self, migration: &str) -> Result<Arc<Outbound>, ApiError> {
        let jobs = self.lock();
        jobs.by_partition
            .values()
            .chain(jobs.finished.iter())
            .find(|o| o.job.id() == migration)
            .or_else(|| jobs.by_partition.get(migration))
            .cloned()
            .ok_or_else(|| ApiError::UnknownMigration(migration.to_string()))
    }

    /// Forgets the finished migrations of `ids` (partitions the daemon no longer remembers).
    pub fn forget_finished(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut jobs = self.lock();
        for id in ids {
            if jobs.by_partition.get(id).is_some_and(|o| !o.running()) {
                jobs.by_partition.remove(id);
            }
        }
        jobs.finished.retain(|o| !ids.contains(&o.partition));
    }
}

/// The refusal of a call that would change a partition a source-side migration holds.
pub fn held_by(outbound: &Outbound) -> ApiError {
    ApiError::HeldByMigration {
        partition: outbound.partition.clone(),
        migration: outbound.job.id().to_string(),
        side: "source".into(),
        phase: outbound.job.phase().name(),
    }
}

fn steer_refused(outbound: &Outbound, why: impl std::fmt::Display) -> ApiError {
    ApiError::Steer {
        migration: outbound.job.id().to_string(),
        why: why.to_string(),
    }
}

impl Daemon {
    /// Starts migrating partition `request.id` to the daemon at `request.to`, in a task of
    /// its own; returns the migration at once.
    pub(super) async fn start_out(
        &self,
        mut request: MigrateRequest,
    ) -> Result<Arc<Outbound>, ApiError> {
        let partition = self.registry.live(&request.id)?;
        self.refuse_if_held(&request.id)?;
        if let Some(pages) = &request.heat {
            if request.options.strategy != Strategy::Heat {
                return Err(ApiError::Migration(
                    "heat from a file orders a migration only with --strategy heat".into(),
                ));
            }
            crate::migration::heat_file::check(pages, partition.memory().frames())
                .map_err(|e| ApiError::Migration(e.to_string()))?;
        }
        let state = partition.state();
        if state != PartitionState::Running && state != PartitionState::Paused {
            return Err(ApiError::Partition(format!(
                "partition `{}` is {}; only running or paused partitions migrate",
                request.id,
                state.name()
            )));
        }
        let outbound =
            self.outgoing
                .start(&request.id, request.to.to_string(), &request.options, self)?;
        // What the migration plans from without a profile: a heat file (checked above), heat
        // that came with this partition while it is fresh, or else its warm heat, read before
        // its profiler stops.
        let planned = match (request.options.strategy, request.heat.take()) {
            (Strategy::Address, _) => None,
            (Strategy::Heat, Some(pages)) => Some(PlanHeat {
                pages: pages.into(),
                measured: std::time::Instant::now(),
                origin: PlanHeatOrigin::File,
                spent: None,
            }),
            (Strategy::Heat, None) => match self.carried_heat.fresh(&request.id) {
                Some(carried) => Some(carried),
                None => {
                    let (profilers, id) = (self.profilers.clone(), request.id.clone());
                    blocking("reading the warm heat", move || profilers.warm_heat(&id))
                        .await?
                        .map(|warm| PlanHeat {
                            pages: warm.pages.into(),
                            measured: warm.measured,
                            origin: PlanHeatOrigin::Warm,
                            spent: warm.spent,
                        })
                }
            },
        };
        // Only once the migration is registered: from then on no shared heat profiler starts
        // on the partition (they check for a running migration under the lock unwatch takes),
        // so the vCPU threads this frees stay free for the migration's own profiler.
        self.unwatch(&request.id);
        let daemon = self.clone();
        let task = Arc::clone(&outbound);
        tokio::spawn(async move {
            let outcome = daemon.run_out(request, partition, planned, &task).await;
            task.end(outcome);
        });
        Ok(outbound)
    }

    /// The migration's whole course, from opening the destination to the bookkeeping after.
    async fn run_out(
        &self,
        request: MigrateRequest,
        partition: Arc<Partition>,
        planned: Option<PlanHeat>,
        outbound: &Outbound,
    ) -> Outcome {
        let job = Arc::clone(&outbound.job);
        let mut destination =
            match RemoteDestination::open(request.to, &self.security, self.peer_timeout).await {
                Ok(destination) => destination,
                Err(why) => {
                    fail(&job);
                    return Err(ApiError::Migration(why));
                }
            };
        if job.cancel_requested() {
            fail(&job);
            return Err(ApiError::Migration(format!(
                "migration `{}` was cancelled before it began",
                job.id()
            )));
        }
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
        let engine = Arc::clone(&partition);
        let options = request.options.clone();
        let report = blocking("the migration", move || {
            crate::migration::source::migrate(
                &engine,
                &mut destination,
                probes,
                planned,
                &options,
                &job,
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

    /// Refuses a call that would change partition `id` while a migration holds it: an
    /// outgoing one, or the incoming one whose copy it is, until its handover is over.
    pub(super) fn refuse_if_held(&self, id: &str) -> Result<(), ApiError> {
        if let Some(outbound) = self.outgoing.holding(id) {
            return Err(held_by(&outbound));
        }
        if let Some((session, phase)) = self.registry.held_by_session(id) {
            return Err(ApiError::HeldByMigration {
                partition: id.to_string(),
                migration: format!("session {session}"),
                side: "destination".into(),
                phase: format!("{phase:?}"),
            });
        }
        Ok(())
    }

    /// Cancels migration `migration` (or the running one of the partition of that id), if
    /// it is still before its handover.
    pub(super) fn cancel_out(&self, migration: &str) -> Result<MigrationInfo, ApiError> {
        let outbound = self.outgoing.find(migration)?;
        outbound
            .job
            .request_cancel()
            .map_err(|e| steer_refused(&outbound, e))?;
        warn!("migration {} cancelled by the operator", outbound.job.id());
        Ok(outbound.info())
    }

    /// Changes a running migration's downtime limit or bandwidth.
    pub(super) fn limit_out(
        &self,
        migration: &str,
        limits: LiveLimits,
    ) -> Result<MigrationInfo, ApiError> {
        let outbound = self.outgoing.find(migration)?;
        outbound
            .job
            .request_limits(limits)
            .map_err(|e| steer_refused(&outbound, e))?;
        Ok(outbound.info())
    }

    /// Switches a hybrid migration to post-copy at its next check.
    pub(super) fn postcopy_out(&self, migration: &str) -> Result<MigrationInfo, ApiError> {
        let outbound = self.outgoing.find(migration)?;
        outbound
            .job
            .request_postcopy(outbound.options.mode)
            .map_err(|e| steer_refused(&outbound, e))?;
        Ok(outbound.info())
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
        let outbound = self
            .outgoing
            .start(&id, paused.peer.clone(), &options, self)?;
        let daemon = self.clone();
        let task = Arc::clone(&outbound);
        tokio::spawn(async move {
            let outcome =
                async {
                    let job = Arc::clone(&task.job);
                    let mut destination =
                        match RemoteDestination::open(to, &daemon.security, daemon.peer_timeout)
                            .await
                        {
                            Ok(destination) => destination,
                            Err(why) => {
                                fail(&job);
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
                            &job,
                        )
                    })
                    .await?;
                    daemon.moved_if_completed(id, partition, &report, to);
                    Ok(report)
                }
                .await;
            task.end(outcome);
        });
        outbound.outcome().await
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

/// A migration that never reached the engine: users see it failed.
fn fail(job: &Job) {
    job.progress_mut().phase = Phase::Failed;
    let _ = job.step(crate::migration::source::SourceEvent::Fail, Mode::Precopy);
}
