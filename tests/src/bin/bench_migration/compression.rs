//! `--compress` on the shaped link: a compressible guest against an incompressible one.

use std::time::Instant;

use anyhow::Result;
use heatprobe_tests::{
    bench::{Spread, commit, pass, plural, reproduce, show},
    daemon::{Daemon, DaemonConfig},
};
use serde_json::{Value, json};

use crate::stats::{completed, completed_values, count, digests_equal, stat};
use crate::{DOWNTIME_LIMIT, RATE, Scenario, one_migration, shaped_hosts};

/// The compression section's guests: 512 MiB filled whole, barely written (1000 pages
/// rewritten a second; no full check during a run, the digests are the check).
pub(crate) const FILL_TEXT: Scenario = Scenario {
    name: "fill, text",
    workload: "fill",
    args: "content=text rate=100 check_every=1000000000",
    layout: "uniform",
    mem: "512M",
    resent_bound: 1.0,
};

pub(crate) const FILL_RANDOM: Scenario = Scenario {
    name: "fill, random",
    workload: "fill",
    args: "content=random rate=100 check_every=1000000000",
    layout: "uniform",
    mem: "512M",
    resent_bound: 1.0,
};

/// The codecs compared, `none` first: the baseline of each guest.
pub(crate) const CODECS: [&str; 4] = ["none", "lz4", "zstd", "auto"];

/// The link's rate in Mbit/s (`RATE`), which the effective rates are multiples of.
pub(crate) const LINK_MBPS: f64 = 1000.0;

/// Done-when: a compressible guest's round 0 at 2x the link with compression; an
/// incompressible one losing at most 5% (total time) with it on.
pub(crate) const COMPRESSIBLE_BOUND: f64 = 2.0;

pub(crate) const INCOMPRESSIBLE_LOSS: f64 = 0.05;

/// reports[guest][codec], each in run order.
pub(crate) type CodecReports = Vec<Vec<Vec<Value>>>;

/// Migrates each of `guests` from `a` to `b` with each codec in turn (the order rotating
/// every run), `runs` times.
pub(crate) fn codec_runs(
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
pub(crate) fn codec_table(guests: &[&Scenario], reports: &CodecReports, base: Option<(f64, &str)>) {
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
pub(crate) fn compression(runs: usize) -> Result<()> {
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
