//! The maps: which kernel keys (tgids, vCPU thread ids) feed which target, and reading the
//! per-page counts, the kernel-side counters and what the counts map costs.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
};
use heatprobe_ebpf::{ChunkCounts, ChunkKey, PAGES_PER_CHUNK, Stat, map_names};

use super::{
    LastFaults, PROCESS_EVENT, PageCounts, ProbeError, ProbeStats, Probes, TargetId, VM_EVENT,
};

/// The loaded object and what userspace knows of its targets (behind the [`Probes`] lock).
pub(super) struct Loaded {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    next_target: u32,
    /// Which kernel keys (tgids, tids) feed each target.
    process_keys: BTreeMap<TargetId, u32>,
    vcpu_keys: BTreeMap<TargetId, Vec<u32>>,
}

impl Probes {
    /// Starts counting the page faults of process `pid` (all its threads).
    pub fn track_process(&self, pid: u32) -> Result<TargetId, ProbeError> {
        if !self.is_attached(PROCESS_EVENT) {
            return Err(ProbeError::EventUnavailable(PROCESS_EVENT));
        }
        let mut loaded = self.lock();
        let id = loaded.new_target();
        loaded.insert_key(map_names::PROCESS_TARGETS, pid, id)?;
        loaded.process_keys.insert(id, pid);
        Ok(id)
    }

    /// Starts counting the guest page faults handled on the vCPU threads `tids` (thread ids),
    /// all belonging to one VM.
    pub fn track_vcpus(&self, tids: &[u32]) -> Result<TargetId, ProbeError> {
        if !self.is_attached(VM_EVENT) {
            return Err(ProbeError::EventUnavailable(VM_EVENT));
        }
        let mut loaded = self.lock();
        let id = loaded.new_target();
        loaded.vcpu_keys.insert(id, Vec::new());
        for &tid in tids {
            loaded.add_vcpu(id, tid)?;
        }
        Ok(id)
    }

    /// Adds a vCPU thread to a tracked VM (a vCPU created later, say). Adding one twice is
    /// harmless.
    pub fn add_vcpu(&self, target: TargetId, tid: u32) -> Result<(), ProbeError> {
        self.lock().add_vcpu(target, tid)
    }

    /// Stops counting for `target` and deletes its counts.
    pub fn untrack(&self, target: TargetId) -> Result<(), ProbeError> {
        let mut loaded = self.lock();
        let known =
            loaded.process_keys.contains_key(&target) || loaded.vcpu_keys.contains_key(&target);
        if !known {
            return Err(ProbeError::UnknownTarget(target));
        }
        if let Some(pid) = loaded.process_keys.remove(&target) {
            loaded.remove_key(map_names::PROCESS_TARGETS, pid)?;
        }
        for tid in loaded.vcpu_keys.remove(&target).unwrap_or_default() {
            loaded.remove_key(map_names::VCPU_TARGETS, tid)?;
        }
        let mut counts = loaded.counts_map_mut()?;
        let keys: Vec<ChunkKey> = counts
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.target == target.0)
            .collect();
        for key in keys {
            // A key already gone is fine: we only want it gone.
            let _ = counts.remove(&key);
        }
        Ok(())
    }

    /// Cumulative fault counts of every page `target` has touched since it was tracked.
    pub fn counts(&self, target: TargetId) -> Result<BTreeMap<u64, PageCounts>, ProbeError> {
        self.read_counts(target, None)
    }

    /// As [`Probes::counts`], with when each counted page last faulted (in the probes' units:
    /// see [`fault_wait_ns`](super::fault_wait_ns)).
    pub fn counts_and_last_faults(
        &self,
        target: TargetId,
    ) -> Result<(BTreeMap<u64, PageCounts>, LastFaults), ProbeError> {
        let mut last_faults = LastFaults::new();
        let counts = self.read_counts(target, Some(&mut last_faults))?;
        Ok((counts, last_faults))
    }

    /// The counts of `target`, and into `last_faults` (if asked) their pages' fault times.
    fn read_counts(
        &self,
        target: TargetId,
        mut last_faults: Option<&mut LastFaults>,
    ) -> Result<BTreeMap<u64, PageCounts>, ProbeError> {
        let mut loaded = self.lock();
        if let Some(logger) = loaded.logger.as_mut() {
            logger.flush();
        }
        let counts = loaded.counts_map()?;
        let mut pages = BTreeMap::new();
        for entry in counts.iter() {
            let (key, chunk) = entry.map_err(|source| ProbeError::Map {
                map: map_names::PAGE_COUNTS,
                source,
            })?;
            if key.target != target.0 {
                continue;
            }
            for slot in 0..PAGES_PER_CHUNK {
                let (reads, writes) = (chunk.reads[slot], chunk.writes[slot]);
                if reads != 0 || writes != 0 {
                    pages.insert(
                        key.page(slot),
                        PageCounts {
                            reads: reads.into(),
                            writes: writes.into(),
                        },
                    );
                    if let Some(last_faults) = last_faults.as_deref_mut() {
                        last_faults.insert(key.page(slot), chunk.last_fault[slot]);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Number of entries (64-page chunks) in the counts map, over all targets.
    pub fn chunk_count(&self) -> Result<usize, ProbeError> {
        Ok(self.lock().counts_map()?.keys().count())
    }

    /// Bytes of kernel memory the counts map uses now, as the kernel accounts it.
    pub fn counts_map_memory(&self) -> Result<u64, ProbeError> {
        let loaded = self.lock();
        let map = loaded
            .ebpf
            .map(map_names::PAGE_COUNTS)
            .ok_or(ProbeError::MissingMap(map_names::PAGE_COUNTS))?;
        let aya::maps::Map::HashMap(data) = map else {
            return Err(ProbeError::MissingMap(map_names::PAGE_COUNTS));
        };
        let fd = data
            .info()
            .and_then(|info| info.fd())
            .map_err(|source| ProbeError::Map {
                map: map_names::PAGE_COUNTS,
                source,
            })?;
        // Hand-written where a crate exists: procfs does not read fdinfo files, and the
        // kernel's bpf_map_info (what aya reads) has no memlock field.
        let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
        let text = fs::read_to_string(Path::new(&path)).map_err(ProbeError::MapMemory)?;
        text.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                ProbeError::MapMemory(std::io::Error::other("no memlock line in fdinfo"))
            })
    }

    /// Kernel-side counters, summed over CPUs.
    pub fn stats(&self) -> Result<ProbeStats, ProbeError> {
        let loaded = self.lock();
        let map = loaded
            .ebpf
            .map(map_names::STATS)
            .ok_or(ProbeError::MissingMap(map_names::STATS))?;
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| ProbeError::Map {
                map: map_names::STATS,
                source,
            })?;
        let read = |stat: Stat| -> Result<u64, ProbeError> {
            let values = stats
                .get(&(stat as u32), 0)
                .map_err(|source| ProbeError::Map {
                    map: map_names::STATS,
                    source,
                })?;
            Ok(values.iter().sum())
        };
        Ok(ProbeStats {
            dropped: read(Stat::Dropped)?,
            protection: read(Stat::Protection)?,
            read_errors: read(Stat::ReadErrors)?,
        })
    }

    /// Kernel ids of the loaded programs, for reading their run-time statistics.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        let loaded = self.lock();
        self.status
            .iter()
            .filter_map(|status| {
                let program = loaded.ebpf.program(status.program?)?;
                let info = program.info().ok()?;
                Some((status.event, info.id()))
            })
            .collect()
    }
}

