//! One owner per guest: while a migration holds a partition, every call that would change it
//! is refused on either side, naming the migration; migrations are jobs that can be listed,
//! cancelled before their handover, steered and waited for, whoever started them. Two
//! daemons on loopback, real KVM.

use std::{
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{
    daemon::{Daemon, assert_completed},
    kvm_unavailable, skip,
};
use serde_json::Value;

/// A partition that dirties every page, so that paced rounds last seconds.
fn launch_busy(daemon: &Daemon, mem: &str) -> String {
    daemon.json(&[
        "launch",
        "--workload",
        "uniform-write",
        "--args",
        "check_every=20000",
        "--mem",
        mem,
    ])["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

/// `migrate --detach`: the migration's id.
fn detach(from: &Daemon, to: &Daemon, id: &str, extra: &[&str]) -> String {
    let output = from
        .command()
        .args([
            "migrate", "--json", "--detach", "--from", &from.addr, "--to", &to.addr, id,
        ])
        .args(extra)
        .output()
        .expect("run migrator migrate --detach");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_str(&printed).expect("one JSON object");
    answer["migration"].as_str().expect("an id").to_string()
}

/// The migration `migration` as `migrations --json` lists it on `daemon`.
fn listed(daemon: &Daemon, migration: &str) -> Option<Value> {
    daemon
        .json(&["migrations"])
        .as_array()
        .expect("a list")
        .iter()
        .find(|m| m["id"] == migration)
        .cloned()
}

/// Waits until migration `migration` on `daemon` is in phase `phase`.
fn wait_phase(daemon: &Daemon, migration: &str, phase: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = listed(daemon, migration).expect("listed");
        if listed["phase"] == phase {
            return listed;
        }
        assert!(listed["status"].is_null(), "ended before {phase}: {listed}");
        assert!(Instant::now() < deadline, "never {phase}: {listed}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// `migrator ARGS ID` on `daemon` is refused, with one error line naming `names`.
fn refused(daemon: &Daemon, args: &[&str], names: &str, case: &str) {
    let (code, stdout, stderr) = daemon.cli(args);
    assert_ne!(code, 0, "{case}: {args:?} was accepted: {stdout}");
    assert!(stderr.contains(names), "{case}: {args:?}: {stderr}");
}

/// The daemon's `wait` on migration `migration`: the report.
fn wait(daemon: &Daemon, migration: &str) -> (i32, Value) {
    let (code, stdout, stderr) = daemon.cli(&["wait", migration, "--json"]);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|_| Value::String(format!("no report; stderr: {stderr}")));
    (code, report)
}

#[test]
fn calls_that_would_change_a_migrating_partition_are_refused_and_a_cancel_rolls_back() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "calls_that_would_change_a_migrating_partition_are_refused_and_a_cancel_rolls_back",
            &why,
        );
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let other = Daemon::start();
    let id = launch_busy(&source, "64M");
    source.wait_progress(&id, 5, 1);
    let migration = detach(
        &source,
        &destination,
        &id,
        &[
            "--strategy",
            "address",
            "--bandwidth-limit",
            "8M",
            "--max-rounds",
            "4",
        ],
    );
    assert!(migration.starts_with(&format!("{id}.m")), "{migration}");
    let row = wait_phase(&source, &migration, "precopy");
    assert_eq!(row["side"], "source", "{row}");
    assert_eq!(row["partition"], id.as_str(), "{row}");
    assert_eq!(row["cancellable"], true, "{row}");
    // Every call that changes the partition names the migration that holds it.
    for call in ["resume", "pause", "stop", "reconcile"] {
        refused(&source, &[call, &id], &migration, call);
    }
    let (code, report) = source.migrate(&other, &id, &["--strategy", "address"]);
    assert_ne!(code, 0, "a second migration was accepted: {report}");
    assert!(report.to_string().contains(&migration), "{report}");
    // The destination holds a session of it.
    let incoming = destination.json(&["migrations"]);
    assert!(
        incoming
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["side"] == "destination"),
        "{incoming}"
    );
    // Steering: a new limit is taken; a post-copy switch is refused for pre-copy.
    let steered = source.json(&["limits", &migration, "--bandwidth-limit", "16M"]);
    assert_eq!(steered["id"], migration.as_str(), "{steered}");
    refused(&source, &["postcopy", &migration], "hybrid", "postcopy");
    // The cancel: the guest runs on here, the destination frees everything.
    let cancelled = source.json(&["cancel", &migration]);
    assert_eq!(cancelled["id"], migration.as_str(), "{cancelled}");
    let (code, report) = wait(&source, &migration);
    assert_ne!(code, 0, "{report}");
    assert_eq!(report["status"], "cancelled", "{report}");
    assert_eq!(report["guest_location"], "source", "{report}");
    assert_eq!(report["migration"], migration.as_str(), "{report}");
    source.runs_clean(&id, 1000, 1, "after the cancel");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !destination.json(&["list"]).as_array().unwrap().is_empty()
        || !destination
            .json(&["migrations"])
            .as_array()
            .unwrap()
            .is_empty()
    {
        assert!(Instant::now() < deadline, "the destination kept something");
        thread::sleep(Duration::from_millis(100));
    }
    // Over: a second cancel says so, and changes nothing.
    refused(&source, &["cancel", &migration], "over", "a late cancel");
    // And the partition is an ordinary one again: it migrates.
    source.migrate_checked(
        &destination,
        &id,
        &["--strategy", "address"],
        "after the cancel",
    );
}

#[test]
fn neither_copy_of_a_post_copy_can_be_resumed_or_stopped_and_the_switch_is_on_demand() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "neither_copy_of_a_post_copy_can_be_resumed_or_stopped_and_the_switch_is_on_demand",
            &why,
        );
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let id = launch_busy(&source, "64M");
    source.wait_progress(&id, 5, 1);
    // Rounds that would never end on their own (no set fits a millisecond, and throttling
    // never gives up before the round limit): the switch to post-copy is the operator's.
    let migration = detach(
        &source,
        &destination,
        &id,
        &[
            "--strategy",
            "address",
            "--mode",
            "hybrid",
            "--bandwidth-limit",
            "8M",
            "--max-rounds",
            "1000",
            "--converge",
            "throttle",
            "--downtime-limit",
            "1ms",
            "--fault-window",
            "0s",
        ],
    );
    wait_phase(&source, &migration, "precopy");
    let switched = source.json(&["postcopy", &migration]);
    assert_eq!(switched["id"], migration.as_str(), "{switched}");
    let row = wait_phase(&source, &migration, "postcopy");
    assert_eq!(row["cancellable"], false, "{row}");
    // The source's copy: paused, holding the pages; resuming it would run the guest twice.
    for call in ["resume", "stop", "pause", "reconcile"] {
        refused(&source, &[call, &id], &migration, call);
    }
    refused(
        &source,
        &["cancel", &migration],
        "handover",
        "a cancel after it",
    );
    // The destination's copy belongs to the session until every page is there.
    let arrived = destination.json(&["list"]);
    let [copy] = arrived.as_array().unwrap().as_slice() else {
        panic!("the destination lists one copy: {arrived}");
    };
    let there = copy["id"].as_str().unwrap().to_string();
    for call in ["stop", "resume", "pause"] {
        refused(&destination, &[call, &there], "session", call);
    }
    // Status never waits on a page that has not arrived.
    let asked = Instant::now();
    destination.json(&["status", &there]);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "status took {:?}",
        asked.elapsed()
    );
    let (code, report) = wait(&source, &migration);
    assert_eq!(code, 0, "{report}");
    assert_completed(&report, "switched to post-copy");
    assert_eq!(report["cutover_reason"], "requested", "{report}");
    let there = report["id_on_destination"].as_str().unwrap();
    destination.runs_clean(there, 1000, 1, "after the switch");
}

