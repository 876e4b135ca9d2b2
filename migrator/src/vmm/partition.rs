//! A partition: what to launch (checked without KVM), and one KVM VM with its guest memory,
//! vCPU threads and lifecycle. What users see of it is in [`super::status`], its snapshot and
//! restore in [`super::snapshot`].
//!
//! ```text
//!  launch ──▶ running ◀──resume── paused
//!                │  └──pause──────▶  │
//!                ├── guest dies ──▶ crashed
//!                └── stop / all vCPUs exit ──▶ stopped
//! ```

use std::{
    os::unix::thread::JoinHandleExt,
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kvm_bindings::{CpuId, KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migrator_guest::abi::{ARGS_LEN, MAX_VCPUS, STACK_SIZE};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

use super::{
    cpu::{self, CpuError, GuestCpu},
    dirty::DirtyLog,
    layout,
    loader::{Image, ImageError},
    memory::{GuestMemory, MemoryDigest, MemoryError, PAGE_SIZE},
    status::PartitionState,
    throttle,
    vcpu::{self, Control, Request, VcpuError, VcpuStatus},
};

/// The built-in guest image, embedded at build time by `cargo xtask build`.
#[cfg(guest_embedded)]
pub static BUILTIN_IMAGE: Option<&[u8]> = Some(include_bytes!(env!("MIGRATOR_GUEST_IMAGE")));
#[cfg(not(guest_embedded))]
pub static BUILTIN_IMAGE: Option<&[u8]> = None;

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest guest image a partition may have (`launch`, incoming migrations).
pub const MAX_IMAGE: usize = 64 << 20;

#[derive(Debug, Error)]
pub enum PartitionError {
    #[error("the guest image is {0} bytes; the limit is {MAX_IMAGE}")]
    ImageTooLarge(usize),
    #[error("unknown workload `{0}`; built in: {list}", list = migrator_guest::workloads::NAMES.join(", "))]
    UnknownWorkload(String),
    #[error("this migrator was built without its guest image; build it with `cargo xtask build`")]
    NoBuiltinImage,
    #[error("a partition needs 1 to {MAX_VCPUS} vCPUs, got {0}")]
    VcpuCount(u32),
    #[error(
        "guest memory of {mem_size:#x} bytes is too small for {vcpus} vCPU stacks and an image"
    )]
    TooSmall { mem_size: u64, vcpus: u32 },
    #[error("guest memory is limited to {max} bytes", max = layout::MAX_MEMORY)]
    TooLarge,
    #[error("the arguments are longer than {} bytes", ARGS_LEN - 1)]
    ArgsTooLong,
    #[error("the arguments contain a NUL byte")]
    ArgsNul,
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("bad guest image")]
    Image(#[from] ImageError),
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error("the partition is {0:?}, not {1}")]
    WrongState(PartitionState, &'static str),
    #[error(
        "the partition awaits the handover of a migration whose outcome is unknown and may run \
         on the destination; `migrator reconcile` settles it"
    )]
    AwaitingHandover,
    #[error(
        "the partition runs on the destination on the pages it has, and this copy holds the \
         rest; `migrator migrate --resume` (or `migrator reconcile`) pushes them \
         (`migrator reconcile --resume-here` resumes it here, on your word that the \
         destination's copy is gone)"
    )]
    PostcopyPaused,
    #[error("the vCPUs did not stop within {PAUSE_TIMEOUT:?}")]
    PauseTimeout,
    #[error("the partition is migrating; only its migration resumes it")]
    Migrating,
    #[error("the snapshot has {got} vCPU states for {want} vCPUs")]
    SnapshotShape { got: usize, want: u32 },
}

/// What the guest runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestImage {
    /// A workload of the built-in image, by name.
    Builtin(String),
    /// A guest ELF image, as bytes.
    Elf(#[serde(serialize_with = "byte_string")] Vec<u8>),
}

