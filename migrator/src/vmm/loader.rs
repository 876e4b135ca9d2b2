//! Guest images: static ELF64 x86-64 executables whose PT_LOAD segments are copied to their
//! physical addresses (guest ABI v1). Everything is checked before anything is copied, so a
//! refused image leaves guest memory untouched.

use migrator_guest::abi::IMAGE_BASE;
use object::{
    Endianness, elf,
    read::elf::{ElfFile64, FileHeader, ProgramHeader},
};
use thiserror::Error;

use super::memory::{GuestAddress, GuestMemory, MemoryError};

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("not a valid ELF64 file")]
    Parse(#[source] object::read::Error),
    #[error("not an x86-64 executable (machine {machine}, type {kind})")]
    NotX86Executable { machine: u16, kind: u16 },
    #[error("the image has no loadable segment")]
    NoSegments,
    #[error("segment at {start}+{len:#x} overlaps the VMM's memory below {IMAGE_BASE:#x}")]
    OverlapsVmm { start: GuestAddress, len: u64 },
    #[error(
        "segment at {start}+{len:#x} does not fit in {mem_size:#x} bytes of guest memory (stacks take the top)"
    )]
    DoesNotFit {
        start: GuestAddress,
        len: u64,
        mem_size: u64,
    },
    #[error("segment file range is outside the image")]
    Truncated,
    #[error("the entry point {0} is outside the loaded segments")]
    BadEntry(GuestAddress),
    #[error("copying the image into guest memory failed")]
    Copy(#[source] MemoryError),
}

/// A parsed, checked image, ready to load.
pub struct Image<'a> {
    entry: GuestAddress,
    segments: Vec<(GuestAddress, &'a [u8], u64)>,
    end: GuestAddress,
}

impl<'a> Image<'a> {
    /// Parses and checks `bytes` for guest memory of `mem_size` bytes whose top `reserved_top`
    /// bytes are stacks.
    pub fn parse(bytes: &'a [u8], mem_size: u64, reserved_top: u64) -> Result<Self, ImageError> {
        let file = ElfFile64::<Endianness>::parse(bytes).map_err(ImageError::Parse)?;
        let header = file.elf_header();
        let endian = file.endian();
        let machine = header.e_machine(endian);
        let kind = header.e_type(endian);
        if machine != elf::EM_X86_64 || kind != elf::ET_EXEC {
            return Err(ImageError::NotX86Executable { machine, kind });
        }
        let limit = mem_size.saturating_sub(reserved_top);
        let mut segments = Vec::new();
        let mut end = 0;
        for ph in file.elf_program_headers() {
            if ph.p_type(endian) != elf::PT_LOAD {
                continue;
            }
            let start = GuestAddress(ph.p_paddr(endian));
            let memsz = ph.p_memsz(endian);
            let data = ph.data(endian, bytes).map_err(|()| ImageError::Truncated)?;
            if data.len() as u64 > memsz {
                return Err(ImageError::Truncated);
            }
            if start.0 < IMAGE_BASE {
                return Err(ImageError::OverlapsVmm { start, len: memsz });
            }
            match start.0.checked_add(memsz) {
                Some(seg_end) if seg_end <= limit => end = end.max(seg_end),
                _ => {
                    return Err(ImageError::DoesNotFit {
                        start,
                        len: memsz,
                        mem_size,
                    });
                }
            }
            segments.push((start, data, memsz));
        }
        if segments.is_empty() {
            return Err(ImageError::NoSegments);
        }
        let entry = GuestAddress(header.e_entry(endian));
        let in_segment = segments
            .iter()
            .any(|(start, _, memsz)| entry >= *start && entry.0 < start.0 + memsz);
        if !in_segment {
            return Err(ImageError::BadEntry(entry));
        }
        Ok(Self {
            entry,
            segments,
            end: GuestAddress(end),
        })
    }

    pub fn entry(&self) -> GuestAddress {
        self.entry
    }

    /// The loadable segments: where each starts, its file bytes, and its size in memory.
    pub fn segments(&self) -> impl Iterator<Item = (GuestAddress, &'a [u8], u64)> + '_ {
        self.segments.iter().copied()
    }

    /// First address past the highest segment.
    pub fn end(&self) -> GuestAddress {
        self.end
    }

    /// Copies the segments into guest memory; the rest of each segment (bss) stays zero, as
    /// fresh guest memory is.
    pub fn load(&self, memory: &GuestMemory) -> Result<(), ImageError> {
        for (start, data, _) in &self.segments {
            memory.write(*start, data).map_err(ImageError::Copy)?;
        }
        Ok(())
    }
}
