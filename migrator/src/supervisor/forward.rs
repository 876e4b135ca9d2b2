//! The API, as the supervisor answers it: launches and incoming migrations start a process,
//! every call about a partition or a session goes to its process, and `list` asks them all.
//!
//! A forwarded call keeps the client's context (its deadline above all): a migration may run
//! for minutes, and the process answers within whatever the client allowed.

use std::{future::Future, sync::Arc, time::Duration};

use tarpc::{client::RpcError, context::Context};

use super::{
    LIST_WAIT, Supervisor, annotate, jobs::Steering, process::VmmProcess, runtime_dir::Record,
};
use crate::{
    api::API_VERSION,
    api::ApiError,
    api::DaemonInfo,
    api::LaunchRequest,
    api::MAX_IMAGE,
    api::MigrateRequest,
    api::MigrationInfo,
    api::MigratorApi,
    api::MigratorApiClient,
    api::PartitionInfo,
    api::Reconciled,
    api::client::context_with,
    api::heat_report::PartitionHeat,
    api::heat_report::PlanPreview,
    api::heat_view::HeatView,
    migration::{
        MigrationProgress, MigrationReport, Strategy,
        control::{
            CarriedHeat, CommitReply, CommitRequest, FinishReply, HandoverReply, PrepareReply,
            PrepareRequest, Recovery,
        },
        job::LiveLimits,
        report::PostCutoverFaults,
        source::MigrationOptions,
    },
    vmm::GuestImage,
};

impl Supervisor {
    /// Runs `call` on `vmm`'s client, marked in flight.
    async fn on<T, F, Fut>(&self, vmm: Arc<VmmProcess>, call: F) -> Result<T, ApiError>
    where
        F: FnOnce(MigratorApiClient) -> Fut,
        Fut: Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        let busy = vmm.busy();
        let result = call(vmm.client.clone()).await;
        drop(busy);
        match result {
            Ok(answer) => {
                vmm.answered();
                answer
            }
            Err(e) => Err(self.lost(&vmm, e).await),
        }
    }

    /// Why a call to `vmm` got no answer: if its process died, the crash as recorded once
    /// its watcher has seen the exit.
    async fn lost(&self, vmm: &Arc<VmmProcess>, error: RpcError) -> ApiError {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while super::runtime_dir::start_time(vmm.pid()).is_some()
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while self
            .inner
            .inventory
            .process(vmm.id())
            .is_some_and(|p| Arc::ptr_eq(&p, vmm))
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match self.inner.inventory.ended_info(vmm.id()) {
            Some(info) => ApiError::Partition(format!(
                "partition `{}` is {}: {}",
                vmm.id(),
                info.state.name(),
                info.crash_reason.unwrap_or_default()
            )),
            None => vmm.unreachable(error),
        }
    }
}

/// How long `status` waits for a partition's process before showing it unanswered.
const STATUS_WAIT: Duration = Duration::from_secs(5);

