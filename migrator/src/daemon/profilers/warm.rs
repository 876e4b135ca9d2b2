//! Warm heat: a partition's heat kept in the background at the daemon's budget, so that a
//! migration plans from heat already measured instead of profiling in a burst at the moment
//! the guest can least afford it (as DAMON monitors continuously and sparsely).
//!
//! The heat is a ring of windows of [`WARM_SPAN`], one opened every half span, each the
//! profiler's counts and checks' weights since it opened, per check (as a client's window,
//! `super::window`). A plan takes the oldest window open: heat up to now, over at least half
//! a span once the partition has run that long, and at most a span. So a hot set that moves
//! is forgotten within a span, and a static one is checked as often as half a span's
//! re-arming allows.
//!
//! What the heat cost is the budget's spend over the window's span: the faults its re-arming
//! caused, priced as the budget prices them. A migration that plans from it reports that
//! spend and counts it in the guest's bill, since the guest paid it for this heat.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use heatprobe::{Access, HeatConfig, HeatMap, PageCounts, PageHeat, budget::Spent};
use std::collections::BTreeMap;

use super::Window;

/// How long a warm window lasts. A minute: at the default budget the re-arming sweeps a
/// guest's 512 MiB in some tens of seconds (docs/BENCHMARKS.md, "Warm heat"), so a shorter
/// span would check many frames not at all; a longer one would keep a hot set that moved
/// away for longer.
pub const WARM_SPAN: Duration = Duration::from_secs(60);

/// One warm window and what the budget had spent when it began.
struct Span {
    window: Window,
    spent_at_start: Option<Spent>,
}

/// The ring of warm windows of one partition.
pub(super) struct Warm {
    spans: VecDeque<Span>,
    heat: HeatConfig,
    epoch: Duration,
    span: Duration,
    last_opened: Option<Instant>,
}

/// The heat a plan takes from the warm windows, and what it cost.
pub struct WarmHeat {
    pub pages: Vec<PageHeat>,
    /// When it was read.
    pub measured: Instant,
    /// How long the window's epochs cover.
    pub covered: Duration,
    /// The budget's spend over the window (`None` without a budget): its faults and what
    /// they cost, its share of the guest's time over the window.
    pub spent: Option<Spent>,
}

impl Warm {
    /// A ring of windows of `span`, on a profiler whose heat is configured as `heat` and
    /// whose epochs last `epoch`.
    pub(super) fn new(heat: HeatConfig, epoch: Duration, span: Duration) -> Self {
        Self {
            spans: VecDeque::new(),
            heat: HeatConfig { decay: 1.0, ..heat },
            epoch,
            span,
            last_opened: None,
        }
    }

    /// Takes an epoch of the profiler's cumulative counts, weights and checks that ended at
    /// `now`, with what the budget had spent by then; opens a window every half span and
    /// forgets those that are over.
    pub(super) fn observe(
        &mut self,
        totals: &BTreeMap<u64, PageCounts>,
        weights: &BTreeMap<u64, f64>,
        checks: &[u32],
        spent: Option<Spent>,
        now: Instant,
    ) {
        for span in &mut self.spans {
            span.window.observe(totals, weights, checks, 0, now);
        }
        self.spans.retain(|s| !s.window.done);
        if self
            .last_opened
            .is_none_or(|at| now.duration_since(at) + self.epoch / 2 >= self.span / 2)
            && let Ok(heat) = HeatMap::new(self.heat)
        {
            let mut window = Window::new(self.span, self.epoch, heat, now);
            // This epoch is the window's start: its baseline.
            window.observe(totals, weights, checks, 0, now);
            self.spans.push_back(Span {
                window,
                spent_at_start: spent,
            });
            self.last_opened = Some(now);
        }
    }

    /// The heat of the oldest window open, up to `now`; `None` before any epoch.
    /// `checks_now` and `spent_now` are the profiler's; `frames` and `vcpus` the partition's.
    pub(super) fn heat(
        &self,
        checks_now: &[u32],
        spent_now: Option<Spent>,
        frames: u64,
        vcpus: u32,
        now: Instant,
    ) -> Option<WarmHeat> {
        let span = self.spans.front()?;
        let covered = now.saturating_duration_since(span.window.started?);
        let mut pages = span.window.pages(checks_now, frames, false);
        // The frames were re-armed by dropping their host mappings, which KVM maps back
        // writable on the first fault whatever its kind: a page read and then written shows
        // only its read. So every page found touched is taken as written, as the oracle
        // takes them, and goes cold to hot: hot pages last, where being written again costs
        // nothing. Taken as read-only, a hot written page went first and was sent again
        // (measured: 2.1x address order's pages re-sent on a flat-out kv-zipf guest).
        for page in pages.iter_mut().filter(|p| p.heat > 0.0) {
            page.access = Access::ReadWrite;
        }
        Some(WarmHeat {
            pages,
            measured: now,
            covered,
            spent: spent_between(span.spent_at_start, spent_now, covered, vcpus),
        })
    }
}

