//! How much of its budget a continuous profile spends: all of it while its sweeps of memory
//! disagree, less once they agree, as DAMON adapts its monitoring to what it observes.
//!
//! A budgeted sampler re-arms frames a slice at a time, so it checks every frame once per
//! sweep of the memory. Checking a frame the target leaves alone costs nothing; checking one
//! it touches costs a fault. So on a target whose hot set stays put, every sweep after the
//! first pays again for the same answer. [`Pace`] compares what each sweep found with what
//! the sweeps before it found: when they agree, the next sweep spends up to half as much
//! (down to [`SLOWEST`] of the budget); when they disagree, the whole budget is back at once.
//! A sweep is never slowed past `longest`: heat is read over a window, and a sweep longer
//! than the window would leave frames in it unchecked.
//!
//! What is compared is each sweep's core: the frames it and the sweep before both found
//! touched. One sweep's touched frames will not do: every frame the target uses at all is
//! found touched now and then, each time a different few, so two sweeps over a static hot
//! region share few of them while their cores agree (79-81% on the heat bench's hot region;
//! 6-25% on smooth popularities, which a sweep ranks differently each time; docs/BENCHMARKS.md,
//! "Warm heat spends less once its sweeps agree"). Nor do the checks' weights: on a paced
//! guest, the frames found touched in every sweep weighed no more than those found once.
//!
//! A target that scans its whole memory now and then defeats this for now: whichever slices
//! were re-armed just before a scan are found touched whole, so each core carries a different
//! band of it, the cores disagree, and the profile keeps its whole budget.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

/// The least share of its budget a settled profile spends: enough for a sweep to see a hot
/// set move within a few sweeps.
pub const SLOWEST: f64 = 1.0 / 8.0;

/// Two sweeps' cores agree at this Jaccard index (the share of the frames in either that
/// are in both) and above.
pub const AGREE: f64 = 0.6;

/// Below this they disagree: the hot set moved, or the ranking is not settled.
pub const DISAGREE: f64 = 0.4;

/// A slowed sweep is meant to take at most this share of `longest`, so that timing jitter
/// does not take it past.
const FILL: f64 = 0.9;

/// The pace of a continuous profile.
#[derive(Clone, Debug)]
pub struct Pace {
    longest: Duration,
    pace: f64,
    /// The frames the last sweep found touched.
    last: Option<BTreeSet<u64>>,
    /// The last sweep's core: the frames it and the one before both found touched.
    core: Option<BTreeSet<u64>>,
    /// The frames the sweep under way has found touched.
    current: BTreeSet<u64>,
    sweep_began: Instant,
    agreement: Option<f64>,
}

impl Pace {
    /// A profile at the whole budget, its first sweep beginning `now`; no sweep is slowed
    /// past `longest`.
    pub fn new(longest: Duration, now: Instant) -> Self {
        Self {
            longest,
            pace: 1.0,
            last: None,
            core: None,
            current: BTreeSet::new(),
            sweep_began: now,
            agreement: None,
        }
    }

    /// The share of the budget the sampler spends now, in [`SLOWEST`]..=1.
    pub fn pace(&self) -> f64 {
        self.pace
    }

    /// How much the last two sweeps' cores agreed (`None` before the third sweep ended).
    pub fn agreement(&self) -> Option<f64> {
        self.agreement
    }

    /// Frames the sweep under way found touched.
    pub fn touched(&mut self, frames: impl IntoIterator<Item = u64>) {
        self.current.extend(frames);
    }

    /// Ends the sweep under way at `now` and sets the pace for the next; returns it.
    ///
    /// After a sweep whose core agrees with the last one's, the next spends as little as half
    /// as much, but no less than keeps it within `longest`: a sweep's length is about inverse
    /// to its pace, since the budget is what limits it. One that took longer than `longest`
    /// doubles the pace back.
    pub fn sweep_ended(&mut self, now: Instant) -> f64 {
        let took = now
            .saturating_duration_since(self.sweep_began)
            .as_secs_f64();
        let current = std::mem::take(&mut self.current);
        let core = self
            .last
            .as_ref()
            .map(|last| last.intersection(&current).copied().collect());
        if let (Some(before), Some(after)) = (&self.core, &core) {
            let agreement = agreement(before, after);
            self.agreement = Some(agreement);
            let longest = self.longest.as_secs_f64();
            self.pace = if agreement < DISAGREE {
                1.0
            } else if took > longest {
                (self.pace * 2.0).min(1.0)
            } else if agreement >= AGREE {
                let room = (longest * FILL / took.max(1e-3)).clamp(1.0, 2.0);
                (self.pace / room).max(SLOWEST)
            } else {
                self.pace
            };
        }
        self.last = Some(current);
        self.core = core;
        self.sweep_began = now;
        self.pace
    }
}

