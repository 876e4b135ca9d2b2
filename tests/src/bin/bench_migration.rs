//! `cargo xtask bench migration [RUNS]`: heat against address order, measured.
//! `cargo xtask bench migration tls [RUNS]`: what mutual TLS costs the page stream.
//!
//! Two hosts are two network namespaces joined by a veth pair whose both ends are shaped with
//! `tc tbf` to 1 Gbit/s. For each scenario, strategy and mode, a fresh 1 GiB partition is
//! launched on host A, warmed up, and migrated to host B; medians over RUNS (default 5).
//! Then, on plain loopback without a limit, the page stream's round-0 rate is compared with a
//! plain TCP copy in the same run. Prints Markdown for docs/BENCHMARKS.md.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use heatprobe_tests::{
    daemon::{Daemon, DaemonConfig, make_certs},
    netns::HostPair,
};
use serde_json::Value;

const RATE: &str = "1gbit";

/// The two shaped hosts, with a daemon on each (port 7700, as in the docs' commands).
fn shaped_hosts() -> Result<(HostPair, Daemon, Daemon)> {
    let hosts = HostPair::create()?;
    hosts.shape(RATE)?;
    // Daemons off loopback speak mutual TLS.
    let certs = make_certs(&[&hosts.a.addr.to_string(), &hosts.b.addr.to_string()])?;
    let start = |host: &heatprobe_tests::netns::Host| {
        Daemon::try_start(DaemonConfig {
            listen: host.at(7700),
            ..DaemonConfig::in_namespace(&host.ns, host.addr).tls(Some(certs.clone()))
        })
    };
    let a = start(&hosts.a)?;
    let b = start(&hosts.b)?;
    Ok((hosts, a, b))
}

