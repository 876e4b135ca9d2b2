//! `cargo xtask bench heat [RUNS] [--only SUBSTRING]... [--samplings MS:F[:R[:pool]],...]
//! [--pairs N] [--no-recall] [--no-slowdown]`: how well the daemon's heat finds a guest's hot
//! set, and what profiling costs the guest, for each sampling (epoch in ms : fraction, and
//! optionally the recheck fraction, `--heat-recheck-fraction`, and `pool`, `--heat-pool`).
//!
//! Every sampling configuration (an epoch and a fraction of frames re-armed per epoch) is a
//! daemon of its own, `migrator serve --heat-epoch E --heat-sample-fraction F`, started for the
//! configuration and stopped after it, so only one daemon's probes are loaded at a time.
//!
//! Recall: for each run, configuration and scenario (a workload whose intended page popularity
//! `migrator_guest::workloads::popularity` gives), a fresh 256 MiB, 1-vCPU partition is
//! launched, runs 1 s past its first operation, and then four `migrator heat ID --duration D
//! --json` calls, D = 0.5, 1, 2 and 5 s, are made at once: overlapping windows of one shared
//! profiler count independently, and each starts from the same cold profiler, as a first call
//! on a partition nobody watches does. The true hot set is the smallest set of data pages
//! taking 80% of the data pages' intended accesses, extended to every page as popular as the
//! least popular of them (so `hotspot`'s is its whole hot region, whose pages weigh alike).
//! Recall is the share of those pages among the top ⌈1.25 × |hot|⌉ data pages by heat, pages
//! of equal heat ranked in random order (counted in expectation, so an address-ordered listing
//! cannot favour the hot set of an in-place layout); untouched pages have heat 0. Version
//! tables, the image and the stacks are not data pages and take no place in the ranking.
//!
//! Slowdown: per configuration, a flat-out guest runs, and `pairs` times (default 7) its
//! operations per second are measured over 4 s with no window open and over 4 s inside a
//! `heat` window, the order of the two swapped every pair. The on/off ratio of each pair, and
//! its median and range, is the slowdown; the windows' heat also gives that guest's recall at
//! 5 s.
//!
//! Prints Markdown for docs/BENCHMARKS.md.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use heatprobe_tests::{
    bench::{Spread, commit, median, picked, plural, reproduce, show},
    daemon::{Daemon, DaemonConfig},
    hot_set::{self, FLAT_OUT, HOT_SHARE, MEM, SCENARIOS, SLACK, Scenario, Truth, ops},
};
use serde_json::Value;

/// The windows of each recall measurement, in ms.
const DURATIONS_MS: [u64; 4] = [500, 1000, 2000, 5000];
/// The goal.
const GOAL_RECALL: f64 = 0.95;
const GOAL_WITHIN_MS: u64 = 2000;
const GOAL_SLOWDOWN: f64 = 0.01;
/// How long a guest runs past its first operation before it is profiled.
const WARM_UP: Duration = Duration::from_secs(1);
/// The span over which each slowdown sample counts operations.
const SAMPLE: Duration = Duration::from_secs(4);
const DEFAULT_RUNS: usize = 3;
const DEFAULT_PAIRS: usize = 7;
/// Samplings that span the trade-off: the time between two checks of a frame (epoch /
/// fraction) from 0.4 s to 25.6 s, and the time a check waits for an access (the epoch).
const DEFAULT_SAMPLINGS: [(u64, &str); 5] = [
    (200, "1/128"),
    (200, "1/32"),
    (200, "1/8"),
    (50, "1/32"),
    (50, "1/8"),
];

/// One daemon's sampling.
#[derive(Clone, Debug)]
struct Sampling {
    epoch_ms: u64,
    /// As written (`1/8`), for the daemon and the tables.
    fraction: String,
    /// `--heat-recheck-fraction`, as written; the daemon's default if not given.
    recheck: Option<String>,
    /// `--heat-pool`: windows pool heat over neighbouring frames where they are alike.
    pool: bool,
}

impl Sampling {
    fn label(&self) -> String {
        let label = match &self.recheck {
            Some(recheck) => format!("{} ms, {}, recheck {recheck}", self.epoch_ms, self.fraction),
            None => format!("{} ms, {}", self.epoch_ms, self.fraction),
        };
        if self.pool {
            format!("{label}, pooled")
        } else {
            label
        }
    }

