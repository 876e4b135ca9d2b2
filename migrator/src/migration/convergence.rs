//! When pre-copy stops iterating, and what it does when rounds stop shrinking: a pure decision
//! over what each round's dirty-log check found, so it can be tested on synthetic sequences.
//!
//! The downtime limit is a promise. With [`Converge::Throttle`] (pre-copy's default) a round
//! whose dirty pages come back at more than half of what it sent, as QEMU's auto-converge
//! counts it, slows the guest down, until what is left fits the limit; if the round limit or
//! the timeout comes first, the [`TimeoutStrategy`] says whether to cancel (the guest runs on
//! at the source) or to cut over anyway.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vmm::{memory::PAGE_SIZE, throttle::MAX_PCT};

/// What pre-copy does when its rounds stop shrinking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Converge {
    /// Slow the guest's vCPUs until the dirty rate fits the link (pre-copy's default).
    Throttle,
    /// Switch to post-copy: cut over and fetch the rest on demand (hybrid's default; hybrid
    /// mode only).
    Postcopy,
    /// Cut over anyway, and report whether the limit held.
    None,
}

/// What a migration does when its round limit or its timeout is reached before it converged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutStrategy {
    /// Give up: the partition runs on at the source, as before (Cloud Hypervisor's default).
    #[default]
    Cancel,
    /// Cut over now, whatever the downtime (hybrid: switch to post-copy).
    Force,
}

/// Why the iteration stopped and execution moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutoverReason {
    /// What is left fits the downtime limit at the measured rate.
    Converged,
    /// The dirty set stopped shrinking (`--converge none` or `postcopy`); in hybrid, or
    /// shrinks too slowly to fit the limit within [`MOST_PROJECTED_ROUNDS`] more rounds.
    NotShrinking,
    /// The round limit was reached (`--converge none` or `postcopy`, or `--timeout-strategy
    /// force`).
    MaxRounds,
    /// The timeout was reached with `--timeout-strategy force`.
    Timeout,
    /// Hybrid: the operator switched to post-copy (`migrator postcopy`).
    Requested,
    /// Hybrid: a round came back almost whole (the guest dirties pages faster than the link
    /// carries them), so no round can shrink the set: post-copy at once instead of sending
    /// memory again round after round.
    Saturated,
}

/// Why a migration gave up before cutting over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GiveUp {
    MaxRounds,
    Timeout,
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MaxRounds => "the round limit was reached",
            Self::Timeout => "the timeout was reached",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send another round (at the throttle in force).
    Iterate,
    /// Set the guest's throttle to this percentage, then send another round.
    Throttle(u8),
    CutOver(CutoverReason),
    /// Stop and leave the partition running at the source.
    Cancel(GiveUp),
}

/// What decides the iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub downtime_limit: Duration,
    pub max_rounds: u32,
    pub converge: Converge,
    pub timeout: Option<Duration>,
    pub timeout_strategy: TimeoutStrategy,
    /// The part of the downtime that does not depend on the pages left: pausing, the state,
    /// the commit's round trip, restoring. Subtracted from the limit before pages are fitted
    /// into it.
    pub fixed_cost: Duration,
}

/// What one dirty-log check found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Check {
    /// Pages left to send.
    pub pages: u64,
    /// Bytes written but not yet taken by the destination (socket buffers, the link's queue):
    /// the cutover waits for them too.
    pub queued: u64,
    /// Pages the round just ended sent, counting those it held back for the last round.
    pub sent: u64,
    /// The last measured link rate, bytes per second.
    pub rate: f64,
    /// Rounds sent so far.
    pub rounds: u32,
    /// Time since the migration started.
    pub elapsed: Duration,
}

