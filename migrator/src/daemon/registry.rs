//! The daemon's inventory: its partitions (live, and the last few stopped), the incoming
//! migration sessions, and the room reserved for launches and migrations still starting,
//! all under one lock, so admission sees one consistent picture.

use crate::host::KEEP_STOPPED;
use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use crate::{
    api::{ApiError, PartitionInfo},
    host::admission::{AdmissionError, Limits, Usage},
};
use crate::{
    migration::destination::{Session, SessionPhase},
    vmm::Partition,
};

pub enum Entry {
    Live(Arc<Partition>),
    /// What a stopped partition last looked like; its memory is freed.
    Stopped(Box<PartitionInfo>),
}

#[derive(Default)]
struct Inventory {
    partitions: BTreeMap<String, Entry>,
    /// Stopped partitions, oldest first: only the last [`KEEP_STOPPED`] are remembered.
    stopped_order: VecDeque<String>,
    sessions: BTreeMap<u64, Arc<Session>>,
    /// Promised to launches and incoming migrations that are not in the maps yet.
    reserved: Usage,
    /// Recent sessions that committed, with the partition each became, in case their source
    /// aborts after all (it stopped waiting for the commit's answer).
    committed: VecDeque<(u64, String)>,
    /// Recent sessions dropped with nothing of them running here, for a source that asks for
    /// their handover later: it is told so for certain.
    dropped: VecDeque<u64>,
}

impl Inventory {
    /// What the live partitions and incoming sessions hold.
    fn hosted(&self) -> Usage {
        let partitions = self.partitions.values().filter_map(|e| match e {
            Entry::Live(p) => Some(Usage::one(p.config().mem_size)),
            Entry::Stopped(_) => None,
        });
        // A committed session's memory is its partition's, counted once.
        let sessions = self
            .sessions
            .iter()
            .filter(|(id, _)| !self.committed.iter().any(|(s, _)| s == *id))
            .map(|(_, s)| Usage::one(s.config.mem_size));
        partitions
            .chain(sessions)
            .fold(Usage::default(), Usage::plus)
    }
}

/// A handle on the inventory; clones share it.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inventory>>,
}

/// Room reserved for one partition until it is live (or a session holds it). Dropping it
/// unused gives the room back, so a failed launch or prepare never leaks it.
#[must_use = "a reservation is given back when dropped"]
pub struct Reservation {
    registry: Registry,
    usage: Usage,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut inventory = self.registry.lock();
        inventory.reserved = inventory.reserved.minus(self.usage);
    }
}

impl Reservation {
    /// The reserved partition is live as `id`: it counts as hosted from the same instant
    /// the reservation ends.
    pub fn host_partition(self, id: String, partition: Arc<Partition>) {
        self.settle(|inventory| {
            inventory.partitions.insert(id, Entry::Live(partition));
        });
    }

    /// The reserved room is held by incoming session `id` from now on.
    pub fn host_session(self, id: u64, session: Arc<Session>) {
        self.settle(|inventory| {
            inventory.sessions.insert(id, session);
        });
    }

