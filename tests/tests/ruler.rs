//! The ruler: every report adds up what the migration cost the guest (`guest_work_lost`, by
//! part), and says so plainly when it cannot. Two daemons on loopback, real KVM.

use heatprobe_tests::{daemon::Daemon, kvm_unavailable, skip};
use serde_json::Value;

fn launch(daemon: &Daemon, workload: &str, args: &str) -> String {
    daemon.json(&[
        "launch",
        "--workload",
        workload,
        "--args",
        args,
        "--mem",
        "64M",
    ])["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

fn part(lost: &Value, name: &str) -> f64 {
    lost[name]
        .as_f64()
        .unwrap_or_else(|| panic!("{name} in {lost}"))
}

#[test]
fn a_paced_guest_that_keeps_its_pace_loses_little_but_the_pause() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_paced_guest_that_keeps_its_pace_loses_little_but_the_pause",
            &why,
        );
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    // 20k operations a second: far below what a vCPU does, so the dirty log's faults and the
    // copies cost it no operations.
    let id = launch(&source, "rw-mix", "rate=20000 check_every=20000");
    source.wait_progress(&id, 20_000, 0);
    let (report, _) = source.migrate_checked(
        &destination,
        &id,
        &["--strategy", "address", "--bandwidth-limit", "32M"],
        "paced",
    );
    let lost = &report["guest_work_lost"];
    assert!(lost.is_object(), "{report}");
    let rate = part(lost, "rate_before");
    assert!((15_000.0..25_000.0).contains(&rate), "{lost}");
    let counted = part(lost, "counted_ms");
    let rounds = part(lost, "rounds_ms");
    // The rounds (about 2 s of 64 MiB at 32 MB/s) cost it under a tenth of their time.
    assert!(counted > 1500.0, "{lost}");
    assert!(rounds.abs() < 0.1 * counted, "{lost}");
    assert_eq!(
        part(lost, "profile_ms"),
        0.0,
        "address order profiles nothing: {lost}"
    );
    assert_eq!(part(lost, "throttle_ms"), 0.0, "{lost}");
    assert_eq!(
        part(lost, "downtime_ms"),
        report["downtime_ms"].as_f64().unwrap(),
        "{lost}"
    );
    // The fault window after the resume is counted too, and a paced guest keeps its pace
    // there.
    let after = part(lost, "after_ms");
    assert!(
        after.abs() < 0.1 * 2000.0 + part(lost, "downtime_ms"),
        "{lost}"
    );
    let parts = [
        "profile_ms",
        "rounds_ms",
        "throttle_ms",
        "downtime_ms",
        "after_ms",
    ];
    let sum: f64 = parts.iter().map(|p| part(lost, p)).sum();
    assert!((sum - part(lost, "total_ms")).abs() < 1e-6, "{lost}");
}

#[test]
fn throttling_shows_in_the_guests_bill() {
    if let Some(why) = kvm_unavailable() {
        return skip("throttling_shows_in_the_guests_bill", &why);
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    // Writes everywhere, flat out: at 16 MB/s it cannot fit 20 ms, so it is throttled round
    // after round, then given up at the round limit.
    let id = launch(&source, "uniform-write", "check_every=20000");
    source.wait_progress(&id, 20_000, 1);
    let (code, report) = source.migrate(
        &destination,
        &id,
        &[
            "--strategy",
            "address",
            "--downtime-limit",
            "20ms",
            "--max-rounds",
            "4",
            "--bandwidth-limit",
            "16M",
        ],
    );
    assert_ne!(code, 0, "{report}");
    assert!(report["throttle_pct_max"].as_u64() >= Some(20), "{report}");
    let lost = &report["guest_work_lost"];
    let throttle = part(lost, "throttle_ms");
    assert!(throttle > 0.0, "{lost}");
    assert!(throttle > part(lost, "rounds_ms"), "{lost}");
    // It never moved: nothing after a resume there.
    assert!(lost["after_ms"].is_null(), "{lost}");
}

#[test]
fn a_paused_guest_says_why_it_has_no_bill() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_paused_guest_says_why_it_has_no_bill", &why);
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let id = launch(&source, "rw-mix", "check_every=20000");
    source.wait_progress(&id, 1000, 0);
    source.json(&["pause", &id]);
    let (report, _) =
        source.migrate_checked(&destination, &id, &["--strategy", "address"], "paused");
    assert!(report["guest_work_lost"].is_null(), "{report}");
    let note = report["guest_work_lost_note"].as_str().unwrap_or_default();
    assert!(note.contains("no operations"), "{report}");
}
