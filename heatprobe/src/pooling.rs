//! Heat per check, and pooled over neighbouring frames where the profile shows neighbours
//! alike (DAMON's regions, decided by a test rather than assumed).
//!
//! An active profile checks each frame once per `1 / fraction` epochs, and a check is one
//! noisy sample of how often the guest uses the frame: within a window of a few seconds most
//! frames are checked once or twice. Two things follow.
//! - **Heat per check.** A frame checked twice gathers twice the heat of one checked once at
//!   the same rate, so a window's raw heat ranks frames partly by where the sampler's cursor
//!   stood. Dividing by the frame's checks removes that.
//! - **Pooling.** Where the guest's popularity is smooth in the address (a contiguous hot
//!   region, a popularity that falls with the address), a frame's neighbours are samples of
//!   nearly the same rate, and their mean is a far better estimate than the frame's own
//!   check. Where it is not (a hot set scattered by a hash), the neighbours say nothing and
//!   their mean would bury the frame's own signal. So pooling is a decision: the correlation
//!   between each checked frame's heat and its neighbours' mean is compared with the same
//!   correlation after the heats are shuffled among the checked frames (a permutation test),
//!   and heat is pooled only where it stands more than [`SIGNIFICANCE`] standard deviations
//!   above the shuffles'.
//!
//! What the test cannot tell: neighbours are also alike where a guest's memory holds regions
//! that differ as wholes (a table written on every operation, memory never used), and then it
//! pools a scattered hot set inside one of them too, which ranks it no better than random
//! order. Shuffling within blocks of a few MiB, which keeps such regions' levels, was tried
//! and lost the smooth popularities as well: their neighbours differ little within a block
//! either. Hence `migrator serve --heat-pool`, off by default (docs/BENCHMARKS.md).

use std::ops::Range;

/// How far above the shuffled correlations (in their standard deviations) the measured one
/// must stand for heat to be pooled. With [`SHUFFLES`] shuffles the spread is itself an
/// estimate, so this is not a Gaussian 5-sigma bound: independent frames still pass now and
/// then (about once in ten thousand windows with Gaussian heat, by simulation, and more often
/// with heat as heavy-tailed as a guest's).
pub const SIGNIFICANCE: f64 = 5.0;
/// The neighbourhoods tried, in frames either side; the one whose mean best predicts a
/// frame's own heat (left out) is kept.
pub const RADII: [u64; 3] = [8, 32, 128];
/// Shuffles in the permutation test.
pub const SHUFFLES: usize = 8;
/// Fewer checked frames than this say too little to decide.
const LEAST_FRAMES: usize = 64;

/// What [`pool`] decided.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Whether heat was pooled.
    pub pooled: bool,
    /// The neighbourhood, in frames either side, the test was made with.
    pub radius: u64,
    /// The measured correlation's distance from the shuffled ones, in their standard
    /// deviations.
    pub z: f64,
}

/// A window's heat per check, over `frames`.
struct PerCheck<'a> {
    start: u64,
    checks: &'a [u32],
    /// Heat per check, indexed from `start`; 0 where the frame was not touched.
    heat: Vec<f64>,
    /// The frames checked at least once, from `start`.
    checked: Vec<usize>,
    mean_checks: f64,
}

impl<'a> PerCheck<'a> {
    /// `None` if `checks` does not cover `frames` or nothing was checked.
    fn new(heat: &[(u64, f64)], checks: &'a [u32], frames: Range<u64>) -> Option<Self> {
        let len = usize::try_from(frames.end.checked_sub(frames.start)?).ok()?;
        let checks = checks.get(..len)?;
        let checked: Vec<usize> = (0..len).filter(|&i| checks[i] > 0).collect();
        if checked.is_empty() {
            return None;
        }
        let mut per_check = vec![0.0; len];
        for &(frame, value) in heat {
            if let Some(i) = frame.checked_sub(frames.start).map(|i| i as usize)
                && i < len
                && checks[i] > 0
                && value.is_finite()
            {
                per_check[i] = value.max(0.0) / f64::from(checks[i]);
            }
        }
        let mean_checks =
            checked.iter().map(|&i| f64::from(checks[i])).sum::<f64>() / checked.len() as f64;
        Some(Self {
            start: frames.start,
            checks,
            heat: per_check,
            checked,
            mean_checks,
        })
    }