impl GuestImage {
    /// What `status` and `list` show of it: `workload NAME`, or `image`.
    pub fn label(&self) -> String {
        match self {
            Self::Builtin(name) => format!("workload {name}"),
            Self::Elf(_) => "image".into(),
        }
    }
}

/// Serializes bytes as one byte string. Postcard and JSON write a byte string exactly as they
/// write a sequence of bytes, so the encoding is unchanged, but a serializer gets the image in
/// one call instead of one per byte: hashing a 64 MiB config for the saved state
/// (`state::config_digest`) took 283 ms byte by byte.
fn byte_string<T: AsRef<[u8]>, S: serde::Serializer>(
    bytes: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes.as_ref())
}

/// What to launch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionConfig {
    pub name: Option<String>,
    pub mem_size: u64,
    pub vcpus: u32,
    pub image: GuestImage,
    /// Arguments written to the boot info. For built-in workloads the workload's name is put
    /// in front.
    pub args: String,
}

impl PartitionConfig {
    /// The args string the guest sees.
    pub fn boot_args(&self) -> String {
        match &self.image {
            GuestImage::Builtin(name) if self.args.trim().is_empty() => name.clone(),
            GuestImage::Builtin(name) => format!("{name} {}", self.args.trim()),
            GuestImage::Elf(_) => self.args.clone(),
        }
    }

    fn image_bytes(&self) -> Result<&[u8], PartitionError> {
        match &self.image {
            GuestImage::Builtin(name) => {
                if !migrator_guest::workloads::NAMES.contains(&name.as_str()) {
                    return Err(PartitionError::UnknownWorkload(name.clone()));
                }
                BUILTIN_IMAGE.ok_or(PartitionError::NoBuiltinImage)
            }
            GuestImage::Elf(bytes) => Ok(bytes),
        }
    }

    /// Checks everything that can be checked without KVM.
    pub fn validate(&self) -> Result<(), PartitionError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(PartitionError::VcpuCount(self.vcpus));
        }
        if self.mem_size == 0 || !self.mem_size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize(self.mem_size).into());
        }
        if self.mem_size > layout::MAX_MEMORY {
            return Err(PartitionError::TooLarge);
        }
        let stacks = u64::from(self.vcpus) * STACK_SIZE;
        if self.mem_size < migrator_guest::abi::IMAGE_BASE + stacks + PAGE_SIZE {
            return Err(PartitionError::TooSmall {
                mem_size: self.mem_size,
                vcpus: self.vcpus,
            });
        }
        self.checked_boot_args()?;
        let image = self.image_bytes()?;
        // Also keeps a saved state (the config carries the image) below its payload limit.
        if image.len() > MAX_IMAGE {
            return Err(PartitionError::ImageTooLarge(image.len()));
        }
        Image::parse(image, self.mem_size, stacks)?;
        Ok(())
    }

    /// The args string the guest sees, checked to fit the boot-info page.
    pub fn checked_boot_args(&self) -> Result<String, PartitionError> {
        let args = self.boot_args();
        if args.len() >= ARGS_LEN {
            return Err(PartitionError::ArgsTooLong);
        }
        if args.contains('\0') {
            return Err(PartitionError::ArgsNul);
        }
        Ok(args)
    }
}

