//! When pre-copy stops iterating and cuts over: a pure decision over what each round's
//! dirty-log check found, so it can be tested on synthetic sequences.

use std::time::Duration;

use crate::vmm::memory::PAGE_SIZE;

/// Why the iteration stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutoverReason {
    /// What is left fits the downtime limit at the measured rate.
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// The dirty set stopped shrinking: more rounds would not help.
    NotShrinking,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Iterate,
    CutOver(CutoverReason),
}

/// The state of the decision across rounds.
#[derive(Clone, Debug)]
pub struct Convergence {
    downtime_limit: Duration,
    max_rounds: u32,
    previous: Option<u64>,
    not_shrinking: u32,
}

/// How many checks in a row the dirty set may fail to shrink before the iteration gives up.
const NOT_SHRINKING_CHECKS: u32 = 2;

impl Convergence {
    pub fn new(downtime_limit: Duration, max_rounds: u32) -> Self {
        Self {
            downtime_limit,
            max_rounds,
            previous: None,
            not_shrinking: 0,
        }
    }

    /// The downtime `pages` pages would take at `rate` bytes per second.
    pub fn expected_downtime(pages: u64, rate: f64) -> Duration {
        Duration::from_secs_f64(pages as f64 * PAGE_SIZE as f64 / rate.max(1.0))
    }

    /// After a check that found `pages` pages left to send, with `rounds` rounds sent so far
    /// at a last measured `rate` (bytes per second): iterate once more, or cut over.
    pub fn decide(&mut self, pages: u64, rate: f64, rounds: u32) -> Decision {
        self.not_shrinking = match self.previous {
            Some(previous) if pages >= previous => self.not_shrinking + 1,
            _ => 0,
        };
        self.previous = Some(pages);
        if Self::expected_downtime(pages, rate) <= self.downtime_limit {
            Decision::CutOver(CutoverReason::Converged)
        } else if rounds >= self.max_rounds {
            Decision::CutOver(CutoverReason::MaxRounds)
        } else if self.not_shrinking >= NOT_SHRINKING_CHECKS {
            Decision::CutOver(CutoverReason::NotShrinking)
        } else {
            Decision::Iterate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 MiB/s: 25,600 pages a second, so 300 ms is 7,680 pages.
    const RATE: f64 = 104_857_600.0;

    /// Feeds `dirty` checks in order; returns the decision and the round it came at.
    fn run(convergence: &mut Convergence, dirty: &[u64]) -> (Decision, u32) {
        for (i, &pages) in dirty.iter().enumerate() {
            let rounds = i as u32 + 1;
            let decision = convergence.decide(pages, RATE, rounds);
            if decision != Decision::Iterate {
                return (decision, rounds);
            }
        }
        (Decision::Iterate, dirty.len() as u32)
    }

    #[test]
    fn a_shrinking_dirty_set_converges_when_it_fits_the_limit() {
        let mut c = Convergence::new(Duration::from_millis(300), 30);
        let (decision, round) = run(&mut c, &[60_000, 30_000, 12_000, 7_000, 100]);
        assert_eq!(decision, Decision::CutOver(CutoverReason::Converged));
        assert_eq!(round, 4);
    }

    #[test]
    fn a_dirty_set_that_stops_shrinking_cuts_over_after_two_checks() {
        let mut c = Convergence::new(Duration::from_millis(300), 30);
        // Shrinks, then levels off at the writable working set.
        let (decision, round) = run(&mut c, &[60_000, 40_000, 40_000, 41_000, 10]);
        assert_eq!(decision, Decision::CutOver(CutoverReason::NotShrinking));
        assert_eq!(round, 4);
        // One flat check followed by shrinking again does not stop it.
        let mut c = Convergence::new(Duration::from_millis(300), 30);
        let (decision, round) = run(&mut c, &[60_000, 60_000, 30_000, 30_000, 5_000]);
        assert_eq!(decision, Decision::CutOver(CutoverReason::Converged));
        assert_eq!(round, 5);
    }

    #[test]
    fn the_round_limit_cuts_over() {
        let mut c = Convergence::new(Duration::from_millis(300), 3);
        let (decision, round) = run(&mut c, &[90_000, 80_000, 70_000, 60_000]);
        assert_eq!(decision, Decision::CutOver(CutoverReason::MaxRounds));
        assert_eq!(round, 3);
    }

    #[test]
    fn the_limit_is_inclusive_and_a_dead_link_never_converges() {
        let mut c = Convergence::new(Duration::from_millis(300), 30);
        assert_eq!(
            c.decide(7_680, RATE, 1),
            Decision::CutOver(CutoverReason::Converged)
        );
        let mut c = Convergence::new(Duration::from_millis(300), 30);
        // A measured rate of zero counts as one byte a second: nothing but an empty set fits.
        assert_eq!(c.decide(1, 0.0, 1), Decision::Iterate);
        assert_eq!(
            c.decide(0, 0.0, 2),
            Decision::CutOver(CutoverReason::Converged)
        );
    }
}