#[test]
fn a_partition_whose_process_does_not_answer_is_shown_so_and_stalls_no_other() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_partition_whose_process_does_not_answer_is_shown_so_and_stalls_no_other",
            &why,
        );
    }
    let daemon = Daemon::start();
    let wedged = launch_busy(&daemon, "32M");
    let healthy = launch_busy(&daemon, "32M");
    daemon.wait_progress(&wedged, 5, 1);
    let pid = daemon
        .partition_processes()
        .into_iter()
        .find(|(id, _)| *id == wedged)
        .map(|(_, pid)| pid)
        .expect("its process");
    // SIGSTOP: the process neither answers nor dies, as one wedged on a page would.
    // SAFETY: kill(2) with a plain signal number; no memory is passed.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let asked = Instant::now();
    let list = daemon.json(&["list"]);
    let listed_in = asked.elapsed();
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == wedged.as_str())
        .cloned();
    let asked = Instant::now();
    let status = daemon.json(&["status", &wedged]);
    let status_in = asked.elapsed();
    // The other partition is served meanwhile.
    daemon.runs_clean(&healthy, 1000, 1, "beside the wedged one");
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let row = row.expect("the wedged partition is listed");
    assert!(row["unanswered_ms"].is_u64(), "{row}");
    assert!(
        listed_in < Duration::from_secs(5),
        "list took {listed_in:?}"
    );
    assert!(status["unanswered_ms"].is_u64(), "{status}");
    assert!(
        status_in < Duration::from_secs(8),
        "status took {status_in:?}"
    );
    // Answering again, it is shown as it is.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = daemon.json(&["status", &wedged]);
        if status["unanswered_ms"].is_null() {
            assert_eq!(status["errors"], 0, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "still unanswered: {status}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_migration_runs_to_its_end_when_its_caller_goes_away() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_migration_runs_to_its_end_when_its_caller_goes_away",
            &why,
        );
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let id = launch_busy(&source, "64M");
    source.wait_progress(&id, 5, 1);
    let mut caller = source
        .command()
        .args([
            "migrate",
            "--json",
            "--from",
            &source.addr,
            "--to",
            &destination.addr,
        ])
        .arg(&id)
        .args(["--strategy", "address", "--bandwidth-limit", "16M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run migrator migrate");
    let deadline = Instant::now() + Duration::from_secs(30);
    let migration = loop {
        let found = source
            .json(&["migrations"])
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["partition"] == id.as_str() && m["phase"] == "precopy")
            .cloned();
        if let Some(found) = found {
            break found["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "never in pre-copy");
        thread::sleep(Duration::from_millis(50));
    };
    // SIGKILL: no cancel is sent, the connection just goes.
    caller.kill().expect("kill the caller");
    caller.wait().expect("reap it");
    let (code, report) = wait(&source, &migration);
    assert_eq!(code, 0, "{report}");
    assert_completed(&report, "its caller killed");
    // Its bookkeeping ran: the copy here is recorded as moved, and a new migration is
    // admitted (the slot was given back).
    assert_eq!(source.json(&["status", &id])["state"], "stopped");
    let there = report["id_on_destination"].as_str().unwrap();
    destination.runs_clean(there, 1000, 1, "moved without its caller");
    destination.migrate_checked(&source, there, &["--strategy", "address"], "and back");
}
