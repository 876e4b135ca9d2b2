//! The guest's pace over the last half minute, as its host samples it: what a migration's
//! bill (`guest_work_lost`) is measured against.
//!
//! A pace measured over the second before a migration fell on or off the guest's own pauses
//! at random: `kv-zipf` stops counting for half a second every six for its full self-check,
//! `hotspot` and `graded` for a read of all their memory every 0.65 s. Off a pause, the
//! pauses during the migration were billed to it; on one, the guest seemed to gain from
//! being moved. Runs of one migration differed by a second either way for that alone. Over
//! several of the guest's cycles, its pauses weigh in the pace as they do in its work.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

impl super::Partition {
    /// Reads the guest's count into its pace history (every [`PACE_EVERY`], by its host).
    pub fn record_pace(&self) {
        let running = self.state() == super::PartitionState::Running;
        let ops = self.total_progress().ops;
        let mut pace = self.pace.lock().unwrap_or_else(|p| p.into_inner());
        pace.record(Instant::now(), ops, running);
    }

    /// The guest's pace over its history, if it has enough of one.
    pub fn pace(&self) -> Option<Pace> {
        let pace = self.pace.lock().unwrap_or_else(|p| p.into_inner());
        pace.rate(Instant::now())
    }
}

/// A guest's pace: operations per second over its vCPUs, and how long they were counted
/// over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pace {
    pub per_second: f64,
    pub over: Duration,
}

/// How often the host reads the guest's count.
pub const PACE_EVERY: Duration = Duration::from_millis(250);
/// How far back the pace reaches: five of `kv-zipf`'s self-check cycles.
pub const PACE_SPAN: Duration = Duration::from_secs(30);
/// The least history a pace is taken from: less does not span one of `kv-zipf`'s cycles.
pub const PACE_LEAST: Duration = Duration::from_secs(10);

/// The guest's operation count at each sample while it ran, the newest last.
#[derive(Debug, Default)]
pub struct PaceHistory {
    samples: VecDeque<(Instant, u64)>,
}

impl PaceHistory {
    /// Records the count `ops` read at `at`. A guest that is not running, or whose count went
    /// backwards (it writes the count: a reset is no pace), starts the history again.
    pub fn record(&mut self, at: Instant, ops: u64, running: bool) {
        let backwards = self.samples.back().is_some_and(|&(_, last)| ops < last);
        if !running || backwards {
            self.samples.clear();
        }
        if !running {
            return;
        }
        self.samples.push_back((at, ops));
        while self
            .samples
            .front()
            .is_some_and(|&(first, _)| at.saturating_duration_since(first) > PACE_SPAN)
        {
            self.samples.pop_front();
        }
    }

    /// Operations per second over the history up to `now`, and the time they cover, from the
    /// guest's first operation
    /// on (a workload that fills its memory first counts none meanwhile); `None` if the
    /// history is stale (not sampled over the last two periods) or spans less than
    /// [`PACE_LEAST`].
    pub fn rate(&self, now: Instant) -> Option<Pace> {
        let &(last_at, last_ops) = self.samples.back()?;
        if now.saturating_duration_since(last_at) > 2 * PACE_EVERY {
            return None;
        }
        // From the last sample still at zero: the guest began counting after it.
        let first = self
            .samples
            .iter()
            .rposition(|&(_, ops)| ops == 0)
            .unwrap_or(0);
        let (first_at, first_ops) = self.samples[first];
        let span = last_at.checked_duration_since(first_at)?;
        (span >= PACE_LEAST).then(|| Pace {
            per_second: (last_ops - first_ops) as f64 / span.as_secs_f64(),
            over: span,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest counting `rate` a second, stopping for `pause` every `cycle`, sampled every
    /// period for `seconds`.
    fn sampled(rate: f64, cycle: f64, pause: f64, seconds: f64) -> (PaceHistory, Instant) {
        let start = Instant::now();
        let mut history = PaceHistory::default();
        let mut ops = 0.0;
        let step = PACE_EVERY.as_secs_f64();
        let mut t = 0.0;
        while t <= seconds {
            history.record(start + Duration::from_secs_f64(t), ops as u64, true);
            if t % cycle >= pause {
                ops += rate * step;
            }
            t += step;
        }
        (history, start + Duration::from_secs_f64(seconds))
    }

    #[test]
    fn the_pace_weighs_the_guests_own_pauses_in() {
        // Half a second stopped every six: eleven twelfths of its running pace.
        let (history, now) = sampled(500_000.0, 6.0, 0.5, 60.0);
        let Pace {
            per_second: rate,
            over,
        } = history.rate(now).expect("a pace");
        assert!(over >= PACE_SPAN - PACE_EVERY, "{over:?}");
        assert!(
            (rate / (500_000.0 * 11.0 / 12.0) - 1.0).abs() < 0.02,
            "{rate}"
        );
    }

    #[test]
    fn a_guest_that_has_not_yet_counted_is_paced_from_its_first_operation() {
        let start = Instant::now();
        let mut history = PaceHistory::default();
        // Five seconds filling, then a thousand a second for twelve.
        for tick in 0..=68u32 {
            let t = Duration::from_millis(250 * u64::from(tick));
            let counting = t.saturating_sub(Duration::from_secs(5));
            history.record(start + t, counting.as_millis() as u64, true);
        }
        let now = start + Duration::from_secs(17);
        let Pace {
            per_second: rate,
            over,
        } = history.rate(now).expect("a pace");
        assert!((rate - 1000.0).abs() < 1.0, "{rate}");
        assert_eq!(over, Duration::from_secs(12));
    }

    #[test]
    fn no_pace_from_too_little_a_stale_or_a_broken_history() {
        let (history, now) = sampled(1000.0, 100.0, 0.0, 5.0);
        assert_eq!(history.rate(now), None, "five seconds");
        let (history, now) = sampled(1000.0, 100.0, 0.0, 20.0);
        assert!(history.rate(now).is_some());
        assert_eq!(history.rate(now + Duration::from_secs(1)), None, "stale");
        let (mut history, now) = sampled(1000.0, 100.0, 0.0, 20.0);
        history.record(now, 10, true);
        assert_eq!(history.rate(now), None, "a count that went backwards");
        let (mut history, now) = sampled(1000.0, 100.0, 0.0, 20.0);
        history.record(now, 30_000, false);
        assert_eq!(history.rate(now), None, "paused");
    }

    #[test]
    fn the_history_reaches_back_half_a_minute() {
        let (history, now) = sampled(1000.0, 100.0, 0.0, 90.0);
        let (first, _) = history.samples[0];
        assert!(now.duration_since(first) <= PACE_SPAN);
        assert!(now.duration_since(first) >= PACE_SPAN - PACE_EVERY);
    }
}
