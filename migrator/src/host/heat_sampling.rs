//! How the daemon's shared profilers sample: the epoch and the fraction of frames each epoch
//! re-arms (`migrator serve --heat-epoch --heat-sample-fraction`).
//!
//! They are the daemon's, not each call's, for the reason DAMON's monitoring attributes are
//! the monitor's (`damo start --sample --aggr`) and not each reader's: one profiler serves
//! every client of a partition at once, so two clients asking for different fractions could
//! not both have theirs.

use std::time::Duration;

use thiserror::Error;

/// Default length of the shared profiler's epochs, and so of the least window a client can ask
/// for (a window is whole epochs).
///
/// Chosen with [`SAMPLE_FRACTION`] from `cargo xtask bench heat` (docs/BENCHMARKS.md): no
/// sampling measured meets recall ≥ 95% in 2 s at ≤ 1% slowdown. 200 ms and 1/8 check every
/// frame once per 1.6 s, so a default 2 s window sees the whole guest once; with each check
/// weighed by how soon the frame was touched, it found a hot region at 98-100% in 2 s,
/// contiguous or scattered, for a 7-10% slowdown of a flat-out guest. 50 ms and 1/8 found both
/// at 99-100% in 0.5 s but cost 27-35%; 1/32 and 1/128 cost 3% and nothing measurable,
/// and check too few frames in 2 s to find a scattered region.
pub const EPOCH: Duration = Duration::from_millis(200);
/// Default fraction of frames re-armed per epoch (see [`EPOCH`] for why).
pub const SAMPLE_FRACTION: f64 = 0.125;
/// Default most frames, as a fraction of the guest's, that an epoch re-checks among those
/// found touched in the epoch before (`heatprobe::profiler::ProfilerConfig::recheck_fraction`):
/// none. Measured (docs/BENCHMARKS.md, "rechecks"), 1/32 found a scattered hot region at 100%
/// in 2 s instead of 48%, but each re-armed run of frames is one `madvise` and one MMU
/// notifier round in KVM, some 30 µs here, and the re-checks of a flat-out guest's scattered
/// hot frames took its slowdown from 7% to 41%.
pub const RECHECK_FRACTION: f64 = 0.0;
/// Whether a window's heat is pooled over neighbouring frames where the profile shows them
/// alike (`heatprobe::pooling`, `migrator serve --heat-pool`): not by default. Measured
/// (docs/BENCHMARKS.md, "heat per check, and pooling"), it takes a contiguous hot set with a
/// smooth popularity from 15-28% to 79-98% in 2 s, but its test cannot tell such a popularity
/// from whole regions that differ (a guest's tables, its unused memory) next to a scattered
/// hot set, and pooled, that set is found at the rate of random order (43% instead of 51%).
pub const POOL: bool = false;
/// Default most the shared profilers' re-arming may cost a guest, as a share of its time:
/// 1%, the cost DAMON's monitoring keeps to (`heatprobe::budget`).
pub const BUDGET: Option<f64> = Some(0.01);
/// Whether the shared profilers keep each running partition's heat warm in the background
/// (`migrator serve --heat-profile warm`), so that a migration plans from it with no burst of
/// profiling: not by default. Each partition's process loads its own probes, so a warm host
/// of N partitions runs N programs on every page fault it takes and holds N sets of maps
/// (2-3 MiB each), where DAMON keeps one monitor per machine; and warm heat's migrations did
/// not yet beat the burst's in hybrid (docs/BENCHMARKS.md, "Warm heat"). `on-demand`
/// profiles only while a client watches, and a migration profiles for its
/// `--profile-window` first.
pub const WARM: bool = false;
/// The shortest epoch accepted: each epoch reads the probes' counts map (about a millisecond
/// for a few tens of thousands of pages), so a shorter one would be mostly overhead.
pub const MIN_EPOCH: Duration = Duration::from_millis(10);
/// The longest epoch: at a second a default two-second window is only two epochs.
pub const MAX_EPOCH: Duration = Duration::from_secs(1);

