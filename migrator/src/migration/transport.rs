//! What travels over the data connection: frames of pages, paced to a bandwidth limit.
//!
//! Pages travel in frames of up to 1024 (4 MiB), zero pages as markers without data. The
//! sender copies pages into one buffer per frame and writes it with one call: measured on
//! loopback, that streams at close to a plain TCP copy (docs/BENCHMARKS.md).
//!
//! Sender and reader work on any `io::Write` and `io::Read`; opening and tuning the
//! connection is `link`'s.

use std::{
    io::{self, Read, Write},
    time::{Duration, Instant},
};

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use super::protocol::{
    FrameError, FrameHeader, FrameKind, HEADER_LEN, MAX_PAGES_PER_FRAME, ZERO_PAGE, check_page,
    pages_payload_len,
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
    pub bytes: u64,
}

impl std::ops::AddAssign for SendCounts {
    fn add_assign(&mut self, other: Self) {
        self.pages += other.pages;
        self.zero_pages += other.zero_pages;
        self.bytes += other.bytes;
    }
}

/// The xxh3 of an all-zero page.
pub fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE as usize]))
}

fn is_zero(page: &Page) -> bool {
    // Compare in words: fast enough to be free next to the network.
    page.as_chunks::<8>()
        .0
        .iter()
        .all(|w| u64::from_ne_bytes(*w) == 0)
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
}

impl<W: Write> PageSender<W> {
    pub fn new(stream: W, bytes_per_sec: Option<u64>) -> Self {
        Self {
            stream,
            pacer: Pacer::new(bytes_per_sec),
            buffer: vec![0; MAX_FRAME_LEN],
        }
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
            let marked = if is_zero(slot) {
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
        self.pacer.pace(len as u64);
        self.stream.write_all(&self.buffer[..len])?;
        counts.bytes = len as u64;
        Ok(counts)
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
}

impl<R: Read> FrameReader<R> {
    pub fn new(stream: R, frames: u64) -> Self {
        Self {
            stream,
            frames,
            buffer: Vec::new(),
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
        let entries: Vec<u64> = self.buffer[..8 * count]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        match header.kind {
            FrameKind::Done => Ok(Some(Frame::Done)),
            FrameKind::Urgent => Ok(Some(Frame::Urgent)),
            FrameKind::Discarded => Ok(Some(Frame::Discarded)),
            FrameKind::Demand | FrameKind::Discard => {
                let pages = entries
                    .iter()
                    .map(|&e| check_page(e, self.frames))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(if header.kind == FrameKind::Demand {
                    Frame::Demand(pages)
                } else {
                    Frame::Discard(pages)
                }))
            }
            FrameKind::Pages => {
                let want = pages_payload_len(&entries);
                if want != header.payload_len {
                    return Err(FrameError::Length {
                        got: header.payload_len,
                        want,
                    }
                    .into());
                }
                let mut data = &self.buffer[8 * count..];
                let mut pages = Vec::with_capacity(count);
                for entry in entries {
                    let page = check_page(entry, self.frames)?;
                    if entry & ZERO_PAGE != 0 {
                        pages.push((page, None));
                    } else {
                        let (bytes, rest) = data.split_at(PAGE_SIZE as usize);
                        pages.push((page, Some(bytes)));
                        data = rest;
                    }
                }
                Ok(Some(Frame::Pages(pages)))
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
