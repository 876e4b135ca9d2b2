//! One process per partition: partitions outlive their daemon, a restarted daemon adopts
//! them, a partition process's death is reported `crashed` and touches no other partition,
//! and a migration whose source daemon dies goes on in the partition's process.

use std::{
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{
    bpf_unavailable,
    daemon::{Daemon, DaemonConfig, process_runs, wait_gone},
    kvm_unavailable, skip,
};
use serde_json::Value;

fn launch(daemon: &Daemon, workload: &str, mem: &str) -> String {
    daemon.json(&["launch", "--workload", workload, "--mem", mem])["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

/// How many eBPF programs process `pid` holds open.
fn bpf_programs(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-prog")
                })
                .count()
        })
        .unwrap_or(0)
}

fn ops(status: &Value) -> u64 {
    status["ops"].as_u64().unwrap_or(0)
}

fn pid(status: &Value) -> u32 {
    status["pid"].as_u64().expect("a partition process's pid") as u32
}

/// `migrator migrate --json` of `id` from `source` to `destination`, in address order and
/// paced at 400 Mbit/s: round 0 of a 256 MiB guest lasts about five seconds.
fn paced_migrate(source: &Daemon, destination: &Daemon, id: &str) -> std::process::Command {
    let mut command = source.command();
    command.args([
        "migrate",
        "--json",
        "--from",
        &source.addr,
        "--to",
        &destination.addr,
        id,
        "--strategy",
        "address",
        "--bandwidth-limit",
        "400mbit",
    ]);
    command
}

/// Polls `status ID` until `done` holds of it, for up to `within`.
fn wait_status(
    daemon: &Daemon,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let status = daemon.json(&["status", id]);
        if done(&status) || Instant::now() > deadline {
            return status;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn partitions_outlive_a_killed_daemon_and_migrate_after_its_restart() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "partitions_outlive_a_killed_daemon_and_migrate_after_its_restart",
            &why,
        );
    }
    let mut source = Daemon::start();
    let destination = Daemon::start();
    let ids = [
        launch(&source, "rw-mix", "64M"),
        launch(&source, "kv-zipf", "64M"),
    ];
    let mut before = Vec::new();
    for id in &ids {
        let status = source.wait_progress(id, 1, 1);
        before.push((ops(&status), pid(&status)));
    }
    let daemon_pid = source.pid();
    source.kill_daemon_only();
    assert!(!process_runs(daemon_pid), "the daemon is dead");
    thread::sleep(Duration::from_millis(500));
    for (_, pid) in &before {
        assert!(
            process_runs(*pid),
            "partition process {pid} died with its daemon"
        );
    }
    let restarting = Instant::now();
    source
        .restart()
        .expect("restart the daemon on the same address");
    let listed = source.json(&["list"]);
    eprintln!(
        "supervision: daemon killed, restarted and listing its 2 partitions in {:.0?}",
        restarting.elapsed()
    );
    let listed = listed.as_array().expect("a list");
    for (id, (ops_before, pid_before)) in ids.iter().zip(&before) {
        let entry = listed
            .iter()
            .find(|p| p["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is not listed after the restart: {listed:?}"));
        assert_eq!(entry["state"], "running", "{entry}");
        assert_eq!(entry["errors"], 0, "{entry}");
        assert_eq!(pid(entry), *pid_before, "{entry}");
        assert!(
            ops(entry) > *ops_before,
            "{id}: {} ops after the restart, {ops_before} before",
            ops(entry)
        );
        assert!(
            entry["process_rss_anon_bytes"].as_u64() > Some(0),
            "{entry}"
        );
        eprintln!(
            "supervision: {id} ({}) adopted: {ops_before} ops before the kill, {} after the \
             restart, 0 errors, process {pid_before}",
            entry["image"],
            ops(entry)
        );
    }
    for id in &ids {
        let (_, moved) = source.migrate_checked(
            &destination,
            id,
            &["--profile-window", "200ms"],
            "an adopted partition migrates",
        );
        destination.runs_clean(&moved, 1, 1, "an adopted partition, migrated");
        if bpf_unavailable().is_none() {
            // The destination's process loaded the eBPF probes to count the guest's faults
            // after its resume; once that window is over and counted, it unloads them.
            let arrived = pid(&destination.json(&["status", &moved]));
            let deadline = Instant::now() + Duration::from_secs(20);
            while bpf_programs(arrived) > 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
            assert_eq!(
                bpf_programs(arrived),
                0,
                "process {arrived} still holds eBPF programs after its fault window"
            );
        }
        let left = source.json(&["status", id]);
        assert_eq!(left["state"], "stopped", "{left}");
    }
    // The source's processes ended with their partitions' move.
    for (_, pid) in &before {
        assert!(
            wait_gone(*pid, Duration::from_secs(10)),
            "process {pid} outlived its migrated partition"
        );
    }
}

