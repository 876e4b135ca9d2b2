//! `cargo xtask bench oracle [RUNS] [--mode precopy|hybrid] [--warm DURATION]
//! [--stagger DURATION] [--seed N] [--heat-profile warm|on-demand] [--only SUBSTRING]...
//! [--variant ARG]... [--save DIR]`: heat
//! against address order and against the best any order could do, on the matrix's shaped
//! link.
//!
//! The oracle is each workload's intended page popularity (`workloads::popularity`, the ground
//! truth the heat bench scores recall against), written as a heat file and given to
//! `migrate --heat-file`: what a perfect profile, at no cost to the guest, would order by.
//! Two network namespaces joined by a veth pair shaped with `tc tbf` to 1 Gbit/s, daemons
//! with mutual TLS, keeping heat warm (`serve --heat-profile warm`; `--heat-profile
//! on-demand` for a migration's own burst profile instead); each run migrates a fresh
//! 512 MiB, 1-vCPU partition `--warm` (20 s) after its first operation, with `--strategy S --mode M` (`--downtime-limit` 300 ms in pre-copy, 100 ms in
//! hybrid). Runs are interleaved, `for run { for scenario { heat, address, oracle } }`, the
//! order rotated every run.
//!
//! The scenario whose hot set moves (`hotspot moving`) has no oracle: its heat file would be
//! written before the launch, and the hot set moves on before the migration.
//!
//! Per scenario it prints `median (min–max)` of pages re-sent, demands, blocktime, downtime
//! and guest work lost for each order; heat/address and oracle/address of the medians; and
//! heat's share of the oracle's saving, `(address − heat) / (address − oracle)`, where the
//! oracle saves at least a tenth of address's figure.
//!
//! `--variant ARG` (repeatable, the arguments of one variant) adds a fourth order, heat with
//! those `migrate` arguments too, interleaved with the others, and a second table of it
//! against heat: what one mechanism does, in the same runs (`--variant --no-defer`).
//!
//! `--save DIR` writes each run's whole report there, as `SCENARIO-ORDER-RUN.json`.
//!
//! Each migration starts `--warm` plus a share of `--stagger` (10 s) after the guest's first
//! operation. The shares are stratified: the runs of one order on one scenario take one each
//! of `RUNS` equal slices of the stagger, at a point in it drawn from `--seed` (printed with
//! the command), so no order's runs bunch up at one start, as three independent draws did
//! once (heat's three at 23.9-24.7 s). A guest with a periodic phase, such as kv-zipf's full
//! self-check (half a second without an operation every 6.5 s), otherwise meets the same
//! phase at every run of one order: with a fixed start, heat's pre-copy ended each run just
//! before the self-check, which landed in the 2 s after the resume and billed heat 0.6-0.8 s
//! that address order's runs, ending a second later, never paid. A start spread over more
//! than the period gives each order the phases alike.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use heatprobe_tests::{
    bench::{
        Spread, commit, known_popularity, launch_and_migrate, picked, plural, reproduce,
        shaped_hosts, show,
    },
    daemon::Daemon,
};
use migrator_guest::rng::SplitMix64;
use serde_json::{Value, json};

const RATE: &str = "1gbit";
const MEM: u64 = 512 << 20;
const DEFAULT_RUNS: usize = 3;
/// How long each partition runs before it migrates, every order alike (`--warm`): long enough
/// for the daemon's warm heat to have swept the guest's memory at its default budget, as a
/// guest that has run for a while has. `--warm 1s` is a migration right after the launch.
const DEFAULT_WARM: Duration = Duration::from_secs(20);
/// The span each migration's start is spread over, past `--warm` (`--stagger`): longer than
/// the periodic phases of the bench's guests (kv-zipf's self-check comes every 6.5 s).
const DEFAULT_STAGGER: Duration = Duration::from_secs(10);
const ORDERS: [&str; 4] = ["heat", "address", "oracle", "variant"];

/// A workload whose popularity the guest crate knows, in the matrix's arguments.
struct Scenario {
    name: &'static str,
    workload: &'static str,
    args: &'static str,
}

