//! The daemon: its state, and the tarpc API as a thin layer over the concepts that do the
//! work (`registry`, `admission`, `incoming`, `outgoing`, `peer`, `listener`).
//!
//! Partition operations that block (launch, pause) run on the blocking pool, so one slow
//! partition never stalls the others' requests.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use heatprobe::Probes;
use tarpc::context::Context;
use tracing::info;

use super::{
    blocking,
    carried::CarriedHeats,
    error_chain,
    kept::Kept,
    outgoing::Outgoing,
    profilers::Profilers,
    registry::{Registry, info_of},
};
use crate::{
    api::{
        API_VERSION, ApiError, DaemonInfo, LaunchRequest, MAX_IMAGE, MigrateRequest, MigrationInfo,
        MigratorApi, PartitionInfo, Reconciled,
        heat_report::{PartitionHeat, PlanPreview},
        heat_view::HeatView,
        listener::serves_api,
    },
    host::{admission::Limits, heat_sampling::HeatSampling, new_partition_id},
    migration::{
        MigrationProgress, MigrationReport, Strategy,
        control::{
            CarriedHeat, CommitReply, CommitRequest, FinishReply, HandoverReply, PrepareReply,
            PrepareRequest, Recovery,
        },
        destination::{ProbeSlot, WindowOrWhyNot},
        job::LiveLimits,
        report::PostCutoverFaults,
        source::MigrationOptions,
        transport::DEFAULT_PEER_TIMEOUT,
    },
    tls::Security,
    vmm::{GuestImage, Partition, PartitionConfig, PartitionState},
};

/// One daemon: its partitions, incoming migration sessions and outgoing migrations.
#[derive(Clone)]
pub struct Daemon {
    pub(super) registry: Registry,
    pub(super) outgoing: Outgoing,
    next_id: Arc<AtomicU64>,
    /// Where the API listens; data listeners bind to the same address.
    pub(super) listen: SocketAddr,
    api_version: u32,
    /// Loaded on first use by a heat-ordered migration, a heat view or an incoming migration
    /// (which counts the guest's faults after its resume).
    pub(super) probes: ProbeSlot,
    /// Incoming migrations' fault windows, until their source asks for the figures.
    /// Fault windows of sessions, until their source asks for the figures.
    pub(super) fault_windows: Kept<WindowOrWhyNot>,
    /// Finished sessions, for a source whose `finish` answer was lost and for the heat it
    /// hands on afterwards.
    pub(super) finished: Kept<super::incoming::Finished>,
    /// The shared heat profiler of each partition someone watches (dashboards, `page_heat`,
    /// `plan`): one per partition, since the probes count a vCPU thread for one target only.
    pub(super) profilers: Profilers,
    /// Heat that arrived with migrated partitions, while it is fresh.
    pub(super) carried_heat: CarriedHeats,
    pub(super) limits: Limits,
    /// How clients, peers and data connections are authenticated.
    pub(super) security: Security,
    /// How long a silent migration peer is waited on (data connections, calls to it).
    pub(super) peer_timeout: Duration,
    /// In a partition process: the id its supervisor chose for the partition it hosts, and
    /// for the incoming session it was started for.
    identity: Option<Identity>,
}

/// The ids a partition process gives what it hosts, chosen by its supervisor so that they
/// are unique across the supervisor's processes.
#[derive(Clone, Debug)]
pub struct Identity {
    pub partition: String,
    pub session: Option<u64>,
}

/// Drops a reference to a partition on the blocking pool. If it is the last one, the VM is torn
/// down, which waits on the kernel (SRCU grace periods, unmapping guest memory; tens of
/// milliseconds on a busy host) and must neither hold the inventory's lock nor an async worker.
pub(super) fn free_off_runtime(partition: Arc<Partition>) {
    tokio::task::spawn_blocking(move || drop(partition));
}