/// Auto-converge's trigger: a round whose dirty pages are more than this share of what it
/// sent (QEMU's throttle-trigger-threshold, 50%).
const HIGH_RATIO: f64 = 0.5;
/// Above this share almost everything sent came back dirty: the round saturated, and its
/// count no longer says how fast the guest writes.
const SATURATED_RATIO: f64 = 0.9;
/// Hybrid: a round that came back with this share of what it sent dirty again has not
/// shrunk the set at all; post-copy takes over at once.
const ALMOST_WHOLE_RATIO: f64 = 0.95;
/// Hybrid: the most rounds pre-copy may still need to fit the limit, projected from how much
/// the last round shrank the set, before post-copy takes over. Each round re-sends the set;
/// shrinking by a factor `q` a round, rounds re-send about `q / (1 - q)` times the set before
/// it fits, where post-copy would send it once. Shrinking a little round after round, 19 of
/// 57 hybrid runs (every order's) re-sent 2-9 times what the same order's converged runs did
/// (docs/BENCHMARKS.md, "Hybrid holds back hot writes, within the pause's room").
pub const MOST_PROJECTED_ROUNDS: f64 = 4.0;
/// The first throttle and the least step (QEMU's cpu-throttle-initial and -increment).
const INITIAL_PCT: u8 = 20;
const INCREMENT_PCT: u8 = 10;
/// How many checks in a row the dirty set may fail to shrink before `none` gives up.
const NOT_SHRINKING_CHECKS: u32 = 2;
/// High checks before the first throttle (QEMU's dirty_rate_high_cnt); once throttling, each
/// high check steps.
const HIGH_CHECKS: u32 = 2;

/// The state of the decision across rounds.
#[derive(Clone, Debug)]
pub struct Convergence {
    policy: Policy,
    previous: Option<u64>,
    not_shrinking: u32,
    high: u32,
    throttle: u8,
}

