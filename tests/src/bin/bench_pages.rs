//! `cargo xtask bench pages [RUNS]`: what each step of the page stream costs a page, alone.
//!
//! The sender copies a page out of guest memory, checks it for zeros and hashes it; the
//! receiver hashes it and writes it into the destination's memfd, whose pages are new. Each
//! step runs here by itself, with no network, so the round-0 rate of `cargo xtask bench
//! migration loopback` can be read against them. The zero check is measured twice: the word
//! loop it was, and the cache-line fold it is (`transport::is_zero_page`).
//!
//! Prints a Markdown report for docs/BENCHMARKS.md.

use std::{hint::black_box, time::Instant};

use anyhow::{Context, Result};
use heatprobe_tests::bench::{Spread, commit, plural};
use migrator::{
    migration::transport::is_zero_page,
    vmm::{
        GuestAddress, GuestMemory,
        memory::{PAGE_SIZE, Page},
    },
};
use xxhash_rust::xxh3::xxh3_64;

/// Pages of guest memory for the steps that touch memory: 1 GiB.
const PAGES: u64 = 1 << 18;
/// Passes over one page in cache for the steps that do not.
const PASSES: u64 = 1 << 20;
/// Pages a `pwritev` writes at once: a push batch's run of neighbours.
const RUN: usize = 16;

/// The zero check before the fold: a word at a time, stopping at the first non-zero one.
fn is_zero_by_words(page: &Page) -> bool {
    page.as_chunks::<8>()
        .0
        .iter()
        .all(|w| u64::from_ne_bytes(*w) == 0)
}

/// Nanoseconds a page of `check` over a page held in cache.
fn in_cache(page: &Page, check: impl Fn(&Page) -> u64) -> f64 {
    let started = Instant::now();
    let mut sum = 0u64;
    for _ in 0..PASSES {
        sum = sum.wrapping_add(check(black_box(page)));
    }
    black_box(sum);
    started.elapsed().as_nanos() as f64 / PASSES as f64
}

/// 1 GiB of guest memory with every page written (resident, non-zero).
fn filled_memory() -> Result<GuestMemory> {
    let memory = GuestMemory::new(PAGES * PAGE_SIZE).context("guest memory")?;
    for frame in 0..PAGES {
        memory.write(GuestAddress(frame * PAGE_SIZE), &(frame + 1).to_le_bytes())?;
    }
    Ok(memory)
}

/// Nanoseconds a page to copy every frame of `memory` out, as the sender does.
fn copy_out(memory: &GuestMemory) -> Result<f64> {
    let mut page = [0u8; PAGE_SIZE as usize];
    let started = Instant::now();
    for frame in 0..PAGES {
        memory.copy_frame(frame, &mut page)?;
        black_box(&page);
    }
    Ok(started.elapsed().as_nanos() as f64 / PAGES as f64)
}

/// Nanoseconds a page to write 1 GiB into `memory` through its memfd, `RUN` pages a call,
/// as the receiver does.
fn write_in(memory: &GuestMemory) -> Result<f64> {
    let data = [0x5au8; PAGE_SIZE as usize];
    let run: Vec<&[u8]> = vec![&data[..]; RUN];
    let started = Instant::now();
    for first in (0..PAGES).step_by(RUN) {
        memory.write_frames_through_fd(first, &run)?;
    }
    Ok(started.elapsed().as_nanos() as f64 / PAGES as f64)
}

/// Nanoseconds a page to make every page of fresh `memory` resident with
/// `MADV_POPULATE_WRITE`, a MiB a call: the kernel allocates and zeroes each, no fault.
fn populate(memory: &GuestMemory) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    let base = memory.host_address() as usize as *mut u8;
    let size = memory.size() as usize;
    let started = Instant::now();
    for offset in (0..size).step_by(CHUNK) {
        // SAFETY: advice on a MiB of the memory's own mapping, in bounds (`size` is a
        // multiple of a MiB); nothing reads or writes it meanwhile.
        let done = unsafe {
            libc::madvise(
                base.add(offset).cast(),
                CHUNK.min(size - offset),
                libc::MADV_POPULATE_WRITE,
            )
        };
        anyhow::ensure!(done == 0, "madvise: {}", std::io::Error::last_os_error());
    }
    Ok(started.elapsed().as_nanos() as f64 / PAGES as f64)
}

