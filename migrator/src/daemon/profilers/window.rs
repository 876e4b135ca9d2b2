//! One client's window on a shared profiler: the counts at its end minus those at its start,
//! and its own heat map of the difference; and the bounds a window is checked against.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use heatprobe::{Access, HeatClass, HeatMap, PageCounts, PageHeat, pooling, probes::counts_since};
use tracing::debug;

use super::{MAX_WINDOW, ProfilingError};

/// Refuses a window shorter than one `epoch` or longer than [`MAX_WINDOW`].
pub fn check_window(duration: Duration, epoch: Duration) -> Result<(), ProfilingError> {
    if (epoch..=MAX_WINDOW).contains(&duration) {
        Ok(())
    } else {
        Err(ProfilingError::Window { duration, epoch })
    }
}

/// One client's window over the shared cumulative counts.
pub(super) struct Window {
    pub(super) duration: Duration,
    pub(super) epoch: Duration,
    pub(super) opened: Instant,
    /// The cumulative counts at the window's previous epoch; `None` until its first epoch,
    /// which is its start.
    pub(super) last: Option<BTreeMap<u64, PageCounts>>,
    /// The cumulative weights of the checks at the window's previous epoch.
    pub(super) last_weights: BTreeMap<u64, f64>,
    /// The profiler's checks of each frame at the window's start, so that its heat can be
    /// taken per check at its end.
    pub(super) checks_at_start: Vec<u32>,
    /// The same at the window's last epoch, once it is done.
    pub(super) checks_at_end: Option<Vec<u32>>,
    /// Whether the window started from heat the partition carried: that heat comes from no
    /// check of this profiler's, so the window's is not per check.
    pub(super) seeded: bool,
    pub(super) started: Option<Instant>,
    /// Faults the probes had dropped (over all targets) at the window's start.
    pub(super) dropped_at_start: u64,
    pub(super) dropped: u64,
    pub(super) heat: HeatMap,
    pub(super) done: bool,
}

impl Window {
    pub(super) fn new(duration: Duration, epoch: Duration, heat: HeatMap, now: Instant) -> Self {
        Self {
            duration,
            epoch,
            opened: now,
            last: None,
            last_weights: BTreeMap::new(),
            checks_at_start: Vec::new(),
            checks_at_end: None,
            seeded: false,
            started: None,
            dropped_at_start: 0,
            dropped: 0,
            heat,
            done: false,
        }
    }

    /// Takes the counts and the checks' weights (`heatprobe::profiler::touch_weight`) of one
    /// epoch that ended at `now`: the first is the baseline, each later one adds its change
    /// since the one before to the window's heat, a page's heat growing by its checks'
    /// weights (by its count where the profiler weighs nothing).
    pub(super) fn observe(
        &mut self,
        totals: &BTreeMap<u64, PageCounts>,
        weights: &BTreeMap<u64, f64>,
        checks: &[u32],
        dropped: u64,
        now: Instant,
    ) {
        if self.done {
            return;
        }
        let Some(last) = &self.last else {
            self.last = Some(totals.clone());
            self.last_weights = weights.clone();
            self.checks_at_start = checks.to_vec();
            self.started = Some(now);
            self.dropped_at_start = dropped;
            return;
        };
        let deltas: Vec<(u64, PageCounts, f64)> = counts_since(totals, last)
            .into_iter()
            .map(|(page, delta)| {
                let weight = match weights.get(&page) {
                    Some(now) => now - self.last_weights.get(&page).copied().unwrap_or(0.0),
                    None => (delta.reads + delta.writes) as f64,
                };
                (page, delta, weight)
            })
            .collect();
        self.heat.record_weighted_epoch(deltas);
        self.last = Some(totals.clone());
        self.last_weights = weights.clone();
        self.dropped = dropped.saturating_sub(self.dropped_at_start);
        // Half an epoch of slack, so timer jitter does not add an epoch to every window.
        let started = self.started.unwrap_or(now);
        if now + self.epoch / 2 >= started + self.duration {
            self.done = true;
            // Later epochs (other windows, a dashboard) check frames with no heat for this
            // one: its heat per check counts only the checks up to here.
            self.checks_at_end = Some(checks.to_vec());
        }
    }

