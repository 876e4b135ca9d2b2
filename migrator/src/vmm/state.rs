//! The saved state of a partition (the digest of its config, the CPU its guest was given, its
//! vCPU states and console; memory travels separately) as bytes: what a migration's commit
//! carries to the destination.
//!
//! ```text
//!  magic "HMIGSTAT" | version u32 | reserved u32 | payload_len u64 | xxh3-64 of payload u64
//!  payload: postcard (varint integers, byte strings length-prefixed, no trailing bytes)
//! ```
//!
//! The destination already has the config (it prepared the partition from it), so the state
//! carries only [`config_digest`] of it, not the config with its guest image of up to
//! [`MAX_IMAGE`](super::partition::MAX_IMAGE) bytes, during downtime.
//!
//! Decoding checks the header (magic, version, length, checksum) before it looks at the
//! payload, and the shape of what the payload holds (the digest of the config it was prepared
//! for, a known TSC rate, one vCPU state per vCPU, each register block of its exact size, only
//! known MSRs) before anything reaches KVM. Every failed step is its own [`StateError`]
//! variant. Whether this host can give the guest its CPU is checked on restore
//! ([`super::cpu`]).

use std::num::NonZeroU32;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave};
use migrator_guest::abi::MAX_VCPUS;
use serde::{Deserialize, Serialize, de::value::BytesDeserializer};
use thiserror::Error;
use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

use super::{
    cpu::{FEATURE_REGISTERS, GuestCpu},
    partition::PartitionConfig,
    snapshot::PartitionSnapshot,
    vcpu::{CONSOLE_KEEP, SAVED_MSRS, VcpuState},
};

/// The first 8 bytes of every saved state (never all zero).
pub const STATE_MAGIC: [u8; 8] = *b"HMIGSTAT";
/// The state format this build writes and reads.
/// 4: the config's digest instead of the config. 3: the CPU the guest was given (vendor,
/// features) with the TSC rate. 2: the payload is postcard (1 was bincode).
pub const STATE_VERSION: u32 = 4;
pub const HEADER_LEN: usize = 32;
/// Largest payload accepted: the most vCPU states a partition can have and a full console.
pub const MAX_PAYLOAD: u64 = 1 << 20;
/// The most one vCPU's saved state can take: its register blocks and MSRs, with room for
/// postcard's length prefixes and tags.
const MAX_VCPU_STATE: usize = size_of::<kvm_regs>()
    + size_of::<kvm_sregs>()
    + size_of::<kvm_xsave>()
    + size_of::<kvm_xcrs>()
    + size_of::<kvm_vcpu_events>()
    + SAVED_MSRS.len() * (5 + 10)
    + 64;
// A valid partition's state always fits.
const _: () =
    assert!(MAX_VCPUS as usize * MAX_VCPU_STATE + CONSOLE_KEEP + (4 << 10) <= MAX_PAYLOAD as usize);

#[derive(Debug, Error)]
pub enum StateError {
    #[error("the saved state is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("bad saved-state magic {0:02x?}")]
    Magic([u8; 8]),
    #[error("unsupported saved-state version {0} (this build reads {STATE_VERSION})")]
    Version(u32),
    #[error("reserved saved-state header bits are set")]
    Reserved,
    #[error("the saved state's payload is {0} bytes; the limit is {MAX_PAYLOAD}")]
    TooLarge(u64),
    #[error("the header announces a {header}-byte payload but {actual} bytes follow")]
    Length { header: u64, actual: u64 },
    #[error(
        "the saved state's checksum {stored:#018x} does not match its payload ({computed:#018x})"
    )]
    Checksum { stored: u64, computed: u64 },
    #[error("the saved state's payload does not decode")]
    Payload(#[source] postcard::Error),
    #[error("the saved state's payload has {0} bytes after its end")]
    Trailing(usize),
    #[error("the saved state is not in its one canonical encoding (an overlong integer, say)")]
    NotCanonical,
    #[error(
        "the saved state is of another partition than the one prepared (config digest {saved:#018x}, expected {expected:#018x})"
    )]
    Config { saved: u64, expected: u64 },
    #[error("the saved state's TSC rate is unknown (0 kHz)")]
    TscUnknown,
    #[error("the saved state has {got} vCPU states for {want} vCPUs")]
    VcpuCount { got: usize, want: u32 },
    #[error("vCPU {index}'s saved state has the wrong shape")]
    Vcpu {
        index: usize,
        #[source]
        source: ShapeError,
    },
    #[error("the saved console is {0} bytes; the limit is {CONSOLE_KEEP}")]
    Console(usize),
}

