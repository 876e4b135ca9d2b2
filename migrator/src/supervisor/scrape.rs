//! What `serve --metrics` shows of the supervisor at a scrape: its partitions and migrations
//! as `list` and `migrations` answer (each partition process asked at once, within
//! `LIST_WAIT`), its memory as admission counts it, and what ended migrations recorded.

use tarpc::context;

use super::Supervisor;
use crate::{
    api::MigratorApi,
    metrics::{
        Recorder,
        exposition::{Scrape, Snapshot},
    },
};

impl Supervisor {
    /// What the migrations that ended left behind, shared with the metrics endpoint.
    pub fn recorder(&self) -> Recorder {
        self.inner.recorder.clone()
    }

    /// Guest memory hosted and reserved, and what one more partition may still take: the room
    /// under the memory limit, and no more than the host's MemAvailable.
    pub(super) fn memory(&self) -> (u64, u64) {
        let used = self.inner.inventory.usage().memory;
        let room = self.inner.limits.max_memory.saturating_sub(used);
        let free = match crate::vmm::memory::available_memory() {
            Some(available) => room.min(available),
            None => room,
        };
        (used, free)
    }
}

impl Scrape for Supervisor {
    async fn snapshot(&self) -> Snapshot {
        let (partitions, migrations) = futures::join!(
            MigratorApi::list(self.clone(), context::current()),
            self.all_migrations()
        );
        let (memory_used, memory_free) = self.memory();
        Snapshot {
            partitions,
            migrations,
            memory_used,
            memory_free,
        }
    }
}
