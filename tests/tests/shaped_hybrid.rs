//! A hybrid migration on a shaped link that used to wedge before post-copy: two namespace
//! hosts with mutual TLS, 200 Mbit/s, `--peer-timeout 3s`, `--max-rounds 1`, a 512 MiB guest
//! whose every page goes stale during round 0. The destination's process once touched a page
//! userfaultfd held while serving the handover and never answered it. Here it reaches
//! post-copy, answers `status` throughout, survives an 8 s cut of the link during post-copy
//! (longer than the peer timeout: post-copy pauses, recovers once the link is back) and
//! completes with equal digests. A long variant (`HEATPROBE_LONG_TESTS=1`): about a minute.

use std::{
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{
    daemon::{Daemon, DaemonConfig, assert_completed, make_certs},
    kvm_unavailable,
    netns::{HostPair, netns_unavailable},
    skip,
};
use serde_json::Value;

const NAME: &str = "hybrid_at_200mbit_reaches_post_copy_and_survives_a_cut";

/// The source's phase of migration `migration`, from `migrations --json`.
fn phase(source: &Daemon, migration: &str) -> (String, Value) {
    let list = source.json(&["migrations"]);
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == migration)
        .cloned()
        .unwrap_or(Value::Null);
    (row["phase"].as_str().unwrap_or("").to_string(), row)
}

#[test]
fn hybrid_at_200mbit_reaches_post_copy_and_survives_a_cut() {
    if std::env::var_os("HEATPROBE_LONG_TESTS").is_none_or(|v| v != "1") {
        return skip(NAME, "long variant (HEATPROBE_LONG_TESTS=1)");
    }
    if let Some(why) = kvm_unavailable().or_else(netns_unavailable) {
        return skip(NAME, &why);
    }
    let hosts = HostPair::create().expect("two network namespaces");
    hosts.shape("200mbit").expect("tc tbf");
    let certs = make_certs(&[&hosts.a.addr.to_string(), &hosts.b.addr.to_string()]).expect("certs");
    let start = |host: &heatprobe_tests::netns::Host| {
        Daemon::start_config(
            DaemonConfig::in_namespace(&host.ns, host.addr)
                .args(&["--peer-timeout", "3s"])
                .tls(Some(certs.dir())),
        )
    };
    let source = start(&hosts.a);
    let destination = start(&hosts.b);
    // Writes a page an operation, 20k a second: over round 0 (about 21 s of 512 MiB at
    // 200 Mbit/s) nearly every page goes stale, so post-copy has most of memory to push,
    // and the progress page is among the stale ones.
    let id = source.json(&[
        "launch",
        "--workload",
        "uniform-write",
        "--args",
        "rate=20000 check_every=200000",
        "--mem",
        "512M",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    source.wait_progress(&id, 1000, 0);
    let output = source
        .command()
        .args([
            "migrate",
            "--json",
            "--detach",
            "--from",
            &source.addr,
            "--to",
        ])
        .arg(&destination.addr)
        .arg(&id)
        .args([
            "--mode",
            "hybrid",
            "--strategy",
            "address",
            "--max-rounds",
            "1",
        ])
        .args(["--fault-window", "0s"])
        .output()
        .unwrap();
    let started: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!("{NAME}: {}", String::from_utf8_lossy(&output.stderr));
    });
    let migration = started["migration"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (now, row) = phase(&source, &migration);
        if now == "postcopy" {
            break;
        }
        assert!(
            row["status"].is_null(),
            "{NAME}: ended before post-copy: {row}"
        );
        assert!(Instant::now() < deadline, "{NAME}: no post-copy: {row}");
        thread::sleep(Duration::from_millis(50));
    }
    // The destination answers while its guest runs on missing pages.
    let there = destination.json(&["list"]);
    let [copy] = there.as_array().unwrap().as_slice() else {
        panic!("{NAME}: one copy there: {there}");
    };
    let there = copy["id"].as_str().unwrap().to_string();
    let asked = Instant::now();
    let status = destination.json(&["status", &there]);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{NAME}: status took {:?}",
        asked.elapsed()
    );
    assert_eq!(status["state"], "running", "{NAME}: {status}");
    // The cut, past the peer timeout: post-copy pauses, then recovers by itself.
    hosts.link_down().unwrap();
    let cut = Instant::now();
    let mut paused = false;
    while cut.elapsed() < Duration::from_secs(8) {
        paused |= phase(&source, &migration).0 == "postcopy-paused";
        thread::sleep(Duration::from_millis(200));
    }
    hosts.link_up().unwrap();
    assert!(paused, "{NAME}: the cut never paused post-copy");
    let (_, stdout, stderr) = source.cli(&["wait", &migration, "--json"]);
    let report: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("{NAME}: no report: {stderr}"));
    assert_completed(&report, NAME);
    assert!(
        report["postcopy_recoveries"].as_u64() >= Some(1),
        "{NAME}: {report}"
    );
    let moved = report["id_on_destination"].as_str().unwrap();
    destination.runs_clean(moved, 1000, 0, NAME);
    eprintln!(
        "{NAME}: completed in {} ms, {} demanded, {} recoveries, paused {} ms",
        report["total_time_ms"],
        report["postcopy_requests"],
        report["postcopy_recoveries"],
        report["postcopy_paused_ms"]
    );
}