impl Supervisor {
    /// As [`Supervisor::on`], for partition `id`.
    pub(super) async fn on_partition<T, F, Fut>(&self, id: &str, call: F) -> Result<T, ApiError>
    where
        F: FnOnce(MigratorApiClient) -> Fut,
        Fut: Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        let vmm = self.inner.inventory.live(id)?;
        self.on(vmm, call).await
    }

    /// As [`Supervisor::on`], for incoming session `session`; any session call may leave the
    /// process holding nothing, which then ends it.
    async fn on_session<T, F, Fut>(&self, session: u64, call: F) -> Result<T, ApiError>
    where
        F: FnOnce(MigratorApiClient) -> Fut,
        Fut: Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        let vmm = self.inner.inventory.session(session)?;
        let answer = self.on(Arc::clone(&vmm), call).await;
        self.sweep(&vmm).await;
        answer
    }

    /// Passes on `answer` to a call that may have left partition `id`'s process holding
    /// nothing (a stop, a migration, a reconcile), having ended the process if it did.
    pub(super) async fn settled<T>(
        &self,
        id: &str,
        answer: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        if let Some(vmm) = self.inner.inventory.process(id) {
            self.sweep(&vmm).await;
        }
        answer
    }

    /// A partition's info from its process (with the process's pid and memory), or as it
    /// ended.
    async fn info(&self, ctx: Context, id: &str) -> Result<PartitionInfo, ApiError> {
        let Some(vmm) = self.inner.inventory.process(id) else {
            return self
                .inner
                .inventory
                .ended_info(id)
                .ok_or_else(|| ApiError::UnknownPartition(id.to_string()));
        };
        let target = id.to_string();
        // A status waits no longer than `list` does on one process: a wedged process is
        // shown as such, not waited on.
        let mut ctx = ctx;
        ctx.deadline = ctx.deadline.min(std::time::Instant::now() + STATUS_WAIT);
        let answer = self
            .on(
                Arc::clone(&vmm),
                |c| async move { c.status(ctx, target).await },
            )
            .await;
        let mut info = match answer {
            Ok(info) => info,
            Err(e) => {
                // Its process died: the partition as it ended.
                if let Some(ended) = self.inner.inventory.ended_info(id) {
                    return Ok(ended);
                }
                return match e {
                    ApiError::Internal(_) if super::runtime_dir::is_alive(&vmm.record) => {
                        Ok(vmm.unanswered())
                    }
                    e => Err(e),
                };
            }
        };
        annotate(&vmm, &mut info);
        vmm.remember(&info);
        Ok(info)
    }

    /// Starts a process for a partition of this shape, reserved against the limits, and
    /// runs `first` (its launch or prepare) on it. The process joins the inventory only if
    /// that succeeds; otherwise it is ended.
    async fn start_with<T, F, Fut>(&self, mut record: Record, first: F) -> Result<T, ApiError>
    where
        F: FnOnce(MigratorApiClient) -> Fut,
        Fut: Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        let limits = &self.inner.limits;
        let reservation = match self.inner.inventory.reserve(limits, record.mem_bytes) {
            Ok(reservation) => reservation,
            // Over a limit: a process may still count that holds nothing any more (an
            // incoming session that failed a moment ago). End those, then ask again.
            Err(_) => {
                for vmm in self.inner.inventory.processes() {
                    self.sweep(&vmm).await;
                }
                self.inner.inventory.reserve(limits, record.mem_bytes)?
            }
        };
        record.id = self.new_id();
        let vmm = self.start_process(record).await?;
        let result = {
            let _busy = vmm.busy();
            first(vmm.client.clone()).await
        };
        match result {
            Ok(Ok(value)) => {
                reservation.host(Arc::clone(&vmm));
                Ok(value)
            }
            failed => {
                vmm.begin_retiring();
                vmm.terminate();
                self.inner.dir.remove(vmm.id(), false);
                failed.map_err(|e| vmm.unreachable(e))?
            }
        }
    }
}

fn record(name: Option<String>, image: String, mem_bytes: u64, vcpus: u32) -> Record {
    Record {
        id: String::new(),
        session: None,
        pid: 0,
        start_time: 0,
        name,
        image,
        mem_bytes,
        vcpus,
    }
}

crate::api::listener::serves_api!(Supervisor);

impl MigratorApi for Supervisor {
    async fn hello(self, _: Context, min: u32, max: u32) -> Result<DaemonInfo, ApiError> {
        if !(min..=max).contains(&API_VERSION) {
            return Err(ApiError::Version {
                ours: API_VERSION,
                min,
                max,
            });
        }
        let mut info = DaemonInfo::new(self.inner.inventory.len());
        info.holds = self.inner.inventory.holds();
        let (used, free) = self.memory();
        info.memory_used = used;
        info.memory_free = Some(free);
        Ok(info)
    }

    async fn launch(self, ctx: Context, request: LaunchRequest) -> Result<String, ApiError> {
        if let GuestImage::Elf(bytes) = &request.image
            && bytes.len() > MAX_IMAGE
        {
            return Err(ApiError::ImageTooLarge(bytes.len()));
        }
        let record = record(
            request.name.clone(),
            request.image.label(),
            request.mem_size,
            request.vcpus,
        );
        self.start_with(record, |c| async move { c.launch(ctx, request).await })
            .await
    }

