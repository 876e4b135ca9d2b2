//! The VMM's part of guest memory (below 1 MiB) and the boot state of a vCPU: 64-bit mode at
//! CPL 3, all RAM identity-mapped with user, writable, executable 2 MiB pages.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use migrator_guest::abi::{ARGS_LEN, MAX_VCPUS, PROGRESS_OFFSET, STACK_SIZE};
use migrator_guest::{BootInfo, Progress};

use super::memory::{GuestAddress, GuestMemory, MemoryError};

pub const PML4: GuestAddress = GuestAddress(0x1000);
pub const PDPT: GuestAddress = GuestAddress(0x2000);
/// Page directories, one per GiB, from here: room for 64 GiB.
pub const PAGE_DIRECTORIES: GuestAddress = GuestAddress(0x3000);
pub const MAX_MEMORY: u64 = 64 << 30;
pub const GDT: GuestAddress = GuestAddress(0x5_0000);
/// A 64-bit TSS followed by an I/O permission bitmap allowing every port (see `tss`).
pub const TSS: GuestAddress = GuestAddress(0x5_1000);
const TSS_IO_BITMAP_OFFSET: u64 = 0x68;
const TSS_LIMIT: u32 = 0x68 + 8192;
/// The boot-info page.
pub const BOOT_INFO: GuestAddress = GuestAddress(0x6_0000);

const CODE_SELECTOR: u16 = 0x18 | 3;
const DATA_SELECTOR: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;

/// Writes page tables, GDT, TSS and boot info. `args` must be shorter than the ABI's field.
pub fn write_vmm_area(
    memory: &GuestMemory,
    vcpus: u32,
    tsc_khz: u64,
    args: &str,
) -> Result<(), MemoryError> {
    assert!(
        vcpus <= MAX_VCPUS && args.len() < ARGS_LEN && !args.contains('\0'),
        "checked by the caller"
    );
    const PRESENT_RW_USER: u64 = 0b111;
    const ACCESSED: u64 = 1 << 5;
    const DIRTY: u64 = 1 << 6;
    const HUGE: u64 = 1 << 7;
    let size = memory.size();
    memory.write_u64(PML4, PDPT.0 | PRESENT_RW_USER | ACCESSED)?;
    for gib in 0..size.div_ceil(1 << 30) {
        let pd = PAGE_DIRECTORIES.0 + gib * 0x1000;
        memory.write_u64(
            GuestAddress(PDPT.0 + 8 * gib),
            pd | PRESENT_RW_USER | ACCESSED,
        )?;
    }
    // A/D pre-set so the guest never writes them (which would add faults of its own).
    for i in 0..size.div_ceil(2 << 20) {
        memory.write_u64(
            GuestAddress(PAGE_DIRECTORIES.0 + 8 * i),
            (i << 21) | PRESENT_RW_USER | ACCESSED | DIRTY | HUGE,
        )?;
    }
    // GDT: null, (unused), (unused), 64-bit user code, user data, 16-byte TSS descriptor.
    let code: u64 = 0x00af_fb00_0000_ffff;
    let data: u64 = 0x00cf_f300_0000_ffff;
    memory.write_u64(GuestAddress(GDT.0 + 0x18), code)?;
    memory.write_u64(GuestAddress(GDT.0 + 0x20), data)?;
    let (tss_low, tss_high) = tss_descriptor(TSS.0, TSS_LIMIT);
    memory.write_u64(GuestAddress(GDT.0 + 0x28), tss_low)?;
    memory.write_u64(GuestAddress(GDT.0 + 0x30), tss_high)?;
    // I/O map base at offset 0x66; the bitmap (all zero: every port allowed) and its 0xff end.
    memory.write(
        GuestAddress(TSS.0 + 0x66),
        &(TSS_IO_BITMAP_OFFSET as u16).to_le_bytes(),
    )?;
    memory.write(GuestAddress(TSS.0 + TSS_IO_BITMAP_OFFSET + 8192), &[0xff])?;

    // Invariant: asserted at the top (the caller checked the args).
    let boot = boot_info(vcpus, size, tsc_khz, args).expect("args checked by the caller");
    memory.write(BOOT_INFO, &boot)
}

/// The boot-info header the guest reads, or `None` if `args` does not fit its field or holds
/// a NUL (`PartitionConfig::checked_boot_args` refuses such args first).
pub fn boot_info(
    vcpus: u32,
    mem_size: u64,
    tsc_khz: u64,
    args: &str,
) -> Option<[u8; PROGRESS_OFFSET]> {
    BootInfo::new(vcpus, mem_size, tsc_khz, args).map(|info| info.to_bytes())
}

fn tss_descriptor(base: u64, limit: u32) -> (u64, u64) {
    let limit = u64::from(limit);
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, type 9 (available 64-bit TSS)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (low, base >> 32)
}

/// Guest address of vCPU `index`'s progress counters.
pub fn progress_address(index: u32) -> GuestAddress {
    GuestAddress(
        BOOT_INFO.0 + PROGRESS_OFFSET as u64 + u64::from(index) * size_of::<Progress>() as u64,
    )
}

/// The frames the VMM itself reads while the guest runs (the progress counters' page), in
/// order and without duplicates. A hybrid migration sends them within the downtime, so that
/// the destination never waits for one of them after the handover.
pub fn vmm_read_frames(vcpus: u32) -> Vec<u64> {
    let mut frames: Vec<u64> = (0..vcpus)
        .flat_map(|i| {
            let first = progress_address(i);
            let last = GuestAddress(first.0 + size_of::<Progress>() as u64 - 1);
            [first.frame(), last.frame()]
        })
        .collect();
    frames.sort_unstable();
    frames.dedup();
    frames
}

/// Top of vCPU `index`'s stack.
pub fn stack_top(mem_size: u64, index: u32) -> u64 {
    mem_size - u64::from(index) * STACK_SIZE
}

/// Special registers for 64-bit CPL 3 with paging on, starting from what KVM reports.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0b1011,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0b0011,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS.0,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0b1011,
        s: 0,
        dpl: 0,
        db: 0,
        l: 0,
        g: 0,
        ..code
    };
    sregs.gdt.base = GDT.0;
    sregs.gdt.limit = 0x37;
    sregs.cr3 = PML4.0;
    // PAE, and OSFXSR | OSXMMEXCPT so images may use SSE (compilers emit it freely).
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
    sregs.cr0 = 0x8005_0033; // PG | WP | NE | ET | MP | PE
    sregs.efer = 0x500; // LMA | LME
    sregs
}

/// General registers at entry: RIP = entry, RSP = stack top, RDI = boot info, RSI = index.
pub fn boot_regs(entry: GuestAddress, mem_size: u64, index: u32) -> kvm_regs {
    kvm_regs {
        rip: entry.0,
        rsp: stack_top(mem_size, index),
        rdi: BOOT_INFO.0,
        rsi: u64::from(index),
        // IOPL 3 so `out` from CPL 3 exits to the VMM on VMX/SVM; PVM drops IOPL and uses the
        // TSS I/O bitmap instead, which allows every port too.
        rflags: 0x3002,
        ..Default::default()
    }
}
