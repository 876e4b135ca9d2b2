//! The daemon side of the API. Partition operations that block (launch, pause) run on the
//! blocking pool so one slow partition never stalls the others' requests.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use tarpc::{
    context::Context,
    server::{self, Channel},
};
use thiserror::Error;
use tracing::{info, warn};

use super::{
    api::{
        API_VERSION, ApiError, DaemonInfo, LaunchRequest, MAX_IMAGE, MigrateRequest, MigratorApi,
        MigratorApiClient, PartitionInfo,
    },
    client::{Connection, context_with},
    codec::transport,
    heat_view::{HeatMonitor, HeatView},
};
use crate::{
    migration::{
        MigrationProgress, MigrationReport, Mode, Strategy,
        destination::Session,
        link::{DataLink, DataStream, LinkError},
        protocol::PROTOCOL_VERSION,
        report::Phase,
        source::{
            CommitReply, CommitRequest, Destination, FinishReply, PrepareReply, PrepareRequest,
        },
        transport::DEFAULT_PEER_TIMEOUT,
    },
    tls::Security,
    vmm::{GuestImage, Partition, PartitionConfig, PartitionState},
};
use heatprobe::{Probes, TargetId};

/// How many stopped partitions a daemon remembers (for `status` and `list`).
pub const KEEP_STOPPED: usize = 128;

enum Entry {
    Live(Arc<Partition>),
    /// What a stopped partition last looked like; its memory is freed.
    Stopped(PartitionInfo),
}

/// What one daemon may take on; past these, requests are refused with a clear error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Live partitions plus incoming migrations.
    pub max_partitions: usize,
    /// Guest memory of live partitions plus incoming migrations, in bytes.
    pub max_memory: u64,
    /// Outgoing migrations running at once.
    pub max_migrations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_partitions: 64,
            max_memory: u64::MAX,
            max_migrations: 4,
        }
    }
}

/// Partitions and memory promised to launches and migrations still in progress.
#[derive(Default)]
struct Reserved {
    partitions: usize,
    memory: u64,
}

/// The daemon's partitions, incoming migration sessions and outgoing migrations.
#[derive(Clone)]
pub struct Daemon {
    partitions: Arc<Mutex<BTreeMap<String, Entry>>>,
    next_id: Arc<AtomicU64>,
    sessions: Arc<Mutex<BTreeMap<u64, Arc<Session>>>>,
    migrations: Arc<Mutex<BTreeMap<String, Arc<Mutex<MigrationProgress>>>>>,
    /// Where the API listens; data listeners bind to the same address.
    listen: SocketAddr,
    api_version: u32,
    /// Loaded on first use by a heat-ordered migration or an incoming hybrid one.
    probes: Arc<OnceLock<Result<Arc<Probes>, String>>>,
    /// Incoming hybrid sessions whose guest faults after cutover are being counted.
    fault_counters: Arc<Mutex<BTreeMap<u64, TargetId>>>,
    /// Heat profilers of partitions someone watches (dashboards).
    monitors: Arc<Mutex<BTreeMap<String, HeatMonitor>>>,
    limits: Limits,
    reserved: Arc<Mutex<Reserved>>,
    /// How clients, peers and data connections are authenticated.
    security: Security,
    /// Recent pre-copy sessions that committed, with the partition each became, in case
    /// their source aborts after all (it stopped waiting for the commit's answer).
    committed: Arc<Mutex<VecDeque<(u64, String)>>>,
    /// Stopped partitions, oldest first: only the last [`KEEP_STOPPED`] are remembered.
    stopped_order: Arc<Mutex<VecDeque<String>>>,
    /// How long a silent migration peer is waited on (data connections, calls to it).
    peer_timeout: Duration,
}

