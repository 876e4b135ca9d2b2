//! `cargo xtask bench migration [RUNS] [--only SUBSTRING]... [--mode precopy|hybrid] [--list]`:
//! heat against address order, every workload and layout, measured.
//! `cargo xtask bench migration loopback [RUNS]`: the page stream against a plain TCP copy.
//! `cargo xtask bench migration tls [RUNS]`: what mutual TLS costs the page stream.
//! `cargo xtask bench migration compress [RUNS]`: `--compress` on the shaped link, a
//! compressible guest against an incompressible one.
//! `cargo xtask bench migration charts`: the charts of docs/BENCHMARKS.md.
//!
//! The matrix: two hosts are two network namespaces joined by a veth pair whose both ends are
//! shaped with `tc tbf` to 1 Gbit/s, a daemon on each (mutual TLS, as daemons off loopback
//! must). For each run, each scenario (workload, arguments, layout) and each strategy, a fresh
//! 512 MiB, 1-vCPU partition is launched on host A, warmed up, and migrated to host B with
//! `--strategy S --mode precopy --downtime-limit 300ms` and every other option at its default
//! (`--mode hybrid` runs the whole matrix in hybrid mode instead). The runs are interleaved,
//! `for run { for scenario { heat, address } }` with the order of the two strategies swapped
//! every run, so slow drift of the machine hits both alike; RUNS defaults to 3. `--only`
//! keeps the scenarios whose name contains the substring (case-insensitive; repeatable, any
//! may match); `--list` prints the scenario names. A migration that fails is recorded as not
//! completed, its error printed to stderr, and the bench goes on.
//!
//! Per scenario and strategy it prints `median (min–max)` over the completed runs of every
//! figure, the counts over all runs, the heat/address ratios of the medians and the median
//! and spread of the per-run paired ratios (run i of heat with run i of address), then a
//! summary of the done-when conditions, PASS or FAIL. Report fields that this
//! `migrator` does not produce yet are shown as `–`. Prints Markdown for docs/BENCHMARKS.md.
//!
//! The loopback section (no limit, the page stream's round-0 rate against a plain TCP copy in
//! the same run) used to follow the matrix; it is its own subcommand now, so the matrix takes
//! no longer than it needs.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use heatprobe_tests::{
    bench::{Spread, commit, launch_and_migrate, median, pass, plural, reproduce, show},
    daemon::{Daemon, DaemonConfig, make_certs},
    netns::HostPair,
};
use serde_json::{Value, json};

const RATE: &str = "1gbit";
/// The downtime limit every pre-copy migration of the matrix is given.
const DOWNTIME_LIMIT: &str = "300ms";
/// The done-when bound on every pre-copy downtime: the limit plus 10%.
const DOWNTIME_BOUND_MS: f64 = 330.0;
/// The downtime limit every hybrid migration of the matrix is given, and its bound.
const HYBRID_DOWNTIME_LIMIT: &str = "100ms";
const HYBRID_DOWNTIME_BOUND_MS: f64 = 110.0;
/// The post-copy done-when bound on every run's p99 demand latency.
const DEMAND_P99_BOUND_US: f64 = 2000.0;
/// The workloads the hybrid matrix runs by default: the skewed ones, in both layouts.
const HYBRID_WORKLOADS: [&str; 3] = ["kv-zipf", "hotspot", "graded"];
const DEFAULT_RUNS: usize = 3;
const STRATEGIES: [&str; 2] = ["heat", "address"];

/// The two shaped hosts, with a daemon on each.
fn shaped_hosts() -> Result<(HostPair, Daemon, Daemon)> {
    heatprobe_tests::bench::shaped_hosts(RATE)
}

struct Scenario {
    name: &'static str,
    workload: &'static str,
    args: &'static str,
    /// Where the hot data sits: "in place" (at fixed addresses, the hottest first where the
    /// workload has a ranking), "scattered" (placed by a keyed permutation), or "uniform".
    layout: &'static str,
    mem: &'static str,
    /// The done-when bound on heat's re-sent pages as a multiple of address's.
    resent_bound: f64,
}

/// The matrix. kv-zipf's default `check_every` (its number of keys, about 3 M in 512 MiB)
/// keeps its full checks rare; hotspot and graded keep their default (one full check per as
/// many writes as data pages), as the reproduction ran them; rw-mix and uniform-write
/// would otherwise check every page once per 131072 operations, so the check would dominate;
/// scan's check is its sweep.
const SCENARIOS: [Scenario; 11] = [
    Scenario {
        name: "kv-zipf paced, in place",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 rate=500000",
        layout: "in place",
        mem: "512M",
        resent_bound: 0.6,
    },
    Scenario {
        name: "kv-zipf paced, scattered",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 rate=500000 scramble=1",
        layout: "scattered",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "kv-zipf flat out, in place",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2",
        layout: "in place",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "kv-zipf flat out, scattered",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 scramble=1",
        layout: "scattered",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "hotspot, in place",
        workload: "hotspot",
        args: "rate=200000",
        layout: "in place",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "hotspot, scattered",
        workload: "hotspot",
        args: "rate=200000 scatter=1",
        layout: "scattered",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "graded, in place",
        workload: "graded",
        args: "rate=200000",
        layout: "in place",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "graded, scattered",
        workload: "graded",
        args: "rate=200000 scatter=1",
        layout: "scattered",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "rw-mix",
        workload: "rw-mix",
        args: "check_every=2000000",
        layout: "in place",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "uniform-write",
        workload: "uniform-write",
        args: "rate=200000 check_every=2000000",
        layout: "uniform",
        mem: "512M",
        resent_bound: 1.0,
    },
    Scenario {
        name: "scan",
        workload: "scan",
        args: "",
        layout: "in place",
        mem: "512M",
        resent_bound: 1.0,
    },
];

/// The loopback and TLS sections' migration: 1 GiB of non-zero pages, barely written.
const SLOW_UNIFORM: Scenario = Scenario {
    name: "uniform-write, slow",
    workload: "uniform-write",
    args: "rate=1000 check_every=2000000",
    layout: "uniform",
    mem: "1G",
    resent_bound: 1.0,
};

