//! `migrator heat` and `migrator plan` against a real daemon, KVM guest and eBPF probes: the
//! JSON shapes, the text, bad input, two clients profiling one partition at once, and a
//! migration that takes the partition's vCPUs from an open window.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{bpf_unavailable, daemon::Daemon, kvm_unavailable, skip};
use serde_json::Value;

const MEM: &str = "32M";
const FRAMES: u64 = (32 << 20) / 4096;

/// Why this test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    kvm_unavailable().or_else(bpf_unavailable)
}

/// A partition whose writes go mostly to a hot region at the start of memory, paced so it
/// leaves the host's cores to others.
fn launch_hotspot(daemon: &Daemon) -> String {
    let launched = daemon.json(&[
        "launch",
        "--workload",
        "hotspot",
        "--mem",
        MEM,
        "--args",
        "rate=200000",
    ]);
    let id = launched["id"].as_str().expect("an id").to_string();
    daemon.wait_progress(&id, 10_000, 0);
    id
}

/// Checks a `heat --json` object has `heatprobe record --json`'s shape with guest frames as
/// pages; returns its pages as page -> (reads, writes).
fn check_heat_shape(heat: &Value, id: &str) -> BTreeMap<u64, (u64, u64)> {
    assert_eq!(heat["partition"], id, "{heat}");
    assert_eq!(heat["frames"], FRAMES, "{heat}");
    assert_eq!(heat["target"]["kind"], "vm", "{heat}");
    assert!(heat["target"]["pid"].as_u64() > Some(0), "{heat}");
    assert_eq!(heat["page_size"], 4096, "{heat}");
    assert_eq!(heat["interval_ms"], 200, "{heat}");
    assert!(heat["dropped"].is_u64(), "{heat}");
    let pages = heat["pages"].as_array().expect("pages");
    let mut by_page = BTreeMap::new();
    let mut previous = None;
    for page in pages {
        let number = page["page"].as_u64().expect("a page number");
        assert!(
            number < FRAMES,
            "page {number} is beyond the guest's memory"
        );
        assert!(previous < Some(number), "pages are in page order: {page}");
        previous = Some(number);
        let reads = page["reads"].as_u64().expect("reads");
        let writes = page["writes"].as_u64().expect("writes");
        assert!(reads + writes > 0, "a listed page was touched: {page}");
        assert!(page["heat"].as_f64() > Some(0.0), "{page}");
        assert!(
            ["hot", "warm", "cold"].contains(&page["class"].as_str().unwrap_or("")),
            "{page}"
        );
        assert!(
            ["ro", "rw"].contains(&page["access"].as_str().unwrap_or("")),
            "{page}"
        );
        assert_eq!(
            page["access"] == "rw",
            writes > 0,
            "rw exactly when a write was seen: {page}"
        );
        by_page.insert(number, (reads, writes));
    }
    by_page
}

fn epochs(heat: &Value) -> u64 {
    heat["epochs"].as_u64().expect("epochs")
}

fn faults(pages: &BTreeMap<u64, (u64, u64)>) -> u64 {
    pages.values().map(|(r, w)| r + w).sum()
}

