//! Guest RAM: one memfd mapped shared at guest-physical 0.
//!
//! Shared memfd memory lets the VMM drop its mapping of a page (MADV_DONTNEED) without losing
//! the data, which is how the heat sampler makes the guest fault again, and lets userfaultfd
//! serve pages on demand after a migration.
//!
//! The VMM never holds a Rust reference into guest memory, which a running guest may write at
//! any time: it copies in and out through the mapping's raw pointer (`read`, `write`,
//! `copy_frame`). The system calls go through rustix (memfd, mmap, madvise); no raw libc call is left here.

use std::{fmt, io::IoSlice, ops::Range, os::fd::OwnedFd};

use rustix::{
    fs::{MemfdFlags, ftruncate, memfd_create},
    mm::{MapFlags, ProtFlags, mmap, munmap},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod digest;
mod holes;

pub use digest::MemoryDigest;

/// Page size of guest memory, and of every page the migration protocol carries: the one
/// definition, which everyone imports.
pub const PAGE_SIZE: u64 = 4096;

/// A guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GuestAddress(pub u64);

impl GuestAddress {
    pub fn offset(self, by: u64) -> Option<Self> {
        self.0.checked_add(by).map(Self)
    }

    /// The guest frame number holding this address.
    pub fn frame(self) -> u64 {
        self.0 / PAGE_SIZE
    }
}

impl fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("guest memory must be a non-zero multiple of {PAGE_SIZE} bytes, got {0}")]
    BadSize(u64),
    #[error("the host cannot give {requested} bytes of guest memory ({available} available)")]
    TooLarge { requested: u64, available: u64 },
    #[error("writing guest memory through the memfd failed")]
    Pwrite(#[source] std::io::Error),
    #[error("memfd_create failed")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the memfd failed")]
    Truncate(#[source] std::io::Error),
    #[error("mapping guest memory failed")]
    Map(#[source] std::io::Error),
    #[error("guest range {start}+{len:#x} is outside the {size:#x} bytes of guest memory")]
    OutOfRange {
        start: GuestAddress,
        len: u64,
        size: u64,
    },
    #[error("frame {frame} is outside the {frames} frames of guest memory")]
    FrameOutOfRange { frame: u64, frames: u64 },
    #[error("frames {start}..{end} are outside the {frames} frames of guest memory")]
    FramesOutOfRange { start: u64, end: u64, frames: u64 },
    #[error("dropping the host mapping of frames {start}..{end} failed")]
    DropMapping {
        start: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("freeing the backing of frame {frame} failed")]
    RemovePage {
        frame: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("asking whether a page is in guest memory failed")]
    Mincore(#[source] std::io::Error),
}

/// One guest page, as copied out of guest memory.
pub type Page = [u8; PAGE_SIZE as usize];

/// Guest RAM.
pub struct GuestMemory {
    memfd: OwnedFd,
    base: *mut u8,
    size: u64,
}

// SAFETY: the mapping is plain shared memory owned by this struct until Drop. Concurrent
// access by vCPUs is inherent to guest memory; the VMM's own reads and writes are
// bounds-checked copies through the raw pointer, which lend out no reference into the mapping
// and tolerate concurrent guest writes (a copy of a page being written may mix old and new
// bytes; where consistency matters, the guest is paused).
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

/// Memory the host can still give, from /proc/meminfo's MemAvailable.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

impl GuestMemory {
    /// Creates `size` bytes of zeroed guest memory.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize(size));
        }
        if let Some(available) = available_memory()
            && size > available
        {
            return Err(MemoryError::TooLarge {
                requested: size,
                available,
            });
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let memfd = memfd_create("partition-ram", MemfdFlags::CLOEXEC)
            .map_err(|e| MemoryError::Memfd(e.into()))?;
        ftruncate(&memfd, size).map_err(|e| MemoryError::Truncate(e.into()))?;
        // SAFETY: a new shared mapping of the whole memfd at an address the kernel chooses (no
        // hint, no MAP_FIXED), so it cannot replace or overlap any memory already in use; it is
        // unmapped only in Drop.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                &memfd,
                0,
            )
        }
        .map_err(|e| MemoryError::Map(e.into()))?;
        Ok(Self {
            memfd,
            base: base.cast(),
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn frames(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Host address of the mapping, for KVM's memory slot.
    pub fn host_address(&self) -> u64 {
        self.base as u64
    }

    pub fn memfd(&self) -> &OwnedFd {
        &self.memfd
    }

    /// The offset of `frame` in the mapping, if the whole frame lies inside it.
    fn frame_offset(&self, frame: u64) -> Result<usize, MemoryError> {
        let out_of_range = || MemoryError::FrameOutOfRange {
            frame,
            frames: self.frames(),
        };
        let start = frame.checked_mul(PAGE_SIZE).ok_or_else(out_of_range)?;
        match start.checked_add(PAGE_SIZE) {
            Some(end) if end <= self.size => usize::try_from(start).map_err(|_| out_of_range()),
            _ => Err(out_of_range()),
        }
    }

    fn check(&self, start: GuestAddress, len: u64) -> Result<usize, MemoryError> {
        match start.0.checked_add(len) {
            Some(end) if end <= self.size => Ok(start.0 as usize),
            _ => Err(MemoryError::OutOfRange {
                start,
                len,
                size: self.size,
            }),
        }
    }

    /// Copies `bytes` into guest memory at `start`.
    pub fn write(&self, start: GuestAddress, bytes: &[u8]) -> Result<(), MemoryError> {
        let offset = self.check(start, bytes.len() as u64)?;
        // SAFETY: the range was bounds-checked against the live mapping; `bytes` cannot lie
        // inside it, since no Rust reference into guest memory is ever handed out.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset), bytes.len())
        };
        Ok(())
    }

    /// Writes `bytes` into guest memory at `start` through the memfd (`pwrite`), not the
    /// mapping: a page written for the first time is allocated by the write itself, with no
    /// user page fault and no zeroing of what the write covers. The data is the mapping's too
    /// (the same shared pages).
    pub fn write_through_fd(&self, start: GuestAddress, bytes: &[u8]) -> Result<(), MemoryError> {
        self.check(start, bytes.len() as u64)?;
        let mut done = 0;
        while done < bytes.len() {
            let written = rustix::io::pwrite(&self.memfd, &bytes[done..], start.0 + done as u64)
                .map_err(|e| MemoryError::Pwrite(e.into()))?;
            if written == 0 {
                return Err(MemoryError::Pwrite(std::io::ErrorKind::WriteZero.into()));
            }
            done += written;
        }
        Ok(())
    }

    /// Writes `pages` into guest memory from frame `first` on, one page after the other,
    /// through the memfd as [`write_through_fd`](Self::write_through_fd) does, with one
    /// `pwritev` for all of them: a run of neighbouring pages costs one call, not one a page.
    pub fn write_frames_through_fd(&self, first: u64, pages: &[&[u8]]) -> Result<(), MemoryError> {
        let len: u64 = pages.iter().map(|p| p.len() as u64).sum();
        let start = GuestAddress(first.saturating_mul(PAGE_SIZE));
        self.check(start, len)?;
        let mut offset = start.0;
        // The kernel takes at most IOV_MAX (1024) slices a call.
        for chunk in pages.chunks(1024) {
            let mut slices: Vec<IoSlice<'_>> = chunk.iter().map(|p| IoSlice::new(p)).collect();
            let mut bufs = &mut slices[..];
            while !bufs.is_empty() {
                let written = rustix::io::pwritev(&self.memfd, bufs, offset)
                    .map_err(|e| MemoryError::Pwrite(e.into()))?;
                if written == 0 {
                    return Err(MemoryError::Pwrite(std::io::ErrorKind::WriteZero.into()));
                }
                offset += written as u64;
                IoSlice::advance_slices(&mut bufs, written);
            }
        }
        Ok(())
    }

    /// Copies guest memory at `start` into `out`.
    pub fn read(&self, start: GuestAddress, out: &mut [u8]) -> Result<(), MemoryError> {
        let offset = self.check(start, out.len() as u64)?;
        // SAFETY: the range was bounds-checked against the live mapping; `out`, an exclusive
        // Rust buffer, cannot lie inside it (see `copy_frame` on concurrent guest writes).
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    pub fn write_u64(&self, at: GuestAddress, value: u64) -> Result<(), MemoryError> {
        self.write(at, &value.to_le_bytes())
    }

    /// Reads a u64 with one volatile load, for counters the guest updates in place.
    pub fn read_u64_volatile(&self, at: GuestAddress) -> Result<u64, MemoryError> {
        let offset = self.check(at, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(MemoryError::OutOfRange {
                start: at,
                len: 8,
                size: self.size,
            });
        }
        // SAFETY: in bounds and 8-byte aligned (checked above; the mapping is page-aligned);
        // one volatile load, through the raw pointer.
        Ok(unsafe { std::ptr::read_volatile(self.base.add(offset).cast::<u64>()) })
    }

    /// Whether frame `frame` has its page in the memfd (`mincore` of the shared mapping asks
    /// the page cache). A frame userfaultfd holds whose page has not arrived has none, and any
    /// thread that touched it would wait until it arrives, however long.
    pub fn frame_present(&self, frame: u64) -> Result<bool, MemoryError> {
        let offset = self.frame_offset(frame)?;
        let mut resident = 0u8;
        // SAFETY: `offset..offset + PAGE_SIZE` lies inside the live mapping (checked above)
        // and is page-aligned; mincore only reads the page tables and the page cache, never
        // the page, and writes one byte per page, here the one byte of `resident`.
        let rc = unsafe {
            libc::mincore(
                self.base.add(offset).cast(),
                PAGE_SIZE as usize,
                &raw mut resident,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Mincore(std::io::Error::last_os_error()));
        }
        Ok(resident & 1 == 1)
    }

    /// As [`GuestMemory::read_u64_volatile`], but `None` at once where the page is not there
    /// (see [`GuestMemory::frame_present`]) instead of waiting for it: for the VMM's own
    /// reads, which must never stall a thread that serves the migration.
    pub fn read_u64_if_present(&self, at: GuestAddress) -> Result<Option<u64>, MemoryError> {
        if !self.frame_present(at.frame())? {
            return Ok(None);
        }
        self.read_u64_volatile(at).map(Some)
    }

    /// Copies frame `frame` into `out`. Unless the guest is paused, it may be writing the
    /// frame meanwhile: the copy may then mix old and new bytes, which is why callers look at
    /// (hash, test for zeros, send) the copy and never at guest memory itself.
    pub fn copy_frame(&self, frame: u64, out: &mut Page) -> Result<(), MemoryError> {
        let offset = self.frame_offset(frame)?;
        // SAFETY: `offset..offset + PAGE_SIZE` lies inside the mapping (checked above), which
        // stays mapped as long as `&self` lives; `out` is an exclusive Rust buffer of exactly
        // PAGE_SIZE bytes, so the two cannot overlap. Guest memory is only read through the
        // raw pointer, never through a reference: guest writes during the copy come from
        // outside this program (vCPUs, through KVM), as with memory shared with another
        // process, and can change the bytes copied but no value Rust assumes unchanging.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// The offset and length of `frames` in the mapping, if they all lie inside it.
    fn frames_range(&self, frames: &Range<u64>) -> Result<(usize, usize), MemoryError> {
        let out_of_range = || MemoryError::FramesOutOfRange {
            start: frames.start,
            end: frames.end,
            frames: self.frames(),
        };
        let start = frames
            .start
            .checked_mul(PAGE_SIZE)
            .ok_or_else(out_of_range)?;
        let len = frames
            .end
            .saturating_sub(frames.start)
            .checked_mul(PAGE_SIZE)
            .ok_or_else(out_of_range)?;
        let offset = self
            .check(GuestAddress(start), len)
            .map_err(|_| out_of_range())?;
        Ok((offset, usize::try_from(len).map_err(|_| out_of_range())?))
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped (its size fit a usize there); nothing
        // borrowed from the mapping outlives self.
        if let Err(e) = unsafe { munmap(self.base.cast(), self.size as usize) } {
            tracing::warn!("unmapping guest memory: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use xxhash_rust::xxh3::xxh3_64;

    use super::*;

    /// What the VMM reads of guest memory must never wait on a page userfaultfd holds: a
    /// status call or the handover would hang until the page came, and it may never come.
    #[test]
    fn a_page_userfaultfd_holds_is_absent_and_never_waited_on() {
        let memory = Arc::new(GuestMemory::new(4 * PAGE_SIZE).unwrap());
        memory.write_u64(GuestAddress(8), 7).unwrap();
        memory.write_u64(GuestAddress(3 * PAGE_SIZE), 9).unwrap();
        let uffd = match userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
        {
            Ok(uffd) => uffd,
            Err(e) => {
                // Counted as a skip by `cargo xtask test`, as the integration tests' are.
                let why = format!("userfaultfd is not available here: {e}");
                eprintln!("SKIPPED a_page_userfaultfd_holds_is_absent_and_never_waited_on: {why}");
                if let Some(log) = std::env::var_os("HEATPROBE_SKIP_LOG") {
                    use std::io::Write;
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(log)
                        .unwrap();
                    writeln!(
                        file,
                        "a_page_userfaultfd_holds_is_absent_and_never_waited_on: {why}"
                    )
                    .unwrap();
                }
                return;
            }
        };
        uffd.register(
            memory.host_address() as *mut libc::c_void,
            memory.size() as usize,
        )
        .unwrap();
        // A page that was written is there; frame 2 never was, and frame 3 is punched out as
        // a hybrid commit punches the stale copies.
        memory.remove_frames(3..4).unwrap();
        let reading = Arc::clone(&memory);
        let (done, read) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let answers = [
                reading.read_u64_if_present(GuestAddress(8)).unwrap(),
                reading
                    .read_u64_if_present(GuestAddress(2 * PAGE_SIZE))
                    .unwrap(),
                reading
                    .read_u64_if_present(GuestAddress(3 * PAGE_SIZE))
                    .unwrap(),
            ];
            let _ = done.send(answers);
        });
        // A read that waited on the missing page would never answer.
        let answers = read
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a read of a missing page waited");
        assert_eq!(answers, [Some(7), None, None]);
        assert!(memory.frame_present(0).unwrap());
        assert!(!memory.frame_present(2).unwrap());
        assert!(memory.frame_present(4).is_err(), "out of range");
        // Drop the registration before the memory goes.
        drop(uffd);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(GuestMemory::new(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(
            GuestMemory::new(4095),
            Err(MemoryError::BadSize(4095))
        ));
        assert!(matches!(
            GuestMemory::new(1 << 50),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn reads_writes_and_digests() {
        let mem = GuestMemory::new(4 * PAGE_SIZE).unwrap();
        let before = mem.digest();
        mem.write(GuestAddress(PAGE_SIZE + 8), b"hello").unwrap();
        let mut out = [0u8; 5];
        mem.read(GuestAddress(PAGE_SIZE + 8), &mut out).unwrap();
        assert_eq!(&out, b"hello");
        let after = mem.digest();
        assert_ne!(before.total, after.total);
        assert_eq!(before.pages[0], after.pages[0]);
        assert_ne!(before.pages[1], after.pages[1]);
        assert!(mem.write(GuestAddress(4 * PAGE_SIZE - 2), b"abc").is_err());
        assert!(mem.read(GuestAddress(u64::MAX), &mut out).is_err());
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.copy_frame(1, &mut page).unwrap();
        assert_eq!(&page[8..13], b"hello");
        assert_eq!(after.pages[1], xxh3_64(&page));
        // Dropping the mapping keeps the data.
        mem.drop_mapping(0..4).unwrap();
        mem.read(GuestAddress(PAGE_SIZE + 8), &mut out).unwrap();
        assert_eq!(&out, b"hello");
    }

    #[test]
    fn a_run_of_pages_written_through_the_memfd_reads_back() {
        // More pages than one pwritev takes, so the run is split.
        let frames = 1100;
        let mem = GuestMemory::new((frames + 2) * PAGE_SIZE).unwrap();
        let pages: Vec<Vec<u8>> = (0..frames)
            .map(|f| vec![(f % 251) as u8 + 1; PAGE_SIZE as usize])
            .collect();
        let slices: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
        mem.write_frames_through_fd(1, &slices).unwrap();
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.copy_frame(0, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 0),
            "the page before the run is untouched"
        );
        for f in 0..frames {
            mem.copy_frame(f + 1, &mut page).unwrap();
            assert_eq!(&page[..], &pages[f as usize][..], "frame {}", f + 1);
        }
        mem.copy_frame(frames + 1, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 0),
            "the page after the run is untouched"
        );
        // A run past the end is refused and writes nothing.
        assert!(matches!(
            mem.write_frames_through_fd(frames, &slices[..3]),
            Err(MemoryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn frames_out_of_range_are_errors_not_panics() {
        let mem = GuestMemory::new(4 * PAGE_SIZE).unwrap();
        let mut page = [0u8; PAGE_SIZE as usize];
        for frame in [
            4,
            5,
            u64::MAX / PAGE_SIZE,
            u64::MAX / PAGE_SIZE + 1,
            u64::MAX,
        ] {
            assert!(
                matches!(
                    mem.copy_frame(frame, &mut page),
                    Err(MemoryError::FrameOutOfRange { frames: 4, .. })
                ),
                "frame {frame}"
            );
            assert!(mem.remove_page(frame).is_err(), "frame {frame}");
        }
        for frames in [0..5, 4..5, u64::MAX - 1..u64::MAX, 1..u64::MAX] {
            assert!(
                matches!(
                    mem.drop_mapping(frames.clone()),
                    Err(MemoryError::FramesOutOfRange { .. })
                ),
                "{frames:?}"
            );
        }
        // An empty range anywhere inside is fine; the last frame is in range.
        mem.drop_mapping(2..2).unwrap();
        mem.copy_frame(3, &mut page).unwrap();
        mem.remove_page(3).unwrap();
    }
}
