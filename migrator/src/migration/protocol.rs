//! The migration protocol: control over tarpc (see `crate::api`), pages over a dedicated data
//! connection in frames defined here.
//!
//! ```text
//!  source daemon                                  destination daemon
//!    │── hello(min, max) ─────────────────────────▶│ version range check
//!    │── migration_prepare(shape) ────────────────▶│ empty memory + data listener
//!    │◀──────────────────────── session, data port │
//!    │══ data: Pages frames (round 0, 1, ...) ════▶│ installs pages
//!    │══ data: Discard (hybrid: stale copies) ════▶│ drops them, guest still on the source
//!    │◀═════════════════════════════════ Discarded │
//!    │   pause                                      │
//!    │══ data: Pages (last dirty, precopy) ═══════▶│
//!    │── migration_commit(vCPU state, stale) ─────▶│ restore, resume
//!    │◀─────────── id on destination, dest digest  │
//!    │   (hybrid: Pages pushed hot to cold; on a second connection, opened with an Urgent
//!    │    frame, the demanded pages ◀══ Demand frames)
//!    │   stop and free the source partition        │
//! ```
//!
//! A data frame is a 24-byte header then a payload:
//! `magic u32 | version u16 | kind u16 | count u32 | reserved u32 | payload_len u64`.
//! The magic is non-zero and kinds start at 1, so a zeroed buffer never decodes as a frame.
//! Decoding checks the magic, version, kind, sizes and page indexes before trusting anything.
//!
//! A `CompressedPages` frame carries a `Pages` frame's payload compressed: its payload opens
//! with `codec u32 | raw_len u32` (the codec, and the length of the `Pages` payload it
//! decompresses to, which its `count` entries bound), then the codec's bytes. The reader
//! decompresses into exactly `raw_len` bytes and reads them as that `Pages` payload.

use thiserror::Error;

use crate::vmm::memory::PAGE_SIZE;

/// Protocol version spoken by this build: 2 adds the `Urgent` frame (a second connection
/// for demanded pages in hybrid mode), 3 the `Discard` and `Discarded` frames, 4 pages
/// striped across several data connections (`PrepareRequest::connections`), each ending a
/// phase with its own `Done`, and the `CompressedPages` frame (pages compressed with LZ4 or
/// Zstandard, frame by frame).
pub const PROTOCOL_VERSION: u16 = 4;
/// "HMIG", little-endian.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"HMIG");
pub const HEADER_LEN: usize = 24;
/// Most pages in one frame (4 MiB of data).
pub const MAX_PAGES_PER_FRAME: u32 = 1024;
/// The most data connections one migration stripes its pages across.
pub const MAX_CONNECTIONS: u32 = 16;
/// Marks a frame index as a zero page: no data follows for it.
pub const ZERO_PAGE: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// Source → destination: `count` page indexes (u64, ZERO_PAGE marks zero pages), then the
    /// data of each non-zero page in order.
    Pages = 1,
    /// Destination → source: `count` page indexes the guest is waiting for (hybrid mode).
    Demand = 2,
    /// Source → destination: every page has been sent; nothing follows.
    Done = 3,
    /// Source → destination, the first frame of a hybrid migration's second connection: it
    /// carries the destination's demands and the pages demanded, never queued behind the
    /// push on the first. No entries.
    Urgent = 4,
    /// Source → destination, hybrid mode before the commit: `count` page indexes whose copy
    /// there went stale. The destination drops them while the guest still runs on the
    /// source, so the cutover has fewer to free inside its downtime.
    Discard = 5,
    /// Destination → source on the same connection: every `Discard` before it has been
    /// carried out. No entries.
    Discarded = 6,
    /// Source → destination: a `Pages` frame's payload of `count` entries, compressed; the
    /// payload opens with its [`CompressedPrefix`].
    CompressedPages = 7,
}

/// The bytes a `CompressedPages` payload opens with.
pub const COMPRESSED_PREFIX_LEN: usize = 8;

/// How a `CompressedPages` payload is compressed. Codecs start at 1, so zeros never name one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Codec {
    /// LZ4's block format.
    Lz4 = 1,
    /// One Zstandard frame.
    Zstd = 2,
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        })
    }
}

/// The start of a `CompressedPages` payload: `codec u32 | raw_len u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedPrefix {
    pub codec: Codec,
    /// The length of the `Pages` payload the rest decompresses to.
    pub raw_len: u32,
}

