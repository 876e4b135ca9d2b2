//! A randomized fault-and-race test, seeded and reproducible: random API calls (migrate in
//! either mode, resume, pause, stop, cancel, reconcile, switch to post-copy, change limits)
//! race each other and the migrations they start, on guests that move between two namespace
//! hosts (mutual TLS, 3 s peer timeout); now and then a daemon is killed with SIGKILL and
//! restarted (its partitions run on and are adopted), a partition process is killed with
//! SIGKILL, or the link is cut for up to 4 s. A checker samples both hosts throughout and
//! holds the invariants against the whole history:
//!
//! - never two running copies of one guest: no two copies whose operations both advanced in
//!   an interval that began with one of them `running` (past its handover), nor in two
//!   intervals in a row;
//! - zero guest self-check errors on any copy, ever;
//! - every migration that reports `completed` has equal digests;
//! - at the end, exactly one copy of each guest that was not stopped on purpose runs, once
//!   `reconcile` has settled any left awaiting a handover; a guest one of whose processes was
//!   killed may have lost its only copy (a host's loss), but never runs twice.
//!
//! `HEATPROBE_RACE_SEED` replays a run; `cargo xtask test` runs 30 operations, `--long` 150.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{
    daemon::{Daemon, DaemonConfig, make_certs},
    kvm_unavailable,
    netns::{HostPair, netns_unavailable},
    skip,
};
use serde_json::Value;

/// xorshift64*: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One copy of a guest as a host lists it.
#[derive(Clone, Debug)]
struct Copy {
    host: usize,
    id: String,
    state: String,
    ops: u64,
    errors: u64,
}

/// Every copy of every guest (by name) on both hosts now.
fn sample(hosts: &[Arc<Mutex<Daemon>>]) -> BTreeMap<String, Vec<Copy>> {
    let mut guests: BTreeMap<String, Vec<Copy>> = BTreeMap::new();
    for (host, daemon) in hosts.iter().enumerate() {
        let listed = daemon.lock().unwrap().try_json(&["list"]);
        // A daemon killed a moment ago: its guests run on, and the next sample sees them.
        let Ok(Value::Array(partitions)) = listed else {
            continue;
        };
        for p in partitions {
            let (Some(name), Some(id)) = (p["name"].as_str(), p["id"].as_str()) else {
                continue;
            };
            let state = p["state"].as_str().unwrap_or("").to_string();
            if state == "stopped" || state == "crashed" {
                continue;
            }
            guests.entry(name.to_string()).or_default().push(Copy {
                host,
                id: id.to_string(),
                state,
                ops: p["ops"].as_u64().unwrap_or(0),
                errors: p["errors"].as_u64().unwrap_or(0),
            });
        }
    }
    guests
}

/// What the checker found.
#[derive(Default)]
struct Findings {
    samples: u64,
    violations: Vec<String>,
}

/// Samples every 150 ms until `stop`, and records every violation of the running
/// invariants.
fn check(hosts: Vec<Arc<Mutex<Daemon>>>, stop: Arc<AtomicBool>) -> Findings {
    let mut findings = Findings::default();
    let mut last: BTreeMap<String, Vec<Copy>> = BTreeMap::new();
    // Guests seen with two advancing copies in the interval before.
    let mut doubled: BTreeMap<String, u32> = BTreeMap::new();
    while !stop.load(Ordering::Acquire) {
        let now = sample(&hosts);
        findings.samples += 1;
        for (name, copies) in &now {
            for copy in copies {
                if copy.errors > 0 {
                    findings.violations.push(format!(
                        "guest {name}: {} self-check errors on host {} ({})",
                        copy.errors, copy.host, copy.id
                    ));
                }
            }
            let before = last.get(name).cloned().unwrap_or_default();
            // The copies that advanced since the last sample, with their state then.
            let advanced: Vec<&Copy> = before
                .iter()
                .filter(|b| {
                    copies
                        .iter()
                        .any(|c| c.host == b.host && c.id == b.id && c.ops > b.ops)
                })
                .collect();
            let streak = doubled.entry(name.clone()).or_default();
            *streak = if advanced.len() > 1 { *streak + 1 } else { 0 };
            // A cutover's two copies may both advance within one interval, the source
            // before its pause and the destination after its resume; but a copy that was
            // already `running` when the interval began is past its handover, so any other
            // copy that advanced in it ran beside it. And none may for two intervals running.
            let beside_running =
                advanced.len() > 1 && advanced.iter().any(|b| b.state == "running");
            if beside_running || *streak >= 2 {
                findings
                    .violations
                    .push(format!("guest {name}: two copies ran at once: {copies:?}"));
            }
        }
        last = now;
        thread::sleep(Duration::from_millis(150));
    }
    findings
}

/// The guest's copies' hosts and ids now.
fn copies_of(hosts: &[Arc<Mutex<Daemon>>], name: &str) -> Vec<Copy> {
    sample(hosts).remove(name).unwrap_or_default()
}

