//! Hostile input: one entry point per decoder that reads bytes from the network or a file,
//! shared by the fuzz targets (`fuzz/`, libFuzzer on nightly) and the regression tests that
//! replay their seeds and crashing inputs on stable.
//!
//! Each entry point feeds arbitrary bytes to the decoder and checks what it returns: an input
//! is accepted (`Ok`) or refused with an error (`Err`, a [`FuzzError`] whose source is the
//! decoder's own), and an accepted one
//! satisfies the decoder's invariants (bounds, re-encoding to the same bytes). A panic, here or
//! in the decoder, is a bug.
//!
//! - this file: the data frames, the saved state, guest ELF images, the boot-info header;
//! - `api`: the API's wire codec;
//! - `session`: the destination's session, fed frames and control calls in any order.

mod api;
mod session;

pub use self::{api::api_codec, session::destination_session};

use std::sync::OnceLock;

use migrator_guest::{
    BootInfo,
    abi::{ARGS_LEN, BootInfoError},
    args::Args,
};
use thiserror::Error;

use crate::{
    migration::{
        protocol::{FrameHeader, HEADER_LEN, MAX_PAGES_PER_FRAME},
        transport::{Frame, FrameReader, TransportError},
    },
    vmm::{
        GuestImage, GuestMemory, PartitionConfig, layout,
        loader::{Image, ImageError},
        memory::{MemoryError, PAGE_SIZE},
        state::{self, StateError},
    },
};

