//! Post-cutover faults: what the restored guest faulted on over a fixed window from its
//! resume, counted by heatprobe on its vCPU threads (`kvmmmu:kvm_mmu_spte_requested`, one
//! event per guest page fault KVM maps), with the faults that had to ask the source for the
//! page (remote) told apart from those memory here could serve (local).
//!
//! A fresh VM on the destination has no second-level page tables yet, so every page the guest
//! touches faults once, in both modes; a page that is missing (hybrid) also crosses the
//! network. That is what the guest feels after the move, and what a good order cuts.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use heatprobe::{ProbeError, Probes, TargetId};

use crate::migration::report::PostCutoverFaults;

/// The daemon's eBPF probes, or why they did not load: loaded on first use, and kept (a
/// failure too, reported each time) until [`ProbeSlot::release_unused`] finds nothing else
/// holding them. Clones share the slot.
#[derive(Clone, Default)]
pub struct ProbeSlot(Arc<Mutex<Option<LoadedProbes>>>);

/// Loaded probes, or the error that kept them from loading.
pub type LoadedProbes = Result<Arc<Probes>, Arc<ProbeError>>;

impl ProbeSlot {
    /// The probes if loaded (or why not), without waiting: `None` while they load.
    pub fn get(&self) -> Option<LoadedProbes> {
        self.0.try_lock().ok().and_then(|slot| slot.clone())
    }

    /// The probes, loaded now if they are not (this waits on the kernel: hundreds of
    /// milliseconds on a busy host).
    pub fn get_or_load(&self) -> LoadedProbes {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(load_at_low_priority).clone()
    }

    /// Unloads the probes if nothing but the slot holds them (no profiler, no fault window),
    /// detaching their programs, which otherwise run on every page fault of the host. A
    /// failure to load is forgotten too, so the next use tries again. Returns whether
    /// anything was released. It blocks while the kernel detaches the programs: call it
    /// off the async workers.
    pub fn release_unused(&self) -> bool {
        let Ok(mut slot) = self.0.try_lock() else {
            return false;
        };
        let unused = match &*slot {
            Some(Ok(probes)) => Arc::strong_count(probes) == 1,
            Some(Err(_)) => true,
            None => false,
        };
        if unused {
            // Detached once the lock is let go: the detach waits on the kernel (tens to
            // hundreds of milliseconds), and `get` must not see the slot locked meanwhile.
            let released = slot.take();
            drop(slot);
            drop(released);
        }
        unused
    }
}

/// The nice value the probes load at.
const LOAD_NICE: i32 = 10;

/// Loads the probes on a thread of its own at a low CPU priority. The kernel verifies the
/// programs on the loading thread, tens to hundreds of milliseconds of CPU; with a load per
/// partition process, eight at once on two cores starved the daemon's answers (status p99
/// 114 ms in one load-test run). Niced, the verification takes the CPU the guests and the
/// daemons leave.
fn load_at_low_priority() -> LoadedProbes {
    std::thread::scope(|scope| {
        let loading = scope.spawn(|| {
            // Per thread on Linux: `None` is the calling thread. Best effort: a failure only
            // leaves the load at the normal priority.
            let _ = rustix::process::setpriority_process(None, LOAD_NICE);
            Probes::load().map(Arc::new).map_err(Arc::new)
        });
        loading
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A session's fault window, or why it has none.
pub type WindowOrWhyNot = Result<Arc<FaultWindow>, String>;

/// Counting over one window.
pub struct FaultWindow {
    probes: Arc<Probes>,
    id: TargetId,
    resumed: Instant,
    window: Duration,
    remote: AtomicU64,
    /// The guest's operations over the window and the time between the readings, once the
    /// timer has read them at its end.
    ops: Arc<Mutex<Option<(u64, Duration)>>>,
    /// The figures, once read at the window's end.
    result: Mutex<Option<PostCutoverFaults>>,
}

/// Reads the guest's operation count (summed over vCPUs), if it still can.
pub type OpsReader = Box<dyn Fn() -> Option<u64> + Send>;

impl FaultWindow {
    /// Starts counting the faults of vCPU threads `tids` for `window` from now (the resume),
    /// and the guest's operations through `ops`, read now and on a timer at the window's end.
    pub fn start(
        probes: Arc<Probes>,
        tids: &[u32],
        window: Duration,
        ops: OpsReader,
    ) -> Result<Self, ProbeError> {
        let id = probes.track_vcpus(tids)?;
        let counted = Arc::new(Mutex::new(None));
        let first = ops().map(|n| (n, Instant::now()));
        let recording = Arc::clone(&counted);
        // Best effort: without the timer the figures say the operations were not counted.
        let _ = std::thread::Builder::new()
            .name("fault-window".into())
            .spawn(move || {
                std::thread::sleep(window);
                if let (Some((from, at)), Some(to)) = (first, ops()) {
                    *recording.lock().unwrap_or_else(|p| p.into_inner()) =
                        to.checked_sub(from).map(|done| (done, at.elapsed()));
                }
            });
        Ok(Self {
            probes,
            id,
            resumed: Instant::now(),
            window,
            remote: AtomicU64::new(0),
            ops: counted,
            result: Mutex::new(None),
        })
    }

    pub fn ends_at(&self) -> Instant {
        self.resumed + self.window
    }

    /// A fault that asked the source for its page, if it falls inside the window.
    pub fn demanded(&self) {
        if Instant::now() < self.ends_at() {
            self.remote.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The window's figures: waits for its end, then reads the counts once (later calls get
    /// the same figures).
    pub fn report(&self) -> Result<PostCutoverFaults, ProbeError> {
        std::thread::sleep(self.ends_at().saturating_duration_since(Instant::now()));
        // The timer reads the operations just after the window's end.
        let deadline = Instant::now() + Duration::from_millis(200);
        while self.ops.lock().unwrap_or_else(|p| p.into_inner()).is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let ops = *self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let mut result = self.result.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(done) = *result {
            return Ok(done);
        }
        let total: u64 = self
            .probes
            .counts(self.id)?
            .values()
            .map(|c| c.reads.saturating_add(c.writes))
            .fold(0, u64::saturating_add);
        let remote = self.remote.load(Ordering::Relaxed);
        let done = PostCutoverFaults {
            window_ms: self.window.as_millis() as u64,
            // KVM maps a remote page once it arrives, so the probes count it too.
            local: total.saturating_sub(remote),
            remote,
            ops: ops.map(|(done, _)| done),
            ops_us: ops.map(|(_, took)| took.as_micros() as u64),
        };
        *result = Some(done);
        // Nothing more to count: the vCPU threads are free for a profiler.
        let _ = self.probes.untrack(self.id);
        Ok(done)
    }
}

impl Drop for FaultWindow {
    fn drop(&mut self) {
        // Untracking twice is harmless; a failure leaves a stale entry the probes drop with
        // their owner.
        let _ = self.probes.untrack(self.id);
    }
}
