//! Sending: pages copied from guest memory into frames (zero pages as markers), compressed
//! where that pays, paced, and written with one call each; and the small frames (`Done`,
//! `Urgent`, discards, demands).

use std::{io::Write, time::Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::migration::{
    compress::{Compress, Compressor},
    protocol::{
        COMPRESSED_PREFIX_LEN, CompressedPrefix, FrameHeader, FrameKind, HEADER_LEN,
        MAX_PAGES_PER_FRAME, ZERO_PAGE, pages_payload_len,
    },
};
use crate::vmm::{GuestMemory, memory::PAGE_SIZE};

use super::{Pacer, TransportError, is_zero_page, zero_page_hash};

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