fn info_of(id: &str, partition: &Partition) -> PartitionInfo {
    let status = partition.status();
    let config = partition.config();
    PartitionInfo {
        id: id.to_string(),
        name: config.name.clone(),
        image: match &config.image {
            GuestImage::Builtin(name) => format!("workload {name}"),
            GuestImage::Elf(_) => "image".into(),
        },
        state: status.state,
        ops: status.progress.ops,
        errors: status.progress.errors,
        checks: status.progress.checks,
        mem_bytes: config.mem_size,
        vcpus: config.vcpus,
        console: status.console,
        crash_reason: status.crash_reason,
        check_failures: status.check_failures,
    }
}

/// Drops a reference to a partition on the blocking pool. If it is the last one, the VM is torn
/// down, which waits on the kernel (SRCU grace periods, unmapping guest memory; tens of
/// milliseconds on a busy host) and must neither hold the partitions lock nor an async worker.
fn free_off_runtime(partition: Arc<Partition>) {
    tokio::task::spawn_blocking(move || drop(partition));
}

fn error_chain(error: &dyn std::error::Error) -> String {
    heatprobe::probes::error_chain(error)
}

impl Daemon {
    /// A daemon that will listen on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self::with_api_version(listen, API_VERSION)
    }

    /// A daemon that claims another API version: for testing how peers refuse each other.
    pub fn with_api_version(listen: SocketAddr, api_version: u32) -> Self {
        Self {
            partitions: Arc::default(),
            next_id: Arc::default(),
            sessions: Arc::default(),
            migrations: Arc::default(),
            listen,
            api_version,
            probes: Arc::default(),
            fault_counters: Arc::default(),
            monitors: Arc::default(),
            limits: Limits::default(),
            reserved: Arc::default(),
            security: Security::Plain,
            stopped_order: Arc::default(),
            committed: Arc::default(),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
        }
    }

    /// The same daemon giving up on a silent migration peer after `timeout`.
    pub fn with_peer_timeout(mut self, timeout: Duration) -> Self {
        self.peer_timeout = timeout;
        self
    }

    /// Drops incoming session `id` once it fails before its cutover: its source was killed or
    /// cut off and will send no `abort`. Ends when the session leaves the map.
    fn reap_on_failure(&self, id: u64, session: &Arc<Session>) {
        let daemon = self.clone();
        let session = Arc::downgrade(session);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(session) = session.upgrade() else {
                    return;
                };
                let current = daemon
                    .sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .cloned();
                if !current.is_some_and(|c| Arc::ptr_eq(&c, &session)) {
                    return;
                }
                if let Some(error) = session.failed_before_cutover() {
                    warn!("migration session {id} failed, dropping it: {error}");
                    session.abort();
                    daemon.remove_session(id);
                    return;
                }
            }
        });
    }

    /// The same daemon with mutual TLS (or explicitly without).
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The same daemon with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Reserves room for one more partition of `memory` bytes, or says which limit it breaks.
    /// The reservation is released with [`Daemon::release`] once the partition is live (and
    /// counted as such) or has failed to start.
    fn reserve(&self, memory: u64) -> Result<(), ApiError> {
        let (live, live_memory) = {
            let partitions = self.lock();
            let live: Vec<u64> = partitions
                .values()
                .filter_map(|e| match e {
                    Entry::Live(p) => Some(p.config().mem_size),
                    Entry::Stopped(_) => None,
                })
                .collect();
            (live.len(), live.iter().sum::<u64>())
        };
        let (sessions, session_memory) = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            (
                sessions.len(),
                sessions.values().map(|s| s.config.mem_size).sum::<u64>(),
            )
        };
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let count = live + sessions + reserved.partitions;
        if count >= self.limits.max_partitions {
            return Err(ApiError::Limit(format!(
                "this daemon already hosts its maximum of {} partitions",
                self.limits.max_partitions
            )));
        }
        let used = live_memory + session_memory + reserved.memory;
        if used.saturating_add(memory) > self.limits.max_memory {
            return Err(ApiError::Limit(format!(
                "{} MiB more guest memory would exceed this daemon's limit of {} MiB ({} MiB in use)",
                memory >> 20,
                self.limits.max_memory >> 20,
                used >> 20
            )));
        }
        reserved.partitions += 1;
        reserved.memory += memory;
        Ok(())
    }

    fn release(&self, memory: u64) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        reserved.partitions = reserved.partitions.saturating_sub(1);
        reserved.memory = reserved.memory.saturating_sub(memory);
    }

    fn probes(&self) -> Result<Arc<Probes>, String> {
        self.probes
            .get_or_init(|| Probes::load().map(Arc::new).map_err(|e| error_chain(&e)))
            .clone()
    }

    /// [`Daemon::probes`] for async code: the first call loads and verifies the eBPF
    /// programs, which takes long enough (hundreds of milliseconds on a busy host) to stall
    /// every request if it ran on an async worker, so it runs on the blocking pool.
    async fn probes_off_runtime(&self) -> Result<Arc<Probes>, String> {
        if let Some(loaded) = self.probes.get() {
            return loaded.clone();
        }
        let daemon = self.clone();
        tokio::task::spawn_blocking(move || daemon.probes())
            .await
            .unwrap_or_else(|e| Err(format!("loading the probes panicked: {e}")))
    }

    fn session(&self, id: u64) -> Result<Arc<Session>, ApiError> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or(ApiError::UnknownSession(id))
    }

    /// Stops watching a partition's heat (its vCPU threads are then free for another
    /// profiler, such as a migration's).
    fn unwatch(&self, id: &str) {
        self.monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    fn remove_session(&self, id: u64) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    /// Records `id` as stopped with its last `info`; forgets the oldest stopped partitions
    /// (and their finished migrations) past [`KEEP_STOPPED`], so a long-lived daemon's
    /// memory stays bounded. Returns what `id` replaced.
    fn remember_stopped(&self, id: String, info: PartitionInfo) -> Option<Entry> {
        let mut forgotten = Vec::new();
        let replaced = {
            let mut partitions = self.lock();
            let replaced = partitions.insert(id.clone(), Entry::Stopped(info));
            let mut order = self.stopped_order.lock().unwrap_or_else(|p| p.into_inner());
            order.retain(|old| *old != id);
            order.push_back(id);
            while order.len() > KEEP_STOPPED {
                let Some(old) = order.pop_front() else { break };
                if matches!(partitions.get(&old), Some(Entry::Stopped(_))) {
                    partitions.remove(&old);
                    forgotten.push(old);
                }
            }
            replaced
        };
        let mut migrations = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        for old in forgotten {
            let finished = migrations.get(&old).is_some_and(|p| {
                matches!(
                    p.lock().map(|p| p.phase).unwrap_or(Phase::Failed),
                    Phase::Completed | Phase::Failed
                )
            });
            if finished {
                migrations.remove(&old);
            }
        }
        replaced
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, id: &str) -> Result<Arc<Partition>, ApiError> {
        match self.lock().get(id) {
            Some(Entry::Live(partition)) => Ok(Arc::clone(partition)),
            Some(Entry::Stopped(_)) => {
                Err(ApiError::Partition(format!("partition `{id}` is stopped")))
            }
            None => Err(ApiError::UnknownPartition(id.to_string())),
        }
    }

    /// Runs `operation` on the blocking pool and returns the partition's info afterwards.
    async fn operate(
        &self,
        id: String,
        operation: fn(&Partition) -> Result<(), crate::vmm::PartitionError>,
    ) -> Result<PartitionInfo, ApiError> {
        let partition = self.live(&id)?;
        tokio::task::spawn_blocking(move || {
            operation(&partition).map_err(|e| ApiError::Partition(error_chain(&e)))?;
            Ok(info_of(&id, &partition))
        })
        .await
        .map_err(|e| ApiError::Partition(format!("the operation panicked: {e}")))?
    }

    fn new_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let salt = xxhash_rust::xxh3::xxh3_64(
            format!(
                "{}-{n}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            )
            .as_bytes(),
        );
        format!("p{n}-{:06x}", salt & 0xff_ffff)
    }

    /// Stops every partition (on shutdown).
    pub fn stop_all(&self) {
        let live: Vec<Arc<Partition>> = self
            .lock()
            .values()
            .filter_map(|e| match e {
                Entry::Live(p) => Some(Arc::clone(p)),
                Entry::Stopped(_) => None,
            })
            .collect();
        for partition in live {
            partition.stop();
        }
    }
}

