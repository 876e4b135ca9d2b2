//! Slowing a guest down so pre-copy converges, after QEMU's cpu-throttle (auto-converge).
//!
//! At `pct` percent, each vCPU runs for [`TIMESLICE`] and then sleeps for
//! `TIMESLICE * pct / (100 - pct)`: a ticker thread kicks the vCPUs out of KVM_RUN once per
//! `TIMESLICE / (1 - pct / 100)` and each, on its way back in, naps for its share. The nap
//! waits on the partition's condition variable, so a pause or stop request cuts it short.
//!
//! The percentage is per vCPU, so a caller that knows which vCPUs write could slow only
//! those (dirty-limit style); the migration engine sets all alike (see docs/architecture.md).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::vcpu::{Control, Request};

/// How long a throttled vCPU runs between naps (QEMU's CPU_THROTTLE_TIMESLICE_NS).
pub const TIMESLICE: Duration = Duration::from_millis(10);

/// The largest throttle, as QEMU's cpu-throttle-percentage allows: the guest keeps 1% of its
/// time.
pub const MAX_PCT: u8 = 99;

/// Per-vCPU throttle state, shared by the partition, the ticker and the vCPU threads.
pub struct Throttle {
    pct: Vec<AtomicU8>,
    /// Set by the ticker, taken by the vCPU: nap once.
    due: Vec<AtomicBool>,
}

impl Throttle {
    pub fn new(vcpus: usize) -> Self {
        Self {
            pct: (0..vcpus).map(|_| AtomicU8::new(0)).collect(),
            due: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Sets every vCPU's throttle, capped at [`MAX_PCT`].
    pub fn set_all(&self, pct: u8) {
        for p in &self.pct {
            p.store(pct.min(MAX_PCT), Ordering::Relaxed);
        }
    }

    /// The highest throttle of any vCPU.
    pub fn max_pct(&self) -> u8 {
        self.pct
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// How long vCPU `index` sleeps per timeslice.
    fn nap_length(&self, index: usize) -> Duration {
        let pct = self.pct.get(index).map_or(0, |p| p.load(Ordering::Relaxed));
        nap_for(pct)
    }

    /// Marks every throttled vCPU to nap once; returns whether any is throttled.
    fn tick(&self) -> bool {
        let mut any = false;
        for (pct, due) in self.pct.iter().zip(&self.due) {
            if pct.load(Ordering::Relaxed) > 0 {
                due.store(true, Ordering::Relaxed);
                any = true;
            }
        }
        any
    }

    /// Called by vCPU `index` before it enters the guest: naps if the ticker asked it to.
    pub fn nap_if_due(&self, index: usize, control: &Control) {
        let Some(due) = self.due.get(index) else {
            return;
        };
        if !due.swap(false, Ordering::Relaxed) {
            return;
        }
        let nap = self.nap_length(index);
        if nap.is_zero() {
            return;
        }
        let state = control.lock();
        if state.request == Request::Run {
            // Woken early by any request change (pause, stop); the run loop then rechecks it.
            let _ = control.changed.wait_timeout(state, nap);
        }
    }
}

/// The nap after each timeslice at `pct` percent.
pub fn nap_for(pct: u8) -> Duration {
    let pct = u32::from(pct.min(MAX_PCT));
    TIMESLICE * pct / (100 - pct)
}

/// The ticker's period at `pct` percent: one timeslice of running plus one nap.
pub fn period_for(pct: u8) -> Duration {
    TIMESLICE + nap_for(pct)
}

/// The ticker: while any vCPU is throttled and the partition is not stopping, marks the vCPUs
/// due and calls `kick` once per period.
pub fn spawn_ticker(
    control: Arc<Control>,
    kick: impl Fn() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("throttle".into())
        .spawn(move || {
            loop {
                let period = period_for(control.throttle.max_pct());
                let state = control.lock();
                if state.request == Request::Stop {
                    return;
                }
                let (state, _) = control
                    .changed
                    .wait_timeout(state, period)
                    .unwrap_or_else(|p| p.into_inner());
                if state.request == Request::Stop {
                    return;
                }
                drop(state);
                if !control.throttle.tick() {
                    return;
                }
                kick();
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naps_follow_qemus_formula() {
        assert_eq!(nap_for(0), Duration::ZERO);
        assert_eq!(nap_for(50), TIMESLICE);
        assert_eq!(nap_for(20), TIMESLICE / 4);
        assert_eq!(nap_for(99), TIMESLICE * 99);
        // Capped: 100% would never run the guest again.
        assert_eq!(nap_for(100), nap_for(MAX_PCT));
        assert_eq!(period_for(75), TIMESLICE * 4);
    }

    #[test]
    fn the_share_of_time_left_to_the_guest_is_100_minus_pct() {
        for pct in [10u8, 20, 50, 80, 95, 99] {
            let run = TIMESLICE.as_secs_f64();
            let share = run / period_for(pct).as_secs_f64();
            assert!(
                (share - (100.0 - f64::from(pct)) / 100.0).abs() < 1e-6,
                "{pct}"
            );
        }
    }

    #[test]
    fn only_throttled_vcpus_are_ticked() {
        let throttle = Throttle::new(2);
        assert!(!throttle.tick());
        throttle.pct[1].store(40, Ordering::Relaxed);
        assert!(throttle.tick());
        assert!(!throttle.due[0].load(Ordering::Relaxed));
        assert!(throttle.due[1].load(Ordering::Relaxed));
        throttle.set_all(200);
        assert_eq!(throttle.max_pct(), MAX_PCT);
        throttle.set_all(0);
        assert_eq!(throttle.max_pct(), 0);
    }
}
