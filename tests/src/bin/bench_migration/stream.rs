//! The page stream alone: on loopback against a plain TCP copy, with mutual TLS, how much of
//! the shaped link it uses; and the charts of docs/BENCHMARKS.md.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use heatprobe_tests::{
    bench::{Spread, median},
    daemon::{Daemon, DaemonConfig, make_certs},
};
use serde_json::Value;

use crate::matrix::SCENARIOS;
use crate::stats::{completed, digests_equal, field};
use crate::{SLOW_UNIFORM, STRATEGIES, Scenario, one_migration, shaped_hosts};

/// Where the receiver of [`plain_tcp_copy`] puts what it reads.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Placement {
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
pub(crate) fn plain_tcp_copy(bytes: u64, placement: Placement) -> Result<f64> {
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
pub(crate) fn charts(a: &Daemon, b: &Daemon) -> Result<()> {
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
pub(crate) fn tls_cost(runs: usize) -> Result<()> {
    let certs = make_certs(&["127.0.0.1"])?;
    let plain = (
        Daemon::try_start(DaemonConfig::default())?,
        Daemon::try_start(DaemonConfig::default())?,
    );
    let tls = (
        Daemon::try_start(DaemonConfig::default().tls(Some(certs.dir())))?,
        Daemon::try_start(DaemonConfig::default().tls(Some(certs.dir())))?,
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
    Ok(())
}

/// Loopback, no limit: the page stream's round-0 rate over 1, 2 and 4 data connections
/// against a plain TCP copy and plain copies into fresh memory (each [`Placement`]), in
/// the same run, interleaved, `runs` each.
pub(crate) fn loopback(runs: usize) -> Result<()> {
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
pub(crate) const SLOW_UNIFORM_512: Scenario = Scenario {
    mem: "512M",
    ..SLOW_UNIFORM
};

/// Bytes the qdisc of `host`'s link device has sent (`tc -s`), headers included.
pub(crate) fn link_bytes_sent(host: &heatprobe_tests::netns::Host) -> Result<u64> {
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
pub(crate) fn link_use(runs: usize) -> Result<()> {
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
