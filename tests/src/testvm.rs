//! A minimal KVM test VM: one vCPU at CPL 3 in long mode, identity-mapped, running a tiny
//! hand-assembled program that walks a "touch list" of guest addresses, reading or writing
//! each, and then reports the pass done with an `out` to port 0x510 (hypercall 4).
//!
//! It boots with the partitions' own layout (`migrator::vmm::layout`): the same page tables,
//! GDT and TSS. The vCPU runs on its own thread so the probes can track its thread id; the test
//! drives it one pass at a time, which makes fault counts exact and lets an epoch end between
//! passes.

use std::{
    ops::Range,
    sync::{
        Arc,
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result, anyhow, bail};
use heatprobe::{ActiveSampler, SamplerError};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migrator::vmm::{GuestAddress, GuestMemory, layout};

pub const PAGE: u64 = 4096;
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

enum Command {
    RunPass,
}

/// A running test VM.
pub struct TestVm {
    pub ram: Arc<GuestMemory>,
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
        let ram = Arc::new(GuestMemory::new(mem_size as u64)?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: mem_size as u64,
            userspace_addr: ram.host_address(),
        };
        // SAFETY: the region is our live mapping of exactly mem_size bytes, and the VM (held in
        // the same TestVm) is dropped before the mapping (field order and the join in Drop).
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        // The partitions' own boot layout: page tables, GDT, TSS with its I/O bitmap.
        layout::write_vmm_area(&ram, 1, 0, "")?;
        ram.write(GuestAddress(CODE), &program())?;
        ram.write_u64(GuestAddress(LIST), 0)?;
        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        let sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
        vcpu.set_sregs(&layout::boot_sregs(sregs))
            .context("KVM_SET_SREGS")?;
        vcpu.set_regs(&layout::boot_regs(GuestAddress(CODE), mem_size as u64, 0))
            .context("KVM_SET_REGS")?;

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
            if !gpa.is_multiple_of(8) || gpa < DATA || gpa >= self.ram.size() {
                bail!("touch address {gpa:#x} is not an aligned data address");
            }
            self.ram
                .write_u64(GuestAddress(LIST + 8 * i as u64), gpa | u64::from(write))?;
        }
        self.ram
            .write_u64(GuestAddress(LIST + 8 * touches.len() as u64), 0)?;
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

/// Re-arms the test VM's pages for the profiler.
pub struct TestVmSampler {
    ram: Arc<GuestMemory>,
    vm: Arc<VmFd>,
}

impl ActiveSampler for TestVmSampler {
    fn frames(&self) -> u64 {
        self.ram.frames()
    }

    fn rearm_writes(&mut self, _frames: Range<u64>) -> Result<(), SamplerError> {
        // Without manual dirty-log protection, fetching the log write-protects the whole slot.
        self.vm
            .get_dirty_log(0, self.ram.size() as usize)
            .map(drop)
            .map_err(|e| SamplerError {
                what: format!("KVM_GET_DIRTY_LOG: {e}"),
                source: None,
            })
    }

    fn rearm_accesses(&mut self, frames: Range<u64>) -> Result<(), SamplerError> {
        self.ram.drop_mapping(frames).map_err(|e| SamplerError {
            what: format!("MADV_DONTNEED: {e}"),
            source: None,
        })
    }
}