    async fn list(self, _: Context) -> Vec<PartitionInfo> {
        let live = self.inner.inventory.processes().into_iter().map(|vmm| {
            let supervisor = self.clone();
            async move {
                match supervisor
                    .info(context_with(LIST_WAIT), &vmm.record.id.clone())
                    .await
                {
                    Ok(info) => Some(info),
                    // A process holding an incoming migration not committed yet: no
                    // partition so far.
                    Err(ApiError::UnknownPartition(_)) => None,
                    // Wedged or too busy to answer in time: as it last was, marked so.
                    Err(_) => Some(vmm.unanswered()),
                }
            }
        });
        let mut all: Vec<PartitionInfo> = futures::future::join_all(live)
            .await
            .into_iter()
            .flatten()
            .collect();
        all.extend(self.inner.inventory.ended_infos());
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.dedup_by(|a, b| a.id == b.id);
        all
    }

    async fn status(self, ctx: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.info(ctx, &id).await
    }

    async fn pause(self, ctx: Context, id: String) -> Result<PartitionInfo, ApiError> {
        let target = id.clone();
        self.on_partition(&target, |c| async move { c.pause(ctx, id).await })
            .await
    }

    async fn resume(self, ctx: Context, id: String) -> Result<PartitionInfo, ApiError> {
        let target = id.clone();
        self.on_partition(&target, |c| async move { c.resume(ctx, id).await })
            .await
    }

    async fn stop(self, ctx: Context, id: String) -> Result<PartitionInfo, ApiError> {
        let target = id.clone();
        let answer = self
            .on_partition(&target, |c| async move { c.stop(ctx, id).await })
            .await;
        self.settled(&target, answer).await
    }

    async fn migrate(
        self,
        ctx: Context,
        request: MigrateRequest,
    ) -> Result<MigrationReport, ApiError> {
        self.migrate_attached(ctx, request).await
    }

    async fn migration_progress(self, ctx: Context, id: String) -> Option<MigrationProgress> {
        let vmm = self.inner.inventory.process(&id)?;
        vmm.client.migration_progress(ctx, id).await.ok().flatten()
    }

    async fn migration_prepare(
        self,
        ctx: Context,
        request: PrepareRequest,
    ) -> Result<PrepareReply, ApiError> {
        let config = &request.config;
        let mut record = record(
            config.name.clone(),
            config.image.label(),
            config.mem_size,
            config.vcpus,
        );
        record.session = Some(self.new_session_id());
        self.start_with(record, |c| async move {
            c.migration_prepare(ctx, request).await
        })
        .await
    }