pub struct Partition {
    pub(super) config: PartitionConfig,
    _kvm: Kvm,
    vm: Arc<VmFd>,
    pub(super) memory: Arc<GuestMemory>,
    pub(super) control: Arc<Control>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    vcpu_tids: Vec<u32>,
    /// The CPU the guest was given (CPUID, TSC rate).
    pub(super) cpu: GuestCpu,
    dirty: Mutex<Option<DirtyLog>>,
    /// A state set by the migration engine that overrides what the vCPUs say.
    pub(super) migrating: Mutex<bool>,
    /// Set when a migration's outcome could not be learnt: the partition must not resume.
    pub(super) handover: Mutex<Option<super::status::AwaitingHandover>>,
    pub(super) postcopy_paused: Mutex<Option<super::status::PostcopyPaused>>,
    /// The throttle's ticker, while one runs.
    ticker: Mutex<Option<JoinHandle<()>>>,
    /// The guest's progress as last read, for when its page is not there to read.
    pub(super) last_progress: Mutex<Vec<migrator_guest::Progress>>,
    /// The guest's count as its host sampled it while it ran (`record_pace`).
    pub(super) pace: Mutex<super::pace::PaceHistory>,
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PartitionError {
    move |source| PartitionError::Kvm { what, source }
}

impl Partition {
    /// Creates and starts a partition.
    pub fn launch(config: PartitionConfig) -> Result<Self, PartitionError> {
        config.validate()?;
        let memory = Arc::new(GuestMemory::new(config.mem_size)?);
        let stacks = u64::from(config.vcpus) * STACK_SIZE;
        let image = Image::parse(config.image_bytes()?, config.mem_size, stacks)?;
        image.load(&memory)?;
        let (kvm, vm) = Self::create_vm(&memory)?;
        let cpuid = cpu::host_cpuid(&kvm)?;
        let vcpus = Self::create_vcpus(&vm, config.vcpus, &cpuid)?;
        // The guest is told its TSC rate once; a made-up one would skew its clock.
        let first = vcpus.first().ok_or(PartitionError::VcpuCount(0))?;
        let cpu = GuestCpu::new(&cpuid, cpu::host_tsc_khz(first)?);
        let tsc_khz = u64::from(cpu.tsc_khz.get());
        layout::write_vmm_area(&memory, config.vcpus, tsc_khz, &config.boot_args())?;
        for (index, vcpu) in vcpus.iter().enumerate() {
            let sregs = vcpu
                .get_sregs()
                .map_err(kvm_error("read special registers"))?;
            vcpu.set_sregs(&layout::boot_sregs(sregs))
                .map_err(kvm_error("set special registers"))?;
            vcpu.set_regs(&layout::boot_regs(
                image.entry(),
                config.mem_size,
                index as u32,
            ))
            .map_err(kvm_error("set registers"))?;
        }
        Self::start(config, kvm, vm, vcpus, memory, cpu, Request::Run)
    }

    /// A VM with `memory` as its RAM, without vCPUs.
    pub(super) fn create_vm(memory: &GuestMemory) -> Result<(Kvm, VmFd), PartitionError> {
        let kvm = Kvm::new().map_err(kvm_error("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_error("create a VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.host_address(),
        };
        // SAFETY: the region is the live mapping of `memory`, which the partition keeps (in an
        // Arc) until after the VM is dropped.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_error("register guest memory"))?;
        Ok((kvm, vm))
    }

    /// `count` vCPUs, each given `cpuid`.
    pub(super) fn create_vcpus(
        vm: &VmFd,
        count: u32,
        cpuid: &CpuId,
    ) -> Result<Vec<VcpuFd>, PartitionError> {
        let mut vcpus = Vec::new();
        for index in 0..count {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_error("create a vCPU"))?;
            vcpu.set_cpuid2(cpuid).map_err(kvm_error("set CPUID"))?;
            vcpus.push(vcpu);
        }
        Ok(vcpus)
    }

