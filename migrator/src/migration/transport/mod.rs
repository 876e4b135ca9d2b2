//! What travels over the data connection: frames of pages, paced to a bandwidth limit.
//!
//! Pages travel in frames of up to 1024 (4 MiB), zero pages as markers without data. The
//! sender copies pages into one buffer per frame and writes it with one call: measured on
//! loopback, that streams at close to a plain TCP copy (docs/BENCHMARKS.md).
//!
//! With `--compress`, each frame's payload is compressed when that saves at least an eighth
//! of it, and sent as a `CompressedPages` frame; the reader turns it back into the `Pages`
//! frame it was (`migration::compress`).
//!
//! Sender and reader work on any `io::Write` and `io::Read`; opening and tuning the
//! connection is `link`'s.

use std::{io, time::Duration};

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use super::{compress::CompressError, protocol::FrameError};
use crate::vmm::memory::{MemoryError, PAGE_SIZE, Page};

mod pacer;
mod read;
mod send;
#[cfg(test)]
mod tests;

pub use pacer::{BURST, Pacer};
pub use read::{Frame, FrameReader};
pub use send::{PageSender, SendCounts, send_demand, send_discarded};

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("reading or writing the socket failed")]
    Io(#[from] io::Error),
    #[error("the peer sent a bad frame")]
    Frame(#[from] FrameError),
    #[error("reading page {page} from guest memory failed")]
    Memory {
        page: u64,
        #[source]
        source: MemoryError,
    },
    #[error("a frame of {0} pages does not fit the send buffer")]
    FrameTooLarge(usize),
    #[error("cannot compress the page stream")]
    Compress(#[from] CompressError),
}

/// How long a daemon waits on a silent peer by default before giving up on a migration.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// The xxh3 of an all-zero page.
pub fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE as usize]))
}

/// Whether `page` is all zeros. Each cache line's words are OR-ed together, a fold without
/// branches that the compiler turns into vector instructions; a data page still stops at its
/// first line with a non-zero byte (`cargo xtask bench pages` measures both).
pub fn is_zero_page(page: &Page) -> bool {
    page.as_chunks::<64>().0.iter().all(|line| {
        line.as_chunks::<8>()
            .0
            .iter()
            .fold(0, |acc, word| acc | u64::from_ne_bytes(*word))
            == 0
    })
}
