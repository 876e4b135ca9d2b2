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

use std::{
    io::{self, Read, Write},
    time::{Duration, Instant},
};

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use super::{
    compress::{Compress, CompressError, Compressor, Decompressor},
    protocol::{
        COMPRESSED_PREFIX_LEN, CompressedPrefix, FrameError, FrameHeader, FrameKind, HEADER_LEN,
        MAX_PAGES_PER_FRAME, ZERO_PAGE, check_page, pages_payload_len,
    },
};
use crate::vmm::{
    GuestMemory,
    memory::{MemoryError, PAGE_SIZE, Page},
};

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

/// Spreads writes so that no more than `bytes_per_sec` leave: a token bucket whose credit
/// starts at the first send (time before it, such as a heat profile, earns nothing) and is
/// capped at [`BURST`] of the rate, so an idle gap never lets a burst through that the link
/// would have to queue.
pub struct Pacer {
    bytes_per_sec: Option<u64>,
    /// When the credit was last brought up to date; `None` until the first send.
    last: Option<Instant>,
    /// Bytes that may leave now without waiting; negative while a send is paid off.
    credit: f64,
}

/// The most credit an idle spell earns, as time at the rate.
pub const BURST: Duration = Duration::from_millis(50);

impl Pacer {
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            bytes_per_sec,
            last: None,
            credit: 0.0,
        }
    }

    /// Accounts for `bytes` about to be sent, sleeping first if that would exceed the rate.
    pub fn pace(&mut self, bytes: u64) {
        let wait = self.delay(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// How long `bytes` sent at `now` must wait to keep to the rate.
    pub fn delay(&mut self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.bytes_per_sec.filter(|r| *r > 0).map(|r| r as f64) else {
            return Duration::ZERO;
        };
        if let Some(last) = self.last {
            let earned = now.saturating_duration_since(last).as_secs_f64() * rate;
            self.credit = (self.credit + earned).min(BURST.as_secs_f64() * rate);
        }
        self.last = Some(now);
        self.credit -= bytes as f64;
        if self.credit >= 0.0 {
            Duration::ZERO
        } else {
            // Once slept, the next send's refill counts the sleep, which pays this off.
            Duration::from_secs_f64(-self.credit / rate)
        }
    }
}

/// Counts of what a send did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendCounts {
    pub pages: u64,
    pub zero_pages: u64,
    /// What went on the wire.
    pub bytes: u64,
    /// What would have, uncompressed: `bytes` when nothing was compressed.
    pub uncompressed_bytes: u64,
}

impl std::ops::AddAssign for SendCounts {
    fn add_assign(&mut self, other: Self) {
        self.pages += other.pages;
        self.zero_pages += other.zero_pages;
        self.bytes += other.bytes;
        self.uncompressed_bytes += other.uncompressed_bytes;
    }
}

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

/// The largest frame: header, an index entry and the data of every page.
const MAX_FRAME_LEN: usize = HEADER_LEN + (8 + PAGE_SIZE as usize) * MAX_PAGES_PER_FRAME as usize;

/// The sending side of a data connection: frames of pages written to `W`.
pub struct PageSender<W> {
    stream: W,
    pacer: Pacer,
    /// Room for the largest frame, allocated once: pages are copied from guest memory straight
    /// into their place here, and each frame leaves with one write of its first bytes.
    buffer: Vec<u8>,
    /// With compression: the codec, and room for the compressed form of the largest frame.
    compressor: Option<Compressor>,
    packed: Vec<u8>,
}

impl<W: Write> PageSender<W> {
    pub fn new(stream: W, bytes_per_sec: Option<u64>) -> Self {
        Self {
            stream,
            pacer: Pacer::new(bytes_per_sec),
            buffer: vec![0; MAX_FRAME_LEN],
            compressor: None,
            packed: Vec::new(),
        }
    }