    fn daemon(&self) -> Result<Daemon> {
        let epoch = format!("{}ms", self.epoch_ms);
        // On demand: a window's cost is what is measured, against no profiling at all.
        let mut args = vec![
            "--heat-epoch",
            &epoch,
            "--heat-sample-fraction",
            &self.fraction,
            "--heat-profile",
            "on-demand",
        ];
        if let Some(recheck) = &self.recheck {
            args.extend(["--heat-recheck-fraction", recheck]);
        }
        if self.pool {
            args.push("--heat-pool");
        }
        Daemon::try_start(DaemonConfig::default().args(&args))
    }
}

/// Launches `scenario` on `daemon` and lets it run `WARM_UP` past its first operation;
/// returns its id.
fn launch(daemon: &Daemon, scenario: &Scenario) -> Result<String> {
    let (id, _) = hot_set::launch(daemon, scenario)?;
    thread::sleep(WARM_UP);
    Ok(id)
}

fn heat(daemon: &Daemon, id: &str, duration_ms: u64) -> Result<Value> {
    daemon.try_json(&["heat", id, "--duration", &format!("{duration_ms}ms")])
}

/// The recall of one fresh partition of `scenario` at each of `DURATIONS_MS`, its windows
/// opened at once.
fn recall_run(daemon: &Daemon, scenario: &Scenario, truth: &Truth) -> Result<Vec<f64>> {
    let id = launch(daemon, scenario)?;
    let heats: Vec<Result<Value>> = thread::scope(|s| {
        let windows: Vec<_> = DURATIONS_MS
            .iter()
            .map(|&ms| {
                let id = &id;
                s.spawn(move || heat(daemon, id, ms))
            })
            .collect();
        windows
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| bail!("a heat call panicked")))
            .collect()
    });
    let stopped = daemon.try_json(&["stop", &id]);
    let recalls = heats
        .into_iter()
        .map(|heat| truth.recall(&heat?))
        .collect::<Result<Vec<_>>>()?;
    stopped?;
    Ok(recalls)
}

/// Operations per second of partition `id` over `SAMPLE`, from the midpoints of two status
/// calls.
fn ops_rate(daemon: &Daemon, id: &str) -> Result<f64> {
    let at = |daemon: &Daemon| -> Result<(Instant, u64)> {
        let before = Instant::now();
        let ops = ops(daemon, id)?;
        Ok((before + before.elapsed() / 2, ops))
    };
    let (t0, ops0) = at(daemon)?;
    thread::sleep(SAMPLE);
    let (t1, ops1) = at(daemon)?;
    Ok((ops1 - ops0) as f64 / (t1 - t0).as_secs_f64())
}

/// What one configuration cost the flat-out guest.
struct Slowdown {
    off: Vec<f64>,
    on: Vec<f64>,
    /// on / off, pair by pair.
    ratios: Vec<f64>,
    recall: Vec<f64>,
}

fn slowdown(sampling: &Sampling, pairs: usize, truth: &Truth) -> Result<Slowdown> {
    let daemon = sampling.daemon()?;
    let id = launch(&daemon, &FLAT_OUT)?;
    let mut result = Slowdown {
        off: Vec::new(),
        on: Vec::new(),
        ratios: Vec::new(),
        recall: Vec::new(),
    };
    // The window spans the sample with room for the call's start and its first epoch.
    let window_ms = (SAMPLE + Duration::from_secs(1)).as_millis() as u64;
    for pair in 0..pairs {
        let (mut off, mut on) = (0.0, 0.0);
        for sampled in [pair % 2 == 1, pair % 2 == 0] {
            if !sampled {
                off = ops_rate(&daemon, &id)?;
                continue;
            }
            let (rate, heat) = thread::scope(|s| {
                let window = s.spawn(|| heat(&daemon, &id, window_ms));
                thread::sleep(Duration::from_millis(500));
                let rate = ops_rate(&daemon, &id);
                let heat = window
                    .join()
                    .unwrap_or_else(|_| bail!("the heat call panicked"));
                (rate, heat)
            });
            on = rate?;
            result.recall.push(truth.recall(&heat?)?);
        }
        eprintln!(
            "bench: slowdown {} pair {pair}: off {off:.0} ops/s, on {on:.0} ops/s",
            sampling.label()
        );
        result.off.push(off);
        result.on.push(on);
        result.ratios.push(on / off);
    }
    daemon.try_json(&["stop", &id])?;
    Ok(result)
}

struct Options {
    runs: usize,
    only: Vec<String>,
    samplings: Vec<Sampling>,
    pairs: usize,
    recall: bool,
    slowdown: bool,
}

