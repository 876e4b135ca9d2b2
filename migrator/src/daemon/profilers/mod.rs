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
//!
//! - this file: the profilers, one per partition, and the windows' handles;
//! - `window`: one client's window and its arithmetic; `shared`: one partition's profiler;
//! - `handlers`: the API's heat calls.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use heatprobe::{Credit, Probes, ProfilerError, heat::HeatError, profiler::ProfilerConfig};
use thiserror::Error;

use crate::host::heat_sampling::HeatSampling;
use crate::vmm::{
    Partition, PartitionState,
    sampler::{Sampling, budget_for, profile_partition},
};

mod handlers;
mod shared;
mod warm;
mod window;

use shared::State;
pub use shared::{Shared, Step};
pub use warm::{WARM_SPAN, WarmHeat};
use window::Window;
pub use window::check_window;

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
    #[error("the heat budget does not fit the partition")]
    Budget(#[source] heatprobe::budget::BudgetError),
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
                budget: self
                    .sampling
                    .budget()
                    .map(|share| budget_for(&partition, share))
                    .transpose()
                    .map_err(ProfilingError::Budget)?,
                // Warm heat runs for as long as its partition does: once its sweeps agree,
                // more of the same answer is not worth the guest's time. A plan reads at
                // least half a span, which a sweep must fit in.
                paced_sweeps: self.sampling.warm().then_some(WARM_SPAN / 2),
                ..ProfilerConfig::default()
            },
            Sampling::ReadsAndWrites,
        )
        .map_err(ProfilingError::Start)?;
        // Nothing else re-arms these frames (no dirty log while the partition is not
        // migrating), so a fault outside the epoch after its frame's re-arming is a late
        // first touch, not heat.
        profiler.set_credit(Credit::ArmedLastEpoch);
        let profiler_heat = profiler.config().heat;
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
                warm: self
                    .sampling
                    .warm()
                    .then(|| warm::Warm::new(profiler_heat, self.sampling.epoch(), WARM_SPAN)),
            })),
        });
        by_id.insert(id.to_string(), Arc::clone(&shared));
        Ok(shared)
    }

    /// Partition `id`'s warm heat, if its profiler keeps some.
    pub fn warm_heat(&self, id: &str) -> Option<WarmHeat> {
        let shared = self.lock().get(id).map(Arc::clone)?;
        shared.warm_heat()
    }

    /// Partition `id`'s warm heat as a heat record, with the window it covers and its
    /// spend, if its profiler keeps some.
    pub fn warm_record(
        &self,
        id: &str,
    ) -> Option<(
        heatprobe::report::RecordReport,
        Duration,
        Option<heatprobe::budget::Spent>,
    )> {
        let shared = self.lock().get(id).map(Arc::clone)?;
        shared.warm_record()
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