    /// The window's pages as a report lists them: where its heat is the profiler's checks'
    /// weights, per check, and with `pool` pooled over neighbouring frames if the profile
    /// shows them alike (`heatprobe::pooling`); as they are otherwise.
    /// `checks_now` are the profiler's checks, for a window that did not end on an epoch of
    /// its own (which keeps its own).
    pub(super) fn pages(&self, checks_now: &[u32], frames: u64, pool: bool) -> Vec<PageHeat> {
        let pages = self.heat.pages();
        let checks_at_end = self.checks_at_end.as_deref().unwrap_or(checks_now);
        if self.seeded || checks_at_end.is_empty() {
            return pages;
        }
        let Ok(frames) = usize::try_from(frames) else {
            return pages;
        };
        let window_checks: Vec<u32> = (0..frames)
            .map(|f| {
                let now = checks_at_end.get(f).copied().unwrap_or(0);
                now.saturating_sub(self.checks_at_start.get(f).copied().unwrap_or(0))
            })
            .collect();
        let heat: Vec<(u64, f64)> = pages.iter().map(|p| (p.page, p.heat)).collect();
        let estimated = if pool {
            pooling::pool(&heat, &window_checks, 0..frames as u64).map(|(estimates, decision)| {
                debug!(
                    "heat window: pooled {} (radius {} frames, z {:.1})",
                    decision.pooled, decision.radius, decision.z
                );
                estimates
            })
        } else {
            pooling::per_check(&heat, &window_checks, 0..frames as u64)
        };
        let Some(estimates) = estimated else {
            return pages;
        };
        // The counts stay each frame's own; only the heat, and the classes drawn from it,
        // change. A frame pooling gives heat to was checked but not touched: no counts.
        let by_page: BTreeMap<u64, &PageHeat> = pages.iter().map(|p| (p.page, p)).collect();
        let seeds: Vec<PageHeat> = estimates
            .into_iter()
            .map(|(page, heat)| match by_page.get(&page) {
                Some(p) => PageHeat { heat, ..**p },
                None => PageHeat {
                    page,
                    reads: 0,
                    writes: 0,
                    heat,
                    class: HeatClass::Cold,
                    access: Access::ReadOnly,
                },
            })
            .collect();
        match HeatMap::new(*self.heat.config()) {
            Ok(mut estimated) => {
                estimated.seed(&seeds, 1.0);
                estimated.pages()
            }
            Err(_) => pages,
        }
    }

    /// Whether the window is over: its epochs cover its duration, or the partition did not
    /// run for long enough to give it them (paused, say), in which case it ends with what it
    /// has.
    pub(super) fn over(&self, now: Instant) -> bool {
        self.done || now >= self.opened + self.duration + 2 * self.epoch
    }
}

#[cfg(test)]
mod tests {
    use heatprobe::{HeatConfig, PageHeat};

    use super::*;
    use crate::host::heat_sampling::EPOCH;

    fn counts(pairs: &[(u64, u64, u64)]) -> BTreeMap<u64, PageCounts> {
        pairs
            .iter()
            .map(|&(page, reads, writes)| (page, PageCounts { reads, writes }))
            .collect()
    }

    fn window(duration: Duration, at: Instant) -> Window {
        Window::new(
            duration,
            EPOCH,
            HeatMap::new(HeatConfig::default()).expect("the default config is valid"),
            at,
        )
    }

    fn totals(pages: &[PageHeat]) -> Vec<(u64, u64, u64)> {
        pages.iter().map(|p| (p.page, p.reads, p.writes)).collect()
    }