impl MigratorApi for Daemon {
    async fn hello(self, _: Context, min: u32, max: u32) -> Result<DaemonInfo, ApiError> {
        if !(min..=max).contains(&self.api_version) {
            return Err(ApiError::Version {
                ours: self.api_version,
                min,
                max,
            });
        }
        let mut info = DaemonInfo::new(self.lock().len());
        info.api_version = self.api_version;
        Ok(info)
    }

    async fn launch(self, _: Context, request: LaunchRequest) -> Result<String, ApiError> {
        if let GuestImage::Elf(bytes) = &request.image
            && bytes.len() > MAX_IMAGE
        {
            return Err(ApiError::ImageTooLarge(bytes.len()));
        }
        let memory = request.mem_size;
        self.reserve(memory)?;
        let config = PartitionConfig {
            name: request.name,
            mem_size: request.mem_size,
            vcpus: request.vcpus,
            image: request.image,
            args: request.args,
        };
        let launched = tokio::task::spawn_blocking(move || Partition::launch(config))
            .await
            .map_err(|e| ApiError::Partition(format!("launch panicked: {e}")))
            .and_then(|r| r.map_err(|e| ApiError::Partition(error_chain(&e))));
        let partition = match launched {
            Ok(partition) => partition,
            Err(e) => {
                self.release(memory);
                return Err(e);
            }
        };
        let id = self.new_id();
        info!("launched partition {id}");
        // Counted as live from here: the reservation goes in the same breath.
        self.lock()
            .insert(id.clone(), Entry::Live(Arc::new(partition)));
        self.release(memory);
        Ok(id)
    }