const SCENARIOS: [Scenario; 9] = [
    Scenario {
        name: "kv-zipf paced, in place",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 rate=500000",
    },
    Scenario {
        name: "kv-zipf paced, scattered",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 rate=500000 scramble=1",
    },
    Scenario {
        name: "kv-zipf flat out, in place",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2",
    },
    Scenario {
        name: "kv-zipf flat out, scattered",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 scramble=1",
    },
    Scenario {
        name: "hotspot, in place",
        workload: "hotspot",
        args: "rate=200000",
    },
    Scenario {
        name: "hotspot, scattered",
        workload: "hotspot",
        args: "rate=200000 scatter=1",
    },
    Scenario {
        name: "graded, in place",
        workload: "graded",
        args: "rate=200000",
    },
    Scenario {
        name: "graded, scattered",
        workload: "graded",
        args: "rate=200000 scatter=1",
    },
    // Its hot region moves on every 20 s, so no heat file written before the launch knows
    // where it is at the migration: heat and address order only.
    Scenario {
        name: "hotspot moving, scattered",
        workload: "hotspot",
        args: "rate=200000 scatter=1 move_every=4000000",
    },
];

/// Whether the oracle can be written before the launch: not for a hot set that moves.
fn has_oracle(scenario: &Scenario) -> bool {
    !scenario.args.contains("move_every")
}

/// The figures compared, with their report pointers and decimals.
const FIGURES: [(&str, &str, usize); 9] = [
    ("pages re-sent", "/pages_resent", 0),
    ("demands", "/postcopy_requests", 0),
    ("blocktime ms", "/postcopy_blocktime_ms", 1),
    ("downtime ms", "/downtime_ms", 0),
    ("guest work lost ms", "/guest_work_lost/total_ms", 0),
    // Its parts that differ between orders: the heat's cost, the rounds, pre-copy's throttle,
    // the time after (the downtime is its row above).
    ("… of it, heat ms", "/guest_work_lost/warm_heat_ms", 0),
    ("… of it, rounds ms", "/guest_work_lost/rounds_ms", 0),
    ("… of it, throttle ms", "/guest_work_lost/throttle_ms", 0),
    ("… of it, after ms", "/guest_work_lost/after_ms", 0),
];

