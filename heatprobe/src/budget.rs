//! What active sampling may cost its target: a share of its vCPUs' time, spent epoch by epoch.
//!
//! Every frame the sampler re-arms costs the target a fault the next time it touches the
//! frame, and nothing if it does not. So the cost of an epoch is measured, not assumed: the
//! faults counted in it, times what one fault costs the target (`fault_cost`, a property of
//! the host: `docs/BENCHMARKS.md` has how it was measured here). A token bucket holds the
//! target's time the sampler may still spend: each epoch adds `share` of the epoch on every
//! vCPU, each fault takes `fault_cost`, and the bucket holds at most two epochs' worth, so a
//! quiet spell never buys a burst. The next epoch re-arms as many frames as the bucket pays
//! for at the touch rate seen so far (faults per frame re-armed), and none while the bucket
//! is in debt. Over any run the spend stays within the budget plus one epoch's faults.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum BudgetError {
    #[error("the sampling budget must be a share of the guest's time in (0, 1], got {0}")]
    Share(f64),
    #[error("the cost of one fault must be between 1 ns and 1 ms, got {0:?}")]
    FaultCost(Duration),
    #[error("a budget needs at least one vCPU")]
    NoVcpus,
}

/// The most active sampling may cost its target.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Share of the target's vCPU time, in (0, 1].
    share: f64,
    /// What one fault costs the target.
    fault_cost: Duration,
    /// The target's vCPUs: the time it has is the epoch on each.
    vcpus: u32,
}

impl Budget {
    pub fn new(share: f64, fault_cost: Duration, vcpus: u32) -> Result<Self, BudgetError> {
        if !(share > 0.0 && share <= 1.0) {
            return Err(BudgetError::Share(share));
        }
        if fault_cost < Duration::from_nanos(1) || fault_cost > Duration::from_millis(1) {
            return Err(BudgetError::FaultCost(fault_cost));
        }
        if vcpus == 0 {
            return Err(BudgetError::NoVcpus);
        }
        Ok(Self {
            share,
            fault_cost,
            vcpus,
        })
    }

    pub fn share(&self) -> f64 {
        self.share
    }

    pub fn fault_cost(&self) -> Duration {
        self.fault_cost
    }

    /// The target's time one epoch adds to the bucket, in ns.
    fn allowance_ns(&self, epoch: Duration) -> f64 {
        self.share * epoch.as_nanos() as f64 * f64::from(self.vcpus)
    }
}

/// What a budgeted profile spent, as reports show it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// The budget, as a share of the target's time.
    pub budget_share: f64,
    /// Faults counted over the profile.
    pub faults: u64,
    /// Those faults times the cost of one, in ms of the target's time (no epoch charged more
    /// than its own length on every vCPU).
    pub estimated_ms: f64,
    /// That time as a share of the target's time over the profile (its vCPUs' together).
    pub share: f64,
    /// Frames re-armed over the profile.
    pub frames_armed: u64,
    /// The share of the budget the sampler spends now: 1, or less while a continuous
    /// profile's sweeps agree ([`crate::pace`]).
    #[serde(default = "whole_budget")]
    pub pace: f64,
    /// How far the cores of a paced profile's last two sweeps agreed (Jaccard index), which
    /// set its pace ([`crate::pace`]); `None` before its third sweep ended, or unpaced.
    #[serde(default)]
    pub sweep_agreement: Option<f64>,
}

fn whole_budget() -> f64 {
    1.0
}

impl Default for Spent {
    /// Nothing spent, at the whole budget's pace.
    fn default() -> Self {
        Self {
            budget_share: 0.0,
            faults: 0,
            estimated_ms: 0.0,
            share: 0.0,
            frames_armed: 0,
            pace: whole_budget(),
            sweep_agreement: None,
        }
    }
}

/// A budget being spent.
#[derive(Clone, Debug)]
pub struct Spend {
    budget: Budget,
    /// The target's time the sampler may still spend, in ns; negative while in debt.
    bucket_ns: f64,
    /// Faults per frame re-armed, smoothed over epochs; 1 (every frame faults) to start.
    touch_rate: f64,
    faults: u64,
    frames_armed: u64,
    /// The target's time over the recorded epochs (every vCPU), in ns.
    target_ns: f64,
    /// What the faults cost, in ns: each epoch's at most the epoch on every vCPU.
    spent_ns: f64,
    /// The share of the budget each epoch adds to the bucket ([`Self::set_pace`]).
    pace: f64,
}

