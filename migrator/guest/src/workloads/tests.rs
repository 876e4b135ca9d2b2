//! The workloads run as host functions: argument errors, clean runs with and without
//! scatter/scramble, the page format's checks, and [`popularity`] against what a run did.

extern crate std;
use std::{string::String, vec, vec::Vec};

use super::*;

/// Runs a workload for `ops` operations on the host and counts its self-check failures.
#[derive(Debug)]
struct Host {
    ops: u64,
    errors: u64,
    checks: u64,
}

impl Platform for Host {
    fn ticks(&self) -> u64 {
        0
    }
    fn ticks_per_ms(&self) -> u64 {
        1_000_000
    }
    fn report(&mut self, progress: &Progress) {
        self.checks = progress.checks;
    }
    fn check_failed(&mut self, _: u64, _: u64) {
        self.errors += 1;
    }
    fn console(&mut self, _: &str) {}
    fn sleep(&mut self, _: u64) {}
    fn should_stop(&self, progress: &Progress) -> bool {
        progress.ops >= self.ops
    }
}

const SHARE: usize = (4 << 20) / 8;

fn run_on<'a>(args: &'a str, mem: &mut [u64], ops: u64) -> Result<Host, WorkloadError<'a>> {
    let mut host = Host {
        ops,
        errors: 0,
        checks: 0,
    };
    run(&Args::new(args), mem, 0, 1, &mut host)?;
    Ok(host)
}

fn refused(args: &str) -> WorkloadError<'_> {
    let mut mem = vec![0u64; SHARE];
    let error = run_on(args, &mut mem, 0).expect_err(args);
    // The host-side model refuses the same arguments the same way.
    if let Err(PopularityError::Workload(model)) = popularity(args, (SHARE * 8) as u64) {
        assert_eq!(model, error, "{args}");
    } else {
        panic!("popularity accepted {args}");
    }
    error
}

#[test]
fn hotspot_refuses_bad_arguments_by_name() {
    for (args, key) in [
        ("hotspot hot=0", "hot"),
        ("hotspot hot=2", "hot"),
        ("hotspot hot=1/0", "hot"),
        ("hotspot hot=many", "hot"),
        ("hotspot hot_share=1.5", "hot_share"),
        ("hotspot hot_share=-0.1", "hot_share"),
        ("hotspot scatter=2", "scatter"),
        ("hotspot check_every=-1", "check_every"),
        ("hotspot seed=x", "seed"),
    ] {
        assert_eq!(refused(args), WorkloadError::BadArg(key), "{args}");
    }
    assert_eq!(refused("hotspot hots=1"), WorkloadError::UnknownArg("hots"));
    assert_eq!(
        refused("hotspot alpha=0.5"),
        WorkloadError::UnknownArg("alpha")
    );
    let mut tiny = vec![0u64; PAGE_WORDS];
    assert_eq!(
        run_on("hotspot", &mut tiny, 0).err(),
        Some(WorkloadError::TooSmall)
    );
}

#[test]
fn graded_refuses_bad_arguments_by_name() {
    for (args, key) in [
        ("graded alpha=1", "alpha"),
        ("graded alpha=1.5", "alpha"),
        ("graded alpha=-0.5", "alpha"),
        ("graded alpha=nan", "alpha"),
        ("graded write=2", "write"),
        ("graded scatter=yes", "scatter"),
        ("graded check_every=1.5", "check_every"),
    ] {
        assert_eq!(refused(args), WorkloadError::BadArg(key), "{args}");
    }
    assert_eq!(refused("graded hot=1/8"), WorkloadError::UnknownArg("hot"));
    let mut tiny = vec![0u64; PAGE_WORDS];
    assert_eq!(
        run_on("graded", &mut tiny, 0).err(),
        Some(WorkloadError::TooSmall)
    );
}

#[test]
fn kv_zipf_refuses_bad_scramble_and_sizes_that_overflow() {
    assert_eq!(
        refused("kv-zipf scramble=on"),
        WorkloadError::BadArg("scramble")
    );
    assert_eq!(
        refused("kv-zipf value_size=30"),
        WorkloadError::BadArg("value_size")
    );
    assert_eq!(
        refused("kv-zipf keys=18446744073709551615"),
        WorkloadError::TooSmall
    );
    assert_eq!(
        refused("kv-zipf keys=4096 value_size=18446744073709551608"),
        WorkloadError::TooSmall
    );
    assert_eq!(refused("kv-zipf keys=0"), WorkloadError::BadArg("keys"));
}