#[derive(Debug, Error, PartialEq)]
pub enum SamplingError {
    #[error(
        "the heat epoch must be between {} ms and {} s, got {} ms",
        MIN_EPOCH.as_millis(),
        MAX_EPOCH.as_secs(),
        .0.as_millis()
    )]
    Epoch(Duration),
    #[error("the heat sample fraction must be in (0, 1], as 0.125 or 1/8, got `{0}`")]
    Fraction(String),
    #[error("the heat recheck fraction must be in [0, 1], as 0.03125 or 1/32, got `{0}`")]
    RecheckFraction(String),
    #[error(
        "the heat budget must be a share of the guest's time in (0, 1], as 1% or 0.01, or \
         `off`, got `{0}`"
    )]
    Budget(String),
}

/// The shared profilers' sampling, checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeatSampling {
    epoch: Duration,
    fraction: f64,
    recheck_fraction: f64,
    pool: bool,
    budget: Option<f64>,
    warm: bool,
}

impl Default for HeatSampling {
    fn default() -> Self {
        Self {
            epoch: EPOCH,
            fraction: SAMPLE_FRACTION,
            recheck_fraction: RECHECK_FRACTION,
            pool: POOL,
            budget: BUDGET,
            warm: WARM,
        }
    }
}

impl HeatSampling {
    /// Refuses an epoch outside [`MIN_EPOCH`]..=[`MAX_EPOCH`] or a fraction outside (0, 1].
    pub fn new(epoch: Duration, fraction: f64) -> Result<Self, SamplingError> {
        if !(MIN_EPOCH..=MAX_EPOCH).contains(&epoch) {
            return Err(SamplingError::Epoch(epoch));
        }
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(SamplingError::Fraction(fraction.to_string()));
        }
        Ok(Self {
            epoch,
            fraction,
            recheck_fraction: RECHECK_FRACTION,
            pool: POOL,
            budget: BUDGET,
            warm: WARM,
        })
    }

    /// The same sampling, its re-arming capped at `budget` of the guest's time (`None`: by
    /// the fraction alone); refuses a share outside (0, 1].
    pub fn with_budget(self, budget: Option<f64>) -> Result<Self, SamplingError> {
        if let Some(share) = budget
            && !(share > 0.0 && share <= 1.0)
        {
            return Err(SamplingError::Budget(share.to_string()));
        }
        Ok(Self { budget, ..self })
    }

    /// The most re-arming may cost a guest, as a share of its time.
    pub fn budget(&self) -> Option<f64> {
        self.budget
    }

    /// The same sampling, its windows' heat pooled over neighbouring frames (`pool`) where
    /// the profile shows them alike, or never.
    pub fn with_pool(self, pool: bool) -> Self {
        Self { pool, ..self }
    }

    /// The same sampling, keeping heat warm in the background (`warm`) or profiling only
    /// while someone watches.
    pub fn with_warm(self, warm: bool) -> Self {
        Self { warm, ..self }
    }

    /// Whether each running partition's heat is kept warm in the background.
    pub fn warm(&self) -> bool {
        self.warm
    }

    /// Whether windows pool heat over neighbouring frames (`heatprobe::pooling`).
    pub fn pool(&self) -> bool {
        self.pool
    }

    /// The same sampling with at most `recheck_fraction` of the frames re-checked each
    /// epoch; refuses one outside [0, 1].
    pub fn with_recheck(self, recheck_fraction: f64) -> Result<Self, SamplingError> {
        if !(0.0..=1.0).contains(&recheck_fraction) {
            return Err(SamplingError::RecheckFraction(recheck_fraction.to_string()));
        }
        Ok(Self {
            recheck_fraction,
            ..self
        })
    }

    pub fn recheck_fraction(&self) -> f64 {
        self.recheck_fraction
    }

    pub fn epoch(&self) -> Duration {
        self.epoch
    }

    pub fn fraction(&self) -> f64 {
        self.fraction
    }
}

/// A fraction in (0, 1] written as a decimal (`0.125`) or a ratio (`1/8`), parsed as the
/// workloads' fractions are (`migrator_guest::args::ratio`).
pub fn parse_fraction(text: &str) -> Result<f64, SamplingError> {
    match migrator_guest::args::ratio(text) {
        // NaN fails this too.
        Some(value) if value > 0.0 && value <= 1.0 => Ok(value),
        _ => Err(SamplingError::Fraction(text.to_string())),
    }
}

