//! The shared profiler of one partition: its epochs, advanced when a client asks and at
//! most once per epoch, the windows open on it, and the dashboard's view.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use heatprobe::{
    HeatConfig, HeatMap, PAGE_SIZE, Profiler,
    report::{RecordReport, TargetSummary},
};

use crate::api::heat_view::HeatView;
use crate::{
    migration::source::PlanHeat,
    vmm::{Partition, PartitionState},
};

use super::{MAX_WINDOWS, ProfilingError, Window, check_window, warm::Warm, warm::WarmHeat};

/// The profiler of one partition and the windows open on it.
pub(super) struct State {
    pub(super) profiler: Profiler,
    pub(super) epoch: Duration,
    pub(super) last_epoch: Instant,
    pub(super) windows: BTreeMap<u64, Window>,
    pub(super) next_window: u64,
    /// Whether windows pool heat over neighbouring frames ([`HeatSampling::pool`]).
    pub(super) pool: bool,
    /// The warm heat, when the daemon keeps it ([`HeatSampling::warm`]).
    pub(super) warm: Option<Warm>,
}

/// One partition's shared profiler. `None` inside once it is stopped ([`Profilers::unwatch`]):
/// the profiler is dropped at once, releasing the vCPU threads, even while clients still hold
/// this.
pub struct Shared {
    pub(super) id: String,
    pub(super) partition: Arc<Partition>,
    pub(super) state: Mutex<Option<State>>,
}

/// What a window's driver does next.
pub enum Step {
    /// Ask again at this instant, when the next epoch is due.
    Wait(Instant),
    /// The window is over; its heat as `heatprobe record` reports it.
    Done(RecordReport),
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    /// Ends an epoch if one is due; the partition's frames are re-armed only if it runs.
    pub(super) fn advance(&self, state: &mut State) -> Result<(), ProfilingError> {
        let now = Instant::now();
        if now.duration_since(state.last_epoch) < state.epoch {
            return Ok(());
        }
        state.last_epoch = now;
        if self.partition.state() != PartitionState::Running {
            return Ok(());
        }
        state.profiler.end_epoch().map_err(ProfilingError::Epoch)?;
        if let Some(warm) = state.warm.as_mut() {
            let spent = state.profiler.spent();
            let (totals, weights) = (state.profiler.totals(), state.profiler.weights());
            warm.observe(totals, weights, state.profiler.checks(), spent, now);
        }
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
            // A partition's frames are re-armed, so its whole memory is seen.
            blind_spot: None,
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

    /// Advances the epochs if one is due: the warm heat's driver.
    pub fn tick(&self) -> Result<(), ProfilingError> {
        let mut guard = self.lock();
        let state = guard
            .as_mut()
            .ok_or_else(|| ProfilingError::Stopped(self.id.clone()))?;
        self.advance(state)
    }

    /// The warm heat a migration would plan from now, if the daemon keeps it and an epoch
    /// has run.
    pub fn warm_heat(&self) -> Option<WarmHeat> {
        let guard = self.lock();
        let state = guard.as_ref()?;
        let warm = state.warm.as_ref()?;
        warm.heat(
            state.profiler.checks(),
            state.profiler.spent(),
            self.partition.memory().frames(),
            self.partition.vcpu_tids().len() as u32,
            Instant::now(),
        )
    }

    /// The warm heat as `heatprobe record` reports a target's, with the window it covers and
    /// its spend.
    pub fn warm_record(
        &self,
    ) -> Option<(RecordReport, Duration, Option<heatprobe::budget::Spent>)> {
        let (target, interval_ms) = {
            let guard = self.lock();
            let state = guard.as_ref()?;
            (
                TargetSummary::from(state.profiler.target()),
                state.epoch.as_millis() as u64,
            )
        };
        let heat = self.warm_heat()?;
        let epochs = match interval_ms {
            0 => 0,
            ms => heat.covered.as_millis() as u64 / ms,
        };
        Some((
            RecordReport {
                target,
                page_size: PAGE_SIZE,
                interval_ms,
                epochs,
                dropped: 0,
                pages: heat.pages,
                blind_spot: None,
            },
            heat.covered,
            heat.spent,
        ))
    }

    /// Number of windows open (for tests and logs).
    pub fn open_windows(&self) -> usize {
        self.lock().as_ref().map_or(0, |s| s.windows.len())
    }
}
