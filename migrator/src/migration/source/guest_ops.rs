//! How fast the guest works during a migration compared with just before it: the cost of
//! the migration to the guest, which the downtime alone does not show.

use std::time::{Duration, Instant};

use crate::vmm::{Partition, PartitionState};

/// How long the guest's pace is measured before anything of the migration starts: long
/// enough for a guest reporting its count every few milliseconds, short beside a migration.
pub(super) const BEFORE_WINDOW: Duration = Duration::from_millis(200);

/// The guest's operation count at one moment.
#[derive(Clone, Copy, Debug)]
pub(super) struct OpsMark {
    at: Instant,
    ops: u64,
}

impl OpsMark {
    /// Reads the count the guest keeps over its vCPUs.
    pub(super) fn now(partition: &Partition) -> Self {
        Self {
            at: Instant::now(),
            ops: partition.total_progress().ops,
        }
    }
}

/// Operations per second between two marks; `None` if no time passed or the count went
/// backwards (the guest writes it: a reset or a lie is not a rate).
pub(super) fn rate(from: OpsMark, to: OpsMark) -> Option<f64> {
    let ops = to.ops.checked_sub(from.ops)?;
    let seconds = to.at.checked_duration_since(from.at)?.as_secs_f64();
    (seconds > 0.0).then(|| ops as f64 / seconds)
}

/// The guest's rate over `window`, now; `None` at once if it is not running, since a paused
/// guest has no pace to compare with.
pub(super) fn rate_before(partition: &Partition, window: Duration) -> Option<f64> {
    if partition.state() != PartitionState::Running {
        return None;
    }
    let from = OpsMark::now(partition);
    std::thread::sleep(window);
    rate(from, OpsMark::now(partition))
}

/// The rate during the migration over the rate before; `None` when the guest did nothing
/// before (an idle guest, or one that keeps no count), where a ratio means nothing.
pub(super) fn ratio(before: Option<f64>, during: Option<f64>) -> Option<f64> {
    let before = before.filter(|b| b.is_finite() && *b > 0.0)?;
    during.map(|d| d / before)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(at: Instant, ops: u64) -> OpsMark {
        OpsMark { at, ops }
    }

    #[test]
    fn the_rate_is_operations_over_seconds() {
        let start = Instant::now();
        let later = start + Duration::from_millis(500);
        let rate = rate(mark(start, 1000), mark(later, 2000)).expect("a rate");
        assert!((rate - 2000.0).abs() < 1e-6, "{rate}");
    }

    #[test]
    fn a_count_going_backwards_or_no_time_is_no_rate() {
        let start = Instant::now();
        let later = start + Duration::from_millis(500);
        assert_eq!(rate(mark(start, 2000), mark(later, 1000)), None);
        assert_eq!(rate(mark(start, 1000), mark(start, 2000)), None);
        assert_eq!(rate(mark(later, 1000), mark(start, 2000)), None);
    }

    #[test]
    fn the_ratio_needs_work_before() {
        assert_eq!(ratio(Some(1000.0), Some(250.0)), Some(0.25));
        assert_eq!(ratio(Some(1000.0), Some(0.0)), Some(0.0));
        assert_eq!(ratio(Some(0.0), Some(250.0)), None);
        assert_eq!(ratio(None, Some(250.0)), None);
        assert_eq!(ratio(Some(1000.0), None), None);
    }
}