#[test]
fn heat_and_plan_as_json_and_text() {
    if let Some(why) = unavailable() {
        return skip("heat_and_plan_as_json_and_text", &why);
    }
    let daemon = Daemon::start();
    let id = launch_hotspot(&daemon);

    let heat = daemon.json(&["heat", &id, "--duration", "1s"]);
    let pages = check_heat_shape(&heat, &id);
    // At most one epoch more than fit (an epoch starts when due, whoever asks), and not cut
    // short: a loaded machine may run some epochs late, and fewer fit (a sanity bound).
    assert!(
        (3..=6).contains(&epochs(&heat)),
        "a 1 s window is five epochs of 200 ms: {}",
        epochs(&heat)
    );
    assert!(!pages.is_empty() && faults(&pages) > 0, "{heat}");
    // hotspot writes: some pages must be seen written.
    assert!(pages.values().any(|(_, w)| *w > 0), "{heat}");

    let (code, text, stderr) = daemon.cli(&["heat", &id, "--duration", "400ms"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains(&format!("partition {id}:")), "{text}");
    assert!(text.contains("classes: hot "), "{text}");
    assert!(text.contains("hot ranges"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("heatmap |"))
        .unwrap_or_else(|| panic!("no heatmap line: {text}"));
    let cells = line
        .strip_prefix("heatmap |")
        .and_then(|rest| rest.split('|').next())
        .expect("a heatmap between bars");
    assert_eq!(cells.chars().count(), 64, "{line}");
    assert!(cells.chars().any(|c| c != ' '), "some heat shows: {line}");

    // Heat plan: round 0 in its three segments, every frame once.
    let plan = daemon.json(&["plan", &id, "--duration", "1s"]);
    assert_eq!(plan["strategy"], "heat", "{plan}");
    assert_eq!(plan["frames"], FRAMES, "{plan}");
    let segments = plan["segments"].as_array().expect("segments");
    let kinds: Vec<&str> = segments
        .iter()
        .map(|s| s["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["read-only", "untouched", "read-write"], "{plan}");
    let sizes: u64 = segments.iter().map(|s| s["pages"].as_u64().unwrap()).sum();
    assert_eq!(sizes, FRAMES, "{plan}");
    for segment in segments {
        let first = segment["first"].as_array().expect("first pages");
        let pages = segment["pages"].as_u64().unwrap();
        assert_eq!(first.len() as u64, pages.min(16), "{segment}");
        assert!(first.iter().all(|p| p.as_u64() < Some(FRAMES)), "{segment}");
    }
    assert!(
        segments[2]["pages"].as_u64() > Some(0),
        "hotspot writes, so some pages are read-write: {plan}"
    );
    assert!(plan["profile"]["epochs"].as_u64() >= Some(4), "{plan}");
    assert_eq!(plan["held_back"]["kind"], "held-back", "{plan}");

    // Address plan: one segment, the frames in order, no profiling.
    let started = Instant::now();
    let address = daemon.json(&["plan", &id, "--strategy", "address"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "address order needs no profile"
    );
    assert_eq!(address["segments"][0]["kind"], "address", "{address}");
    assert_eq!(address["segments"][0]["pages"], FRAMES, "{address}");
    let first: Vec<u64> = address["segments"][0]["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(first, (0..16).collect::<Vec<_>>());
    assert!(address["profile"].is_null() && address["held_back"].is_null());

    let (code, text, stderr) = daemon.cli(&["plan", &id, "--duration", "400ms"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("1. read-only, hot to cold:"), "{text}");
    assert!(text.contains("2. untouched:"), "{text}");
    assert!(text.contains("3. read-write, cold to hot:"), "{text}");
    assert!(text.contains("first 16 pages"), "{text}");
}

#[test]
fn bad_input_gets_one_clear_error_and_changes_nothing() {
    if let Some(why) = unavailable() {
        return skip("bad_input_gets_one_clear_error_and_changes_nothing", &why);
    }
    let daemon = Daemon::start();
    let id = launch_hotspot(&daemon);
    for args in [
        vec!["heat", "p999-000000"],
        vec!["plan", "p999-000000"],
        vec!["plan", "p999-000000", "--strategy", "address"],
    ] {
        let (code, stdout, stderr) = daemon.cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(
            stderr.contains("no partition with id `p999-000000`"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one error: {stderr}");
    }
    for duration in ["0s", "100ms", "61s", "1h"] {
        for command in ["heat", "plan"] {
            let started = Instant::now();
            let (code, stdout, stderr) = daemon.cli(&[command, &id, "--duration", duration]);
            assert_ne!(code, 0, "{command} --duration {duration}");
            assert!(stdout.is_empty(), "{stdout}");
            assert!(
                stderr.contains("between 200 ms and 60 s"),
                "{command} --duration {duration}: {stderr}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "refused at once, not after profiling"
            );
        }
    }
    let (code, _, stderr) = daemon.cli(&["heat", &id, "--duration", "soon"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--duration"), "{stderr}");
    // Nothing changed: the partition runs clean, and a good call still works.
    daemon.runs_clean(&id, 10_000, 0, "after bad input");
    let heat = daemon.json(&["heat", &id, "--duration", "400ms"]);
    check_heat_shape(&heat, &id);
}

/// Two `heat` calls on one partition at once, the second opened and closed inside the first,
/// and a dashboard polling throughout: one shared profiler serves them all, each window counts
/// its own span of the shared counts.
#[test]
fn two_overlapping_windows_count_independently() {
    if let Some(why) = unavailable() {
        return skip("two_overlapping_windows_count_independently", &why);
    }
    let daemon = Daemon::start();
    let id = launch_hotspot(&daemon);
    // Alone first: the pace of faults to compare with.
    let alone = daemon.json(&["heat", &id, "--duration", "1s"]);
    let alone_pages = check_heat_shape(&alone, &id);
    let alone_rate = faults(&alone_pages) as f64 / epochs(&alone).max(1) as f64;
    assert!(alone_rate > 0.0, "{alone}");

    let (long, short, dashboards) = thread::scope(|s| {
        let long = s.spawn(|| daemon.json(&["heat", &id, "--duration", "3s"]));
        thread::sleep(Duration::from_millis(800));
        let short = s.spawn(|| daemon.json(&["heat", &id, "--duration", "1s"]));
        let dashboards: Vec<Value> = (0..4)
            .map(|_| {
                thread::sleep(Duration::from_millis(300));
                daemon.json(&["dash", &id, "--once"])
            })
            .collect();
        (
            long.join().expect("the long window"),
            short.join().expect("the short window"),
            dashboards,
        )
    });
    let long_pages = check_heat_shape(&long, &id);
    let short_pages = check_heat_shape(&short, &id);
    // Each has its own epochs: not advanced twice as often by two drivers (at most one more
    // than fit), and not cut short (at least three fifths: a loaded machine runs some epochs
    // late, and fewer fit).
    assert!(
        (9..=16).contains(&epochs(&long)),
        "3 s is 15 epochs: {}",
        epochs(&long)
    );
    assert!(
        (3..=6).contains(&epochs(&short)),
        "1 s is 5 epochs: {}",
        epochs(&short)
    );
    assert!(epochs(&long) > epochs(&short), "{long} {short}");
    // Neither zeroed.
    assert!(faults(&long_pages) > 0, "{long}");
    assert!(faults(&short_pages) > 0, "{short}");
    // The short window lies inside the long one, so each of its pages was counted at least
    // as often by the long one: a window that reset or took the other's counts breaks this.
    for (page, (reads, writes)) in &short_pages {
        let (long_reads, long_writes) = long_pages.get(page).copied().unwrap_or_default();
        assert!(
            long_reads >= *reads && long_writes >= *writes,
            "page {page}: short window {reads}r/{writes}w, long window {long_reads}r/{long_writes}w"
        );
    }
    assert!(faults(&long_pages) > faults(&short_pages));
    // And neither counted double: per epoch, each is at the pace of a window alone. A window
    // that counted the other's faults too, or its own twice, would be at twice that pace, so
    // the bound is well under 2x; the sampler's budget keeps the pace steady between windows.
    for (name, pages, heat) in [
        ("long", &long_pages, &long),
        ("short", &short_pages, &short),
    ] {
        let rate = faults(pages) as f64 / epochs(heat).max(1) as f64;
        assert!(
            rate < alone_rate * 1.6 && rate > alone_rate / 1.6,
            "{name}: {rate:.0} faults an epoch, {alone_rate:.0} alone"
        );
    }
    // The dashboard shared the profiler without an error.
    for snapshot in &dashboards {
        assert!(snapshot["error"].is_null(), "{snapshot}");
        assert_eq!(snapshot["heat"]["frames"], FRAMES, "{snapshot}");
    }
    assert!(
        dashboards.last().unwrap()["heat"]["epochs"].as_u64() > Some(5),
        "the dashboard's heat advanced with the windows: {}",
        dashboards.last().unwrap()
    );
}

/// A migration takes the partition's vCPU threads from its shared profiler: the open window
/// ends with a clear error, the migration (which profiles with its own) completes, and while
/// it runs no new window starts and the dashboard shows no heat.
#[test]
fn a_migration_ends_open_windows_and_completes() {
    if let Some(why) = unavailable() {
        return skip("a_migration_ends_open_windows_and_completes", &why);
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let id = launch_hotspot(&source);
    let (window, report) = thread::scope(|s| {
        let window = s.spawn(|| source.cli(&["heat", &id, "--duration", "20s"]));
        thread::sleep(Duration::from_millis(1000));
        let migration = s.spawn(|| {
            source.migrate_checked(
                &destination,
                &id,
                // Uncapped, so the profile takes its whole window: a budgeted one stops as
                // soon as it has spent its share, before the checks below could look.
                &["--strategy", "heat", "--heat-budget", "off"],
                "heat window open",
            )
        });
        // While the migration profiles, a new window is refused rather than stealing its
        // threads. It profiles once the partition says it migrates (after the guest's pace
        // is measured, a second, and the destination is prepared), for its 2 s window.
        let deadline = Instant::now() + Duration::from_secs(10);
        while source.json(&["status", &id])["state"] != "migrating" {
            assert!(Instant::now() < deadline, "the migration never began");
            thread::sleep(Duration::from_millis(20));
        }
        let (code, _, stderr) = source.cli(&["heat", &id, "--duration", "200ms"]);
        let during = (code, stderr);
        // The dashboard asks too: no error, and no heat while the migration profiles.
        let snapshot = source.json(&["dash", &id, "--once"]);
        assert_eq!(snapshot["partition"]["state"], "migrating", "{snapshot}");
        assert!(snapshot["error"].is_null(), "{snapshot}");
        assert_eq!(snapshot["heat"]["epochs"], 0, "{snapshot}");
        assert_eq!(snapshot["heat"]["frames"], FRAMES, "{snapshot}");
        let (report, _) = migration.join().expect("the migration");
        (window.join().expect("the window"), (report, during))
    });
    let (report, (code, stderr)) = report;
    assert_eq!(report["strategy"], "heat", "{report}");
    assert_ne!(code, 0, "a window opened during the migration");
    assert!(stderr.contains("is migrating"), "{stderr}");
    let (code, stdout, stderr) = window;
    assert_ne!(code, 0, "the window cannot outlive its profiler: {stdout}");
    assert!(
        stderr.contains("stopped before the window ended"),
        "{stderr}"
    );
}

/// The plan's heat travels with the guest: on the destination a heat window starts warm
/// (pages with heat at once, before its own sampling could find them all), and a migration
/// back plans from it without profiling.
#[test]
fn heat_travels_with_the_guest_and_plans_the_way_back() {
    if let Some(why) = unavailable() {
        return skip("heat_travels_with_the_guest_and_plans_the_way_back", &why);
    }
    // Profiled on demand, so the first migration's heat is its own burst's and the
    // destination's windows see what the source carried rather than warm heat.
    let source = Daemon::start_with(&["--heat-profile", "on-demand"]);
    let destination = Daemon::start_with(&["--heat-profile", "on-demand"]);
    let id = launch_hotspot(&source);
    // Uncapped: a budgeted profile may stop once it has found the hot region at the start of
    // memory, all of which one epoch's sampling on the destination checks too, and the check
    // below could not tell carried heat from sampled.
    let (there, _) = source.migrate_checked(
        &destination,
        &id,
        &["--strategy", "heat", "--heat-budget", "off"],
        "out",
    );
    assert_eq!(there["plan_heat"], "profiled", "{there}");
    assert_eq!(there["heat_carried"], true, "{there}");
    let moved = there["id_on_destination"]
        .as_str()
        .expect("an id")
        .to_string();
    // One epoch: on its own the sampler checks an eighth of the frames in it.
    let warm = destination.json(&["heat", &moved, "--duration", "200ms"]);
    let pages = check_heat_shape(&warm, &moved);
    // The source's profile found more pages than one epoch of sampling can check.
    assert!(pages.len() as u64 > FRAMES / 8, "{} pages", pages.len());
    // Back in post-copy, whose source hands the heat on after the finish has ended the
    // session.
    let (back, _) = destination.migrate_checked(
        &source,
        &moved,
        &["--strategy", "heat", "--mode", "hybrid"],
        "back",
    );
    assert_eq!(back["plan_heat"], "carried", "{back}");
    assert_eq!(back["heat_carried"], true, "{back}");
    let home = back["id_on_destination"]
        .as_str()
        .expect("an id")
        .to_string();
    let (out_again, _) =
        source.migrate_checked(&destination, &home, &["--strategy", "heat"], "out again");
    assert_eq!(out_again["plan_heat"], "carried", "{out_again}");
    // Address order neither uses nor hands on heat.
    let there_again = out_again["id_on_destination"]
        .as_str()
        .expect("an id")
        .to_string();
    let (again, _) =
        destination.migrate_checked(&source, &there_again, &["--strategy", "address"], "address");
    assert!(again["plan_heat"].is_null(), "{again}");
    assert_eq!(again["heat_carried"], false, "{again}");
}

/// `serve --heat-epoch --heat-sample-fraction`: bad values are refused with one clear error
/// before the daemon serves; good ones set the epoch windows are made of and the least window.
#[test]
fn the_daemon_samples_as_its_options_say() {
    if let Some(why) = unavailable() {
        return skip("the_daemon_samples_as_its_options_say", &why);
    }
    for (args, message) in [
        (["--heat-sample-fraction", "0"], "(0, 1]"),
        (["--heat-sample-fraction", "3/2"], "(0, 1]"),
        (["--heat-sample-fraction", "most"], "(0, 1]"),
        (["--heat-epoch", "5ms"], "between 10 ms and 1 s"),
        (["--heat-epoch", "2s"], "between 10 ms and 1 s"),
        (["--heat-recheck-fraction", "3/2"], "[0, 1]"),
        (["--heat-recheck-fraction", "2"], "[0, 1]"),
    ] {
        let output = heatprobe_tests::daemon::migrator_command(None, None)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("run migrator serve");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} accepted");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("serving on"), "{args:?}: {stderr}");
        // One error line (clap adds a pointer to --help for an option it refused).
        let errors = stderr.lines().filter(|l| l.contains("error")).count();
        assert_eq!(errors, 1, "one error: {stderr}");
    }
    let daemon = Daemon::start_with(&[
        "--heat-epoch",
        "100ms",
        "--heat-sample-fraction",
        "1/4",
        "--heat-recheck-fraction",
        "1/16",
    ]);
    let id = launch_hotspot(&daemon);
    // 100 ms is a window now, and 1 s is ten epochs of it.
    let short = daemon.json(&["heat", &id, "--duration", "100ms"]);
    assert_eq!(short["interval_ms"], 100, "{short}");
    let heat = daemon.json(&["heat", &id, "--duration", "1s"]);
    assert_eq!(heat["interval_ms"], 100, "{heat}");
    // At most one more than fit; at least three fifths (some may run late).
    assert!(
        (6..=11).contains(&epochs(&heat)),
        "a 1 s window is ten epochs of 100 ms: {}",
        epochs(&heat)
    );
    let (code, _, stderr) = daemon.cli(&["heat", &id, "--duration", "50ms"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("between 100 ms and 60 s"), "{stderr}");
}

/// `serve --heat-pool`: a hot region at the start of memory is seen by the test, and its
/// window's heat is pooled over neighbouring frames, so frames the guest never touched within
/// it are listed with their neighbourhood's heat and no counts of their own. Without it
/// (every other test here), a listed page was always touched.
#[test]
fn a_pooling_daemon_lists_frames_their_neighbours_heat() {
    if let Some(why) = unavailable() {
        return skip("a_pooling_daemon_lists_frames_their_neighbours_heat", &why);
    }
    let daemon = Daemon::start_with(&["--heat-pool"]);
    let id = launch_hotspot(&daemon);
    let heat = daemon.json(&["heat", &id, "--duration", "2s"]);
    let pages = heat["pages"].as_array().expect("pages");
    let pooled = pages
        .iter()
        .filter(|p| p["reads"] == 0 && p["writes"] == 0 && p["heat"].as_f64() > Some(0.0))
        .count();
    assert!(
        pooled > 0,
        "no frame was given its neighbours' heat: {heat}"
    );
    // The hottest frames are those of the hot region, the first 64th of the data.
    let mut by_heat: Vec<(f64, u64)> = pages
        .iter()
        .map(|p| {
            (
                p["heat"].as_f64().unwrap_or(0.0),
                p["page"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    by_heat.sort_by(|a, b| b.0.total_cmp(&a.0));
    let hottest = by_heat.first().map(|&(_, page)| page).expect("a page");
    assert!(
        hottest < FRAMES / 8,
        "the hottest frame is {hottest}: {heat}"
    );
}