/// Runs `migrator ARGS --json` against `daemon` and parses what it prints.
fn cli(daemon: &Daemon, args: &[&str]) -> Result<Value> {
    let output = daemon.command().args(args).arg("--json").output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).with_context(|| {
        format!(
            "migrator {} printed {stdout:?} ({})",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

struct Scenario {
    name: &'static str,
    workload: &'static str,
    args: &'static str,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "kv-zipf 1 GiB, theta 0.99, 20% writes, paced at 500k ops/s",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 rate=500000 check_every=2000000",
    },
    Scenario {
        name: "kv-zipf 1 GiB, theta 0.99, 20% writes, flat out",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 check_every=2000000",
    },
    Scenario {
        name: "rw-mix 1 GiB",
        workload: "rw-mix",
        args: "check_every=2000000",
    },
    Scenario {
        name: "uniform-write 1 GiB",
        workload: "uniform-write",
        args: "check_every=2000000",
    },
];

/// Launches, warms up and migrates one fresh partition; returns the report.
fn one_migration(
    a: &Daemon,
    b: &Daemon,
    scenario: &Scenario,
    strategy: &str,
    mode: &str,
) -> Result<Value> {
    let id = cli(
        a,
        &[
            "launch",
            "--host",
            &a.addr,
            "--workload",
            scenario.workload,
            "--args",
            scenario.args,
            "--mem",
            "1G",
        ],
    )?["id"]
        .as_str()
        .context("launch id")?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli(a, &["status", "--host", &a.addr, &id])?["ops"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        if Instant::now() > deadline {
            bail!("{} never started", scenario.workload);
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(1));
    let report = cli(
        a,
        &[
            "migrate",
            "--from",
            &a.addr,
            "--to",
            &b.addr,
            &id,
            "--strategy",
            strategy,
            "--mode",
            mode,
            "--downtime-limit",
            "300ms",
            "--max-rounds",
            "30",
            "--profile-window",
            "1s",
        ],
    )?;
    if let Some(new_id) = report["id_on_destination"].as_str() {
        let status = cli(b, &["status", "--host", &b.addr, new_id])?;
        if status["errors"].as_u64() != Some(0) {
            bail!("guest errors after migration: {status}");
        }
        cli(b, &["stop", "--host", &b.addr, new_id])?;
    } else {
        let _ = cli(a, &["stop", "--host", &a.addr, &id]);
    }
    Ok(report)
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn field(reports: &[Value], key: &str) -> f64 {
    median(reports.iter().filter_map(|r| r[key].as_f64()).collect())
}

/// A plain TCP copy of `bytes` over loopback in 1 MiB writes; returns bytes per second.
fn plain_tcp_copy(bytes: u64) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut stream = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
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
/// paced kv-zipf scenario: dirty pages per round, and downtime.
fn charts(a: &Daemon, b: &Daemon) -> Result<()> {
    let scenario = &SCENARIOS[0];
    let mut dirty = Vec::new();
    let mut downtime = Vec::new();
    for mode in ["precopy", "hybrid"] {
        for strategy in ["heat", "address"] {
            let report = one_migration(a, b, scenario, strategy, mode)?;
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
            "kv-zipf 1 GiB, 500k ops/s, 1 Gbit/s: dirty pages per round (precopy)",
            "dirty pages",
            "round",
            &dirty,
        ),
    )?;
    std::fs::write(
        dir.join("migration-downtime.svg"),
        heatprobe_tests::svg::bar_chart(
            "kv-zipf 1 GiB, 500k ops/s, 1 Gbit/s: downtime",
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
    let scenario = Scenario {
        name: "uniform-write, slow",
        workload: "uniform-write",
        args: "rate=1000 check_every=2000000",
    };
    let (mut plain_reports, mut tls_reports) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        plain_reports.push(one_migration(
            &plain.0, &plain.1, &scenario, "address", "precopy",
        )?);
        tls_reports.push(one_migration(
            &tls.0, &tls.1, &scenario, "address", "precopy",
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
        let completed = reports
            .iter()
            .filter(|r| r["status"] == "completed" && r["source_digest"] == r["dest_digest"])
            .count();
        println!(
            "| {name} | {completed}/{runs} | {:.0} | {:.0} | {:.0} |",
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

fn main() -> Result<()> {
    let first = std::env::args().nth(1);
    if first.as_deref() == Some("charts") {
        let (_hosts, a, b) = shaped_hosts()?;
        return charts(&a, &b);
    }
    if first.as_deref() == Some("tls") {
        let runs = std::env::args().nth(2).map(|r| r.parse()).transpose()?;
        return tls_cost(runs.unwrap_or(5));
    }
    let runs: usize = first.map(|r| r.parse()).transpose()?.unwrap_or(5);
    let (hosts, a, b) = shaped_hosts()?;
    println!("### migration\n");
    println!(
        "Two network namespaces joined by a veth pair shaped with `tc tbf rate {RATE}`; each run migrates a fresh 1 GiB, 1-vCPU partition after 1 s of warm-up, with `--downtime-limit 300ms --max-rounds 30 --profile-window 1s`; medians of {runs} runs.\n"
    );
    for scenario in &SCENARIOS {
        let mut rows = Vec::new();
        for mode in ["precopy", "hybrid"] {
            for strategy in ["heat", "address"] {
                let mut reports = Vec::new();
                for _ in 0..runs {
                    let report = one_migration(&a, &b, scenario, strategy, mode)?;
                    if report["status"] != "completed" {
                        eprintln!("{} {strategy} {mode}: {report}", scenario.name);
                    }
                    reports.push(report);
                }
                rows.push((strategy, mode, reports));
            }
        }
        println!("#### {}\n", scenario.name);
        println!(
            "| strategy | mode | completed | digests equal | total ms | setup ms | downtime ms | rounds | pages sent | pages re-sent | post-copy requests | fault p99 µs | round 0 Mbit/s |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (strategy, mode, reports) in &rows {
            let completed = reports
                .iter()
                .filter(|r| r["status"] == "completed")
                .count();
            let equal = reports
                .iter()
                .filter(|r| {
                    r["source_digest"].is_string() && r["source_digest"] == r["dest_digest"]
                })
                .count();
            let p99 = median(
                reports
                    .iter()
                    .filter_map(|r| r["postcopy_fault_latency_us"]["p99"].as_f64())
                    .collect(),
            );
            println!(
                "| {strategy} | {mode} | {completed}/{runs} | {equal}/{runs} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                field(reports, "total_time_ms"),
                field(reports, "setup_time_ms"),
                field(reports, "downtime_ms"),
                field(reports, "rounds"),
                field(reports, "pages_sent"),
                field(reports, "pages_resent"),
                field(reports, "postcopy_requests"),
                p99,
                field(reports, "round0_mbps"),
            );
        }
        let find = |strategy: &str, mode: &str| {
            rows.iter()
                .find(|r| r.0 == strategy && r.1 == mode)
                .map(|r| &r.2)
        };
        if let (Some(heat), Some(address)) = (find("heat", "precopy"), find("address", "precopy")) {
            println!(
                "\nheat / address, precopy: pages re-sent {:.2}x, downtime {:.2}x.",
                field(heat, "pages_resent") / field(address, "pages_resent"),
                field(heat, "downtime_ms") / field(address, "downtime_ms"),
            );
        }
        if let (Some(heat), Some(address)) = (find("heat", "hybrid"), find("address", "hybrid")) {
            println!(
                "heat / address, hybrid: post-copy requests {:.2}x, downtime {:.2}x.",
                field(heat, "postcopy_requests") / field(address, "postcopy_requests"),
                field(heat, "downtime_ms") / field(address, "downtime_ms"),
            );
        }
        if let Some(address) = find("address", "precopy") {
            println!(
                "round 0 used {:.0}% of the {RATE} link (address, precopy).\n",
                field(address, "round0_mbps") / 1000.0 * 100.0
            );
        }
    }
    drop((a, b, hosts));

    // Loopback, no limit: the page stream against a plain TCP copy, in the same run.
    let a = Daemon::try_start(DaemonConfig::default())?;
    let b = Daemon::try_start(DaemonConfig::default())?;
    let scenario = Scenario {
        name: "uniform-write, slow",
        workload: "uniform-write",
        args: "rate=1000 check_every=2000000",
    };
    let (mut stream, mut copy) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        copy.push(plain_tcp_copy(1 << 30)? * 8.0 / 1e6);
        let report = one_migration(&a, &b, &scenario, "address", "precopy")?;
        stream.push(report["round0_mbps"].as_f64().unwrap_or(0.0));
    }
    let (stream, copy) = (median(stream), median(copy));
    println!("#### loopback, no limit\n");
    println!("| figure | Mbit/s |");
    println!("|---|---|");
    println!("| plain TCP copy of 1 GiB in 1 MiB writes | {copy:.0} |");
    println!("| migration round 0 (1 GiB of non-zero pages) | {stream:.0} |");
    println!(
        "\nround 0 reaches {:.0}% of the plain copy (target ≥ 90%).",
        stream / copy * 100.0
    );
    Ok(())
}
