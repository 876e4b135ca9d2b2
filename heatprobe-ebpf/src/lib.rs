//! Types shared between the heatprobe eBPF programs and userspace.
//!
//! Everything here is `#[repr(C)]` with explicit padding, because the same bytes are read by
//! the kernel-side programs and by the userspace loader. Flags are `u32`, never `bool`.
//! With the `user` feature the types implement [`aya::Pod`] so userspace can read and write
//! them in maps and global data.
#![no_std]

/// log2 of the page size the probes count in.
pub const PAGE_SHIFT: u32 = 12;
/// log2 of the number of pages one map entry counts. A chunk of 64 consecutive pages shares
/// one hash-map entry, which keeps the per-entry kernel overhead (about 64 bytes of hash
/// bookkeeping) to about one byte per page when a target touches memory densely.
pub const CHUNK_SHIFT: u32 = 6;
/// Pages counted by one [`ChunkCounts`] entry.
pub const PAGES_PER_CHUNK: usize = 1 << CHUNK_SHIFT;

/// Error-code bit set when the fault hit a present page (a protection fault).
pub const PF_PRESENT: u64 = 1 << 0;
/// Error-code bit set when the faulting access was a write.
pub const PF_WRITE: u64 = 1 << 1;

/// Names of the maps in the eBPF object, shared so the two sides cannot drift apart.
pub mod map_names {
    /// `HashMap<u32 tgid, u32 target id>`: processes whose own page faults are counted.
    pub const PROCESS_TARGETS: &str = "PROCESS_TARGETS";
    /// `HashMap<u32 tid, u32 target id>`: vCPU threads whose guest faults are counted.
    pub const VCPU_TARGETS: &str = "VCPU_TARGETS";
    /// `HashMap<ChunkKey, ChunkCounts>`: the per-page fault counters.
    pub const PAGE_COUNTS: &str = "PAGE_COUNTS";
    /// `LruHashMap<u32 tid, u64 error code>`: access bits of the guest fault in flight on a
    /// vCPU thread, stashed by the walk event until the event naming the frame fires.
    pub const PENDING_ACCESS: &str = "PENDING_ACCESS";
    /// `Array<ChunkCounts>` with one all-zero entry: the initial value for a new chunk, too big
    /// for the 512-byte eBPF stack.
    pub const ZERO_CHUNK: &str = "ZERO_CHUNK";
    /// `PerCpuArray<u64>` indexed by [`super::Stat`].
    pub const STATS: &str = "STATS";
}

/// Name of the global holding [`TracepointOffsets`].
pub const OFFSETS_GLOBAL: &str = "TRACEPOINT_OFFSETS";

/// Maximum number of [`ChunkKey`] entries, so at most this many times 64 pages are counted.
pub const MAX_CHUNKS: u32 = 1 << 16;
/// Maximum tracked processes and vCPU threads.
pub const MAX_TARGETS: u32 = 4096;

/// Key of one [`ChunkCounts`] entry: which target, which run of 64 pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// Target id chosen by userspace when it tracked the process or vCPU.
    pub target: u32,
    pub _pad: u32,
    /// Page number >> [`CHUNK_SHIFT`]. Page numbers are virtual page numbers for processes
    /// and guest frame numbers for VMs.
    pub chunk: u64,
}

impl ChunkKey {
    /// The key of the chunk holding `page`, and the page's slot in it.
    #[inline(always)]
    pub fn for_page(target: u32, page: u64) -> (Self, usize) {
        (
            Self {
                target,
                _pad: 0,
                chunk: page >> CHUNK_SHIFT,
            },
            (page & (PAGES_PER_CHUNK as u64 - 1)) as usize,
        )
    }

    /// The page number of slot `slot` in this chunk.
    #[inline(always)]
    pub fn page(&self, slot: usize) -> u64 {
        (self.chunk << CHUNK_SHIFT) | slot as u64
    }
}