impl Daemon {
    /// A daemon that will listen on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self::with_api_version(listen, API_VERSION)
    }

    /// A daemon that claims another API version: for testing how peers refuse each other.
    pub fn with_api_version(listen: SocketAddr, api_version: u32) -> Self {
        Self {
            registry: Registry::default(),
            outgoing: Outgoing::default(),
            next_id: Arc::default(),
            listen,
            api_version,
            probes: ProbeSlot::default(),
            fault_windows: Kept::default(),
            finished: Kept::default(),
            profilers: Profilers::default(),
            carried_heat: CarriedHeats::default(),
            limits: Limits::default(),
            security: Security::Plain,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            identity: None,
        }
    }

    /// The same daemon as a partition process: what it launches or receives takes the ids
    /// of `identity`.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The same daemon giving up on a silent migration peer after `timeout`.
    pub fn with_peer_timeout(mut self, timeout: Duration) -> Self {
        self.peer_timeout = timeout;
        self
    }

    /// The same daemon with mutual TLS (or explicitly without).
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The same daemon with its shared profilers sampling as `sampling` says.
    pub fn with_heat_sampling(mut self, sampling: HeatSampling) -> Self {
        self.profilers = Profilers::new(sampling);
        self
    }

    /// The same daemon with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The eBPF probes, loaded and verified on first use. That takes long enough (hundreds of
    /// milliseconds on a busy host) to stall every request if it ran on an async worker, so
    /// the first load runs on the blocking pool.
    pub(super) async fn probes(&self) -> Result<Arc<Probes>, ApiError> {
        let loaded = match self.probes.get() {
            Some(loaded) => loaded,
            None => {
                let probes = self.probes.clone();
                blocking("loading the probes", move || probes.get_or_load()).await?
            }
        };
        loaded.map_err(|e| ApiError::Partition(format!("the eBPF probes: {}", error_chain(&*e))))
    }

    /// Reads each live partition's operation count into its pace history: a partition
    /// process calls it every `vmm::pace::PACE_EVERY`.
    pub fn record_paces(&self) {
        for (_, partition) in self.registry.live_by_id() {
            partition.record_pace();
        }
    }

    /// Unloads the eBPF probes if nothing uses them and no migration might soon: no
    /// profiler, fault window, incoming session or outgoing migration. A partition process
    /// calls it from time to time, so that an idle guest's process holds no programs that
    /// run on every page fault of the host (and not the 2-3 MiB they take).
    pub fn release_idle_probes(&self) -> bool {
        self.registry.sessions() == 0
            && !self.outgoing.any_running()
            && self.probes.release_unused()
    }

    /// Stops watching a partition's heat (its vCPU threads are then free for another
    /// profiler, such as a migration's).
    pub(super) fn unwatch(&self, id: &str) {
        self.profilers.unwatch(id);
    }

    /// Records `id` as stopped with its last `info`, forgetting the finished migrations of
    /// partitions too old to remember; frees the partition it replaced, if live.
    pub(super) fn remember_stopped(&self, id: String, info: PartitionInfo) {
        let (replaced, forgotten) = self.registry.remember_stopped(id, info);
        self.outgoing.forget_finished(&forgotten);
        if let Some(super::registry::Entry::Live(partition)) = replaced {
            free_off_runtime(partition);
        }
    }

    /// Runs `operation` on the blocking pool and returns the partition's info afterwards.
    async fn operate(
        &self,
        id: String,
        operation: fn(&Partition) -> Result<(), crate::vmm::PartitionError>,
    ) -> Result<PartitionInfo, ApiError> {
        let partition = self.registry.live(&id)?;
        self.refuse_if_held(&id)?;
        blocking("the partition operation", move || {
            operation(&partition).map_err(|e| ApiError::Partition(error_chain(&e)))?;
            Ok(info_of(&id, &partition))
        })
        .await?
    }

    pub(super) fn new_id(&self) -> String {
        if let Some(identity) = &self.identity {
            return identity.partition.clone();
        }
        new_partition_id(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    pub(super) fn new_session_id(&self) -> u64 {
        if let Some(session) = self.identity.as_ref().and_then(|i| i.session) {
            return session;
        }
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Live partitions plus incoming sessions: what a partition process still holds.
    pub fn holds(&self) -> usize {
        self.registry.live_partitions().len() + self.registry.sessions()
    }

    /// Stops every partition (on shutdown).
    pub fn stop_all(&self) {
        for partition in self.registry.live_partitions() {
            partition.stop();
        }
    }
}

serves_api!(Daemon);

impl MigratorApi for Daemon {
    async fn hello(self, _: Context, min: u32, max: u32) -> Result<DaemonInfo, ApiError> {
        if !(min..=max).contains(&self.api_version) {
            return Err(ApiError::Version {
                ours: self.api_version,
                min,
                max,
            });
        }
        let mut info = DaemonInfo::new(self.registry.len());
        info.api_version = self.api_version;
        info.holds = self.holds();
        Ok(info)
    }

    async fn launch(self, _: Context, request: LaunchRequest) -> Result<String, ApiError> {
        if let GuestImage::Elf(bytes) = &request.image
            && bytes.len() > MAX_IMAGE
        {
            return Err(ApiError::ImageTooLarge(bytes.len()));
        }
        // Given back by itself if the launch fails.
        let reservation = self.registry.reserve(&self.limits, request.mem_size)?;
        let config = PartitionConfig {
            name: request.name,
            mem_size: request.mem_size,
            vcpus: request.vcpus,
            image: request.image,
            args: request.args,
        };
        let partition = blocking("launch", move || Partition::launch(config))
            .await?
            .map_err(|e| ApiError::Partition(error_chain(&e)))?;
        let id = self.new_id();
        info!("launched partition {id}");
        reservation.host_partition(id.clone(), Arc::new(partition));
        Ok(id)
    }

    async fn list(self, _: Context) -> Vec<PartitionInfo> {
        self.registry.list()
    }

    async fn status(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.registry.info(&id)
    }

    async fn pause(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.operate(id, Partition::pause).await
    }

    async fn resume(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.operate(id, Partition::resume).await
    }

    async fn stop(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.stop_partition(id).await
    }

    async fn migrate(
        self,
        _: Context,
        request: MigrateRequest,
    ) -> Result<MigrationReport, ApiError> {
        let outbound = self.start_out(request).await?;
        outbound.outcome().await
    }

    async fn migration_progress(self, _: Context, id: String) -> Option<MigrationProgress> {
        self.outgoing.progress(&id)
    }

    async fn migration_prepare(
        self,
        _: Context,
        request: PrepareRequest,
    ) -> Result<PrepareReply, ApiError> {
        self.prepare_incoming(request).await
    }

    async fn migration_commit(
        self,
        _: Context,
        session: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, ApiError> {
        self.commit_incoming(session, request).await
    }

    async fn migration_finish(self, _: Context, session: u64) -> Result<FinishReply, ApiError> {
        self.finish_incoming(session).await
    }

    async fn migration_abort(self, _: Context, session: u64) {
        self.abort_incoming(session).await;
    }

    async fn migration_faults(
        self,
        _: Context,
        session: u64,
    ) -> Result<PostCutoverFaults, ApiError> {
        self.faults_incoming(session).await
    }

    async fn heat(self, _: Context, id: String, cells: u32) -> Result<HeatView, ApiError> {
        self.heat_view(id, cells).await
    }

    async fn page_heat(
        self,
        _: Context,
        id: String,
        duration: Duration,
    ) -> Result<PartitionHeat, ApiError> {
        self.partition_heat(id, duration).await
    }

    async fn warm_heat(self, _: Context, id: String) -> Result<PartitionHeat, ApiError> {
        self.warm_partition_heat(id).await
    }

    async fn plan(
        self,
        _: Context,
        id: String,
        strategy: Strategy,
        duration: Duration,
    ) -> Result<PlanPreview, ApiError> {
        self.plan_preview(id, strategy, duration).await
    }

    async fn migration_handover(self, _: Context, session: u64) -> Result<HandoverReply, ApiError> {
        self.handover_incoming(session).await
    }

    async fn migration_heat(
        self,
        _: Context,
        session: u64,
        heat: CarriedHeat,
    ) -> Result<(), ApiError> {
        self.heat_incoming(session, heat)
    }

    async fn reconcile(
        self,
        _: Context,
        id: String,
        resume_here: bool,
    ) -> Result<Reconciled, ApiError> {
        self.refuse_if_held(&id)?;
        self.reconcile_partition(id, resume_here).await
    }

    async fn migration_recover(self, _: Context, session: u64) -> Result<Recovery, ApiError> {
        self.recover_incoming(session).await
    }

    async fn migrate_resume(
        self,
        _: Context,
        id: String,
        options: MigrationOptions,
    ) -> Result<MigrationReport, ApiError> {
        self.resume_out(id, options).await
    }

    async fn migrations(self, _: Context) -> Vec<MigrationInfo> {
        let mut all = self.outgoing.list();
        all.extend(self.incoming_migrations());
        all
    }

    async fn migrate_detached(
        self,
        _: Context,
        request: MigrateRequest,
    ) -> Result<String, ApiError> {
        let outbound = self.start_out(request).await?;
        Ok(outbound.job.id().to_string())
    }

    async fn migration_wait(
        self,
        _: Context,
        migration: String,
    ) -> Result<MigrationReport, ApiError> {
        let outbound = self.outgoing.find(&migration)?;
        outbound.outcome().await
    }

    async fn migration_cancel(
        self,
        _: Context,
        migration: String,
    ) -> Result<MigrationInfo, ApiError> {
        self.cancel_out(&migration)
    }

    async fn migration_set_limits(
        self,
        _: Context,
        migration: String,
        limits: LiveLimits,
    ) -> Result<MigrationInfo, ApiError> {
        self.limit_out(&migration, limits)
    }

    async fn migration_postcopy(
        self,
        _: Context,
        migration: String,
    ) -> Result<MigrationInfo, ApiError> {
        self.postcopy_out(&migration)
    }
}

impl Daemon {
    /// Stops a partition for good, remembers how it ended, and frees its memory.
    pub(super) async fn stop_partition(&self, id: String) -> Result<PartitionInfo, ApiError> {
        let partition = self.registry.live(&id)?;
        self.refuse_if_held(&id)?;
        // Its copy may be the only one with every page: the operator settles it first.
        if partition.awaiting_handover().is_some() || partition.postcopy_paused().is_some() {
            return Err(ApiError::Partition(format!(
                "partition `{id}` is {}: its copy may be the guest's only complete one; \
                 `migrator reconcile {id}` settles it (`--resume-here` on your word that \
                 the destination's copy is gone), and then it stops",
                partition.state().name()
            )));
        }
        self.unwatch(&id);
        self.carried_heat.forget(&id);
        let stopped = blocking("stop", move || {
            partition.stop();
            partition
        })
        .await?;
        let mut info = info_of(&id, &stopped);
        info.state = PartitionState::Stopped;
        self.remember_stopped(id.clone(), info.clone());
        // Dropping the last reference frees the partition's memory and its VM.
        free_off_runtime(stopped);
        info!("stopped partition {id}");
        Ok(info)
    }
}
