//! Hybrid mode after the commit: guest memory registered with userfaultfd (missing mode). A
//! guest access to a missing page blocks its vCPU; the handler thread asks the source for
//! the page, and the receiver installs it with UFFDIO_COPY, which wakes the vCPU. Pages
//! pushed by the source are installed the same way.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use heatprobe::probes::error_chain;

use hdrhistogram::Histogram;
use tracing::{debug, warn};
use userfaultfd::{Event, FeatureFlags, Uffd, UffdBuilder};
use xxhash_rust::xxh3::xxh3_64;

use super::{DataError, PhaseError, Session, SessionError, SessionEvent};
use crate::{
    migration::{control::Recovery, transport::send_demand},
    vmm::{Partition, PartitionSnapshot, memory::PAGE_SIZE},
};

impl Session {
    /// Drops the stale pages, registers guest memory with userfaultfd, starts the fault
    /// handler and restores the partition, parked; once resumed it runs on the pages it has.
    pub(super) fn start_postcopy(
        self: &Arc<Self>,
        snapshot: &PartitionSnapshot,
        stale_pages: &[u64],
    ) -> Result<Partition, SessionError> {
        let frames = self.memory.frames();
        if let Some(&page) = stale_pages.iter().find(|&&page| page >= frames) {
            return Err(SessionError::StaleOutOfRange(page));
        }
        // This is downtime: only the copies held here, a run of neighbours at a time.
        self.punch_held_copies(stale_pages.to_vec())
            .map_err(|(_, source)| SessionError::Stale(source))?;
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
            // Names the faulting thread, so blocktime is charged to the vCPU that waits.
            .require_features(FeatureFlags::THREAD_ID)
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(SessionError::Userfault)?;
        uffd.register(
            self.memory.host_address() as *mut libc::c_void,
            self.memory.size() as usize,
        )
        .map_err(SessionError::Userfault)?;
        let uffd = Arc::new(uffd);
        *self.uffd.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&uffd));
        let handler = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("migration-uffd".into())
            .spawn(move || handler.serve_faults(&uffd))
            .map_err(SessionError::Handler)?;
        self.threads().push(thread);
        // Parked: the caller resumes it, timing that apart.
        Partition::restore(snapshot, Arc::clone(&self.memory), false).map_err(SessionError::Restore)
    }

    pub(super) fn install_postcopy(
        &self,
        uffd: &Uffd,
        page: u64,
        bytes: &[u8],
    ) -> Result<(), DataError> {
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
                Err(source) => return Err(DataError::Copy { page, source }),
            }
        }
        let mut progress = self.lock();
        // A demanded page can arrive twice at once, on the urgent connection and in the push:
        // both copies pass the check above, and only the first to get here counts. Counting
        // both would bring `missing` to zero with a page still missing, and `finish` would
        // end post-copy without it.
        if progress.installed[page as usize] {
            return Ok(());
        }
        if let Some(blocktime) = progress.blocktime.as_mut() {
            blocktime.arrived(page, Instant::now());
        }
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

    /// The fault handler: asks the source for each page a vCPU waits on.
    fn serve_faults(&self, uffd: &Uffd) {
        use rustix::event::{PollFd, PollFlags, poll};
        loop {
            // Not done when nothing is missing: installed zero pages are holes in the memfd,
            // and a guest touching one faults until `finish` unregisters the range.
            if self.aborted.load(Ordering::Relaxed) || self.postcopy_done.load(Ordering::Relaxed) {
                return;
            }
            let mut fds = [PollFd::new(uffd, PollFlags::IN)];
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            match poll(&mut fds, Some(&timeout)) {
                Ok(0) | Err(_) => continue,
                Ok(_) => {}
            }
            while let Ok(Some(event)) = uffd.read_event() {
                let Event::Pagefault {
                    addr, thread_id, ..
                } = event
                else {
                    continue;
                };
                let page = (addr as u64 - self.memory.host_address()) / PAGE_SIZE;
                match self.serve_fault(uffd, page, thread_id.as_raw() as u32) {
                    Ok(()) => {}
                    // The link broke: post-copy pauses, and the demand goes again over the
                    // connection a recovery opens. The guest waits on this page meanwhile.
                    Err((generation, e @ DataError::Demand { .. })) => {
                        warn!("post-copy fault on page {page}: {}", error_chain(&e));
                        self.fail_in(generation, e);
                    }
                    Err((_, e)) => {
                        warn!("post-copy fault on page {page}: {}", error_chain(&e));
                        self.fail(e);
                        return;
                    }
                }
            }
        }
    }

    /// Thread `tid` faulted on `page`. A failure to demand it comes with the generation of
    /// the connection that failed.
    fn serve_fault(&self, uffd: &Uffd, page: u64, tid: u32) -> Result<(), (u32, DataError)> {
        let now = Instant::now();
        let mut progress = self.lock();
        let installed = progress
            .installed
            .get(page as usize)
            .copied()
            .unwrap_or(true);
        if installed {
            drop(progress);
            return self.fill_zero_page(uffd, page).map_err(|e| (0, e));
        }
        if let Some(blocktime) = progress.blocktime.as_mut() {
            blocktime.faulted(tid, page, now);
        }
        self.count_remote_fault();
        if progress.demanded.contains_key(&page) {
            return Ok(());
        }
        progress.demanded.insert(page, Instant::now());
        progress.requests += 1;
        drop(progress);
        debug!("demanding page {page}");
        // None while post-copy is paused: the recovery's urgent connection sends it.
        match self.lock_demand_stream().as_mut() {
            Some((generation, stream)) => send_demand(stream, &[page])
                .map_err(|source| (*generation, DataError::Demand { page, source })),
            None => Ok(()),
        }
    }

    /// The source recovers post-copy after a broken connection: the connections in use (if
    /// any still are) are dropped, the session pauses, and a new data listener waits for the
    /// source's new connections, which resume the push. Returns its port, and the pages not
    /// in place here as a bitmap (bit `page % 64` of word `page / 64`), which the push sends
    /// again: whatever was in flight on the old connections is among them. Refused, changing
    /// nothing, unless the guest runs here on missing pages.
    pub fn recover(self: &Arc<Self>) -> Result<Recovery, SessionError> {
        let listener =
            TcpListener::bind(SocketAddr::new(self.bind, 0)).map_err(SessionError::Listen)?;
        let data_port = listener.local_addr().map_err(SessionError::Listen)?.port();
        let (generation, missing) = self.begin_recovery()?;
        let receiver = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || receiver.receive(listener, generation))
            .map_err(SessionError::Listen)?;
        self.threads().push(thread);
        tracing::info!("post-copy recovery {generation}: waiting on port {data_port}");
        Ok(Recovery { data_port, missing })
    }

    /// A recovery's new generation of connections: the old ones are shut down, and what
    /// they said is forgotten. Returns the generation and the pages still missing, one bit a
    /// page; refused, changing nothing, in a phase that does not recover.
    pub(super) fn begin_recovery(&self) -> Result<(u32, Vec<u64>), PhaseError> {
        let (generation, missing) = {
            let mut progress = self.lock();
            let next = progress.phase().next(SessionEvent::Recover, self.mode)?;
            progress.phase = Some(next);
            progress.generation += 1;
            progress.error = None;
            progress.urgent = false;
            // Pre-copy's phase ended on every connection; the push's has not.
            progress.dones = self.connections;
            let mut missing = vec![0u64; progress.installed.len().div_ceil(64)];
            for (page, _) in progress.installed.iter().enumerate().filter(|(_, i)| !**i) {
                missing[page / 64] |= 1 << (page % 64);
            }
            (progress.generation, missing)
        };
        *self.lock_demand_stream() = None;
        for stream in self.lock_streams().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        self.changed.notify_all();
        Ok((generation, missing))
    }

    /// A fault on a page that is in place: it arrived as a zero marker and was left a hole
    /// (or it was installed just now, and the fault raced the copy). Map the zero page, or
    /// just wake the vCPU if the page is there.
    fn fill_zero_page(&self, uffd: &Uffd, page: u64) -> Result<(), DataError> {
        let start = (self.memory.host_address() + page * PAGE_SIZE) as *mut libc::c_void;
        // SAFETY: `start` is a page of our registered guest-memory mapping; UFFDIO_ZEROPAGE
        // maps zeros there only if the page is missing.
        match unsafe { uffd.zeropage(start, PAGE_SIZE as usize, true) } {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => uffd
                .wake(start, PAGE_SIZE as usize)
                .map_err(|source| DataError::Wake { page, source }),
            Err(source) => Err(DataError::ZeroPage { page, source }),
        }
    }

    /// Unregisters guest memory from userfaultfd once every page is in place: missing pages
    /// then read as zeros again, and the handler can go.
    pub(super) fn end_postcopy(&self) {
        if let Some(uffd) = self.uffd.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let unregistered = uffd.unregister(
                self.memory.host_address() as *mut libc::c_void,
                self.memory.size() as usize,
            );
            match unregistered {
                Ok(()) => self.postcopy_done.store(true, Ordering::Relaxed),
                Err(e) => warn!("unregistering guest memory from userfaultfd: {e}"),
            }
        }
    }
}
