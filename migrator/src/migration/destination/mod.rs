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

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use heatprobe::probes::error_chain;
use thiserror::Error;
use tracing::warn;
use userfaultfd::Uffd;
use xxhash_rust::xxh3::xxh3_64;

use super::{
    control::{CommitRequest, CommitTimings, FinishReply, PrepareRequest},
    link::{DataLink, DataStream, tune_peer_socket},
    protocol::MAX_CONNECTIONS,
    report::{Latency, Mode},
    transport::{Frame, FrameReader, TransportError, send_demand, send_discarded, zero_page_hash},
};
use crate::vmm::{
    GuestMemory, MemoryDigest, Partition, PartitionConfig, PartitionError, PartitionSnapshot,
    memory::{MemoryError, PAGE_SIZE},
    state::{self, StateError},
};

mod blocktime;
mod faults;
pub mod phase;
mod postcopy;

pub use faults::{FaultWindow, ProbeSlot, WindowOrWhyNot};
pub use phase::{PhaseError, SessionEvent, SessionPhase};

use self::blocktime::Blocktime;

/// Pages freed to measure what freeing one costs.
const REMOVAL_SAMPLE: u64 = 256;

/// How long the destination waits for the source at each step before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// What went wrong on the data path (the receiver, the fault handler).
#[derive(Debug, Error)]
pub enum DataError {
    #[error("accepting the data connection")]
    Accept(#[source] std::io::Error),
    #[error("the source never connected")]
    NeverConnected,
    #[error("the source closed the data connection early")]
    ClosedEarly,
    #[error("reading the data connection")]
    Read(#[source] TransportError),
    #[error("the source sent a demand frame")]
    UnexpectedDemand,
    #[error("the source sent a `Done` frame out of place")]
    UnexpectedDone(#[source] PhaseError),
    #[error("a second `Done` on one data connection before the others ended the phase")]
    DoneTwice,
    #[error("a `Done` frame on the urgent connection")]
    UrgentDone,
    #[error("writing page {page}")]
    Write {
        page: u64,
        #[source]
        source: MemoryError,
    },
    #[error("freeing page {page}")]
    Free {
        page: u64,
        #[source]
        source: MemoryError,
    },
    #[error("UFFDIO_COPY of page {page}")]
    Copy {
        page: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("UFFDIO_ZEROPAGE of page {page}")]
    ZeroPage {
        page: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("waking the vCPU waiting on page {page}")]
    Wake {
        page: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("demanding page {page}")]
    Demand {
        page: u64,
        #[source]
        source: TransportError,
    },
    #[error("an `Urgent` frame out of place (not the first of a hybrid connection)")]
    UnexpectedUrgent,
    #[error("cannot start reading a data connection")]
    Reader(#[source] std::io::Error),
    #[error(
        "a `Discard` frame out of place (only a hybrid session before its commit takes one; \
         this one is {phase:?})"
    )]
    UnexpectedDiscard { phase: SessionPhase },
    #[error("a `Discarded` frame from the source")]
    UnexpectedDiscarded,
    #[error("answering the source's discard")]
    Discarded(#[source] TransportError),
}

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("the partition shape is invalid")]
    Shape(#[source] PartitionError),
    #[error("a migration uses 1 to {MAX_CONNECTIONS} data connections, not {0}")]
    Connections(u32),
    #[error("cannot open the data listener")]
    Listen(#[source] std::io::Error),
    #[error("the data connection failed")]
    Data(#[source] Arc<DataError>),
    #[error("timed out waiting for the source")]
    Timeout,
    #[error("the partition's saved state is invalid")]
    State(#[source] StateError),
    #[error("page {0} never arrived")]
    Missing(u64),
    #[error("stale page {0} is out of range")]
    StaleOutOfRange(u64),
    #[error("restoring the partition failed")]
    Restore(#[source] PartitionError),
    #[error("userfaultfd setup failed")]
    Userfault(#[source] userfaultfd::Error),
    #[error("cannot start the fault handler")]
    Handler(#[source] std::io::Error),
    #[error("dropping stale pages failed")]
    Stale(#[source] MemoryError),
    #[error("the session was aborted")]
    Aborted,
    #[error("the source opened no urgent connection, which post-copy sends its demands on")]
    NoUrgentConnection,
    #[error("the session refused the step")]
    Phase(#[from] PhaseError),
}

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
        let frames = memory.frames() as usize;
        let listener =
            TcpListener::bind(SocketAddr::new(bind.ip(), 0)).map_err(SessionError::Listen)?;
        let port = listener.local_addr().map_err(SessionError::Listen)?.port();
        let session = Arc::new(Self {
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
            bind: bind.ip(),
            threads: Mutex::new(Vec::new()),
            probes,
            fault_window: Duration::from_millis(request.fault_window_ms),
            faults: Mutex::new(None),
        });
        let receiver = Arc::clone(&session);
        let thread = std::thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || receiver.receive(listener, 0))
            .map_err(SessionError::Listen)?;
        session.threads().push(thread);
        Ok((session, port, remove_ns_per_page))
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

    /// The receiver thread: accepts the source's connections (its data connections, and in
    /// hybrid mode one more, opened with an `Urgent` frame), each read by a thread of its own
    /// that installs frames until the end. With TLS on, a connection that fails the handshake is dropped and
    /// the wait goes on, so a stranger on the network cannot take the source's place or end
    /// the session.
    /// `generation` is 0 for the prepare's listener and a recovery's number for its own.
    fn receive(self: Arc<Self>, listener: TcpListener, generation: u32) {
        let wanted = match self.mode {
            Mode::Precopy => self.connections,
            Mode::Hybrid => self.connections + 1,
        };
        // The source connects as soon as `prepare` answers.
        let deadline = Instant::now() + (2 * self.peer_timeout).min(STEP_TIMEOUT);
        let _ = listener.set_nonblocking(true);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let mut accepted = 0;
        while accepted < wanted {
            match listener.accept() {
                Ok((stream, peer)) => match tune_peer_socket(&stream, self.peer_timeout) {
                    Ok(()) => self.link.accept_into(stream, peer, ready_tx.clone()),
                    Err(e) => warn!("refused a data connection from {peer}: {}", error_chain(&e)),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.fail(DataError::Accept(e));
                    return;
                }
            }
            while accepted < wanted
                && let Ok((peer, secured)) = ready.try_recv()
            {
                match secured {
                    Ok(stream) => {
                        accepted += 1;
                        if !self.current(generation)
                            || (accepted == 1 && self.advance(SessionEvent::Connected).is_err())
                        {
                            return;
                        }
                        if let Err(e) = self.read_connection(stream, generation) {
                            self.fail_in(generation, DataError::Reader(e));
                            return;
                        }
                    }
                    Err(e) => warn!("refused a data connection from {peer}: {}", error_chain(&e)),
                }
            }
            if accepted < wanted {
                if self.aborted.load(Ordering::Relaxed) || Instant::now() > deadline {
                    // Without its urgent connection a hybrid session refuses its commit.
                    if accepted == 0 {
                        self.fail_in(generation, DataError::NeverConnected);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Later connections (strangers, or a second try) are refused from here on.
        drop(listener);
    }

    /// Starts the thread that reads connection `stream`, of `generation`.
    fn read_connection(
        self: &Arc<Self>,
        stream: DataStream,
        generation: u32,
    ) -> std::io::Result<()> {
        let clone = stream.try_clone()?;
        self.lock_streams().push(clone);
        let reader = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("migration-rx".into())
            .spawn(move || reader.install_from(stream, generation))?;
        self.threads().push(thread);
        Ok(())
    }

    fn lock_streams(&self) -> MutexGuard<'_, Vec<DataStream>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the frames of one connection, of `generation`, until it ends or a recovery
    /// replaces it. The urgent connection says so first; the destination's demands go out on
    /// it.
    fn install_from(&self, stream: DataStream, generation: u32) {
        let mut demands = stream.try_clone();
        let mut reader = FrameReader::new(stream, self.memory.frames());
        let mut first = true;
        let mut urgent = false;
        // The `Done` frames this connection sent; a recovery's connections start in the push,
        // pre-copy's phase ended.
        let mut dones = u32::from(generation > 0);
        loop {
            if self.aborted.load(Ordering::Relaxed) || !self.current(generation) {
                return;
            }
            let frame = match reader.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    // A data connection may end once it has ended its phase, while the others
                    // still send theirs.
                    if !self.all_sent() && dones <= self.phases_done() {
                        self.fail_in(generation, DataError::ClosedEarly);
                    }
                    return;
                }
                Err(e) => {
                    self.fail_in(generation, DataError::Read(e));
                    return;
                }
            };
            let result = match frame {
                Frame::Pages(pages) => self.install(&pages),
                Frame::Done if urgent => Err(DataError::UrgentDone),
                Frame::Done => {
                    dones += 1;
                    self.pages_done(dones, generation)
                }
                Frame::Demand(_) => Err(DataError::UnexpectedDemand),
                Frame::Urgent if first && self.mode == Mode::Hybrid => match &demands {
                    Ok(demands) => {
                        demands
                            .try_clone()
                            .map_err(DataError::Reader)
                            .and_then(|clone| {
                                urgent = true;
                                self.demand_on(generation, clone)
                            })
                    }
                    Err(e) => Err(DataError::Reader(std::io::Error::new(
                        e.kind(),
                        e.to_string(),
                    ))),
                },
                Frame::Urgent => Err(DataError::UnexpectedUrgent),
                Frame::Discard(pages) => {
                    self.drop_stale_copies(pages)
                        .and_then(|()| match &mut demands {
                            Ok(answer) => send_discarded(answer).map_err(DataError::Discarded),
                            Err(e) => Err(DataError::Reader(std::io::Error::new(
                                e.kind(),
                                e.to_string(),
                            ))),
                        })
                }
                Frame::Discarded => Err(DataError::UnexpectedDiscarded),
            };
            first = false;
            if let Err(e) = result {
                self.fail_in(generation, e);
                return;
            }
        }
    }

    /// The urgent connection of `generation` arrived: demands go out on it from now on, and
    /// those that waited while post-copy was paused (or were lost with the connection before)
    /// go again, at once.
    fn demand_on(&self, generation: u32, mut stream: DataStream) -> Result<(), DataError> {
        let mut demand_stream = self.lock_demand_stream();
        let pending: Vec<u64> = {
            let mut progress = self.lock();
            if progress.generation != generation {
                return Ok(());
            }
            progress.urgent = true;
            let mut pending: Vec<u64> = progress.demanded.keys().copied().collect();
            pending.sort_unstable();
            progress.rerequests += pending.len() as u64;
            pending
        };
        self.changed.notify_all();
        if let Some(&page) = pending.first() {
            send_demand(&mut stream, &pending)
                .map_err(|source| DataError::Demand { page, source })?;
        }
        *demand_stream = Some((generation, stream));
        Ok(())
    }

    /// A data connection's `Done` frame, its `dones`-th: the end of pre-copy, or in post-copy
    /// the end of the push, once every data connection has sent its own. One in a phase that
    /// expects none (a second before the commit, say) ends the session, as does a second on
    /// one connection before the others sent their first.
    fn pages_done(&self, dones: u32, generation: u32) -> Result<(), DataError> {
        {
            let mut progress = self.lock();
            if progress.generation != generation {
                return Ok(());
            }
            if dones > progress.dones / self.connections + 1 {
                return Err(DataError::DoneTwice);
            }
            progress.dones += 1;
            if !progress.dones.is_multiple_of(self.connections) {
                return Ok(());
            }
        }
        self.advance(SessionEvent::PagesDone)
            .map(drop)
            .map_err(DataError::UnexpectedDone)
    }

    /// Phases every data connection has ended with its `Done`.
    fn phases_done(&self) -> u32 {
        self.lock().dones / self.connections
    }

    /// Punches out of the memfd the copies this session holds of `pages`, one call per run of
    /// neighbouring pages; pages it has no copy of (never received, discarded, or received
    /// as zero, a hole already) cost nothing. Returns the pages punched, in order; on failure,
    /// the first page of the run that failed.
    fn punch_held_copies(&self, mut pages: Vec<u64>) -> Result<Vec<u64>, (u64, MemoryError)> {
        pages.sort_unstable();
        pages.dedup();
        {
            let progress = self.lock();
            pages.retain(|&page| {
                progress.received[page as usize]
                    && progress.page_digests[page as usize] != zero_page_hash()
            });
        }
        for run in pages.chunk_by(|a, b| a + 1 == *b) {
            if let (Some(&first), Some(&last)) = (run.first(), run.last()) {
                self.memory
                    .remove_frames(first..last + 1)
                    .map_err(|source| (first, source))?;
            }
        }
        Ok(pages)
    }

    /// A `Discard` frame: the source's guest still runs and has written these pages since
    /// it sent them. Their copies are punched out now, one call per run of neighbouring
    /// pages, so the commit does not free them inside the downtime; they read as missing
    /// from here on, and a later copy fills them again. Pages already missing cost nothing.
    fn drop_stale_copies(&self, pages: Vec<u64>) -> Result<(), DataError> {
        // Before the commit: userfaultfd, which the commit sets up, is not there yet.
        let phase = self.phase();
        if self.mode != Mode::Hybrid || phase != SessionPhase::Receiving {
            return Err(DataError::UnexpectedDiscard { phase });
        }
        let pages = self
            .punch_held_copies(pages)
            .map_err(|(page, source)| DataError::Free { page, source })?;
        let mut progress = self.lock();
        for &page in &pages {
            progress.received[page as usize] = false;
            progress.page_digests[page as usize] = zero_page_hash();
        }
        Ok(())
    }

    /// Whether the source has sent everything it will send, so a closed connection is no
    /// failure.
    fn all_sent(&self) -> bool {
        use SessionPhase as P;
        match (self.mode, self.phase()) {
            // Already over: nothing more to say.
            (_, P::Failed | P::Aborted) => true,
            // Paused: the connections that end now are the broken ones.
            (Mode::Hybrid, P::PostcopyPaused) => true,
            (
                Mode::Precopy,
                P::Received | P::Restoring { received: true } | P::Parked | P::Restored,
            ) => true,
            (Mode::Hybrid, P::Postcopy { pushed: true } | P::Finished) => true,
            _ => false,
        }
    }

    fn install(&self, pages: &[(u64, Option<&[u8]>)]) -> Result<(), DataError> {
        let uffd = self.uffd.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(uffd) = uffd {
            let zero = [0u8; PAGE_SIZE as usize];
            for &(page, data) in pages {
                self.install_postcopy(&uffd, page, data.unwrap_or(&zero))?;
            }
            return Ok(());
        }
        // Before the commit. Pages with data go in through the memfd, one `pwritev` per run
        // of neighbouring pages: most pages arrive once, and a first write through the mapping
        // would fault and zero each one first.
        for run in pages.chunk_by(|a, b| a.0 + 1 == b.0 && a.1.is_some() == b.1.is_some()) {
            let Some(&(first, _)) = run.first() else {
                continue;
            };
            let data: Vec<&[u8]> = run.iter().filter_map(|&(_, data)| data).collect();
            if !data.is_empty() {
                self.memory
                    .write_frames_through_fd(first, &data)
                    .map_err(|source| DataError::Write {
                        page: first,
                        source,
                    })?;
            }
        }
        // Hashing on arrival keeps the digest out of the cutover's downtime; outside the lock,
        // which the session's other connections take too.
        let digests: Vec<u64> = pages
            .iter()
            .map(|&(_, data)| data.map_or_else(zero_page_hash, xxh3_64))
            .collect();
        // The session's memory is a fresh memfd, which reads as zeros: writing a zero page
        // would only make it resident. A page an earlier round filled is freed instead, and
        // reads as zeros again.
        let refilled_as_zero: Vec<u64> = {
            let progress = self.lock();
            pages
                .iter()
                .filter(|&&(page, data)| {
                    data.is_none()
                        && progress.received[page as usize]
                        && progress.page_digests[page as usize] != zero_page_hash()
                })
                .map(|&(page, _)| page)
                .collect()
        };
        for run in refilled_as_zero.chunk_by(|a, b| a + 1 == *b) {
            if let (Some(&first), Some(&last)) = (run.first(), run.last()) {
                self.memory
                    .remove_frames(first..last + 1)
                    .map_err(|source| DataError::Free {
                        page: first,
                        source,
                    })?;
            }
        }
        let mut progress = self.lock();
        for (&(page, _), digest) in pages.iter().zip(digests) {
            progress.received[page as usize] = true;
            progress.page_digests[page as usize] = digest;
        }
        Ok(())
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

    /// The cutover: restore the partition and run it. Returns it with, in pre-copy mode, the
    /// digest of the memory it starts from, and what each step took. A second commit is
    /// refused.
    pub fn commit(self: &Arc<Self>, request: CommitRequest) -> Result<Committed, SessionError> {
        let started = Instant::now();
        // Nothing of the state reaches KVM, or the session's phase, unchecked.
        let snapshot =
            state::decode(&request.snapshot, &self.config).map_err(SessionError::State)?;
        let decode_ms = millis_since(started);
        self.advance(SessionEvent::Commit)?;
        let result = self.restore(&snapshot, &request.stale_pages);
        if result.is_err() {
            // The restore did not happen: the session cannot go on.
            let _ = self.advance(SessionEvent::Abort);
        }
        result.map(|mut committed| {
            committed.timings.restore_ms += decode_ms;
            committed
        })
    }

    fn restore(
        self: &Arc<Self>,
        snapshot: &PartitionSnapshot,
        stale_pages: &[u64],
    ) -> Result<Committed, SessionError> {
        let waiting = Instant::now();
        self.wait(|p| p.phase() == SessionPhase::Restoring { received: true })?;
        let pages_wait_ms = millis_since(waiting);
        let restoring = Instant::now();
        let (partition, digest) = match self.mode {
            Mode::Precopy => {
                let progress = self.lock();
                if let Some(page) = progress.received.iter().position(|r| !r) {
                    return Err(SessionError::Missing(page as u64));
                }
                let digest = MemoryDigest::from_pages(progress.page_digests.clone());
                drop(progress);
                // Restored parked, then resumed, so the report can tell the two apart.
                let partition = Partition::restore(snapshot, Arc::clone(&self.memory), false)
                    .map_err(SessionError::Restore)?;
                (partition, Some(digest))
            }
            Mode::Hybrid => {
                // Post-copy needs somewhere to send its demands: a commit is refused without
                // it, before anything runs here, rather than failing at the guest's first
                // missing page. The source opens it right after `prepare`; its first frame
                // may still be on its way.
                if self.wait(|p| p.urgent).is_err() {
                    return Err(SessionError::NoUrgentConnection);
                }
                (self.start_postcopy(snapshot, stale_pages)?, None)
            }
        };
        let restore_ms = millis_since(restoring);
        let partition = Arc::new(partition);
        *self.lock_parked() = Some(Arc::clone(&partition));
        // An abort that came during the restore wins: the source has resumed.
        if self.advance(SessionEvent::Restored).is_err() {
            partition.stop();
            return Err(SessionError::Aborted);
        }
        Ok(Committed {
            partition,
            digest,
            timings: CommitTimings {
                pages_wait_ms,
                restore_ms,
                // Parked: it runs at the handover, which times its own resume.
                resume_ms: 0.0,
            },
        })
    }

    /// The source's word that its copy is stopped for good: runs `partition`, which this
    /// session's commit restored parked, and returns the milliseconds its resume took. A
    /// handover that comes again (its answer lost) finds it running, changes nothing and
    /// returns `None`. One
    /// that comes while the commit is still restoring waits for it. Refused, changing
    /// nothing, in any other phase: before a commit, or once aborted.
    pub fn handover(&self) -> Result<Option<f64>, SessionError> {
        self.wait(|p| !matches!(p.phase(), SessionPhase::Restoring { .. }))?;
        let phase = self.phase();
        if phase.guest_runs_here() {
            return Ok(None);
        }
        let partition = self.lock_parked().clone();
        let Some(partition) = partition.filter(|_| phase == SessionPhase::Parked) else {
            return Err(PhaseError::Unexpected {
                phase,
                event: SessionEvent::Handover,
            }
            .into());
        };
        let resuming = Instant::now();
        let tids = partition.vcpu_tids().to_vec();
        if self.mode == Mode::Hybrid {
            self.lock().blocktime = Some(Blocktime::new(&tids));
        }
        self.start_fault_window(&tids);
        if let Err(e) = partition.resume() {
            partition.stop();
            return Err(SessionError::Restore(e));
        }
        // Only the source hands over, and it never aborts at the same time; should an abort
        // have come first all the same, the copy here stops.
        if self.advance(SessionEvent::Handover).is_err() {
            partition.stop();
            return Err(SessionError::Aborted);
        }
        Ok(Some(millis_since(resuming)))
    }

    /// Starts counting the faults of the vCPU threads `tids` for the fault window, from now
    /// (just before the resume); or notes why it cannot.
    fn start_fault_window(&self, tids: &[u32]) {
        if self.fault_window.is_zero() {
            return;
        }
        // The guest's operations, read through a weak handle: the window must not keep a
        // stopped partition alive, and a page that is not there is never waited on.
        let parked = self.lock_parked().as_ref().map(Arc::downgrade);
        let ops: faults::OpsReader = Box::new(move || {
            let partition = parked.as_ref()?.upgrade()?;
            Some(partition.total_progress().ops)
        });
        let window = match self.probes.get() {
            Some(Ok(probes)) => FaultWindow::start(probes, tids, self.fault_window, ops)
                .map(Arc::new)
                .map_err(|e| format!("counting faults: {}", error_chain(&e))),
            Some(Err(e)) => Err(format!("the eBPF probes: {}", error_chain(&*e))),
            None => Err("the eBPF probes were still loading at the resume".into()),
        };
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = Some(window);
    }

    /// The fault window started at the resume (the session keeps counting remote faults in
    /// it); `None` before the resume or with a window of 0.
    pub fn fault_window(&self) -> Option<WindowOrWhyNot> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A fault on a missing page: counted as remote if it falls inside the fault window.
    fn count_remote_fault(&self) {
        if let Some(Ok(window)) = self
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            window.demanded();
        }
    }

    /// Hybrid: waits until every page is in place and returns the digest and post-copy figures.
    pub fn finish(&self) -> Result<FinishReply, SessionError> {
        let phase = self.phase();
        if !matches!(phase, SessionPhase::Postcopy { .. }) {
            return Err(PhaseError::Unexpected {
                phase,
                event: SessionEvent::Finish,
            }
            .into());
        }
        self.wait(|p| p.phase() == SessionPhase::Postcopy { pushed: true } && p.missing == 0)?;
        let progress = self.lock();
        let latency = progress
            .latency_us
            .as_ref()
            .map(|h| Latency {
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            })
            .unwrap_or_default();
        let digest = MemoryDigest::from_pages(progress.page_digests.clone());
        let requests = progress.requests;
        let rerequests = progress.rerequests;
        let now = Instant::now();
        let (blocktime_ms, vcpu_blocktime_ms) = progress
            .blocktime
            .as_ref()
            .map(|b| (b.all_ms(now), b.per_vcpu_ms(now)))
            .unwrap_or_default();
        drop(progress);
        self.end_postcopy();
        self.advance(SessionEvent::Finish)?;
        Ok(FinishReply {
            dest_digest: digest.total_hex(),
            postcopy_requests: requests,
            rerequests,
            fault_latency_us: latency,
            blocktime_ms,
            vcpu_blocktime_ms,
        })
    }

    /// Why the session failed, if it failed before its cutover (a hybrid session that is past
    /// it keeps its guest waiting for the source instead: see docs/architecture.md). The
    /// daemon polls this to drop a session whose source vanished, killed or cut off, since no
    /// `abort` will come; the data connection then fails within the peer timeout.
    pub fn failed_before_cutover(&self) -> Option<Arc<DataError>> {
        let progress = self.lock();
        match progress.phase() {
            SessionPhase::Failed => progress.error.clone(),
            _ => None,
        }
    }

    /// Abandons the session (the source failed or gave up); the memory is freed with it.
    /// Refused while a partition it restored runs here: stop that first, then [`discard`].
    ///
    /// [`discard`]: Session::discard
    pub fn abort(&self) -> Result<(), PhaseError> {
        let phase = self.advance(SessionEvent::Abort)?;
        // A partition the commit restored parked never ran: it goes with the session.
        if phase == SessionPhase::Aborted
            && let Some(parked) = self.lock_parked().take()
        {
            parked.stop();
        }
        self.hang_up();
        Ok(())
    }

    fn lock_parked(&self) -> MutexGuard<'_, Option<Arc<Partition>>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a session whose restored partition was stopped.
    pub fn discard(&self) -> Result<(), PhaseError> {
        self.advance(SessionEvent::Discard)?;
        self.hang_up();
        Ok(())
    }

    fn hang_up(&self) {
        self.aborted.store(true, Ordering::Relaxed);
        self.changed.notify_all();
        for stream in self.lock_streams().iter() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.aborted.store(true, Ordering::Relaxed);
    }
}
