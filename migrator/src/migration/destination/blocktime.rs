//! Post-copy blocktime, as QEMU defines it: how long each vCPU waited on missing pages, and
//! how long all of them waited at once (the time the guest as a whole made no progress).
//!
//! The fault handler says when a vCPU thread faulted on a page (UFFD_FEATURE_THREAD_ID names
//! the thread) and when a page arrived; a vCPU waits from its fault to its page's arrival.

use std::time::{Duration, Instant};

/// What one vCPU is waiting on, and what it has waited in all.
#[derive(Clone, Debug, Default)]
struct VcpuWait {
    tid: u32,
    /// The page it faulted on and when, while it waits.
    waiting: Option<(u64, Instant)>,
    total: Duration,
}

/// The blocktime of one post-copy.
#[derive(Clone, Debug, Default)]
pub struct Blocktime {
    vcpus: Vec<VcpuWait>,
    blocked: usize,
    /// Since when every vCPU waits, while they all do.
    all_since: Option<Instant>,
    all_total: Duration,
}

impl Blocktime {
    /// Tracks the vCPU threads `tids`. Faults of other threads (the VMM's own) do not count:
    /// they stall no vCPU.
    pub fn new(tids: &[u32]) -> Self {
        Self {
            vcpus: tids
                .iter()
                .map(|&tid| VcpuWait {
                    tid,
                    ..VcpuWait::default()
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Thread `tid` faulted on the missing `page` at `at`. A vCPU already waiting stays on its
    /// first page: a thread blocked in a fault cannot fault again.
    pub fn faulted(&mut self, tid: u32, page: u64, at: Instant) {
        let Some(vcpu) = self.vcpus.iter_mut().find(|v| v.tid == tid) else {
            return;
        };
        if vcpu.waiting.is_some() {
            return;
        }
        vcpu.waiting = Some((page, at));
        self.blocked += 1;
        if self.blocked == self.vcpus.len() {
            self.all_since = Some(at);
        }
    }

    /// `page` is in place at `at`: the vCPUs waiting on it run again.
    pub fn arrived(&mut self, page: u64, at: Instant) {
        for vcpu in &mut self.vcpus {
            let Some((waited_on, since)) = vcpu.waiting else {
                continue;
            };
            if waited_on != page {
                continue;
            }
            vcpu.total += at.saturating_duration_since(since);
            vcpu.waiting = None;
            self.blocked -= 1;
            if let Some(all_since) = self.all_since.take() {
                self.all_total += at.saturating_duration_since(all_since);
            }
        }
    }

    /// The time every vCPU waited at once, in milliseconds, waits still open counted to `now`.
    pub fn all_ms(&self, now: Instant) -> f64 {
        let open = self
            .all_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        (self.all_total + open).as_secs_f64() * 1e3
    }

    /// What each vCPU waited, in milliseconds, in vCPU order, waits still open counted to
    /// `now`.
    pub fn per_vcpu_ms(&self, now: Instant) -> Vec<f64> {
        self.vcpus
            .iter()
            .map(|v| {
                let open = v.waiting.map_or(Duration::ZERO, |(_, since)| {
                    now.saturating_duration_since(since)
                });
                (v.total + open).as_secs_f64() * 1e3
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn only_the_time_all_vcpus_wait_together_is_the_guests_blocktime() {
        let t0 = Instant::now();
        let mut b = Blocktime::new(&[10, 11]);
        b.faulted(10, 5, t0);
        b.faulted(11, 7, t0 + ms(2));
        // Both wait from 2 to 3 ms.
        b.arrived(7, t0 + ms(3));
        b.arrived(5, t0 + ms(6));
        assert!((b.all_ms(t0 + ms(10)) - 1.0).abs() < 1e-6);
        let per = b.per_vcpu_ms(t0 + ms(10));
        assert!((per[0] - 6.0).abs() < 1e-6, "{per:?}");
        assert!((per[1] - 1.0).abs() < 1e-6, "{per:?}");
    }

    #[test]
    fn vcpus_on_one_page_wake_together_and_other_threads_do_not_count() {
        let t0 = Instant::now();
        let mut b = Blocktime::new(&[1, 2]);
        b.faulted(99, 3, t0);
        b.faulted(1, 3, t0);
        b.faulted(2, 3, t0 + ms(1));
        // A second fault of a waiting vCPU changes nothing.
        b.faulted(1, 4, t0 + ms(1));
        b.arrived(4, t0 + ms(2));
        b.arrived(3, t0 + ms(4));
        assert!((b.all_ms(t0 + ms(9)) - 3.0).abs() < 1e-6);
        assert_eq!(b.per_vcpu_ms(t0 + ms(9)), vec![4.0, 3.0]);
    }

    #[test]
    fn a_wait_still_open_counts_to_now() {
        let t0 = Instant::now();
        let mut b = Blocktime::new(&[1]);
        b.faulted(1, 3, t0);
        assert!((b.all_ms(t0 + ms(5)) - 5.0).abs() < 1e-6);
        assert_eq!(b.per_vcpu_ms(t0 + ms(5)), vec![5.0]);
    }
}
