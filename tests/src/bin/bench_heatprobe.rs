//! `cargo xtask bench heatprobe`: what the probes cost.
//!
//! - cost per probe event: the kernel's BPF run-time statistics (run_time_ns / run_cnt, as
//!   bpftop reads them) over a fault-heavy process and a KVM guest;
//! - slowdown of a fault-heavy process with the probes attached and tracking it, and with them
//!   attached but not tracking it, each against no probes at all, as medians of ratios taken
//!   within one run, the three variants interleaved so machine noise hits them alike;
//! - kernel memory of the counts map per tracked page.
//!
//! Prints a Markdown report for docs/BENCHMARKS.md.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::{programs::loaded_programs, sys::Stats};
use heatprobe::{Probes, probes::error_chain};
use heatprobe_tests::testvm::{DATA, PAGE, TestVm};

const ROUNDS: u64 = 20;
const PAGES: u64 = 16384;
const REPEATS: usize = 7;
/// Pages in 1 GiB.
const GIB_PAGES: u64 = 1 << 18;

/// Accumulated (run time, run count) of a loaded program.
fn program_stats(id: u32) -> Result<(Duration, u64)> {
    for info in loaded_programs() {
        let info = info.context("listing loaded programs")?;
        if info.id() == id {
            return Ok((info.run_time(), info.run_count()));
        }
    }
    bail!("program {id} is not loaded")
}

struct StormRun {
    nanos: u64,
    tracked_pages: Option<usize>,
    map_bytes: Option<u64>,
}

/// Runs fault_storm once (`rounds` x `pages`); with `track`, the probes count its faults.
fn storm(probes: Option<&Probes>, track: bool) -> Result<StormRun> {
    storm_sized(probes, track, ROUNDS, PAGES)
}

