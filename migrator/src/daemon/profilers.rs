//! One shared heat profiler per partition, serving every client at once: the dashboard's
//! view and any number of `page_heat` and `plan` windows.
//!
//! Why shared: heatprobe's probes count a vCPU thread under one target only, so a second
//! profiler on a partition would take its threads from the first, and dropping either would
//! stop both. So the daemon keeps at most one [`Profiler`] per partition and never starts one
//! while the partition migrates (the migration profiles with its own).
//!
//! Each client's window is computed from the profiler's cumulative counts: a window takes the
//! counts at the first epoch after it opens as its baseline and, epoch after epoch, feeds the
//! change since its previous epoch into a heat map of its own. Its counts are therefore the
//! counts at its end minus those at its start, and its heat the same difference of the
//! checks' weights (`heatprobe::profiler::touch_weight`), so overlapping windows neither see
//! nor reset each other's counts. The dashboard's view is the
//! profiler's own heat map, since the profiler started.
//!
//! Epochs advance when a client asks (a window waiting for its end, a dashboard polling), at
//! most once per epoch (the daemon's [`HeatSampling`]) whoever asks. The active sampler
//! re-arms frames only while the partition simply runs: during a migration, dropping host
//! mappings would make KVM mark pages dirty, and a paused guest has nothing to count.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use heatprobe::{
    Access, Credit, HeatClass, HeatConfig, HeatMap, PAGE_SIZE, PageCounts, PageHeat, Probes,
    Profiler, ProfilerError,
    heat::HeatError,
    pooling,
    probes::counts_since,
    profiler::ProfilerConfig,
    report::{RecordReport, TargetSummary},
};
use thiserror::Error;
use tracing::debug;

use super::{blocking, error_chain, server::Daemon};
use crate::{
    api::{
        ApiError,
        heat_report::{PartitionHeat, PlanPreview},
        heat_view::HeatView,
    },
    host::heat_sampling::HeatSampling,
};
use crate::{
    migration::{Strategy, source::PlanHeat},
    vmm::{
        Partition, PartitionState,
        sampler::{Sampling, profile_partition},
    },
};

/// The longest window: a minute, far beyond what heat needs to settle (a few seconds), short
/// enough that a forgotten call does not hold a window for long.
pub const MAX_WINDOW: Duration = Duration::from_secs(60);
/// Most windows open on one partition at once: each keeps a copy of the counts of every
/// touched page, so the number is bounded.
pub const MAX_WINDOWS: usize = 8;

