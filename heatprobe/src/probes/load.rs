//! Loading the eBPF object: the offsets each classic program reads (from tracefs format
//! files), loading with those offsets as global data, and attaching each program whose
//! tracepoint this kernel has, raw first where there is a raw one.

use std::sync::Mutex;

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, TracePoint},
};
use heatprobe_ebpf::{OFFSETS_GLOBAL, TracepointOffsets};
use rustix::thread::{CapabilitySet, capabilities};
use tracing::{debug, warn};

use super::{
    Loaded, ProbeError, ProbeStatus, Probes, error_chain,
    tracefs::{self, EventFormat, TracefsError},
};

/// The eBPF object, embedded at build time by `cargo xtask build`.
#[cfg(heatprobe_embedded)]
static EBPF_OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(env!("HEATPROBE_EBPF_OBJECT")));
#[cfg(not(heatprobe_embedded))]
static EBPF_OBJECT: Option<&[u8]> = None;

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
/// CAP_SYS_ADMIN, in its effective set (capget(2), rather than parsing /proc/self/status).
pub fn has_privileges() -> bool {
    let Ok(sets) = capabilities(None) else {
        return false;
    };
    let effective = sets.effective;
    effective.contains(CapabilitySet::SYS_ADMIN)
        || effective.contains(CapabilitySet::BPF | CapabilitySet::PERFMON)
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
            loaded: Mutex::new(Loaded::new(ebpf, logger)),
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