impl Convergence {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            previous: None,
            not_shrinking: 0,
            high: 0,
            throttle: 0,
        }
    }

    /// The time `pages` pages and `queued` bytes take at `rate` bytes per second. The cutover
    /// waits for the queued bytes before it pauses; they stand for the pages the guest
    /// dirties meanwhile, so they count up to as many bytes as the pages left, no more: a
    /// guest that dirtied nothing since the last check dirties nothing while they drain.
    /// (Counted whole, a megabyte queued behind a round of zero pages, whose rate measures
    /// the sender rather than the link, once kept an empty set from ever fitting 300 ms.)
    pub fn transfer_time(pages: u64, queued: u64, rate: f64) -> Duration {
        let left = pages.saturating_mul(PAGE_SIZE);
        let in_flight = queued.min(left);
        Duration::from_secs_f64(left.saturating_add(in_flight) as f64 / rate.max(1.0))
    }

    /// The downtime a cutover with `pages` left, behind `queued` bytes still on their way,
    /// would take: their transfer and the fixed cost.
    pub fn expected_downtime(&self, pages: u64, queued: u64, rate: f64) -> Duration {
        Self::transfer_time(pages, queued, rate) + self.policy.fixed_cost
    }

    /// The throttle in force, in percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The downtime limit from now on (an operator changed it while the migration runs).
    pub fn set_downtime_limit(&mut self, limit: Duration) {
        self.policy.downtime_limit = limit;
    }

    /// How many more rounds of the set shrinking as the last one did until what is left fits
    /// the limit; infinite where it does not shrink. From the second check on: the first
    /// follows round 0, which sent all of memory over a longer time.
    fn projected_rounds(&self, check: &Check) -> f64 {
        let room = pages_within(
            self.policy.downtime_limit,
            self.policy.fixed_cost,
            check.rate,
        );
        let pages = check.pages as f64;
        if pages <= room {
            return 0.0;
        }
        let shrink = pages / check.sent.max(1) as f64;
        if shrink >= 1.0 || room < 1.0 {
            return f64::INFINITY;
        }
        (room / pages).ln() / shrink.ln()
    }

    /// After a check: iterate (perhaps slower), cut over, or give up.
    pub fn decide(&mut self, check: Check) -> Decision {
        let policy = self.policy;
        self.not_shrinking = match self.previous {
            Some(previous) if check.pages >= previous => self.not_shrinking + 1,
            _ => 0,
        };
        self.previous = Some(check.pages);
        // Nothing left to send: no round can make the pause shorter than its fixed cost, even
        // where that alone is over the limit (the report says the limit was not met).
        if self.expected_downtime(check.pages, check.queued, check.rate) <= policy.downtime_limit
            || (check.pages == 0 && check.queued == 0)
        {
            return Decision::CutOver(CutoverReason::Converged);
        }
        // Without throttling there is nothing to wait for once the limit is out of reach: the
        // round limit cuts over as before.
        let gives_up = |reason: GiveUp, cut: CutoverReason| match (policy.converge, reason) {
            (Converge::Throttle, _) | (_, GiveUp::Timeout) => match policy.timeout_strategy {
                TimeoutStrategy::Cancel => Decision::Cancel(reason),
                TimeoutStrategy::Force => Decision::CutOver(cut),
            },
            _ => Decision::CutOver(cut),
        };
        if policy.timeout.is_some_and(|t| check.elapsed >= t) {
            return gives_up(GiveUp::Timeout, CutoverReason::Timeout);
        }
        if check.rounds >= policy.max_rounds {
            return gives_up(GiveUp::MaxRounds, CutoverReason::MaxRounds);
        }
        match policy.converge {
            Converge::Postcopy
                if check.pages as f64 >= ALMOST_WHOLE_RATIO * check.sent.max(1) as f64 =>
            {
                Decision::CutOver(CutoverReason::Saturated)
            }
            Converge::Postcopy
                if check.rounds >= 2 && self.projected_rounds(&check) > MOST_PROJECTED_ROUNDS =>
            {
                Decision::CutOver(CutoverReason::NotShrinking)
            }
            Converge::None | Converge::Postcopy => {
                if self.not_shrinking >= NOT_SHRINKING_CHECKS {
                    Decision::CutOver(CutoverReason::NotShrinking)
                } else {
                    Decision::Iterate
                }
            }
            Converge::Throttle => {
                let ratio = check.pages as f64 / check.sent.max(1) as f64;
                if ratio <= HIGH_RATIO {
                    return Decision::Iterate;
                }
                self.high += 1;
                if (self.throttle == 0 && self.high < HIGH_CHECKS) || self.throttle >= MAX_PCT {
                    return Decision::Iterate;
                }
                self.throttle = next_throttle(self.throttle, ratio);
                Decision::Throttle(self.throttle)
            }
        }
    }
}

/// How many pages fit a pause of `limit`, less its fixed cost `fixed`, at `rate` bytes a
/// second: the set a cutover can send, and the room hybrid's held-back hot writes share.
pub fn pages_within(limit: Duration, fixed: Duration, rate: f64) -> f64 {
    limit.saturating_sub(fixed).as_secs_f64() * rate / PAGE_SIZE as f64
}