    /// The checked frames whose `estimate` is above zero, scaled by the mean number of checks
    /// so a window's figures keep their size.
    fn listed(&self, estimate: &[f64]) -> Vec<(u64, f64)> {
        self.checked
            .iter()
            .filter(|&&i| estimate[i] > 0.0)
            .map(|&i| (self.start + i as u64, estimate[i] * self.mean_checks))
            .collect()
    }
}

/// Each touched frame of `frames` with its heat per check, scaled by the mean number of
/// checks so a window's figures keep their size. `heat` holds the touched frames' heat
/// (others have none), `checks[i]` the checks frame `frames.start + i` had; frames never
/// checked are left out. `None` if `checks` does not cover `frames` or nothing was checked.
pub fn per_check(
    heat: &[(u64, f64)],
    checks: &[u32],
    frames: Range<u64>,
) -> Option<Vec<(u64, f64)>> {
    let per_check = PerCheck::new(heat, checks, frames)?;
    Some(per_check.listed(&per_check.heat))
}

/// As [`per_check`], and pooled over the neighbourhood if the test says so: then every
/// checked frame with heat around it is listed, touched or not.
pub fn pool(
    heat: &[(u64, f64)],
    checks: &[u32],
    frames: Range<u64>,
) -> Option<(Vec<(u64, f64)>, Decision)> {
    let per_check = PerCheck::new(heat, checks, frames)?;
    let decision = decide(&per_check.heat, per_check.checks, &per_check.checked);
    let pages = if decision.pooled {
        per_check.listed(&neighbourhood_means(
            &per_check.heat,
            per_check.checks,
            decision.radius,
            true,
        ))
    } else {
        per_check.listed(&per_check.heat)
    };
    Some((pages, decision))
}

/// The permutation test, at the radius whose left-out mean predicts best.
fn decide(per_check: &[f64], checks: &[u32], checked: &[usize]) -> Decision {
    let not_pooled = |radius| Decision {
        pooled: false,
        radius,
        z: 0.0,
    };
    if checked.len() < LEAST_FRAMES {
        return not_pooled(RADII[0]);
    }
    let values: Vec<f64> = checked.iter().map(|&i| per_check[i]).collect();
    let Some((radius, means)) = best_radius(per_check, checks, checked) else {
        return not_pooled(RADII[0]);
    };
    let measured = neighbour_correlation(per_check, &means, checked);
    // The same statistic with the heats shuffled among the checked frames: what independent
    // frames with these values give.
    let mut rng = SplitMix(0x9e37_79b9_7f4a_7c15 ^ checked.len() as u64);
    let mut shuffled_heat = per_check.to_vec();
    let mut nulls = Vec::with_capacity(SHUFFLES);
    for _ in 0..SHUFFLES {
        let mut shuffled = values.clone();
        for i in (1..shuffled.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            shuffled.swap(i, j);
        }
        for (&i, &v) in checked.iter().zip(&shuffled) {
            shuffled_heat[i] = v;
        }
        let means = neighbourhood_means(&shuffled_heat, checks, radius, false);
        nulls.push(neighbour_correlation(&shuffled_heat, &means, checked));
    }
    let mean = nulls.iter().sum::<f64>() / nulls.len() as f64;
    let spread = (nulls.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (nulls.len() - 1) as f64)
        .sqrt()
        // A floor, so that shuffles that happen to agree closely cannot make any correlation
        // look significant (the statistic's own spread under shuffling is about 1.3-1.5 over
        // the square root of the frames, measured).
        .max(1.0 / (checked.len() as f64).sqrt());
    let z = (measured - mean) / spread;
    Decision {
        pooled: z.is_finite() && z >= SIGNIFICANCE,
        radius,
        z: if z.is_finite() { z } else { 0.0 },
    }
}