/// Launches, warms up and migrates one fresh partition with default options but `strategy`,
/// `mode`, the downtime limit and `extra` (options of `migrator migrate`); returns the report,
/// with `guest_errors_after` (the guest's error count on the destination after a completed
/// migration) added.
fn one_migration(
    a: &Daemon,
    b: &Daemon,
    scenario: &Scenario,
    strategy: &str,
    mode: &str,
    extra: &[&str],
) -> Result<Value> {
    let limit = if mode == "hybrid" {
        HYBRID_DOWNTIME_LIMIT
    } else {
        DOWNTIME_LIMIT
    };
    let mut options = vec![
        "--strategy",
        strategy,
        "--mode",
        mode,
        "--downtime-limit",
        limit,
    ];
    options.extend(MIGRATE_ARGS.get().into_iter().flatten().map(String::as_str));
    options.extend_from_slice(extra);
    launch_and_migrate(
        a,
        b,
        (scenario.workload, scenario.args, scenario.mem),
        &options,
    )
}

/// Options the matrix passes to every `migrator migrate` besides its own (`--migrate-arg`), to
/// measure what one mechanism does: `--converge none`, `--no-defer`.
static MIGRATE_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// [`one_migration`], but a failure becomes a report with `status: "error"` (and goes to
/// stderr), and so does a report that is not `completed`.
fn recorded_migration(
    a: &Daemon,
    b: &Daemon,
    scenario: &Scenario,
    strategy: &str,
    mode: &str,
    run: usize,
) -> Value {
    let started = Instant::now();
    let report = one_migration(a, b, scenario, strategy, mode, &[]).unwrap_or_else(|e| {
        json!({
            "status": "error",
            "error": format!("{e:#}"),
        })
    });
    let took = started.elapsed().as_secs_f64();
    if !completed(&report) {
        eprintln!(
            "bench: {} / {strategy} / {mode} / run {run}: not completed: {}",
            scenario.name,
            report["error"]
                .as_str()
                .map_or_else(|| report.to_string(), str::to_string)
        );
    } else if report["guest_errors_after"].as_u64() != Some(0) {
        eprintln!(
            "bench: {} / {strategy} / {mode} / run {run}: guest errors after migration: {}",
            scenario.name, report["guest_errors_after"]
        );
    }
    eprintln!(
        "bench: {} / {strategy} / run {run}: {} in {took:.0} s, downtime {} ms, re-sent {}, \
         throttle {}%, dirty per round {}, blocktime {} ms, demands {} (p99 {} µs), faults \
         after {}",
        scenario.name,
        report["status"].as_str().unwrap_or("?"),
        report["downtime_ms"],
        report["pages_resent"],
        report["throttle_pct_max"],
        report["dirty_pages_per_round"],
        report["postcopy_blocktime_ms"],
        report["postcopy_requests"],
        report["postcopy_fault_latency_us"]["p99"],
        report["post_cutover_faults"],
    );
    report
}

fn completed(report: &Value) -> bool {
    report["status"] == "completed"
}

fn digests_equal(report: &Value) -> bool {
    report["source_digest"].is_string() && report["source_digest"] == report["dest_digest"]
}

/// The median of `key` over the reports that have it as a number (for the tls section).
fn field(reports: &[Value], key: &str) -> f64 {
    median(reports.iter().filter_map(|r| r[key].as_f64()).collect())
}

/// The number at JSON `pointer` in each completed report that has one.
fn completed_values(reports: &[Value], pointer: &str) -> Vec<f64> {
    reports
        .iter()
        .filter(|r| completed(r))
        .filter_map(|r| r.pointer(pointer).and_then(Value::as_f64))
        .collect()
}

fn stat(reports: &[Value], pointer: &str) -> Option<Spread> {
    Spread::of(completed_values(reports, pointer))
}

/// `n/RUNS` of the reports for which `test` holds.
fn count(reports: &[Value], test: impl Fn(&Value) -> bool) -> String {
    format!(
        "{}/{}",
        reports.iter().filter(|r| test(r)).count(),
        reports.len()
    )
}

/// `n/RUNS` of the reports whose `downtime_limit_met` is true, or `–` if none has the field.
fn limit_met(reports: &[Value]) -> String {
    if reports
        .iter()
        .all(|r| !r["downtime_limit_met"].is_boolean())
    {
        return "–".into();
    }
    count(reports, |r| r["downtime_limit_met"] == true)
}