/// What is wrong with one vCPU's saved state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShapeError {
    #[error("its {field} are {got} bytes, not {want}")]
    Size {
        field: &'static str,
        got: usize,
        want: usize,
    },
    #[error("it has {0} MSRs; at most {max} are saved", max = SAVED_MSRS.len())]
    TooManyMsrs(usize),
    #[error("MSR {0:#x} is not one that is saved")]
    UnknownMsr(u32),
    #[error("MSR {0:#x} appears twice")]
    DuplicateMsr(u32),
}

/// The payload as written: borrows the snapshot, register blocks as their bytes.
#[derive(Serialize)]
struct SavedPartitionRef<'a> {
    config_digest: u64,
    cpu: &'a GuestCpu,
    vcpus: Vec<SavedVcpuRef<'a>>,
    console: &'a [u8],
}

/// kvm-bindings serializes its structs as byte strings, which postcard lays out exactly as a
/// `Vec<u8>`: length, then the bytes. Reading them back as `Vec<u8>` lets the sizes be checked
/// (kvm-bindings itself would pad or truncate silently).
#[derive(Serialize)]
struct SavedVcpuRef<'a> {
    regs: &'a kvm_regs,
    sregs: &'a kvm_sregs,
    xsave: &'a kvm_xsave,
    xcrs: Option<&'a kvm_xcrs>,
    events: &'a kvm_vcpu_events,
    msrs: &'a [(u32, u64)],
}

/// The payload as read.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SavedPartition {
    config_digest: u64,
    cpu: SavedCpu,
    vcpus: Vec<SavedVcpu>,
    console: Vec<u8>,
}

/// [`GuestCpu`] as read: a rate of 0 is refused with its own error.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SavedCpu {
    tsc_khz: u32,
    vendor: [u8; 12],
    features: [u32; FEATURE_REGISTERS.len()],
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SavedVcpu {
    regs: Vec<u8>,
    sregs: Vec<u8>,
    xsave: Vec<u8>,
    xcrs: Option<Vec<u8>>,
    events: Vec<u8>,
    msrs: Vec<(u32, u64)>,
}

/// A postcard flavor that hashes what is serialized instead of storing it.
struct Hasher(Xxh3Default);

