//! The destination side: sessions that receive pages, then restore the partition.
//!
//! Pre-copy: pages are written into fresh guest memory as they arrive; at commit the memory is
//! complete, its digest is taken, and the partition is restored and resumed.
//!
//! Hybrid: at commit the pages whose copy went stale are punched out of the memfd, the whole
//! of guest memory is registered with userfaultfd (missing mode), and the partition resumes at
//! once (`postcopy`). Each page is hashed as it is installed, before the guest can touch it,
//! so the destination's digest is of the cutover moment.
//!
//! Every step goes through the session's phase machine (`phase`): what does not fit the
//! phase is refused.
//!
//! - this file: the session's state, `prepare`, and waiting for a step;
//! - `errors`: what a session reports when it fails;
//! - `receive`: the data connections and their frames; `install`: pages into memory;
//! - `cutover`: commit, handover, finish, abort and discard;
//! - `postcopy`: userfaultfd after a hybrid commit, with `faults` (the fault window) and
//!   `blocktime` (how long the guest waited);
//! - `offline`: a session with no network and no KVM, for the fuzz target.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, TcpListener},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tracing::warn;
use userfaultfd::Uffd;

use super::{
    control::{CommitTimings, PrepareRequest},
    link::{DataLink, DataStream},
    protocol::MAX_CONNECTIONS,
    report::Mode,
};
use crate::vmm::{GuestMemory, MemoryDigest, Partition, PartitionConfig};

mod blocktime;
mod cutover;
mod errors;
mod faults;
mod install;
pub mod offline;
pub mod phase;
mod postcopy;
mod receive;

pub use errors::{DataError, SessionError};
pub use faults::{FaultWindow, ProbeSlot, WindowOrWhyNot};
pub use phase::{PhaseError, SessionEvent, SessionPhase};

use self::blocktime::Blocktime;

/// Pages freed to measure what freeing one costs.
const REMOVAL_SAMPLE: u64 = 256;

/// How long the destination waits for the source at each step before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// A commit that restored the partition and runs it.
pub struct Committed {
    /// Restored parked: it runs at the handover.
    pub partition: Arc<Partition>,
    /// Pre-copy: the digest of the memory the partition starts from (hybrid: from `finish`).
    pub digest: Option<MemoryDigest>,
    pub timings: CommitTimings,
}

