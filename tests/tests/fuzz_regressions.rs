//! The fuzz targets' inputs, replayed on stable through the same entry points
//! (`migrator::fuzzing`): every seed in `fuzz/seeds/<target>/` is accepted, and every input
//! kept in `fuzz/regressions/<target>/` (each once crashed a target) is handled without a panic.
//!
//! The seeds are made here from the real encoders; `FUZZ_WRITE_SEEDS=1` rewrites them after a
//! format change, and a stale seed fails `seeds_are_current`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use heatprobe_tests::guest_images;
use migrator::{
    fuzzing::{Target, state_config},
    migration::{
        compress::Compress,
        protocol::{FrameHeader, FrameKind, ZERO_PAGE, pages_payload_len},
        transport::PageSender,
    },
    vmm::{GuestAddress, GuestMemory, layout, memory::PAGE_SIZE, state},
};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .join("fuzz")
}

fn frame(kind: FrameKind, entries: &[u64], pages: &[&[u8]]) -> Vec<u8> {
    let payload_len = match kind {
        FrameKind::Pages => pages_payload_len(entries),
        FrameKind::Demand | FrameKind::Discard => 8 * entries.len() as u64,
        FrameKind::Done | FrameKind::Urgent | FrameKind::Discarded => 0,
        FrameKind::CompressedPages => panic!("compressed frames come from the sender"),
    };
    let header = FrameHeader {
        kind,
        count: entries.len() as u32,
        payload_len,
    };
    let mut bytes = header.encode().to_vec();
    for entry in entries {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    for page in pages {
        bytes.extend_from_slice(page);
    }
    bytes
}

/// A partition of 16 pages sent by the real sender with `compress`: a frame of text pages
/// and zero pages, compressed, then one of pseudo-random bytes, which does not compress, then
/// the end.
fn compressed(compress: Compress) -> Vec<u8> {
    let mut state = 1u64;
    let noise: Vec<u8> = (0..PAGE_SIZE)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    let memory = GuestMemory::new(16 * PAGE_SIZE).expect("memory");
    let text: Vec<u8> = b"a line of a log, and another line of it\n"
        .iter()
        .copied()
        .cycle()
        .take(PAGE_SIZE as usize)
        .collect();
    for page in [0, 2, 3, 9] {
        memory
            .write(GuestAddress(page * PAGE_SIZE), &text)
            .expect("write");
    }
    memory
        .write(GuestAddress(15 * PAGE_SIZE), &noise)
        .expect("write");
    let mut sender = PageSender::new(vec![16u8], None);
    sender.set_compression(compress).expect("a codec");
    let mut hashes = Vec::new();
    sender
        .send_pages(&memory, &(0..12).collect::<Vec<_>>(), &mut hashes)
        .expect("sends");
    sender
        .send_pages(&memory, &[15], &mut hashes)
        .expect("sends");
    sender.send_done().expect("sends");
    let stream = sender.stream().clone();
    // The first frame (after the partition's size) is compressed, the second is not.
    let kind = |at: usize| u16::from_le_bytes([stream[at + 6], stream[at + 7]]);
    assert_eq!(kind(1), FrameKind::CompressedPages as u16);
    let second = 1 + 24 + u64::from_le_bytes(stream[17..25].try_into().expect("8 bytes")) as usize;
    assert_eq!(kind(second), FrameKind::Pages as u16);
    stream
}

/// Small valid inputs for each target, by file name.
fn seeds(target: Target) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        Target::Frames => {
            let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
            // A partition of 16 pages: round 0, a demand, a discard and its answer, a last round,
            // the end.
            let mut stream = vec![16u8];
            stream.extend(frame(
                FrameKind::Pages,
                &[3, 5 | ZERO_PAGE, 15],
                &[&page, &page],
            ));
            stream.extend(frame(FrameKind::Demand, &[1, 2], &[]));
            stream.extend(frame(FrameKind::Discard, &[3, 15], &[]));
            stream.extend(frame(FrameKind::Discarded, &[], &[]));
            stream.extend(frame(FrameKind::Pages, &[ZERO_PAGE], &[]));
            stream.extend(frame(FrameKind::Done, &[], &[]));
            let mut done = vec![1u8];
            done.extend(frame(FrameKind::Done, &[], &[]));
            vec![
                ("session", stream),
                ("done", done),
                ("lz4", compressed(Compress::Lz4)),
                ("zstd", compressed(Compress::Zstd { level: 1 })),
            ]
        }
        Target::State => vec![(
            "two-vcpus",
            state::encode(&state::sample_snapshot(state_config())),
        )],
        Target::Elf => vec![("handmade", guest_images::handmade_image())],
        Target::BootArgs => {
            let header = layout::boot_info(
                2,
                64 << 20,
                2_500_000,
                "kv-zipf theta=0.99 write=0.2 rate=500000",
            )
            .expect("fits");
            vec![
                ("boot-info", header.to_vec()),
                (
                    "rw-mix",
                    b"rw-mix hot_ro=16 hot_rw=8 write=0.3 check_every=1000".to_vec(),
                ),
                (
                    "scan",
                    b"scan hot_pages=64 write_every=16 seed=3 rate=100".to_vec(),
                ),
                (
                    "kv-zipf",
                    b"kv-zipf keys=1000 value_size=64 theta=1.2".to_vec(),
                ),
            ]
        }
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn seeds_are_current() {
    let write = std::env::var_os("FUZZ_WRITE_SEEDS").is_some();
    for target in Target::ALL {
        let dir = fuzz_dir().join("seeds").join(target.name());
        for (name, bytes) in seeds(target) {
            let path = dir.join(name);
            if write {
                fs::create_dir_all(&dir).expect("create the seed directory");
                fs::write(&path, &bytes).expect("write a seed");
                continue;
            }
            let on_disk = fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is stale; rewrite the seeds with FUZZ_WRITE_SEEDS=1 cargo test --release -p heatprobe-tests --test fuzz_regressions",
                path.display()
            );
        }
    }
}

#[test]
fn every_seed_is_accepted() {
    for target in Target::ALL {
        let files = files(&fuzz_dir().join("seeds").join(target.name()));
        assert!(!files.is_empty(), "{} has no seeds", target.name());
        for path in files {
            let bytes = fs::read(&path).expect("read a seed");
            if let Err(e) = target.feed(&bytes) {
                panic!("seed {} is refused: {e}", path.display());
            }
        }
    }
}

#[test]
fn every_regression_input_is_handled() {
    for target in Target::ALL {
        for path in files(&fuzz_dir().join("regressions").join(target.name())) {
            let bytes = fs::read(&path).expect("read a regression input");
            match std::panic::catch_unwind(|| target.feed(&bytes)) {
                Ok(outcome) => eprintln!("{}: {:?}", path.display(), outcome.err()),
                Err(_) => panic!("{} still crashes the target", path.display()),
            }
        }
    }
}
