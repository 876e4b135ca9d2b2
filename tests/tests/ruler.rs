//! The ruler: every report adds up what the migration cost the guest (`guest_work_lost`, by
//! part), and says so plainly when it cannot. Two daemons on loopback, real KVM.

use heatprobe_tests::{daemon::Daemon, kvm_unavailable, skip};
use serde_json::Value;

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
    let id = source.launch("rw-mix", "rate=20000 check_every=20000", "64M");
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

/// The pace a bill is measured against: the second before the migration for a guest just
/// launched, the host's history of it (at least 10 s, up to 30 s) for one that has run a
/// while, matching the guest's own count over that time.
#[test]
fn the_pace_is_the_hosts_history_of_the_guest_once_it_has_one() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "the_pace_is_the_hosts_history_of_the_guest_once_it_has_one",
            &why,
        );
    }
    let a = Daemon::start();
    let b = Daemon::start();
    let id = a.launch("rw-mix", "rate=20000 check_every=20000", "64M");
    a.wait_progress(&id, 2_000, 0);
    let (report, moved) = a.migrate_checked(&b, &id, &["--strategy", "address"], "fresh");
    let pace = part(&report["guest_work_lost"], "pace_ms");
    assert!((900.0..2_500.0).contains(&pace), "a fresh guest: {report}");
    // Twelve seconds on the destination, watched by the test as by its host.
    let ops = |d: &Daemon| d.json(&["status", &moved])["ops"].as_f64().expect("ops");
    let (first, since) = (ops(&b), std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_secs(12));
    let watched = (ops(&b) - first) / since.elapsed().as_secs_f64();
    let (report, _) = b.migrate_checked(&a, &moved, &["--strategy", "address"], "back");
    let lost = &report["guest_work_lost"];
    let pace = part(lost, "pace_ms");
    assert!((10_000.0..=30_000.0).contains(&pace), "{lost}");
    let rate = part(lost, "rate_before");
    assert!(
        (rate / watched - 1.0).abs() < 0.1,
        "{rate} against {watched} watched: {lost}"
    );
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
    let id = source.launch("uniform-write", "check_every=20000", "64M");
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
    let id = source.launch("rw-mix", "check_every=20000", "64M");
    source.wait_progress(&id, 1000, 0);
    source.json(&["pause", &id]);
    let (report, _) =
        source.migrate_checked(&destination, &id, &["--strategy", "address"], "paused");
    assert!(report["guest_work_lost"].is_null(), "{report}");
    let note = report["guest_work_lost_note"].as_str().unwrap_or_default();
    assert!(note.contains("no operations"), "{report}");
}

/// Writes `text` to a fresh file and returns its path.
fn heat_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "heatprobe-tests-{}-{name}.json",
        std::process::id()
    ));
    std::fs::write(&path, text).expect("write the heat file");
    path
}

#[test]
fn a_heat_file_orders_a_migration_in_both_modes_and_bad_ones_change_nothing() {
    let test = "a_heat_file_orders_a_migration_in_both_modes_and_bad_ones_change_nothing";
    if let Some(why) = kvm_unavailable() {
        return skip(test, &why);
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    // 64 MiB: frames 0..16384. Heat on a band of frames, the hottest in the middle.
    let pages: Vec<String> = (4000..6000)
        .map(|f: u64| {
            let heat = 1000.0 - (f as f64 - 5000.0).abs();
            format!(
                r#"{{"page": {f}, "reads": 3, "writes": {}, "heat": {heat}}}"#,
                f % 2
            )
        })
        .collect();
    let good = heat_file("good", &format!(r#"{{"pages": [{}]}}"#, pages.join(",")));
    let good = good.to_str().unwrap();
    let bad = [
        ("not-json", "heat, but not as JSON", "JSON"),
        (
            "out-of-range",
            r#"{"pages": [{"page": 16384, "heat": 1}]}"#,
            "16384 frames",
        ),
        (
            "negative",
            r#"{"pages": [{"page": 3, "heat": -2}]}"#,
            "heat -2",
        ),
        (
            "twice",
            r#"{"pages": [{"page": 3, "heat": 1}, {"page": 3, "heat": 2}]}"#,
            "twice",
        ),
    ];
    for mode in ["precopy", "hybrid"] {
        let id = source.launch("rw-mix", "check_every=20000", "64M");
        source.wait_progress(&id, 1000, 0);
        for (name, text, says) in bad {
            let path = heat_file(name, text);
            let (code, report) = source.migrate(
                &destination,
                &id,
                &["--mode", mode, "--heat-file", path.to_str().unwrap()],
            );
            let _ = std::fs::remove_file(&path);
            assert_ne!(code, 0, "{name}: {report}");
            assert!(report.to_string().contains(says), "{name}: {report}");
            // Nothing started: no migration on either side, the guest runs on here.
            for daemon in [&source, &destination] {
                let migrations = daemon.json(&["migrations"]);
                let running = migrations
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["partition"] == id.as_str())
                    .count();
                assert_eq!(running, 0, "{name}: {migrations}");
            }
            assert_eq!(source.json(&["status", &id])["state"], "running");
        }
        let (report, moved) = source.migrate_checked(
            &destination,
            &id,
            &["--mode", mode, "--heat-file", good],
            &format!("{mode} from a heat file"),
        );
        assert_eq!(report["plan_heat"], "file", "{report}");
        assert_eq!(report["strategy"], "heat", "{report}");
        destination.runs_clean(&moved, 1000, 0, mode);
        destination.json(&["stop", &moved]);
    }
    // Only the heat strategy takes a heat file.
    let id = source.launch("rw-mix", "", "64M");
    let output = source
        .command()
        .args([
            "migrate",
            "--from",
            &source.addr,
            "--to",
            &destination.addr,
            &id,
        ])
        .args(["--strategy", "address", "--heat-file", good])
        .output()
        .unwrap();
    let (code, stdout, stderr) = (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_ne!(code, 0, "{stdout}");
    assert!(stderr.contains("--strategy heat"), "{stderr}");
    let _ = std::fs::remove_file(good);
}