impl CompressedPrefix {
    pub fn encode(&self) -> [u8; COMPRESSED_PREFIX_LEN] {
        let mut bytes = [0u8; COMPRESSED_PREFIX_LEN];
        bytes[0..4].copy_from_slice(&(self.codec as u32).to_le_bytes());
        bytes[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        bytes
    }

    /// Decodes and checks the prefix of a frame of `count` entries: a known codec, and a
    /// length a `Pages` payload of `count` entries can have (their index, and whole pages of
    /// data for at most all of them), so decompression never writes beyond what the entries
    /// allow.
    pub fn decode(bytes: &[u8; COMPRESSED_PREFIX_LEN], count: u32) -> Result<Self, FrameError> {
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let codec = match u32_at(0) {
            1 => Codec::Lz4,
            2 => Codec::Zstd,
            other => return Err(FrameError::Codec(other)),
        };
        let raw_len = u32_at(4);
        let index_bytes = 8 * u64::from(count);
        let max = index_bytes + PAGE_SIZE * u64::from(count);
        let len = u64::from(raw_len);
        if len < index_bytes || len > max || !(len - index_bytes).is_multiple_of(PAGE_SIZE) {
            return Err(FrameError::RawLength { got: len, max });
        }
        Ok(Self { codec, raw_len })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x}")]
    Magic(u32),
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("unknown frame kind {0}")]
    Kind(u16),
    #[error("a frame of {0} entries exceeds the limit of {MAX_PAGES_PER_FRAME}")]
    TooManyEntries(u32),
    #[error("the payload length {got} does not match the {want} bytes its entries need")]
    Length { got: u64, want: u64 },
    #[error("page {page} is beyond the partition's {frames} pages")]
    PageOutOfRange { page: u64, frames: u64 },
    #[error("reserved header bits are set")]
    Reserved,
    #[error("a Done, Urgent or Discarded frame carries {0} entries")]
    DoneWithEntries(u32),
    #[error("unknown compression codec {0}")]
    Codec(u32),
    #[error(
        "a compressed frame announces {got} bytes of pages, which its entries cannot have (at most {max}, whole pages)"
    )]
    RawLength { got: u64, max: u64 },
    #[error("the {codec} payload does not decompress: {detail}")]
    Decompress { codec: Codec, detail: String },
    #[error("the compressed payload decompressed to {got} bytes, not the {want} announced")]
    Decompressed { got: u64, want: u64 },
}

impl FrameKind {
    /// Kinds that are markers alone: no entries, no payload.
    fn is_marker(self) -> bool {
        matches!(self, Self::Done | Self::Urgent | Self::Discarded)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub count: u32,
    pub payload_len: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        bytes[8..12].copy_from_slice(&self.count.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes
    }

    /// Decodes and checks a header. The payload length of `Pages` frames can only be checked
    /// against the entries once they are read (see [`pages_payload_len`]).
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let version = u16_at(4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::Version(version));
        }
        let kind = match u16_at(6) {
            1 => FrameKind::Pages,
            2 => FrameKind::Demand,
            3 => FrameKind::Done,
            4 => FrameKind::Urgent,
            5 => FrameKind::Discard,
            6 => FrameKind::Discarded,
            7 => FrameKind::CompressedPages,
            other => return Err(FrameError::Kind(other)),
        };
        if u32_at(12) != 0 {
            return Err(FrameError::Reserved);
        }
        let count = u32_at(8);
        if count > MAX_PAGES_PER_FRAME {
            return Err(FrameError::TooManyEntries(count));
        }
        // Found by fuzzing: a `Done` frame claiming entries made the reader slice entries out
        // of an empty payload.
        if kind.is_marker() && count != 0 {
            return Err(FrameError::DoneWithEntries(count));
        }
        let payload_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
        let index_bytes = 8 * u64::from(count);
        let pages_max = index_bytes + PAGE_SIZE * u64::from(count);
        // A compressed payload is sent only when smaller than the plain one: its prefix and
        // at most the plain payload's length bound it.
        let prefix = COMPRESSED_PREFIX_LEN as u64;
        let max = match kind {
            FrameKind::Pages => pages_max,
            FrameKind::CompressedPages => prefix + pages_max,
            FrameKind::Demand | FrameKind::Discard => index_bytes,
            FrameKind::Done | FrameKind::Urgent | FrameKind::Discarded => 0,
        };
        let min = match kind {
            FrameKind::Pages | FrameKind::Demand | FrameKind::Discard => index_bytes,
            FrameKind::CompressedPages => prefix,
            FrameKind::Done | FrameKind::Urgent | FrameKind::Discarded => 0,
        };
        if payload_len < min || payload_len > max {
            return Err(FrameError::Length {
                got: payload_len,
                want: max,
            });
        }
        Ok(Self {
            kind,
            count,
            payload_len,
        })
    }
}

/// Checks a page index (with its zero marker stripped) against the partition size.
pub fn check_page(entry: u64, frames: u64) -> Result<u64, FrameError> {
    let page = entry & !ZERO_PAGE;
    if page >= frames {
        return Err(FrameError::PageOutOfRange { page, frames });
    }
    Ok(page)
}