/// The least touch rate the next epoch is planned with: a target that touched nothing lately
/// may touch everything next, so a quiet spell never lets every frame be re-armed at once.
const LEAST_TOUCH_RATE: f64 = 0.05;

impl Spend {
    /// A budget at its start: one epoch's worth in the bucket.
    pub fn new(budget: Budget, epoch: Duration) -> Self {
        Self {
            budget,
            bucket_ns: budget.allowance_ns(epoch),
            touch_rate: 1.0,
            faults: 0,
            frames_armed: 0,
            target_ns: 0.0,
            spent_ns: 0.0,
            pace: 1.0,
        }
    }

    /// From the next epoch on, adds only `pace` of the budget's allowance to the bucket, in
    /// (0, 1]: a profile with nothing new to learn spends less ([`crate::pace`]).
    pub fn set_pace(&mut self, pace: f64) {
        if pace > 0.0 && pace <= 1.0 {
            self.pace = pace;
        }
    }

    /// Records an epoch of length `epoch` that began with `armed` frames re-armed and counted
    /// `faults`.
    pub fn record(&mut self, epoch: Duration, armed: u64, faults: u64) {
        let allowance = self.budget.allowance_ns(epoch) * self.pace;
        // A vCPU cannot lose more than the epoch: a fault cheaper than the price (a write to
        // a page the dirty log protects costs less than a dropped mapping's) is not charged
        // past it.
        let time_ns = epoch.as_nanos() as f64 * f64::from(self.budget.vcpus);
        let cost = (faults as f64 * self.budget.fault_cost.as_nanos() as f64).min(time_ns);
        self.spent_ns += cost;
        self.bucket_ns = (self.bucket_ns + allowance - cost).min(2.0 * allowance);
        if armed > 0 {
            let seen = faults as f64 / armed as f64;
            self.touch_rate = 0.5 * self.touch_rate + 0.5 * seen;
        }
        self.faults += faults;
        self.frames_armed += armed;
        self.target_ns += time_ns;
    }

    /// How many frames the next epoch may re-arm, at most `most`: none while the bucket is in
    /// debt.
    pub fn frames_to_arm(&self, most: u64) -> u64 {
        if self.bucket_ns <= 0.0 {
            return 0;
        }
        let per_frame =
            self.budget.fault_cost.as_nanos() as f64 * self.touch_rate.max(LEAST_TOUCH_RATE);
        ((self.bucket_ns / per_frame).floor() as u64).min(most)
    }

    /// Whether the faults so far cost all that a profile of `window` may spend.
    pub fn exhausted(&self, window: Duration) -> bool {
        self.spent_ns >= self.budget.allowance_ns(window)
    }

