//! The maps and the one function every program counts through.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::addr_of_mut,
};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    cty::c_long,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use heatprobe_ebpf::{
    ChunkCounts, ChunkKey, FAULT_TIME_SHIFT, MAX_CHUNKS, MAX_TARGETS, PAGES_PER_CHUNK, STAT_SLOTS,
    Stat, TracepointOffsets,
};

#[map]
pub static PROCESS_TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

#[map]
pub static VCPU_TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

#[map]
pub static PENDING_ACCESS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_TARGETS, 0);

/// BPF_F_NO_PREALLOC: entries are allocated as pages are first touched, so the map costs
/// memory in proportion to what is tracked, not to `MAX_CHUNKS`.
#[map]
static PAGE_COUNTS: HashMap<ChunkKey, ChunkCounts> =
    HashMap::with_max_entries(MAX_CHUNKS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static ZERO_CHUNK: Array<ChunkCounts> = Array::with_max_entries(1, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Field offsets, written by userspace before load (see `TracepointOffsets`).
#[unsafe(no_mangle)]
pub(crate) static TRACEPOINT_OFFSETS: TracepointOffsets = TracepointOffsets::ABSENT;

/// Reads one field offset. Volatile, so the compiler cannot fold in the pre-load value.
macro_rules! offset_of_field {
    ($field:ident) => {
        // SAFETY: the static is valid for reads for the program's lifetime; userspace only
        // writes it before load.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(crate::counters::TRACEPOINT_OFFSETS.$field)) }
            as usize
    };
}
pub(crate) use offset_of_field;

/// Reads the field at `offset` of the current event.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: usize) -> Result<T, c_long> {
    // SAFETY: offsets come from this kernel's format file for the attached event; read_at
    // goes through bpf_probe_read_kernel, which fails cleanly rather than faulting.
    unsafe { ctx.read_at(offset) }.map_err(c_long::from)
}

/// Adds one to a statistic and returns its new per-CPU value.
#[inline(always)]
pub fn bump(stat: Stat) -> u64 {
    match STATS.get_ptr_mut(stat as u32) {
        Some(slot) => {
            // SAFETY: per-CPU slot; the program runs with preemption off, so nothing else on
            // this CPU touches it concurrently.
            unsafe {
                *slot += 1;
                *slot
            }
        }
        None => 0,
    }
}

/// Counts one fault of `target` on `page`. This is the hot path: two map lookups and an
/// atomic add.
#[inline(always)]
pub fn count<C: EbpfContext>(ctx: &C, target: u32, page: u64, write: bool, present: bool) {
    let (key, slot) = ChunkKey::for_page(target, page);
    let counts = match PAGE_COUNTS.get_ptr_mut(&key) {
        Some(counts) => counts,
        None => {
            let Some(zero) = ZERO_CHUNK.get(0) else {
                return;
            };
            // A racing insert of the same chunk on another CPU is fine: BPF_NOEXIST makes
            // ours fail and the lookup below finds theirs.
            let _ = PAGE_COUNTS.insert(&key, zero, BPF_NOEXIST as u64);
            match PAGE_COUNTS.get_ptr_mut(&key) {
                Some(counts) => counts,
                None => {
                    if bump(Stat::Dropped) == 1 {
                        warn!(ctx, "PAGE_COUNTS is full: faults are being dropped");
                    }
                    return;
                }
            }
        }
    };
    let index = (slot & (PAGES_PER_CHUNK - 1)) + if write { PAGES_PER_CHUNK } else { 0 };
    // SAFETY: `counts` points at a live map value of type ChunkCounts, which is two arrays of
    // PAGES_PER_CHUNK u32s laid out back to back (repr(C), no padding); `index` is below
    // 2 * PAGES_PER_CHUNK by the mask above.
    let cell = unsafe { addr_of_mut!((*counts).reads).cast::<u32>().add(index) };
    // The bpf target has no atomic types (no CAS), but the instruction set has atomic add;
    // the intrinsic lowers to it.
    // SAFETY: `cell` is aligned and valid (see above); other CPUs only touch it atomically.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(cell, 1) };
    let slot = slot & (PAGES_PER_CHUNK - 1);
    // SAFETY: `last_fault` is an array of PAGES_PER_CHUNK u16s in the same live map value,
    // 2-aligned (repr(C), after the two u32 arrays); `slot` is masked below PAGES_PER_CHUNK.
    // A racing fault of the same page on another CPU writes a time just as good.
    unsafe {
        let time = addr_of_mut!((*counts).last_fault).cast::<u16>().add(slot);
        core::ptr::write_volatile(time, (bpf_ktime_get_ns() >> FAULT_TIME_SHIFT) as u16);
    }
    if present {
        bump(Stat::Protection);
    }
}

/// Records that an event's fields could not be read, logging the first time on this CPU.
#[inline(always)]
pub fn read_error<C: EbpfContext>(ctx: &C) {
    if bump(Stat::ReadErrors) == 1 {
        warn!(
            ctx,
            "could not read a tracepoint field; check the loaded offsets"
        );
    }
}
