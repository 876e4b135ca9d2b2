//! Outgoing migrations as the supervisor sees them: each runs in its partition's process;
//! the supervisor counts them against its limit for as long as they run, whoever waits for
//! them, and keeps the last reports for a `wait` that comes after the process has ended.
//!
//! A migration's id is `PARTITION.mN`, so a call about it goes to its partition's process.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tarpc::context::Context;

use super::{LIST_WAIT, Supervisor};
use crate::{
    api::ApiError,
    api::MigrateRequest,
    api::MigrationInfo,
    api::client::context_with,
    host::admission::AdmissionError,
    migration::{MigrationReport, Mode, Strategy, job::LiveLimits},
};

/// Reports kept for a late `wait`.
const KEEP_REPORTS: usize = 64;

/// How long a detached migration is waited on by the supervisor: longer than any migration
/// runs (a post-copy's recover window is ten minutes by default).
const DETACHED_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The partition a migration id names: `PARTITION.mN`, or a partition id itself (its latest
/// migration).
pub fn partition_of(migration: &str) -> &str {
    match migration.rsplit_once(".m") {
        Some((partition, number)) if number.bytes().all(|b| b.is_ascii_digit()) => partition,
        _ => migration,
    }
}

/// The supervisor's count of outgoing migrations, and their last reports.
#[derive(Default)]
pub struct Jobs {
    running: AtomicUsize,
    reports: Mutex<VecDeque<(String, Result<MigrationReport, ApiError>)>>,
}

/// One outgoing migration counted against the limit; dropping it gives the slot back, so a
/// call that is dropped half-way never leaks it.
pub struct Slot {
    jobs: Arc<Jobs>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.jobs.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Jobs {
    /// Takes a slot for one more migration, or says the limit is reached.
    pub fn admit(self: &Arc<Self>, max: usize) -> Result<Slot, ApiError> {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| ApiError::from(AdmissionError::Migrations { max }))?;
        Ok(Slot {
            jobs: Arc::clone(self),
        })
    }

    fn remember(&self, migration: String, outcome: Result<MigrationReport, ApiError>) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.retain(|(id, _)| *id != migration);
        reports.push_back((migration, outcome));
        while reports.len() > KEEP_REPORTS {
            reports.pop_front();
        }
    }

    fn report(&self, migration: &str) -> Option<Result<MigrationReport, ApiError>> {
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports
            .iter()
            .rev()
            .find(|(id, _)| id == migration || partition_of(id) == migration)
            .map(|(_, outcome)| outcome.clone())
    }
}