    async fn list(self, _: Context) -> Vec<PartitionInfo> {
        self.lock()
            .iter()
            .map(|(id, entry)| match entry {
                Entry::Live(partition) => info_of(id, partition),
                Entry::Stopped(info) => info.clone(),
            })
            .collect()
    }

    async fn status(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        match self.lock().get(&id) {
            Some(Entry::Live(partition)) => Ok(info_of(&id, partition)),
            Some(Entry::Stopped(info)) => Ok(info.clone()),
            None => Err(ApiError::UnknownPartition(id)),
        }
    }

    async fn pause(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.operate(id, Partition::pause).await
    }

    async fn resume(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.operate(id, Partition::resume).await
    }

    async fn migrate(
        self,
        _: Context,
        request: MigrateRequest,
    ) -> Result<MigrationReport, ApiError> {
        self.migrate_impl(request).await
    }

    async fn migration_progress(self, _: Context, id: String) -> Option<MigrationProgress> {
        let migrations = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        migrations
            .get(&id)
            .map(|p| p.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    async fn migration_prepare(
        self,
        _: Context,
        request: PrepareRequest,
    ) -> Result<PrepareReply, ApiError> {
        if !(request.protocol_min..=request.protocol_max).contains(&PROTOCOL_VERSION) {
            return Err(ApiError::Protocol {
                ours: PROTOCOL_VERSION,
                min: request.protocol_min,
                max: request.protocol_max,
            });
        }
        let memory = request.config.mem_size;
        self.reserve(memory)?;
        let listen = self.listen;
        let link = DataLink::new(self.security.clone(), tokio::runtime::Handle::current());
        let peer_timeout = self.peer_timeout;
        let prepared = tokio::task::spawn_blocking(move || {
            Session::prepare(&request, listen, link, peer_timeout)
        })
        .await
        .map_err(|e| ApiError::Migration(format!("prepare panicked: {e}")))
        .and_then(|r| r.map_err(|e| ApiError::Migration(error_chain(&e))));
        let (session, data_port) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                self.release(memory);
                return Err(e);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&session));
        // The session now counts against the limits itself.
        self.release(memory);
        self.reap_on_failure(id, &session);
        info!("migration session {id} waiting on port {data_port}");
        Ok(PrepareReply {
            session: id,
            data_port,
        })
    }

