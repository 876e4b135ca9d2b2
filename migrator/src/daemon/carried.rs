//! Heat that arrived with migrated partitions: kept for [`CARRIED_HEAT_FRESH`] so that their
//! heat windows start warm and a migration of them plans without profiling again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::api::{ApiError, CARRIED_HEAT_FRESH};
use crate::migration::{control::CarriedHeat, source::PlanHeat};

/// The carried heat of each partition that has some, by partition id.
#[derive(Clone, Default)]
pub struct CarriedHeats(Arc<Mutex<HashMap<String, PlanHeat>>>);

impl CarriedHeats {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, PlanHeat>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `heat` for partition `id` of `frames` pages, or refuses it, keeping nothing: a
    /// page out of range, more pages than the partition has, or a heat that is no number.
    pub fn insert(&self, id: &str, frames: u64, heat: CarriedHeat) -> Result<(), ApiError> {
        if heat.pages.len() as u64 > frames {
            return Err(ApiError::Migration(format!(
                "carried heat names {} pages, the partition has {frames}",
                heat.pages.len()
            )));
        }
        if let Some(page) = heat
            .pages
            .iter()
            .find(|p| p.page >= frames || !p.heat.is_finite() || p.heat < 0.0)
        {
            return Err(ApiError::Migration(format!(
                "carried heat of page {} (heat {}) does not fit a partition of {frames} pages",
                page.page, page.heat
            )));
        }
        let age = Duration::from_millis(heat.age_ms).min(CARRIED_HEAT_FRESH);
        let measured = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.lock().insert(
            id.to_string(),
            PlanHeat {
                pages: heat.pages.into(),
                measured,
                origin: crate::migration::report::PlanHeatOrigin::Carried,
                // The source charged its own migration for it.
                spent: None,
            },
        );
        Ok(())
    }

    /// Partition `id`'s carried heat while it is fresh; stale heat is forgotten.
    pub fn fresh(&self, id: &str) -> Option<PlanHeat> {
        let mut carried = self.lock();
        match carried.get(id) {
            Some(heat) if heat.measured.elapsed() <= CARRIED_HEAT_FRESH => Some(heat.clone()),
            Some(_) => {
                carried.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}
