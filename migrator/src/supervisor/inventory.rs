//! What a supervisor holds: its partition processes, the sessions they were started for, the
//! partitions that ended (stopped, migrated away, crashed), and room reserved for processes
//! still starting, under one lock so that admission sees one consistent picture.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use super::process::VmmProcess;
use crate::{
    api::ApiError, api::PartitionInfo, host::KEEP_STOPPED, host::admission::AdmissionError,
    host::admission::Limits, host::admission::Usage,
};

#[derive(Default)]
struct Held {
    processes: BTreeMap<String, Arc<VmmProcess>>,
    /// Incoming sessions, to the partition (process) each was started for.
    sessions: BTreeMap<u64, String>,
    ended: BTreeMap<String, PartitionInfo>,
    /// Ended partitions, oldest first: only the last [`KEEP_STOPPED`] are remembered.
    ended_order: VecDeque<String>,
    reserved: Usage,
}

/// A handle on what the supervisor holds.
#[derive(Default)]
pub struct Inventory {
    held: Mutex<Held>,
}

/// Room reserved for one partition process until it is in the inventory. Dropping it gives
/// the room back, so a failed launch or prepare never leaks it.
#[must_use = "a reservation is given back when dropped"]
pub struct Reservation<'a> {
    inventory: &'a Inventory,
    usage: Usage,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut held = self.inventory.lock();
        held.reserved = held.reserved.minus(self.usage);
    }
}

impl Reservation<'_> {
    /// The process is in the inventory from the same instant the reservation ends.
    pub fn host(self, vmm: Arc<VmmProcess>) {
        let mut held = self.inventory.lock();
        insert(&mut held, vmm);
        held.reserved = held.reserved.minus(self.usage);
        drop(held);
        std::mem::forget(self);
    }
}

fn insert(held: &mut Held, vmm: Arc<VmmProcess>) {
    if let Some(session) = vmm.record.session {
        held.sessions.insert(session, vmm.id().to_string());
    }
    held.ended.remove(vmm.id());
    held.processes.insert(vmm.id().to_string(), vmm);
}

impl Inventory {
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves room for one more partition of `memory` bytes, or says which limit it breaks.
    pub fn reserve(&self, limits: &Limits, memory: u64) -> Result<Reservation<'_>, AdmissionError> {
        let mut held = self.lock();
        limits.admit(used(&held), memory)?;
        let usage = Usage::one(memory);
        held.reserved = held.reserved.plus(usage);
        Ok(Reservation {
            inventory: self,
            usage,
        })
    }

    /// A process adopted from a predecessor.
    pub fn insert(&self, vmm: Arc<VmmProcess>) {
        insert(&mut self.lock(), vmm);
    }

    /// Partition process `vmm` ended, its partition as `info` (if it had one): both at once,
    /// so that no one sees the partition neither live nor ended.
    pub fn replace(&self, vmm: &Arc<VmmProcess>, info: Option<PartitionInfo>) {
        let mut held = self.lock();
        remove(&mut held, vmm);
        if let Some(info) = info {
            ended(&mut held, info);
        }
    }

    /// Remembers how a partition ended.
    pub fn ended(&self, info: PartitionInfo) {
        ended(&mut self.lock(), info);
    }

    pub fn process(&self, id: &str) -> Option<Arc<VmmProcess>> {
        self.lock().processes.get(id).cloned()
    }

    /// The process partition `id` runs in, or why there is none.
    pub fn live(&self, id: &str) -> Result<Arc<VmmProcess>, ApiError> {
        let held = self.lock();
        if let Some(vmm) = held.processes.get(id) {
            return Ok(Arc::clone(vmm));
        }
        Err(match held.ended.get(id) {
            Some(info) => ApiError::Partition(format!("partition `{id}` is {}", info.state.name())),
            None => ApiError::UnknownPartition(id.to_string()),
        })
    }

    /// The process incoming session `session` runs in.
    pub fn session(&self, session: u64) -> Result<Arc<VmmProcess>, ApiError> {
        let held = self.lock();
        held.sessions
            .get(&session)
            .and_then(|id| held.processes.get(id))
            .cloned()
            .ok_or(ApiError::UnknownSession(session))
    }

    pub fn ended_info(&self, id: &str) -> Option<PartitionInfo> {
        self.lock().ended.get(id).cloned()
    }

    pub fn processes(&self) -> Vec<Arc<VmmProcess>> {
        self.lock().processes.values().cloned().collect()
    }

    pub fn ended_infos(&self) -> Vec<PartitionInfo> {
        self.lock().ended.values().cloned().collect()
    }

    /// Partitions known: live, or ended and remembered.
    pub fn len(&self) -> usize {
        let held = self.lock();
        held.processes.len() + held.ended.len()
    }

    /// Partition processes: what the supervisor holds (each holds its own sessions).
    pub fn holds(&self) -> usize {
        self.lock().processes.len()
    }

    /// What admission counts: the processes hosted and the room reserved.
    pub fn usage(&self) -> Usage {
        used(&self.lock())
    }
}

fn used(held: &Held) -> Usage {
    held.processes
        .values()
        .map(|p| Usage::one(p.record.mem_bytes))
        .fold(Usage::default(), Usage::plus)
        .plus(held.reserved)
}

fn remove(held: &mut Held, vmm: &Arc<VmmProcess>) {
    if held
        .processes
        .get(vmm.id())
        .is_some_and(|p| Arc::ptr_eq(p, vmm))
    {
        held.processes.remove(vmm.id());
    }
    held.sessions.retain(|_, id| id != vmm.id());
}

/// Remembers how a partition ended; forgets the oldest past [`KEEP_STOPPED`].
fn ended(held: &mut Held, info: PartitionInfo) {
    let id = info.id.clone();
    held.ended.insert(id.clone(), info);
    held.ended_order.retain(|old| *old != id);
    held.ended_order.push_back(id);
    while held.ended_order.len() > KEEP_STOPPED {
        if let Some(old) = held.ended_order.pop_front() {
            held.ended.remove(&old);
        }
    }
}