fn storm_sized(probes: Option<&Probes>, track: bool, rounds: u64, pages: u64) -> Result<StormRun> {
    let exe = std::env::current_exe()?.with_file_name("fault_storm");
    let mut child = Command::new(exe)
        .args([rounds.to_string(), pages.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting fault_storm")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let target = match (probes, track) {
        (Some(probes), true) => Some(
            probes
                .track_process(child.id())
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
        ),
        _ => None,
    };
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"go\n")?;
    line.clear();
    stdout.read_line(&mut line)?;
    let nanos: u64 = line.trim().parse().context("fault_storm output")?;
    child.wait()?;
    let (mut tracked_pages, mut map_bytes) = (None, None);
    if let (Some(probes), Some(target)) = (probes, target) {
        tracked_pages = Some(probes.counts(target)?.len());
        map_bytes = Some(probes.counts_map_memory()?);
        probes.untrack(target)?;
    }
    Ok(StormRun {
        nanos,
        tracked_pages,
        map_bytes,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn program_id(probes: &Probes, event: &str) -> Result<u32> {
    probes
        .program_ids()
        .into_iter()
        .find(|(e, _)| *e == event)
        .map(|(_, id)| id)
        .with_context(|| format!("{event} is not loaded"))
}

fn load_probes() -> Result<Probes> {
    Probes::load().map_err(|e| anyhow::anyhow!(error_chain(&e)))
}

fn main() -> Result<()> {
    // Slowdown first, with BPF run-time statistics off: they add clock reads to every run.
    let (mut tracked_ratio, mut untracked_ratio) = (Vec::new(), Vec::new());
    let mut baseline_ns = Vec::new();
    for _ in 0..REPEATS {
        let base = storm(None, false)?.nanos as f64;
        baseline_ns.push(base);
        let probes = load_probes()?;
        let tracked = storm(Some(&probes), true)?;
        tracked_ratio.push(tracked.nanos as f64 / base);
        untracked_ratio.push(storm(Some(&probes), false)?.nanos as f64 / base);
    }

    // Then the cost per event, from the kernel's statistics.
    let _stats = aya::sys::enable_stats(Stats::RunTime).context("enabling BPF run-time stats")?;
    let (mut tracked_cost, mut untracked_cost) = (Vec::new(), Vec::new());
    let probes = load_probes()?;
    let id = program_id(&probes, heatprobe::probes::PROCESS_EVENT)?;
    for _ in 0..3 {
        for (track, costs) in [(true, &mut tracked_cost), (false, &mut untracked_cost)] {
            let before = program_stats(id)?;
            storm(Some(&probes), track)?;
            let after = program_stats(id)?;
            costs.push((after.0 - before.0).as_nanos() as f64 / (after.1 - before.1) as f64);
        }
    }
    drop(probes);

    // Map memory: one process touching 1 GiB, and the same with 4 MiB to show the fixed part.
    let probes = load_probes()?;
    let big = storm_sized(Some(&probes), true, 1, GIB_PAGES)?;
    let small = storm_sized(Some(&probes), true, 1, 1024)?;
    drop(probes);
    let per_page = |run: &StormRun| -> Result<(u64, usize)> {
        Ok((
            run.map_bytes.context("map bytes")?,
            run.tracked_pages.context("pages")?,
        ))
    };
    let (big_bytes, big_pages) = per_page(&big)?;
    let (small_bytes, small_pages) = per_page(&small)?;

    // A KVM guest re-faulting 400 frames per pass, re-armed with MADV_DONTNEED each pass.
    let probes = load_probes()?;
    let vm = TestVm::new(16 << 20)?;
    let target = probes
        .track_vcpus(&[vm.vcpu_tid()])
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let frames: Vec<(u64, bool)> = (0..400).map(|i| (DATA + i * PAGE, i % 4 == 0)).collect();
    vm.set_touch_list(&frames)?;
    let spte = program_id(&probes, "kvmmmu:kvm_mmu_spte_requested")?;
    let walk = program_id(&probes, "kvmmmu:kvm_mmu_pagetable_walk")?;
    let (spte_before, walk_before) = (program_stats(spte)?, program_stats(walk)?);
    let data_frames = DATA / PAGE..DATA / PAGE + 400;
    for _ in 0..200 {
        vm.run_pass()?;
        vm.ram.drop_mapping(data_frames.clone())?;
    }
    let (spte_after, walk_after) = (program_stats(spte)?, program_stats(walk)?);
    let guest_events = spte_after.1 - spte_before.1;
    let per_event = |before: (Duration, u64), after: (Duration, u64)| {
        (after.0 - before.0).as_nanos() as f64 / (after.1 - before.1).max(1) as f64
    };
    let guest_pages = probes.counts(target)?.len();
    let guest_bytes = probes.counts_map_memory()?;

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let faults = ROUNDS * PAGES;
    println!("### heatprobe overhead\n");
    println!(
        "Kernel {}; fault_storm: {ROUNDS} rounds x {PAGES} pages = {faults} write faults per run \
         (baseline median {:.0} ms); medians of {REPEATS} interleaved repeats.\n",
        kernel.trim(),
        median(&mut baseline_ns) / 1e6
    );
    println!("| figure | measured | target |");
    println!("|---|---|---|");
    println!(
        "| cost per event, `exceptions:page_fault_user`, tracked process | {:.0} ns | ≤ 200 ns |",
        median(&mut tracked_cost)
    );
    println!(
        "| cost per event, `exceptions:page_fault_user`, untracked process (one lookup) | {:.0} ns | |",
        median(&mut untracked_cost)
    );
    println!(
        "| cost per event, `kvmmmu:kvm_mmu_spte_requested` (counts) | {:.0} ns | ≤ 200 ns |",
        per_event(spte_before, spte_after)
    );
    println!(
        "| cost per event, `kvmmmu:kvm_mmu_pagetable_walk` (stashes the access) | {:.0} ns | |",
        per_event(walk_before, walk_after)
    );
    println!(
        "| slowdown of fault_storm, tracked, vs no probes | {:+.1}% | ≤ 5% |",
        (median(&mut tracked_ratio) - 1.0) * 100.0
    );
    println!(
        "| slowdown of fault_storm, probes attached but not tracking it | {:+.1}% | |",
        (median(&mut untracked_ratio) - 1.0) * 100.0
    );
    println!(
        "| counts-map kernel memory per tracked page, 1 GiB process ({big_pages} pages) | {:.1} bytes | ≤ 16 bytes |",
        big_bytes as f64 / big_pages as f64
    );
    println!(
        "| counts-map kernel memory per tracked page, 4 MiB process ({small_pages} pages; the hash buckets are a fixed {:.0} KiB) | {:.1} bytes | |",
        (small_bytes as f64
            - (big_bytes - small_bytes) as f64 / (big_pages - small_pages) as f64
                * small_pages as f64)
            / 1024.0,
        small_bytes as f64 / small_pages as f64
    );
    println!(
        "| counts-map kernel memory per tracked page (guest, {guest_pages} frames incl. code and page tables) | {:.1} bytes | |",
        guest_bytes as f64 / guest_pages.max(1) as f64
    );
    println!("\n{guest_events} guest faults counted over 200 passes of 400 frames.");
    Ok(())
}