impl postcard::ser_flavors::Flavor for Hasher {
    type Output = u64;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.update(&[byte]);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.update(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<u64> {
        Ok(self.0.digest())
    }
}

/// xxh3-64 of the postcard encoding of `config`: what a saved state carries of its config.
/// Hashed as it is serialized, so a config with a 64 MiB image is not copied first.
pub fn config_digest(config: &PartitionConfig) -> u64 {
    // Invariant: a config is plain data (strings, a byte string, integers, an enum), which
    // postcard serializes without fail into a flavor that never fails.
    postcard::serialize_with_flavor(config, Hasher(Xxh3Default::new()))
        .expect("a config always serializes")
}

/// The saved state of `snapshot`, header included.
pub fn encode(snapshot: &PartitionSnapshot) -> Vec<u8> {
    let saved = SavedPartitionRef {
        config_digest: config_digest(&snapshot.config),
        cpu: &snapshot.cpu,
        vcpus: snapshot
            .vcpus
            .iter()
            .map(|v| SavedVcpuRef {
                regs: &v.regs,
                sregs: &v.sregs,
                xsave: &v.xsave,
                xcrs: v.xcrs.as_ref(),
                events: &v.events,
                msrs: &v.msrs,
            })
            .collect(),
        console: &snapshot.console,
    };
    // Invariant: serializing plain data (no maps, every sequence of known length) into a Vec
    // cannot fail.
    let payload = postcard::to_stdvec(&saved).expect("a snapshot always serializes");
    wrap(&payload)
}

/// `payload` behind a header that describes it: what [`encode`] writes around its payload.
pub fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&STATE_MAGIC);
    bytes.extend_from_slice(&STATE_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Checks the header and returns the payload it vouches for.
fn payload(bytes: &[u8]) -> Result<&[u8], StateError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(StateError::Truncated(bytes.len()));
    };
    let field = |at: usize| -> [u8; 8] {
        let mut out = [0; 8];
        out.copy_from_slice(&header[at..at + 8]);
        out
    };
    let magic = field(0);
    if magic != STATE_MAGIC {
        return Err(StateError::Magic(magic));
    }
    let [v0, v1, v2, v3, r0, r1, r2, r3] = field(8);
    let version = u32::from_le_bytes([v0, v1, v2, v3]);
    if version != STATE_VERSION {
        return Err(StateError::Version(version));
    }
    if [r0, r1, r2, r3] != [0; 4] {
        return Err(StateError::Reserved);
    }
    let len = u64::from_le_bytes(field(16));
    if len > MAX_PAYLOAD {
        return Err(StateError::TooLarge(len));
    }
    if len != payload.len() as u64 {
        return Err(StateError::Length {
            header: len,
            actual: payload.len() as u64,
        });
    }
    let stored = u64::from_le_bytes(field(24));
    let computed = xxh3_64(payload);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    Ok(payload)
}