/// Milliseconds since `since`, with the fraction: the steps of a downtime can take well under
/// one.
fn millis_since(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

#[derive(Default)]
struct Progress {
    phase: Option<SessionPhase>,
    error: Option<Arc<DataError>>,
    /// Pages received so far, by frame.
    received: Vec<bool>,
    /// Hybrid, after commit: whether each page is in place, and its hash.
    installed: Vec<bool>,
    page_digests: Vec<u64>,
    missing: u64,
    demanded: HashMap<u64, Instant>,
    requests: u64,
    latency_us: Option<Histogram<u64>>,
    /// Hybrid, after commit: how long the vCPUs waited on missing pages.
    blocktime: Option<Blocktime>,
    /// Hybrid: the urgent connection said so.
    urgent: bool,
    /// `Done` frames read so far, over every data connection: a phase ends when each has
    /// sent its own.
    dones: u32,
    /// Demands sent again over a recovery's urgent connection.
    rerequests: u64,
    /// The connections in use: 0 from the prepare, one more at each post-copy recovery.
    /// What a connection of an older generation reads or fails at changes nothing.
    generation: u32,
}

impl Progress {
    fn phase(&self) -> SessionPhase {
        self.phase.unwrap_or(SessionPhase::Connecting)
    }
}

/// One incoming migration.
pub struct Session {
    pub config: PartitionConfig,
    pub mode: Mode,
    /// Data connections the pages come striped across (the urgent one aside).
    connections: u32,
    memory: Arc<GuestMemory>,
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Set when the session is aborted (or dropped): every thread of it stops.
    aborted: AtomicBool,
    /// Set once post-copy has ended and guest memory is unregistered from userfaultfd.
    postcopy_done: AtomicBool,
    /// How long the source may stay silent (see `link::tune_peer_socket`).
    peer_timeout: Duration,
    /// Set at a hybrid commit: from then on pages are installed through it.
    uffd: Mutex<Option<Arc<Uffd>>>,
    /// A clone of the urgent connection (hybrid), for sending demands, with its generation;
    /// `None` while post-copy is paused (demands wait in `Progress::demanded`).
    demand_stream: Mutex<Option<(u32, DataStream)>>,
    /// The partition the commit restored, parked until the handover runs it; an abort
    /// before that stops it.
    parked: Mutex<Option<Arc<Partition>>>,
    /// Clones of every data connection, to shut them down at a hang-up.
    streams: Mutex<Vec<DataStream>>,
    link: DataLink,
    /// Where the data listener binds (a recovery opens a new one there).
    bind: std::net::IpAddr,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The probes that count the guest's faults after its resume, over `fault_window`.
    probes: ProbeSlot,
    fault_window: Duration,
    /// Started at the resume, until the daemon takes it.
    faults: Mutex<Option<WindowOrWhyNot>>,
}

impl Session {
    /// Creates the session's memory and data listener, and starts receiving.
    pub fn prepare(
        request: &PrepareRequest,
        bind: SocketAddr,
        link: DataLink,
        peer_timeout: Duration,
        probes: ProbeSlot,
    ) -> Result<(Arc<Self>, u16, u64), SessionError> {
        request.config.validate().map_err(SessionError::Shape)?;
        if !(1..=MAX_CONNECTIONS).contains(&request.connections) {
            return Err(SessionError::Connections(request.connections));
        }
        let memory = Arc::new(
            GuestMemory::new(request.config.mem_size).map_err(|e| SessionError::Shape(e.into()))?,
        );
        // A hybrid cutover frees every stale page it does not send, inside the downtime: the
        // source budgets for it at this rate (a millisecond or two to measure).
        let remove_ns_per_page = match request.mode {
            Mode::Hybrid => memory
                .measure_page_removal(REMOVAL_SAMPLE)
                .map_err(SessionError::Stale)?,
            Mode::Precopy => 0,
        };
        let listener =
            TcpListener::bind(SocketAddr::new(bind.ip(), 0)).map_err(SessionError::Listen)?;
        let port = listener.local_addr().map_err(SessionError::Listen)?.port();
        let session = Arc::new(Self::new(
            request,
            memory,
            link,
            bind.ip(),
            peer_timeout,
            probes,
        ));
        let receiver = Arc::clone(&session);
        let thread = std::thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || receiver.receive(listener, 0))
            .map_err(SessionError::Listen)?;
        session.threads().push(thread);
        Ok((session, port, remove_ns_per_page))
    }

    /// A session over `memory`, nothing received yet, before any connection.
    fn new(
        request: &PrepareRequest,
        memory: Arc<GuestMemory>,
        link: DataLink,
        bind: IpAddr,
        peer_timeout: Duration,
        probes: ProbeSlot,
    ) -> Self {
        let frames = memory.frames() as usize;
        Self {
            config: request.config.clone(),
            mode: request.mode,
            connections: request.connections,
            memory,
            progress: Mutex::new(Progress {
                received: vec![false; frames],
                page_digests: vec![0; frames],
                ..Progress::default()
            }),
            changed: Condvar::new(),
            aborted: AtomicBool::new(false),
            postcopy_done: AtomicBool::new(false),
            peer_timeout,
            uffd: Mutex::new(None),
            demand_stream: Mutex::new(None),
            parked: Mutex::new(None),
            streams: Mutex::new(Vec::new()),
            link,
            bind,
            threads: Mutex::new(Vec::new()),
            probes,
            fault_window: Duration::from_millis(request.fault_window_ms),
            faults: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the session is.
    pub fn phase(&self) -> SessionPhase {
        self.lock().phase()
    }

    /// Moves the session on by `event`, or refuses it and changes nothing.
    fn advance(&self, event: SessionEvent) -> Result<SessionPhase, PhaseError> {
        let mut progress = self.lock();
        let next = progress.phase().next(event, self.mode)?;
        progress.phase = Some(next);
        drop(progress);
        if next == SessionPhase::Aborted {
            self.aborted.store(true, Ordering::Relaxed);
        }
        self.changed.notify_all();
        Ok(next)
    }

    /// A failure of the session's connections or installs, which a connection of `generation`
    /// saw: it ends the session before the cutover and pauses post-copy after it. A failure
    /// seen by an older generation's connection, or while paused already, changes nothing.
    fn fail_in(&self, generation: u32, error: DataError) {
        let mut progress = self.lock();
        if progress.generation != generation || progress.phase() == SessionPhase::PostcopyPaused {
            return;
        }
        if progress.error.is_none() {
            progress.error = Some(Arc::new(error));
        }
        if let Ok(next) = progress.phase().next(SessionEvent::Failure, self.mode) {
            progress.phase = Some(next);
        }
        let paused = progress.phase() == SessionPhase::PostcopyPaused;
        drop(progress);
        if paused {
            warn!("post-copy paused: the guest runs on the pages it has until the source recovers");
            // Demands wait for the recovery's urgent connection.
            *self.lock_demand_stream() = None;
        }
        self.changed.notify_all();
    }

    fn fail(&self, error: DataError) {
        let generation = self.lock().generation;
        self.fail_in(generation, error);
    }

    fn lock_demand_stream(&self) -> MutexGuard<'_, Option<(u32, DataStream)>> {
        self.demand_stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self, generation: u32) -> bool {
        self.lock().generation == generation
    }

    /// Waits until `ready` holds, the session fails, or the step times out.
    fn wait(&self, ready: impl Fn(&Progress) -> bool) -> Result<(), SessionError> {
        // Shorter than the source's deadline for the call that waits (the peer timeout plus
        // 60 s): the destination gives up first, so it never takes over after its source
        // stopped waiting and resumed the partition.
        let deadline =
            Instant::now() + (self.peer_timeout + Duration::from_secs(30)).min(STEP_TIMEOUT);
        let mut progress = self.lock();
        loop {
            if let Some(error) = &progress.error {
                return Err(SessionError::Data(Arc::clone(error)));
            }
            if self.aborted.load(Ordering::Relaxed) {
                return Err(SessionError::Aborted);
            }
            if ready(&progress) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SessionError::Timeout);
            }
            progress = self
                .changed
                .wait_timeout(progress, left.min(Duration::from_millis(100)))
                .map(|(p, _)| p)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.aborted.store(true, Ordering::Relaxed);
    }
}
