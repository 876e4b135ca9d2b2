//! Running on many hosts: a real Prometheus scrapes a daemon's metrics while it migrates and
//! sees the migration's series; off loopback the metrics need a client certificate; and
//! `migrator drain` empties a host onto two others over mutual TLS.

use std::time::{Duration, Instant};

use heatprobe_tests::{
    daemon::{Daemon, DaemonConfig, assert_completed, make_certs},
    kvm_unavailable,
    netns::{HostPair, Lan, in_namespace, netns_unavailable},
    prometheus::{Prometheus, free_port, http_get, parse_answer, prometheus_unavailable},
    skip,
};
use migrator::tls::Security;
use serde_json::Value;

/// Why this test cannot run here, printed and recorded, or `None`.
fn unavailable(test: &str, needs: &[fn() -> Option<String>]) -> bool {
    match needs.iter().find_map(|need| need()) {
        Some(why) => {
            skip(test, &why);
            true
        }
        None => false,
    }
}

/// `promtool check metrics` on `page`: its output if it found a problem.
fn promtool_check(page: &str) -> Option<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(page.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool's answer");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (!output.status.success() || !said.trim().is_empty()).then_some(said)
}

#[test]
fn a_real_prometheus_scrapes_a_migration_and_sees_its_series() {
    let test = "a_real_prometheus_scrapes_a_migration_and_sees_its_series";
    if unavailable(test, &[kvm_unavailable, prometheus_unavailable]) {
        return;
    }
    let metrics = format!("127.0.0.1:{}", free_port());
    let a = Daemon::start_with(&["--metrics", &metrics, "--on-exit", "stop"]);
    let b = Daemon::start_with(&["--on-exit", "stop"]);
    let id = a.launch("kv-zipf", "keys=8192", "64M");
    a.wait_progress(&id, 10_000, 2);

    let scrape = format!(
        "  - job_name: migrator\n    scrape_interval: 250ms\n    scrape_timeout: 250ms\n    \
         static_configs:\n      - targets: ['{metrics}']\n"
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let prometheus = Prometheus::start(None, &listen, &scrape).expect("start Prometheus");
    let wait = Duration::from_secs(30);
    let up = prometheus.wait_for("up{job=\"migrator\"}", wait, |v| v == 1.0);
    up.unwrap_or_else(|e| panic!("{e:#}"));
    let kind = "mode=\"hybrid\",strategy=\"heat\"";
    let completed = format!("migrator_migrations_total{{outcome=\"completed\",{kind}}}");
    // Zero before: the counter is there for an alert's increase() to start from.
    let before = prometheus.wait_for(&completed, wait, |v| v == 0.0);
    before.unwrap_or_else(|e| panic!("{e:#}"));
    let running = "migrator_partitions{state=\"running\"}";
    let seen = prometheus.wait_for(running, wait, |v| v == 1.0);
    seen.unwrap_or_else(|e| panic!("{e:#}"));

    // Hybrid, heat-ordered, paced so that its round 0 lasts over several scrapes.
    let (report, moved) = a.migrate_checked(
        &b,
        &id,
        &["--mode", "hybrid", "--bandwidth-limit", "8mbit"],
        test,
    );
    println!("migrated: {report}");
    let value = |expr: &str, ok: fn(f64) -> bool| {
        prometheus
            .wait_for(expr, wait, ok)
            .unwrap_or_else(|e| panic!("{e:#}"))
    };
    value(&completed, |v| v == 1.0);
    for outcome in ["failed", "cancelled", "error"] {
        let other = format!("migrator_migrations_total{{outcome=\"{outcome}\",{kind}}}");
        assert_eq!(prometheus.value(&other).unwrap(), Some(0.0), "{other}");
    }
    let sent = value(
        &format!("migrator_migration_sent_bytes_total{{{kind}}}"),
        |v| v > 0.0,
    );
    assert_eq!(Some(sent), report["bytes_sent"].as_f64(), "{report}");
    let resent = value(
        &format!("migrator_migration_resent_pages_total{{{kind}}}"),
        |v| v >= 0.0,
    );
    assert_eq!(Some(resent), report["pages_resent"].as_f64(), "{report}");
    let downtimes = value(
        &format!("migrator_migration_downtime_seconds_count{{{kind}}}"),
        |v| v == 1.0,
    );
    assert_eq!(downtimes, 1.0);
    let downtime = value(
        &format!("migrator_migration_downtime_seconds_sum{{{kind}}}"),
        |v| v >= 0.0,
    );
    let reported = report["downtime_ms"].as_f64().expect("downtime_ms") / 1e3;
    assert!(
        (downtime - reported).abs() < 1e-9,
        "{downtime} vs {reported}"
    );
    value(
        &format!("migrator_migration_blocktime_seconds_count{{{kind}}}"),
        |v| v == 1.0,
    );
    // While it ran: in flight on the source, with bytes left to send.
    let flights = "max(max_over_time(migrator_migrations_in_flight{side=\"source\"}[5m]))";
    value(flights, |v| v >= 1.0);
    let phases = prometheus
        .query(
            "count by (phase) (max_over_time(migrator_migrations_in_flight{side=\"source\"}[5m]))",
        )
        .unwrap();
    println!("phases scraped in flight: {phases:?}");
    let left =
        format!("max_over_time(migrator_migration_remaining_bytes{{partition=\"{id}\"}}[5m])");
    value(&left, |v| v > 0.0);
    // And after it: nothing runs on the source any more.
    value(running, |v| v == 0.0);
    value("migrator_memory_used_bytes", |v| v == 0.0);

    let (status, page) = http_get(&metrics, "/metrics").expect("the metrics page");
    assert_eq!(status, 200, "{page}");
    if let Some(problems) = promtool_check(&page) {
        panic!("promtool check metrics: {problems}\n{page}");
    }
    let stopped = b.json(&["stop", &moved]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
}

#[test]
fn the_metrics_off_loopback_refuse_a_client_without_credentials() {
    let test = "the_metrics_off_loopback_refuse_a_client_without_credentials";
    if unavailable(test, &[netns_unavailable, prometheus_unavailable]) {
        return;
    }
    let pair = HostPair::create().expect("two hosts");
    let (a_addr, b_addr) = (pair.a.addr.to_string(), pair.b.addr.to_string());
    let certs = make_certs(&[&a_addr, &b_addr]).expect("certificates");
    let strangers = make_certs(&[&a_addr]).expect("a second, unrelated CA");
    let metrics = format!("{a_addr}:9464");

    // Without TLS, metrics off loopback are refused, even beside an API on loopback.
    let plain = DaemonConfig::in_namespace(&pair.a.ns, std::net::Ipv4Addr::LOCALHOST)
        .args(&["--metrics", &metrics]);
    let error = Daemon::try_start(plain)
        .err()
        .expect("a plain daemon must not start");
    assert!(
        format!("{error:#}").contains("needs mutual TLS"),
        "{error:#}"
    );

    let a = Daemon::start_config(
        DaemonConfig::in_namespace(&pair.a.ns, pair.a.addr)
            .tls(Some(certs.dir()))
            .args(&["--metrics", &metrics, "--on-exit", "stop"]),
    );
    // From the other host: plain HTTP, a stranger's certificate, then the CA's client.
    let fetch = |client: Option<std::path::PathBuf>| {
        let (target, client) = (metrics.clone(), client);
        in_namespace(
            Some(&pair.b.ns),
            move || -> anyhow::Result<(u16, String)> {
                let Some(dir) = client else {
                    return http_get(&target, "/metrics");
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let security = Security::from_dir(Some(&dir))?;
                    let mut stream = security.connect(target.parse()?).await?;
                    stream
                        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await?;
                    let mut answer = Vec::new();
                    stream.read_to_end(&mut answer).await?;
                    parse_answer(&answer)
                })
            },
        )
        .expect("a thread on host b")
    };
    let plain = fetch(None);
    assert!(plain.is_err(), "a plain client got an answer: {plain:?}");
    let stranger = fetch(Some(strangers.join("client")));
    assert!(stranger.is_err(), "a stranger got an answer: {stranger:?}");
    let (status, page) = fetch(Some(certs.join("client"))).expect("the CA's client gets in");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("migrator_partitions{"), "{page}");

    // A real Prometheus on host b: without a client certificate its scrapes fail, with one
    // they get through.
    let client = certs.join("client");
    let tls = |with_cert: bool| {
        let mut config = format!("      ca_file: {}\n", client.join("ca.pem").display());
        if with_cert {
            config.push_str(&format!(
                "      cert_file: {}\n      key_file: {}\n",
                client.join("cert.pem").display(),
                client.join("key.pem").display()
            ));
        }
        config
    };
    let scrape = |job: &str, with_cert: bool| {
        format!(
            "  - job_name: {job}\n    scheme: https\n    scrape_interval: 500ms\n    \
             scrape_timeout: 500ms\n    tls_config:\n{}    static_configs:\n      - \
             targets: ['{metrics}']\n",
            tls(with_cert)
        )
    };
    let config = format!("{}{}", scrape("nocert", false), scrape("cert", true));
    let prometheus =
        Prometheus::start(Some(&pair.b.ns), "127.0.0.1:9090", &config).expect("start Prometheus");
    let wait = Duration::from_secs(30);
    prometheus
        .wait_for("up{job=\"cert\"}", wait, |v| v == 1.0)
        .unwrap_or_else(|e| panic!("{e:#}"));
    prometheus
        .wait_for("up{job=\"nocert\"}", wait, |v| v == 0.0)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let targets = prometheus.targets().expect("the targets");
    let refused = targets
        .iter()
        .find(|t| t["labels"]["job"] == "nocert")
        .expect("the nocert target");
    println!("scraping without a certificate: {}", refused["lastError"]);
    assert_eq!(refused["health"], "down", "{refused}");
    let why = refused["lastError"].as_str().unwrap_or_default();
    assert!(why.contains("certificate"), "{refused}");
    // The page is the same daemon's that answered the client above.
    drop(a);
}

