//! Loading the eBPF programs, attaching them, and reading their maps.
//!
//! One [`Probes`] is one loaded copy of the eBPF object with its own maps. It is internally
//! locked, so a daemon profiling several targets shares one `Arc<Probes>`.

pub mod tracefs;

use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::{Mutex, MutexGuard},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, RawTracePoint, TracePoint},
};
use heatprobe_ebpf::{
    ChunkCounts, ChunkKey, OFFSETS_GLOBAL, PAGES_PER_CHUNK, Stat, TracepointOffsets, map_names,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, warn};

use self::tracefs::EventFormat;
pub use self::tracefs::TracefsError;

/// The eBPF object, embedded at build time by `cargo xtask build`.
#[cfg(heatprobe_embedded)]
static EBPF_OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(env!("HEATPROBE_EBPF_OBJECT")));
#[cfg(not(heatprobe_embedded))]
static EBPF_OBJECT: Option<&[u8]> = None;

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "loading eBPF programs needs root (or CAP_BPF and CAP_PERFMON); run heatprobe with sudo"
    )]
    NotPrivileged,
    #[error("this heatprobe was built without its eBPF object; build it with `cargo xtask build`")]
    NotBuilt,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("the kernel refused the eBPF object")]
    Load(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("cannot load or attach the `{program}` program")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("cannot use the `{map}` map")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the tracepoint {0} is not available on this kernel, so this target cannot be profiled"
    )]
    EventUnavailable(&'static str),
    #[error("target {0:?} is not tracked")]
    UnknownTarget(TargetId),
    #[error("cannot read the map's memory use")]
    MapMemory(#[source] std::io::Error),
}

/// A tracked process or VM, as the probes know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(u32);

impl TargetId {
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Fault counts of one page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    pub reads: u64,
    pub writes: u64,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStats {
    /// Faults lost because the counts map was full.
    pub dropped: u64,
    /// Counted faults that hit a present page.
    pub protection: u64,
    /// Events whose fields could not be read.
    pub read_errors: u64,
}

/// What happened to one tracepoint program at load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStatus {
    /// `category:event`.
    pub event: &'static str,
    pub attached: bool,
    /// The program attached: a raw tracepoint reads the event's arguments, a classic one its
    /// record at offsets from the format file.
    pub program: Option<&'static str>,
    /// Why it was skipped, if it was.
    pub skipped_because: Option<String>,
}

/// The tracepoint programs and the event each attaches to.
struct ProgramSpec {
    /// Classic tracepoint program, reading fields at offsets from the format file.
    program: &'static str,
    /// Raw tracepoint program tried first, reading the event's `TP_PROTO` arguments.
    raw_program: Option<&'static str>,
    category: &'static str,
    event: &'static str,
    label: &'static str,
}

const PROGRAMS: [ProgramSpec; 5] = [
    ProgramSpec {
        program: "page_fault_user_record",
        raw_program: Some("page_fault_user"),
        category: "exceptions",
        event: "page_fault_user",
        label: "exceptions:page_fault_user",
    },
    ProgramSpec {
        program: "kvm_page_fault",
        raw_program: None,
        category: "kvm",
        event: "kvm_page_fault",
        label: "kvm:kvm_page_fault",
    },
    ProgramSpec {
        program: "kvm_mmu_pagetable_walk",
        raw_program: None,
        category: "kvmmmu",
        event: "kvm_mmu_pagetable_walk",
        label: "kvmmmu:kvm_mmu_pagetable_walk",
    },
    ProgramSpec {
        program: "kvm_mmu_spte_requested",
        raw_program: None,
        category: "kvmmmu",
        event: "kvm_mmu_spte_requested",
        label: "kvmmmu:kvm_mmu_spte_requested",
    },
    ProgramSpec {
        program: "fast_page_fault",
        raw_program: None,
        category: "kvmmmu",
        event: "fast_page_fault",
        label: "kvmmmu:fast_page_fault",
    },
];

/// The event process targets need.
pub const PROCESS_EVENT: &str = "exceptions:page_fault_user";
/// The event VM targets need.
pub const VM_EVENT: &str = "kvmmmu:kvm_mmu_spte_requested";

/// Reads the offsets one program needs. `Ok(None)` when the kernel lacks the event.
fn read_offsets(
    spec: &ProgramSpec,
    offsets: &mut TracepointOffsets,
) -> Result<Option<()>, TracefsError> {
    if !tracefs::has_event(spec.category, spec.event) {
        return Ok(None);
    }
    let format = EventFormat::read(spec.category, spec.event)?;
    match spec.program {
        "page_fault_user_record" => {
            offsets.user_fault_address = format.offset("address")?;
            offsets.user_fault_error_code = format.offset("error_code")?;
        }
        "kvm_page_fault" => {
            offsets.kvm_fault_address = format.offset("fault_address")?;
            offsets.kvm_fault_error_code = format.offset("error_code")?;
        }
        "kvm_mmu_pagetable_walk" => offsets.walk_pferr = format.offset("pferr")?,
        "kvm_mmu_spte_requested" => offsets.spte_gfn = format.offset("gfn")?,
        "fast_page_fault" => {
            offsets.fast_fault_gpa = format.offset("cr2_or_gpa")?;
            offsets.fast_fault_error_code = format.offset("error_code")?;
            offsets.fast_fault_ret = format.offset("ret")?;
            offsets.fast_fault_fixed = format.compared_constant("fixed", "ret")?;
        }
        _ => {}
    }
    Ok(Some(()))
}

/// Whether this process may load eBPF tracing programs: root, or CAP_BPF + CAP_PERFMON, or
/// CAP_SYS_ADMIN.
pub fn has_privileges() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

struct Loaded {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    next_target: u32,
    /// Which kernel keys (tgids, tids) feed each target.
    process_keys: BTreeMap<TargetId, u32>,
    vcpu_keys: BTreeMap<TargetId, Vec<u32>>,
}

/// A loaded, attached copy of the heatprobe eBPF object.
pub struct Probes {
    status: Vec<ProbeStatus>,
    loaded: Mutex<Loaded>,
}

impl Probes {
    /// Mounts tracefs if needed, loads the programs and attaches every one whose tracepoint this
    /// kernel has. A missing tracepoint is skipped with a warning; which targets can then be
    /// tracked is checked by [`Probes::track_process`] and [`Probes::track_vcpus`].
    pub fn load() -> Result<Self, ProbeError> {
        if !has_privileges() {
            return Err(ProbeError::NotPrivileged);
        }
        let object = EBPF_OBJECT.ok_or(ProbeError::NotBuilt)?;
        if tracefs::ensure_mounted()? {
            debug!("mounted tracefs at {}", tracefs::TRACEFS);
        }
        let mut offsets = TracepointOffsets::ABSENT;
        let mut available = Vec::new();
        let mut status = Vec::new();
        for spec in &PROGRAMS {
            match read_offsets(spec, &mut offsets) {
                Ok(Some(())) => available.push(spec),
                Ok(None) => status.push(skipped(spec, "this kernel has no such tracepoint")),
                Err(e) => status.push(skipped(spec, &e.to_string())),
            }
        }
        let mut ebpf = EbpfLoader::new()
            .override_global(OFFSETS_GLOBAL, &offsets, true)
            .load(object)
            .map_err(ProbeError::Load)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                // The programs only log on rare failures; counting works without the logger.
                warn!("eBPF log forwarding is unavailable: {e}");
                None
            }
        };
        for spec in available {
            match attach(&mut ebpf, spec) {
                Ok(program) => status.push(ProbeStatus {
                    event: spec.label,
                    attached: true,
                    program: Some(program),
                    skipped_because: None,
                }),
                Err(e) => status.push(skipped(spec, &error_chain(&e))),
            }
        }
        status.sort_by_key(|s| PROGRAMS.iter().position(|p| p.label == s.event));
        Ok(Self {
            status,
            loaded: Mutex::new(Loaded {
                ebpf,
                logger,
                next_target: 1,
                process_keys: BTreeMap::new(),
                vcpu_keys: BTreeMap::new(),
            }),
        })
    }

    /// What was attached and what was skipped.
    pub fn status(&self) -> &[ProbeStatus] {
        &self.status
    }

    /// Whether `event` (`category:name`) is attached.
    pub fn is_attached(&self, event: &str) -> bool {
        self.status.iter().any(|s| s.event == event && s.attached)
    }

    fn lock(&self) -> MutexGuard<'_, Loaded> {
        // A panic while holding the lock leaves only plain map handles behind; keep going.
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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