impl Supervisor {
    /// Migrates as `migrate` does, in a task of the supervisor's own: the caller may go away
    /// and the migration, its slot and the clean-up after it run on to the end.
    pub(super) async fn migrate_attached(
        &self,
        ctx: Context,
        request: MigrateRequest,
    ) -> Result<MigrationReport, ApiError> {
        let id = request.id.clone();
        let (mode, strategy) = (request.options.mode, request.options.strategy);
        let slot = self.admit(mode, strategy)?;
        let supervisor = self.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            let answer = supervisor
                .on_partition(&id, |c| async move { c.migrate(ctx, request).await })
                .await;
            supervisor
                .inner
                .recorder
                .migration_ended(mode, strategy, &answer);
            if let Ok(report) = &answer
                && let Some(migration) = &report.migration
            {
                supervisor
                    .inner
                    .jobs
                    .remember(migration.clone(), answer.clone());
            }
            supervisor.settled(&id, answer).await
        });
        task.await
            .map_err(|e| ApiError::Internal(format!("the migration's task: {e}")))?
    }

    /// Starts a migration and returns its id at once; a task of the supervisor waits for it,
    /// holding its slot, keeps its report and ends the process if it holds nothing after.
    pub(super) async fn migrate_detached_out(
        &self,
        ctx: Context,
        request: MigrateRequest,
    ) -> Result<String, ApiError> {
        let id = request.id.clone();
        let (mode, strategy) = (request.options.mode, request.options.strategy);
        let slot = self.admit(mode, strategy)?;
        let started = self
            .on_partition(
                &id,
                |c| async move { c.migrate_detached(ctx, request).await },
            )
            .await;
        let migration = match started {
            Ok(migration) => migration,
            Err(e) => {
                self.inner
                    .recorder
                    .migration_ended(mode, strategy, &Err(e.clone()));
                return Err(e);
            }
        };
        let supervisor = self.clone();
        let waited = migration.clone();
        tokio::spawn(async move {
            // The slot goes to the task that waits.
            let _slot = slot;
            let target = waited.clone();
            let outcome = supervisor
                .on_partition(&id, |c| async move {
                    c.migration_wait(context_with(DETACHED_WAIT), target).await
                })
                .await;
            supervisor
                .inner
                .recorder
                .migration_ended(mode, strategy, &outcome);
            supervisor.inner.jobs.remember(waited, outcome.clone());
            let _ = supervisor.settled(&id, outcome).await;
        });
        Ok(migration)
    }

    /// A slot for one more outgoing migration; a refusal counts as a migration that ended in
    /// an error.
    fn admit(&self, mode: Mode, strategy: Strategy) -> Result<Slot, ApiError> {
        let admitted = self.inner.jobs.admit(self.inner.limits.max_migrations);
        if let Err(e) = &admitted {
            self.inner
                .recorder
                .migration_ended(mode, strategy, &Err(e.clone()));
        }
        admitted
    }

    /// Waits for migration `migration` and returns its report: from its process, or, once
    /// that has ended, as the supervisor kept it.
    pub(super) async fn wait_out(
        &self,
        ctx: Context,
        migration: String,
    ) -> Result<MigrationReport, ApiError> {
        let partition = partition_of(&migration).to_string();
        if self.inner.inventory.process(&partition).is_some() {
            let asked = migration.clone();
            let answer = self
                .on_partition(
                    &partition,
                    |c| async move { c.migration_wait(ctx, asked).await },
                )
                .await;
            match answer {
                // The process ended meanwhile: the report may be kept here.
                Err(ApiError::UnknownMigration(_)) | Err(ApiError::Partition(_)) => {}
                answer => return answer,
            }
        }
        self.inner
            .jobs
            .report(&migration)
            .unwrap_or(Err(ApiError::UnknownMigration(migration)))
    }

    /// Every migration of every process (one that does not answer in time is left out).
    pub(super) async fn all_migrations(&self) -> Vec<MigrationInfo> {
        let asks = self
            .inner
            .inventory
            .processes()
            .into_iter()
            .map(|vmm| async move {
                vmm.client
                    .migrations(context_with(LIST_WAIT))
                    .await
                    .unwrap_or_default()
            });
        let mut all: Vec<MigrationInfo> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        all.sort_by(|a, b| {
            a.started_unix_ms
                .cmp(&b.started_unix_ms)
                .then(a.id.cmp(&b.id))
        });
        all
    }

    /// A steering call (cancel, limits, post-copy) to the process of migration `migration`.
    pub(super) async fn steer_out(
        &self,
        ctx: Context,
        migration: String,
        how: Steering,
    ) -> Result<MigrationInfo, ApiError> {
        let partition = partition_of(&migration).to_string();
        if self.inner.inventory.process(&partition).is_none() {
            return Err(ApiError::UnknownMigration(migration));
        }
        self.on_partition(&partition, |c| async move {
            match how {
                Steering::Cancel => c.migration_cancel(ctx, migration).await,
                Steering::Limits(limits) => c.migration_set_limits(ctx, migration, limits).await,
                Steering::Postcopy => c.migration_postcopy(ctx, migration).await,
            }
        })
        .await
    }
}

/// What an operator asks of a running migration.
pub enum Steering {
    Cancel,
    Limits(LiveLimits),
    Postcopy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_id_names_its_partition() {
        assert_eq!(partition_of("p0-1a2b3c.m4"), "p0-1a2b3c");
        assert_eq!(partition_of("p0-1a2b3c"), "p0-1a2b3c");
        // Only a number after `.m` makes it a migration's.
        assert_eq!(partition_of("p0-1a2b3c.mx"), "p0-1a2b3c.mx");
    }

    #[test]
    fn a_slot_dropped_on_any_path_is_given_back() {
        let jobs = Arc::new(Jobs::default());
        let first = jobs.admit(2).unwrap();
        let second = jobs.admit(2).unwrap();
        assert!(jobs.admit(2).is_err());
        drop(first);
        let third = jobs.admit(2).unwrap();
        drop((second, third));
        assert_eq!(jobs.running.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_last_report_of_a_migration_is_kept_for_a_late_wait() {
        let jobs = Jobs::default();
        for n in 0..(KEEP_REPORTS + 3) {
            jobs.remember(format!("p0.m{n}"), Err(ApiError::Migration(n.to_string())));
        }
        assert!(jobs.report("p0.m0").is_none(), "the oldest are forgotten");
        let last = format!("p0.m{}", KEEP_REPORTS + 2);
        assert_eq!(
            jobs.report(&last),
            Some(Err(ApiError::Migration((KEEP_REPORTS + 2).to_string())))
        );
        // By partition: its latest.
        assert_eq!(jobs.report("p0"), jobs.report(&last));
    }
}