    /// Ends the reservation and applies `hosting` under the same lock.
    fn settle(mut self, hosting: impl FnOnce(&mut Inventory)) {
        let mut inventory = self.registry.lock();
        hosting(&mut inventory);
        inventory.reserved = inventory.reserved.minus(self.usage);
        // Nothing left for `drop` to give back.
        self.usage = Usage::default();
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inventory> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves room for one more partition of `memory` bytes, or says which limit it breaks.
    pub fn reserve(&self, limits: &Limits, memory: u64) -> Result<Reservation, AdmissionError> {
        let mut inventory = self.lock();
        limits.admit(inventory.hosted().plus(inventory.reserved), memory)?;
        let usage = Usage::one(memory);
        inventory.reserved = inventory.reserved.plus(usage);
        Ok(Reservation {
            registry: self.clone(),
            usage,
        })
    }

    pub fn live(&self, id: &str) -> Result<Arc<Partition>, ApiError> {
        match self.lock().partitions.get(id) {
            Some(Entry::Live(partition)) => Ok(Arc::clone(partition)),
            Some(Entry::Stopped(_)) => {
                Err(ApiError::Partition(format!("partition `{id}` is stopped")))
            }
            None => Err(ApiError::UnknownPartition(id.to_string())),
        }
    }

    pub fn info(&self, id: &str) -> Result<PartitionInfo, ApiError> {
        match self.lock().partitions.get(id) {
            Some(Entry::Live(partition)) => Ok(info_of(id, partition)),
            Some(Entry::Stopped(info)) => Ok((**info).clone()),
            None => Err(ApiError::UnknownPartition(id.to_string())),
        }
    }

    pub fn list(&self) -> Vec<PartitionInfo> {
        self.lock()
            .partitions
            .iter()
            .map(|(id, entry)| match entry {
                Entry::Live(partition) => info_of(id, partition),
                Entry::Stopped(info) => (**info).clone(),
            })
            .collect()
    }

    /// Partitions known, live or stopped.
    pub fn len(&self) -> usize {
        self.lock().partitions.len()
    }

    /// The ids of the live partitions, with the partitions.
    pub fn live_by_id(&self) -> Vec<(String, Arc<Partition>)> {
        self.lock()
            .partitions
            .iter()
            .filter_map(|(id, e)| match e {
                Entry::Live(p) => Some((id.clone(), Arc::clone(p))),
                Entry::Stopped(_) => None,
            })
            .collect()
    }

    pub fn live_partitions(&self) -> Vec<Arc<Partition>> {
        self.lock()
            .partitions
            .values()
            .filter_map(|e| match e {
                Entry::Live(p) => Some(Arc::clone(p)),
                Entry::Stopped(_) => None,
            })
            .collect()
    }

    pub fn session(&self, id: u64) -> Result<Arc<Session>, ApiError> {
        self.lock()
            .sessions
            .get(&id)
            .cloned()
            .ok_or(ApiError::UnknownSession(id))
    }

    /// Whether `session` is still the session registered as `id`.
    pub fn holds_session(&self, id: u64, session: &Arc<Session>) -> bool {
        self.lock()
            .sessions
            .get(&id)
            .is_some_and(|current| Arc::ptr_eq(current, session))
    }

    /// The incoming session that holds partition `id`, with its phase: the copy a commit
    /// restored is the session's, not an ordinary partition, until the session ends (at its
    /// handover in pre-copy, when every page is in place in hybrid).
    pub fn held_by_session(&self, id: &str) -> Option<(u64, SessionPhase)> {
        let holding = {
            let inventory = self.lock();
            inventory
                .committed
                .iter()
                .filter(|(_, committed)| committed == id)
                .find_map(|(session, _)| {
                    inventory
                        .sessions
                        .get(session)
                        .map(|held| (*session, Arc::clone(held)))
                })
        };
        // The session's phase is read outside the inventory's lock.
        holding.map(|(session, held)| (session, held.phase()))
    }

    /// Every incoming session held, with the partition its commit restored, if it has one.
    pub fn session_list(&self) -> Vec<(u64, Arc<Session>, Option<String>)> {
        let inventory = self.lock();
        inventory
            .sessions
            .iter()
            .map(|(&id, session)| {
                let partition = inventory
                    .committed
                    .iter()
                    .find(|(committed, _)| *committed == id)
                    .map(|(_, partition)| partition.clone());
                (id, Arc::clone(session), partition)
            })
            .collect()
    }

    /// Incoming sessions held.
    pub fn sessions(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Removes session `id`, which failed or was given up: nothing of it runs here, which a
    /// later handover is told.
    pub fn drop_session(&self, id: u64) -> Option<Arc<Session>> {
        let mut inventory = self.lock();
        inventory.dropped.push_back(id);
        while inventory.dropped.len() > KEEP_STOPPED {
            inventory.dropped.pop_front();
        }
        inventory.sessions.remove(&id)
    }

    /// Whether session `id` was dropped with nothing of it running here.
    pub fn was_dropped(&self, id: u64) -> bool {
        self.lock().dropped.contains(&id)
    }

    pub fn remove_session(&self, id: u64) -> Option<Arc<Session>> {
        self.lock().sessions.remove(&id)
    }

    /// Session `session` committed and became partition `id` (parked), remembered for a
    /// late abort or a repeated handover. The session stays until its handover (pre-copy) or
    /// its finish (hybrid).
    pub fn session_committed(&self, session: u64, id: String, partition: Arc<Partition>) {
        let mut inventory = self.lock();
        inventory
            .partitions
            .insert(id.clone(), Entry::Live(partition));
        inventory.committed.push_back((session, id));
        if inventory.committed.len() > KEEP_STOPPED {
            inventory.committed.pop_front();
        }
    }

    /// The partition committed session `session` became, still on the list.
    pub fn committed_id(&self, session: u64) -> Option<String> {
        self.lock()
            .committed
            .iter()
            .find(|(s, _)| *s == session)
            .map(|(_, id)| id.clone())
    }

    /// The partition a committed session became, forgotten from the list.
    pub fn take_committed(&self, session: u64) -> Option<String> {
        let mut inventory = self.lock();
        let found = inventory.committed.iter().position(|(s, _)| *s == session);
        found
            .and_then(|i| inventory.committed.remove(i))
            .map(|(_, id)| id)
    }

    /// Records `id` as stopped with its last `info`; forgets the oldest stopped partitions
    /// past [`KEEP_STOPPED`], so a long-lived daemon's memory stays bounded. Returns what
    /// `id` replaced and the ids forgotten.
    pub fn remember_stopped(
        &self,
        id: String,
        info: PartitionInfo,
    ) -> (Option<Entry>, Vec<String>) {
        let mut inventory = self.lock();
        let replaced = inventory
            .partitions
            .insert(id.clone(), Entry::Stopped(Box::new(info)));
        inventory.stopped_order.retain(|old| *old != id);
        inventory.stopped_order.push_back(id);
        let mut forgotten = Vec::new();
        while inventory.stopped_order.len() > KEEP_STOPPED {
            let Some(old) = inventory.stopped_order.pop_front() else {
                break;
            };
            if matches!(inventory.partitions.get(&old), Some(Entry::Stopped(_))) {
                inventory.partitions.remove(&old);
                forgotten.push(old);
            }
        }
        (replaced, forgotten)
    }
}

/// A live partition as the API reports it.
pub fn info_of(id: &str, partition: &Partition) -> PartitionInfo {
    let status = partition.status();
    let config = partition.config();
    PartitionInfo {
        id: id.to_string(),
        name: config.name.clone(),
        image: config.image.label(),
        state: status.state,
        ops: status.progress.ops,
        errors: status.progress.errors,
        checks: status.progress.checks,
        mem_bytes: config.mem_size,
        vcpus: config.vcpus,
        console: status.console,
        crash_reason: status.crash_reason,
        check_failures: status.check_failures,
        awaiting_handover: status.awaiting_handover,
        postcopy_paused: status.postcopy_paused,
        pid: None,
        process_rss_anon_bytes: None,
        unanswered_ms: None,
    }
}
