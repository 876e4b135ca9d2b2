//! Digests of guest memory: an xxh3 of every page, and one over those, as both sides of a
//! migration compare them.

use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::{GuestMemory, PAGE_SIZE, Page};

impl GuestMemory {
    /// The memory's digest: an xxh3 of every page, and an xxh3 over those. Each page is
    /// copied out first, so a guest still running makes a digest of mixed moments, never
    /// undefined behaviour.
    pub fn digest(&self) -> MemoryDigest {
        let mut page = [0u8; PAGE_SIZE as usize];
        let pages: Vec<u64> = (0..self.frames())
            .map(|f| self.frame_hash(f, &mut page))
            .collect();
        MemoryDigest::from_pages(pages)
    }

    /// Frame `frame`'s xxh3, copied out through `page`; 0 for a frame that cannot be read.
    fn frame_hash(&self, frame: u64, page: &mut Page) -> u64 {
        match self.copy_frame(frame, page) {
            Ok(()) => xxh3_64(page),
            Err(_) => 0,
        }
    }

    /// How long [`Self::digest`] takes here, from the CPU time this thread spends to digest
    /// [`DIGEST_SAMPLE`] frames spread evenly over the memory (a few milliseconds). CPU time,
    /// not the clock: the sample is a few hundredths of the whole, so one preemption during
    /// it, on a busy host, once made a 60 ms digest look like 380 ms, and a pre-copy that
    /// could not converge on it failed.
    pub fn digest_time(&self) -> Duration {
        let frames = self.frames();
        let sample = frames.min(DIGEST_SAMPLE);
        if sample == 0 {
            return Duration::ZERO;
        }
        // In runs of neighbouring frames, as the digest reads them: single frames spread
        // out each cost a TLB miss the whole does not pay (sampled so, the downtimes
        // expected ran 70-135 ms over the pauses they led to).
        let runs = (sample / DIGEST_RUN).max(1);
        let stride = frames / runs;
        let mut page = [0u8; PAGE_SIZE as usize];
        let mut hashes = 0u64;
        let started = thread_cpu_time();
        for run in 0..runs {
            let first = run * stride;
            for frame in first..(first + DIGEST_RUN).min(frames) {
                hashes ^= self.frame_hash(frame, &mut page);
            }
        }
        std::hint::black_box(hashes);
        thread_cpu_time()
            .saturating_sub(started)
            .mul_f64(frames as f64 / (runs * DIGEST_RUN).min(frames) as f64)
    }
}

/// Frames [`GuestMemory::digest_time`] digests to time the whole: 16 MiB, in runs of
/// [`DIGEST_RUN`].
const DIGEST_SAMPLE: u64 = 4096;
/// Neighbouring frames per run of the sample (256 KiB).
const DIGEST_RUN: u64 = 64;

fn thread_cpu_time() -> Duration {
    // A thread's CPU time is never negative, the one case the conversion refuses.
    Duration::try_from(clock_gettime(ClockId::ThreadCPUTime)).unwrap_or_default()
}

/// Per-page xxh3 digests and their total.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryDigest {
    pub total: u64,
    pub pages: Vec<u64>,
}

impl MemoryDigest {
    pub fn from_pages(pages: Vec<u64>) -> Self {
        let bytes: Vec<u8> = pages.iter().flat_map(|d| d.to_le_bytes()).collect();
        Self {
            total: xxh3_64(&bytes),
            pages,
        }
    }

    /// The total as the hex string the CLI and JSON show.
    pub fn total_hex(&self) -> String {
        format!("{:016x}", self.total)
    }
}
