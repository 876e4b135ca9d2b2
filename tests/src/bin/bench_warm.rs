//! `cargo xtask bench warm [RUNS] [--only SUBSTRING]... [--at SECONDS,...] [--pairs N]
//! [--no-recall] [--no-cost]`: warm heat at the default budget (`serve --heat-profile warm`,
//! `--heat-budget 1%`), as a migration would plan from it.
//!
//! Recall against time: for each run and scenario (the heat bench's guests and a hot set that
//! moves every 20 s, `hot_set`), a
//! fresh 256 MiB, 1-vCPU partition on a daemon that keeps heat warm at the default budget, and at each
//! checkpoint after its first operation (`--at`, 5, 10, 20, 30 and 60 s by default),
//! `migrator heat ID --warm --json`: the recall of the warm heat then (`hot_set::Truth`), and
//! the share of the guest's time its window's sampling cost as the budget counts it. A hot set
//! that moves is scored against where it is when the heat is read.
//!
//! Cost: the flat-out guest (`hot_set::FLAT_OUT`) on a daemon that keeps heat warm against
//! the same guest on one that profiles on demand and is never asked, so profiles nothing.
//! Each pair launches a fresh partition on either daemon, one after the other (the first
//! alternates), lets it run `SETTLE` and counts its operations over `SAMPLE`; warm / on
//! demand of each pair, and their median and range, is what the guest keeps.
//!
//! Prints Markdown for docs/BENCHMARKS.md.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use heatprobe_tests::{
    bench::{Spread, commit, picked, plural, reproduce, show},
    daemon::{Daemon, DaemonConfig},
    hot_set::{FLAT_OUT, MOVING, SCENARIOS, SLACK, Scenario, Truth, launch, ops},
};

const DEFAULT_RUNS: usize = 3;
const DEFAULT_PAIRS: usize = 5;
const DEFAULT_AT_S: [u64; 5] = [5, 10, 20, 30, 60];
/// How long a cost sample's guest runs before its operations are counted: past its start,
/// and long enough for warm sampling to have reached its steady pace.
const SETTLE: Duration = Duration::from_secs(10);
/// The span over which a cost sample counts operations.
const SAMPLE: Duration = Duration::from_secs(10);
/// The goals: recall after 60 s, and the operations a profiled guest keeps.
const GOAL_RECALL: f64 = 0.95;
const GOAL_KEPT: f64 = 0.99;

const USAGE: &str = "usage: cargo xtask bench warm [RUNS] [--only SUBSTRING]... \
                     [--at SECONDS,...] [--pairs N] [--no-recall] [--no-cost]";

struct Options {
    runs: usize,
    only: Vec<String>,
    at: Vec<u64>,
    pairs: usize,
    recall: bool,
    cost: bool,
}

fn options(args: &[String]) -> Result<Options> {
    let mut options = Options {
        runs: DEFAULT_RUNS,
        only: Vec::new(),
        at: DEFAULT_AT_S.to_vec(),
        pairs: DEFAULT_PAIRS,
        recall: true,
        cost: true,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--only" => options.only.push(value()?.to_lowercase()),
            "--at" => {
                options.at = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("--at takes seconds, as 5,10,60\n{USAGE}"))?;
                options.at.sort_unstable();
            }
            "--pairs" => options.pairs = value()?.parse().context("--pairs takes a number")?,
            "--no-recall" => options.recall = false,
            "--no-cost" => options.cost = false,
            number => {
                options.runs = number
                    .parse()
                    .with_context(|| format!("not a number of runs: {number}\n{USAGE}"))?
            }
        }
    }
    ensure!(
        options.runs > 0 && options.pairs > 0 && !options.at.is_empty(),
        "RUNS, --pairs and --at need at least one\n{USAGE}"
    );
    Ok(options)
}

/// One checkpoint: the warm heat's recall, its window's share of the guest's time, the share
/// of its budget the sampler spends now, and how far its last two sweeps' cores agreed, which
/// set that (`heatprobe::pace`; NaN before the third sweep).
struct Point {
    recall: f64,
    spent_share: f64,
    pace: f64,
    agreement: f64,
}

