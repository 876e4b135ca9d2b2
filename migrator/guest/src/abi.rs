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

/// Why a boot-info header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// Fewer bytes than the header's [`PROGRESS_OFFSET`].
    Short(usize),
    Magic,
    Version(u32),
    /// No vCPU, or more than [`MAX_VCPUS`].
    VcpuCount(u32),
    /// Not enough memory for an image and the vCPUs' stacks.
    MemSize(u64),
    /// The args are not UTF-8 up to their NUL.
    Args,
}

impl BootInfo {
    /// A header, or `None` if `args` does not fit its field (with the NUL) or holds a NUL.
    pub fn new(vcpu_count: u32, mem_size: u64, tsc_khz: u64, args: &str) -> Option<Self> {
        if args.len() >= ARGS_LEN || args.as_bytes().contains(&0) {
            return None;
        }
        let mut field = [0u8; ARGS_LEN];
        field[..args.len()].copy_from_slice(args.as_bytes());
        Some(Self {
            magic: BOOT_MAGIC,
            abi_version: ABI_VERSION,
            vcpu_count,
            mem_size,
            tsc_khz,
            args: field,
        })
    }

    /// The header as it lies in guest memory (little-endian).
    pub fn to_bytes(&self) -> [u8; PROGRESS_OFFSET] {
        let mut bytes = [0u8; PROGRESS_OFFSET];
        bytes[0..8].copy_from_slice(&self.magic);
        bytes[8..12].copy_from_slice(&self.abi_version.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.vcpu_count.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.mem_size.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.tsc_khz.to_le_bytes());
        bytes[32..].copy_from_slice(&self.args);
        bytes
    }

    /// Reads and checks a header: what a guest does first with the page RDI points to.
    pub fn decode(bytes: &[u8]) -> Result<Self, BootInfoError> {
        let Some(bytes) = bytes.first_chunk::<PROGRESS_OFFSET>() else {
            return Err(BootInfoError::Short(bytes.len()));
        };
        let word = |at: usize| {
            let mut out = [0u8; 8];
            out.copy_from_slice(&bytes[at..at + 8]);
            out
        };
        let [v0, v1, v2, v3, c0, c1, c2, c3] = word(8);
        let mut args = [0u8; ARGS_LEN];
        args.copy_from_slice(&bytes[32..]);
        let info = Self {
            magic: word(0),
            abi_version: u32::from_le_bytes([v0, v1, v2, v3]),
            vcpu_count: u32::from_le_bytes([c0, c1, c2, c3]),
            mem_size: u64::from_le_bytes(word(16)),
            tsc_khz: u64::from_le_bytes(word(24)),
            args,
        };
        if info.magic != BOOT_MAGIC {
            return Err(BootInfoError::Magic);
        }
        if info.abi_version != ABI_VERSION {
            return Err(BootInfoError::Version(info.abi_version));
        }
        if info.vcpu_count == 0 || info.vcpu_count > MAX_VCPUS {
            return Err(BootInfoError::VcpuCount(info.vcpu_count));
        }
        let stacks = u64::from(info.vcpu_count) * STACK_SIZE;
        if info.mem_size < IMAGE_BASE + stacks {
            return Err(BootInfoError::MemSize(info.mem_size));
        }
        if info.args_str().is_none() {
            return Err(BootInfoError::Args);
        }
        Ok(info)
    }

    /// The args as a string, up to the first NUL; `None` if they are not UTF-8.
    pub fn args_str(&self) -> Option<&str> {
        let len = self.args.iter().position(|&b| b == 0).unwrap_or(ARGS_LEN);
        core::str::from_utf8(&self.args[..len]).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_round_trips_and_bad_headers_are_refused() {
        let info = BootInfo::new(2, 64 << 20, 1000, "kv-zipf theta=0.9").expect("fits");
        let bytes = info.to_bytes();
        let back = BootInfo::decode(&bytes).expect("decodes");
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.args_str(), Some("kv-zipf theta=0.9"));
        assert_eq!(
            BootInfo::decode(&bytes[..100]).err(),
            Some(BootInfoError::Short(100))
        );
        assert_eq!(
            BootInfo::decode(&[0; PROGRESS_OFFSET]).err(),
            Some(BootInfoError::Magic)
        );
        let mut bad = bytes;
        bad[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            BootInfo::decode(&bad).err(),
            Some(BootInfoError::VcpuCount(0))
        );
        let mut bad = bytes;
        bad[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert_eq!(
            BootInfo::decode(&bad).err(),
            Some(BootInfoError::MemSize(1 << 20))
        );
        let mut bad = bytes;
        bad[32] = 0xff;
        assert_eq!(BootInfo::decode(&bad).err(), Some(BootInfoError::Args));
        assert!(BootInfo::new(1, 64 << 20, 1, "a\0b").is_none());
        assert!(BootInfo::new(1, 64 << 20, 1, &"x".repeat(ARGS_LEN)).is_none());
    }
}