    /// Compresses `Pages` frames from now on as `compress` says (where it saves an eighth).
    pub fn set_compression(&mut self, compress: Compress) -> Result<(), TransportError> {
        self.compressor = Compressor::new(compress)?;
        self.packed = match self.compressor {
            Some(_) => vec![0; MAX_FRAME_LEN + COMPRESSED_PREFIX_LEN],
            None => Vec::new(),
        };
        Ok(())
    }

    /// Sends `pages` of `memory`, in order, in as many frames as needed, and pushes onto
    /// `hashes` the xxh3 of each page exactly as sent (the guest may be writing meanwhile).
    pub fn send_pages(
        &mut self,
        memory: &GuestMemory,
        pages: &[u64],
        hashes: &mut Vec<u64>,
    ) -> Result<SendCounts, TransportError> {
        let mut counts = SendCounts::default();
        for chunk in pages.chunks(MAX_PAGES_PER_FRAME as usize) {
            counts += self.send_frame(memory, chunk, hashes)?;
        }
        Ok(counts)
    }

    fn send_frame(
        &mut self,
        memory: &GuestMemory,
        pages: &[u64],
        hashes: &mut Vec<u64>,
    ) -> Result<SendCounts, TransportError> {
        let mut counts = SendCounts::default();
        let too_large = || TransportError::FrameTooLarge(pages.len());
        if pages.len() > MAX_PAGES_PER_FRAME as usize {
            return Err(too_large());
        }
        // The header, then one index entry per page, then the data of the non-zero pages.
        let (head, data) = self
            .buffer
            .split_at_mut_checked(HEADER_LEN + 8 * pages.len())
            .ok_or_else(too_large)?;
        let (header_bytes, index) = head
            .split_at_mut_checked(HEADER_LEN)
            .ok_or_else(too_large)?;
        let slots = data.as_chunks_mut::<{ PAGE_SIZE as usize }>().0;
        let mut entries = Vec::with_capacity(pages.len());
        let mut filled = 0;
        for (&page, entry) in pages.iter().zip(index.as_chunks_mut::<8>().0) {
            let slot = slots.get_mut(filled).ok_or_else(too_large)?;
            // Copy first, then look at the copy: what is hashed is what is sent.
            memory
                .copy_frame(page, slot)
                .map_err(|source| TransportError::Memory { page, source })?;
            let marked = if is_zero_page(slot) {
                hashes.push(zero_page_hash());
                counts.zero_pages += 1;
                // A zero page travels as its marker alone: the next page reuses its slot.
                page | ZERO_PAGE
            } else {
                hashes.push(xxh3_64(slot));
                filled += 1;
                page
            };
            *entry = marked.to_le_bytes();
            entries.push(marked);
        }
        counts.pages = pages.len() as u64;
        let header = FrameHeader {
            kind: FrameKind::Pages,
            count: pages.len() as u32,
            payload_len: pages_payload_len(&entries),
        };
        header_bytes.copy_from_slice(&header.encode());
        let len = HEADER_LEN + 8 * pages.len() + filled * PAGE_SIZE as usize;
        let frame = match self.compress_frame(pages.len(), len) {
            Some(packed) => &self.packed[..packed],
            None => &self.buffer[..len],
        };
        let started = Instant::now();
        self.pacer.pace(frame.len() as u64);
        self.stream.write_all(frame)?;
        if let Some(compressor) = &mut self.compressor {
            compressor.wrote(frame.len(), started.elapsed());
        }
        counts.bytes = frame.len() as u64;
        counts.uncompressed_bytes = len as u64;
        Ok(counts)
    }