    async fn migration_commit(
        self,
        _: Context,
        session_id: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, ApiError> {
        let session = self.session(session_id)?;
        let committing = Arc::clone(&session);
        let result = tokio::task::spawn_blocking(move || committing.commit(request))
            .await
            .map_err(|e| ApiError::Migration(format!("commit panicked: {e}")))?;
        let (partition, digest) = match result {
            Ok(done) => done,
            Err(e) => {
                session.abort();
                self.remove_session(session_id);
                return Err(ApiError::Migration(error_chain(&e)));
            }
        };
        let id = self.new_id();
        info!("migrated partition arrived as {id}");
        self.lock()
            .insert(id.clone(), Entry::Live(Arc::new(partition)));
        if session.mode == Mode::Precopy {
            self.remove_session(session_id);
            let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
            committed.push_back((session_id, id.clone()));
            if committed.len() > KEEP_STOPPED {
                committed.pop_front();
            }
        }
        Ok(CommitReply {
            id_on_destination: id,
            dest_digest: digest.map(|d| d.total_hex()),
        })
    }

    async fn migration_finish(self, _: Context, session_id: u64) -> Result<FinishReply, ApiError> {
        let session = self.session(session_id)?;
        let finishing = Arc::clone(&session);
        let result = tokio::task::spawn_blocking(move || finishing.finish())
            .await
            .map_err(|e| ApiError::Migration(format!("finish panicked: {e}")))?;
        self.remove_session(session_id);
        let mut reply = result.map_err(|e| ApiError::Migration(error_chain(&e)))?;
        let target = self
            .fault_counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session_id);
        if let Some(target) = target
            && let Ok(probes) = self.probes_off_runtime().await
        {
            if let Ok(counts) = probes.counts(target) {
                reply.post_cutover_faults = Some(counts.values().map(|c| c.reads + c.writes).sum());
            }
            let _ = probes.untrack(target);
        }
        Ok(reply)
    }

    async fn migration_abort(self, ctx: Context, session_id: u64) {
        if let Some(session) = self.remove_session(session_id) {
            session.abort();
            info!("migration session {session_id} aborted");
            return;
        }
        // A pre-copy session that committed here after its source stopped waiting for the
        // answer: the source resumed its copy, so this one must not run too.
        let committed = {
            let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
            let found = committed.iter().position(|(s, _)| *s == session_id);
            found.and_then(|i| committed.remove(i))
        };
        if let Some((_, id)) = committed {
            warn!("migration session {session_id} was aborted after its commit: stopping {id}");
            if let Err(e) = MigratorApi::stop(self, ctx, id.clone()).await {
                warn!("stopping {id}: {e}");
            }
        }
    }

    async fn heat(self, _: Context, id: String, cells: u32) -> Result<HeatView, ApiError> {
        let partition = self.live(&id)?;
        let probes = self
            .probes_off_runtime()
            .await
            .map_err(ApiError::Partition)?;
        let monitors = Arc::clone(&self.monitors);
        tokio::task::spawn_blocking(move || {
            let mut monitors = monitors.lock().unwrap_or_else(|p| p.into_inner());
            if !monitors.contains_key(&id) {
                let monitor = HeatMonitor::start(probes, partition)?;
                monitors.insert(id.clone(), monitor);
            }
            match monitors.get_mut(&id) {
                Some(monitor) => monitor.view(cells.clamp(1, 65536) as usize),
                None => Err("the monitor vanished".into()),
            }
        })
        .await
        .map_err(|e| ApiError::Partition(format!("heat panicked: {e}")))?
        .map_err(ApiError::Partition)
    }