/// The throttle after a round that came back `ratio` dirty at `current` percent.
///
/// If the guest's dirtying scales with the time it runs, the speed that brings the ratio down
/// to [`HIGH_RATIO`] is `speed * HIGH_RATIO / ratio` (the step QEMU's cpu-throttle-tailslow
/// sizes from the same ratio). A saturated round says only that the guest writes much faster
/// than that, so the speed is quartered. Every step is at least [`INCREMENT_PCT`], the first
/// at least [`INITIAL_PCT`], and none beyond [`MAX_PCT`].
pub fn next_throttle(current: u8, ratio: f64) -> u8 {
    let speed = f64::from(100 - current.min(100)) / 100.0;
    let factor = if ratio >= SATURATED_RATIO {
        0.25
    } else {
        HIGH_RATIO / ratio.max(HIGH_RATIO)
    };
    let sized = (100.0 * (1.0 - speed * factor)).ceil().clamp(0.0, 100.0) as u8;
    sized
        .max(current.saturating_add(INCREMENT_PCT))
        .clamp(INITIAL_PCT, MAX_PCT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 MiB/s: 25,600 pages a second, so 300 ms is 7,680 pages.
    const RATE: f64 = 104_857_600.0;

    fn policy(converge: Converge) -> Policy {
        Policy {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            converge,
            timeout: None,
            timeout_strategy: TimeoutStrategy::Cancel,
            fixed_cost: Duration::ZERO,
        }
    }

    fn check(pages: u64, sent: u64, rounds: u32) -> Check {
        Check {
            pages,
            queued: 0,
            sent,
            rate: RATE,
            rounds,
            elapsed: Duration::from_secs(u64::from(rounds)),
        }
    }

    /// Feeds checks of `dirty` pages, each round having sent the previous check's pages;
    /// returns every decision.
    fn run(convergence: &mut Convergence, first_sent: u64, dirty: &[u64]) -> Vec<Decision> {
        let mut sent = first_sent;
        let mut decisions = Vec::new();
        for (i, &pages) in dirty.iter().enumerate() {
            let decision = convergence.decide(check(pages, sent, i as u32 + 1));
            decisions.push(decision);
            if matches!(decision, Decision::CutOver(_) | Decision::Cancel(_)) {
                break;
            }
            sent = pages;
        }
        decisions
    }

    #[test]
    fn a_shrinking_dirty_set_converges_when_it_fits_the_limit() {
        for converge in [Converge::Throttle, Converge::None] {
            let mut c = Convergence::new(policy(converge));
            let decisions = run(&mut c, 131_072, &[60_000, 25_000, 12_000, 7_000, 100]);
            assert_eq!(
                decisions.last(),
                Some(&Decision::CutOver(CutoverReason::Converged))
            );
            assert_eq!(decisions.len(), 4, "{converge:?}");
            assert_eq!(c.throttle(), 0, "a shrinking set needs no throttle");
        }
    }

    #[test]
    fn post_copy_takes_over_at_the_first_round_that_comes_back_almost_whole() {
        // A guest that writes everywhere: every round returns what it sent.
        let mut c = Convergence::new(policy(Converge::Postcopy));
        let decisions = run(&mut c, 131_072, &[130_000, 130_000, 130_000]);
        assert_eq!(decisions, vec![Decision::CutOver(CutoverReason::Saturated)]);
        // One that comes back much smaller goes on: shrinking fast, it converges.
        let mut c = Convergence::new(policy(Converge::Postcopy));
        let decisions = run(&mut c, 131_072, &[60_000, 20_000, 100]);
        assert_eq!(
            decisions.last(),
            Some(&Decision::CutOver(CutoverReason::Converged))
        );
        // Pre-copy without throttling keeps its two flat checks: it has no post-copy to go to.
        let mut c = Convergence::new(policy(Converge::None));
        let decisions = run(&mut c, 131_072, &[130_000, 130_000, 130_000]);
        assert_eq!(decisions[0], Decision::Iterate);
    }

    #[test]
    fn post_copy_takes_over_when_the_rounds_shrink_too_slowly_to_fit_soon() {
        // 300 ms at 100 MiB/s is 7,680 pages. After round 0 nothing is projected (round 0
        // sent all of memory); 60,000 to 51,000 is 0.85 a round, some 12 more rounds.
        let mut c = Convergence::new(policy(Converge::Postcopy));
        let decisions = run(&mut c, 131_072, &[60_000, 51_000, 45_000]);
        assert_eq!(
            decisions,
            vec![
                Decision::Iterate,
                Decision::CutOver(CutoverReason::NotShrinking)
            ]
        );
        // Halving a round from 40,000 fits within three more rounds: it goes on.
        let mut c = Convergence::new(policy(Converge::Postcopy));
        let decisions = run(&mut c, 131_072, &[80_000, 40_000, 20_000, 7_000]);
        assert_eq!(
            decisions.last(),
            Some(&Decision::CutOver(CutoverReason::Converged))
        );
        assert_eq!(decisions.len(), 4);
        // Pre-copy without throttling has no post-copy to go to: it goes on.
        let mut c = Convergence::new(policy(Converge::None));
        let decisions = run(&mut c, 131_072, &[60_000, 51_000, 45_000]);
        assert_eq!(decisions, vec![Decision::Iterate; 3]);
    }

    #[test]
    fn none_cuts_over_when_the_dirty_set_stops_shrinking() {
        let mut c = Convergence::new(policy(Converge::None));
        let decisions = run(&mut c, 131_072, &[60_000, 40_000, 40_000, 41_000, 10]);
        assert_eq!(
            decisions.last(),
            Some(&Decision::CutOver(CutoverReason::NotShrinking))
        );
        assert_eq!(decisions.len(), 4);
        // One flat check followed by shrinking again does not stop it.
        let mut c = Convergence::new(policy(Converge::None));
        let decisions = run(&mut c, 131_072, &[60_000, 60_000, 30_000, 30_000, 5_000]);
        assert_eq!(
            decisions.last(),
            Some(&Decision::CutOver(CutoverReason::Converged))
        );
    }

    #[test]
    fn throttle_steps_up_after_two_high_rounds_and_then_every_high_round() {
        let mut c = Convergence::new(policy(Converge::Throttle));
        // 19k of 20k come back: no convergence without slowing the guest.
        let decisions = run(&mut c, 131_072, &[52_000, 31_000, 24_000, 20_000, 18_000]);
        assert_eq!(decisions[0], Decision::Iterate, "52k of 131k is not high");
        assert_eq!(
            decisions[1],
            Decision::Iterate,
            "the first high check waits"
        );
        let Decision::Throttle(first) = decisions[2] else {
            panic!("{decisions:?}");
        };
        assert!(first >= INITIAL_PCT);
        let Decision::Throttle(second) = decisions[3] else {
            panic!("{decisions:?}");
        };
        assert!(second >= first + INCREMENT_PCT);
        assert_eq!(c.throttle(), next_throttle(second, 18_000.0 / 20_000.0));
    }

    #[test]
    fn throttle_never_cuts_over_above_the_limit_and_cancels_at_the_round_limit() {
        let mut c = Convergence::new(Policy {
            max_rounds: 12,
            ..policy(Converge::Throttle)
        });
        let decisions = run(&mut c, 131_072, &[130_000; 20]);
        assert_eq!(decisions.len(), 12);
        assert_eq!(decisions.last(), Some(&Decision::Cancel(GiveUp::MaxRounds)));
        assert!(decisions.iter().all(|d| !matches!(d, Decision::CutOver(_))));
        assert_eq!(c.throttle(), MAX_PCT);
        // Force cuts over instead.
        let mut c = Convergence::new(Policy {
            max_rounds: 12,
            timeout_strategy: TimeoutStrategy::Force,
            ..policy(Converge::Throttle)
        });
        let decisions = run(&mut c, 131_072, &[130_000; 20]);
        assert_eq!(
            decisions.last(),
            Some(&Decision::CutOver(CutoverReason::MaxRounds))
        );
    }

    #[test]
    fn the_timeout_cancels_or_forces_whatever_the_policy() {
        for (strategy, want) in [
            (TimeoutStrategy::Cancel, Decision::Cancel(GiveUp::Timeout)),
            (
                TimeoutStrategy::Force,
                Decision::CutOver(CutoverReason::Timeout),
            ),
        ] {
            for converge in [Converge::Throttle, Converge::None, Converge::Postcopy] {
                let mut c = Convergence::new(Policy {
                    timeout: Some(Duration::from_secs(3)),
                    timeout_strategy: strategy,
                    ..policy(converge)
                });
                // Halving each round: hybrid's projection lets it go on, so the timeout decides.
                let decisions = run(&mut c, 131_072, &[100_000, 50_000, 25_000, 12_000]);
                assert_eq!(decisions.len(), 3, "{converge:?}");
                assert_eq!(decisions.last(), Some(&want));
            }
        }
    }

    #[test]
    fn the_limit_is_inclusive_counts_the_fixed_cost_and_a_dead_link_never_converges() {
        let mut c = Convergence::new(policy(Converge::None));
        assert_eq!(
            c.decide(check(7_680, 10_000, 1)),
            Decision::CutOver(CutoverReason::Converged)
        );
        let mut c = Convergence::new(Policy {
            fixed_cost: Duration::from_millis(100),
            ..policy(Converge::None)
        });
        assert_eq!(c.decide(check(7_680, 10_000, 1)), Decision::Iterate);
        assert_eq!(
            c.decide(check(5_120, 7_680, 2)),
            Decision::CutOver(CutoverReason::Converged)
        );
        // Bytes still queued on the way count like pages.
        let mut c = Convergence::new(policy(Converge::None));
        let queued = Check {
            queued: 4 << 20,
            ..check(7_680, 10_000, 1)
        };
        assert_eq!(c.decide(queued), Decision::Iterate);
        assert_eq!(
            c.decide(Check {
                queued: 4 << 20,
                ..check(7_680 - 1_024, 10_000, 2)
            }),
            Decision::CutOver(CutoverReason::Converged)
        );
        // Nothing left to send: what is still queued drains before the pause, and with nothing
        // dirtied nothing takes its place.
        let mut c = Convergence::new(policy(Converge::None));
        let drained = Check {
            queued: 64 << 20,
            rate: 1_000_000.0,
            ..check(0, 10_000, 1)
        };
        assert_eq!(
            c.decide(drained),
            Decision::CutOver(CutoverReason::Converged)
        );
        let mut c = Convergence::new(policy(Converge::None));
        // A measured rate of zero counts as one byte a second: nothing but an empty set fits.
        let dead = |pages| Check {
            rate: 0.0,
            ..check(pages, 1, 1)
        };
        assert_eq!(c.decide(dead(1)), Decision::Iterate);
        assert_eq!(
            c.decide(dead(0)),
            Decision::CutOver(CutoverReason::Converged)
        );
    }

    #[test]
    fn a_fixed_cost_over_the_limit_cuts_over_once_nothing_is_left() {
        // Pre-copy's digests alone take longer than the limit (a large guest): rounds cannot
        // help, and the one with nothing left to send is the shortest pause there is.
        for converge in [Converge::None, Converge::Throttle] {
            let mut c = Convergence::new(Policy {
                fixed_cost: Duration::from_millis(400),
                ..policy(converge)
            });
            assert_ne!(
                c.decide(check(10, 10_000, 1)),
                Decision::CutOver(CutoverReason::Converged)
            );
            assert_eq!(
                c.decide(check(0, 10, 2)),
                Decision::CutOver(CutoverReason::Converged),
                "{converge:?}"
            );
        }
    }

    #[test]
    fn throttle_steps_are_sized_bounded_and_monotonic() {
        assert_eq!(next_throttle(0, 0.6), INITIAL_PCT);
        // Twice too fast: half speed.
        assert_eq!(next_throttle(0, 0.8), 38);
        assert_eq!(
            next_throttle(0, 1.0),
            75,
            "saturated: a quarter of the speed"
        );
        // Barely high: the least step.
        assert_eq!(next_throttle(50, 0.55), 50 + INCREMENT_PCT);
        assert_eq!(next_throttle(95, 1.0), MAX_PCT);
        assert_eq!(next_throttle(MAX_PCT, 1.0), MAX_PCT);
        let mut pct = 0;
        for ratio in [0.51, 0.7, 0.89, 0.95, 1.2] {
            let next = next_throttle(pct, ratio);
            assert!(next > pct || next == MAX_PCT);
            pct = next;
        }
    }
}
