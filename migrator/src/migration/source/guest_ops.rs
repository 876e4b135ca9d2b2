//! How fast the guest works during a migration compared with just before it: the cost of
//! the migration to the guest, which the downtime alone does not show.

use std::time::{Duration, Instant};

use crate::vmm::{Partition, PartitionState, pace::Pace};

/// How long the guest's pace is measured before anything of the migration starts, where its
/// host has no history of it ([`crate::vmm::pace`]): a second, so that a guest whose count
/// stalls now and then is measured over whole cycles of its work. 200 ms fell inside the full
/// self-checks of paced `hotspot` and `graded` guests (every 0.65 s, each a read of all
/// 512 MiB, counting no operation), took their pace for a fraction of what it was, and so
/// their work lost for tens of seconds below zero.
pub(super) const BEFORE_WINDOW: Duration = Duration::from_secs(1);
/// A guest that counts coarsely (an operation per pass over its memory, say) is watched for
/// longer, up to this, until it has counted [`ENOUGH_OPS`].
const BEFORE_WINDOW_MAX: Duration = Duration::from_secs(2);
const ENOUGH_OPS: u64 = 20;

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

/// The guest's pace: over its host's history of it (up to half a minute, its own pauses
/// weighed in), or, where there is not enough of one, over `window` now, or longer (up to
/// [`BEFORE_WINDOW_MAX`]) for a guest that has counted fewer than [`ENOUGH_OPS`] by then;
/// `None` at once if it is not running, since a paused guest has no pace to compare with.
pub(super) fn rate_before(partition: &Partition, window: Duration) -> Option<Pace> {
    if partition.state() != PartitionState::Running {
        return None;
    }
    if let Some(pace) = partition.pace() {
        return Some(pace);
    }
    let from = OpsMark::now(partition);
    std::thread::sleep(window);
    let mut to = OpsMark::now(partition);
    while to.ops.saturating_sub(from.ops) < ENOUGH_OPS && to.at - from.at < BEFORE_WINDOW_MAX {
        std::thread::sleep(window.min(BEFORE_WINDOW_MAX));
        to = OpsMark::now(partition);
    }
    Some(Pace {
        per_second: rate(from, to)?,
        over: to.at - from.at,
    })
}

/// The rate during the migration over the rate before; `None` when the guest did nothing
/// before (an idle guest, or one that keeps no count), where a ratio means nothing.
pub(super) fn ratio(before: Option<f64>, during: Option<f64>) -> Option<f64> {
    let before = before.filter(|b| b.is_finite() && *b > 0.0)?;
    during.map(|d| d / before)
}

/// A part of the migration whose cost to the guest is counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    Profile,
    Rounds,
    Throttle,
}

/// The guest's work lost while it runs here, part by part: each interval's time less the
/// operations done in it at the guest's pace before the migration.
#[derive(Debug)]
pub(super) struct Ledger {
    /// The guest's pace before the migration; `None` where there was none to count against
    /// (the ledger then counts nothing).
    pace: Option<Pace>,
    open: Option<(Part, OpsMark)>,
    /// Milliseconds lost, by part: profile, rounds, throttle.
    lost: [f64; 3],
    counted: Duration,
}

impl Ledger {
    pub(super) fn new(pace: Option<Pace>) -> Self {
        Self {
            pace: pace.filter(|p| p.per_second.is_finite() && p.per_second > 0.0),
            open: None,
            lost: [0.0; 3],
            counted: Duration::ZERO,
        }
    }

    /// From now on, the guest's time counts to `part` (closing the part it counted to).
    pub(super) fn enter(&mut self, partition: &Partition, part: Part) {
        let now = OpsMark::now(partition);
        self.close_at(now);
        self.open = Some((part, now));
    }

    /// Stops counting (the pause).
    pub(super) fn close(&mut self, partition: &Partition) {
        let now = OpsMark::now(partition);
        self.close_at(now);
        self.open = None;
    }

    /// The guest's pace before the migration, if it has one.
    pub(super) fn rate(&self) -> Option<f64> {
        self.pace.map(|p| p.per_second)
    }

    /// The part it counts to now.
    pub(super) fn part(&self) -> Option<Part> {
        self.open.map(|(part, _)| part)
    }

    fn close_at(&mut self, now: OpsMark) {
        let (Some((part, from)), Some(rate)) = (self.open, self.rate()) else {
            return;
        };
        let Some(took) = now.at.checked_duration_since(from.at) else {
            return;
        };
        // A count that went backwards says nothing of the interval.
        let Some(done) = now.ops.checked_sub(from.ops) else {
            return;
        };
        self.counted += took;
        self.lost[part as usize] += lost_ms(took, done, rate);
    }

    /// The pace counted against, and the milliseconds lost by part (profile, rounds,
    /// throttle) with the time they cover.
    pub(super) fn totals(&self) -> Option<(Pace, [f64; 3], Duration)> {
        self.pace.map(|pace| (pace, self.lost, self.counted))
    }
}

/// The guest's work lost since `from`, in milliseconds at its pace of `rate` per second.
pub(super) fn lost_since(partition: &Partition, from: OpsMark, rate: f64) -> Option<f64> {
    let now = OpsMark::now(partition);
    let done = now.ops.checked_sub(from.ops)?;
    Some(lost_ms(now.at.checked_duration_since(from.at)?, done, rate))
}

/// The time, in milliseconds, that `done` operations in `took` fall short of the guest's pace
/// of `rate` per second: below zero if it did more.
pub(super) fn lost_ms(took: Duration, done: u64, rate: f64) -> f64 {
    took.as_secs_f64() * 1e3 - done as f64 / rate * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_lost_is_the_time_less_what_was_done_at_the_old_pace() {
        // 1000 ops/s: 500 ms in which 200 ops were done lost 300 ms of the guest's work.
        let lost = lost_ms(Duration::from_millis(500), 200, 1000.0);
        assert!((lost - 300.0).abs() < 1e-9, "{lost}");
        // Kept its pace: nothing lost; faster: below zero.
        assert!(lost_ms(Duration::from_millis(500), 500, 1000.0).abs() < 1e-9);
        assert!(lost_ms(Duration::from_millis(500), 600, 1000.0) < 0.0);
    }

    #[test]
    fn a_ledger_charges_each_interval_to_its_part() {
        let start = Instant::now();
        let mut ledger = Ledger::new(Some(Pace {
            per_second: 1000.0,
            over: Duration::from_secs(1),
        }));
        ledger.open = Some((Part::Profile, mark(start, 0)));
        ledger.close_at(mark(start + Duration::from_millis(100), 50));
        ledger.open = Some((Part::Throttle, mark(start + Duration::from_millis(100), 50)));
        ledger.close_at(mark(start + Duration::from_millis(300), 100));
        let (pace, lost, counted) = ledger.totals().unwrap();
        assert_eq!(pace.per_second, 1000.0);
        assert!(
            (lost[Part::Profile as usize] - 50.0).abs() < 1e-6,
            "{lost:?}"
        );
        assert_eq!(lost[Part::Rounds as usize], 0.0);
        assert!(
            (lost[Part::Throttle as usize] - 150.0).abs() < 1e-6,
            "{lost:?}"
        );
        assert_eq!(counted, Duration::from_millis(300));
        // No pace before, nothing to count against.
        assert!(
            Ledger::new(Some(Pace {
                per_second: 0.0,
                over: Duration::from_secs(1),
            }))
            .totals()
            .is_none()
        );
        assert!(Ledger::new(None).totals().is_none());
    }

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
