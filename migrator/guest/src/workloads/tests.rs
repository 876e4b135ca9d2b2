//! The workloads run as host functions: argument errors, clean runs with and without
//! scatter/scramble, the page format's checks, and [`popularity`] against what a run did.

extern crate std;
use std::{vec, vec::Vec};

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