    /// A window's heat is per check, counting only the checks made within it: a frame checked
    /// twice as often at the same rate is as hot, and one never checked is not listed.
    #[test]
    fn a_window_reports_heat_per_check() {
        let t0 = Instant::now();
        let mut w = window(EPOCH, t0);
        let weights = |pairs: &[(u64, f64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        // Frame 0 had a check before the window: it does not count.
        w.observe(&counts(&[]), &BTreeMap::new(), &[1, 0, 0], 0, t0);
        w.observe(
            &counts(&[(0, 1, 0), (1, 2, 0), (2, 1, 0)]),
            &weights(&[(0, 3.0), (1, 6.0), (2, 5.0)]),
            &[2, 2],
            0,
            t0 + EPOCH,
        );
        assert!(w.done);
        let heat = |pages: &[PageHeat]| pages.iter().map(|p| (p.page, p.heat)).collect::<Vec<_>>();
        // Frames 0 and 1: one and two checks in the window, 3.0 each; frame 2 was never
        // checked here (a first touch), so it is not listed. Scaled by the mean checks, 1.5.
        // Checks the profiler makes after the window's end (for others) do not count.
        let pages = w.pages(&[9, 9, 9], 3, false);
        assert_eq!(heat(&pages), vec![(0, 4.5), (1, 4.5)]);
        // The counts, access and the classes' inputs stay each page's own.
        let own: Vec<(u64, u64, u64, Access)> = w
            .heat
            .pages()
            .iter()
            .filter(|p| p.page < 2)
            .map(|p| (p.page, p.reads, p.writes, p.access))
            .collect();
        let kept: Vec<(u64, u64, u64, Access)> = pages
            .iter()
            .map(|p| (p.page, p.reads, p.writes, p.access))
            .collect();
        assert_eq!(kept, own);
        // Carried heat, or a profiler that weighs nothing, is left as counted.
        w.seeded = true;
        assert_eq!(heat(&w.pages(&[9, 9, 9], 3, false)), heat(&w.heat.pages()));
        let mut unweighed = window(EPOCH, t0);
        unweighed.observe(&counts(&[]), &BTreeMap::new(), &[], 0, t0);
        unweighed.observe(&counts(&[(4, 1, 0)]), &BTreeMap::new(), &[], 0, t0 + EPOCH);
        assert_eq!(
            heat(&unweighed.pages(&[], 5, false)),
            heat(&unweighed.heat.pages())
        );
    }

    /// Two windows over the same cumulative counts, the second opened later and closed
    /// earlier: each counts what happened between its own start and end, no more.
    #[test]
    fn overlapping_windows_count_end_minus_start_each() {
        let t0 = Instant::now();
        let at = |epochs: u32| t0 + EPOCH * epochs;
        // Cumulative counts at epochs 0..=6 of one profiler.
        let epochs = [
            counts(&[(1, 1, 0)]),
            counts(&[(1, 3, 0), (2, 0, 1)]),
            counts(&[(1, 6, 0), (2, 0, 2)]),
            counts(&[(1, 10, 0), (2, 0, 4), (3, 1, 0)]),
            counts(&[(1, 15, 0), (2, 0, 4), (3, 2, 0)]),
            counts(&[(1, 21, 1), (2, 0, 5), (3, 2, 0)]),
            counts(&[(1, 28, 1), (2, 0, 5), (3, 3, 0)]),
        ];
        let mut long = window(EPOCH * 6, at(0));
        let mut short = window(EPOCH * 2, at(1));
        for (n, cumulative) in epochs.iter().enumerate() {
            let now = at(n as u32);
            long.observe(cumulative, &BTreeMap::new(), &[], 0, now);
            if n >= 2 {
                short.observe(cumulative, &BTreeMap::new(), &[], 0, now);
            }
        }
        assert!(long.over(at(6)) && long.done);
        assert!(short.done, "two epochs from epoch 2 end it at epoch 4");
        // long: epoch 6 minus epoch 0; short: epoch 4 minus epoch 2.
        assert_eq!(
            totals(&long.heat.pages()),
            vec![(1, 27, 1), (2, 0, 5), (3, 3, 0)]
        );
        assert_eq!(
            totals(&short.heat.pages()),
            vec![(1, 9, 0), (2, 0, 2), (3, 2, 0)]
        );
        assert_eq!((long.heat.epochs(), short.heat.epochs()), (6, 2));
    }

    /// Where the profiler weighs its checks, a window's heat is the weights' change over it,
    /// not the counts'.
    #[test]
    fn a_window_heats_by_the_checks_weights() {
        let t0 = Instant::now();
        let mut w = window(EPOCH * 2, t0);
        let weights = |pairs: &[(u64, f64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        w.observe(&counts(&[(1, 1, 0)]), &weights(&[(1, 7.0)]), &[], 0, t0);
        w.observe(
            &counts(&[(1, 2, 0), (2, 1, 0)]),
            &weights(&[(1, 14.5), (2, 1.0)]),
            &[],
            0,
            t0 + EPOCH,
        );
        w.observe(
            &counts(&[(1, 3, 0), (2, 2, 0)]),
            &weights(&[(1, 22.0), (2, 2.5)]),
            &[],
            0,
            t0 + EPOCH * 2,
        );
        assert!(w.done);
        let heat: Vec<(u64, u64, f64)> = w
            .heat
            .pages()
            .iter()
            .map(|p| (p.page, p.reads, p.heat))
            .collect();
        // The weights' changes, 7.5 and 7.5 for page 1, 1.0 and 1.5 for page 2, under this
        // test window's decay of 0.8 an epoch (a real window's heat does not decay).
        let expected = [(1, 2, 7.5 * 0.8 + 7.5), (2, 2, 1.0 * 0.8 + 1.5)];
        assert_eq!(heat.len(), expected.len(), "{heat:?}");
        for ((page, reads, h), (want_page, want_reads, want)) in heat.iter().zip(expected) {
            assert_eq!((*page, *reads), (want_page, want_reads));
            assert!(
                (h - want).abs() < 1e-9,
                "page {page}: heat {h}, wanted {want}"
            );
        }
    }

    #[test]
    fn a_window_without_epochs_ends_after_its_time_with_nothing() {
        let t0 = Instant::now();
        let w = window(EPOCH * 5, t0);
        assert!(!w.over(t0 + EPOCH * 6));
        assert!(w.over(t0 + EPOCH * 7));
        assert!(w.heat.pages().is_empty());
    }

    #[test]
    fn dropped_faults_are_counted_from_the_window_start() {
        let t0 = Instant::now();
        let mut w = window(EPOCH, t0);
        w.observe(&counts(&[]), &BTreeMap::new(), &[], 7, t0);
        w.observe(&counts(&[(4, 1, 0)]), &BTreeMap::new(), &[], 9, t0 + EPOCH);
        assert_eq!(w.dropped, 2);
        assert!(w.done);
        // Counts that went backwards (a map entry deleted) count as nothing, not as a wrap.
        let mut w = window(EPOCH * 3, t0);
        w.observe(&counts(&[(4, 5, 5)]), &BTreeMap::new(), &[], 0, t0);
        w.observe(&counts(&[(4, 2, 6)]), &BTreeMap::new(), &[], 0, t0 + EPOCH);
        assert_eq!(totals(&w.heat.pages()), vec![(4, 0, 1)]);
    }

    #[test]
    fn windows_outside_the_bounds_are_refused() {
        for bad in [
            Duration::ZERO,
            Duration::from_millis(199),
            Duration::from_millis(60_001),
            Duration::MAX,
        ] {
            assert!(check_window(bad, EPOCH).is_err(), "{bad:?} accepted");
        }
        for good in [EPOCH, Duration::from_secs(2), MAX_WINDOW] {
            assert!(check_window(good, EPOCH).is_ok(), "{good:?} refused");
        }
        let message = check_window(Duration::ZERO, EPOCH).unwrap_err().to_string();
        assert!(message.contains("200 ms and 60 s"), "{message}");
        // The least window is the daemon's epoch, whatever it is.
        let short = Duration::from_millis(50);
        assert!(check_window(short, short).is_ok());
        assert!(check_window(short - Duration::from_millis(1), short).is_err());
    }
}
