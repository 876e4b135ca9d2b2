//! A minimal KVM test VM: one vCPU at CPL 3 in long mode, identity-mapped, running a tiny
//! hand-assembled program that walks a "touch list" of guest addresses, reading or writing
//! each, and then reports the pass done with an `out` to port 0x510 (hypercall 4).
//!
//! The vCPU runs on its own thread so the probes can track its thread id; the test drives it
//! one pass at a time, which makes fault counts exact and lets an epoch end between passes.

use std::{
    ops::Range,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result, anyhow, bail};
use heatprobe::{ActiveSampler, SamplerError};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

pub const PAGE: u64 = 4096;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x8000;
const TSS: u64 = 0x9000;
/// A 64-bit TSS (0x68 bytes) followed by an all-zero I/O permission bitmap (every port
/// allowed) and its terminating 0xff byte.
const TSS_IO_BITMAP: u64 = 0x68;
const TSS_LIMIT: u32 = 0x68 + 8192;
/// Where the program is loaded.
pub const CODE: u64 = 0x10_0000;
/// Where the touch list lives: u64 entries, `address | 1` for a write, ended by 0.
pub const LIST: u64 = 0x10_1000;
/// Maximum touch-list entries (one page, minus the terminator).
pub const LIST_CAPACITY: usize = 511;
/// The first page tests may touch; everything below belongs to the VM's plumbing.
pub const DATA: u64 = 0x20_0000;
const HYPERCALL_PORT: u16 = 0x510;
const HYPERCALL_PASS_DONE: u32 = 4;

/// The guest program (see the module docs). Offsets in the comments are byte offsets.
fn program() -> Vec<u8> {
    let mut code = vec![0x48, 0xBB]; // 0: mov rbx, LIST
    code.extend_from_slice(&LIST.to_le_bytes());
    code.extend_from_slice(&[
        0x48, 0x8B, 0x03, // 10: loop: mov rax, [rbx]
        0x48, 0x85, 0xC0, // 13: test rax, rax
        0x74, 0x16, // 16: jz done (40)
        0x48, 0x83, 0xC3, 0x08, // 18: add rbx, 8
        0xA8, 0x01, // 22: test al, 1
        0x75, 0x05, // 24: jnz write (31)
        0x48, 0x8B, 0x08, // 26: mov rcx, [rax]
        0xEB, 0xEB, // 29: jmp loop
        0x48, 0x83, 0xE0, 0xFE, // 31: write: and rax, -2
        0x48, 0x89, 0x08, // 35: mov [rax], rcx
        0xEB, 0xE2, // 38: jmp loop
        0x66, 0xBA, 0x10, 0x05, // 40: done: mov dx, 0x510
        0xB8, 0x04, 0x00, 0x00, 0x00, // 44: mov eax, 4
        0xEF, // 49: out dx, eax
        0xEB, 0xCC, // 50: jmp 0
    ]);
    code
}

