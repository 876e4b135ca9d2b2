//! The destination side: sessions that receive pages, then restore the partition.
//!
//! Pre-copy: pages are written into fresh guest memory as they arrive; at commit the memory is
//! complete, its digest is taken, and the partition is restored and resumed.
//!
//! Hybrid: at commit the pages whose copy went stale are punched out of the memfd, the whole
//! of guest memory is registered with userfaultfd (missing mode), and the partition resumes at
//! once. A guest access to a missing page blocks its vCPU; a handler thread asks the source for
//! the page, and the receiver installs it with UFFDIO_COPY, which wakes the vCPU. Pages pushed
//! by the source are installed the same way. Each page is hashed as it is installed, before
//! the guest can touch it, so the destination's digest is of the cutover moment.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use thiserror::Error;
use tracing::{debug, warn};
use userfaultfd::{Event, Uffd, UffdBuilder};
use xxhash_rust::xxh3::xxh3_64;

use super::{
    link::{DataLink, DataStream, tune_data_socket},
    report::{Latency, Mode},
    source::{CommitRequest, FinishReply, PrepareRequest},
    transport::{Frame, FrameReader, send_demand, zero_page_hash},
};
use crate::vmm::{
    GuestMemory, MemoryDigest, Partition, PartitionConfig, PartitionError, PartitionSnapshot,
    memory::{GuestAddress, MemoryError, PAGE_SIZE},
    state::{self, StateError},
};