impl Loaded {
    pub(super) fn new(
        ebpf: Ebpf,
        logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ) -> Self {
        Self {
            ebpf,
            logger,
            next_target: 1,
            process_keys: BTreeMap::new(),
            vcpu_keys: BTreeMap::new(),
        }
    }

    fn new_target(&mut self) -> TargetId {
        let id = TargetId(self.next_target);
        self.next_target += 1;
        id
    }

    fn targets_map(
        &mut self,
        name: &'static str,
    ) -> Result<BpfHashMap<&mut MapData, u32, u32>, ProbeError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(ProbeError::MissingMap(name))?;
        BpfHashMap::try_from(map).map_err(|source| ProbeError::Map { map: name, source })
    }

    fn insert_key(&mut self, name: &'static str, key: u32, id: TargetId) -> Result<(), ProbeError> {
        self.targets_map(name)?
            .insert(key, id.0, 0)
            .map_err(|source| ProbeError::Map { map: name, source })
    }

    fn remove_key(&mut self, name: &'static str, key: u32) -> Result<(), ProbeError> {
        match self.targets_map(name)?.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(ProbeError::Map { map: name, source }),
        }
    }

    fn add_vcpu(&mut self, target: TargetId, tid: u32) -> Result<(), ProbeError> {
        let Some(tids) = self.vcpu_keys.get(&target) else {
            return Err(ProbeError::UnknownTarget(target));
        };
        if tids.contains(&tid) {
            return Ok(());
        }
        self.insert_key(map_names::VCPU_TARGETS, tid, target)?;
        // Checked above that the target exists.
        if let Some(tids) = self.vcpu_keys.get_mut(&target) {
            tids.push(tid);
        }
        Ok(())
    }

    fn counts_map(&self) -> Result<BpfHashMap<&MapData, ChunkKey, ChunkCounts>, ProbeError> {
        let map = self
            .ebpf
            .map(map_names::PAGE_COUNTS)
            .ok_or(ProbeError::MissingMap(map_names::PAGE_COUNTS))?;
        BpfHashMap::try_from(map).map_err(|source| ProbeError::Map {
            map: map_names::PAGE_COUNTS,
            source,
        })
    }

    fn counts_map_mut(
        &mut self,
    ) -> Result<BpfHashMap<&mut MapData, ChunkKey, ChunkCounts>, ProbeError> {
        let map = self
            .ebpf
            .map_mut(map_names::PAGE_COUNTS)
            .ok_or(ProbeError::MissingMap(map_names::PAGE_COUNTS))?;
        BpfHashMap::try_from(map).map_err(|source| ProbeError::Map {
            map: map_names::PAGE_COUNTS,
            source,
        })
    }
}
