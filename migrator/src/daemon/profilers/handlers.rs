//! The API's heat calls (`heat_view`, `page_heat`, `plan`), answered from the shared
//! profilers.

use std::{sync::Arc, time::Duration};

use heatprobe::report::RecordReport;

use crate::api::{
    ApiError,
    heat_report::{PartitionHeat, PlanPreview},
    heat_view::HeatView,
};
use crate::daemon::{blocking, error_chain, server::Daemon};
use crate::migration::Strategy;
use crate::vmm::PartitionState;
use tracing::debug;

use super::{OpenWindow, ProfilingError, Shared, Step, check_window};

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

    /// Keeps the heat of every running partition warm (`serve --heat-profile warm`): starts
    /// its shared profiler if it has none and ends an epoch if one is due. Called once an
    /// epoch. Partitions that migrate, out or in (a session holds them until every page is
    /// in place), are left alone: their vCPUs are the migration's, and their memory is not
    /// all there.
    pub async fn keep_heat_warm(&self) {
        if !self.profilers.sampling().warm() {
            return;
        }
        for (id, partition) in self.registry.live_by_id() {
            if partition.state() != PartitionState::Running
                || self.registry.held_by_session(&id).is_some()
            {
                continue;
            }
            let shared = match self.shared_profiler(&id).await {
                Ok(Ok(shared)) => shared,
                Ok(Err(e)) => {
                    debug!("warm heat of `{id}`: {}", error_chain(&e));
                    continue;
                }
                Err(e) => {
                    debug!("warm heat of `{id}`: {e}");
                    continue;
                }
            };
            match blocking("advancing the warm heat", move || shared.tick()).await {
                Ok(Err(e)) => debug!("warm heat of `{id}`: {}", error_chain(&e)),
                Err(e) => debug!("warm heat of `{id}`: {e}"),
                Ok(Ok(())) => {}
            }
        }
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
    pub(in crate::daemon) async fn heat_view(
        &self,
        id: String,
        cells: u32,
    ) -> Result<HeatView, ApiError> {
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
    pub(in crate::daemon) async fn partition_heat(
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
            spent: None,
        })
    }

    /// `warm_heat`: partition `id`'s warm heat, as a migration would plan from it now.
    pub(in crate::daemon) async fn warm_partition_heat(
        &self,
        id: String,
    ) -> Result<PartitionHeat, ApiError> {
        let partition = self.registry.live(&id)?;
        if !self.profilers.sampling().warm() {
            return Err(ApiError::Partition(
                "this daemon profiles on demand (`serve --heat-profile on-demand`): there is \
                 no warm heat; ask for a window with `heat --duration`"
                    .into(),
            ));
        }
        let profilers = self.profilers.clone();
        let warming = id.clone();
        let heat = blocking("reading the warm heat", move || {
            profilers.warm_record(&warming)
        })
        .await?
        .ok_or_else(|| {
            ApiError::Partition(format!(
                "partition `{id}` has no warm heat yet: it is kept while the partition runs, \
                 and not while it migrates or is paused"
            ))
        })?;
        let (record, covered, spent) = heat;
        Ok(PartitionHeat {
            id,
            frames: partition.memory().frames(),
            duration_ms: covered.as_millis() as u64,
            record,
            spent,
        })
    }

    /// `plan`: round 0's order for `strategy`, from a window of `duration` of heat.
    pub(in crate::daemon) async fn plan_preview(
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