/// How long the destination waits for the source at each step before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("the partition shape is invalid")]
    Shape(#[source] PartitionError),
    #[error("cannot open the data listener")]
    Listen(#[source] std::io::Error),
    #[error("the data connection failed: {0}")]
    Data(String),
    #[error("timed out waiting for the source")]
    Timeout,
    #[error("the partition's saved state is invalid")]
    State(#[source] StateError),
    #[error("restoring the partition failed")]
    Restore(#[source] PartitionError),
    #[error("userfaultfd setup failed: {0}")]
    Userfault(String),
    #[error("dropping stale pages failed")]
    Stale(#[source] MemoryError),
    #[error("the session was aborted")]
    Aborted,
}

#[derive(Default)]
struct Progress {
    /// `Done` frames seen: one ends pre-copy, a second ends the post-copy push.
    dones: u32,
    error: Option<String>,
    /// Pages received so far, by frame.
    received: Vec<bool>,
    /// Hybrid, after commit: whether each page is in place, and its hash.
    installed: Vec<bool>,
    page_digests: Vec<u64>,
    missing: u64,
    demanded: HashMap<u64, Instant>,
    requests: u64,
    latency_us: Option<Histogram<u64>>,
}

/// One incoming migration.
pub struct Session {
    pub config: PartitionConfig,
    pub mode: Mode,
    memory: Arc<GuestMemory>,
    progress: Mutex<Progress>,
    changed: Condvar,
    aborted: AtomicBool,
    /// Set once post-copy has ended and guest memory is unregistered from userfaultfd.
    postcopy_done: AtomicBool,
    /// How long the source may stay silent (see `link::tune_data_socket`).
    peer_timeout: Duration,
    /// Set at a hybrid commit: from then on pages are installed through it.
    uffd: Mutex<Option<Arc<Uffd>>>,
    /// A clone of the data connection, for sending demands.
    demand_stream: Mutex<Option<DataStream>>,
    link: DataLink,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Session {
    /// Creates the session's memory and data listener, and starts receiving.
    pub fn prepare(
        request: &PrepareRequest,
        bind: SocketAddr,
        link: DataLink,
        peer_timeout: Duration,
    ) -> Result<(Arc<Self>, u16), SessionError> {
        request.config.validate().map_err(SessionError::Shape)?;
        let memory = Arc::new(
            GuestMemory::new(request.config.mem_size).map_err(|e| SessionError::Shape(e.into()))?,
        );
        let frames = memory.frames() as usize;
        let listener =
            TcpListener::bind(SocketAddr::new(bind.ip(), 0)).map_err(SessionError::Listen)?;
        let port = listener.local_addr().map_err(SessionError::Listen)?.port();
        let session = Arc::new(Self {
            config: request.config.clone(),
            mode: request.mode,
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
            link,
            threads: Mutex::new(Vec::new()),
        });
        let receiver = Arc::clone(&session);
        let thread = std::thread::Builder::new()
            .name("migration-rx".into())
            .spawn(move || receiver.receive(listener))
            .map_err(SessionError::Listen)?;
        session.threads().push(thread);
        Ok((session, port))
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, error: String) {
        let mut progress = self.lock();
        if progress.error.is_none() {
            progress.error = Some(error);
        }
        drop(progress);
        self.changed.notify_all();
    }

    /// The receiver thread: accept the source's connection, then install frames until the end.
    /// With TLS on, a connection that fails the handshake is dropped and the wait goes on, so
    /// a stranger on the network cannot take the source's place or end the session.
    fn receive(self: Arc<Self>, listener: TcpListener) {
        // The source connects as soon as `prepare` answers.
        let deadline = Instant::now() + (2 * self.peer_timeout).min(STEP_TIMEOUT);
        let _ = listener.set_nonblocking(true);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let stream = 'accepted: loop {
            match listener.accept() {
                Ok((stream, peer)) => match tune_data_socket(&stream, self.peer_timeout) {
                    Ok(()) => self.link.accept_into(stream, peer, ready_tx.clone()),
                    Err(e) => warn!(
                        "refused a data connection from {peer}: {}",
                        heatprobe::probes::error_chain(&e)
                    ),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.fail(format!("accepting the data connection: {e}"));
                    return;
                }
            }
            while let Ok((peer, secured)) = ready.try_recv() {
                match secured {
                    Ok(stream) => break 'accepted stream,
                    Err(e) => warn!(
                        "refused a data connection from {peer}: {}",
                        heatprobe::probes::error_chain(&e)
                    ),
                }
            }
            if self.aborted.load(Ordering::Relaxed) || Instant::now() > deadline {
                self.fail("the source never connected".into());
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // Later connections (strangers, or a second try) are refused from here on.
        drop(listener);
        if let Ok(clone) = stream.try_clone() {
            *self.demand_stream.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone);
        }
        let mut reader = FrameReader::new(stream, self.memory.frames());
        loop {
            if self.aborted.load(Ordering::Relaxed) {
                return;
            }
            let frame = match reader.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    if self.lock().dones < self.expected_dones() {
                        self.fail("the source closed the data connection early".into());
                    }
                    return;
                }
                Err(e) => {
                    self.fail(heatprobe::probes::error_chain(&e));
                    return;
                }
            };
            let result = match frame {
                Frame::Pages(pages) => self.install(&pages),
                Frame::Done => {
                    self.lock().dones += 1;
                    self.changed.notify_all();
                    Ok(())
                }
                Frame::Demand(_) => Err("the source sent a demand frame".to_string()),
            };
            if let Err(e) = result {
                self.fail(e);
                return;
            }
        }
    }

    fn expected_dones(&self) -> u32 {
        match self.mode {
            Mode::Precopy => 1,
            Mode::Hybrid => 2,
        }
    }

    fn install(&self, pages: &[(u64, Option<&[u8]>)]) -> Result<(), String> {
        let uffd = self.uffd.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let zero = [0u8; PAGE_SIZE as usize];
        for &(page, data) in pages {
            let bytes = data.unwrap_or(&zero);
            match &uffd {
                None => {
                    let digest = match data {
                        Some(bytes) => {
                            self.memory
                                .write(GuestAddress(page * PAGE_SIZE), bytes)
                                .map_err(|e| e.to_string())?;
                            // Hashing on arrival keeps the digest out of the cutover's downtime.
                            xxh3_64(bytes)
                        }
                        None => {
                            // The session's memory is a fresh memfd, which reads as zeros:
                            // writing zeros would only make the page resident. A page an
                            // earlier round filled is freed instead, and reads as zeros again.
                            let filled = {
                                let progress = self.lock();
                                progress.received[page as usize]
                                    && progress.page_digests[page as usize] != zero_page_hash()
                            };
                            if filled {
                                self.memory
                                    .remove_page(page)
                                    .map_err(|e| heatprobe::probes::error_chain(&e))?;
                            }
                            zero_page_hash()
                        }
                    };
                    let mut progress = self.lock();
                    progress.received[page as usize] = true;
                    progress.page_digests[page as usize] = digest;
                }
                Some(uffd) => self.install_postcopy(uffd, page, bytes)?,
            }
        }
        Ok(())
    }

    fn install_postcopy(&self, uffd: &Uffd, page: u64, bytes: &[u8]) -> Result<(), String> {
        if self.lock().installed[page as usize] {
            return Ok(());
        }
        let dst = (self.memory.host_address() + page * PAGE_SIZE) as *mut libc::c_void;
        loop {
            // SAFETY: `dst` is a page of our registered guest-memory mapping; `bytes` is one
            // page long. UFFDIO_COPY atomically fills the missing page and wakes waiters.
            let result = unsafe { uffd.copy(bytes.as_ptr().cast(), dst, PAGE_SIZE as usize, true) };
            match result {
                Ok(_) => break,
                // Already present: installed by an earlier copy.
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => break,
                Err(userfaultfd::Error::PartiallyCopied(_)) => continue,
                Err(e) => return Err(format!("UFFDIO_COPY of page {page}: {e}")),
            }
        }
        let mut progress = self.lock();
        progress.installed[page as usize] = true;
        progress.page_digests[page as usize] = xxh3_64(bytes);
        progress.missing = progress.missing.saturating_sub(1);
        if let Some(asked) = progress.demanded.remove(&page) {
            let micros = asked.elapsed().as_micros() as u64;
            if let Some(histogram) = progress.latency_us.as_mut() {
                let _ = histogram.record(micros.max(1));
            }
        }
        let done = progress.missing == 0;
        drop(progress);
        if done {
            self.changed.notify_all();
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
                return Err(SessionError::Data(error.clone()));
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
    /// digest of the memory it starts from.
    pub fn commit(
        self: &Arc<Self>,
        request: CommitRequest,
    ) -> Result<(Partition, Option<MemoryDigest>), SessionError> {
        let snapshot =
            state::decode(&request.snapshot, &self.config).map_err(SessionError::State)?;
        self.wait(|p| p.dones >= 1)?;
        match self.mode {
            Mode::Precopy => {
                let progress = self.lock();
                if let Some(page) = progress.received.iter().position(|r| !r) {
                    return Err(SessionError::Data(format!("page {page} never arrived")));
                }
                let digest = MemoryDigest::from_pages(progress.page_digests.clone());
                drop(progress);
                let partition = Partition::restore(&snapshot, Arc::clone(&self.memory), true)
                    .map_err(SessionError::Restore)?;
                // An abort that came during the restore wins: the source has resumed.
                if self.aborted.load(Ordering::Relaxed) {
                    partition.stop();
                    return Err(SessionError::Aborted);
                }
                Ok((partition, Some(digest)))
            }
            Mode::Hybrid => {
                let partition = self.start_postcopy(&snapshot, &request.stale_pages)?;
                Ok((partition, None))
            }
        }
    }

    fn start_postcopy(
        self: &Arc<Self>,
        snapshot: &PartitionSnapshot,
        stale_pages: &[u64],
    ) -> Result<Partition, SessionError> {
        let frames = self.memory.frames();
        for &page in stale_pages {
            if page >= frames {
                return Err(SessionError::Data(format!(
                    "stale page {page} is out of range"
                )));
            }
            self.memory.remove_page(page).map_err(SessionError::Stale)?;
        }
        {
            let mut progress = self.lock();
            let mut installed = progress.received.clone();
            for &page in stale_pages {
                installed[page as usize] = false;
            }
            progress.missing = installed.iter().filter(|i| !**i).count() as u64;
            progress.installed = installed;
            progress.latency_us = Histogram::new_with_bounds(1, 60_000_000, 3).ok();
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| SessionError::Userfault(e.to_string()))?;
        uffd.register(
            self.memory.host_address() as *mut libc::c_void,
            self.memory.size() as usize,
        )
        .map_err(|e| SessionError::Userfault(e.to_string()))?;
        let uffd = Arc::new(uffd);
        *self.uffd.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&uffd));
        let handler = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("migration-uffd".into())
            .spawn(move || handler.serve_faults(&uffd))
            .map_err(|e| SessionError::Userfault(e.to_string()))?;
        self.threads().push(thread);
        Partition::restore(snapshot, Arc::clone(&self.memory), true).map_err(SessionError::Restore)
    }

    /// The fault handler: asks the source for each page a vCPU waits on.
    fn serve_faults(&self, uffd: &Uffd) {
        let mut poll = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // Not done when nothing is missing: installed zero pages are holes in the memfd,
            // and a guest touching one faults until `finish` unregisters the range.
            if self.aborted.load(Ordering::Relaxed) || self.postcopy_done.load(Ordering::Relaxed) {
                return;
            }
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, 50) };
            if ready <= 0 {
                continue;
            }
            while let Ok(Some(event)) = uffd.read_event() {
                let Event::Pagefault { addr, .. } = event else {
                    continue;
                };
                let page = (addr as u64 - self.memory.host_address()) / PAGE_SIZE;
                let mut progress = self.lock();
                let installed = progress
                    .installed
                    .get(page as usize)
                    .copied()
                    .unwrap_or(true);
                if installed {
                    drop(progress);
                    if let Err(e) = self.fill_zero_page(uffd, page) {
                        self.fail(e);
                        return;
                    }
                    continue;
                }
                if progress.demanded.contains_key(&page) {
                    continue;
                }
                progress.demanded.insert(page, Instant::now());
                progress.requests += 1;
                drop(progress);
                debug!("demanding page {page}");
                let mut stream = self.demand_stream.lock().unwrap_or_else(|p| p.into_inner());
                let sent = match stream.as_mut() {
                    Some(stream) => send_demand(stream, &[page]).map_err(|e| e.to_string()),
                    None => Err("no data connection".into()),
                };
                if let Err(e) = sent {
                    warn!("demanding page {page}: {e}");
                    self.fail(format!("demanding page {page}: {e}"));
                    return;
                }
            }
        }
    }

    /// A fault on a page that is in place: it arrived as a zero marker and was left a hole
    /// (or it was installed just now, and the fault raced the copy). Map the zero page, or
    /// just wake the vCPU if the page is there.
    fn fill_zero_page(&self, uffd: &Uffd, page: u64) -> Result<(), String> {
        let start = (self.memory.host_address() + page * PAGE_SIZE) as *mut libc::c_void;
        // SAFETY: `start` is a page of our registered guest-memory mapping; UFFDIO_ZEROPAGE
        // maps zeros there only if the page is missing.
        match unsafe { uffd.zeropage(start, PAGE_SIZE as usize, true) } {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => uffd
                .wake(start, PAGE_SIZE as usize)
                .map_err(|e| format!("waking the vCPU on page {page}: {e}")),
            Err(e) => Err(format!("UFFDIO_ZEROPAGE of page {page}: {e}")),
        }
    }

    /// Hybrid: waits until every page is in place and returns the digest and post-copy figures.
    pub fn finish(&self) -> Result<FinishReply, SessionError> {
        self.wait(|p| p.dones >= 2 && p.missing == 0)?;
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
        drop(progress);
        if let Some(uffd) = self.uffd.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // Unregistered, missing pages read as zeros again: the handler can go.
            let unregistered = uffd.unregister(
                self.memory.host_address() as *mut libc::c_void,
                self.memory.size() as usize,
            );
            if let Err(e) = unregistered {
                warn!("unregistering guest memory from userfaultfd: {e}");
            } else {
                self.postcopy_done.store(true, Ordering::Relaxed);
            }
        }
        Ok(FinishReply {
            dest_digest: digest.total_hex(),
            postcopy_requests: requests,
            fault_latency_us: latency,
            post_cutover_faults: None,
        })
    }

    /// Why the session failed, if it failed before its cutover (a hybrid session that is past
    /// it keeps its guest waiting for the source instead: see docs/architecture.md). The
    /// daemon polls this to drop a session whose source vanished, killed or cut off, since no
    /// `abort` will come; the data connection then fails within the peer timeout.
    pub fn failed_before_cutover(&self) -> Option<String> {
        if self.aborted.load(Ordering::Relaxed)
            || self
                .uffd
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        {
            return None;
        }
        self.lock().error.clone()
    }

    /// Abandons the session (the source failed or gave up). The memory is freed with it.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
        self.changed.notify_all();
        if let Some(stream) = self
            .demand_stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.aborted.store(true, Ordering::Relaxed);
    }
}