    /// Compresses the `Pages` frame of `count` entries in `buffer[..len]` into `packed`, as a
    /// `CompressedPages` frame; returns its length, or `None` to send the frame as it is
    /// (no compression, or too little saved).
    fn compress_frame(&mut self, count: usize, len: usize) -> Option<usize> {
        let compressor = self.compressor.as_mut()?;
        let payload = self.buffer.get(HEADER_LEN..len)?;
        let start = HEADER_LEN + COMPRESSED_PREFIX_LEN;
        let packed = compressor.compress(payload, self.packed.get_mut(start..)?)?;
        let header = FrameHeader {
            kind: FrameKind::CompressedPages,
            count: count as u32,
            payload_len: (COMPRESSED_PREFIX_LEN + packed) as u64,
        };
        let prefix = CompressedPrefix {
            codec: compressor.codec(),
            raw_len: payload.len() as u32,
        };
        self.packed[..HEADER_LEN].copy_from_slice(&header.encode());
        self.packed[HEADER_LEN..start].copy_from_slice(&prefix.encode());
        Some(start + packed)
    }

    /// Tells the destination every page of this phase has been sent.
    pub fn send_done(&mut self) -> Result<(), TransportError> {
        self.send_marker(FrameKind::Done)
    }

    /// Tells the destination this connection is the urgent one (its first frame).
    pub fn send_urgent(&mut self) -> Result<(), TransportError> {
        self.send_marker(FrameKind::Urgent)
    }

    /// Tells the destination its copies of `pages` are stale (hybrid mode, before the
    /// commit): it drops them and answers `Discarded` once done. Returns the frames sent.
    pub fn send_discard(&mut self, pages: &[u64]) -> Result<usize, TransportError> {
        let frames = send_index_frames(&mut self.stream, FrameKind::Discard, pages)?;
        self.stream.flush()?;
        Ok(frames)
    }

    fn send_marker(&mut self, kind: FrameKind) -> Result<(), TransportError> {
        write_marker(&mut self.stream, kind)
    }

    /// Paces from now on at `bytes_per_sec` (`None`: not at all).
    pub fn set_rate(&mut self, bytes_per_sec: Option<u64>) {
        self.pacer = Pacer::new(bytes_per_sec);
    }

    pub fn stream(&self) -> &W {
        &self.stream
    }
}

fn write_marker<W: Write>(stream: &mut W, kind: FrameKind) -> Result<(), TransportError> {
    let header = FrameHeader {
        kind,
        count: 0,
        payload_len: 0,
    };
    stream.write_all(&header.encode())?;
    stream.flush()?;
    Ok(())
}

/// Writes `pages` as frames of `kind` carrying page indexes alone; returns how many frames.
fn send_index_frames<W: Write>(
    stream: &mut W,
    kind: FrameKind,
    pages: &[u64],
) -> Result<usize, TransportError> {
    let mut frames = 0;
    for chunk in pages.chunks(MAX_PAGES_PER_FRAME as usize) {
        let header = FrameHeader {
            kind,
            count: chunk.len() as u32,
            payload_len: 8 * chunk.len() as u64,
        };
        let mut bytes = header.encode().to_vec();
        for page in chunk {
            bytes.extend_from_slice(&page.to_le_bytes());
        }
        stream.write_all(&bytes)?;
        frames += 1;
    }
    Ok(frames)
}

/// Sends a demand for `pages` (destination → source, hybrid mode).
pub fn send_demand<W: Write>(stream: &mut W, pages: &[u64]) -> Result<(), TransportError> {
    send_index_frames(stream, FrameKind::Demand, pages).map(drop)
}

/// Says every `Discard` read so far has been carried out (destination → source).
pub fn send_discarded<W: Write>(stream: &mut W) -> Result<(), TransportError> {
    write_marker(stream, FrameKind::Discarded)
}

