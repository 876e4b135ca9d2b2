//! What the sender writes, read back by the reader.

use xxhash_rust::xxh3::xxh3_64;

use crate::migration::{
    compress::Compress,
    protocol::{
        COMPRESSED_PREFIX_LEN, FrameError, FrameHeader, FrameKind, HEADER_LEN, MAX_PAGES_PER_FRAME,
    },
};
use crate::vmm::{GuestMemory, memory::PAGE_SIZE};

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
    // Uncompressed, a zero page is its 8-byte entry alone: every entry, every data page and
    // each frame's header, not every page's 4 KiB.
    let data_pages = frames - counts.zero_pages;
    assert_eq!(
        counts.uncompressed_bytes,
        8 * frames
            + PAGE_SIZE * data_pages
            + HEADER_LEN as u64 * frames.div_ceil(u64::from(MAX_PAGES_PER_FRAME))
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
        let announced = u32::from_le_bytes(good[prefix.end - 4..prefix.end].try_into().unwrap());
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