/// Attaches the raw program if there is one and it attaches, else the classic one. Returns
/// the name of the program attached.
fn attach(ebpf: &mut Ebpf, spec: &ProgramSpec) -> Result<&'static str, ProbeError> {
    if let Some(raw) = spec.raw_program {
        match attach_raw(ebpf, raw, spec.event) {
            Ok(()) => return Ok(raw),
            Err(e) => warn!(
                "raw tracepoint {} unavailable ({}); using the classic tracepoint",
                spec.event,
                error_chain(&e)
            ),
        }
    }
    let program_error = |source| ProbeError::Program {
        program: spec.program,
        source,
    };
    let program: &mut TracePoint = ebpf
        .program_mut(spec.program)
        .ok_or(ProbeError::MissingProgram(spec.program))?
        .try_into()
        .map_err(program_error)?;
    program.load().map_err(program_error)?;
    program
        .attach(spec.category, spec.event)
        .map_err(program_error)?;
    Ok(spec.program)
}

fn attach_raw(ebpf: &mut Ebpf, name: &'static str, event: &str) -> Result<(), ProbeError> {
    let program_error = |source| ProbeError::Program {
        program: name,
        source,
    };
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::MissingProgram(name))?
        .try_into()
        .map_err(program_error)?;
    program.load().map_err(program_error)?;
    program.attach(event).map_err(program_error)?;
    Ok(())
}

fn skipped(spec: &ProgramSpec, why: &str) -> ProbeStatus {
    warn!("skipping tracepoint {}: {why}", spec.label);
    ProbeStatus {
        event: spec.label,
        attached: false,
        program: None,
        skipped_because: Some(why.to_string()),
    }
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