    async fn migration_commit(
        self,
        ctx: Context,
        session: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, ApiError> {
        self.on_session(session, |c| async move {
            c.migration_commit(ctx, session, request).await
        })
        .await
    }

    async fn migration_finish(self, ctx: Context, session: u64) -> Result<FinishReply, ApiError> {
        self.on_session(session, |c| async move {
            c.migration_finish(ctx, session).await
        })
        .await
    }

    async fn migration_abort(self, ctx: Context, session: u64) {
        let _ = self
            .on_session(session, |c| async move {
                c.migration_abort(ctx, session).await.map(Ok)
            })
            .await;
    }

    async fn heat(self, ctx: Context, id: String, cells: u32) -> Result<HeatView, ApiError> {
        let target = id.clone();
        self.on_partition(&target, |c| async move { c.heat(ctx, id, cells).await })
            .await
    }

    async fn migration_faults(
        self,
        ctx: Context,
        session: u64,
    ) -> Result<PostCutoverFaults, ApiError> {
        self.on_session(session, |c| async move {
            c.migration_faults(ctx, session).await
        })
        .await
    }

    async fn warm_heat(self, ctx: Context, id: String) -> Result<PartitionHeat, ApiError> {
        let target = id.clone();
        self.on_partition(&target, |c| async move { c.warm_heat(ctx, id).await })
            .await
    }

    async fn page_heat(
        self,
        ctx: Context,
        id: String,
        duration: Duration,
    ) -> Result<PartitionHeat, ApiError> {
        let target = id.clone();
        self.on_partition(
            &target,
            |c| async move { c.page_heat(ctx, id, duration).await },
        )
        .await
    }

    async fn plan(
        self,
        ctx: Context,
        id: String,
        strategy: Strategy,
        duration: Duration,
    ) -> Result<PlanPreview, ApiError> {
        let target = id.clone();
        self.on_partition(&target, |c| async move {
            c.plan(ctx, id, strategy, duration).await
        })
        .await
    }

    async fn migration_handover(
        self,
        ctx: Context,
        session: u64,
    ) -> Result<HandoverReply, ApiError> {
        // The guest of a session runs only in the process started for it, and every process
        // running here is held (adopted at the start, if none was orphaned): a session none
        // holds runs nothing here, for certain.
        let orphans = self
            .inner
            .orphans
            .load(std::sync::atomic::Ordering::Acquire);
        let answer = self
            .on_session(session, |c| async move {
                c.migration_handover(ctx, session).await
            })
            .await;
        match answer {
            Err(ApiError::UnknownSession(_))
                if !orphans && self.inner.inventory.session(session).is_err() =>
            {
                Err(ApiError::NothingRunsHere(format!(
                    "no partition process here holds session {session}"
                )))
            }
            answer => answer,
        }
    }

    async fn reconcile(
        self,
        ctx: Context,
        id: String,
        resume_here: bool,
    ) -> Result<Reconciled, ApiError> {
        let target = id.clone();
        let answer = self
            .on_partition(&target, |c| async move {
                c.reconcile(ctx, id, resume_here).await
            })
            .await;
        self.settled(&target, answer).await
    }

    async fn migration_heat(
        self,
        ctx: Context,
        session: u64,
        heat: CarriedHeat,
    ) -> Result<(), ApiError> {
        self.on_session(session, |c| async move {
            c.migration_heat(ctx, session, heat).await
        })
        .await
    }

    async fn migration_recover(self, ctx: Context, session: u64) -> Result<Recovery, ApiError> {
        self.on_session(session, |c| async move {
            c.migration_recover(ctx, session).await
        })
        .await
    }

    async fn migrate_resume(
        self,
        ctx: Context,
        id: String,
        options: MigrationOptions,
    ) -> Result<MigrationReport, ApiError> {
        let target = id.clone();
        let _slot = self.inner.jobs.admit(self.inner.limits.max_migrations)?;
        let answer = self
            .on_partition(&target, |c| async move {
                c.migrate_resume(ctx, id, options).await
            })
            .await;
        self.settled(&target, answer).await
    }

    async fn migrations(self, _: Context) -> Vec<MigrationInfo> {
        self.all_migrations().await
    }

    async fn migrate_detached(
        self,
        ctx: Context,
        request: MigrateRequest,
    ) -> Result<String, ApiError> {
        self.migrate_detached_out(ctx, request).await
    }

    async fn migration_wait(
        self,
        ctx: Context,
        migration: String,
    ) -> Result<MigrationReport, ApiError> {
        self.wait_out(ctx, migration).await
    }

    async fn migration_cancel(
        self,
        ctx: Context,
        migration: String,
    ) -> Result<MigrationInfo, ApiError> {
        self.steer_out(ctx, migration, Steering::Cancel).await
    }

    async fn migration_set_limits(
        self,
        ctx: Context,
        migration: String,
        limits: LiveLimits,
    ) -> Result<MigrationInfo, ApiError> {
        self.steer_out(ctx, migration, Steering::Limits(limits))
            .await
    }

    async fn migration_postcopy(
        self,
        ctx: Context,
        migration: String,
    ) -> Result<MigrationInfo, ApiError> {
        self.steer_out(ctx, migration, Steering::Postcopy).await
    }
}