    pub fn spent(&self) -> Spent {
        let estimated_ns = self.spent_ns;
        Spent {
            budget_share: self.budget.share,
            faults: self.faults,
            estimated_ms: estimated_ns / 1e6,
            share: if self.target_ns > 0.0 {
                estimated_ns / self.target_ns
            } else {
                0.0
            },
            frames_armed: self.frames_armed,
            pace: self.pace,
            sweep_agreement: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: Duration = Duration::from_millis(200);
    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_budget_is_checked() {
        assert_eq!(Budget::new(0.0, US, 1), Err(BudgetError::Share(0.0)));
        assert_eq!(Budget::new(1.5, US, 1), Err(BudgetError::Share(1.5)));
        assert!(matches!(
            Budget::new(f64::NAN, US, 1),
            Err(BudgetError::Share(_))
        ));
        assert_eq!(
            Budget::new(0.01, Duration::ZERO, 1),
            Err(BudgetError::FaultCost(Duration::ZERO))
        );
        assert_eq!(Budget::new(0.01, US, 0), Err(BudgetError::NoVcpus));
        assert!(Budget::new(0.01, US, 2).is_ok());
    }

    /// A target that touches a share `touched` of what is re-armed, with `frames` frames, run
    /// for `epochs`: what it spent.
    fn run(budget: Budget, frames: u64, touched: f64, epochs: u32) -> Spent {
        let mut spend = Spend::new(budget, EPOCH);
        let mut armed = 0;
        for _ in 0..epochs {
            let faults = (armed as f64 * touched).round() as u64;
            spend.record(EPOCH, armed, faults);
            armed = spend.frames_to_arm(frames);
        }
        spend.spent()
    }

    #[test]
    fn the_spend_stays_within_the_budget_whatever_the_touch_rate() {
        let budget = Budget::new(0.01, Duration::from_micros(8), 1).unwrap();
        for touched in [0.0, 0.01, 0.1, 0.5, 1.0] {
            let spent = run(budget, 131_072, touched, 300);
            assert!(spent.share <= 0.0101, "{touched}: {spent:?}");
            if touched >= 0.1 {
                // And it spends most of it: the budget is what buys heat.
                assert!(spent.share >= 0.008, "{touched}: {spent:?}");
            }
        }
    }

    #[test]
    fn more_vcpus_and_cheaper_faults_buy_more_frames() {
        let one = run(
            Budget::new(0.01, Duration::from_micros(8), 1).unwrap(),
            1 << 20,
            0.5,
            50,
        );
        let two = run(
            Budget::new(0.01, Duration::from_micros(8), 2).unwrap(),
            1 << 20,
            0.5,
            50,
        );
        let cheap = run(
            Budget::new(0.01, Duration::from_micros(2), 1).unwrap(),
            1 << 20,
            0.5,
            50,
        );
        assert!(
            two.frames_armed > one.frames_armed * 19 / 10,
            "{one:?} {two:?}"
        );
        assert!(
            cheap.frames_armed > one.frames_armed * 38 / 10,
            "{one:?} {cheap:?}"
        );
    }

    #[test]
    fn a_burst_of_faults_is_paid_off_before_more_frames_are_armed() {
        let budget = Budget::new(0.01, Duration::from_micros(8), 1).unwrap();
        let mut spend = Spend::new(budget, EPOCH);
        // One epoch's allowance is 2 ms: 250 faults. 10,000 faults are 40 epochs of it.
        spend.record(EPOCH, 10_000, 10_000);
        let mut idle = 0;
        while spend.frames_to_arm(u64::MAX) == 0 {
            spend.record(EPOCH, 0, 0);
            idle += 1;
        }
        assert!((38..=40).contains(&idle), "{idle}");
    }

    #[test]
    fn a_window_is_exhausted_once_its_share_is_spent() {
        let budget = Budget::new(0.01, Duration::from_micros(20), 1).unwrap();
        let window = Duration::from_secs(2);
        let mut spend = Spend::new(budget, EPOCH);
        // 2 s at 1% is 20 ms: 1,000 faults at 20 µs.
        spend.record(EPOCH, 0, 999);
        assert!(!spend.exhausted(window));
        spend.record(EPOCH, 0, 1);
        assert!(spend.exhausted(window));
    }

    #[test]
    fn an_epoch_costs_at_most_its_own_time() {
        let budget = Budget::new(0.01, Duration::from_micros(20), 2).unwrap();
        let mut spend = Spend::new(budget, EPOCH);
        // 100,000 faults at 20 µs would be 2 s; the epoch on two vCPUs is 400 ms.
        spend.record(EPOCH, 0, 100_000);
        assert_eq!(spend.spent().estimated_ms, 400.0);
        assert_eq!(spend.spent().share, 1.0);
    }

    #[test]
    fn a_slower_pace_spends_that_share_of_the_budget() {
        let budget = Budget::new(0.01, Duration::from_micros(8), 1).unwrap();
        let mut spend = Spend::new(budget, EPOCH);
        spend.set_pace(0.25);
        let mut armed = 0;
        for _ in 0..300 {
            spend.record(EPOCH, armed, armed / 2);
            armed = spend.frames_to_arm(131_072);
        }
        let spent = spend.spent();
        assert!(
            (0.0020..=0.0026).contains(&spent.share),
            "a quarter of 1%: {spent:?}"
        );
        assert_eq!(spent.pace, 0.25);
        // Out of range is ignored: the pace stays.
        spend.set_pace(0.0);
        spend.set_pace(1.5);
        assert_eq!(spend.spent().pace, 0.25);
    }

    #[test]
    fn the_frames_armed_never_exceed_what_is_asked() {
        let budget = Budget::new(1.0, Duration::from_nanos(1), 4).unwrap();
        let spend = Spend::new(budget, EPOCH);
        assert_eq!(spend.frames_to_arm(100), 100);
    }
}