fn launch(daemon: &Daemon, name: &str, workload: &str) -> String {
    daemon.json(&[
        "launch",
        "--workload",
        workload,
        "--args",
        "check_every=20000",
        "--mem",
        "32M",
        "--name",
        name,
    ])["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

/// A migration started with `--detach`, and where its report is to be had.
struct Started {
    host: usize,
    migration: String,
}

#[test]
fn random_calls_and_daemon_kills_never_run_a_guest_twice() {
    if let Some(why) = kvm_unavailable().or_else(netns_unavailable) {
        return skip(
            "random_calls_and_daemon_kills_never_run_a_guest_twice",
            &why,
        );
    }
    let long = std::env::var_os("HEATPROBE_LONG_TESTS").is_some_and(|v| v == "1");
    let seed = std::env::var("HEATPROBE_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001_u64);
    let operations = if long { 150 } else { 30 };
    eprintln!("races: seed {seed}, {operations} operations (HEATPROBE_RACE_SEED replays it)");
    let mut rng = Rng(seed | 1);
    let link = HostPair::create().expect("two network namespaces");
    let certs = make_certs(&[&link.a.addr.to_string(), &link.b.addr.to_string()]).expect("certs");
    let hosts: Vec<Arc<Mutex<Daemon>>> = [&link.a, &link.b]
        .into_iter()
        .map(|host| {
            Arc::new(Mutex::new(Daemon::start_config(
                DaemonConfig::in_namespace(&host.ns, host.addr)
                    .args(&["--peer-timeout", "3s"])
                    .tls(Some(certs.dir())),
            )))
        })
        .collect();
    // Guests one of whose processes was killed: they may be gone.
    let mut killed: Vec<String> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (n, workload) in ["uniform-write", "kv-zipf"].iter().enumerate() {
        let name = format!("g{n}");
        launch(&hosts[n % 2].lock().unwrap(), &name, workload);
        names.push(name);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let hosts = hosts.clone();
        let stop = Arc::clone(&stop);
        thread::spawn(move || check(hosts, stop))
    };
    let mut started: Vec<Started> = Vec::new();
    let mut stopped: Vec<String> = Vec::new();
    let mut counts: BTreeMap<&'static str, (u32, u32)> = BTreeMap::new();
    let mut next_guest = names.len();
    for _ in 0..operations {
        thread::sleep(Duration::from_millis(rng.below(700)));
        // A third of the time, aim at a copy some migration holds: the windows where a call
        // that slipped through would run a guest twice.
        let aimed = if rng.below(3) == 0 {
            sample(&hosts)
                .into_iter()
                .flat_map(|(name, copies)| copies.into_iter().map(move |c| (name.clone(), c)))
                .filter(|(_, c)| c.state == "migrating")
                .collect::<Vec<_>>()
        } else {
            Vec::new()
        };
        let (name, copies) = match aimed.get(rng.below(aimed.len().max(1) as u64) as usize) {
            Some((name, copy)) => (name.clone(), vec![copy.clone()]),
            None => {
                let name = rng.pick(&names).clone();
                let copies = copies_of(&hosts, &name);
                (name, copies)
            }
        };
        let Some(copy) = copies
            .get(rng.below(copies.len().max(1) as u64) as usize)
            .cloned()
        else {
            // Its only copy died with its process: another guest takes its place.
            if killed.contains(&name) {
                names.retain(|n| *n != name);
                let fresh = format!("g{next_guest}");
                next_guest += 1;
                let host = hosts[rng.below(2) as usize].lock().unwrap();
                launch(&host, &fresh, "rw-mix");
                names.push(fresh);
            }
            continue;
        };
        let host = hosts[copy.host].lock().unwrap();
        let other = 1 - copy.host;
        let op = *rng.pick(&[
            "migrate",
            "migrate",
            "migrate",
            "resume",
            "pause",
            "stop",
            "cancel",
            "postcopy",
            "reconcile",
            "limits",
            "kill-daemon",
            "kill-process",
            "cut-link",
        ]);
        let accepted = match op {
            "migrate" => {
                let to = hosts[other].lock().unwrap().addr.clone();
                let mode = *rng.pick(&["precopy", "hybrid"]);
                let bandwidth = *rng.pick(&["8M", "16M", "64M"]);
                let output = host
                    .command()
                    .args([
                        "migrate", "--json", "--detach", "--from", &host.addr, "--to", &to,
                    ])
                    .arg(&copy.id)
                    .args([
                        "--strategy",
                        "address",
                        "--mode",
                        mode,
                        "--fault-window",
                        "0s",
                    ])
                    .args(["--bandwidth-limit", bandwidth])
                    // Hybrid: one round, then post-copy, so that the guest spends seconds
                    // running there while the source holds the pages.
                    .args(if mode == "hybrid" {
                        &["--max-rounds", "1"][..]
                    } else {
                        &[][..]
                    })
                    .output()
                    .expect("run migrator migrate --detach");
                let answer: Option<Value> = serde_json::from_slice(&output.stdout).ok();
                match answer.and_then(|a| a["migration"].as_str().map(str::to_string)) {
                    Some(migration) => {
                        started.push(Started {
                            host: copy.host,
                            migration,
                        });
                        true
                    }
                    None => false,
                }
            }
            "resume" | "pause" | "reconcile" => host.cli(&[op, &copy.id]).0 == 0,
            "stop" => {
                let done = host.cli(&["stop", &copy.id]).0 == 0;
                if done {
                    // Stopped on purpose: the guest is gone, and another takes its place.
                    stopped.push(name.clone());
                    names.retain(|n| *n != name);
                    let fresh = format!("g{next_guest}");
                    next_guest += 1;
                    launch(&host, &fresh, "rw-mix");
                    names.push(fresh);
                }
                done
            }
            "cancel" | "postcopy" => host.cli(&[op, &copy.id]).0 == 0,
            "limits" => {
                let bandwidth = *rng.pick(&["8M", "32M", "unlimited"]);
                host.cli(&["limits", &copy.id, "--bandwidth-limit", bandwidth])
                    .0
                    == 0
            }
            "kill-process" => {
                let pid = host
                    .partition_processes()
                    .into_iter()
                    .find(|(id, _)| *id == copy.id)
                    .map(|(_, pid)| pid);
                if let Some(pid) = pid {
                    // SAFETY: kill(2) with a plain signal number; no memory is passed.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    killed.push(name.clone());
                }
                pid.is_some()
            }
            "cut-link" => {
                drop(host);
                link.link_down().expect("cut the link");
                thread::sleep(Duration::from_millis(300 + rng.below(3700)));
                link.link_up().expect("restore the link");
                counts.entry(op).or_default().0 += 1;
                continue;
            }
            "kill-daemon" => {
                drop(host);
                let mut daemon = hosts[copy.host].lock().unwrap();
                daemon.kill_daemon_only();
                thread::sleep(Duration::from_millis(rng.below(500)));
                daemon.restart().expect("restart the daemon");
                counts.entry(op).or_default().0 += 1;
                continue;
            }
            _ => unreachable!(),
        };
        let count = counts.entry(op).or_default();
        if accepted {
            count.0 += 1;
        } else {
            count.1 += 1;
        }
    }
    // Let every migration end, and check what each reported.
    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    let mut violations = Vec::new();
    for run in &started {
        let daemon = hosts[run.host].lock().unwrap();
        let (_, stdout, _) = daemon.cli(&["wait", &run.migration, "--json"]);
        let Ok(report) = serde_json::from_str::<Value>(&stdout) else {
            // Its daemon was killed since, and its process has ended: the report went with
            // them.
            *outcomes.entry("report lost".into()).or_default() += 1;
            continue;
        };
        *outcomes
            .entry(report["status"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        let digests_differ =
            report["source_digest"] != report["dest_digest"] || report["dest_digest"].is_null();
        if report["status"] == "completed" && digests_differ {
            violations.push(format!("completed with unequal digests: {report}"));
        }
    }
    // Settle: a copy awaiting a handover or paused by a call is reconciled or resumed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let guests = sample(&hosts);
        let mut settled = true;
        for name in &names {
            let copies = guests.get(name).cloned().unwrap_or_default();
            let running = copies.iter().filter(|c| c.state == "running").count();
            if running == 1 && copies.len() == 1 {
                continue;
            }
            // Its only copy died with its process: lost, as with a host.
            if copies.is_empty() && killed.contains(name) {
                continue;
            }
            settled = false;
            for copy in &copies {
                let daemon = hosts[copy.host].lock().unwrap();
                match copy.state.as_str() {
                    "awaiting-handover" | "postcopy-paused" => {
                        let (code, _, _) = daemon.cli(&["reconcile", &copy.id]);
                        // The other copy was killed: the operator's word that it is gone.
                        if code != 0 && copies.len() == 1 && killed.contains(name) {
                            daemon.cli(&["reconcile", &copy.id, "--resume-here"]);
                        }
                    }
                    "paused" if copies.len() == 1 => {
                        daemon.cli(&["resume", &copy.id]);
                    }
                    _ => {}
                }
            }
        }
        if settled {
            break;
        }
        if Instant::now() > deadline {
            violations.push(format!("not one running copy of each guest: {guests:?}"));
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Release);
    let findings = checker.join().expect("the checker");
    violations.extend(findings.violations);
    eprintln!(
        "races: seed {seed}: {operations} operations (accepted, refused): {counts:?}; {} \
         migrations started, ended {outcomes:?}; {} guests stopped on purpose, {} with a \
         process killed; {} samples; {} violations",
        started.len(),
        stopped.len(),
        killed.len(),
        findings.samples,
        violations.len()
    );
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
    // The run did what it set out to: migrations ran. (How many completed depends on the
    // faults that hit them; the counts are printed above.)
    assert!(!started.is_empty(), "seed {seed}: no migration started");
}
