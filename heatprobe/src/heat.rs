//! Heat: per-page fault counts per epoch turned into a decayed heat, a class and an access kind.
//!
//! Each epoch every page's heat is multiplied by [`HeatConfig::decay`] and then increased by
//! the faults counted for it in that epoch, the exponential moving sum DAMON-style monitors
//! use. Classes are relative: a page is `hot` when its heat reaches the
//! [`HeatConfig::hot_quantile`] of the heats of all touched pages, `warm` when it reaches
//! [`HeatConfig::warm_quantile`], and `cold` otherwise. A page that sits at the minimum heat
//! is always `cold`, so a flat distribution (nothing stands out) is all cold.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::probes::PageCounts;

/// How hot a page is relative to the other touched pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeatClass {
    Cold,
    Warm,
    Hot,
}

/// Whether a page was written during the write window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    /// Only read faults were seen in the window.
    #[serde(rename = "ro")]
    ReadOnly,
    /// At least one write fault was seen in the window.
    #[serde(rename = "rw")]
    ReadWrite,
}

/// Tunables of the heat model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeatConfig {
    /// Fraction of a page's heat kept from one epoch to the next, in (0, 1].
    pub decay: f64,
    /// Quantile of touched pages' heat at or above which a page is hot, in [0, 1].
    pub hot_quantile: f64,
    /// Quantile at or above which a page is warm, in [0, hot_quantile].
    pub warm_quantile: f64,
    /// Number of most recent epochs in which a write makes a page read-write; `None` means
    /// the whole run.
    pub write_window: Option<u64>,
}

impl Default for HeatConfig {
    fn default() -> Self {
        Self {
            decay: 0.8,
            hot_quantile: 0.8,
            warm_quantile: 0.5,
            write_window: None,
        }
    }
}

/// A [`HeatConfig`] that cannot be used.
#[derive(Debug, Error, PartialEq)]
pub enum HeatError {
    #[error("decay must be in (0, 1], got {0}")]
    Decay(f64),
    #[error("quantiles must satisfy 0 <= warm ({warm}) <= hot ({hot}) <= 1")]
    Quantiles { warm: f64, hot: f64 },
    #[error("the write window must be at least one epoch")]
    WriteWindow,
}

impl HeatConfig {
    /// Checks every field, so a bad config is refused before any state is built.
    pub fn validate(&self) -> Result<(), HeatError> {
        if !(self.decay > 0.0 && self.decay <= 1.0) {
            return Err(HeatError::Decay(self.decay));
        }
        let (warm, hot) = (self.warm_quantile, self.hot_quantile);
        if !(0.0..=1.0).contains(&warm) || !(0.0..=1.0).contains(&hot) || warm > hot {
            return Err(HeatError::Quantiles { warm, hot });
        }
        if self.write_window == Some(0) {
            return Err(HeatError::WriteWindow);
        }
        Ok(())
    }
}

/// Everything known about one page after classification.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PageHeat {
    /// Virtual page number (process) or guest frame number (VM).
    pub page: u64,
    /// Read faults over the whole run.
    pub reads: u64,
    /// Write faults over the whole run.
    pub writes: u64,
    /// Decayed heat.
    pub heat: f64,
    pub class: HeatClass,
    pub access: Access,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct PageState {
    totals: PageCounts,
    heat: f64,
    last_write_epoch: Option<u64>,
}

/// Heat thresholds of one classification.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// The lowest heat of any touched page; pages at it are cold.
    pub floor: f64,
    pub warm: f64,
    pub hot: f64,
}

impl Thresholds {
    /// The class of a page with heat `heat`.
    pub fn classify(&self, heat: f64) -> HeatClass {
        if heat <= self.floor {
            HeatClass::Cold
        } else if heat >= self.hot {
            HeatClass::Hot
        } else if heat >= self.warm {
            HeatClass::Warm
        } else {
            HeatClass::Cold
        }
    }
}

/// Heat of every touched page of one target, updated epoch by epoch.
#[derive(Clone, Debug)]
pub struct HeatMap {
    config: HeatConfig,
    epochs: u64,
    pages: BTreeMap<u64, PageState>,
}