/// Fault counters for 64 consecutive pages. The kernel adds to them atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkCounts {
    pub reads: [u32; PAGES_PER_CHUNK],
    pub writes: [u32; PAGES_PER_CHUNK],
    /// When each page last faulted, in [`FAULT_TIME_SHIFT`] units of CLOCK_MONOTONIC
    /// (`bpf_ktime_get_ns() >> FAULT_TIME_SHIFT`, wrapping), 0 if never. A page faults once
    /// after each re-arming, so after a re-arm this is when it was first touched again: how
    /// soon tells how often it is used. 16 bits keep the chunk at 640 bytes (about 2 bytes a
    /// page more than the counts alone); they wrap every [`FAULT_TIME_WRAP_NS`], longer than
    /// the longest epoch a profiler waits for a touch. Offset 512.
    pub last_fault: [u16; PAGES_PER_CHUNK],
}

/// log2 of the nanoseconds in one unit of [`ChunkCounts::last_fault`]: 16.384 µs.
pub const FAULT_TIME_SHIFT: u32 = 14;
/// How long [`ChunkCounts::last_fault`] takes to wrap: 65536 units, about 1.07 s.
pub const FAULT_TIME_WRAP_NS: u64 = 1 << (16 + FAULT_TIME_SHIFT);

impl Default for ChunkCounts {
    fn default() -> Self {
        Self {
            reads: [0; PAGES_PER_CHUNK],
            writes: [0; PAGES_PER_CHUNK],
            last_fault: [0; PAGES_PER_CHUNK],
        }
    }
}

/// Slots of the `STATS` per-CPU array. A first-touch fault of a tracked target, the common
/// case, touches no statistic.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Faults of a tracked target lost because `PAGE_COUNTS` was full.
    Dropped = 0,
    /// Events whose fields could not be read.
    ReadErrors = 1,
    /// Counted faults that hit a present page (error-code bit 0): copy-on-write and
    /// write-protect faults, as opposed to first touches. Bumped only on those.
    Protection = 2,
}

/// Number of slots in the `STATS` array.
pub const STAT_SLOTS: u32 = 3;

/// Where a tracepoint's fields sit in its record, read by userspace from the event's tracefs
/// `format` file at load time because these layouts change between kernel versions.
/// An offset of [`FIELD_ABSENT`] marks a field or tracepoint this kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// `exceptions:page_fault_user`: `address`.
    pub user_fault_address: u32,
    /// `exceptions:page_fault_user`: `error_code`.
    pub user_fault_error_code: u32,
    /// `kvm:kvm_page_fault`: `fault_address` (guest-physical on TDP hosts).
    pub kvm_fault_address: u32,
    /// `kvm:kvm_page_fault`: `error_code`.
    pub kvm_fault_error_code: u32,
    /// `kvmmmu:kvm_mmu_pagetable_walk`: `pferr`.
    pub walk_pferr: u32,
    /// `kvmmmu:kvm_mmu_spte_requested`: `gfn`.
    pub spte_gfn: u32,
    /// `kvmmmu:fast_page_fault`: `cr2_or_gpa`.
    pub fast_fault_gpa: u32,
    /// `kvmmmu:fast_page_fault`: `error_code`.
    pub fast_fault_error_code: u32,
    /// `kvmmmu:fast_page_fault`: `ret`.
    pub fast_fault_ret: u32,
    /// The `ret` value meaning "fixed" (RET_PF_FIXED), parsed from the event's print format.
    pub fast_fault_fixed: u32,
}

/// Offset value for a field the running kernel does not have.
pub const FIELD_ABSENT: u32 = u32::MAX;

impl TracepointOffsets {
    /// All fields absent: the programs count nothing until userspace fills this in.
    pub const ABSENT: Self = Self {
        user_fault_address: FIELD_ABSENT,
        user_fault_error_code: FIELD_ABSENT,
        kvm_fault_address: FIELD_ABSENT,
        kvm_fault_error_code: FIELD_ABSENT,
        walk_pferr: FIELD_ABSENT,
        spte_gfn: FIELD_ABSENT,
        fast_fault_gpa: FIELD_ABSENT,
        fast_fault_error_code: FIELD_ABSENT,
        fast_fault_ret: FIELD_ABSENT,
        fast_fault_fixed: FIELD_ABSENT,
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: repr(C), integer fields only, padding explicit.
    unsafe impl aya::Pod for super::ChunkKey {}
    // SAFETY: plain-old-data: repr(C), arrays of integers, no padding.
    unsafe impl aya::Pod for super::ChunkCounts {}
    // SAFETY: plain-old-data: repr(C), u32 fields only, no padding.
    unsafe impl aya::Pod for super::TracepointOffsets {}
}
