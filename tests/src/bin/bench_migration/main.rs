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

use anyhow::{Context, Result};
use heatprobe_tests::{
    bench::{ShapedHosts, launch_and_migrate},
    daemon::Daemon,
};
use serde_json::Value;

mod compression;
mod matrix;
mod stats;
mod stream;

use compression::compression;
use matrix::{MIGRATE_ARGS, USAGE, matrix};
use stream::{charts, link_use, loopback, tls_cost};

const RATE: &str = "1gbit";
/// The downtime limit every pre-copy migration of the matrix is given.
const DOWNTIME_LIMIT: &str = "300ms";
/// The downtime limit every hybrid migration of the matrix is given, and its bound.
const HYBRID_DOWNTIME_LIMIT: &str = "100ms";
const DEFAULT_RUNS: usize = 3;
const STRATEGIES: [&str; 2] = ["heat", "address"];

/// The two shaped hosts, with a daemon on each.
fn shaped_hosts() -> Result<(ShapedHosts, Daemon, Daemon)> {
    heatprobe_tests::bench::shaped_hosts(RATE, &[])
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
        std::time::Duration::from_secs(1),
        &options,
    )
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