/// The radius of [`RADII`] whose left-out neighbourhood mean predicts the checked frames'
/// own heat with the least squared error, with those means.
fn best_radius(per_check: &[f64], checks: &[u32], checked: &[usize]) -> Option<(u64, Vec<f64>)> {
    RADII
        .iter()
        .map(|&radius| {
            let means = neighbourhood_means(per_check, checks, radius, false);
            let error: f64 = checked
                .iter()
                .map(|&i| (per_check[i] - means[i]).powi(2))
                .sum();
            (radius, means, error)
        })
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .map(|(radius, means, _)| (radius, means))
}

/// Pearson's correlation, over the checked frames, between a frame's heat and `means`, its
/// neighbours' mean (itself left out).
fn neighbour_correlation(per_check: &[f64], means: &[f64], checked: &[usize]) -> f64 {
    let n = checked.len() as f64;
    let (mut sx, mut sy) = (0.0, 0.0);
    for &i in checked {
        sx += per_check[i];
        sy += means[i];
    }
    let (mx, my) = (sx / n, sy / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for &i in checked {
        let (dx, dy) = (per_check[i] - mx, means[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return 0.0;
    }
    sxy / (sxx * syy).sqrt()
}

/// For every frame, the mean heat of the checked frames within `radius` of it, itself
/// included or not; 0 where none was checked. One pass with running sums.
fn neighbourhood_means(
    per_check: &[f64],
    checks: &[u32],
    radius: u64,
    with_self: bool,
) -> Vec<f64> {
    let len = per_check.len();
    let radius = radius as usize;
    // Prefix sums of heat and of checked frames.
    let mut heat = vec![0.0; len + 1];
    let mut count = vec![0u64; len + 1];
    for i in 0..len {
        let checked = checks[i] > 0;
        heat[i + 1] = heat[i] + if checked { per_check[i] } else { 0.0 };
        count[i + 1] = count[i] + u64::from(checked);
    }
    (0..len)
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(radius), (i + radius + 1).min(len));
            let mut sum = heat[hi] - heat[lo];
            let mut n = count[hi] - count[lo];
            if !with_self && checks[i] > 0 {
                sum -= per_check[i];
                n -= 1;
            }
            if n == 0 { 0.0 } else { sum / n as f64 }
        })
        .collect()
}