const USAGE: &str = "usage: cargo xtask bench heat [RUNS] [--only SUBSTRING]... \
                     [--samplings MS:F[:R[:pool]],...] [--pairs N] [--no-recall] [--no-slowdown]";

/// `200:1/8`, `200:1/8:1/32` or `200:1/8:0:pool` as a sampling.
fn sampling(text: &str) -> Result<Sampling> {
    let mut parts = text.split(':');
    let (Some(epoch), Some(fraction), recheck, pool, None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        bail!("a sampling is EPOCH_MS:FRACTION[:RECHECK[:pool]], got {text}\n{USAGE}");
    };
    ensure!(
        matches!(pool, None | Some("pool")),
        "a sampling's fourth part can only be `pool`, got {text}\n{USAGE}"
    );
    Ok(Sampling {
        epoch_ms: epoch
            .parse()
            .with_context(|| format!("not milliseconds: {epoch}\n{USAGE}"))?,
        fraction: fraction.to_string(),
        recheck: recheck.map(str::to_string),
        pool: pool.is_some(),
    })
}

fn options(args: &[String]) -> Result<Options> {
    let (mut runs, mut pairs) = (DEFAULT_RUNS, DEFAULT_PAIRS);
    let mut only = Vec::new();
    let mut samplings: Vec<Sampling> = DEFAULT_SAMPLINGS
        .iter()
        .map(|&(epoch_ms, fraction)| Sampling {
            epoch_ms,
            fraction: fraction.to_string(),
            recheck: None,
            pool: false,
        })
        .collect();
    let (mut recall, mut slowdown) = (true, true);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--only" => only.push(value()?.to_lowercase()),
            "--samplings" => {
                samplings = value()?.split(',').map(sampling).collect::<Result<_>>()?
            }
            "--pairs" => pairs = value()?.parse().context("--pairs takes a number")?,
            "--no-recall" => recall = false,
            "--no-slowdown" => slowdown = false,
            number => {
                runs = number
                    .parse()
                    .with_context(|| format!("not a number of runs: {number}\n{USAGE}"))?
            }
        }
    }
    ensure!(runs > 0 && pairs > 0, "RUNS and --pairs must be at least 1");
    ensure!(!samplings.is_empty(), "--samplings needs at least one");
    Ok(Options {
        runs,
        only,
        samplings,
        pairs,
        recall,
        slowdown,
    })
}

/// Every recall of one scenario under one sampling, by duration.
struct Recalls {
    by_duration: Vec<Vec<f64>>,
}