#[test]
fn a_killed_partition_process_is_reported_crashed_and_the_others_run_on() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_killed_partition_process_is_reported_crashed_and_the_others_run_on",
            &why,
        );
    }
    let daemon = Daemon::start();
    let victim = launch(&daemon, "rw-mix", "64M");
    let bystander = launch(&daemon, "kv-zipf", "64M");
    let victim_status = daemon.wait_progress(&victim, 1, 1);
    daemon.wait_progress(&bystander, 1, 1);
    let killed = Instant::now();
    // SAFETY: kill(2) with a plain signal on the partition's process.
    unsafe { libc::kill(pid(&victim_status) as libc::pid_t, libc::SIGKILL) };
    let crashed = wait_status(&daemon, &victim, Duration::from_secs(10), |s| {
        s["state"] == "crashed"
    });
    assert_eq!(crashed["state"], "crashed", "{crashed}");
    eprintln!(
        "supervision: a killed partition process reported crashed within {:.0?}: {}",
        killed.elapsed(),
        crashed["crash_reason"]
    );
    let reason = crashed["crash_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("SIGKILL"), "the cause is named: {crashed}");
    assert!(crashed["pid"].is_null(), "{crashed}");
    daemon.runs_clean(&bystander, 1, 1, "the other partition runs on");
    let (code, _, stderr) = daemon.cli(&["resume", &victim]);
    assert_ne!(code, 0, "a crashed partition cannot resume");
    assert!(stderr.contains("crashed"), "{stderr}");
    // The daemon still launches.
    let another = launch(&daemon, "idle", "16M");
    daemon.wait_progress(&another, 1, 0);
}

#[test]
fn a_stopped_daemon_leaves_its_guests_running_unless_told_to_stop_them() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_stopped_daemon_leaves_its_guests_running_unless_told_to_stop_them",
            &why,
        );
    }
    let mut daemon = Daemon::start();
    let id = launch(&daemon, "rw-mix", "32M");
    let status = daemon.wait_progress(&id, 1, 1);
    let guest = pid(&status);
    // SIGTERM with the default `--on-exit keep`.
    // SAFETY: kill(2) with a plain signal on our child.
    unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) };
    let _ = daemon.child.wait();
    thread::sleep(Duration::from_millis(300));
    assert!(process_runs(guest), "SIGTERM stopped the guest");
    daemon.restart().expect("restart");
    let adopted = daemon.wait_progress(&id, ops(&status) + 1, 0);
    assert_eq!(adopted["state"], "running", "{adopted}");
    assert_eq!(adopted["errors"], 0, "{adopted}");
    // `migrator stop` ends the partition and its process.
    let stopped = daemon.json(&["stop", &id]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(
        wait_gone(guest, Duration::from_secs(10)),
        "a stopped partition's process ended"
    );
    // With `--on-exit stop`, SIGTERM stops the partitions first.
    let daemon = Daemon::start_config(DaemonConfig::default().args(&["--on-exit", "stop"]));
    let id = launch(&daemon, "rw-mix", "32M");
    let guest = pid(&daemon.wait_progress(&id, 1, 1));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) };
    assert!(
        wait_gone(guest, Duration::from_secs(20)),
        "--on-exit stop left the guest running"
    );
}