/// A small, fixed-seed generator for the shuffles: the decision must not change from one
/// call to the next on the same counts.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Noisy single samples of `rate(frame)`: a rate times a factor from a fixed sequence
    /// spread over two orders of magnitude, many of them zero (not touched within the check).
    fn samples(frames: u64, rate: impl Fn(u64) -> f64) -> Vec<(u64, f64)> {
        let mut rng = SplitMix(7);
        (0..frames)
            .filter_map(|f| {
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                let value = rate(f) * -u.ln().min(5.0) * f64::from(u8::from(u > 0.3));
                (value > 0.0).then_some((f, value))
            })
            .collect()
    }

    fn top(pages: &[(u64, f64)], n: usize) -> Vec<u64> {
        let mut sorted = pages.to_vec();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        sorted.into_iter().take(n).map(|(f, _)| f).collect()
    }

    #[test]
    fn a_smooth_popularity_is_pooled_and_ranked_by_its_neighbourhood() {
        // Popularity falls with the address; each frame has one noisy check.
        let frames = 20_000;
        let heat = samples(frames, |f| 1.0 / (1.0 + f as f64 / 200.0));
        let checks = vec![1; frames as usize];
        let (pooled, decision) = pool(&heat, &checks, 0..frames).unwrap();
        assert!(decision.pooled, "{decision:?}");
        let hot = 1000;
        let found = |pages: &[(u64, f64)]| {
            top(pages, hot * 5 / 4)
                .iter()
                .filter(|&&f| f < hot as u64)
                .count()
        };
        // Pooled, the top frames are nearly all the truly hottest; alone, far fewer.
        assert!(found(&pooled) >= hot * 95 / 100, "{}", found(&pooled));
        assert!(found(&heat) < hot * 80 / 100, "{}", found(&heat));
    }

    #[test]
    fn pooled_heat_is_per_check_first() {
        // The smooth popularity again, with the frames from 1000 to 3000 checked twice and so
        // gathering twice the heat: counted per check they stay below the hottest thousand;
        // counted as summed, they would crowd into the top.
        let frames = 20_000;
        let rate = |f: u64| 1.0 / (1.0 + f as f64 / 200.0);
        let twice = 1000..3000;
        let heat: Vec<(u64, f64)> = samples(frames, rate)
            .into_iter()
            .map(|(f, h)| (f, if twice.contains(&f) { 2.0 * h } else { h }))
            .collect();
        let checks: Vec<u32> = (0..frames)
            .map(|f| if twice.contains(&f) { 2 } else { 1 })
            .collect();
        let (pooled, decision) = pool(&heat, &checks, 0..frames).unwrap();
        assert!(decision.pooled, "{decision:?}");
        let hot = 1000;
        let found = top(&pooled, hot * 5 / 4)
            .iter()
            .filter(|&&f| f < hot as u64)
            .count();
        assert!(found >= hot * 95 / 100, "{found}");
        // And the frames keep their numbers when the range does not start at 0.
        let shifted: Vec<(u64, f64)> = heat.iter().map(|&(f, h)| (f + 5000, h)).collect();
        let (moved, _) = pool(&shifted, &checks, 5000..5000 + frames).unwrap();
        let back: Vec<(u64, f64)> = moved.iter().map(|&(f, h)| (f - 5000, h)).collect();
        assert_eq!(back, pooled);
    }

    #[test]
    fn a_scattered_hot_set_is_not_pooled_and_keeps_its_order() {
        // One frame in 64, picked by a hash, is hot; the rest are cold.
        let frames = 20_000;
        let hot = |f: u64| SplitMix(f).next().is_multiple_of(64);
        let heat = samples(frames, |f| if hot(f) { 100.0 } else { 1.0 });
        let checks = vec![1; frames as usize];
        let (kept, decision) = pool(&heat, &checks, 0..frames).unwrap();
        assert!(!decision.pooled, "{decision:?}");
        assert!(decision.z < SIGNIFICANCE);
        assert_eq!(kept, heat, "one check each: heat per check is the heat");
    }

    #[test]
    fn heat_is_per_check_and_unchecked_frames_are_left_out() {
        // Frame 1 was checked twice and gathered twice frame 0's heat: the same rate.
        let heat = [(0, 2.0), (1, 4.0), (3, 9.0)];
        let checks = [1, 2, 0, 1];
        let (pages, decision) = pool(&heat, &checks, 0..4).unwrap();
        assert!(!decision.pooled, "too few frames to decide");
        let mean_checks = 4.0 / 3.0;
        assert_eq!(
            pages,
            vec![
                (0, 2.0 * mean_checks),
                (1, 2.0 * mean_checks),
                (3, 9.0 * mean_checks)
            ]
        );
        // Frame 2 was never checked: its heat is unknown, not zero, and it is not listed even
        // with a value given for it.
        let (pages, _) = pool(&[(2, 5.0)], &checks, 0..4).unwrap();
        assert!(pages.is_empty());
    }

    #[test]
    fn bad_input_gives_nothing_and_never_panics() {
        assert_eq!(
            pool(&[(0, 1.0)], &[1, 1], 0..4),
            None,
            "checks shorter than the frames"
        );
        assert_eq!(pool(&[(0, 1.0)], &[0, 0], 0..2), None, "nothing checked");
        let (start, end) = (5, 2);
        assert_eq!(pool(&[], &[], start..end), None, "a range backwards");
        let (pages, _) = pool(&[(9, 1.0), (0, f64::NAN), (1, -3.0)], &[1, 1], 0..2).unwrap();
        assert!(
            pages.is_empty(),
            "out of range, not a number, negative: {pages:?}"
        );
    }
}