/// Each `cutover_reason` with how many runs gave it, or `–`.
fn cutover_reasons(reports: &[Value]) -> String {
    let mut reasons = BTreeMap::new();
    for reason in reports.iter().filter_map(|r| r["cutover_reason"].as_str()) {
        *reasons.entry(reason).or_insert(0) += 1;
    }
    if reasons.is_empty() {
        return "–".into();
    }
    reasons
        .iter()
        .map(|(reason, n)| format!("{reason} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The main table's figures: header, JSON pointer, decimals.
const FIGURES: [(&str, &str, usize); 10] = [
    ("total ms", "/total_time_ms", 0),
    ("downtime ms", "/downtime_ms", 0),
    ("expected downtime ms", "/expected_downtime_ms", 0),
    ("rounds", "/rounds", 0),
    ("pages sent", "/pages_sent", 0),
    ("pages re-sent", "/pages_resent", 0),
    ("throttle % max", "/throttle_pct_max", 1),
    ("guest ops ratio", "/guest_ops_ratio", 2),
    ("guest work lost ms", "/guest_work_lost/total_ms", 0),
    ("round 0 Mbit/s", "/round0_mbps", 0),
];

/// What the guest felt after the move, in both modes.
const AFTER_MOVE: [(&str, &str, usize); 3] = [
    ("guest stall ms", "/guest_stall_ms", 0),
    ("faults after, local", "/post_cutover_faults/local", 0),
    ("faults after, remote", "/post_cutover_faults/remote", 0),
];

/// Post-copy's own figures (hybrid mode).
const POSTCOPY: [(&str, &str, usize); 6] = [
    ("blocktime ms", "/postcopy_blocktime_ms", 1),
    ("discarded pages", "/discarded_pages", 0),
    ("budgeted pages", "/budgeted_pages", 0),
    ("demand requests", "/postcopy_requests", 0),
    ("demand p50 µs", "/postcopy_fault_latency_us/p50", 0),
    ("demand p99 µs", "/postcopy_fault_latency_us/p99", 0),
];

/// The downtime breakdown's components, in ms.
const BREAKDOWN: [(&str, &str); 6] = [
    ("pause", "/downtime_breakdown/pause_ms"),
    ("last pages", "/downtime_breakdown/last_pages_ms"),
    ("state encode", "/downtime_breakdown/state_encode_ms"),
    ("state transfer", "/downtime_breakdown/state_transfer_ms"),
    ("restore", "/downtime_breakdown/restore_ms"),
    ("resume", "/downtime_breakdown/resume_ms"),
];

/// A ratio of two figures, or `None` when the denominator is not positive.
fn ratio(heat: f64, address: f64) -> Option<f64> {
    (address > 0.0 && heat.is_finite()).then(|| heat / address)
}

fn show_ratio(heat: Option<Spread>, address: Option<Spread>) -> String {
    match (heat, address) {
        (Some(h), Some(a)) => match ratio(h.median, a.median) {
            Some(r) => format!("{r:.2}x"),
            None if h.median == 0.0 => "– (both 0)".into(),
            None => "– (address 0)".into(),
        },
        _ => "–".into(),
    }
}

/// The ratios of run i of heat to run i of address at `pointer`, over the pairs where both
/// completed and address's figure is positive.
fn paired(heat: &[Value], address: &[Value], pointer: &str) -> Vec<f64> {
    heat.iter()
        .zip(address)
        .filter(|(h, a)| completed(h) && completed(a))
        .filter_map(|(h, a)| {
            let (h, a) = (
                h.pointer(pointer).and_then(Value::as_f64)?,
                a.pointer(pointer).and_then(Value::as_f64)?,
            );
            ratio(h, a)
        })
        .collect()
}

fn show_paired(heat: &[Value], address: &[Value], pointer: &str) -> String {
    let ratios = paired(heat, address, pointer);
    let n = ratios.len();
    match Spread::of(ratios) {
        Some(s) => format!(
            "{:.2}x ({:.2}–{:.2}x, {})",
            s.median,
            s.min,
            s.max,
            plural(n, "pair")
        ),
        None => "– (no pair)".into(),
    }
}

/// One scenario's reports, by strategy, each in run order.
struct Results<'a> {
    scenario: &'a Scenario,
    heat: Vec<Value>,
    address: Vec<Value>,
}

/// The done-when conditions for one scenario.
struct Conditions {
    /// Every run of both strategies completed with downtime ≤ 330 ms.
    downtime_bound: bool,
    /// Every run of both strategies completed with equal digests.
    digests: bool,
    /// Heat's median re-sent pages ≤ `resent_bound` × address's.
    resent: bool,
    /// Heat's median downtime ≤ address's.
    downtime_vs_address: bool,
}

impl Results<'_> {
    fn all(&self) -> impl Iterator<Item = &Value> {
        self.heat.iter().chain(&self.address)
    }

    /// Whether heat's median at `pointer` is at most `bound` times address's.
    fn heat_within(&self, pointer: &str, bound: f64) -> bool {
        let median = |reports: &[Value]| stat(reports, pointer).map(|s| s.median);
        match (median(&self.heat), median(&self.address)) {
            (Some(h), Some(a)) => h <= bound * a,
            _ => false,
        }
    }

    /// Whether every run of both strategies completed with a downtime of at most `bound_ms`.
    fn all_completed_within(&self, bound_ms: f64) -> bool {
        self.all()
            .all(|r| completed(r) && r["downtime_ms"].as_f64().is_some_and(|d| d <= bound_ms))
    }

    /// Heat / address of the medians at `pointer`, for the summary.
    fn ratio(&self, pointer: &str) -> String {
        show_ratio(stat(&self.heat, pointer), stat(&self.address, pointer))
    }

    fn conditions(&self) -> Conditions {
        Conditions {
            downtime_bound: self.all_completed_within(DOWNTIME_BOUND_MS),
            digests: self.all().all(|r| completed(r) && digests_equal(r)),
            resent: self.heat_within("/pages_resent", self.scenario.resent_bound),
            downtime_vs_address: self.heat_within("/downtime_ms", 1.0),
        }
    }

    fn print(&self, runs: usize, mode: &str) {
        let s = self.scenario;
        println!("#### {}\n", s.name);
        println!(
            "`{}` `{}`, layout {}, {}; {mode}; {}.\n",
            s.workload,
            if s.args.is_empty() {
                "(defaults)"
            } else {
                s.args
            },
            s.layout,
            s.mem.replace('M', " MiB").replace('G', " GiB"),
            plural(runs, "run"),
        );
        let mut header = String::from(
            "| strategy | completed | digests equal | no guest errors | limit met | cutover |",
        );
        for (name, _, _) in FIGURES {
            header.push_str(&format!(" {name} |"));
        }
        for (name, _, _) in AFTER_MOVE {
            header.push_str(&format!(" {name} |"));
        }
        if mode == "hybrid" {
            for (name, _, _) in POSTCOPY {
                header.push_str(&format!(" {name} |"));
            }
        }
        println!("{header}");
        println!("{}", "|---".repeat(header.matches('|').count() - 1) + "|");
        for (strategy, reports) in [("heat", &self.heat), ("address", &self.address)] {
            let mut row = format!(
                "| {strategy} | {} | {} | {} | {} | {} |",
                count(reports, completed),
                count(reports, |r| completed(r) && digests_equal(r)),
                count(reports, |r| r["guest_errors_after"].as_u64() == Some(0)),
                limit_met(reports),
                cutover_reasons(reports),
            );
            for (_, pointer, decimals) in FIGURES {
                row.push_str(&format!(" {} |", show(stat(reports, pointer), decimals)));
            }
            let mut columns: Vec<_> = AFTER_MOVE.to_vec();
            if mode == "hybrid" {
                columns.extend(POSTCOPY);
            }
            for (_, pointer, decimals) in columns {
                row.push_str(&format!(" {} |", show(stat(reports, pointer), decimals)));
            }
            println!("{row}");
        }
        println!();
        let mut header = String::from("| strategy | downtime ms |");
        for (name, _) in BREAKDOWN {
            header.push_str(&format!(" {name} ms |"));
        }
        println!("{header}");
        println!("{}", "|---".repeat(BREAKDOWN.len() + 2) + "|");
        for (strategy, reports) in [("heat", &self.heat), ("address", &self.address)] {
            let mut row = format!(
                "| {strategy} | {} |",
                show(stat(reports, "/downtime_ms"), 0)
            );
            for (_, pointer) in BREAKDOWN {
                row.push_str(&format!(" {} |", show(stat(reports, pointer), 1)));
            }
            println!("{row}");
        }
        println!();
        let mut ratios = vec![
            ("pages re-sent", "/pages_resent"),
            ("downtime", "/downtime_ms"),
        ];
        if mode == "hybrid" {
            ratios.extend([
                ("blocktime", "/postcopy_blocktime_ms"),
                ("demand requests", "/postcopy_requests"),
                ("remote faults", "/post_cutover_faults/remote"),
                ("guest stall", "/guest_stall_ms"),
            ]);
        }
        for (what, pointer) in ratios {
            println!(
                "heat / address, {what}: {} of the medians; paired by run {}.  ",
                show_ratio(stat(&self.heat, pointer), stat(&self.address, pointer)),
                show_paired(&self.heat, &self.address, pointer),
            );
        }
        println!();
    }
}

struct MatrixArgs {
    runs: usize,
    only: Vec<String>,
    migrate_args: Vec<String>,
    mode: String,
    list: bool,
}

const USAGE: &str =
    "usage: bench_migration [RUNS] [--only SUBSTRING]... [--mode precopy|hybrid] [--migrate-arg ARG]... [--list]
       bench_migration loopback [RUNS] | link [RUNS] | tls [RUNS] | compress [RUNS] | charts";

fn matrix_args(args: &[String]) -> Result<MatrixArgs> {
    let mut parsed = MatrixArgs {
        runs: DEFAULT_RUNS,
        only: Vec::new(),
        migrate_args: Vec::new(),
        mode: "precopy".into(),
        list: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--only" => parsed.only.push(
                args.next()
                    .context("--only needs a substring")?
                    .to_lowercase(),
            ),
            "--mode" => {
                parsed.mode = args
                    .next()
                    .context("--mode needs precopy or hybrid")?
                    .clone();
                if parsed.mode != "precopy" && parsed.mode != "hybrid" {
                    bail!("--mode is precopy or hybrid, not {}\n{USAGE}", parsed.mode);
                }
            }
            "--migrate-arg" => parsed.migrate_args.push(
                args.next()
                    .context("--migrate-arg needs an argument of migrator migrate")?
                    .clone(),
            ),
            "--list" => parsed.list = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            runs => {
                parsed.runs = runs
                    .parse()
                    .with_context(|| format!("`{runs}` is not a number of runs\n{USAGE}"))?;
                if parsed.runs == 0 {
                    bail!("RUNS must be at least 1");
                }
            }
        }
    }
    Ok(parsed)
}