    async fn stop(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        let partition = self.live(&id)?;
        self.unwatch(&id);
        let stopped = tokio::task::spawn_blocking(move || {
            partition.stop();
            partition
        })
        .await
        .map_err(|e| ApiError::Partition(format!("stop panicked: {e}")))?;
        let mut info = info_of(&id, &stopped);
        info.state = PartitionState::Stopped;
        self.remember_stopped(id.clone(), info.clone());
        // Dropping the last reference frees the partition's memory and its VM.
        free_off_runtime(stopped);
        info!("stopped partition {id}");
        Ok(info)
    }
}

impl Daemon {
    async fn migrate_impl(self, request: MigrateRequest) -> Result<MigrationReport, ApiError> {
        let partition = self.live(&request.id)?;
        self.unwatch(&request.id);
        if partition.state() != PartitionState::Running
            && partition.state() != PartitionState::Paused
        {
            return Err(ApiError::Partition(format!(
                "partition `{}` is {:?}; only running or paused partitions migrate",
                request.id,
                partition.state()
            )));
        }
        let progress = Arc::new(Mutex::new(MigrationProgress::default()));
        {
            let mut migrations = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
            if migrations.get(&request.id).is_some_and(|p| {
                !matches!(
                    p.lock().map(|p| p.phase).unwrap_or(Phase::Failed),
                    Phase::Completed | Phase::Failed
                )
            }) {
                return Err(ApiError::Partition(format!(
                    "partition `{}` is already migrating",
                    request.id
                )));
            }
            let running = migrations
                .values()
                .filter(|p| {
                    !matches!(
                        p.lock().map(|p| p.phase).unwrap_or(Phase::Failed),
                        Phase::Completed | Phase::Failed
                    )
                })
                .count();
            if running >= self.limits.max_migrations {
                return Err(ApiError::Limit(format!(
                    "this daemon already runs its maximum of {} migrations",
                    self.limits.max_migrations
                )));
            }
            migrations.insert(request.id.clone(), Arc::clone(&progress));
        }
        let opened = tokio::time::timeout(
            self.peer_timeout,
            Connection::open(request.to, &self.security),
        )
        .await;
        let connection = match opened {
            Ok(opened) => opened.map_err(|e| {
                ApiError::Migration(format!("destination {}: {}", request.to, error_chain(&e)))
            }),
            Err(_) => Err(ApiError::Migration(format!(
                "destination {}: no answer within the peer timeout of {:?}",
                request.to, self.peer_timeout
            ))),
        };
        let connection = match connection {
            Ok(connection) => connection,
            Err(e) => {
                progress.lock().unwrap_or_else(|p| p.into_inner()).phase = Phase::Failed;
                return Err(e);
            }
        };
        let probes = match request.options.strategy {
            Strategy::Heat => match self.probes_off_runtime().await {
                Ok(probes) => Some(probes),
                Err(e) => {
                    warn!("heat strategy without probes: {e}");
                    None
                }
            },
            Strategy::Address => None,
        };
        let handle = tokio::runtime::Handle::current();
        let link = DataLink::new(self.security.clone(), handle.clone());
        let peer_timeout = self.peer_timeout;
        let id = request.id.clone();
        let to = request.to;
        let report = tokio::task::spawn_blocking(move || {
            let mut destination = RemoteDestination {
                client: connection.client,
                addr: connection.addr,
                handle,
                link,
                peer_timeout,
            };
            crate::migration::source::migrate(
                &partition,
                &mut destination,
                probes,
                &request.options,
                &progress,
            )
        })
        .await
        .map_err(|e| ApiError::Migration(format!("the migration panicked: {e}")))?;
        if report.status == "completed" {
            let info = match self.lock().get(&id) {
                Some(Entry::Live(partition)) => {
                    let mut info = info_of(&id, partition);
                    info.state = PartitionState::Stopped;
                    info.console.push_str(&format!(
                        "[vmm] migrated to {to} as {}\n",
                        report.id_on_destination.as_deref().unwrap_or("?")
                    ));
                    Some(info)
                }
                _ => None,
            };
            if let Some(info) = info {
                let replaced = self.remember_stopped(id, info);
                if let Some(Entry::Live(partition)) = replaced {
                    free_off_runtime(partition);
                }
            }
        }
        Ok(report)
    }
}