#[test]
fn each_new_layout_runs_clean_and_checks_itself() {
    for args in [
        "hotspot check_every=20000",
        "hotspot scatter=1 hot=1/16 hot_share=0.9 check_every=20000",
        "graded check_every=20000",
        "graded scatter=1 alpha=0.5 write=0.5 check_every=20000",
        "kv-zipf keys=8192 check_every=20000",
        "kv-zipf keys=8192 scramble=1 check_every=20000",
        "kv-zipf keys=5000 value_size=200 scramble=1 check_every=20000",
    ] {
        let mut mem = vec![0u64; SHARE];
        let host = run_on(args, &mut mem, 100_000).expect(args);
        assert_eq!(host.errors, 0, "{args}");
        assert!(host.checks >= 4, "{args}: {} checks", host.checks);
    }
}

#[test]
fn the_page_format_catches_zeroed_stale_misplaced_and_torn_pages() {
    let mut versions = vec![0u64; PAGE_WORDS];
    let mut data = vec![0u64; 4 * PAGE_WORDS];
    let tag = 9 << 40;
    for p in 0..4 {
        pages::init(&mut data, &mut versions, p, tag);
    }
    pages::stamp(&mut data, &mut versions, 1, tag, 2);
    for p in 0..4 {
        assert_eq!(pages::check(&data, &versions, p, tag, true), Ok(()));
    }
    let good = data.clone();
    data[..PAGE_WORDS].fill(0);
    assert_eq!(pages::check(&data, &versions, 0, tag, false), Err(0));
    // Stale: page 1 as it was before its second version.
    data.copy_from_slice(&good);
    versions[1] = 3;
    assert_eq!(pages::check(&data, &versions, 1, tag, false), Err(1));
    versions[1] = 2;
    // Misplaced: page 3 holding page 2's contents.
    data.copy_within(2 * PAGE_WORDS..3 * PAGE_WORDS, 3 * PAGE_WORDS);
    assert_eq!(pages::check(&data, &versions, 3, tag, false), Err(0));
    // Torn: a body word only the full check reads.
    data.copy_from_slice(&good);
    data[2 * PAGE_WORDS + 300] ^= 1;
    assert_eq!(pages::check(&data, &versions, 2, tag, false), Ok(()));
    assert_eq!(pages::check(&data, &versions, 2, tag, true), Err(300));
}

/// The `k` data pages with the highest recorded version (the most writes) after a run.
fn most_written(popularity: &Popularity, mem: &[u64], k: usize) -> Vec<usize> {
    let data = popularity.data_pages();
    let mut pages: Vec<usize> = (0..data.len()).collect();
    pages.sort_by_key(|&p| core::cmp::Reverse(mem[p]));
    pages.truncate(k);
    pages.sort_unstable();
    pages.iter().map(|p| p + data.start).collect()
}

/// The `k` data pages the model ranks hottest.
fn hottest_data(popularity: &Popularity, k: usize) -> Vec<usize> {
    let data = popularity.data_pages();
    let mut pages: Vec<usize> = popularity
        .ranking()
        .into_iter()
        .filter(|p| data.contains(p))
        .take(k)
        .collect();
    pages.sort_unstable();
    pages
}

#[test]
fn popularity_names_the_pages_a_run_writes_most() {
    // Write-only runs, so each data page's version counts its writes.
    for (args, k) in [
        ("hotspot hot=1/64 check_every=1000000", 15),
        ("hotspot hot=1/64 scatter=1 check_every=1000000", 15),
        ("graded write=1 check_every=1000000", 8),
        ("graded write=1 scatter=1 check_every=1000000", 8),
    ] {
        let model = popularity(args, (SHARE * 8) as u64).expect(args);
        assert_eq!(model.pages(), SHARE / PAGE_WORDS);
        let mut mem = vec![0u64; SHARE];
        run_on(args, &mut mem, 300_000).expect(args);
        assert_eq!(
            most_written(&model, &mem, k),
            hottest_data(&model, k),
            "{args}"
        );
        let data: f64 = model.data_pages().map(|p| model.weight(p)).sum();
        let tables: f64 = (0..model.data_pages().start).map(|p| model.weight(p)).sum();
        assert!(
            (data - 1.0).abs() < 1e-6 && (tables - 1.0).abs() < 1e-6,
            "{args}"
        );
    }
    // Scattered, the hot pages are not the first ones.
    let plain = popularity("hotspot", (SHARE * 8) as u64).unwrap();
    let scattered = popularity("hotspot scatter=1", (SHARE * 8) as u64).unwrap();
    assert_ne!(hottest_data(&plain, 15), hottest_data(&scattered, 15));
}