/// The Jaccard index of two sets of frames; two empty sets agree (nothing was touched).
pub fn agreement(a: &BTreeSet<u64>, b: &BTreeSet<u64>) -> f64 {
    let both = a.intersection(b).count();
    let either = a.len() + b.len() - both;
    if either == 0 {
        1.0
    } else {
        both as f64 / either as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGEST: Duration = Duration::from_secs(30);

    /// Runs `n` sweeps, the i-th finding `touched(i)` touched and taking `took(pace)`;
    /// returns the paces after each.
    fn sweeps(
        pace: &mut Pace,
        now: &mut Instant,
        took: impl Fn(f64) -> Duration,
        touched: impl Fn(u64) -> Vec<u64>,
        n: u64,
    ) -> Vec<f64> {
        (0..n)
            .map(|i| {
                pace.touched(touched(i));
                *now += took(pace.pace());
                pace.sweep_ended(*now)
            })
            .collect()
    }

    fn short(_: f64) -> Duration {
        Duration::from_secs(5)
    }

    /// A hot region of 100 frames found touched in every sweep, and 300 others touched by
    /// chance, different ones in each.
    fn hot_region(i: u64) -> Vec<u64> {
        (100..200).chain(1000 + 300 * i..1300 + 300 * i).collect()
    }

    #[test]
    fn a_settled_hot_set_halves_the_pace_down_to_the_slowest() {
        let mut now = Instant::now();
        let mut pace = Pace::new(LONGEST, now);
        let paces = sweeps(&mut pace, &mut now, short, hot_region, 7);
        // Two sweeps make a core, two cores a comparison.
        assert_eq!(paces, vec![1.0, 1.0, 0.5, 0.25, 0.125, 0.125, 0.125]);
        assert_eq!(pace.agreement(), Some(1.0));
    }

    #[test]
    fn a_hot_set_that_moves_brings_the_whole_budget_back_at_once() {
        let mut now = Instant::now();
        let mut pace = Pace::new(LONGEST, now);
        sweeps(&mut pace, &mut now, short, hot_region, 5);
        assert_eq!(pace.pace(), 0.125);
        // Moved: the first sweep there leaves an empty core, against the old one.
        let moved = |i: u64| (500..600).chain(5000 + 300 * i..5300 + 300 * i).collect();
        let paces = sweeps(&mut pace, &mut now, short, moved, 3);
        assert_eq!(paces, vec![1.0, 1.0, 0.5]);
    }

    #[test]
    fn cores_between_agreeing_and_not_hold_the_pace() {
        let mut now = Instant::now();
        let mut pace = Pace::new(LONGEST, now);
        sweeps(&mut pace, &mut now, short, hot_region, 3);
        assert_eq!(pace.pace(), 0.5);
        // The hot frames drift by a quarter each sweep: once the drift is in both cores, they
        // share 50 of 100 frames, between the two thresholds.
        let drifting = |i: u64| (100 + 25 * i..200 + 25 * i).collect();
        let paces = sweeps(&mut pace, &mut now, short, drifting, 5);
        assert!(
            pace.agreement()
                .is_some_and(|a| (DISAGREE..AGREE).contains(&a)),
            "{:?}",
            pace.agreement()
        );
        assert_eq!(pace.agreement(), Some(0.5));
        assert!(paces[2..].iter().all(|p| *p == paces[1]), "{paces:?}");
    }

    #[test]
    fn a_sweep_is_never_slowed_past_the_longest() {
        let mut now = Instant::now();
        let mut pace = Pace::new(LONGEST, now);
        // A sweep of 12 s at the whole budget, longer as the pace falls: halved once, then
        // slowed only to 27 s, and held there.
        let budget_bound = |pace: f64| Duration::from_secs_f64(12.0 / pace);
        let paces = sweeps(&mut pace, &mut now, budget_bound, hot_region, 6);
        let expected = 12.0 / 27.0;
        assert_eq!(paces[..3], [1.0, 1.0, 0.5]);
        assert!(
            paces[3..].iter().all(|p| (p - expected).abs() < 1e-9),
            "{paces:?}"
        );
        // A sweep that took longer than the longest doubles the pace back.
        let paces = sweeps(
            &mut pace,
            &mut now,
            |_| Duration::from_secs(31),
            hot_region,
            2,
        );
        assert!((paces[0] - 2.0 * expected).abs() < 1e-9, "{paces:?}");
        assert_eq!(paces[1], 1.0);
    }

    #[test]
    fn two_empty_sets_agree() {
        assert_eq!(agreement(&BTreeSet::new(), &BTreeSet::new()), 1.0);
        let a: BTreeSet<u64> = (0..4).collect();
        let b: BTreeSet<u64> = (2..6).collect();
        assert_eq!(agreement(&a, &b), 2.0 / 6.0);
    }
}