impl HeatMap {
    /// An empty map; fails if `config` is invalid.
    pub fn new(config: HeatConfig) -> Result<Self, HeatError> {
        config.validate()?;
        Ok(Self {
            config,
            epochs: 0,
            pages: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &HeatConfig {
        &self.config
    }

    /// Epochs recorded so far.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    /// Page `page`'s heat now (0 if never touched).
    pub fn heat_of(&self, page: u64) -> f64 {
        self.pages.get(&page).map_or(0.0, |state| state.heat)
    }

    /// Number of pages touched so far.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Ends an epoch: decays every page, then adds the faults counted in this epoch.
    /// A page listed twice has both counts added.
    pub fn record_epoch(&mut self, deltas: impl IntoIterator<Item = (u64, PageCounts)>) {
        self.record_weighted_epoch(
            deltas
                .into_iter()
                .map(|(page, delta)| (page, delta, (delta.reads + delta.writes) as f64)),
        );
    }

    /// As [`HeatMap::record_epoch`], each page's heat growing by its `weight` rather than by
    /// its count of faults (a check's worth as the profiler judged it).
    pub fn record_weighted_epoch(
        &mut self,
        deltas: impl IntoIterator<Item = (u64, PageCounts, f64)>,
    ) {
        let epoch = self.epochs;
        self.epochs += 1;
        for state in self.pages.values_mut() {
            state.heat *= self.config.decay;
        }
        for (page, delta, weight) in deltas {
            if delta.reads == 0 && delta.writes == 0 {
                continue;
            }
            let state = self.pages.entry(page).or_default();
            state.totals.reads = state.totals.reads.saturating_add(delta.reads);
            state.totals.writes = state.totals.writes.saturating_add(delta.writes);
            if weight.is_finite() && weight > 0.0 {
                state.heat += weight;
            }
            if delta.writes > 0 {
                state.last_write_epoch = Some(epoch);
            }
        }
    }

    /// Starts from heat measured elsewhere (a profile that travelled with a migrated guest):
    /// each page takes `pages`' counts and its heat scaled by `scale` (the decay the time
    /// since has earned), as if recorded before this map's first epoch; a page written
    /// there counts as written now. Pages already in the map keep theirs and add these.
    pub fn seed(&mut self, pages: &[PageHeat], scale: f64) {
        let scale = if scale.is_finite() {
            scale.clamp(0.0, 1.0)
        } else {
            0.0
        };
        for page in pages {
            let heat = if page.heat.is_finite() && page.heat > 0.0 {
                page.heat * scale
            } else {
                0.0
            };
            let state = self.pages.entry(page.page).or_default();
            state.totals.reads = state.totals.reads.saturating_add(page.reads);
            state.totals.writes = state.totals.writes.saturating_add(page.writes);
            state.heat += heat;
            if page.access == Access::ReadWrite {
                state.last_write_epoch = Some(self.epochs);
            }
        }
    }

    /// The thresholds the current heats give, or `None` if no page was touched.
    pub fn thresholds(&self) -> Option<Thresholds> {
        let mut heats: Vec<f64> = self.pages.values().map(|s| s.heat).collect();
        if heats.is_empty() {
            return None;
        }
        heats.sort_by(f64::total_cmp);
        Some(Thresholds {
            floor: heats[0],
            warm: nearest_rank(&heats, self.config.warm_quantile),
            hot: nearest_rank(&heats, self.config.hot_quantile),
        })
    }

    /// Every touched page, classified, in page order.
    pub fn pages(&self) -> Vec<PageHeat> {
        let Some(thresholds) = self.thresholds() else {
            return Vec::new();
        };
        let window_start = match self.config.write_window {
            Some(window) => self.epochs.saturating_sub(window),
            None => 0,
        };
        self.pages
            .iter()
            .map(|(&page, state)| PageHeat {
                page,
                reads: state.totals.reads,
                writes: state.totals.writes,
                heat: state.heat,
                class: thresholds.classify(state.heat),
                access: match state.last_write_epoch {
                    Some(epoch) if epoch >= window_start => Access::ReadWrite,
                    _ => Access::ReadOnly,
                },
            })
            .collect()
    }
}

/// The nearest-rank quantile `q` of ascending, non-empty `sorted`.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn counts(reads: u64, writes: u64) -> PageCounts {
        PageCounts { reads, writes }
    }

    fn map() -> HeatMap {
        HeatMap::new(HeatConfig::default()).unwrap()
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = [
            HeatConfig {
                decay: 0.0,
                ..Default::default()
            },
            HeatConfig {
                decay: f64::NAN,
                ..Default::default()
            },
            HeatConfig {
                warm_quantile: 0.9,
                hot_quantile: 0.5,
                ..Default::default()
            },
            HeatConfig {
                hot_quantile: 1.5,
                ..Default::default()
            },
            HeatConfig {
                write_window: Some(0),
                ..Default::default()
            },
        ];
        for config in bad {
            assert!(HeatMap::new(config).is_err(), "{config:?} was accepted");
        }
    }

    #[test]
    fn seeded_heat_carries_its_ranking_and_decays_with_new_epochs() {
        let mut source = map();
        let mut deltas: Vec<_> = (0..90).map(|p| (p, counts(1, 0))).collect();
        deltas.extend((90..100).map(|p| (p, counts(40, 10))));
        source.record_epoch(deltas);
        let carried = source.pages();
        let mut there = map();
        there.seed(&carried, 0.5);
        let seeded = there.pages();
        assert_eq!(seeded.len(), 100);
        assert!(seeded[90..].iter().all(|p| p.class == HeatClass::Hot));
        assert!(seeded[90..].iter().all(|p| p.access == Access::ReadWrite));
        assert_eq!(seeded[95].writes, 10);
        assert!((seeded[95].heat - 25.0).abs() < 1e-9, "{:?}", seeded[95]);
        // A new epoch decays the seed like any heat.
        there.record_epoch([(0, counts(1, 0))]);
        assert!(there.pages()[95].heat < seeded[95].heat);
        // Nonsense scales and heats seed nothing hot.
        let mut odd = map();
        odd.seed(&carried, f64::NAN);
        assert!(odd.pages().iter().all(|p| p.heat == 0.0));
    }

    #[test]
    fn a_few_hot_pages_stand_out_of_many_cold_ones() {
        let mut heat = map();
        let mut deltas: Vec<_> = (0..90).map(|p| (p, counts(1, 0))).collect();
        deltas.extend((90..100).map(|p| (p, counts(40, 10))));
        heat.record_epoch(deltas);
        let pages = heat.pages();
        assert!(pages[..90].iter().all(|p| p.class == HeatClass::Cold));
        assert!(pages[90..].iter().all(|p| p.class == HeatClass::Hot));
        assert!(pages[..90].iter().all(|p| p.access == Access::ReadOnly));
        assert!(pages[90..].iter().all(|p| p.access == Access::ReadWrite));
    }

    #[test]
    fn a_spread_splits_into_three_classes() {
        let mut heat = map();
        heat.record_epoch((1..=100).map(|p| (p, counts(p, 0))));
        let classes: Vec<_> = heat.pages().iter().map(|p| p.class).collect();
        assert_eq!(classes[0], HeatClass::Cold);
        assert_eq!(classes[49], HeatClass::Warm);
        assert_eq!(classes[79], HeatClass::Hot);
        assert_eq!(classes[99], HeatClass::Hot);
        assert_eq!(classes[78], HeatClass::Warm);
        assert_eq!(classes[48], HeatClass::Cold);
    }

    #[test]
    fn a_flat_distribution_is_all_cold() {
        let mut heat = map();
        heat.record_epoch((0..10).map(|p| (p, counts(3, 0))));
        assert!(heat.pages().iter().all(|p| p.class == HeatClass::Cold));
    }

    #[test]
    fn heat_decays_and_writes_age_out_of_the_window() {
        let mut heat = HeatMap::new(HeatConfig {
            decay: 0.5,
            write_window: Some(2),
            ..Default::default()
        })
        .unwrap();
        heat.record_epoch([(7, counts(0, 8))]);
        assert_eq!(heat.pages()[0].access, Access::ReadWrite);
        heat.record_epoch([]);
        assert_eq!(heat.pages()[0].heat, 4.0);
        assert_eq!(heat.pages()[0].access, Access::ReadWrite);
        heat.record_epoch([]);
        let page = heat.pages()[0];
        assert_eq!(page.heat, 2.0);
        assert_eq!(page.access, Access::ReadOnly);
        assert_eq!((page.reads, page.writes), (0, 8));
    }

    proptest! {
        #[test]
        fn hotter_pages_never_get_a_colder_class(
            epochs in prop::collection::vec(
                prop::collection::vec((0u64..64, 0u64..20, 0u64..20), 0..40), 1..6)
        ) {
            let mut heat = map();
            for epoch in &epochs {
                heat.record_epoch(epoch.iter().map(|&(p, r, w)| (p, counts(r, w))));
            }
            let pages = heat.pages();
            for a in &pages {
                prop_assert!(a.heat >= 0.0);
                for b in &pages {
                    if a.heat > b.heat {
                        prop_assert!(a.class >= b.class, "{a:?} vs {b:?}");
                    }
                }
            }
        }

        #[test]
        fn totals_are_the_sum_of_the_epochs(
            epochs in prop::collection::vec(
                prop::collection::vec((0u64..16, 0u64..5, 0u64..5), 0..20), 1..6)
        ) {
            let mut heat = map();
            let mut expected: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            for epoch in &epochs {
                heat.record_epoch(epoch.iter().map(|&(p, r, w)| (p, counts(r, w))));
                for &(p, r, w) in epoch {
                    if r + w > 0 {
                        let e = expected.entry(p).or_default();
                        e.0 += r;
                        e.1 += w;
                    }
                }
            }
            let got: BTreeMap<u64, (u64, u64)> =
                heat.pages().iter().map(|p| (p.page, (p.reads, p.writes))).collect();
            prop_assert_eq!(got, expected);
            prop_assert_eq!(heat.epochs(), epochs.len() as u64);
        }
    }
}