/// The intervals over which migrations ran, most at once.
fn most_at_once(entries: &[Value]) -> usize {
    let spans: Vec<(u64, u64)> = entries
        .iter()
        .filter_map(|e| Some((e["started_ms"].as_u64()?, e["ended_ms"].as_u64()?)))
        .collect();
    spans
        .iter()
        .map(|&(start, _)| {
            spans
                .iter()
                .filter(|&&(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn drain_empties_a_host_onto_two_over_mutual_tls() {
    let test = "drain_empties_a_host_onto_two_over_mutual_tls";
    if unavailable(test, &[kvm_unavailable, netns_unavailable]) {
        return;
    }
    let lan = Lan::create(3).expect("three hosts");
    let addrs: Vec<String> = lan.hosts.iter().map(|h| h.addr.to_string()).collect();
    let names: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let certs = make_certs(&names).expect("certificates");
    let host = |i: usize, extra: &[&str]| {
        let h = &lan.hosts[i];
        Daemon::start_config(
            DaemonConfig::in_namespace(&h.ns, h.addr)
                .tls(Some(certs.dir()))
                .args(&["--on-exit", "stop"])
                .args(extra),
        )
    };
    let source = host(0, &[]);
    // Room for two 64 MiB partitions each, not for a 256 MiB one.
    let to = [
        host(1, &["--max-memory", "160M"]),
        host(2, &["--max-memory", "160M"]),
    ];
    let small: Vec<String> = (0..4)
        .map(|_| source.launch("kv-zipf", "keys=8192", "64M"))
        .collect();
    let big = source.launch("kv-zipf", "keys=8192", "256M");
    for id in small.iter().chain([&big]) {
        source.wait_progress(id, 10_000, 2);
    }
    let to_arg = format!("{},{}", to[0].addr, to[1].addr);
    let drain = |bandwidth: &str| {
        source
            .command()
            .args(["drain", "--json", "--from", &source.addr, "--to", &to_arg])
            .args([
                "--parallel",
                "2",
                "--strategy",
                "address",
                "--bandwidth",
                bandwidth,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run migrator drain")
    };
    let finish = |child: std::process::Child| {
        let output = child.wait_with_output().expect("the drain's end");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let report: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("no report; stderr: {stderr}"));
        (output.status.code(), report, stderr)
    };

    // Bad input changes nothing.
    let output = source
        .command()
        .args(["drain", "--from", &source.addr, "--to", &source.addr])
        .output()
        .expect("run migrator drain");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("the daemon being drained"), "{stderr}");

    // Ctrl-C cancels what is in flight: every partition runs on where it was.
    let slow = drain("8mbit");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !source.json(&["migrations"]).as_array().is_some_and(|m| {
        m.iter()
            .any(|m| m["side"] == "source" && m["status"].is_null())
    }) {
        assert!(Instant::now() < deadline, "no migration started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) with SIGINT on our own child.
    unsafe { libc::kill(slow.id() as libc::pid_t, libc::SIGINT) };
    let (code, report, stderr) = finish(slow);
    println!("cancelled drain: {report}");
    assert_ne!(code, Some(0), "{stderr}");
    assert_eq!(report["cancelled"], true, "{report}");
    assert_eq!(report["moved"], 0, "{report}");
    for id in small.iter().chain([&big]) {
        source.runs_clean(id, 1_000, 1, "after the cancelled drain");
    }
    for d in &to {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.partition_processes().is_empty() {
            assert!(Instant::now() < deadline, "{:?}", d.partition_processes());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The drain: 5 MB/s in all, two at once (unpaced, two would send at several times that).
    let total = 5_000_000.0;
    let (code, report, stderr) = finish(drain("40mbit"));
    println!("drain: {report}");
    assert_ne!(code, Some(0), "one partition cannot move: {stderr}");
    assert!(stderr.contains(&big), "{stderr}");
    let entries = report["partitions"].as_array().expect("partitions").clone();
    assert_eq!(entries.len(), 5, "{report}");
    let mut per_destination = std::collections::BTreeMap::<String, usize>::new();
    let mut bytes = 0.0;
    for e in &entries {
        let id = e["id"].as_str().expect("an id");
        if id == big {
            assert_eq!(e["fate"], "not-moved", "{e}");
            assert!(
                e["why"]
                    .as_str()
                    .is_some_and(|w| w.contains("no destination has room"))
            );
            continue;
        }
        assert_eq!(e["fate"], "moved", "{e}");
        let r = &e["report"];
        assert_completed(r, id);
        bytes += r["bytes_sent"].as_f64().expect("bytes_sent");
        assert!(
            r["round0_wire_mbps"].as_f64() <= Some(total * 8e-6 * 1.1),
            "{r}"
        );
        *per_destination.entry(e["to"].to_string()).or_default() += 1;
        let d = to
            .iter()
            .find(|d| e["to"] == d.addr.as_str())
            .expect("a destination");
        let moved = e["id_on_destination"].as_str().expect("its new id");
        d.runs_clean(moved, 1_000, 1, id);
    }
    assert_eq!(
        per_destination.values().copied().collect::<Vec<_>>(),
        [2, 2]
    );
    assert_eq!(most_at_once(&entries), 2, "{report}");
    let elapsed = report["elapsed_ms"].as_f64().expect("elapsed_ms") / 1e3;
    println!(
        "{bytes} bytes in {elapsed:.2} s: {:.0} B/s of {total}",
        bytes / elapsed
    );
    assert!(
        bytes / elapsed <= total * 1.1,
        "{bytes} bytes in {elapsed} s"
    );
    // The one that could not move runs on the source, alone.
    source.runs_clean(&big, 1_000, 1, "left on the source");
    let left: Vec<Value> = source
        .json(&["list"])
        .as_array()
        .cloned()
        .unwrap_or_default();
    let running: Vec<&Value> = left.iter().filter(|p| p["state"] == "running").collect();
    assert_eq!(running.len(), 1, "{left:?}");
}