/// Decodes a saved state and checks it fits the partition `expected` describes (the one the
/// destination prepared for): its config digest is `expected`'s, and the snapshot's config is
/// `expected`. Nothing of it reaches KVM unchecked.
pub fn decode(bytes: &[u8], expected: &PartitionConfig) -> Result<PartitionSnapshot, StateError> {
    let payload = payload(bytes)?;
    // The header already bounds the payload to MAX_PAYLOAD; postcard allocates no more than
    // the bytes it is given can describe.
    let (saved, rest): (SavedPartition, _) =
        postcard::take_from_bytes(payload).map_err(StateError::Payload)?;
    if !rest.is_empty() {
        return Err(StateError::Trailing(rest.len()));
    }
    let expected_digest = config_digest(expected);
    if saved.config_digest != expected_digest {
        return Err(StateError::Config {
            saved: saved.config_digest,
            expected: expected_digest,
        });
    }
    let tsc_khz = NonZeroU32::new(saved.cpu.tsc_khz).ok_or(StateError::TscUnknown)?;
    if saved.vcpus.len() != expected.vcpus as usize {
        return Err(StateError::VcpuCount {
            got: saved.vcpus.len(),
            want: expected.vcpus,
        });
    }
    if saved.console.len() > CONSOLE_KEEP {
        return Err(StateError::Console(saved.console.len()));
    }
    let vcpus = saved
        .vcpus
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            v.into_state()
                .map_err(|source| StateError::Vcpu { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let snapshot = PartitionSnapshot {
        config: expected.clone(),
        cpu: GuestCpu {
            tsc_khz,
            vendor: saved.cpu.vendor,
            features: saved.cpu.features,
        },
        vcpus,
        console: saved.console,
    };
    // postcard reads overlong varints (0x80 0x00 for 0) too. A state has exactly one
    // encoding, so two states that say the same are the same bytes (found by fuzzing); the
    // state is small (no image), so writing it again costs little.
    if encode(&snapshot) != bytes {
        return Err(StateError::NotCanonical);
    }
    Ok(snapshot)
}

/// One KVM struct from exactly its size in bytes.
fn kvm_struct<T: for<'de> Deserialize<'de>>(
    field: &'static str,
    bytes: &[u8],
) -> Result<T, ShapeError> {
    let want = size_of::<T>();
    if bytes.len() != want {
        return Err(ShapeError::Size {
            field,
            got: bytes.len(),
            want,
        });
    }
    // kvm-bindings reads its structs from byte strings of any length; the length is right.
    T::deserialize(BytesDeserializer::<serde::de::value::Error>::new(bytes)).map_err(|_| {
        ShapeError::Size {
            field,
            got: bytes.len(),
            want,
        }
    })
}

impl SavedVcpu {
    fn into_state(self) -> Result<VcpuState, ShapeError> {
        if self.msrs.len() > SAVED_MSRS.len() {
            return Err(ShapeError::TooManyMsrs(self.msrs.len()));
        }
        for (i, &(index, _)) in self.msrs.iter().enumerate() {
            if !SAVED_MSRS.contains(&index) {
                return Err(ShapeError::UnknownMsr(index));
            }
            if self.msrs[..i].iter().any(|&(other, _)| other == index) {
                return Err(ShapeError::DuplicateMsr(index));
            }
        }
        Ok(VcpuState {
            regs: kvm_struct("registers", &self.regs)?,
            sregs: kvm_struct("special registers", &self.sregs)?,
            xsave: kvm_struct("XSAVE state", &self.xsave)?,
            xcrs: self.xcrs.map(|x| kvm_struct("XCRs", &x)).transpose()?,
            events: kvm_struct("events", &self.events)?,
            msrs: self.msrs,
        })
    }
}

/// A snapshot of the given shape with recognisable, made-up register values: for tests, seed
/// corpora and the fuzz targets (a real one comes from a paused partition).
pub fn sample_snapshot(config: PartitionConfig) -> PartitionSnapshot {
    let vcpus = (0..config.vcpus)
        .map(|i| {
            let mut xsave = kvm_xsave::default();
            xsave.region[0] = 0x37f;
            xsave.region[6] = 0x1f80;
            VcpuState {
                regs: kvm_regs {
                    rip: 0x20_0000 + u64::from(i),
                    rsp: config.mem_size - u64::from(i) * 0x1_0000,
                    rflags: 0x3002,
                    rsi: u64::from(i),
                    ..Default::default()
                },
                sregs: kvm_sregs {
                    cr0: 0x8005_0033,
                    cr3: 0x1000,
                    cr4: 0x620,
                    efer: 0x500,
                    ..Default::default()
                },
                xsave,
                xcrs: (i == 0).then(|| {
                    let mut xcrs = kvm_xcrs {
                        nr_xcrs: 1,
                        ..Default::default()
                    };
                    xcrs.xcrs[0].value = 3;
                    xcrs
                }),
                events: kvm_vcpu_events::default(),
                msrs: SAVED_MSRS
                    .iter()
                    .take(3)
                    .map(|&m| (m, u64::from(m) * 7))
                    .collect(),
            }
        })
        .collect();
    let mut features = [0; FEATURE_REGISTERS.len()];
    // SSE2, FXSR, MMX, CMOV, TSC, FPU in leaf 1's EDX; syscall, NX, long mode in 0x8000_0001's.
    features[1] = 0x0788_8111;
    features[10] = 0x2010_0800;
    PartitionSnapshot {
        config,
        cpu: GuestCpu {
            tsc_khz: NonZeroU32::new(2_500_000).unwrap_or(NonZeroU32::MIN),
            vendor: *b"AuthenticAMD",
            features,
        },
        vcpus,
        console: b"migrator-guest: idle\n".to_vec(),
    }
}

#[cfg(test)]
mod tests;
