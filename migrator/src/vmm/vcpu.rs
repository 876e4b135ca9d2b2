//! vCPUs: one thread each, running KVM_RUN, serving hypercalls, and stopping on request with
//! their state captured.
//!
//! Pausing: the partition sets the request, then kicks each thread with a signal whose handler
//! sets `immediate_exit` in the thread's `kvm_run`, so KVM_RUN returns at once even if the
//! signal lands just before it is entered; the thread then parks, saving its state first.

use std::{
    cell::Cell,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use heatprobe::probes::error_chain;
use kvm_bindings::{
    Msrs, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use migrator_guest::abi::{HYPERCALL_PORT, hypercall};
use thiserror::Error;
use tracing::{debug, warn};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::{
    memory::{GuestAddress, GuestMemory, MemoryError},
    throttle::Throttle,
};

/// MSRs saved with a vCPU: the TSC (so guest time stays monotonic across a move), and the
/// syscall, segment-base and misc MSRs a guest may have set.
pub const SAVED_MSRS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("reading the vCPU's {what} failed")]
    Get {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("setting the vCPU's {what} failed")]
    Set {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the MSR list could not be built")]
    MsrList,
    #[error("installing the vCPU kick signal handler failed")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("starting the vCPU thread failed")]
    Spawn(#[source] std::io::Error),
    #[error("kicking a vCPU thread out of KVM_RUN failed")]
    Kick(#[source] vmm_sys_util::errno::Error),
    #[error("reading the hypercall's arguments failed")]
    HypercallArgs(#[source] kvm_ioctls::Error),
    #[error("the guest's console write names a bad buffer")]
    ConsoleBuffer(#[source] MemoryError),
    #[error("unknown hypercall {0}")]
    UnknownHypercall(u32),
}

/// Everything needed to continue a vCPU elsewhere (saved as bytes by [`super::state`]).
#[derive(Debug)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<(u32, u64)>,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        // kvm_xsave ends in a flexible array KVM_GET_XSAVE never fills; the fixed region is
        // the whole state.
        let mut xsave = kvm_xsave::default();
        xsave.region = self.xsave.region;
        Self {
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            events: self.events,
            msrs: self.msrs.clone(),
        }
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn capture(vcpu: &VcpuFd) -> Result<Self, VcpuError> {
        let get = |what| move |source| VcpuError::Get { what, source };
        let entries: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(get("MSRs"))?;
        Ok(Self {
            regs: vcpu.get_regs().map_err(get("registers"))?,
            sregs: vcpu.get_sregs().map_err(get("special registers"))?,
            xsave: vcpu.get_xsave().map_err(get("XSAVE state"))?,
            // Not every backend has XCRs; a guest that never sets them loses nothing.
            xcrs: vcpu.get_xcrs().ok(),
            events: vcpu.get_vcpu_events().map_err(get("events"))?,
            msrs: msrs.as_slice()[..read]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        })
    }

    /// Writes this state into a vCPU that is not running.
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<(), VcpuError> {
        let set = |what| move |source| VcpuError::Set { what, source };
        vcpu.set_sregs(&self.sregs)
            .map_err(set("special registers"))?;
        vcpu.set_regs(&self.regs).map_err(set("registers"))?;
        // SAFETY: the buffer came from KVM_GET_XSAVE on a vCPU of the same kind, so its size
        // matches what KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(set("XSAVE state"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(set("XCRs"))?;
        }
        vcpu.set_vcpu_events(&self.events).map_err(set("events"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList)?;
        vcpu.set_msrs(&msrs).map_err(set("MSRs"))?;
        Ok(())
    }
}

/// What the partition asks of its vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Run,
    Pause,
    Stop,
}

/// Where one vCPU is.
#[derive(Clone, Debug)]
pub enum VcpuStatus {
    Starting,
    Running,
    Paused(Box<VcpuState>),
    /// The guest called the exit hypercall.
    Exited(u64),
    Crashed(String),
    Stopped,
}

impl VcpuStatus {
    /// Whether the vCPU is not running guest code.
    pub fn is_quiet(&self) -> bool {
        !matches!(self, Self::Starting | Self::Running)
    }
}

/// State shared between a partition and its vCPU threads.
pub struct Control {
    pub state: Mutex<ControlState>,
    pub changed: Condvar,
    pub throttle: Throttle,
}

pub struct ControlState {
    pub request: Request,
    pub vcpus: Vec<VcpuStatus>,
    /// Recent console output, oldest first, capped at [`CONSOLE_KEEP`] bytes.
    pub console: Vec<u8>,
    /// Self-check failures the guest reported through the hypercall.
    pub check_failures: u64,
}

/// Console bytes a partition keeps.
pub const CONSOLE_KEEP: usize = 16 * 1024;

impl Control {
    pub fn new(vcpus: usize, request: Request) -> Self {
        Self {
            state: Mutex::new(ControlState {
                request,
                vcpus: vec![VcpuStatus::Starting; vcpus],
                console: Vec::new(),
                check_failures: 0,
            }),
            changed: Condvar::new(),
            throttle: Throttle::new(vcpus),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ControlState> {
        // A vCPU thread that panicked leaves consistent plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, index: usize, status: VcpuStatus) {
        let mut state = self.lock();
        state.vcpus[index] = status;
        drop(state);
        self.changed.notify_all();
    }

    fn console_write(&self, bytes: &[u8]) {
        let mut state = self.lock();
        state.console.extend_from_slice(bytes);
        let excess = state.console.len().saturating_sub(CONSOLE_KEEP);
        state.console.drain(..excess);
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's live kvm_run mapping (set before the first
            // KVM_RUN, cleared before the vCPU fd is dropped); a byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// The signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(|errno| VcpuError::Signal(vmm_sys_util::errno::Error::new(errno)))
}

/// Sends the kick signal to a vCPU thread (whose pthread lives until it is joined; the
/// partition kicks only threads it has not joined).
///
/// vmm-sys-util checks the signal number; `pthread_kill` reports other failures as its return
/// value rather than as -1 and errno, which `Killable::kill` takes for success, so only a bad
/// signal number comes back as an error. A thread that has exited but not been joined is
/// signalled harmlessly by glibc.
pub fn kick(thread: &JoinHandle<()>) -> Result<(), VcpuError> {
    thread.kill(kick_signal()).map_err(VcpuError::Kick)
}

/// Longest nap of a sleeping vCPU before it rechecks the partition's request.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// The body of a vCPU thread. Returns when the partition asks it to stop.
pub fn run(
    index: usize,
    mut vcpu: VcpuFd,
    control: Arc<Control>,
    memory: Arc<GuestMemory>,
    tid: std::sync::mpsc::Sender<u32>,
) {
    // SAFETY: gettid has no preconditions.
    let _ = tid.send(unsafe { libc::gettid() } as u32);
    KVM_RUN.with(|run| run.set(vcpu.get_kvm_run()));
    loop {
        control.throttle.nap_if_due(index, &control);
        if !wait_for_run(index, &vcpu, &control) {
            break;
        }
        let exit = vcpu.run();
        let outcome = match exit {
            Ok(VcpuExit::IoOut(HYPERCALL_PORT, data)) => {
                let number = data.try_into().map(u32::from_le_bytes).unwrap_or(u32::MAX);
                Outcome::Hypercall(number)
            }
            Ok(VcpuExit::Intr) => Outcome::Continue,
            Err(e) if e.errno() == libc::EINTR => Outcome::Continue,
            Ok(VcpuExit::Shutdown) => Outcome::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            Ok(other) => Outcome::Crash(format!("unexpected exit {other:?}")),
            Err(e) => Outcome::Crash(format!("KVM_RUN failed: {e}")),
        };
        vcpu.set_kvm_immediate_exit(0);
        let status = match outcome {
            Outcome::Continue => continue,
            Outcome::Hypercall(number) => match hypercall(number, &vcpu, &control, &memory) {
                Ok(None) => continue,
                Ok(Some(status)) => status,
                Err(e) => VcpuStatus::Crashed(error_chain(&e)),
            },
            Outcome::Crash(reason) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                VcpuStatus::Crashed(format!("{reason} at rip {rip:#x}"))
            }
        };
        if let VcpuStatus::Crashed(reason) = &status {
            warn!("vCPU {index} crashed: {reason}");
        }
        control.set_status(index, status);
        // Exited or crashed: wait until the partition stops.
        let mut state = control.lock();
        while state.request != Request::Stop {
            state = control
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        break;
    }
    KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
}

enum Outcome {
    Continue,
    Hypercall(u32),
    Crash(String),
}

/// Parks while the partition asks for a pause (saving state first). Returns false on stop.
fn wait_for_run(index: usize, vcpu: &VcpuFd, control: &Control) -> bool {
    let mut state = control.lock();
    loop {
        match state.request {
            Request::Run => {
                if !matches!(state.vcpus[index], VcpuStatus::Running) {
                    state.vcpus[index] = VcpuStatus::Running;
                    control.changed.notify_all();
                }
                return true;
            }
            Request::Stop => {
                state.vcpus[index] = VcpuStatus::Stopped;
                control.changed.notify_all();
                return false;
            }
            Request::Pause => {
                if !matches!(state.vcpus[index], VcpuStatus::Paused(_)) {
                    state.vcpus[index] = match VcpuState::capture(vcpu) {
                        Ok(saved) => VcpuStatus::Paused(Box::new(saved)),
                        Err(e) => VcpuStatus::Crashed(format!("saving state: {}", error_chain(&e))),
                    };
                    control.changed.notify_all();
                    if matches!(state.vcpus[index], VcpuStatus::Crashed(_)) {
                        return false;
                    }
                }
                state = control
                    .changed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// Serves a hypercall. `Ok(None)`: keep running; `Ok(Some(status))`: this vCPU is done;
/// `Err`: the guest broke the ABI (or its registers could not be read).
fn hypercall(
    number: u32,
    vcpu: &VcpuFd,
    control: &Control,
    memory: &GuestMemory,
) -> Result<Option<VcpuStatus>, VcpuError> {
    let regs = vcpu.get_regs().map_err(VcpuError::HypercallArgs)?;
    let (arg0, arg1) = (regs.rdi, regs.rsi);
    match number {
        hypercall::CONSOLE_WRITE => {
            let len = arg1.min(4096) as usize;
            let mut bytes = vec![0u8; len];
            memory
                .read(GuestAddress(arg0), &mut bytes)
                .map_err(VcpuError::ConsoleBuffer)?;
            debug!(
                "guest console: {}",
                String::from_utf8_lossy(&bytes).trim_end()
            );
            control.console_write(&bytes);
            Ok(None)
        }
        hypercall::CHECK_FAILED => {
            warn!("guest self-check failed: {arg0:#x} {arg1:#x}");
            let line = format!("[vmm] self-check failed: {arg0:#x} {arg1:#x}\n");
            control.console_write(line.as_bytes());
            control.lock().check_failures += 1;
            Ok(None)
        }
        hypercall::EXIT => Ok(Some(VcpuStatus::Exited(arg0))),
        hypercall::SLEEP => {
            let nap = Duration::from_nanos(arg0).min(MAX_SLEEP);
            let state = control.lock();
            if state.request == Request::Run {
                // Woken early by any request change; the loop then rechecks it.
                let _ = control.changed.wait_timeout(state, nap);
            }
            Ok(None)
        }
        other => Err(VcpuError::UnknownHypercall(other)),
    }
}