#[derive(Debug, Error)]
pub enum ProfilingError {
    #[error(
        "the heat window must be between {} ms and {} s, got {} ms",
        .epoch.as_millis(),
        MAX_WINDOW.as_secs(),
        .duration.as_millis()
    )]
    Window { duration: Duration, epoch: Duration },
    #[error(
        "partition `{0}` is migrating and its vCPUs are profiled by the migration; ask again \
         when it is over"
    )]
    Migrating(String),
    #[error("partition `{0}` already has {MAX_WINDOWS} heat windows open")]
    TooManyWindows(String),
    #[error("cannot start profiling the partition")]
    Start(#[source] ProfilerError),
    #[error("advancing the partition's heat failed")]
    Epoch(#[source] ProfilerError),
    #[error("reading the probes' counters failed")]
    Dropped(#[source] ProfilerError),
    #[error("the window's heat model cannot be built")]
    Heat(#[source] HeatError),
    #[error(
        "profiling of partition `{0}` stopped before the window ended (it migrated or stopped)"
    )]
    Stopped(String),
}

/// Refuses a window shorter than one `epoch` or longer than [`MAX_WINDOW`].
pub fn check_window(duration: Duration, epoch: Duration) -> Result<(), ProfilingError> {
    if (epoch..=MAX_WINDOW).contains(&duration) {
        Ok(())
    } else {
        Err(ProfilingError::Window { duration, epoch })
    }
}

/// One client's window over the shared cumulative counts.
struct Window {
    duration: Duration,
    epoch: Duration,
    opened: Instant,
    /// The cumulative counts at the window's previous epoch; `None` until its first epoch,
    /// which is its start.
    last: Option<BTreeMap<u64, PageCounts>>,
    /// The cumulative weights of the checks at the window's previous epoch.
    last_weights: BTreeMap<u64, f64>,
    /// The profiler's checks of each frame at the window's start, so that its heat can be
    /// taken per check at its end.
    checks_at_start: Vec<u32>,
    /// The same at the window's last epoch, once it is done.
    checks_at_end: Option<Vec<u32>>,
    /// Whether the window started from heat the partition carried: that heat comes from no
    /// check of this profiler's, so the window's is not per check.
    seeded: bool,
    started: Option<Instant>,
    /// Faults the probes had dropped (over all targets) at the window's start.
    dropped_at_start: u64,
    dropped: u64,
    heat: HeatMap,
    done: bool,
}

impl Window {
    fn new(duration: Duration, epoch: Duration, heat: HeatMap, now: Instant) -> Self {
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
    fn observe(
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
    fn pages(&self, checks_now: &[u32], frames: u64, pool: bool) -> Vec<PageHeat> {
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
    fn over(&self, now: Instant) -> bool {
        self.done || now >= self.opened + self.duration + 2 * self.epoch
    }
}

/// The profiler of one partition and the windows open on it.
struct State {
    profiler: Profiler,
    epoch: Duration,
    last_epoch: Instant,
    windows: BTreeMap<u64, Window>,
    next_window: u64,
    /// Whether windows pool heat over neighbouring frames ([`HeatSampling::pool`]).
    pool: bool,
}

/// One partition's shared profiler. `None` inside once it is stopped ([`Profilers::unwatch`]):
/// the profiler is dropped at once, releasing the vCPU threads, even while clients still hold
/// this.
pub struct Shared {
    id: String,
    partition: Arc<Partition>,
    state: Mutex<Option<State>>,
}

/// What a window's driver does next.
pub enum Step {
    /// Ask again at this instant, when the next epoch is due.
    Wait(Instant),
    /// The window is over; its heat as `heatprobe record` reports it.
    Done(RecordReport),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    /// Ends an epoch if one is due; the partition's frames are re-armed only if it runs.
    fn advance(&self, state: &mut State) -> Result<(), ProfilingError> {
        let now = Instant::now();
        if now.duration_since(state.last_epoch) < state.epoch {
            return Ok(());
        }
        state.last_epoch = now;
        if self.partition.state() != PartitionState::Running {
            return Ok(());
        }
        state.profiler.end_epoch().map_err(ProfilingError::Epoch)?;
        if state.windows.values().any(|w| !w.done) {
            let dropped = state.profiler.dropped().map_err(ProfilingError::Dropped)?;
            let (totals, weights) = (state.profiler.totals(), state.profiler.weights());
            let checks = state.profiler.checks();
            for window in state.windows.values_mut() {
                window.observe(totals, weights, checks, dropped, now);
            }
        }
        Ok(())
    }

    /// Opens a window of `duration`, starting from `carried` heat if the partition brought
    /// some; returns its number.
    pub fn open_window(
        &self,
        duration: Duration,
        carried: Option<&PlanHeat>,
    ) -> Result<u64, ProfilingError> {
        let mut guard = self.lock();
        let state = guard
            .as_mut()
            .ok_or_else(|| ProfilingError::Stopped(self.id.clone()))?;
        check_window(duration, state.epoch)?;
        if state.windows.len() >= MAX_WINDOWS {
            return Err(ProfilingError::TooManyWindows(self.id.clone()));
        }
        // A window's heat is its checks' weights, undecayed, as DAMON's access count within one
        // aggregation interval: each frame is checked only once per 1 / fraction epochs, so a
        // decay per epoch would rank frames by where the sampler's cursor stood when they
        // were checked rather than by how often they were found touched.
        let mut heat = HeatMap::new(HeatConfig {
            decay: 1.0,
            ..state.profiler.config().heat
        })
        .map_err(ProfilingError::Heat)?;
        // The heat the partition arrived with, as the source measured it: the window continues
        // from it.
        if let Some(carried) = carried {
            heat.seed(&carried.pages, 1.0);
        }
        let number = state.next_window;
        state.next_window += 1;
        let mut window = Window::new(duration, state.epoch, heat, Instant::now());
        window.seeded = carried.is_some();
        state.windows.insert(number, window);
        Ok(number)
    }

    /// Advances the epochs if one is due, and says whether window `number` is over.
    pub fn step(&self, number: u64) -> Result<Step, ProfilingError> {
        let mut guard = self.lock();
        let state = guard
            .as_mut()
            .ok_or_else(|| ProfilingError::Stopped(self.id.clone()))?;
        self.advance(state)?;
        let now = Instant::now();
        let over = state
            .windows
            .get(&number)
            .ok_or_else(|| ProfilingError::Stopped(self.id.clone()))?
            .over(now);
        if !over {
            return Ok(Step::Wait(state.last_epoch + state.epoch));
        }
        let window = state
            .windows
            .remove(&number)
            .ok_or_else(|| ProfilingError::Stopped(self.id.clone()))?;
        // A window that ended on its last epoch kept the checks it covers; one that ended for
        // lack of epochs (a paused partition) saw none run since, so the profiler's are its.
        let checks_now = match window.checks_at_end {
            Some(_) => Vec::new(),
            None => state.profiler.checks().to_vec(),
        };
        let (target, interval_ms, pool) = (
            TargetSummary::from(state.profiler.target()),
            state.epoch.as_millis() as u64,
            state.pool,
        );
        // The heat per check (and pooled) is worked out without the lock: on a large guest it
        // is whole passes over every frame, which epochs, dashboards and other windows of
        // this partition need not wait for.
        drop(guard);
        let pages = window.pages(&checks_now, self.partition.memory().frames(), pool);
        Ok(Step::Done(RecordReport {
            target,
            page_size: PAGE_SIZE,
            interval_ms,
            epochs: window.heat.epochs(),
            dropped: window.dropped,
            pages,
        }))
    }

    /// Forgets window `number` (its client went away).
    pub fn close_window(&self, number: u64) {
        if let Some(state) = self.lock().as_mut() {
            state.windows.remove(&number);
        }
    }

    /// The dashboard's view: the profiler's heat since it started, advanced if an epoch is
    /// due.
    pub fn view(&self, cells: usize) -> Result<HeatView, ProfilingError> {
        let mut guard = self.lock();
        let state = guard
            .as_mut()
            .ok_or_else(|| ProfilingError::Stopped(self.id.clone()))?;
        self.advance(state)?;
        let heat = state.profiler.heat();
        Ok(HeatView::build(
            &heat.pages(),
            self.partition.memory().frames(),
            cells,
            heat.epochs(),
        ))
    }

    /// Number of windows open (for tests and logs).
    pub fn open_windows(&self) -> usize {
        self.lock().as_ref().map_or(0, |s| s.windows.len())
    }
}

/// The daemon's shared profilers, by partition id.
#[derive(Clone, Default)]
pub struct Profilers {
    by_id: Arc<Mutex<BTreeMap<String, Arc<Shared>>>>,
    sampling: HeatSampling,
}

impl Profilers {
    /// Profilers that sample as `sampling` says.
    pub fn new(sampling: HeatSampling) -> Self {
        Self {
            by_id: Arc::default(),
            sampling,
        }
    }

    pub fn sampling(&self) -> HeatSampling {
        self.sampling
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Shared>>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared profiler of partition `id`, started if there is none. `migrating` is asked
    /// under the same lock [`Self::unwatch`] takes, so a migration that registered itself and
    /// then unwatched the partition cannot be raced by a profiler started in between. Blocks
    /// (loading the sampler, tracking the threads): call it on the blocking pool.
    pub fn get_or_start(
        &self,
        id: &str,
        partition: Arc<Partition>,
        probes: Arc<Probes>,
        migrating: impl FnOnce() -> bool,
    ) -> Result<Arc<Shared>, ProfilingError> {
        let mut by_id = self.lock();
        if let Some(shared) = by_id.get(id)
            && shared.lock().is_some()
        {
            return Ok(Arc::clone(shared));
        }
        if migrating() || partition.state() == PartitionState::Migrating {
            return Err(ProfilingError::Migrating(id.to_string()));
        }
        let mut profiler = profile_partition(
            probes,
            &partition,
            ProfilerConfig {
                interval: self.sampling.epoch(),
                sample_fraction: self.sampling.fraction(),
                recheck_fraction: self.sampling.recheck_fraction(),
                ..ProfilerConfig::default()
            },
            Sampling::ReadsAndWrites,
        )
        .map_err(ProfilingError::Start)?;
        // Nothing else re-arms these frames (no dirty log while the partition is not
        // migrating), so a fault outside the epoch after its frame's re-arming is a late
        // first touch, not heat.
        profiler.set_credit(Credit::ArmedLastEpoch);
        let shared = Arc::new(Shared {
            id: id.to_string(),
            partition,
            state: Mutex::new(Some(State {
                profiler,
                epoch: self.sampling.epoch(),
                last_epoch: Instant::now(),
                windows: BTreeMap::new(),
                next_window: 0,
                pool: self.sampling.pool(),
            })),
        });
        by_id.insert(id.to_string(), Arc::clone(&shared));
        Ok(shared)
    }

    /// Stops profiling partition `id`: its profiler is dropped now, so its vCPU threads are
    /// free for another (a migration's), and the windows open on it end with
    /// [`ProfilingError::Stopped`].
    pub fn unwatch(&self, id: &str) {
        let mut by_id = self.lock();
        if let Some(shared) = by_id.remove(id) {
            let stopped = shared.lock().take();
            drop(stopped);
        }
    }
}

/// Closes a window when its client's request ends, however it ends (a dropped request
/// included: tarpc drops the future of a call whose client went away).
pub struct OpenWindow {
    pub shared: Arc<Shared>,
    pub number: u64,
}

impl Drop for OpenWindow {
    fn drop(&mut self) {
        self.shared.close_window(self.number);
    }
}

/// How a profiling failure reaches a client.
fn api_error(error: ProfilingError) -> ApiError {
    match error {
        ProfilingError::TooManyWindows(_) => ApiError::Limit(error.to_string()),
        other => ApiError::Partition(error_chain(&other)),
    }
}

impl Daemon {
    /// The shared profiler of live partition `id`, started on first use, unless the partition
    /// migrates.
    async fn shared_profiler(
        &self,
        id: &str,
    ) -> Result<Result<Arc<Shared>, ProfilingError>, ApiError> {
        let partition = self.registry.live(id)?;
        let probes = self.probes().await?;
        let profilers = self.profilers.clone();
        let outgoing = self.outgoing.clone();
        let id = id.to_string();
        blocking("starting the heat profiler", move || {
            profilers.get_or_start(&id, partition, probes, || {
                outgoing
                    .progress(&id)
                    .is_some_and(|progress| !progress.phase.is_final())
            })
        })
        .await
    }

    /// Runs a window of `duration` on `shared`, driving its epochs until it is over.
    async fn window(
        &self,
        shared: Arc<Shared>,
        duration: Duration,
    ) -> Result<RecordReport, ApiError> {
        let opening = Arc::clone(&shared);
        let carried = self.carried_heat.fresh(&shared.id);
        let number = blocking("opening a heat window", move || {
            opening.open_window(duration, carried.as_ref())
        })
        .await?
        .map_err(api_error)?;
        // Closed however this call ends, a client that hangs up included.
        let _open = OpenWindow {
            shared: Arc::clone(&shared),
            number,
        };
        loop {
            let stepping = Arc::clone(&shared);
            match blocking("advancing the heat", move || stepping.step(number))
                .await?
                .map_err(api_error)?
            {
                Step::Done(record) => return Ok(record),
                Step::Wait(at) => tokio::time::sleep_until(at.into()).await,
            }
        }
    }

    /// The dashboard's view of partition `id`. A migrating partition shows no heat: its vCPUs
    /// are the migration's profiler's.
    pub(super) async fn heat_view(&self, id: String, cells: u32) -> Result<HeatView, ApiError> {
        let cells = cells.clamp(1, 65536) as usize;
        let shared = match self.shared_profiler(&id).await? {
            Ok(shared) => shared,
            Err(ProfilingError::Migrating(_)) => {
                let frames = self.registry.live(&id)?.memory().frames();
                return Ok(HeatView::build(&[], frames, cells, 0));
            }
            Err(e) => return Err(api_error(e)),
        };
        blocking("heat", move || shared.view(cells))
            .await?
            .map_err(api_error)
    }

    /// `page_heat`: partition `id`'s heat over a window of `duration`.
    pub(super) async fn partition_heat(
        &self,
        id: String,
        duration: Duration,
    ) -> Result<PartitionHeat, ApiError> {
        // Refused before anything is started.
        check_window(duration, self.profilers.sampling().epoch()).map_err(api_error)?;
        let shared = self.shared_profiler(&id).await?.map_err(api_error)?;
        let frames = shared.partition().memory().frames();
        let record = self.window(shared, duration).await?;
        Ok(PartitionHeat {
            id,
            frames,
            duration_ms: duration.as_millis() as u64,
            record,
        })
    }

    /// `plan`: round 0's order for `strategy`, from a window of `duration` of heat.
    pub(super) async fn plan_preview(
        &self,
        id: String,
        strategy: Strategy,
        duration: Duration,
    ) -> Result<PlanPreview, ApiError> {
        check_window(duration, self.profilers.sampling().epoch()).map_err(api_error)?;
        match strategy {
            Strategy::Address => {
                let frames = self.registry.live(&id)?.memory().frames();
                blocking("planning", move || PlanPreview::address(&id, frames)).await
            }
            Strategy::Heat => {
                let shared = self.shared_profiler(&id).await?.map_err(api_error)?;
                let frames = shared.partition().memory().frames();
                let record = self.window(shared, duration).await?;
                let millis = duration.as_millis() as u64;
                blocking("planning", move || {
                    PlanPreview::heat(&id, frames, millis, &record)
                })
                .await?
                .map_err(|e| ApiError::Partition(error_chain(&e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use heatprobe::PageHeat;

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
