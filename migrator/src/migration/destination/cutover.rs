//! The cutover and the session's end: commit (restore the partition, parked), handover
//! (it runs here), finish (hybrid: every page in place), abort and discard.

use std::{
    sync::{Arc, MutexGuard, atomic::Ordering},
    time::Instant,
};

use heatprobe::probes::error_chain;

use crate::migration::{
    control::{CommitRequest, CommitTimings, FinishReply},
    report::{Latency, Mode},
};
use crate::vmm::{
    MemoryDigest, Partition, PartitionSnapshot,
    state::{self},
};

use super::{
    Committed, DataError, FaultWindow, PhaseError, Session, SessionError, SessionEvent,
    SessionPhase, WindowOrWhyNot, blocktime::Blocktime, faults, millis_since,
};

impl Session {
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

    pub(super) fn restore(
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
    pub(super) fn start_fault_window(&self, tids: &[u32]) {
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
    pub(super) fn count_remote_fault(&self) {
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
        self.phase().may_await(SessionEvent::Finish, self.mode)?;
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

    pub(super) fn lock_parked(&self) -> MutexGuard<'_, Option<Arc<Partition>>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a session whose restored partition was stopped.
    pub fn discard(&self) -> Result<(), PhaseError> {
        self.advance(SessionEvent::Discard)?;
        self.hang_up();
        Ok(())
    }

    pub(super) fn hang_up(&self) {
        self.aborted.store(true, Ordering::Relaxed);
        self.changed.notify_all();
        for stream in self.lock_streams().iter() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}