/// A recheck fraction: as [`parse_fraction`], 0 included.
pub fn parse_recheck_fraction(text: &str) -> Result<f64, SamplingError> {
    match migrator_guest::args::ratio(text) {
        Some(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(SamplingError::RecheckFraction(text.to_string())),
    }
}

/// A heat budget: a share of the guest's time written as a percentage (`1%`), a decimal
/// (`0.01`) or a ratio (`1/100`), in (0, 1]; `off` (no cap) is `None`.
pub fn parse_budget(text: &str) -> Result<Option<f64>, SamplingError> {
    if text == "off" {
        return Ok(None);
    }
    let share = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().ok().map(|p| p / 100.0),
        None => migrator_guest::args::ratio(text),
    };
    match share {
        Some(share) if share > 0.0 && share <= 1.0 => Ok(Some(share)),
        _ => Err(SamplingError::Budget(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_decimals_or_ratios_in_zero_to_one() {
        assert_eq!(parse_fraction("0.125"), Ok(0.125));
        assert_eq!(parse_fraction("1/8"), Ok(0.125));
        assert_eq!(parse_fraction(" 1 / 64 "), Ok(1.0 / 64.0));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        for bad in [
            "0", "0/5", "3/2", "1/0", "-1/4", "x", "", "nan", "inf", "1/nan",
        ] {
            let error = parse_fraction(bad).expect_err(bad);
            assert!(error.to_string().contains("(0, 1]"), "{bad}: {error}");
        }
    }

    #[test]
    fn pooling_is_off_unless_asked_for_and_survives_the_other_settings() {
        assert!(!HeatSampling::default().pool());
        let sampling = HeatSampling::new(EPOCH, 0.25)
            .and_then(|s| s.with_pool(true).with_recheck(0.5))
            .expect("valid");
        assert!(sampling.pool());
        assert!(!sampling.with_pool(false).pool());
    }

    #[test]
    fn epochs_and_fractions_out_of_range_are_refused() {
        assert!(HeatSampling::new(Duration::from_millis(50), 0.5).is_ok());
        assert!(HeatSampling::new(MIN_EPOCH, 1.0).is_ok());
        assert!(HeatSampling::new(MAX_EPOCH, 0.01).is_ok());
        for epoch in [
            Duration::ZERO,
            Duration::from_millis(9),
            Duration::from_millis(1001),
        ] {
            let error = HeatSampling::new(epoch, 0.5).expect_err("a bad epoch");
            assert!(
                error.to_string().contains("between 10 ms and 1 s"),
                "{error}"
            );
        }
        for fraction in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(
                HeatSampling::new(EPOCH, fraction).is_err(),
                "{fraction} accepted"
            );
        }
        assert_eq!(HeatSampling::default().epoch(), EPOCH);
        assert_eq!(HeatSampling::default().fraction(), SAMPLE_FRACTION);
        assert_eq!(HeatSampling::default().recheck_fraction(), RECHECK_FRACTION);
    }

    #[test]
    fn recheck_fractions_are_zero_to_one() {
        assert_eq!(parse_recheck_fraction("0"), Ok(0.0));
        assert_eq!(parse_recheck_fraction("1/32"), Ok(1.0 / 32.0));
        for bad in ["-1/4", "3/2", "x", "", "nan", "1/0"] {
            let error = parse_recheck_fraction(bad).expect_err(bad);
            assert!(error.to_string().contains("[0, 1]"), "{bad}: {error}");
        }
        let sampling = HeatSampling::default();
        assert_eq!(sampling.with_recheck(0.0).unwrap().recheck_fraction(), 0.0);
        for bad in [-0.1, 1.1, f64::NAN] {
            assert!(sampling.with_recheck(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_budget_is_a_share_in_percent_decimal_or_ratio_or_off() {
        assert_eq!(parse_budget("1%"), Ok(Some(0.01)));
        assert_eq!(parse_budget("0.5"), Ok(Some(0.5)));
        assert_eq!(parse_budget("1/100"), Ok(Some(0.01)));
        assert_eq!(parse_budget("off"), Ok(None));
        for bad in ["0", "0%", "101%", "-1%", "1.5", "NaN", "", "%", "lots"] {
            assert_eq!(
                parse_budget(bad),
                Err(SamplingError::Budget(bad.to_string())),
                "{bad}"
            );
        }
    }
}