/// Nanoseconds a page to copy a page into each frame of resident `memory` through its
/// mapping: what a receiver pays once the pages are there.
fn copy_in(memory: &GuestMemory) -> Result<f64> {
    let data = [0x5au8; PAGE_SIZE as usize];
    let started = Instant::now();
    for frame in 0..PAGES {
        memory.write(GuestAddress(frame * PAGE_SIZE), &data)?;
    }
    Ok(started.elapsed().as_nanos() as f64 / PAGES as f64)
}

/// One measurement of every step: nanoseconds a page, in row order.
fn one_run(rows: &mut [Vec<f64>]) -> Result<()> {
    let zero = [0u8; PAGE_SIZE as usize];
    let mut data = [0u8; PAGE_SIZE as usize];
    data[0] = 1;
    let mut figures = vec![
        in_cache(&zero, |p| u64::from(is_zero_by_words(p))),
        in_cache(&zero, |p| u64::from(is_zero_page(p))),
        in_cache(&data, |p| u64::from(is_zero_by_words(p))),
        in_cache(&data, |p| u64::from(is_zero_page(p))),
        in_cache(&data, |p| xxh3_64(p)),
    ];
    let filled = filled_memory()?;
    figures.push(copy_out(&filled)?);
    drop(filled);
    // A fresh memfd takes each page for the first time; the second pass writes over them.
    let fresh = GuestMemory::new(PAGES * PAGE_SIZE).context("guest memory")?;
    figures.push(write_in(&fresh)?);
    figures.push(write_in(&fresh)?);
    drop(fresh);
    let fresh = GuestMemory::new(PAGES * PAGE_SIZE).context("guest memory")?;
    figures.push(populate(&fresh)?);
    figures.push(copy_in(&fresh)?);
    for (row, figure) in rows.iter_mut().zip(figures) {
        row.push(figure);
    }
    Ok(())
}

const ROWS: [&str; 10] = [
    "zero check of a zero page, a word at a time (before)",
    "zero check of a zero page, a cache line at a time (now)",
    "zero check of a data page, a word at a time (before)",
    "zero check of a data page, a cache line at a time (now)",
    "xxh3 of a page (both sides)",
    "copy out of guest memory (the sender), 1 GiB resident",
    "`pwritev` into a fresh memfd, 16 pages a call (the receiver)",
    "`pwritev` over the same pages, now resident",
    "`MADV_POPULATE_WRITE` of a fresh memfd, a MiB a call",
    "copy into the same pages through the mapping, now resident",
];

fn main() -> Result<()> {
    let runs = match std::env::args().nth(1) {
        Some(arg) => arg.parse().context("not a number of runs")?,
        None => 5,
    };
    let mut rows = vec![Vec::new(); ROWS.len()];
    let started = Instant::now();
    for _ in 0..runs {
        one_run(&mut rows)?;
    }
    println!("### Page steps alone\n");
    println!("Reproduce: `cargo xtask bench pages {runs}`.\n");
    if let Some(commit) = commit() {
        println!("Built from commit {commit}.\n");
    }
    println!(
        "Each step of the page stream by itself, no network; ns a page and the rate it \
         would allow, `median (min–max)` of {}, the steps interleaved run by run.\n",
        plural(runs, "run")
    );
    println!("| step | ns a page | Gbit/s |");
    println!("|---|---|---|");
    for (name, values) in ROWS.iter().zip(&rows) {
        let Some(ns) = Spread::of(values.clone()) else {
            continue;
        };
        let gbits = |ns: f64| PAGE_SIZE as f64 * 8.0 / ns;
        println!(
            "| {name} | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) |",
            ns.median,
            ns.min,
            ns.max,
            gbits(ns.median),
            gbits(ns.max),
            gbits(ns.min)
        );
    }
    println!("\nThe bench took {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}