/// The payload length a `Pages` frame with these index entries must have.
pub fn pages_payload_len(entries: &[u64]) -> u64 {
    let data_pages = entries.iter().filter(|e| *e & ZERO_PAGE == 0).count() as u64;
    8 * entries.len() as u64 + data_pages * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::migration::transport::{FrameReader, TransportError};

    #[test]
    fn a_zeroed_buffer_is_not_a_frame() {
        assert_eq!(
            FrameHeader::decode(&[0; HEADER_LEN]),
            Err(FrameError::Magic(0))
        );
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let header = FrameHeader {
            kind: FrameKind::Pages,
            count: 3,
            payload_len: 24 + 2 * PAGE_SIZE,
        };
        assert_eq!(FrameHeader::decode(&header.encode()), Ok(header));
        let mut bad = header.encode();
        bad[4] = 9;
        assert_eq!(FrameHeader::decode(&bad), Err(FrameError::Version(9)));
        let mut bad = header.encode();
        bad[6] = 0;
        assert_eq!(FrameHeader::decode(&bad), Err(FrameError::Kind(0)));
        let oversized = FrameHeader {
            count: MAX_PAGES_PER_FRAME + 1,
            ..header
        };
        assert!(matches!(
            FrameHeader::decode(&oversized.encode()),
            Err(FrameError::TooManyEntries(_))
        ));
        let lying = FrameHeader {
            payload_len: 1 << 40,
            ..header
        };
        assert!(matches!(
            FrameHeader::decode(&lying.encode()),
            Err(FrameError::Length { .. })
        ));
        assert_eq!(check_page(7 | ZERO_PAGE, 8), Ok(7));
        assert!(check_page(8, 8).is_err());
    }

    #[test]
    fn compressed_headers_and_prefixes_are_checked() {
        let header = FrameHeader {
            kind: FrameKind::CompressedPages,
            count: 2,
            payload_len: COMPRESSED_PREFIX_LEN as u64 + 100,
        };
        assert_eq!(FrameHeader::decode(&header.encode()), Ok(header));
        for payload_len in [
            COMPRESSED_PREFIX_LEN as u64 - 1,
            8 + 2 * (8 + PAGE_SIZE) + 1,
        ] {
            let bad = FrameHeader {
                payload_len,
                ..header
            };
            assert!(matches!(
                FrameHeader::decode(&bad.encode()),
                Err(FrameError::Length { .. })
            ));
        }
        let prefix = CompressedPrefix {
            codec: Codec::Zstd,
            raw_len: 16 + PAGE_SIZE as u32,
        };
        assert_eq!(CompressedPrefix::decode(&prefix.encode(), 2), Ok(prefix));
        // Zeros name no codec.
        assert_eq!(
            CompressedPrefix::decode(&[0; COMPRESSED_PREFIX_LEN], 2),
            Err(FrameError::Codec(0))
        );
        // Lengths two entries cannot have: short of their index, past all their data, or
        // not whole pages.
        for raw_len in [15, 16 + 2 * PAGE_SIZE as u32 + PAGE_SIZE as u32, 17] {
            let bad = CompressedPrefix { raw_len, ..prefix };
            assert!(matches!(
                CompressedPrefix::decode(&bad.encode(), 2),
                Err(FrameError::RawLength { .. })
            ));
        }
    }

    /// Reads every frame of `stream` for a partition of `frames` pages.
    fn read_all(stream: &[u8], frames: u64) -> Result<usize, TransportError> {
        let mut reader = FrameReader::new(stream, frames);
        let mut n = 0;
        while reader.next_frame()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    fn pages_frame(entries: &[u64]) -> Vec<u8> {
        let header = FrameHeader {
            kind: FrameKind::Pages,
            count: entries.len() as u32,
            payload_len: pages_payload_len(entries),
        };
        let mut bytes = header.encode().to_vec();
        for entry in entries {
            bytes.extend_from_slice(&entry.to_le_bytes());
        }
        for entry in entries {
            if entry & ZERO_PAGE == 0 {
                bytes.extend_from_slice(&[0xa5; PAGE_SIZE as usize]);
            }
        }
        bytes
    }

    #[test]
    fn a_good_stream_reads_to_its_end() {
        let mut stream = pages_frame(&[0, 3 | ZERO_PAGE, 7]);
        stream.extend_from_slice(&Done::header());
        assert_eq!(read_all(&stream, 8).expect("reads"), 2);
    }

    #[test]
    fn an_oversized_frame_is_refused_before_its_payload() {
        let mut header = FrameHeader {
            kind: FrameKind::Pages,
            count: 1,
            payload_len: 8 + PAGE_SIZE,
        }
        .encode();
        header[8..12].copy_from_slice(&(MAX_PAGES_PER_FRAME + 1).to_le_bytes());
        assert!(matches!(
            read_all(&header, 8),
            Err(TransportError::Frame(FrameError::TooManyEntries(_)))
        ));
        // A payload longer than its entries allow: refused from the header alone.
        let header = FrameHeader {
            kind: FrameKind::Pages,
            count: 1,
            payload_len: 8 + 2 * PAGE_SIZE,
        }
        .encode();
        assert!(matches!(
            read_all(&header, 8),
            Err(TransportError::Frame(FrameError::Length { .. }))
        ));
    }

    #[test]
    fn a_truncated_stream_is_an_error_not_a_clean_end() {
        let stream = pages_frame(&[0, 1]);
        for cut in [
            1,
            HEADER_LEN - 1,
            HEADER_LEN,
            HEADER_LEN + 8,
            stream.len() - 1,
        ] {
            assert!(
                matches!(read_all(&stream[..cut], 8), Err(TransportError::Io(_))),
                "cut at {cut}"
            );
        }
        // Ending between frames is a clean end.
        assert_eq!(read_all(&[], 8).expect("empty"), 0);
    }

    #[test]
    fn a_page_beyond_the_partition_is_refused() {
        assert!(matches!(
            read_all(&pages_frame(&[8]), 8),
            Err(TransportError::Frame(FrameError::PageOutOfRange {
                page: 8,
                frames: 8
            }))
        ));
        assert!(matches!(
            read_all(&pages_frame(&[u64::MAX]), 8),
            Err(TransportError::Frame(FrameError::PageOutOfRange { .. }))
        ));
    }

    #[test]
    fn a_done_frame_with_entries_is_refused() {
        // The input the frames fuzz target found (fuzz/regressions/frames/).
        let mut header = Done::header();
        header[8] = 45;
        header[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            FrameHeader::decode(&header),
            Err(FrameError::DoneWithEntries(45))
        );
        assert!(read_all(&header, 1).is_err());
    }

    struct Done;

    impl Done {
        fn header() -> [u8; HEADER_LEN] {
            FrameHeader {
                kind: FrameKind::Done,
                count: 0,
                payload_len: 0,
            }
            .encode()
        }
    }

    /// The header decode accepts, by the rules written out apart from `decode`: a known kind,
    /// reserved bits clear, at most the most entries, none on a marker, and a payload within
    /// what the kind's entries can fill.
    fn acceptable(kind: u16, reserved: u32, count: u32, payload_len: u64) -> bool {
        let index = 8 * u64::from(count);
        let pages = index + PAGE_SIZE * u64::from(count);
        let prefix = COMPRESSED_PREFIX_LEN as u64;
        let (min, max) = match kind {
            1 => (index, pages),
            2 | 5 => (index, index),
            3 | 4 | 6 if count == 0 => (0, 0),
            7 => (prefix, prefix + pages),
            _ => return false,
        };
        reserved == 0 && count <= MAX_PAGES_PER_FRAME && (min..=max).contains(&payload_len)
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in prop::array::uniform24(any::<u8>())) {
            let _ = FrameHeader::decode(&bytes);
        }

        /// Past the magic and the version, which random bytes almost never pass: kinds,
        /// counts and lengths near the edges, each accepted exactly when the rules say, and
        /// what is accepted encodes back to the same bytes.
        #[test]
        fn headers_past_the_magic_are_accepted_by_the_rules_and_round_trip(
            kind in 0u16..9,
            reserved in prop_oneof![Just(0u32), any::<u32>()],
            count in prop_oneof![0u32..4, MAX_PAGES_PER_FRAME - 1..MAX_PAGES_PER_FRAME + 2, any::<u32>()],
            pages in 0u64..4,
            slack in prop_oneof![Just(0u64), Just(1), Just(COMPRESSED_PREFIX_LEN as u64), any::<u64>()],
        ) {
            let payload_len = (8 * u64::from(count) + pages * PAGE_SIZE).wrapping_add(slack);
            let mut bytes = [0u8; HEADER_LEN];
            bytes[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
            bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            bytes[6..8].copy_from_slice(&kind.to_le_bytes());
            bytes[8..12].copy_from_slice(&count.to_le_bytes());
            bytes[12..16].copy_from_slice(&reserved.to_le_bytes());
            bytes[16..24].copy_from_slice(&payload_len.to_le_bytes());
            let decoded = FrameHeader::decode(&bytes);
            prop_assert_eq!(
                decoded.is_ok(),
                acceptable(kind, reserved, count, payload_len),
                "{:?}", decoded
            );
            if let Ok(header) = decoded {
                prop_assert_eq!(header.encode(), bytes);
            }
        }
    }
}