/// The matrix: every selected scenario, both strategies, `runs` interleaved runs.
fn matrix(args: &[String]) -> Result<()> {
    let MatrixArgs {
        runs,
        only,
        migrate_args,
        mode,
        list,
    } = matrix_args(args)?;
    let extra = if migrate_args.is_empty() {
        "every other option at its default".to_string()
    } else {
        format!(
            "`{}`, every other option at its default",
            migrate_args.join(" ")
        )
    };
    let _ = MIGRATE_ARGS.set(migrate_args);
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| s.name.to_lowercase().contains(o)))
        // Hybrid mode runs the skewed workloads, unless asked for others by name.
        .filter(|s| !only.is_empty() || mode != "hybrid" || HYBRID_WORKLOADS.contains(&s.workload))
        .collect();
    if list {
        for s in &SCENARIOS {
            println!(
                "{}: {} `{}`, {}",
                s.name,
                s.workload,
                if s.args.is_empty() {
                    "(defaults)"
                } else {
                    s.args
                },
                s.layout
            );
        }
        return Ok(());
    }
    if scenarios.is_empty() {
        bail!("no scenario matches --only {only:?}; --list shows them");
    }
    let command = reproduce("cargo xtask bench migration", args);
    println!("### migration\n");
    println!("Reproduce: `{command}` (as root).\n");
    if let Some(commit) = commit() {
        println!("Built from commit {commit}.\n");
    }
    let limit = if mode == "hybrid" {
        HYBRID_DOWNTIME_LIMIT
    } else {
        DOWNTIME_LIMIT
    };
    println!(
        "Two network namespaces joined by a veth pair shaped with `tc tbf rate {RATE}`, daemons with mutual TLS; each run migrates a fresh 512 MiB, 1-vCPU partition, 1 s after its workload's first operation, with `migrator migrate --strategy S --mode {mode} --downtime-limit {limit}`, {extra}. {}, interleaved (run by run, scenario by scenario, heat and address, which goes first alternating). Figures are `median (min–max)` over the completed runs; counts over all runs; `–`: not in the report.\n",
        plural(runs, "run")
    );
    let started = Instant::now();
    let mut results: Vec<Results> = scenarios
        .iter()
        .map(|scenario| Results {
            scenario,
            heat: Vec::new(),
            address: Vec::new(),
        })
        .collect();
    {
        let (_hosts, a, b) = shaped_hosts()?;
        for run in 0..runs {
            for result in &mut results {
                let mut order = STRATEGIES;
                if run % 2 == 1 {
                    order.reverse();
                }
                for strategy in order {
                    let report = recorded_migration(&a, &b, result.scenario, strategy, &mode, run);
                    match strategy {
                        "heat" => result.heat.push(report),
                        _ => result.address.push(report),
                    }
                }
            }
        }
    }
    for result in &results {
        result.print(runs, &mode);
    }

    if mode == "hybrid" {
        hybrid_summary(&results);
    } else {
        precopy_summary(&results, scenarios.len());
    }
    println!(
        "\nThe bench took {:.1} min.",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// The post-copy issue's done-when conditions, scenario by scenario.
fn hybrid_summary(results: &[Results]) {
    println!("#### summary\n");
    println!(
        "Conditions: every completed report has post-cutover faults and a blocktime; every run completed within {HYBRID_DOWNTIME_BOUND_MS:.0} ms of downtime, with equal digests and no guest errors; every run's p99 demand latency ≤ {DEMAND_P99_BOUND_US:.0} µs; heat's median blocktime and demand requests ≤ 0.3x address's with the hot set scattered, ≤ 1.0x in place.\n"
    );
    println!(
        "| scenario | blocktime ratio | blocktime, paired | requests ratio | requests, paired | measured | downtime ≤ {HYBRID_DOWNTIME_BOUND_MS:.0} ms | digests, no errors | p99 ≤ {DEMAND_P99_BOUND_US:.0} µs | heat ≤ bound |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut all = [true; 5];
    for result in results {
        let bound = if result.scenario.layout == "scattered" {
            0.3
        } else {
            1.0
        };
        let conditions = [
            result.all().filter(|r| completed(r)).all(|r| {
                r["post_cutover_faults"].is_object() && r["postcopy_blocktime_ms"].is_number()
            }),
            result.all_completed_within(HYBRID_DOWNTIME_BOUND_MS),
            result.all().all(|r| {
                completed(r) && digests_equal(r) && r["guest_errors_after"].as_u64() == Some(0)
            }),
            result.all().filter(|r| completed(r)).all(|r| {
                r.pointer("/postcopy_fault_latency_us/p99")
                    .and_then(Value::as_f64)
                    .is_some_and(|p| p <= DEMAND_P99_BOUND_US)
            }),
            result.heat_within("/postcopy_blocktime_ms", bound)
                && result.heat_within("/postcopy_requests", bound),
        ];
        for (total, ok) in all.iter_mut().zip(conditions) {
            *total &= ok;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({bound:.1}x) |",
            result.scenario.name,
            result.ratio("/postcopy_blocktime_ms"),
            show_paired(&result.heat, &result.address, "/postcopy_blocktime_ms"),
            result.ratio("/postcopy_requests"),
            show_paired(&result.heat, &result.address, "/postcopy_requests"),
            pass(conditions[0]),
            pass(conditions[1]),
            pass(conditions[2]),
            pass(conditions[3]),
            pass(conditions[4]),
        );
    }
    println!(
        "\nOver these scenarios: measured {}, downtime {}, digests {}, p99 {}, heat ≤ bound {}.",
        pass(all[0]),
        pass(all[1]),
        pass(all[2]),
        pass(all[3]),
        pass(all[4]),
    );
}

/// The pre-copy issue's done-when conditions, scenario by scenario.
fn precopy_summary(results: &[Results], scenarios: usize) {
    println!("#### summary\n");
    println!(
        "Ratios are heat / address of the medians (paired by run: median and range). Conditions: every run of both strategies completed with downtime ≤ {DOWNTIME_BOUND_MS:.0} ms; every run with equal digests; heat's median pages re-sent ≤ the bound × address's (0.6 for paced kv-zipf in place, 1.0 elsewhere); heat's median downtime ≤ address's.\n"
    );
    println!(
        "| scenario | re-sent ratio | re-sent, paired | downtime ratio | downtime, paired | all ≤ {DOWNTIME_BOUND_MS:.0} ms | digests equal | re-sent ≤ bound | heat downtime ≤ address |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut all = [true; 4];
    for result in results {
        let c = result.conditions();
        for (total, ok) in
            all.iter_mut()
                .zip([c.downtime_bound, c.digests, c.resent, c.downtime_vs_address])
        {
            *total &= ok;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} ({:.1}x) | {} |",
            result.scenario.name,
            result.ratio("/pages_resent"),
            show_paired(&result.heat, &result.address, "/pages_resent"),
            result.ratio("/downtime_ms"),
            show_paired(&result.heat, &result.address, "/downtime_ms"),
            pass(c.downtime_bound),
            pass(c.digests),
            pass(c.resent),
            result.scenario.resent_bound,
            pass(c.downtime_vs_address),
        );
    }
    let over = if scenarios == SCENARIOS.len() {
        "every scenario".to_string()
    } else {
        format!(
            "the {scenarios} of {} scenarios run (not the whole matrix)",
            SCENARIOS.len()
        )
    };
    println!(
        "\nOver {over}: downtime ≤ {DOWNTIME_BOUND_MS:.0} ms {}, digests equal {}, re-sent ≤ bound {}, heat downtime ≤ address {}.",
        pass(all[0]),
        pass(all[1]),
        pass(all[2]),
        pass(all[3]),
    );
}

/// Where the receiver of [`plain_tcp_copy`] puts what it reads.
#[derive(Clone, Copy, PartialEq)]
enum Placement {
    /// Nowhere: the copy alone.
    Discard,
    /// Into a fresh memfd through `pwrite`, as a migration's receiver does.
    Pwrite,
    /// Read straight into a fresh memfd's mapping, each MiB first populated in one call
    /// (`MADV_POPULATE_WRITE`: the kernel allocates and zeroes the pages, no fault each).
    PopulateThenRead,
    /// Read straight into a fresh memfd's mapping, faulting each page in as it is written.
    ReadIntoMapping,
}

impl Placement {
    const ALL: [Placement; 4] = [
        Placement::Discard,
        Placement::Pwrite,
        Placement::PopulateThenRead,
        Placement::ReadIntoMapping,
    ];

    fn row(self) -> &'static str {
        match self {
            Placement::Discard => "plain TCP copy of 1 GiB in 1 MiB writes",
            Placement::Pwrite => "plain TCP copy into fresh memory (`pwrite` into a new memfd)",
            Placement::PopulateThenRead => {
                "plain TCP copy into fresh memory (read into the memfd's mapping, each MiB populated first with `MADV_POPULATE_WRITE`)"
            }
            Placement::ReadIntoMapping => {
                "plain TCP copy into fresh memory (read into the memfd's mapping, a fault per page)"
            }
        }
    }
}

/// A plain TCP copy of `bytes` over loopback in 1 MiB writes, the receiver placing what it
/// reads as `placement` says; returns bytes per second. The fresh placements show what
/// putting a gigabyte in new memory costs on this host, each way a receiver could.
fn plain_tcp_copy(bytes: u64, placement: Placement) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // A fresh memfd, mapped shared: what a destination's partition memory is.
    let memory = (placement != Placement::Discard)
        .then(|| migrator::vmm::GuestMemory::new(bytes))
        .transpose()?;
    let into_mapping = matches!(
        placement,
        Placement::PopulateThenRead | Placement::ReadIntoMapping
    );
    let sink = thread::spawn(move || -> Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; CHUNK];
        let mut total = 0usize;
        loop {
            let n = match &memory {
                Some(memory) if into_mapping && (total as u64) < memory.size() => {
                    let size = memory.size() as usize;
                    let base = memory.host_address() as usize as *mut u8;
                    let end = ((total / CHUNK + 1) * CHUNK).min(size);
                    if total.is_multiple_of(CHUNK) && placement == Placement::PopulateThenRead {
                        // SAFETY: advice on part of the memory's own mapping, in bounds
                        // (`total..end` lies within `size`).
                        let done = unsafe {
                            libc::madvise(
                                base.add(total).cast(),
                                end - total,
                                libc::MADV_POPULATE_WRITE,
                            )
                        };
                        ensure!(done == 0, "madvise: {}", std::io::Error::last_os_error());
                    }
                    // SAFETY: `total..end` lies within the mapping, which lives as long as
                    // `memory`; no guest runs on it and nothing else reads or writes it while
                    // this slice exists.
                    let window =
                        unsafe { std::slice::from_raw_parts_mut(base.add(total), end - total) };
                    stream.read(window)?
                }
                _ => {
                    let n = stream.read(&mut buffer)?;
                    if let Some(memory) = &memory
                        && placement == Placement::Pwrite
                        && n > 0
                    {
                        memory.write_through_fd(
                            migrator::vmm::GuestAddress(total as u64),
                            &buffer[..n],
                        )?;
                    }
                    n
                }
            };
            if n == 0 {
                return Ok(total as u64);
            }
            total += n;
        }
    });
    let mut stream = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    drop(stream);
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    Ok(received as f64 / start.elapsed().as_secs_f64())
}

