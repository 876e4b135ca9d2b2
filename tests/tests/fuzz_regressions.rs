//! The fuzz targets' inputs, replayed on stable through the same entry points
//! (`migrator::fuzzing`): every seed in `fuzz/seeds/<target>/` is accepted, and every input
//! kept in `fuzz/regressions/<target>/` (each once crashed a target) is handled without a panic.
//!
//! The seeds are made here from the real encoders; `FUZZ_WRITE_SEEDS=1` rewrites them after a
//! format change, and a stale seed fails `seeds_are_current`.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use tarpc::tokio_serde::Serializer;

use heatprobe_tests::guest_images;
use migrator::{
    api::{DaemonInfo, MigrateRequest, MigratorApiRequest, MigratorApiResponse, codec::Postcard},
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

/// `item` as the API's codec writes it.
fn api_encode<T>(item: &T) -> Vec<u8>
where
    Postcard<(), T>: Serializer<T, Error = std::io::Error>,
{
    let mut codec = Postcard::<(), T>::default();
    std::pin::Pin::new(&mut codec)
        .serialize(item)
        .expect("encodes")
        .to_vec()
}

/// A request as a client writes it, with a deadline 10 s away (tarpc sends the time left,
/// which a request made here would not give the same bytes twice).
fn api_request(id: u64, message: MigratorApiRequest) -> Vec<u8> {
    let trace = tarpc::trace::Context {
        trace_id: tarpc::trace::TraceId::from(3u128),
        span_id: tarpc::trace::SpanId::from(4u64),
        sampling_decision: tarpc::trace::SamplingDecision::Unsampled,
    };
    let mut bytes = vec![0]; // ClientMessage::Request
    bytes.extend(api_encode(&(Duration::from_secs(10), trace, id, message)));
    bytes
}

/// Small valid inputs for the API's codec: requests and responses, and two in frames.
fn api_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = api_request(
        1,
        MigratorApiRequest::Hello {
            min: 1,
            max: migrator::api::API_VERSION,
        },
    );
    let migrate = api_request(
        2,
        MigratorApiRequest::Migrate {
            request: MigrateRequest {
                id: "p0".into(),
                to: "127.0.0.1:7000".parse().expect("an address"),
                options: Default::default(),
                heat: None,
            },
        },
    );
    let cancel = api_encode(&tarpc::ClientMessage::<MigratorApiRequest>::Cancel {
        trace_context: Default::default(),
        request_id: 2,
    });
    let welcome = api_encode(&tarpc::Response {
        request_id: 1,
        message: Ok(MigratorApiResponse::Hello(Ok(DaemonInfo::new(2)))),
    });
    let refused = api_encode(&tarpc::Response::<MigratorApiResponse> {
        request_id: 2,
        message: Err(tarpc::ServerError::new(
            std::io::ErrorKind::NotFound,
            "gone".into(),
        )),
    });
    let mut framed = Vec::new();
    for message in [&hello, &welcome] {
        framed.extend((message.len() as u32).to_be_bytes());
        framed.extend(message);
    }
    vec![
        ("hello", hello),
        ("migrate", migrate),
        ("cancel", cancel),
        ("welcome", welcome),
        ("server-error", refused),
        ("framed", framed),
    ]
}

/// A step of the destination session target: a connection (`link`) sends `bytes`.
fn send(link: u8, bytes: &[u8]) -> Vec<u8> {
    let mut step = vec![1, link];
    step.extend((bytes.len() as u16).to_le_bytes());
    step.extend(bytes);
    step
}

/// Sessions as sources run them, in the destination session target's steps (see
/// `migrator::fuzzing::destination_session`).
fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const OPEN: u8 = 0;
    const CLOSE: u8 = 2;
    const COMMIT_UNDECODABLE: u8 = 3;
    const COMMIT: u8 = 4;
    const RESTORED: u8 = 5;
    const HANDOVER: u8 = 6;
    const FINISH: u8 = 7;
    const FAILURE: u8 = 8;
    const ABORT: u8 = 9;
    const DISCARD: u8 = 10;
    const RECOVER: u8 = 11;
    let page = |fill: u8| vec![fill; PAGE_SIZE as usize];
    let (one, two) = (page(1), page(2));

    // Pre-copy over one connection: a round, the end, the cutover; an abort once the guest
    // runs here is refused, a discard after its stop is not.
    let mut precopy = vec![0, 7, OPEN];
    let mut round = frame(FrameKind::Pages, &[0, 3 | ZERO_PAGE, 7], &[&one, &two]);
    round.extend(frame(FrameKind::Done, &[], &[]));
    precopy.extend(send(0, &round));
    precopy.extend([COMMIT, RESTORED, HANDOVER, ABORT, DISCARD]);

    // Hybrid: the data connection and the urgent one; a page discarded and sent again before
    // the cutover; the push after it, then finish.
    let mut hybrid = vec![1, 7, OPEN, OPEN];
    hybrid.extend(send(1, &frame(FrameKind::Urgent, &[], &[])));
    let mut before = frame(FrameKind::Pages, &[1, 2], &[&one, &two]);
    before.extend(frame(FrameKind::Discard, &[1], &[]));
    before.extend(frame(FrameKind::Pages, &[1], &[&two]));
    before.extend(frame(FrameKind::Done, &[], &[]));
    hybrid.extend(send(0, &before));
    hybrid.extend([COMMIT, RESTORED, HANDOVER]);
    let mut push = frame(FrameKind::Pages, &[2 | ZERO_PAGE, 5], &[&one]);
    push.extend(frame(FrameKind::Done, &[], &[]));
    hybrid.extend(send(0, &push));
    hybrid.extend([FINISH, DISCARD]);

    // Hybrid, broken after the handover and recovered over new connections.
    let mut recovered = vec![1, 7, OPEN, OPEN];
    recovered.extend(send(1, &frame(FrameKind::Urgent, &[], &[])));
    recovered.extend(send(0, &frame(FrameKind::Done, &[], &[])));
    recovered.extend([COMMIT, RESTORED, HANDOVER, FAILURE, RECOVER, OPEN, OPEN]);
    recovered.extend(send(3, &frame(FrameKind::Urgent, &[], &[])));
    recovered.extend(send(2, &push));
    recovered.extend([FINISH]);

    // Pre-copy over two connections, each ending its phase; a commit with a state that does
    // not decode is refused.
    let mut striped = vec![2, 3, OPEN, OPEN];
    let mut first = frame(FrameKind::Pages, &[0, 2], &[&one, &two]);
    first.extend(frame(FrameKind::Done, &[], &[]));
    let mut second = frame(FrameKind::Pages, &[1 | ZERO_PAGE, 3], &[&two]);
    second.extend(frame(FrameKind::Done, &[], &[]));
    striped.extend(send(0, &first));
    striped.extend(send(1, &second));
    striped.extend([CLOSE, 0, CLOSE, 1, COMMIT_UNDECODABLE, 4]);
    striped.extend(b"junk");
    striped.push(COMMIT);
    vec![
        ("precopy", precopy),
        ("hybrid", hybrid),
        ("recovered", recovered),
        ("striped", striped),
    ]
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
        Target::ApiCodec => api_seeds(),
        Target::DestinationSession => session_seeds(),
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