fn percent(spread: Option<Spread>) -> String {
    show(
        spread.map(|s| Spread {
            median: s.median * 100.0,
            min: s.min * 100.0,
            max: s.max * 100.0,
        }),
        0,
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = options(&args)?;
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| picked(s.name, &options.only))
        .collect();
    if options.recall && scenarios.is_empty() {
        bail!("no scenario matches --only {:?}", options.only);
    }
    let truths = scenarios
        .iter()
        .map(|s| Truth::of(s))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    println!("### heat fidelity\n");
    println!(
        "Reproduce: `{}` (as root).\n",
        reproduce("cargo xtask bench heat", &args)
    );
    if let Some(commit) = commit() {
        println!("Built from commit {commit}.\n");
    }

    if options.recall {
        let mut recalls: Vec<Vec<Recalls>> = options
            .samplings
            .iter()
            .map(|_| {
                scenarios
                    .iter()
                    .map(|_| Recalls {
                        by_duration: vec![Vec::new(); DURATIONS_MS.len()],
                    })
                    .collect()
            })
            .collect();
        for run in 0..options.runs {
            // The configurations in turn, the first one rotating run by run.
            let n = options.samplings.len();
            for k in 0..n {
                let c = (k + run) % n;
                let sampling = &options.samplings[c];
                let daemon = sampling.daemon()?;
                for (s, scenario) in scenarios.iter().enumerate() {
                    match recall_run(&daemon, scenario, &truths[s]) {
                        Ok(values) => {
                            eprintln!(
                                "bench: {} / {} / run {run}: recall {:?}",
                                scenario.name,
                                sampling.label(),
                                values
                                    .iter()
                                    .map(|r| (r * 1000.0).round() / 10.0)
                                    .collect::<Vec<_>>()
                            );
                            for (d, r) in values.into_iter().enumerate() {
                                recalls[c][s].by_duration[d].push(r);
                            }
                        }
                        Err(e) => eprintln!(
                            "bench: {} / {} / run {run}: failed: {e:#}",
                            scenario.name,
                            sampling.label()
                        ),
                    }
                }
            }
        }
        println!("#### recall\n");
        println!(
            "Each run launches a fresh {} MiB, 1-vCPU partition per scenario and, 1 s after its first operation, opens windows of {} at once on its (cold) shared profiler. The true hot set: the smallest set of data pages taking {:.0}% of the intended accesses (`workloads::popularity`), with every page as popular as its least popular member; recall: its share among the top {SLACK}×|hot| data pages by heat, ties in random order. Percent, `median (min–max)` over {}.\n",
            MEM >> 20,
            DURATIONS_MS
                .iter()
                .map(|ms| format!("{} s", *ms as f64 / 1000.0))
                .collect::<Vec<_>>()
                .join(", "),
            HOT_SHARE * 100.0,
            plural(options.runs, "run"),
        );
        print!("| scenario | hot of data pages (random order's recall) | epoch, fraction |");
        for ms in DURATIONS_MS {
            print!(" {} s |", ms as f64 / 1000.0);
        }
        println!();
        println!("|---|---|---|{}", "---|".repeat(DURATIONS_MS.len()));
        for (s, scenario) in scenarios.iter().enumerate() {
            for (c, sampling) in options.samplings.iter().enumerate() {
                let data = truths[s].data.end - truths[s].data.start;
                print!(
                    "| {} | {} of {data} ({:.0}) | {} |",
                    scenario.name,
                    truths[s].hot.len(),
                    (SLACK * truths[s].hot.len() as f64 / data as f64 * 100.0).min(100.0),
                    sampling.label()
                );
                for values in &recalls[c][s].by_duration {
                    print!(" {} |", percent(Spread::of(values.clone())));
                }
                println!();
            }
        }
        println!();
        let at_goal = DURATIONS_MS
            .iter()
            .position(|&ms| ms == GOAL_WITHIN_MS)
            .context("the goal's duration is measured")?;
        for (c, sampling) in options.samplings.iter().enumerate() {
            let met: Vec<&str> = scenarios
                .iter()
                .enumerate()
                .filter(|(s, _)| median(recalls[c][*s].by_duration[at_goal].clone()) >= GOAL_RECALL)
                .map(|(_, scenario)| scenario.name)
                .collect();
            println!(
                "{}: median recall ≥ {:.0}% at {} s in {} of {} scenarios{}.  ",
                sampling.label(),
                GOAL_RECALL * 100.0,
                GOAL_WITHIN_MS / 1000,
                met.len(),
                scenarios.len(),
                if met.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", met.join(", "))
                }
            );
        }
        println!();
    }

    if options.slowdown {
        let truth = Truth::of(&FLAT_OUT)?;
        println!("#### slowdown\n");
        println!(
            "`{}` `{}`, {} MiB, 1 vCPU: operations per second over {} s with no window open (off) and inside a `migrator heat` window (on), {}, the order swapped every pair; `median (min–max)`. The recall is that of the on windows' heat ({} s), against the same hot-set definition.\n",
            FLAT_OUT.workload,
            FLAT_OUT.args,
            MEM >> 20,
            SAMPLE.as_secs(),
            plural(options.pairs, "pair"),
            (SAMPLE + Duration::from_secs(1)).as_secs(),
        );
        println!(
            "| epoch, fraction | off, Mops/s | on, Mops/s | on / off, paired | slowdown ≤ {:.0}% | recall, % |",
            GOAL_SLOWDOWN * 100.0
        );
        println!("|---|---|---|---|---|---|");
        for sampling in &options.samplings {
            match slowdown(sampling, options.pairs, &truth) {
                Ok(result) => {
                    let scale = |v: &[f64]| v.iter().map(|x| x / 1e6).collect::<Vec<_>>();
                    let ratio = Spread::of(result.ratios.clone());
                    println!(
                        "| {} | {} | {} | {} | {} | {} |",
                        sampling.label(),
                        show(Spread::of(scale(&result.off)), 2),
                        show(Spread::of(scale(&result.on)), 2),
                        show(ratio, 3),
                        if ratio.is_some_and(|r| r.median >= 1.0 - GOAL_SLOWDOWN) {
                            "yes"
                        } else {
                            "no"
                        },
                        percent(Spread::of(result.recall)),
                    );
                }
                Err(e) => println!("| {} | failed: {e:#} | | | | |", sampling.label()),
            }
        }
        println!();
    }
    println!(
        "The bench took {:.1} min.",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