/// The destination daemon, driven from the source's migration thread.
struct RemoteDestination {
    client: MigratorApiClient,
    addr: SocketAddr,
    handle: tokio::runtime::Handle,
    link: DataLink,
    /// Bounds every wait on the destination: a dead peer or link fails the migration in time.
    peer_timeout: Duration,
}

impl RemoteDestination {
    fn call<T>(
        &self,
        what: &str,
        future: impl Future<Output = Result<Result<T, ApiError>, tarpc::client::RpcError>>,
    ) -> Result<T, String> {
        match self.handle.block_on(future) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!(
                "{what}: the destination {} did not answer: {e}",
                self.addr
            )),
        }
    }
}

impl Destination for RemoteDestination {
    fn prepare(&mut self, request: PrepareRequest) -> Result<PrepareReply, String> {
        // Preparing allocates the guest memory: allow for that beyond the peer timeout.
        let ctx = context_with(self.peer_timeout + Duration::from_secs(30));
        self.call("prepare", self.client.migration_prepare(ctx, request))
    }

    fn commit(&mut self, session: u64, request: CommitRequest) -> Result<CommitReply, String> {
        // The destination first waits for the pages still in flight, then restores.
        let ctx = context_with(self.peer_timeout + Duration::from_secs(60));
        self.call(
            "commit",
            self.client.migration_commit(ctx, session, request),
        )
    }

    fn finish(&mut self, session: u64) -> Result<FinishReply, String> {
        // Called once every page has been sent: the destination waits for the last to land.
        let ctx = context_with(self.peer_timeout + Duration::from_secs(60));
        self.call("finish", self.client.migration_finish(ctx, session))
    }

    fn abort(&mut self, session: u64) {
        // Best effort: a destination that cannot be reached drops the session by itself.
        let ctx = context_with(self.peer_timeout);
        let _ = self
            .handle
            .block_on(self.client.migration_abort(ctx, session));
    }

    fn connect_data(&self, port: u16) -> Result<DataStream, LinkError> {
        let addr = SocketAddr::new(self.addr.ip(), port);
        self.link.connect(addr, self.peer_timeout)
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "listening on {listen} needs mutual TLS: pass --tls DIR (make one with `migrator certs`), \
         or listen on a loopback address"
    )]
    NeedsTls { listen: SocketAddr },
    #[error("cannot listen on {listen}")]
    Bind {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the API on `listen` until the task is dropped. Returns the bound address.
///
/// Without TLS only a loopback address is accepted: anyone who can reach the port can start
/// partitions and write their memory. With TLS a peer must present a certificate from the
/// daemon's CA; one that does not is dropped in the handshake, before any request is read.
pub async fn serve(
    daemon: Daemon,
    listen: SocketAddr,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    if !listen.ip().is_loopback() && !daemon.security.is_tls() {
        return Err(ServeError::NeedsTls { listen });
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind { listen, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { listen, source })?;
    let accepted = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await;
        Some((next, listener))
    });
    let serving = accepted.for_each(move |accepted| {
        let daemon = daemon.clone();
        async move {
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: back off rather than spin on the error.
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
            };
            // Each connection, its handshake included, on a task of its own.
            tokio::spawn(async move {
                let stream = match daemon.security.accept(tcp, peer).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        warn!("refused {peer}: {}", error_chain(&e));
                        return;
                    }
                };
                server::BaseChannel::with_defaults(transport(stream))
                    .execute(daemon.serve())
                    .for_each_concurrent(None, |response| async move {
                        tokio::spawn(response);
                    })
                    .await;
            });
        }
    });
    Ok((local, serving))
}
