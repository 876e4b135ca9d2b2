//! How a migration's order was chosen: where its heat came from, and whether that heat could
//! rank anything.
//!
//! Heat that cannot tell pages apart costs the guest its profile and gives nothing back, and a
//! page it ranks wrongly may be sent again. So a heat plan is used only where the heat ranks
//! enough pages and its popularity is skewed; otherwise the migration sends in address order,
//! which costs the guest nothing to compute, and the report says why.

use heatprobe::PageHeat;
use serde::{Deserialize, Serialize};

/// Where a heat plan's heat came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanHeatOrigin {
    /// Profiled for `--profile-window` before round 0.
    Profiled,
    /// Carried here by the partition's previous migration, recently enough to need no profile.
    Carried,
    /// Read from a file (`migrate --heat-file`).
    File,
    /// Kept warm in the background by the daemon's profiler (`serve --heat-profile warm`).
    Warm,
}

/// The fewest pages heat must rank (find touched) for its order to be used: fewer, and the
/// order is address order but for a handful of pages, at the price of a profile.
pub const LEAST_RANKED: usize = 64;

/// How much hotter than the mean of the pages heat ranked its hottest tenth must be for the
/// popularity to count as skewed. Flat heat (every touched page alike, as a uniform writer's)
/// orders pages by noise.
pub const LEAST_SKEW: f64 = 1.5;

/// The share of memory that flat heat must rank to be no use. Below it, which pages were
/// touched at all is the signal (a short profile of a skewed guest finds its hot pages first,
/// each once), whatever their heat.
pub const FLAT_AND_WIDE: f64 = 0.5;

/// Why heat's order over `frames` frames was not used, if it was not.
pub fn unusable(pages: &[PageHeat], frames: u64) -> Option<String> {
    let mut heat: Vec<f64> = pages
        .iter()
        .map(|p| p.heat)
        .filter(|h| h.is_finite() && *h > 0.0)
        .collect();
    if heat.len() < LEAST_RANKED {
        return Some(format!(
            "the profile ranked {} pages, fewer than {LEAST_RANKED}: too few to order by",
            heat.len()
        ));
    }
    heat.sort_by(|a, b| b.total_cmp(a));
    let mean = heat.iter().sum::<f64>() / heat.len() as f64;
    let top = &heat[..heat.len().div_ceil(10)];
    let top_mean = top.iter().sum::<f64>() / top.len() as f64;
    let skew = top_mean / mean;
    let wide = heat.len() as f64 >= FLAT_AND_WIDE * frames as f64;
    (skew < LEAST_SKEW && wide).then(|| {
        format!(
            "the measured popularity is flat: {} pages ranked, of {frames}, and their hottest \
             tenth is {skew:.2}x their mean heat, under {LEAST_SKEW}x",
            heat.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use heatprobe::{Access, HeatClass};

    use super::*;

    fn pages(heat: impl IntoIterator<Item = f64>) -> Vec<PageHeat> {
        heat.into_iter()
            .enumerate()
            .map(|(page, heat)| PageHeat {
                page: page as u64,
                reads: 1,
                writes: 1,
                heat,
                class: HeatClass::Warm,
                access: Access::ReadWrite,
            })
            .collect()
    }

    #[test]
    fn too_few_ranked_pages_fall_back() {
        let why = unusable(&pages((0..63).map(|i| 1.0 + i as f64)), 1000).unwrap();
        assert!(why.contains("ranked 63 pages"), "{why}");
        // Pages with no heat are not ranked.
        let mut some = pages((0..100).map(|i| if i < 10 { 5.0 } else { 0.0 }));
        some.push(pages([f64::NAN])[0]);
        assert!(unusable(&some, 1000).unwrap().contains("ranked 10 pages"));
    }

    #[test]
    fn flat_popularity_over_most_of_memory_falls_back_and_skewed_popularity_is_used() {
        let flat = || pages((0..1000).map(|i| 1.0 + (i % 3) as f64 * 0.1));
        let why = unusable(&flat(), 1500).unwrap();
        assert!(why.contains("flat"), "{why}");
        // The same flat heat over a small part of memory: which pages it found is the signal.
        assert_eq!(unusable(&flat(), 100_000), None);
        // Zipf-like: the hottest tenth holds far more than its share.
        assert_eq!(
            unusable(&pages((1..=1000).map(|i| 1.0 / i as f64)), 1000),
            None
        );
        // A hot tenth at twice the rest's heat is skewed enough.
        let hot_tenth = (0..1000).map(|i| if i < 100 { 2.0 } else { 1.0 });
        assert_eq!(unusable(&pages(hot_tenth), 1000), None);
    }
}