    /// Starts a thread per vCPU and waits, when asked to start paused, until they are.
    pub(super) fn start(
        config: PartitionConfig,
        kvm: Kvm,
        vm: VmFd,
        vcpus: Vec<VcpuFd>,
        memory: Arc<GuestMemory>,
        cpu: GuestCpu,
        request: Request,
    ) -> Result<Self, PartitionError> {
        vcpu::install_kick_handler()?;
        let control = Arc::new(Control::new(vcpus.len(), request));
        let mut threads = Vec::new();
        let mut vcpu_tids = Vec::new();
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let (tid_tx, tid_rx) = mpsc::channel();
            let control = Arc::clone(&control);
            let memory = Arc::clone(&memory);
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu::run(index, vcpu, control, memory, tid_tx))
                .map_err(VcpuError::Spawn)?;
            threads.push(thread);
            // The thread sends its tid first thing; a closed channel means it died at once.
            vcpu_tids.push(tid_rx.recv().unwrap_or_default());
        }
        let partition = Self {
            config,
            _kvm: kvm,
            vm: Arc::new(vm),
            memory,
            control,
            threads: Mutex::new(threads),
            vcpu_tids,
            cpu,
            dirty: Mutex::new(None),
            migrating: Mutex::new(false),
            handover: Mutex::new(None),
            postcopy_paused: Mutex::new(None),
            ticker: Mutex::new(None),
            last_progress: Mutex::new(Vec::new()),
            pace: Mutex::default(),
        };
        if request == Request::Pause {
            partition.wait_quiet()?;
        }
        Ok(partition)
    }

    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Thread ids of the vCPU threads (what the KVM tracepoints run on).
    pub fn vcpu_tids(&self) -> &[u32] {
        &self.vcpu_tids
    }

    /// The guest's TSC rate, which it was told at launch and keeps across moves.
    pub fn tsc_khz(&self) -> u64 {
        self.cpu.tsc_khz.get().into()
    }

    /// The CPU the guest was given.
    pub fn cpu(&self) -> &GuestCpu {
        &self.cpu
    }

    fn set_request(&self, request: Request) -> Result<(), VcpuError> {
        let mut state = self.control.lock();
        state.request = request;
        drop(state);
        self.control.changed.notify_all();
        self.kick_all()
    }

    /// Kicks every vCPU thread; all are kicked even if one fails, and the first failure is
    /// returned.
    fn kick_all(&self) -> Result<(), VcpuError> {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let mut first = Ok(());
        for thread in threads.iter() {
            let kicked = vcpu::kick(thread);
            if first.is_ok() {
                first = kicked;
            }
        }
        first
    }

    /// Waits until no vCPU runs guest code.
    fn wait_quiet(&self) -> Result<(), PartitionError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = self.control.lock();
        while !state.vcpus.iter().all(VcpuStatus::is_quiet) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PartitionError::PauseTimeout);
            }
            state = self
                .control
                .changed
                .wait_timeout(state, left.min(Duration::from_millis(10)))
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
            drop(state);
            // Re-kick: a signal may have landed before a thread registered its kvm_run.
            self.kick_all()?;
            state = self.control.lock();
        }
        Ok(())
    }

    /// Stops every vCPU and saves its state. Pausing a paused partition does nothing.
    pub fn pause(&self) -> Result<(), PartitionError> {
        match self.state() {
            PartitionState::Running | PartitionState::Migrating => {}
            PartitionState::Paused
            | PartitionState::AwaitingHandover
            | PartitionState::PostcopyPaused => return Ok(()),
            other => return Err(PartitionError::WrongState(other, "running")),
        }
        self.set_request(Request::Pause)?;
        self.wait_quiet()
    }

    /// Lets paused vCPUs run again. Refused while awaiting a handover: the guest may run on
    /// the destination.
    pub fn resume(&self) -> Result<(), PartitionError> {
        match self.state() {
            PartitionState::Paused => {}
            PartitionState::Running => return Ok(()),
            // The migration engine resumes its partition only after marking it no longer
            // migrating: anyone else would run it beside the destination's copy.
            PartitionState::Migrating => return Err(PartitionError::Migrating),
            PartitionState::AwaitingHandover => return Err(PartitionError::AwaitingHandover),
            PartitionState::PostcopyPaused => return Err(PartitionError::PostcopyPaused),
            other => return Err(PartitionError::WrongState(other, "paused")),
        }
        self.set_request(Request::Run)?;
        Ok(())
    }

    /// The digest of guest memory (consistent only while paused).
    pub fn digest(&self) -> MemoryDigest {
        self.memory.digest()
    }

    /// Starts dirty-page logging (idempotent).
    pub fn dirty_log_start(&self) -> Result<(), PartitionError> {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if dirty.is_none() {
            self.set_slot_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
            *dirty = Some(DirtyLog::new(self.memory.frames()));
        }
        Ok(())
    }

    /// The frames written since the last fetch (or since logging started), as a bitmap of
    /// u64 words; fetching re-arms write protection. `None` if logging is off.
    pub fn dirty_log_fetch(&self) -> Result<Option<Vec<u64>>, PartitionError> {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = dirty.as_mut() else {
            return Ok(None);
        };
        log.fetch(&self.vm, self.memory.size())
            .map(Some)
            .map_err(kvm_error("fetch the dirty log"))
    }

    /// Stops dirty-page logging.
    pub fn dirty_log_stop(&self) -> Result<(), PartitionError> {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if dirty.take().is_some() {
            self.set_slot_flags(0)?;
        }
        Ok(())
    }

    /// Re-arms write faults for the heat sampler without losing dirty bits a migration needs:
    /// the fetched bits are kept for the next `dirty_log_fetch`.
    pub fn dirty_log_rearm(&self) -> Result<bool, PartitionError> {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = dirty.as_mut() else {
            return Ok(false);
        };
        log.accumulate(&self.vm, self.memory.size())
            .map_err(kvm_error("fetch the dirty log"))?;
        Ok(true)
    }

    fn set_slot_flags(&self, flags: u32) -> Result<(), PartitionError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: self.memory.size(),
            userspace_addr: self.memory.host_address(),
        };
        // SAFETY: the same live mapping the slot already has; only the flags change.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_error("change the memory slot's flags"))
    }

    /// Slows every vCPU to `100 - pct` percent of its time (0: full speed; capped at
    /// [`throttle::MAX_PCT`]). See [`throttle`].
    pub fn set_throttle(&self, pct: u8) -> Result<(), PartitionError> {
        self.control.throttle.set_all(pct);
        // Wakes napping vCPUs (and the ticker) so a lower throttle takes effect at once.
        self.control.changed.notify_all();
        let mut ticker = self.ticker.lock().unwrap_or_else(|p| p.into_inner());
        if ticker.as_ref().is_some_and(JoinHandle::is_finished) {
            let _ = ticker.take().map(JoinHandle::join);
        }
        if pct == 0 || ticker.is_some() {
            return Ok(());
        }
        let threads: Vec<libc::pthread_t> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(JoinHandleExt::as_pthread_t)
            .collect();
        let signal = vcpu::kick_signal();
        *ticker = Some(
            throttle::spawn_ticker(Arc::clone(&self.control), move || {
                for &thread in &threads {
                    // SAFETY: `stop` joins the ticker before it joins any vCPU thread, so
                    // every pthread here is alive or exited but not yet joined, which
                    // pthread_kill accepts; the kick handler only sets `immediate_exit`.
                    unsafe { libc::pthread_kill(thread, signal) };
                }
            })
            .map_err(VcpuError::Spawn)?,
        );
        Ok(())
    }

    /// The current throttle of the most throttled vCPU, in percent.
    pub fn throttle_pct(&self) -> u8 {
        self.control.throttle.max_pct()
    }

    /// Stops the partition for good and joins its vCPU threads. Stopping twice is harmless.
    pub fn stop(&self) {
        // A vCPU in KVM_RUN that missed its kick still sees the request at its next exit.
        if let Err(e) = self.set_request(Request::Stop) {
            warn!(
                "stopping a partition: {}",
                heatprobe::probes::error_chain(&e)
            );
        }
        // The ticker signals vCPU threads by pthread id: it must be gone before they are
        // joined.
        let ticker = self.ticker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(ticker) = ticker {
            let _ = ticker.join();
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.stop();
    }
}
