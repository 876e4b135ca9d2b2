//! Guest ABI v1: the contract between a partition's VMM and its guest image.
//! `docs/guest-abi.md` is the public description; this module is its single source of truth in
//! code, used by both the VMM and the built-in guest.

/// `magic` of [`BootInfo`].
pub const BOOT_MAGIC: [u8; 8] = *b"HEATBOOT";
/// `abi_version` of [`BootInfo`].
pub const ABI_VERSION: u32 = 1;
/// Bytes of `args`, NUL terminator included.
pub const ARGS_LEN: usize = 224;
/// Offset of the per-vCPU [`Progress`] array in the boot-info page.
pub const PROGRESS_OFFSET: usize = 256;
/// Guest-physical address where images may start; RAM below belongs to the VMM.
pub const IMAGE_BASE: u64 = 0x10_0000;
/// Size of each vCPU's stack, at the top of RAM: vCPU i's ends at `mem_size - i * STACK_SIZE`.
pub const STACK_SIZE: u64 = 64 * 1024;
/// The I/O port of hypercalls: `out dx, eax` with DX = this, EAX = number, RDI/RSI arguments.
pub const HYPERCALL_PORT: u16 = 0x510;

/// Hypercall numbers.
pub mod hypercall {
    /// Console write: RDI = guest address, RSI = length.
    pub const CONSOLE_WRITE: u32 = 1;
    /// Self-check failure: RDI, RSI = two words of detail. Counted and logged.
    pub const CHECK_FAILED: u32 = 2;
    /// Exit: RDI = code. That vCPU stops.
    pub const EXIT: u32 = 3;
    /// Addition after v1: sleep for at most RDI nanoseconds, so idle and paced guests do not
    /// burn a host CPU. A VMM without it treats it as unknown.
    pub const SLEEP: u32 = 4;
}

/// The boot-info page's header, at the guest address passed in RDI.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub magic: [u8; 8],
    pub abi_version: u32,
    pub vcpu_count: u32,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    pub tsc_khz: u64,
    /// NUL-terminated UTF-8.
    pub args: [u8; ARGS_LEN],
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == PROGRESS_OFFSET);

/// Per-vCPU counters, written by the guest and read by the VMM without exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Progress {
    /// Operations done.
    pub ops: u64,
    /// Self-check failures.
    pub errors: u64,
    /// Full self-checks completed.
    pub checks: u64,
    /// Bumped regularly, so a stuck vCPU is visible.
    pub heartbeat: u64,
}

/// Most vCPUs whose progress fits in the boot-info page.
pub const MAX_VCPUS: u32 = ((4096 - PROGRESS_OFFSET) / core::mem::size_of::<Progress>()) as u32;

impl BootInfo {
    /// The args as a string, up to the first NUL; `None` if they are not UTF-8.
    pub fn args_str(&self) -> Option<&str> {
        let len = self.args.iter().position(|&b| b == 0).unwrap_or(ARGS_LEN);
        core::str::from_utf8(&self.args[..len]).ok()
    }
}