#[test]
fn a_moving_hot_region_is_where_the_model_says_after_each_move() {
    for args in [
        "hotspot hot=1/64 move_every=100000 check_every=1000000",
        "hotspot hot=1/64 move_every=100000 scatter=1 check_every=1000000",
    ] {
        let model = popularity(args, (SHARE * 8) as u64).expect(args);
        let mut mem = vec![0u64; SHARE];
        // Three regions of 100k writes each.
        run_on(args, &mut mem, 300_000).expect(args);
        let phases: Vec<Vec<usize>> = [0, 100_000, 200_000]
            .into_iter()
            .map(|ops| hottest_data(&model.clone().after_ops(ops), 15))
            .collect();
        assert_ne!(phases[0], phases[1], "{args}: the region moved");
        let mut expected: Vec<usize> = phases.concat();
        expected.sort_unstable();
        assert_eq!(most_written(&model, &mem, 45), expected, "{args}");
        // Still the first region while fewer operations than a move were made.
        assert_eq!(
            hottest_data(&model.clone().after_ops(99_999), 15),
            phases[0]
        );
    }
}

#[test]
fn popularity_of_scrambled_kv_zipf_follows_the_hottest_key() {
    let args = "kv-zipf keys=8192 write=1 scramble=1 check_every=1000000";
    let model = popularity(args, (SHARE * 8) as u64).unwrap();
    let mut mem = vec![0u64; SHARE];
    run_on(args, &mut mem, 200_000).unwrap();
    // Key 0's slot has the highest version; its value page is the hottest data page.
    let table = model.data_pages().start * PAGE_WORDS;
    let slot = (0..8192).max_by_key(|&s| mem[s]).unwrap();
    assert_ne!(slot, 0, "scrambled, key 0 does not sit at slot 0");
    let value_page = model.data_pages().start + slot * 16 / PAGE_WORDS;
    assert_eq!(hottest_data(&model, 1), vec![value_page]);
    assert_eq!(
        mem[table + slot * 16],
        0,
        "key 0's value starts with its key"
    );
    // Unscrambled, the hottest page is the first value page, as before.
    let plain = popularity("kv-zipf keys=8192", (SHARE * 8) as u64).unwrap();
    assert_eq!(hottest_data(&plain, 1), vec![plain.data_pages().start]);
}

#[test]
fn popularity_refuses_what_it_does_not_model() {
    assert_eq!(
        popularity("scan", 1 << 22).err(),
        Some(PopularityError::NotModelled("scan"))
    );
    assert_eq!(
        popularity("nope", 1 << 22).err(),
        Some(PopularityError::Workload(WorkloadError::Unknown("nope")))
    );
    assert_eq!(
        popularity("hot=1", 1 << 22).err(),
        Some(PopularityError::Workload(WorkloadError::NoName))
    );
}

#[test]
fn vcpu_shares_are_whole_pages_between_image_and_stacks() {
    let (end, mem) = (0x11_0000, 64 << 20);
    let a = vcpu_share(end, mem, 2, 0);
    let b = vcpu_share(end, mem, 2, 1);
    assert_eq!(a.start, end);
    assert_eq!(a.end, b.start);
    assert!(b.end <= mem - 2 * STACK_SIZE);
    assert_eq!((a.end - a.start) % 4096, 0);
    // Nonsense in, an empty range out, no panic.
    assert!(vcpu_share(u64::MAX, 0, 0, u32::MAX).is_empty());
}

#[test]
fn fill_refuses_bad_arguments_by_name() {
    let mut mem = vec![0u64; SHARE];
    for (args, key) in [
        ("fill content=prose", "content"),
        ("fill content=", "content"),
        ("fill check_every=x", "check_every"),
        ("fill seed=-1", "seed"),
    ] {
        assert_eq!(
            run_on(args, &mut mem, 0).err(),
            Some(WorkloadError::BadArg(key)),
            "{args}"
        );
    }
    assert_eq!(
        run_on("fill contents=text", &mut mem, 0).err(),
        Some(WorkloadError::UnknownArg("contents"))
    );
    let mut tiny = vec![0u64; PAGE_WORDS];
    assert_eq!(
        run_on("fill", &mut tiny, 0).err(),
        Some(WorkloadError::TooSmall)
    );
    assert_eq!(
        popularity("fill", 1 << 22).err(),
        Some(PopularityError::NotModelled("fill"))
    );
}