/// One decoded frame.
pub enum Frame<'a> {
    /// Pages and their data (`None` for zero pages).
    Pages(Vec<(u64, Option<&'a [u8]>)>),
    Demand(Vec<u64>),
    Done,
    /// This connection is the urgent one (hybrid mode).
    Urgent,
    /// Pages whose copy at the destination is stale (hybrid mode, before the commit).
    Discard(Vec<u64>),
    /// The discards before it are carried out.
    Discarded,
}

/// Reads frames from a stream, checking every page index against the partition's size.
pub struct FrameReader<R> {
    stream: R,
    frames: u64,
    buffer: Vec<u8>,
    /// A compressed frame's payload, decompressed.
    raw: Vec<u8>,
    decompressor: Decompressor,
}

/// The `count` index entries a payload opens with.
fn entries_of(payload: &[u8], count: usize) -> Result<Vec<u64>, FrameError> {
    let index = payload.get(..8 * count).ok_or(FrameError::Length {
        got: payload.len() as u64,
        want: 8 * count as u64,
    })?;
    Ok(index
        .as_chunks::<8>()
        .0
        .iter()
        .map(|b| u64::from_le_bytes(*b))
        .collect())
}

/// The `Pages` frame of a payload of `count` entries, each checked against `frames`.
fn pages_of(payload: &[u8], count: usize, frames: u64) -> Result<Frame<'_>, FrameError> {
    let entries = entries_of(payload, count)?;
    let want = pages_payload_len(&entries);
    if want != payload.len() as u64 {
        return Err(FrameError::Length {
            got: payload.len() as u64,
            want,
        });
    }
    let mut data = payload[8 * count..]
        .as_chunks::<{ PAGE_SIZE as usize }>()
        .0
        .iter();
    let mut pages = Vec::with_capacity(count);
    for entry in entries {
        let page = check_page(entry, frames)?;
        if entry & ZERO_PAGE != 0 {
            pages.push((page, None));
        } else {
            // The length check above leaves a page of data for every non-zero entry.
            let bytes = data.next().ok_or(FrameError::Length {
                got: payload.len() as u64,
                want,
            })?;
            pages.push((page, Some(&bytes[..])));
        }
    }
    Ok(Frame::Pages(pages))
}

