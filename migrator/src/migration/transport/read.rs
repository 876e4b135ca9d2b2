//! Reading: frames taken off any `io::Read`, checked against guest memory's size, and
//! compressed frames turned back into the pages they were.

use std::io::{self, Read};

use crate::migration::{
    compress::Decompressor,
    protocol::{
        COMPRESSED_PREFIX_LEN, CompressedPrefix, FrameError, FrameHeader, FrameKind, HEADER_LEN,
        ZERO_PAGE, check_page, pages_payload_len,
    },
};
use crate::vmm::memory::PAGE_SIZE;

use super::TransportError;

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