/// Why a target refused its input: the decoder's own error, by the step that refused it.
#[derive(Debug, Error)]
pub enum FuzzError {
    #[error("no input")]
    Empty,
    #[error("a data frame is refused")]
    Frame(#[source] TransportError),
    #[error("the saved state is refused")]
    State(#[source] StateError),
    #[error("the guest ELF image is refused")]
    Elf(#[source] ImageError),
    #[error("the accepted ELF image does not load")]
    Load(#[source] ImageError),
    #[error("a loaded segment cannot be read back")]
    ReadBack(#[source] MemoryError),
    #[error("not a boot-info header ({0:?}), and not args a launch accepts")]
    BootArgs(BootInfoError),
    #[error("neither a request nor a response of the API")]
    Api(#[source] std::io::Error),
    #[error("not a session: {0}")]
    Session(&'static str),
}

/// The decoders, by the name of their fuzz target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Data frames read as a stream by `FrameReader` (header, page indexes, page data).
    Frames,
    /// A partition's saved state (`vmm::state`).
    State,
    /// Guest ELF images (`vmm::loader`), loaded into guest memory when accepted.
    Elf,
    /// The boot-info header and the args it carries, as the VMM writes and the guest reads them.
    BootArgs,
    /// The API's wire codec (`api::codec`): frames, requests and responses.
    ApiCodec,
    /// The destination's session (`migration::destination`): frames and control calls in
    /// any order, against its phase machine and a small guest memory.
    DestinationSession,
}

impl Target {
    pub const ALL: [Self; 6] = [
        Self::Frames,
        Self::State,
        Self::Elf,
        Self::BootArgs,
        Self::ApiCodec,
        Self::DestinationSession,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Frames => "frames",
            Self::State => "state",
            Self::Elf => "elf",
            Self::BootArgs => "boot_args",
            Self::ApiCodec => "api_codec",
            Self::DestinationSession => "destination_session",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Feeds `data` to this target's decoder.
    pub fn feed(self, data: &[u8]) -> Result<(), FuzzError> {
        match self {
            Self::Frames => frames(data),
            Self::State => state(data),
            Self::Elf => elf(data),
            Self::BootArgs => boot_args(data),
            Self::ApiCodec => api_codec(data),
            Self::DestinationSession => destination_session(data),
        }
    }
}

/// Input: one byte giving the partition's size in pages (0 to 255), then the bytes of a data
/// connection, read frame by frame until the stream ends or a frame is refused.
pub fn frames(data: &[u8]) -> Result<(), FuzzError> {
    let Some((&pages, stream)) = data.split_first() else {
        return Err(FuzzError::Empty);
    };
    let frames = u64::from(pages);
    // The header decoder alone: a header it accepts encodes back to the same bytes.
    if let Some(bytes) = stream.first_chunk::<HEADER_LEN>()
        && let Ok(header) = FrameHeader::decode(bytes)
    {
        assert_eq!(
            header.encode(),
            *bytes,
            "a frame header re-encodes unchanged"
        );
    }
    let mut reader = FrameReader::new(stream, frames);
    loop {
        match reader.next_frame() {
            Ok(None) => return Ok(()),
            Err(e) => return Err(FuzzError::Frame(e)),
            Ok(Some(Frame::Done | Frame::Urgent | Frame::Discarded)) => {}
            Ok(Some(Frame::Demand(pages) | Frame::Discard(pages))) => {
                assert!(pages.len() <= MAX_PAGES_PER_FRAME as usize);
                assert!(pages.iter().all(|&p| p < frames), "named pages in range");
            }
            Ok(Some(Frame::Pages(pages))) => {
                assert!(pages.len() <= MAX_PAGES_PER_FRAME as usize);
                for (page, bytes) in pages {
                    assert!(page < frames, "page {page} of {frames} accepted");
                    assert!(bytes.is_none_or(|b| b.len() as u64 == PAGE_SIZE));
                }
            }
        }
    }
}

/// The partition the state target's inputs are decoded for (and its seeds were made of).
pub fn state_config() -> PartitionConfig {
    PartitionConfig {
        name: Some("fuzz".into()),
        mem_size: 4 << 20,
        vcpus: 2,
        image: GuestImage::Builtin("idle".into()),
        args: "rate=1000".into(),
    }
}

/// Input: a saved state. It is decoded as it is, then again behind a header made for its
/// payload, so that mutations of the payload get past the checksum and reach the payload
/// decoder and the shape checks. Whatever decodes encodes back to the same bytes.
pub fn state(data: &[u8]) -> Result<(), FuzzError> {
    let expected = state_config();
    let check = |bytes: &[u8]| -> Result<(), StateError> {
        let snapshot = state::decode(bytes, &expected)?;
        assert_eq!(snapshot.vcpus.len(), expected.vcpus as usize);
        assert!(
            state::encode(&snapshot) == bytes,
            "a decoded state re-encodes unchanged"
        );
        Ok(())
    };
    let raw = check(data);
    if let Some(payload) = data.get(state::HEADER_LEN..) {
        let _ = check(&state::wrap(payload));
    }
    raw.map_err(FuzzError::State)
}

/// Guest memory the ELF target loads accepted images into: made once, reused.
fn elf_memory() -> Option<&'static GuestMemory> {
    static MEMORY: OnceLock<Option<GuestMemory>> = OnceLock::new();
    MEMORY
        .get_or_init(|| GuestMemory::new(ELF_MEM_SIZE).ok())
        .as_ref()
}

const ELF_MEM_SIZE: u64 = 4 << 20;
const ELF_RESERVED_TOP: u64 = 2 * migrator_guest::abi::STACK_SIZE;

/// Input: a guest ELF image, for 4 MiB of guest memory with two vCPU stacks. An accepted image
/// lies between the VMM's memory and the stacks, its entry in a segment, and loads.
pub fn elf(data: &[u8]) -> Result<(), FuzzError> {
    let image = Image::parse(data, ELF_MEM_SIZE, ELF_RESERVED_TOP).map_err(FuzzError::Elf)?;
    let limit = ELF_MEM_SIZE - ELF_RESERVED_TOP;
    assert!(image.end().0 <= limit, "the image ends below the stacks");
    let mut in_segment = false;
    for (start, bytes, memsz) in image.segments() {
        assert!(start.0 >= migrator_guest::abi::IMAGE_BASE);
        assert!(bytes.len() as u64 <= memsz && start.0 + memsz <= limit);
        in_segment |= image.entry() >= start && image.entry().0 < start.0 + memsz;
    }
    assert!(in_segment, "the entry point is in a segment");
    if let Some(memory) = elf_memory() {
        image.load(memory).map_err(FuzzError::Load)?;
        for (start, bytes, _) in image.segments() {
            let mut back = vec![0; bytes.len()];
            memory.read(start, &mut back).map_err(FuzzError::ReadBack)?;
            // Segments may overlap; only a single one must read back as written.
            if image.segments().count() == 1 {
                assert_eq!(back, bytes, "a loaded segment reads back");
            }
        }
    }
    Ok(())
}

/// Every argument key the built-in workloads read.
const KEYS: [&str; 13] = [
    "rate",
    "seed",
    "value_size",
    "keys",
    "theta",
    "write",
    "check_every",
    "hot_ro",
    "hot_rw",
    "hot_pages",
    "write_every",
    "",
    "=",
];

/// Reads every argument the workloads read, the way they read it.
fn read_args(text: &str) {
    let args = Args::new(text);
    if let Some(name) = args.name() {
        assert!(!name.contains('=') && !name.is_empty());
    }
    for key in KEYS {
        let _ = args.u64(key, 7);
        if let Ok(f) = args.fraction(key, 0.5) {
            assert!((0.0..=1.0).contains(&f), "a fraction in [0, 1]");
        }
        if let Ok(f) = args.float(key, 1.0) {
            assert!(f >= 0.0 && f.is_finite(), "a finite non-negative float");
        }
    }
}

/// Input: as a boot-info header (what a guest reads from the page RDI points to), then as the
/// args of a launch: what the VMM accepts, it writes into a header that the guest reads back
/// with the same args; the guest's argument parser reads every key from both.
pub fn boot_args(data: &[u8]) -> Result<(), FuzzError> {
    let header = BootInfo::decode(data);
    if let Ok(info) = &header {
        assert_eq!(
            &info.to_bytes()[..],
            &data[..size_of::<BootInfo>()],
            "a boot-info header re-encodes unchanged"
        );
        read_args(info.args_str().unwrap_or_default());
    }

    let text = String::from_utf8_lossy(data);
    read_args(&text);
    let launches = [
        PartitionConfig {
            name: None,
            mem_size: 4 << 20,
            vcpus: 1,
            image: GuestImage::Elf(Vec::new()),
            args: text.to_string(),
        },
        PartitionConfig {
            name: None,
            mem_size: 4 << 20,
            vcpus: 1,
            image: GuestImage::Builtin("kv-zipf".into()),
            args: text.to_string(),
        },
    ];
    let mut accepted = 0;
    for config in launches {
        let Ok(args) = config.checked_boot_args() else {
            continue;
        };
        accepted += 1;
        assert!(args.len() < ARGS_LEN);
        let bytes = layout::boot_info(config.vcpus, config.mem_size, 1000, &args)
            .expect("accepted args fit the boot info");
        let info = BootInfo::decode(&bytes).expect("the guest reads what the VMM writes");
        assert_eq!(
            info.args_str(),
            Some(args.as_str()),
            "args arrive unchanged"
        );
        read_args(&args);
    }
    match (header, accepted) {
        (Ok(_), _) => Ok(()),
        (Err(e), 0) => Err(FuzzError::BootArgs(e)),
        (Err(_), _) => Ok(()),
    }
}