/// Guest RAM: a memfd mapped shared, so MADV_DONTNEED drops only the mapping, not the data.
pub struct GuestRam {
    ptr: *mut u8,
    size: usize,
    _memfd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; every access goes through volatile reads and
// writes or madvise, and the pointer stays valid until Drop.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    fn new(size: usize) -> Result<Self> {
        // SAFETY: the name is a valid C string; flags are plain.
        let fd = unsafe { libc::memfd_create(c"testvm-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            bail!("memfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid fd; size fits in off_t for test sizes.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), size as libc::off_t) } != 0 {
            bail!("ftruncate: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            size,
            _memfd: memfd,
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= self.size, "write outside RAM");
        // SAFETY: bounds checked above; the mapping is live.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        };
    }

    pub fn write_u64(&self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }

    /// Drops the host mapping of `pages` (page numbers); the data stays in the memfd.
    pub fn drop_mapping(&self, pages: Range<u64>) -> std::io::Result<()> {
        let start = (pages.start * PAGE) as usize;
        let len = ((pages.end - pages.start) * PAGE) as usize;
        assert!(start + len <= self.size, "range outside RAM");
        // SAFETY: the range lies inside our shared mapping; MADV_DONTNEED on a shared memfd
        // mapping only zaps page-table entries.
        let rc = unsafe { libc::madvise(self.ptr.add(start).cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

enum Command {
    RunPass,
}

/// A running test VM.
pub struct TestVm {
    pub ram: Arc<GuestRam>,
    vm: Arc<VmFd>,
    vcpu_tid: u32,
    commands: Sender<Command>,
    results: Receiver<Result<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestVm {
    /// Creates a VM with `mem_size` bytes of RAM (a multiple of 2 MiB, at least 4 MiB), dirty
    /// logging on, and its vCPU parked on a thread waiting for [`TestVm::run_pass`].
    pub fn new(mem_size: usize) -> Result<Self> {
        if !mem_size.is_multiple_of(2 << 20) || mem_size < (4 << 20) {
            bail!("test VM memory must be a multiple of 2 MiB, at least 4 MiB");
        }
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        let ram = Arc::new(GuestRam::new(mem_size)?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: mem_size as u64,
            userspace_addr: ram.ptr as u64,
        };
        // SAFETY: the region is our live mapping of exactly mem_size bytes, and the VM (held in
        // the same TestVm) is dropped before the mapping (field order and the join in Drop).
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        write_page_tables(&ram, mem_size as u64);
        ram.write(CODE, &program());
        // I/O map base, at offset 0x66 of the TSS; then the bitmap's terminator.
        ram.write(TSS + 0x66, &(TSS_IO_BITMAP as u16).to_le_bytes());
        ram.write(TSS + TSS_IO_BITMAP + 8192, &[0xff]);
        ram.write_u64(LIST, 0);
        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        setup_vcpu(&vcpu, mem_size as u64)?;

        let (commands, command_rx) = mpsc::channel();
        let (result_tx, results) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || vcpu_thread(vcpu, tid_tx, command_rx, result_tx));
        let vcpu_tid = tid_rx.recv().context("vCPU thread died at start")?;
        Ok(Self {
            ram,
            vm: Arc::new(vm),
            vcpu_tid,
            commands,
            results,
            thread: Some(thread),
        })
    }

    /// The thread id KVM runs this VM's vCPU on.
    pub fn vcpu_tid(&self) -> u32 {
        self.vcpu_tid
    }

    /// Replaces the touch list: `(guest address, write?)`.
    pub fn set_touch_list(&self, touches: &[(u64, bool)]) -> Result<()> {
        if touches.len() > LIST_CAPACITY {
            bail!("at most {LIST_CAPACITY} touches");
        }
        for (i, &(gpa, write)) in touches.iter().enumerate() {
            if !gpa.is_multiple_of(8) || gpa < DATA || gpa as usize >= self.ram.size() {
                bail!("touch address {gpa:#x} is not an aligned data address");
            }
            self.ram
                .write_u64(LIST + 8 * i as u64, gpa | u64::from(write));
        }
        self.ram.write_u64(LIST + 8 * touches.len() as u64, 0);
        Ok(())
    }

    /// Runs the guest through the touch list once.
    pub fn run_pass(&self) -> Result<()> {
        self.commands
            .send(Command::RunPass)
            .map_err(|_| anyhow!("vCPU thread is gone"))?;
        self.results
            .recv()
            .map_err(|_| anyhow!("vCPU thread is gone"))?
    }

    /// An [`ActiveSampler`] over this VM's memory.
    pub fn sampler(&self) -> TestVmSampler {
        TestVmSampler {
            ram: Arc::clone(&self.ram),
            vm: Arc::clone(&self.vm),
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // Closing the channel ends the vCPU thread; join it so the vCPU fd closes before RAM.
        let (dead, _) = mpsc::channel();
        self.commands = dead;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn vcpu_thread(
    mut vcpu: VcpuFd,
    tid: Sender<u32>,
    commands: Receiver<Command>,
    results: Sender<Result<()>>,
) {
    // SAFETY: gettid has no preconditions.
    let _ = tid.send(unsafe { libc::gettid() } as u32);
    while let Ok(Command::RunPass) = commands.recv() {
        let result = run_until_pass_done(&mut vcpu);
        if results.send(result).is_err() {
            return;
        }
    }
}

fn run_until_pass_done(vcpu: &mut VcpuFd) -> Result<()> {
    loop {
        match vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(HYPERCALL_PORT, data) => {
                let number = u32::from_le_bytes(data.try_into().unwrap_or_default());
                if number == HYPERCALL_PASS_DONE {
                    return Ok(());
                }
                bail!("unexpected hypercall {number}");
            }
            VcpuExit::Intr => continue,
            other => {
                let exit = format!("{other:?}");
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                bail!("unexpected exit {exit} at rip {rip:#x}");
            }
        }
    }
}

/// Identity map of all RAM with 2 MiB pages: present, writable, user, accessed and dirty
/// (so the guest never writes A/D bits, which would add faults of its own).
fn write_page_tables(ram: &GuestRam, mem_size: u64) {
    const PRESENT_RW_USER: u64 = 0b111;
    const ACCESSED: u64 = 1 << 5;
    const DIRTY: u64 = 1 << 6;
    const HUGE: u64 = 1 << 7;
    ram.write_u64(PML4, PDPT | PRESENT_RW_USER | ACCESSED);
    let gib = mem_size.div_ceil(1 << 30);
    for g in 0..gib {
        ram.write_u64(PDPT + 8 * g, (PD + g * PAGE) | PRESENT_RW_USER | ACCESSED);
    }
    for i in 0..mem_size / (2 << 20) {
        ram.write_u64(
            PD + 8 * i,
            (i * (2 << 20)) | PRESENT_RW_USER | ACCESSED | DIRTY | HUGE,
        );
    }
}

fn setup_vcpu(vcpu: &VcpuFd, mem_size: u64) -> Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x18 | 3,
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
        selector: 0x20 | 3,
        type_: 0b0011,
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT,
        selector: 0x28,
        type_: 0b1011,
        s: 0,
        dpl: 0,
        db: 0,
        l: 0,
        g: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 0x37;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8005_0033; // PG | WP | NE | ET | MP | PE
    sregs.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rsp: mem_size - 16,
        // IOPL 3 lets `out` from CPL 3 reach us on VMX/SVM; some backends (PVM) drop IOPL
        // and consult the TSS I/O bitmap instead, which allows every port too.
        rflags: 0x3002,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    Ok(())
}

/// Re-arms the test VM's pages for the profiler.
pub struct TestVmSampler {
    ram: Arc<GuestRam>,
    vm: Arc<VmFd>,
}

impl ActiveSampler for TestVmSampler {
    fn frames(&self) -> u64 {
        self.ram.size() as u64 / PAGE
    }

    fn rearm_writes(&mut self, _frames: Range<u64>) -> Result<(), SamplerError> {
        // Without manual dirty-log protection, fetching the log write-protects the whole slot.
        self.vm
            .get_dirty_log(0, self.ram.size())
            .map(drop)
            .map_err(|e| SamplerError {
                what: format!("KVM_GET_DIRTY_LOG: {e}"),
                source: None,
            })
    }

    fn rearm_accesses(&mut self, frames: Range<u64>) -> Result<(), SamplerError> {
        self.ram.drop_mapping(frames).map_err(|e| SamplerError {
            what: "MADV_DONTNEED".into(),
            source: Some(e),
        })
    }
}