/// Writes the charts of docs/BENCHMARKS.md from one run of each strategy and mode of the
/// paced kv-zipf scenario (in place): dirty pages per round, and downtime.
fn charts(a: &Daemon, b: &Daemon) -> Result<()> {
    let scenario = &SCENARIOS[0];
    let mut dirty = Vec::new();
    let mut downtime = Vec::new();
    for mode in ["precopy", "hybrid"] {
        for strategy in STRATEGIES {
            let report = one_migration(a, b, scenario, strategy, mode, &[])?;
            if mode == "precopy" {
                let rounds = report["dirty_pages_per_round"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                dirty.push((strategy.to_string(), rounds));
            }
            downtime.push((
                format!("{strategy} {mode}"),
                report["downtime_ms"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("migration-dirty-rounds.svg"),
        heatprobe_tests::svg::line_chart(
            "kv-zipf 512 MiB, 500k ops/s, 1 Gbit/s: dirty pages per round (precopy)",
            "dirty pages",
            "round",
            &dirty,
        ),
    )?;
    std::fs::write(
        dir.join("migration-downtime.svg"),
        heatprobe_tests::svg::bar_chart(
            "kv-zipf 512 MiB, 500k ops/s, 1 Gbit/s: downtime",
            "downtime (ms)",
            &downtime,
        ),
    )?;
    println!("charts: docs/img/migration-dirty-rounds.svg, docs/img/migration-downtime.svg");
    Ok(())
}

/// The cost of mutual TLS on the page stream: on loopback without a limit, the same
/// migration between two plain daemons and between two TLS daemons, alternating, `runs` each.
fn tls_cost(runs: usize) -> Result<()> {
    let certs = make_certs(&["127.0.0.1"])?;
    let plain = (
        Daemon::try_start(DaemonConfig::default())?,
        Daemon::try_start(DaemonConfig::default())?,
    );
    let tls = (
        Daemon::try_start(DaemonConfig::default().tls(Some(certs.clone())))?,
        Daemon::try_start(DaemonConfig::default().tls(Some(certs.clone())))?,
    );
    let scenario = &SLOW_UNIFORM;
    let (mut plain_reports, mut tls_reports) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        plain_reports.push(one_migration(
            &plain.0,
            &plain.1,
            scenario,
            "address",
            "precopy",
            &[],
        )?);
        tls_reports.push(one_migration(
            &tls.0,
            &tls.1,
            scenario,
            "address",
            "precopy",
            &[],
        )?);
    }
    println!(
        "#### mutual TLS, loopback, no limit
"
    );
    println!(
        "1 GiB of non-zero pages (`uniform-write rate=1000`), address order, pre-copy; medians of {runs} alternating runs.\n"
    );
    println!("| daemons | completed | round 0 Mbit/s | total ms | downtime ms |");
    println!("|---|---|---|---|---|");
    for (name, reports) in [("plain TCP", &plain_reports), ("mutual TLS", &tls_reports)] {
        let ok = reports
            .iter()
            .filter(|r| completed(r) && digests_equal(r))
            .count();
        println!(
            "| {name} | {ok}/{runs} | {:.0} | {:.0} | {:.0} |",
            field(reports, "round0_mbps"),
            field(reports, "total_time_ms"),
            field(reports, "downtime_ms"),
        );
    }
    println!(
        "\nTLS / plain: round 0 rate {:.2}x, total time {:.2}x.",
        field(&tls_reports, "round0_mbps") / field(&plain_reports, "round0_mbps"),
        field(&tls_reports, "total_time_ms") / field(&plain_reports, "total_time_ms"),
    );
    let _ = std::fs::remove_dir_all(&certs);
    Ok(())
}

/// Loopback, no limit: the page stream's round-0 rate over 1, 2 and 4 data connections
/// against a plain TCP copy and plain copies into fresh memory (each [`Placement`]), in
/// the same run, interleaved, `runs` each.
fn loopback(runs: usize) -> Result<()> {
    let a = Daemon::try_start(DaemonConfig::default())?;
    let b = Daemon::try_start(DaemonConfig::default())?;
    const WIDTHS: [u32; 3] = [1, 2, 4];
    let mut copies: Vec<Vec<f64>> = vec![Vec::new(); Placement::ALL.len()];
    let mut streams: Vec<Vec<f64>> = vec![Vec::new(); WIDTHS.len()];
    let mut whole = vec![0; WIDTHS.len()];
    for _ in 0..runs {
        for (placement, rates) in Placement::ALL.iter().zip(&mut copies) {
            rates.push(plain_tcp_copy(1 << 30, *placement)? * 8.0 / 1e6);
        }
        for (i, width) in WIDTHS.iter().enumerate() {
            let width = width.to_string();
            let report = one_migration(
                &a,
                &b,
                &SLOW_UNIFORM,
                "address",
                "precopy",
                &["--connections", &width],
            )?;
            if completed(&report) && digests_equal(&report) {
                whole[i] += 1;
            }
            streams[i].push(report["round0_mbps"].as_f64().unwrap_or(0.0));
        }
    }
    let copy_median = median(copies[0].clone());
    let shown = |values: &[f64]| {
        Spread::of(values.to_vec()).map_or("-".into(), |s| {
            format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max)
        })
    };
    println!("#### loopback, no limit\n");
    println!(
        "1 GiB of non-zero pages (`uniform-write rate=1000`), address order, pre-copy, plain TCP daemons; medians (min-max) of {runs} interleaved runs.\n"
    );
    println!("| figure | completed, digests equal | Mbit/s | / plain copy |");
    println!("|---|---|---|---|");
    for (placement, rates) in Placement::ALL.iter().zip(&copies) {
        println!(
            "| {} | - | {} | {:.2}x |",
            placement.row(),
            shown(rates),
            median(rates.clone()) / copy_median
        );
    }
    for (i, width) in WIDTHS.iter().enumerate() {
        println!(
            "| migration round 0, `--connections {width}` | {}/{runs} | {} | {:.2}x |",
            whole[i],
            shown(&streams[i]),
            median(streams[i].clone()) / copy_median
        );
    }
    Ok(())
}

/// The link section's migration: 512 MiB of non-zero pages, barely written.
const SLOW_UNIFORM_512: Scenario = Scenario {
    mem: "512M",
    ..SLOW_UNIFORM
};

/// Bytes the qdisc of `host`'s link device has sent (`tc -s`), headers included.
fn link_bytes_sent(host: &heatprobe_tests::netns::Host) -> Result<u64> {
    let output = std::process::Command::new("tc")
        .args(["-n", &host.ns, "-s", "qdisc", "show", "dev", &host.dev])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|word| *word != "Sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no byte count in `tc -s qdisc`: {text}"))
}

/// The shaped 1 Gbit/s link: how much of it round 0 uses over 1, 2 and 4 data connections,
/// interleaved, `runs` each. Link use is what the source's qdisc sent (`tc -s`: frames with
/// their TLS records and TCP, IP and Ethernet headers) from the end of the setup to the end
/// of the migration, against the shaped rate over that time; it includes the cutover, when
/// the link idles, so it is a lower bound on round 0's. Round 0's own rate counts frame bytes
/// as the socket takes them, up to a few MiB ahead of the link.
fn link_use(runs: usize) -> Result<()> {
    let (hosts, a, b) = shaped_hosts()?;
    const WIDTHS: [u32; 3] = [1, 2, 4];
    let mut goodput: Vec<Vec<f64>> = vec![Vec::new(); WIDTHS.len()];
    let mut used: Vec<Vec<f64>> = vec![Vec::new(); WIDTHS.len()];
    let mut whole = vec![0; WIDTHS.len()];
    for _ in 0..runs {
        for (i, width) in WIDTHS.iter().enumerate() {
            let width = width.to_string();
            let before = link_bytes_sent(&hosts.a)?;
            let report = one_migration(
                &a,
                &b,
                &SLOW_UNIFORM_512,
                "address",
                "precopy",
                &["--connections", &width],
            )?;
            let wire = link_bytes_sent(&hosts.a)?.saturating_sub(before) as f64;
            if completed(&report) && digests_equal(&report) {
                whole[i] += 1;
            }
            let round0 = report["round0_mbps"].as_f64().unwrap_or(0.0);
            let sending_ms = report["total_time_ms"].as_f64().unwrap_or(0.0)
                - report["setup_time_ms"].as_f64().unwrap_or(0.0);
            goodput[i].push(round0);
            used[i].push(wire * 8.0 / (sending_ms.max(1.0) * 1e6) * 100.0);
        }
    }
    let shown = |values: &[f64], digits: usize| {
        Spread::of(values.to_vec()).map_or("-".into(), |s| {
            format!(
                "{:.digits$} ({:.digits$}-{:.digits$})",
                s.median, s.min, s.max
            )
        })
    };
    println!("#### the shaped 1 Gbit/s link\n");
    println!(
        "512 MiB of non-zero pages (`uniform-write rate=1000`), address order, pre-copy, mutual TLS between the namespace hosts; medians (min-max) of {runs} interleaved runs.\n"
    );
    println!(
        "| connections | completed, digests equal | round 0 Mbit/s (frame bytes) | link use %, setup to end (`tc`) |"
    );
    println!("|---|---|---|---|");
    for (i, width) in WIDTHS.iter().enumerate() {
        println!(
            "| {width} | {}/{runs} | {} | {} |",
            whole[i],
            shown(&goodput[i], 0),
            shown(&used[i], 1)
        );
    }
    Ok(())
}

/// The compression section's guests: 512 MiB filled whole, barely written (1000 pages
/// rewritten a second; no full check during a run, the digests are the check).
const FILL_TEXT: Scenario = Scenario {
    name: "fill, text",
    workload: "fill",
    args: "content=text rate=100 check_every=1000000000",
    layout: "uniform",
    mem: "512M",
    resent_bound: 1.0,
};
const FILL_RANDOM: Scenario = Scenario {
    name: "fill, random",
    workload: "fill",
    args: "content=random rate=100 check_every=1000000000",
    layout: "uniform",
    mem: "512M",
    resent_bound: 1.0,
};
/// The codecs compared, `none` first: the baseline of each guest.
const CODECS: [&str; 4] = ["none", "lz4", "zstd", "auto"];
/// The link's rate in Mbit/s (`RATE`), which the effective rates are multiples of.
const LINK_MBPS: f64 = 1000.0;
/// Done-when: a compressible guest's round 0 at 2x the link with compression; an
/// incompressible one losing at most 5% (total time) with it on.
const COMPRESSIBLE_BOUND: f64 = 2.0;
const INCOMPRESSIBLE_LOSS: f64 = 0.05;

/// reports[guest][codec], each in run order.
type CodecReports = Vec<Vec<Vec<Value>>>;

/// Migrates each of `guests` from `a` to `b` with each codec in turn (the order rotating
/// every run), `runs` times.
fn codec_runs(
    a: &Daemon,
    b: &Daemon,
    guests: &[&Scenario],
    runs: usize,
    link: &str,
) -> CodecReports {
    let mut reports: CodecReports = vec![vec![Vec::new(); CODECS.len()]; guests.len()];
    for run in 0..runs {
        for (g, guest) in guests.iter().enumerate() {
            for k in 0..CODECS.len() {
                let c = (k + run) % CODECS.len();
                let codec = CODECS[c];
                let report =
                    one_migration(a, b, guest, "address", "precopy", &["--compress", codec])
                        .unwrap_or_else(|e| json!({"status": "error", "error": format!("{e:#}")}));
                eprintln!(
                    "bench: {link} / {} / {codec} / run {run}: {}, round 0 {} Mbit/s ({} on the \
                     wire), {} bytes as {} ({}x), total {} ms, downtime {} ms",
                    guest.name,
                    report["status"].as_str().unwrap_or("?"),
                    report["round0_mbps"],
                    report["round0_wire_mbps"],
                    report["bytes_uncompressed"],
                    report["bytes_sent"],
                    report["compression_ratio"],
                    report["total_time_ms"],
                    report["downtime_ms"],
                );
                if !completed(&report) {
                    eprintln!("bench: not completed: {}", report["error"]);
                }
                reports[g][c].push(report);
            }
        }
    }
    reports
}

/// The table of [`codec_runs`]: round 0's effective rate as a multiple of `base` (the link's
/// rate, named `base_name`) or, without one, of the same guest's rate without compression.
fn codec_table(guests: &[&Scenario], reports: &CodecReports, base: Option<(f64, &str)>) {
    let multiple = base.map_or("× none", |(_, name)| name);
    println!(
        "| guest | compress | completed | digests equal | round 0 effective Gbit/s | {multiple} | round 0 wire Mbit/s | MiB on the wire | ratio | total ms | downtime ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (guest, by_codec) in guests.iter().zip(reports) {
        let none = stat(&by_codec[0], "/round0_mbps").map(|s| s.median);
        let base = base.map(|(mbps, _)| mbps).or(none).unwrap_or(f64::NAN);
        for (codec, reports) in CODECS.iter().zip(by_codec) {
            let rates = completed_values(reports, "/round0_mbps");
            let gbit = rates.iter().map(|m| m / 1000.0).collect();
            let times = rates.iter().map(|m| m / base).collect();
            let mib = completed_values(reports, "/bytes_sent")
                .into_iter()
                .map(|b| b / f64::from(1 << 20))
                .collect();
            println!(
                "| {} | {codec} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                guest.name,
                count(reports, completed),
                count(reports, |r| completed(r) && digests_equal(r)),
                show(Spread::of(gbit), 2),
                show(Spread::of(times), 2),
                show(stat(reports, "/round0_wire_mbps"), 0),
                show(Spread::of(mib), 0),
                show(stat(reports, "/compression_ratio"), 2),
                show(stat(reports, "/total_time_ms"), 0),
                show(stat(reports, "/downtime_ms"), 0),
            );
        }
    }
    println!();
}

/// `--compress` on the shaped link, then on loopback without a limit (where the link is not
/// what limits the move): for a compressible and an incompressible guest, each codec in
/// turn, `runs` runs each.
fn compression(runs: usize) -> Result<()> {
    let started = Instant::now();
    let guests = [&FILL_TEXT, &FILL_RANDOM];
    let shaped = {
        let (_hosts, a, b) = shaped_hosts()?;
        codec_runs(&a, &b, &guests, runs, "shaped")
    };
    let loopback = {
        let a = Daemon::try_start(DaemonConfig::default())?;
        let b = Daemon::try_start(DaemonConfig::default())?;
        codec_runs(&a, &b, &guests, runs, "loopback")
    };
    println!("#### compression, the shaped 1 Gbit/s link\n");
    println!(
        "Reproduce: `{}` (as root).\n",
        reproduce("cargo xtask bench migration compress", &[runs.to_string()])
    );
    if let Some(commit) = commit() {
        println!("Built from commit {commit}.\n");
    }
    println!(
        "The matrix's two namespaces (`tc tbf rate {RATE}`, mutual TLS); each run migrates a fresh 512 MiB, 1-vCPU `fill` partition (`{}` or `{}`), 1 s after its first operation, with `migrator migrate --strategy address --mode precopy --downtime-limit {DOWNTIME_LIMIT} --compress C`; {}, the codecs interleaved (their order rotating every run). Figures are `median (min–max)` over the completed runs. The effective rate is round 0's uncompressed bytes a second (`round0_mbps`), the wire rate its bytes on the wire (`round0_wire_mbps`).\n",
        FILL_TEXT.args,
        FILL_RANDOM.args,
        plural(runs, "run")
    );
    codec_table(&guests, &shaped, Some((LINK_MBPS, "× link")));
    let median_of = |reports: &[Value], pointer: &str| stat(reports, pointer).map(|s| s.median);
    println!("#### compression: summary\n");
    println!(
        "Conditions (shaped link): the compressible guest's median round-0 effective rate ≥ {COMPRESSIBLE_BOUND:.0}x the link with a codec; the incompressible guest's median total time with each codec ≤ {:.2}x its time without; every run completed with equal digests.\n",
        1.0 + INCOMPRESSIBLE_LOSS
    );
    let (text, random) = (&shaped[0], &shaped[1]);
    let best = (1..CODECS.len())
        .filter_map(|c| Some((CODECS[c], median_of(&text[c], "/round0_mbps")? / LINK_MBPS)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let fast = best.is_some_and(|(_, x)| x >= COMPRESSIBLE_BOUND);
    let base = median_of(&random[0], "/total_time_ms");
    let losses: Vec<(&str, Option<f64>)> = (1..CODECS.len())
        .map(|c| {
            let ratio = match (median_of(&random[c], "/total_time_ms"), base) {
                (Some(t), Some(b)) if b > 0.0 => Some(t / b),
                _ => None,
            };
            (CODECS[c], ratio)
        })
        .collect();
    let cheap = losses
        .iter()
        .all(|(_, r)| r.is_some_and(|r| r <= 1.0 + INCOMPRESSIBLE_LOSS));
    let digests = shaped
        .iter()
        .chain(&loopback)
        .flatten()
        .flatten()
        .all(|r| completed(r) && digests_equal(r));
    match best {
        Some((codec, x)) => println!(
            "- compressible guest: {x:.2}x the link at best ({codec}): {}",
            pass(fast)
        ),
        None => println!("- compressible guest: no completed run with a codec: FAIL"),
    }
    for (codec, ratio) in &losses {
        match ratio {
            Some(r) => println!(
                "- incompressible guest, {codec}: total time {r:.3}x without compression: {}",
                pass(*r <= 1.0 + INCOMPRESSIBLE_LOSS)
            ),
            None => println!("- incompressible guest, {codec}: no completed runs to compare: FAIL"),
        }
    }
    println!(
        "- every run (both tables) completed with equal digests: {}",
        pass(digests)
    );
    println!("\nOver both guests: {}.\n", pass(fast && cheap && digests));
    println!("#### compression, loopback, no limit\n");
    println!(
        "The same migrations between two plain daemons on loopback, no bandwidth limit: the sender's CPU, not the link, bounds the move. `× none`: the effective rate over the same guest's without compression.\n"
    );
    codec_table(&guests, &loopback, None);
    println!(
        "The bench took {:.1} min.",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn runs_arg(arg: Option<&String>, default: usize) -> Result<usize> {
    Ok(arg
        .map(|r| r.parse())
        .transpose()
        .with_context(|| format!("not a number of runs\n{USAGE}"))?
        .unwrap_or(default))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("charts") => {
            let (_hosts, a, b) = shaped_hosts()?;
            charts(&a, &b)
        }
        Some("tls") => tls_cost(runs_arg(args.get(1), 5)?),
        Some("loopback") => loopback(runs_arg(args.get(1), 5)?),
        Some("link") => link_use(runs_arg(args.get(1), 3)?),
        Some("compress") => compression(runs_arg(args.get(1), DEFAULT_RUNS)?),
        _ => matrix(&args),
    }
}