#[test]
fn a_migration_goes_on_when_its_source_daemon_is_killed() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_migration_goes_on_when_its_source_daemon_is_killed", &why);
    }
    let mut source = Daemon::start();
    let destination = Daemon::start();
    let id = launch(&source, "rw-mix", "256M");
    source.wait_progress(&id, 1, 1);
    // Paced so that it runs for seconds: 256 MiB at 400 Mbit/s.
    let mut migrating = paced_migrate(&source, &destination, &id)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start migrate");
    wait_status(&source, &id, Duration::from_secs(10), |s| {
        s["state"] == "migrating"
    });
    let killed = Instant::now();
    source.kill_daemon_only();
    // The client loses its daemon; the migration does not.
    let _ = migrating.wait();
    source.restart().expect("restart the source daemon");
    let left = wait_status(&source, &id, Duration::from_secs(60), |s| {
        s["state"] == "stopped"
    });
    assert_eq!(left["state"], "stopped", "the move completed: {left}");
    eprintln!(
        "supervision: source daemon killed mid-migration; the move completed, seen from the \
         restarted daemon {:.1?} after the kill",
        killed.elapsed()
    );
    let arrived = destination.json(&["list"]);
    let running: Vec<&Value> = arrived
        .as_array()
        .expect("a list")
        .iter()
        .filter(|p| p["state"] == "running")
        .collect();
    assert_eq!(
        running.len(),
        1,
        "one copy runs on the destination: {arrived}"
    );
    let moved = running[0]["id"].as_str().expect("an id").to_string();
    destination.runs_clean(&moved, 1, 1, "a migration whose source daemon died");
}

#[test]
fn a_migration_goes_on_when_its_destination_daemon_restarts_under_it() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_migration_goes_on_when_its_destination_daemon_restarts_under_it",
            &why,
        );
    }
    let source = Daemon::start();
    let mut destination = Daemon::start();
    let id = launch(&source, "rw-mix", "256M");
    source.wait_progress(&id, 1, 1);
    // Round 0 of 256 MiB at 400 Mbit/s takes about five seconds: the destination's daemon is
    // killed and restarted inside it, while its partition process receives.
    let migrating = {
        let mut command = paced_migrate(&source, &destination, &id);
        thread::spawn(move || command.output().expect("run migrate"))
    };
    wait_status(&source, &id, Duration::from_secs(10), |s| {
        s["state"] == "migrating"
    });
    thread::sleep(Duration::from_millis(500));
    destination.kill_daemon_only();
    thread::sleep(Duration::from_millis(500));
    destination
        .restart()
        .expect("restart the destination daemon");
    let output = migrating.join().expect("the migrate thread");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&output.stderr)));
    eprintln!(
        "supervision: destination daemon restarted mid-migration: {} ({})",
        report["status"], report["error"]
    );
    // The data went from process to process; the source found its control connection to
    // the killed daemon closed at the commit, opened a new one to the restarted daemon, and
    // that forwarded the commit to the adopted process. Had the restart come too late, the
    // migration would have ended as on a peer failure, with one copy running all the same.
    let settled = wait_status(&source, &id, Duration::from_secs(60), |s| {
        s["state"] == "running" || s["state"] == "stopped"
    });
    let arrived = destination.json(&["list"]);
    let running: Vec<&Value> = arrived
        .as_array()
        .expect("a list")
        .iter()
        .filter(|p| p["state"] == "running")
        .collect();
    eprintln!(
        "supervision: after it, the source's copy is {}; the destination runs {}",
        settled["state"],
        running.len()
    );
    heatprobe_tests::daemon::assert_completed(&report, "destination daemon restarted");
    assert_eq!(settled["state"], "stopped", "{settled}");
    assert_eq!(running.len(), 1, "{arrived}");
    let moved = running[0]["id"].as_str().expect("an id").to_string();
    assert_eq!(report["id_on_destination"], moved.as_str(), "{report}");
    destination.runs_clean(
        &moved,
        1,
        1,
        "a migration whose destination daemon restarted",
    );
}