/// The warm heat of one fresh partition of `scenario` at each checkpoint.
fn recall_run(daemon: &Daemon, scenario: &Scenario, at: &[u64]) -> Result<Vec<Point>> {
    let (id, started) = launch(daemon, scenario)?;
    let points = (|| {
        let mut points = Vec::new();
        for &seconds in at {
            thread::sleep(
                (started + Duration::from_secs(seconds)).saturating_duration_since(Instant::now()),
            );
            let heat = daemon.try_json(&["heat", &id, "--warm"])?;
            // Where the hot set is now (it moves in the `MOVING` scenario only).
            let truth = Truth::after_ops(scenario, ops(daemon, &id)?)?;
            points.push(Point {
                recall: truth.recall(&heat)?,
                spent_share: heat["spent"]["share"].as_f64().unwrap_or(f64::NAN),
                pace: heat["spent"]["pace"].as_f64().unwrap_or(f64::NAN),
                agreement: heat["spent"]["sweep_agreement"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            });
        }
        Ok(points)
    })();
    daemon.try_json(&["stop", &id])?;
    points
}

/// The flat-out guest's operations per second on `daemon`: a fresh partition, `SETTLE`, then
/// counted over `SAMPLE` from the midpoints of two status calls.
fn ops_rate(daemon: &Daemon) -> Result<f64> {
    let (id, _) = launch(daemon, &FLAT_OUT)?;
    let rate = (|| {
        thread::sleep(SETTLE);
        let at = || -> Result<(Instant, u64)> {
            let before = Instant::now();
            let ops = ops(daemon, &id)?;
            Ok((before + before.elapsed() / 2, ops))
        };
        let (t0, ops0) = at()?;
        thread::sleep(SAMPLE);
        let (t1, ops1) = at()?;
        Ok((ops1 - ops0) as f64 / (t1 - t0).as_secs_f64())
    })();
    daemon.try_json(&["stop", &id])?;
    rate
}

fn percent(values: &[f64]) -> String {
    show(Spread::of(values.iter().map(|v| v * 100.0).collect()), 1)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = options(&args)?;
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .chain([&MOVING])
        .filter(|s| picked(s.name, &options.only))
        .collect();
    if scenarios.is_empty() && options.recall {
        bail!("no scenario matches --only\n{USAGE}");
    }
    println!(
        "`{}` at {}, {}.\n",
        reproduce("cargo xtask bench warm", &args),
        commit().unwrap_or_else(|| "an unknown commit".into()),
        plural(options.runs, "run")
    );
    if options.recall {
        let daemon = Daemon::try_start(DaemonConfig::default().args(&["--heat-profile", "warm"]))?;
        // points[scenario][run][checkpoint]
        let mut points: Vec<Vec<Vec<Point>>> = scenarios.iter().map(|_| Vec::new()).collect();
        for run in 0..options.runs {
            for (n, scenario) in scenarios.iter().enumerate() {
                let run_points = recall_run(&daemon, scenario, &options.at)?;
                eprintln!(
                    "bench: warm {} run {run}: recall {:?}, pace {:?}, sweeps' cores agree {:?}",
                    scenario.name,
                    run_points
                        .iter()
                        .map(|p| (p.recall * 1000.0).round() / 10.0)
                        .collect::<Vec<_>>(),
                    run_points.iter().map(|p| p.pace).collect::<Vec<_>>(),
                    run_points
                        .iter()
                        .map(|p| (p.agreement * 100.0).round() / 100.0)
                        .collect::<Vec<_>>()
                );
                points[n].push(run_points);
            }
        }
        println!(
            "Recall of the warm heat (the hot set's share of the top {SLACK}×|hot| data pages by heat), percent, median (min–max), by time since the guest's first operation; and the share of the guest's time the heat's window cost, as the budget counts it, the share of its budget the sampler spent then (its pace: less than 100 once its sweeps agree), and how far the cores of its last two sweeps agreed (Jaccard index, percent; `heatprobe::pace`), at the last checkpoint (goal: recall ≥ {:.0}% at 60 s, within a 1% budget).\n",
            GOAL_RECALL * 100.0
        );
        let header: Vec<String> = options.at.iter().map(|s| format!("{s} s")).collect();
        println!(
            "| scenario | {} | spent (% of guest time) | pace (% of budget) | cores agree (%) |",
            header.join(" | ")
        );
        println!("|---|{}---|---|---|", "---|".repeat(options.at.len()));
        for (n, scenario) in scenarios.iter().enumerate() {
            let cells: Vec<String> = (0..options.at.len())
                .map(|k| {
                    percent(
                        &points[n]
                            .iter()
                            .map(|run| run[k].recall)
                            .collect::<Vec<_>>(),
                    )
                })
                .collect();
            let last = options.at.len() - 1;
            let spent: Vec<f64> = points[n].iter().map(|run| run[last].spent_share).collect();
            let pace: Vec<f64> = points[n].iter().map(|run| run[last].pace).collect();
            // NaN before a third sweep: left out, and `–` if no run has one.
            let agree: Vec<f64> = points[n]
                .iter()
                .map(|run| run[last].agreement)
                .filter(|a| a.is_finite())
                .collect();
            println!(
                "| {} | {} | {} | {} | {} |",
                scenario.name,
                cells.join(" | "),
                percent(&spent),
                percent(&pace),
                percent(&agree)
            );
        }
        println!();
    }
    if options.cost {
        let warm = Daemon::try_start(DaemonConfig::default().args(&["--heat-profile", "warm"]))?;
        let on_demand =
            Daemon::try_start(DaemonConfig::default().args(&["--heat-profile", "on-demand"]))?;
        let (mut kept, mut rates) = (Vec::new(), Vec::new());
        for pair in 0..options.pairs {
            let (w, d) = if pair % 2 == 0 {
                let w = ops_rate(&warm)?;
                (w, ops_rate(&on_demand)?)
            } else {
                let d = ops_rate(&on_demand)?;
                (ops_rate(&warm)?, d)
            };
            eprintln!("bench: warm cost pair {pair}: warm {w:.0} ops/s, on demand {d:.0} ops/s");
            kept.push(w / d);
            rates.push((w, d));
        }
        println!(
            "What warm heat costs the flat-out guest ({}): operations per second over {} s after {} s of running, a fresh partition on a warm daemon and on one that profiles on demand (never asked), {}, alternated (goal: ≥ {:.0}% kept).\n",
            FLAT_OUT.name,
            SAMPLE.as_secs(),
            SETTLE.as_secs(),
            plural(options.pairs, "pair"),
            GOAL_KEPT * 100.0
        );
        println!("| warm ops/s | on demand ops/s | kept (warm / on demand, %) |");
        println!("|---|---|---|");
        println!(
            "| {} | {} | {} |",
            show(Spread::of(rates.iter().map(|r| r.0).collect()), 0),
            show(Spread::of(rates.iter().map(|r| r.1).collect()), 0),
            percent(&kept)
        );
    }
    Ok(())
}