impl<R: Read> FrameReader<R> {
    pub fn new(stream: R, frames: u64) -> Self {
        Self {
            stream,
            frames,
            buffer: Vec::new(),
            raw: Vec::new(),
            decompressor: Decompressor::default(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.stream
    }

    pub fn into_inner(self) -> R {
        self.stream
    }

    /// The next frame, or `None` at a clean end of stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, TransportError> {
        let mut header = [0u8; HEADER_LEN];
        // The stream may end between frames, never inside one: a partial header is an error.
        let mut filled = 0;
        while filled < HEADER_LEN {
            match self.stream.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the stream ended {filled} bytes into a frame header"),
                    )
                    .into());
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let header = FrameHeader::decode(&header)?;
        self.buffer.resize(header.payload_len as usize, 0);
        self.stream.read_exact(&mut self.buffer)?;
        let count = header.count as usize;
        match header.kind {
            FrameKind::Done => Ok(Some(Frame::Done)),
            FrameKind::Urgent => Ok(Some(Frame::Urgent)),
            FrameKind::Discarded => Ok(Some(Frame::Discarded)),
            FrameKind::Demand | FrameKind::Discard => {
                let pages = entries_of(&self.buffer, count)?
                    .into_iter()
                    .map(|e| check_page(e, self.frames))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(if header.kind == FrameKind::Demand {
                    Frame::Demand(pages)
                } else {
                    Frame::Discard(pages)
                }))
            }
            FrameKind::Pages => Ok(Some(pages_of(&self.buffer, count, self.frames)?)),
            FrameKind::CompressedPages => {
                // The header's least payload length leaves room for the prefix.
                let (prefix, packed) = self
                    .buffer
                    .split_first_chunk::<COMPRESSED_PREFIX_LEN>()
                    .ok_or(FrameError::Length {
                        got: header.payload_len,
                        want: COMPRESSED_PREFIX_LEN as u64,
                    })?;
                let prefix = CompressedPrefix::decode(prefix, header.count)?;
                self.raw.resize(prefix.raw_len as usize, 0);
                self.decompressor
                    .decompress(prefix.codec, packed, &mut self.raw)?;
                Ok(Some(pages_of(&self.raw, count, self.frames)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{BURST, Pacer};

    const MB: u64 = 1_000_000;

    #[test]
    fn the_pacer_keeps_to_its_rate() {
        let mut pacer = Pacer::new(Some(100 * MB));
        let t0 = Instant::now();
        // The first send has no credit: 1 MB at 100 MB/s waits 10 ms.
        assert_eq!(pacer.delay(MB, t0), Duration::from_millis(10));
        // Sent right after that wait, the next one waits its own 10 ms.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(pacer.delay(MB, t1), Duration::from_millis(10));
        assert_eq!(Pacer::new(None).delay(u64::MAX, t0), Duration::ZERO);
    }

    #[test]
    fn time_before_the_first_send_earns_nothing() {
        // Created long before it sends (a profile window), it still starts without credit.
        let mut pacer = Pacer::new(Some(100 * MB));
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(pacer.delay(50 * MB, later), Duration::from_millis(500));
    }

    #[test]
    fn an_idle_gap_earns_no_more_than_the_burst() {
        let mut pacer = Pacer::new(Some(100 * MB));
        let t0 = Instant::now();
        let _ = pacer.delay(MB, t0);
        // Ten idle seconds earn at most BURST of credit (5 MB at 100 MB/s).
        let t1 = t0 + Duration::from_secs(10);
        let burst = (BURST.as_secs_f64() * 100e6) as u64;
        assert_eq!(pacer.delay(burst, t1), Duration::ZERO);
        // Anything beyond it waits at the rate.
        assert_eq!(pacer.delay(10 * MB, t1), Duration::from_millis(100));
    }

    use super::*;
    use crate::vmm::GuestAddress;

    #[test]
    fn discards_and_their_answer_read_back() {
        let pages: Vec<u64> = (0..2 * u64::from(MAX_PAGES_PER_FRAME) + 1).collect();
        let mut sender = PageSender::new(Vec::new(), None);
        // Three frames: 1024, 1024 and 1 page.
        assert_eq!(sender.send_discard(&pages).unwrap(), 3);
        let mut stream = sender.stream().clone();
        send_discarded(&mut stream).unwrap();
        let mut reader = FrameReader::new(stream.as_slice(), pages.len() as u64);
        let mut read = Vec::new();
        while let Some(frame) = reader.next_frame().unwrap() {
            match frame {
                Frame::Discard(named) => read.extend(named),
                Frame::Discarded => break,
                _ => panic!("only discards and their answer were sent"),
            }
        }
        assert_eq!(read, pages);
        assert!(reader.next_frame().unwrap().is_none());
        // A page beyond the partition is refused.
        let mut reader = FrameReader::new(stream.as_slice(), 10);
        assert!(reader.next_frame().is_err());
    }

    proptest::proptest! {
        /// One non-zero byte anywhere, whatever its value, makes a page data.
        #[test]
        fn one_non_zero_byte_anywhere_is_a_data_page(
            at in 0..PAGE_SIZE as usize,
            value in 1..=u8::MAX,
        ) {
            let mut page = [0u8; PAGE_SIZE as usize];
            proptest::prop_assert!(is_zero_page(&page));
            page[at] = value;
            proptest::prop_assert!(!is_zero_page(&page));
        }
    }

    #[test]
    fn what_is_sent_reads_back_with_zero_pages_as_markers() {
        let frames = 2 * u64::from(MAX_PAGES_PER_FRAME) + 3;
        let memory = GuestMemory::new(frames * PAGE_SIZE).unwrap();
        // Every third page holds data; the rest stay zero.
        for page in (0..frames).step_by(3) {
            memory
                .write(
                    GuestAddress(page * PAGE_SIZE + 8),
                    &(page + 1).to_le_bytes(),
                )
                .unwrap();
        }
        let order: Vec<u64> = (0..frames).rev().collect();
        let mut sender = PageSender::new(Vec::new(), None);
        let mut hashes = Vec::new();
        let counts = sender.send_pages(&memory, &order, &mut hashes).unwrap();
        sender.send_done().unwrap();
        assert_eq!(counts.pages, frames);
        assert_eq!(counts.zero_pages, frames - frames.div_ceil(3));
        assert_eq!(
            counts.bytes + HEADER_LEN as u64,
            sender.stream().len() as u64
        );

        let mut reader = FrameReader::new(sender.stream().as_slice(), frames);
        let (mut seen, mut expected) = (Vec::new(), [0u8; PAGE_SIZE as usize]);
        while let Some(frame) = reader.next_frame().unwrap() {
            let Frame::Pages(pages) = frame else {
                assert!(matches!(frame, Frame::Done));
                continue;
            };
            assert!(pages.len() <= MAX_PAGES_PER_FRAME as usize);
            for (page, data) in pages {
                memory.copy_frame(page, &mut expected).unwrap();
                assert_eq!(data.is_none(), page % 3 != 0, "page {page}");
                assert_eq!(data.unwrap_or(&[0; PAGE_SIZE as usize]), &expected[..]);
                assert_eq!(hashes[seen.len()], xxh3_64(&expected));
                seen.push(page);
            }
        }
        assert_eq!(seen, order);
    }

    /// Memory of `frames` pages: every third page zero, the others text-like (`text`) or
    /// pseudo-random, each page different.
    fn memory_of(frames: u64, text: bool) -> GuestMemory {
        let memory = GuestMemory::new(frames * PAGE_SIZE).unwrap();
        let words = [
            "the ", "page ", "of ", "memory ", "holds ", "a ", "log\n", "line ",
        ];
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        for page in (0..frames).filter(|p| p % 3 != 0) {
            let mut bytes = Vec::with_capacity(PAGE_SIZE as usize);
            bytes.extend_from_slice(&page.to_le_bytes());
            while bytes.len() < PAGE_SIZE as usize {
                if text {
                    bytes.extend_from_slice(words[next() as usize % words.len()].as_bytes());
                } else {
                    bytes.extend_from_slice(&next().to_le_bytes()[..4]);
                }
            }
            bytes.truncate(PAGE_SIZE as usize);
            memory
                .write(GuestAddress(page * PAGE_SIZE), &bytes)
                .unwrap();
        }
        memory
    }

    /// The kinds of the frames in `stream`, read from their headers alone.
    fn kinds(stream: &[u8]) -> Vec<FrameKind> {
        let mut kinds = Vec::new();
        let mut at = 0;
        while let Some(header) = stream.get(at..at + HEADER_LEN) {
            let header = FrameHeader::decode(header.try_into().unwrap()).unwrap();
            kinds.push(header.kind);
            at += HEADER_LEN + header.payload_len as usize;
        }
        kinds
    }

    /// Reads `stream` back and checks every page against `memory`, in `order`.
    fn reads_back(stream: &[u8], memory: &GuestMemory, order: &[u64], hashes: &[u64]) {
        let mut reader = FrameReader::new(stream, memory.frames());
        let (mut seen, mut expected) = (Vec::new(), [0u8; PAGE_SIZE as usize]);
        while let Some(frame) = reader.next_frame().unwrap() {
            let Frame::Pages(pages) = frame else {
                assert!(matches!(frame, Frame::Done));
                continue;
            };
            for (page, data) in pages {
                memory.copy_frame(page, &mut expected).unwrap();
                assert_eq!(data.is_none(), page % 3 == 0, "page {page}");
                assert_eq!(data.unwrap_or(&[0; PAGE_SIZE as usize]), &expected[..]);
                assert_eq!(hashes[seen.len()], xxh3_64(&expected));
                seen.push(page);
            }
        }
        assert_eq!(seen, order);
    }

    const CODECS: [Compress; 3] = [
        Compress::Lz4,
        Compress::Zstd { level: 1 },
        Compress::Zstd { level: -3 },
    ];

    #[test]
    fn compressed_frames_read_back_as_the_pages_sent_with_zero_pages_as_markers() {
        let frames = 2 * u64::from(MAX_PAGES_PER_FRAME) + 3;
        let memory = memory_of(frames, true);
        let order: Vec<u64> = (0..frames).rev().collect();
        for compress in CODECS {
            let mut sender = PageSender::new(Vec::new(), None);
            sender.set_compression(compress).unwrap();
            let mut hashes = Vec::new();
            let counts = sender.send_pages(&memory, &order, &mut hashes).unwrap();
            sender.send_done().unwrap();
            assert_eq!(counts.pages, frames);
            assert_eq!(counts.zero_pages, frames.div_ceil(3));
            let stream = sender.stream().as_slice();
            assert_eq!(counts.bytes + HEADER_LEN as u64, stream.len() as u64);
            assert_eq!(
                kinds(stream),
                [
                    FrameKind::CompressedPages,
                    FrameKind::CompressedPages,
                    FrameKind::CompressedPages,
                    FrameKind::Done
                ],
                "{compress}"
            );
            // What the frames would have been: the same stream uncompressed.
            let mut plain = PageSender::new(Vec::new(), None);
            let plain_counts = plain.send_pages(&memory, &order, &mut Vec::new()).unwrap();
            assert_eq!(counts.uncompressed_bytes, plain_counts.bytes);
            assert_eq!(plain_counts.uncompressed_bytes, plain_counts.bytes);
            assert!(
                counts.bytes * 2 < counts.uncompressed_bytes,
                "{compress}: {} of {}",
                counts.bytes,
                counts.uncompressed_bytes
            );
            reads_back(stream, &memory, &order, &hashes);
        }
    }

    #[test]
    fn incompressible_frames_go_uncompressed() {
        let frames = u64::from(MAX_PAGES_PER_FRAME) + 5;
        let memory = memory_of(frames, false);
        let order: Vec<u64> = (0..frames).collect();
        for compress in CODECS {
            let mut sender = PageSender::new(Vec::new(), None);
            sender.set_compression(compress).unwrap();
            let mut hashes = Vec::new();
            let counts = sender.send_pages(&memory, &order, &mut hashes).unwrap();
            assert_eq!(counts.bytes, counts.uncompressed_bytes, "{compress}");
            let stream = sender.stream().as_slice();
            assert_eq!(kinds(stream), [FrameKind::Pages, FrameKind::Pages]);
            reads_back(stream, &memory, &order, &hashes);
        }
        // A frame of zero pages alone is its index, which compresses.
        let zeros = GuestMemory::new(64 * PAGE_SIZE).unwrap();
        let mut sender = PageSender::new(Vec::new(), None);
        sender.set_compression(Compress::Lz4).unwrap();
        let order: Vec<u64> = (0..64).collect();
        let counts = sender.send_pages(&zeros, &order, &mut Vec::new()).unwrap();
        assert!(counts.bytes < counts.uncompressed_bytes);
        let mut reader = FrameReader::new(sender.stream().as_slice(), 64);
        let Some(Frame::Pages(pages)) = reader.next_frame().unwrap() else {
            panic!("one frame of pages");
        };
        assert_eq!(pages, order.iter().map(|&p| (p, None)).collect::<Vec<_>>());
    }

    /// One compressed frame of the text memory's first `pages` pages.
    fn compressed_frame(compress: Compress, pages: u64) -> Vec<u8> {
        let memory = memory_of(pages, true);
        let mut sender = PageSender::new(Vec::new(), None);
        sender.set_compression(compress).unwrap();
        let order: Vec<u64> = (0..pages).collect();
        sender.send_pages(&memory, &order, &mut Vec::new()).unwrap();
        let stream = sender.stream().clone();
        assert_eq!(kinds(&stream), [FrameKind::CompressedPages]);
        stream
    }

    fn read_one(stream: &[u8], frames: u64) -> Result<usize, TransportError> {
        let mut reader = FrameReader::new(stream, frames);
        match reader.next_frame()? {
            Some(Frame::Pages(pages)) => Ok(pages.len()),
            _ => panic!("a frame of pages"),
        }
    }

    #[test]
    fn a_corrupt_compressed_frame_is_an_error_not_a_panic() {
        let prefix = HEADER_LEN..HEADER_LEN + COMPRESSED_PREFIX_LEN;
        for compress in CODECS {
            let good = compressed_frame(compress, 64);
            assert_eq!(read_one(&good, 64).unwrap(), 64);
            // Pages beyond a smaller partition are refused after decompression.
            assert!(matches!(
                read_one(&good, 63),
                Err(TransportError::Frame(FrameError::PageOutOfRange { .. }))
            ));
            // Each byte of the compressed bytes flipped in turn, in a sample: refused, or
            // (where the codec cannot tell) read as pages of the same shape; never a panic.
            let body = prefix.end..good.len();
            for at in body.clone().step_by(97) {
                let mut bad = good.clone();
                bad[at] ^= 0x5a;
                let _ = read_one(&bad, 64);
            }
            // Zeros and garbage in place of the compressed bytes.
            for fill in [0u8, 0xff] {
                let mut bad = good.clone();
                bad[body.clone()].fill(fill);
                assert!(read_one(&bad, 64).is_err(), "{compress}: {fill:#x}");
            }
            // Cut short inside the compressed bytes: the header's length is not there.
            let mut cut = good.clone();
            let len = (good.len() - HEADER_LEN - 100) as u64;
            cut[16..24].copy_from_slice(&len.to_le_bytes());
            cut.truncate(good.len() - 100);
            assert!(matches!(
                read_one(&cut, 64),
                Err(TransportError::Frame(
                    FrameError::Decompress { .. } | FrameError::Decompressed { .. }
                ))
            ));
            // An unknown codec, and a length announced that the entries cannot have.
            let mut bad = good.clone();
            bad[prefix.start..prefix.start + 4].copy_from_slice(&9u32.to_le_bytes());
            assert!(matches!(
                read_one(&bad, 64),
                Err(TransportError::Frame(FrameError::Codec(9)))
            ));
            let raw_len = |bad: &mut Vec<u8>, len: u32| {
                bad[prefix.start + 4..prefix.end].copy_from_slice(&len.to_le_bytes())
            };
            let max = 64 * (8 + PAGE_SIZE as u32);
            for len in [max + PAGE_SIZE as u32, 8 * 64 - 8, 8 * 64 + 1, u32::MAX] {
                let mut bad = good.clone();
                raw_len(&mut bad, len);
                assert!(
                    matches!(
                        read_one(&bad, 64),
                        Err(TransportError::Frame(FrameError::RawLength { .. }))
                    ),
                    "{compress}: {len}"
                );
            }
            // A bomb: the payload decompresses to more than announced (a page more of the
            // same frame's data is a length its entries allow, but the bytes do not fit).
            let announced =
                u32::from_le_bytes(good[prefix.end - 4..prefix.end].try_into().unwrap());
            let mut bomb = good.clone();
            raw_len(&mut bomb, announced - PAGE_SIZE as u32);
            assert!(matches!(
                read_one(&bomb, 64),
                Err(TransportError::Frame(
                    FrameError::Decompress { .. } | FrameError::Decompressed { .. }
                ))
            ));
            // Less than announced: the decompressed length is checked.
            let mut short = good.clone();
            raw_len(&mut short, announced + PAGE_SIZE as u32);
            assert!(matches!(
                read_one(&short, 64),
                Err(TransportError::Frame(
                    FrameError::Decompress { .. } | FrameError::Decompressed { .. }
                ))
            ));
        }
    }

    #[test]
    fn a_page_outside_guest_memory_is_an_error() {
        let memory = GuestMemory::new(4 * PAGE_SIZE).unwrap();
        let mut sender = PageSender::new(Vec::new(), None);
        assert!(matches!(
            sender.send_pages(&memory, &[0, 4], &mut Vec::new()),
            Err(TransportError::Memory { page: 4, .. })
        ));
        assert!(matches!(
            sender.send_pages(&memory, &[u64::MAX], &mut Vec::new()),
            Err(TransportError::Memory { .. })
        ));
    }
}