#[test]
fn fill_runs_clean_with_either_content_and_checks_itself() {
    for args in [
        "fill check_every=2000",
        "fill content=text check_every=2000",
        "fill content=random check_every=2000 seed=7",
    ] {
        let mut mem = vec![0u64; SHARE];
        let host = run_on(args, &mut mem, 10_000).expect(args);
        assert_eq!(host.errors, 0, "{args}");
        assert!(host.checks >= 4, "{args}: {} checks", host.checks);
        // Every page was written: none is left zero.
        let pages = SHARE / PAGE_WORDS - 1;
        let data = &mem[PAGE_WORDS..];
        assert!(
            (0..pages).all(|p| data[p * PAGE_WORDS + 100] != 0),
            "{args}"
        );
    }
}

/// Order-0 entropy of `bytes`, in bits per byte.
fn entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

fn page_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn fill_text_reads_as_words_and_random_does_not() {
    let mut versions = vec![0u64; PAGE_WORDS];
    let mut data = vec![0u64; 4 * PAGE_WORDS];
    let text = fill::Filler {
        content: fill::Content::Text,
        seed: 3,
    };
    let random = fill::Filler {
        content: fill::Content::Random,
        seed: 3,
    };
    text.write(&mut data, &mut versions, 0, 1);
    text.write(&mut data, &mut versions, 1, 2);
    random.write(&mut data, &mut versions, 2, 1);
    let prose = page_bytes(&data[16..PAGE_WORDS]);
    let line = String::from_utf8(prose.clone()).expect("text is UTF-8");
    assert!(line.contains(" the ") && line.contains('\n'), "{line}");
    assert!(line.contains("INFO  http: GET /api/v1/items "), "{line}");
    assert!(
        prose
            .iter()
            .all(|b| b.is_ascii_graphic() || b" \n".contains(b))
    );
    // About 4 bits a byte of letters and spaces, against 8 for random bytes: text an
    // entropy coder halves at least, and that repeats its words for lz4 to find.
    let e = entropy(&prose);
    assert!((3.0..5.0).contains(&e), "text: {e} bits a byte");
    let noise = page_bytes(&data[2 * PAGE_WORDS + 2..3 * PAGE_WORDS]);
    assert!(
        entropy(&noise) > 7.9,
        "random: {} bits a byte",
        entropy(&noise)
    );
    // Another version of a page, or another seed, is other text.
    assert_ne!(data[2..PAGE_WORDS], data[PAGE_WORDS + 2..2 * PAGE_WORDS]);
    let other = fill::Filler { seed: 4, ..text };
    let mut again = vec![0u64; PAGE_WORDS];
    other.write(&mut again, &mut versions, 0, 1);
    assert_ne!(data[2..PAGE_WORDS], again[2..]);
}

#[test]
fn the_fill_format_catches_zeroed_stale_misplaced_and_torn_pages() {
    for content in [fill::Content::Text, fill::Content::Random] {
        let filler = fill::Filler { content, seed: 11 };
        let mut versions = vec![0u64; PAGE_WORDS];
        let mut data = vec![0u64; 4 * PAGE_WORDS];
        for p in 0..4 {
            filler.write(&mut data, &mut versions, p, 1);
        }
        filler.write(&mut data, &mut versions, 1, 2);
        for p in 0..4 {
            assert_eq!(filler.check(&data, &versions, p), Ok(()), "{content:?}");
        }
        let good = data.clone();
        data[..PAGE_WORDS].fill(0);
        assert_eq!(filler.check(&data, &versions, 0), Err(0));
        // Stale: page 1 as it was before its second version.
        data.copy_from_slice(&good);
        let mut old = vec![0u64; 2 * PAGE_WORDS];
        let mut old_versions = vec![0u64; PAGE_WORDS];
        filler.write(&mut old, &mut old_versions, 1, 1);
        data[PAGE_WORDS..2 * PAGE_WORDS].copy_from_slice(&old[PAGE_WORDS..]);
        assert_eq!(filler.check(&data, &versions, 1), Err(1));
        // ... and its old content under the new header.
        data[PAGE_WORDS + 1] = 2;
        assert_eq!(filler.check(&data, &versions, 1), Err(2));
        // Misplaced: page 3 holding page 2's contents.
        data.copy_from_slice(&good);
        data.copy_within(2 * PAGE_WORDS..3 * PAGE_WORDS, 3 * PAGE_WORDS);
        assert_eq!(filler.check(&data, &versions, 3), Err(0));
        // Torn: one byte of the content, near the page's end.
        data.copy_from_slice(&good);
        data[2 * PAGE_WORDS + 500] ^= 1 << 40;
        assert_eq!(filler.check(&data, &versions, 2), Err(500));
    }
}