/// What the budget spent between two of its readings `covered` apart, on `vcpus` vCPUs.
fn spent_between(
    start: Option<Spent>,
    end: Option<Spent>,
    covered: Duration,
    vcpus: u32,
) -> Option<Spent> {
    let (start, end) = (start?, end?);
    let estimated_ms = (end.estimated_ms - start.estimated_ms).max(0.0);
    let time_ms = covered.as_secs_f64() * 1e3 * f64::from(vcpus.max(1));
    Some(Spent {
        budget_share: end.budget_share,
        faults: end.faults.saturating_sub(start.faults),
        estimated_ms,
        share: if time_ms > 0.0 {
            estimated_ms / time_ms
        } else {
            0.0
        },
        frames_armed: end.frames_armed.saturating_sub(start.frames_armed),
        pace: end.pace,
        sweep_agreement: end.sweep_agreement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: Duration = Duration::from_millis(200);
    const SPAN: Duration = Duration::from_secs(2);

    fn spent(faults: u64, estimated_ms: f64) -> Option<Spent> {
        Some(Spent {
            budget_share: 0.01,
            faults,
            estimated_ms,
            share: 0.0,
            frames_armed: faults * 10,
            ..Spent::default()
        })
    }

    /// Runs `epochs` epochs in which page `hot` is checked and found touched each time, and
    /// page `hot + 1` checked and found untouched; returns the ring and the last instant.
    fn run(warm: &mut Warm, hot: u64, from: Instant, epochs: u32, base: u32) -> Instant {
        let mut now = from;
        for e in 0..epochs {
            let n = u64::from(base + e);
            let totals = BTreeMap::from([(
                hot,
                PageCounts {
                    reads: n,
                    writes: 0,
                },
            )]);
            let weights = BTreeMap::from([(hot, n as f64)]);
            let mut checks = vec![0u32; 8];
            checks[hot as usize] = base + e;
            checks[hot as usize + 1] = base + e;
            warm.observe(&totals, &weights, &checks, spent(n, n as f64 * 0.02), now);
            now += EPOCH;
        }
        now
    }

    #[test]
    fn a_plan_takes_the_oldest_open_window_up_to_now_and_its_spend() {
        let start = Instant::now();
        let mut warm = Warm::new(HeatConfig::default(), EPOCH, SPAN);
        assert!(warm.heat(&[], None, 8, 1, start).is_none(), "no epoch yet");
        // Half a span: only the first window is there to plan from.
        let now = run(&mut warm, 2, start, 6, 0);
        let young = warm.heat(&[0; 8], spent(5, 0.1), 8, 1, now).expect("heat");
        assert!(young.covered < SPAN, "{:?}", young.covered);
        assert_eq!(young.spent.map(|s| s.faults), Some(5));
        // Then the hot page moves, and stays moved for more than a span: the heat is the
        // oldest open window's, which saw only the new page, up to now.
        let now = run(&mut warm, 2, now, 4, 6);
        let now = run(&mut warm, 5, now, 13, 10);
        let (checks, spent_now) = (vec![23u32; 8], spent(23, 0.46));
        let heat = warm.heat(&checks, spent_now, 8, 1, now).expect("heat");
        let hot: Vec<u64> = heat
            .pages
            .iter()
            .filter(|p| p.heat > 0.0)
            .map(|p| p.page)
            .collect();
        assert_eq!(hot, vec![5], "{:?}", heat.pages);
        // Read faults only, and taken as written: dropped mappings cannot tell.
        assert!(
            heat.pages
                .iter()
                .filter(|p| p.heat > 0.0)
                .all(|p| p.access == Access::ReadWrite)
        );
        assert!(
            heat.covered >= SPAN / 2 && heat.covered <= SPAN,
            "{:?}",
            heat.covered
        );
        let spend = heat.spent.expect("spent");
        assert!(
            spend.faults >= 5 && spend.faults <= 10,
            "the window's epochs: {}",
            spend.faults
        );
        assert!(warm.spans.len() <= 2, "{} windows kept", warm.spans.len());
    }
}