/// A report's guest work lost by part, for the log.
fn parts(report: &Value) -> String {
    let lost = &report["guest_work_lost"];
    [
        "warm_heat_ms",
        "profile_ms",
        "rounds_ms",
        "throttle_ms",
        "after_ms",
    ]
    .iter()
    .map(|k| {
        let name = k.trim_end_matches("_ms");
        match lost[*k].as_f64() {
            Some(ms) => format!("{name} {ms:.0}"),
            None => format!("{name} –"),
        }
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// Writes the oracle's heat file for `scenario`: every page of the workload's share with
/// its intended weight as heat, written to where the workload writes.
fn oracle_file(scenario: &Scenario) -> Result<std::path::PathBuf> {
    let (first, model) = known_popularity(scenario.workload, scenario.args, MEM)?;
    let pages: Vec<Value> = (0..model.pages())
        .map(|p| (p, model.weight(p)))
        .filter(|(_, weight)| *weight > 0.0)
        .map(|(p, weight)| {
            json!({
                "page": first + p as u64,
                "heat": weight * 1e6,
                // Every workload here writes where it reads, in proportion.
                "reads": 1,
                "writes": 1,
            })
        })
        .collect();
    let path = std::env::temp_dir().join(format!(
        "bench-oracle-{}-{}.json",
        std::process::id(),
        scenario.name.replace([' ', ','], "-")
    ));
    std::fs::write(&path, serde_json::to_vec(&json!({ "pages": pages }))?)?;
    Ok(path)
}

/// Migrates one fresh partition of `scenario` in `order`; the report, with the guest's
/// errors on the destination.
#[allow(clippy::too_many_arguments)]
fn one(
    a: &Daemon,
    b: &Daemon,
    scenario: &Scenario,
    order: &str,
    mode: &str,
    oracle: &str,
    warm: Duration,
    variant: &[String],
) -> Result<Value> {
    let limit = if mode == "hybrid" { "100ms" } else { "300ms" };
    let mut options = vec!["--mode", mode, "--downtime-limit", limit];
    match order {
        "oracle" => options.extend(["--strategy", "heat", "--heat-file", oracle]),
        "variant" => {
            options.extend(["--strategy", "heat"]);
            options.extend(variant.iter().map(String::as_str));
        }
        strategy => options.extend(["--strategy", strategy]),
    }
    launch_and_migrate(
        a,
        b,
        (scenario.workload, scenario.args, "512M"),
        warm,
        &options,
    )
}

fn values(reports: &[Value], pointer: &str) -> Vec<f64> {
    reports
        .iter()
        .filter(|r| r["status"] == "completed")
        .filter_map(|r| r.pointer(pointer).and_then(Value::as_f64))
        .collect()
}

/// `a / b` of two medians, or `–`.
fn ratio(a: Option<Spread>, b: Option<Spread>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}x", a.median / b.median),
        _ => "–".into(),
    }
}

/// The least saving over address, as a share of address's figure, for which heat's share
/// of it is shown: below it the share divides noise by noise.
const LEAST_SAVING: f64 = 0.1;

/// Heat's share of the oracle's saving over address, or `–` where the oracle saves less than
/// [`LEAST_SAVING`] of address's figure.
fn share(heat: Option<Spread>, address: Option<Spread>, oracle: Option<Spread>) -> String {
    match (heat, address, oracle) {
        (Some(h), Some(a), Some(o))
            if a.median - o.median > 0.0 && a.median - o.median >= LEAST_SAVING * a.median =>
        {
            format!(
                "{:.0}%",
                (a.median - h.median) / (a.median - o.median) * 100.0
            )
        }
        _ => "–".into(),
    }
}

/// The duration after option `flag`, or why there is none.
fn duration_value(text: Option<&String>, flag: &str) -> Result<Duration> {
    let text = text.with_context(|| format!("{flag} needs a duration"))?;
    humantime::parse_duration(text).with_context(|| format!("`{text}` is not a duration"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = DEFAULT_RUNS;
    let mut mode = "precopy".to_string();
    let mut only: Vec<String> = Vec::new();
    let mut warm = DEFAULT_WARM;
    let mut stagger = DEFAULT_STAGGER;
    let mut seed: Option<u64> = None;
    let mut heat_profile = "warm".to_string();
    let mut variant: Vec<String> = Vec::new();
    let mut save: Option<std::path::PathBuf> = None;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--mode" => mode = words.next().context("--mode needs a value")?.clone(),
            "--only" => only.push(words.next().context("--only needs a value")?.to_lowercase()),
            "--variant" => variant.push(words.next().context("--variant needs a value")?.clone()),
            "--save" => save = Some(words.next().context("--save needs a directory")?.into()),
            "--heat-profile" => {
                heat_profile = words
                    .next()
                    .context("--heat-profile needs warm or on-demand")?
                    .clone()
            }
            "--warm" => warm = duration_value(words.next(), "--warm")?,
            "--stagger" => stagger = duration_value(words.next(), "--stagger")?,
            "--seed" => {
                let text = words.next().context("--seed needs a number")?;
                seed = Some(
                    text.parse()
                        .with_context(|| format!("`{text}` is not a seed"))?,
                );
            }
            n => {
                runs = n
                    .parse()
                    .with_context(|| format!("`{n}` is not a number of runs"))?
            }
        }
    }
    if mode != "precopy" && mode != "hybrid" {
        bail!("--mode is precopy or hybrid");
    }
    let scenarios: Vec<&Scenario> = SCENARIOS.iter().filter(|s| picked(s.name, &only)).collect();
    // No file for a hot set that moves: it has no oracle.
    let files = scenarios
        .iter()
        .map(|s| match has_oracle(s) {
            true => oracle_file(s).map(|p| p.to_string_lossy().into_owned()),
            false => Ok(String::new()),
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(dir) = &save {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Without `--seed`, one from the clock; printed with the command either way.
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos() as u64)
    });
    let mut draws = SplitMix64::new(seed);
    // Per scenario and order, where in its slice of the stagger each run starts.
    let slice_points: Vec<Vec<f64>> = scenarios
        .iter()
        .map(|_| ORDERS.iter().map(|_| draws.unit()).collect())
        .collect();
    let (_hosts, a, b) = shaped_hosts(RATE, &["--heat-profile", &heat_profile])?;
    let mut reports: Vec<[Vec<Value>; 4]> = scenarios.iter().map(|_| Default::default()).collect();
    for run in 0..runs {
        for (n, scenario) in scenarios.iter().enumerate() {
            for k in 0..ORDERS.len() {
                let slot = (k + run) % ORDERS.len();
                let order = ORDERS[slot];
                if (order == "oracle" && !has_oracle(scenario))
                    || (order == "variant" && variant.is_empty())
                {
                    continue;
                }
                let started = Instant::now();
                let share = (run as f64 + slice_points[n][slot]) / runs as f64;
                let settle = warm + stagger.mul_f64(share);
                let report = one(&a, &b, scenario, order, &mode, &files[n], settle, &variant)
                    .unwrap_or_else(|e| json!({ "status": "error", "error": format!("{e:#}") }));
                eprintln!(
                    "bench: {} / {order} / {mode} / run {run}: migrated {:.1} s after its first operation, {} in {:.0} s, re-sent {}, demands {}, blocktime {} ms, downtime {} ms, work lost {} ms ({}), dirty per round {}, cut over: {}{}",
                    scenario.name,
                    settle.as_secs_f64(),
                    report["status"].as_str().unwrap_or("?"),
                    started.elapsed().as_secs_f64(),
                    report["pages_resent"],
                    report["postcopy_requests"],
                    report["postcopy_blocktime_ms"],
                    report["downtime_ms"],
                    report
                        .pointer("/guest_work_lost/total_ms")
                        .unwrap_or(&Value::Null),
                    parts(&report),
                    report["dirty_pages_per_round"],
                    report["cutover_reason"],
                    report["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default(),
                );
                if let Some(dir) = &save {
                    let name = format!(
                        "{}-{order}-{run}.json",
                        scenario.name.replace([' ', ','], "-")
                    );
                    std::fs::write(dir.join(name), serde_json::to_vec_pretty(&report)?)?;
                }
                reports[n][slot].push(report);
            }
        }
    }
    for file in files.iter().filter(|f| !f.is_empty()) {
        let _ = std::fs::remove_file(file);
    }
    // The seed goes into the command unless it was there already.
    let mut shown = args.clone();
    if !args.iter().any(|a| a == "--seed") {
        shown.extend(["--seed".to_string(), seed.to_string()]);
    }
    println!(
        "`{}` at {}, {}, {mode}.\n",
        reproduce("cargo xtask bench oracle", &shown),
        commit().unwrap_or_else(|| "an unknown commit".into()),
        plural(runs, "run")
    );
    println!(
        "| scenario | figure | heat | address | oracle | heat / address | oracle / address | heat's share of the oracle's saving |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (n, scenario) in scenarios.iter().enumerate() {
        let [heat, address, oracle, _] = &reports[n];
        let done = |r: &[Value]| r.iter().filter(|r| r["status"] == "completed").count();
        for (name, pointer, decimals) in FIGURES {
            let [h, a, o] = [heat, address, oracle].map(|r| Spread::of(values(r, pointer)));
            println!(
                "| {} ({}/{}/{} completed) | {name} | {} | {} | {} | {} | {} | {} |",
                scenario.name,
                done(heat),
                done(address),
                done(oracle),
                show(h, decimals),
                show(a, decimals),
                show(o, decimals),
                ratio(h, a),
                ratio(o, a),
                share(h, a, o)
            );
        }
    }
    if !variant.is_empty() {
        let label = variant.join(" ");
        println!("\nThe variant, heat with `{label}`, against heat in the same runs:\n");
        println!("| scenario | figure | heat | heat `{label}` | variant / heat |");
        println!("|---|---|---|---|---|");
        for (n, scenario) in scenarios.iter().enumerate() {
            let [heat, _, _, with] = &reports[n];
            let done = |r: &[Value]| r.iter().filter(|r| r["status"] == "completed").count();
            for (name, pointer, decimals) in FIGURES {
                let [h, v] = [heat, with].map(|r| Spread::of(values(r, pointer)));
                println!(
                    "| {} ({}/{} completed) | {name} | {} | {} | {} |",
                    scenario.name,
                    done(heat),
                    done(with),
                    show(h, decimals),
                    show(v, decimals),
                    ratio(v, h)
                );
            }
        }
    }
    Ok(())
}
