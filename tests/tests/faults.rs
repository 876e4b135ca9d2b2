//! The fault matrix: on two network-namespace hosts, cut the link or kill -9 the destination
//! daemon at each phase of a live migration (setup, round 0, a later round, stop-and-copy, and
//! after a hybrid cutover), and check what docs/reliability.md promises:
//!
//! - before cutover: the migration reports failed with one error, the partition keeps running
//!   on the source with zero guest errors; after a cut link comes back the destination holds
//!   nothing of the failed attempt and a new migration completes with equal digests;
//! - after a hybrid cutover: the migration reports failed, the source keeps the partition
//!   paused and intact (it resumes with zero guest errors).
//!
//! Each fault is injected when the source's `migration_progress` shows the phase, and the phase
//! is read again right after: a case whose fault did not land in its phase fails. Three cases
//! run by default; all ten with `HEATPROBE_LONG_TESTS=1` (`cargo xtask test --long`).

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{
    bpf_unavailable,
    daemon::{Certs, Daemon, DaemonConfig, assert_completed, make_certs},
    kvm_unavailable,
    netns::{HostPair, netns_unavailable},
    skip,
};
use migrator::{
    api::client::{Connection, context_with},
    migration::{MigrationProgress, report::Phase},
    tls::Security,
};
use serde_json::Value;

/// The daemons' `--peer-timeout`.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Guest memory: 64 MiB is about 4 s of pages at the paced rate below.
const MEM: &str = "64M";
const BANDWIDTH: &str = "16M";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    CutLink,
    KillDestination,
    /// The link down for a third of the peer timeout, then back: TCP retransmits, and the
    /// migration goes on as if nothing happened.
    BriefCut,
    /// SIGKILL to the source daemon, which hosts the partition (until partitions get
    /// processes of their own, the guest dies with it).
    KillSource,
    /// After a hybrid cutover: the link down for longer than the source's recover window,
    /// then back; the operator resumes the post-copy by hand.
    LongCut,
}

/// How long a brief cut lasts.
const BRIEF_CUT: Duration = Duration::from_secs(1);
/// How long a cut after a hybrid cutover lasts: past the peer timeout, so both sides see the
/// connections break and post-copy pauses, and within the recover window.
const POSTCOPY_CUT: Duration = Duration::from_secs(8);
/// The recover window of the cases that outlast it: a killed destination, a long cut (the
/// link stays down until the source gives up).
const SHORT_RECOVER_WINDOW: &str = "4s";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Session prepared and data connection open, heat profiling before round 0.
    Setup,
    Round0,
    LaterRound,
    StopAndCopy,
    /// Hybrid mode, after the cutover: the guest runs on the destination, pages still flow.
    PostCutover,
}

impl Stage {
    /// The `migrate` arguments that make this stage last seconds; for `fault`, a brief cut
    /// that the migration must get through, ones that also make it complete (the rounds'
    /// guest never converges, and would be cancelled at the round limit).
    fn migrate_args(self, fault: Fault) -> Vec<&'static str> {
        let mut args = vec!["--bandwidth-limit", BANDWIDTH];
        if fault == Fault::BriefCut && matches!(self, Stage::Round0 | Stage::LaterRound) {
            args.extend_from_slice(&["--converge", "none"]);
        }
        args.extend_from_slice(match self {
            // Uncapped: a budgeted profile ends as soon as it has spent its share, long
            // before a fault could be aimed at it.
            Stage::Setup => &[
                "--strategy",
                "heat",
                "--profile-window",
                "4s",
                "--heat-budget",
                "off",
            ],
            Stage::Round0 | Stage::LaterRound => &["--strategy", "address", "--max-rounds", "4"],
            // Cut over after one round whatever the downtime (a throttling pre-copy would
            // cancel at the round limit instead).
            Stage::StopAndCopy => &[
                "--strategy",
                "address",
                "--max-rounds",
                "1",
                "--converge",
                "none",
            ],
            Stage::PostCutover => &[
                "--strategy",
                "address",
                "--max-rounds",
                "1",
                "--mode",
                "hybrid",
            ],
        });
        // A cut within the window recovers by itself (the default window is ten minutes);
        // the cases that give up must do so while the test waits.
        if self == Stage::PostCutover && matches!(fault, Fault::KillDestination | Fault::LongCut) {
            args.extend_from_slice(&["--recover-window", SHORT_RECOVER_WINDOW]);
        }
        args
    }

    /// How long the link goes down for when it comes back by itself while the migration goes
    /// on (which must then complete).
    fn survived_cut(self, fault: Fault) -> Option<Duration> {
        match (fault, self) {
            (Fault::BriefCut, _) => Some(BRIEF_CUT),
            (Fault::CutLink, Stage::PostCutover) => Some(POSTCOPY_CUT),
            _ => None,
        }
    }

    /// Whether the source's progress shows this stage.
    fn shown_by(self, p: &MigrationProgress) -> bool {
        match self {
            Stage::Setup => p.phase == Phase::Profiling,
            Stage::Round0 => p.phase == Phase::Precopy && p.round == 0 && p.bytes_sent > 0,
            Stage::LaterRound => p.phase == Phase::Precopy && p.round >= 1,
            Stage::StopAndCopy => p.phase == Phase::StopAndCopy,
            Stage::PostCutover => p.phase == Phase::Postcopy,
        }
    }
}

/// Whether this build has mutual TLS (daemons off loopback then need it).
fn tls_available() -> bool {
    heatprobe_tests::daemon::migrator_command(None, None)
        .args(["certs", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Moves the calling thread into network namespace `ns` (its children follow).
fn enter_namespace(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("the namespace's file");
    // SAFETY: setns on a valid namespace descriptor; it changes only this thread's network
    // namespace, which no other thread relies on.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// A tarpc client of the source daemon, to read `migration_progress` quickly.
struct Progress {
    runtime: tokio::runtime::Runtime,
    connection: Connection,
    id: String,
}

impl Progress {
    fn open(addr: &str, tls: Option<PathBuf>, id: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let security = Security::from_dir(tls.as_deref()).unwrap();
        let addr: SocketAddr = addr.parse().unwrap();
        let connection = runtime.block_on(Connection::open(addr, &security)).unwrap();
        Self {
            runtime,
            connection,
            id: id.to_string(),
        }
    }

    fn get(&self) -> Option<MigrationProgress> {
        self.runtime
            .block_on(
                self.connection
                    .client
                    .migration_progress(context_with(Duration::from_secs(5)), self.id.clone()),
            )
            .unwrap()
    }
}

fn wait_for_exit(child: Child) -> (i32, Value, String) {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    (
        output.status.code().unwrap_or(-1),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn spawn_migrate(source: &Daemon, destination: &Daemon, id: &str, extra: &[&str]) -> Child {
    source
        .command()
        .args(["migrate", "--json", "--from", &source.addr, "--to"])
        .arg(&destination.addr)
        .arg(id)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn ops(status: &Value) -> (u64, u64) {
    (
        status["ops"].as_u64().unwrap_or(0),
        status["checks"].as_u64().unwrap_or(0),
    )
}

/// Two namespace hosts with a daemon each (mutual TLS where the build has it; the destination
/// takes one partition, so a session it failed to drop would refuse a retry), and a partition
/// on the source running `uniform-write`, watched by a progress client inside host A.
struct Bed {
    hosts: HostPair,
    /// Kept for its drop, which removes the credentials.
    _certs: Option<Certs>,
    source: Daemon,
    destination: Daemon,
    id: String,
    progress: Progress,
}

impl Bed {
    fn start() -> Self {
        let hosts = HostPair::create().expect("two network namespaces");
        let certs = tls_available().then(|| {
            make_certs(&[&hosts.a.addr.to_string(), &hosts.b.addr.to_string()]).expect("certs")
        });
        let timeout = format!("{}s", PEER_TIMEOUT.as_secs());
        let start = |host: &heatprobe_tests::netns::Host, extra: &[&str]| {
            Daemon::start_config(
                DaemonConfig::in_namespace(&host.ns, host.addr)
                    .args(&["--peer-timeout", &timeout])
                    .args(extra)
                    .tls(certs.as_ref().map(|c| c.dir())),
            )
        };
        let source = start(&hosts.a, &[]);
        let destination = start(&hosts.b, &["--max-partitions", "1"]);
        let id = source.json(&[
            "launch",
            "--workload",
            "uniform-write",
            "--args",
            "check_every=200000",
            "--mem",
            MEM,
        ])["id"]
            .as_str()
            .unwrap()
            .to_string();
        source.wait_progress(&id, 100_000, 1);
        // This thread joins host A, so it reaches the source's API like a local client would;
        // the tarpc client keeps the socket it opened there.
        let a = hosts.a.ns.clone();
        let source_addr = source.addr.clone();
        let client_tls = certs.as_ref().map(|c| c.join("client"));
        let poller_id = id.clone();
        let progress = thread::spawn(move || {
            enter_namespace(&a);
            Progress::open(&source_addr, client_tls, &poller_id)
        })
        .join()
        .unwrap();
        Self {
            hosts,
            _certs: certs,
            source,
            destination,
            id,
            progress,
        }
    }
}

/// Runs one case of the matrix, or skips it with the reason.
fn case(name: &str, fault: Fault, stage: Stage) {
    if let Some(why) = kvm_unavailable().or_else(netns_unavailable) {
        return skip(name, &why);
    }
    if stage == Stage::Setup
        && let Some(why) = bpf_unavailable()
    {
        // The setup phase is made long by heat profiling, which needs the eBPF probes.
        return skip(name, &why);
    }
    let started = Instant::now();
    let mut bed = Bed::start();
    let Bed {
        hosts,
        source,
        destination,
        id,
        progress,
        ..
    } = &mut bed;
    let id = id.clone();
    let migrate = spawn_migrate(source, destination, &id, &stage.migrate_args(fault));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut migrate = Some(migrate);
    let before = loop {
        if let Some(p) = progress.get() {
            if matches!(p.phase, Phase::Completed | Phase::Failed) {
                let (_, report, stderr) = wait_for_exit(migrate.take().unwrap());
                panic!("{name}: the migration ended before the fault: {p:?} {report} {stderr}");
            }
            if stage.shown_by(&p) {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "{name}: never reached {stage:?}");
        thread::sleep(Duration::from_millis(10));
    };
    let migrate = migrate.take().unwrap();
    let injected = Instant::now();
    match fault {
        Fault::CutLink | Fault::BriefCut | Fault::LongCut => hosts.link_down().unwrap(),
        Fault::KillDestination => destination.kill(),
        Fault::KillSource => source.kill(),
    }
    if fault == Fault::KillSource {
        source_killed(name, stage, migrate, destination, injected);
        return;
    }
    if let Some(cut) = stage.survived_cut(fault) {
        let after = progress.get().unwrap();
        assert!(
            after.phase == before.phase && stage.shown_by(&after),
            "{name}: the cut missed {stage:?}: before {before:?}, after {after:?}"
        );
        if cut > PEER_TIMEOUT {
            // Past the peer timeout the connections break: post-copy pauses, and the source
            // tries to recover while the link is down.
            thread::sleep(PEER_TIMEOUT + Duration::from_secs(2));
            let paused = progress.get().unwrap();
            assert_eq!(paused.phase, Phase::PostcopyPaused, "{name}: {paused:?}");
            thread::sleep(cut.saturating_sub(injected.elapsed()));
        } else {
            thread::sleep(cut);
        }
        hosts.link_up().unwrap();
        let (code, report, stderr) = wait_for_exit(migrate);
        assert_eq!(code, 0, "{name}: {report} {stderr}");
        if cut > PEER_TIMEOUT {
            assert!(
                report["postcopy_recoveries"].as_u64() >= Some(1),
                "{name}: {report}"
            );
        }
        assert_moved(name, &report, source, destination, &id);
        eprintln!(
            "{name}: cut for {cut:?} in {:?} round {}; completed in {:?} ({} recoveries, \
             paused {} ms)",
            before.phase,
            before.round,
            injected.elapsed(),
            report["postcopy_recoveries"],
            report["postcopy_paused_ms"]
        );
        return;
    }
    // The fault landed in the stage only if the source was still in it afterwards (or had
    // already failed because of it).
    // Post-copy pauses at once when the destination's daemon dies.
    let after = progress.get().unwrap();
    assert!(
        after.phase == Phase::Failed
            || (stage == Stage::PostCutover && after.phase == Phase::PostcopyPaused)
            || (after.phase == before.phase && stage.shown_by(&after)),
        "{name}: the fault missed {stage:?}: before {before:?}, after {after:?}"
    );
    let (code, report, stderr) = wait_for_exit(migrate);
    let detected = injected.elapsed();
    eprintln!(
        "{name}: injected at {:?} in {:?} round {}; the source reported failure {detected:?} later",
        fault, before.phase, before.round
    );
    assert_ne!(code, 0, "{name}: {report} {stderr}");
    assert_eq!(report["status"], "failed", "{name}: {report} {stderr}");
    let error = report["error"].as_str().unwrap_or_default().to_string();
    assert!(!error.is_empty(), "{name}: {report}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: one clear error: {stderr}"
    );
    assert!(
        detected < 4 * PEER_TIMEOUT + Duration::from_secs(5),
        "{name}: took {detected:?} to notice"
    );
    assert_eq!(progress.get().unwrap().phase, Phase::Failed, "{name}");

    if stage == Stage::PostCutover {
        post_cutover(name, fault, hosts, source, destination, &id, &report);
    } else {
        pre_cutover(name, fault, hosts, source, destination, &id, &report);
    }
    eprintln!("{name}: passed in {:?}", started.elapsed());
}

/// The source daemon died with its partition. Before the guest ran on the destination, the
/// destination drops the session, its memory and any copy its commit restored parked, by
/// itself: its one partition slot is free again and nothing of the guest runs there. After a
/// hybrid handover, the destination's copy is the only one left, and it stays.
fn source_killed(
    name: &str,
    stage: Stage,
    migrate: Child,
    destination: &Daemon,
    injected: Instant,
) {
    let (code, _, stderr) = wait_for_exit(migrate);
    assert_ne!(code, 0, "{name}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: one clear error: {stderr}"
    );
    let deadline = injected + 4 * PEER_TIMEOUT + Duration::from_secs(10);
    let listed = || {
        destination
            .json(&["list"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    if stage == Stage::PostCutover {
        let [moved] = listed().try_into().unwrap_or_else(|l: Vec<Value>| {
            panic!("{name}: one partition on the destination, not {l:?}")
        });
        assert_ne!(moved["state"], "stopped", "{name}: {moved}");
        assert_ne!(moved["state"], "crashed", "{name}: {moved}");
        eprintln!(
            "{name}: the destination keeps the one copy left, {}",
            moved["state"]
        );
        return;
    }
    let freed = loop {
        let running: Vec<Value> = listed()
            .into_iter()
            .filter(|p| p["state"] != "stopped")
            .collect();
        assert!(
            running.is_empty(),
            "{name}: nothing of it runs there: {running:?}"
        );
        // The destination takes one partition: a launch fits once the session is gone.
        let (code, out, _) =
            destination.cli(&["launch", "--workload", "idle", "--mem", MEM, "--json"]);
        if code == 0 {
            break serde_json::from_str::<Value>(&out).expect("a launch report");
        }
        assert!(
            Instant::now() < deadline,
            "{name}: the session was never dropped"
        );
        thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "{name}: the destination dropped the session {:?} after the kill",
        injected.elapsed()
    );
    let id = freed["id"].as_str().expect("an id");
    assert_eq!(
        destination.json(&["stop", id])["state"],
        "stopped",
        "{name}"
    );
}

/// Before cutover nothing is lost: the partition runs on, and after a cut link comes back the
/// destination holds nothing and a new migration completes.
fn pre_cutover(
    name: &str,
    fault: Fault,
    hosts: &HostPair,
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    report: &Value,
) {
    assert!(
        report["id_on_destination"].is_null(),
        "{name}: no cutover: {report}"
    );
    assert_eq!(report["downtime_ms"], 0, "{name}: no cutover: {report}");
    let status = source.json(&["status", id]);
    assert_eq!(status["state"], "running", "{name}: {status}");
    assert_eq!(status["errors"], 0, "{name}: {status}");
    let (ops_now, checks_now) = ops(&status);
    source.wait_progress(id, ops_now + 100_000, checks_now + 1);
    if fault == Fault::KillDestination {
        return;
    }
    hosts.link_up().unwrap();
    assert_eq!(
        destination.json(&["list"]),
        Value::Array(Vec::new()),
        "{name}: the destination holds nothing"
    );
    // The destination drops the failed session by itself within the peer timeout; until it
    // has, its one partition slot is taken and a retry is refused.
    let deadline = Instant::now() + 4 * PEER_TIMEOUT + Duration::from_secs(10);
    let retry = loop {
        let (code, report, stderr) = wait_for_exit(spawn_migrate(
            source,
            destination,
            id,
            &["--strategy", "address"],
        ));
        if code == 0 {
            break report;
        }
        // Refused at the destination's prepare, by its one slot.
        assert!(
            stderr.contains("maximum of 1 partitions") && Instant::now() < deadline,
            "{name}: the retry failed: {report} {stderr}"
        );
        thread::sleep(Duration::from_millis(500));
    };
    assert_completed(&retry, name);
    let new_id = retry["id_on_destination"].as_str().unwrap();
    let status = destination.json(&["status", new_id]);
    let (ops_now, checks_now) = ops(&status);
    let after = destination.wait_progress(new_id, ops_now + 100_000, checks_now + 1);
    assert_eq!(after["state"], "running", "{name}: {after}");
    assert_eq!(
        destination.json(&["list"]).as_array().map(Vec::len),
        Some(1),
        "{name}: only the retried partition"
    );
}

/// After a hybrid cutover, with the destination away past the recover window, the source
/// keeps the partition paused and intact, holding the missing pages (`postcopy-paused`), and
/// refuses to resume it: the guest runs on the destination. A cut link that came back: the
/// operator resumes the post-copy by hand (`migrate --resume`), and it completes. A killed
/// destination: the guest died there, a reconcile cannot push the pages anywhere and changes
/// nothing, and the operator resumes the copy here on their word (`reconcile --resume-here`).
fn post_cutover(
    name: &str,
    fault: Fault,
    hosts: &HostPair,
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    report: &Value,
) {
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("after cutover"), "{name}: {report}");
    assert!(error.contains("recover window"), "{name}: {report}");
    assert_eq!(
        report["guest_location"], "destination-source-paused",
        "{name}: {report}"
    );
    let new_id = report["id_on_destination"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: the cutover happened: {report}"))
        .to_string();
    let status = source.json(&["status", id]);
    assert_eq!(status["state"], "postcopy-paused", "{name}: {status}");
    assert_eq!(status["errors"], 0, "{name}: {status}");
    assert!(
        status["postcopy_paused"]["session"].is_u64(),
        "{name}: {status}"
    );
    thread::sleep(Duration::from_millis(500));
    let later = source.json(&["status", id]);
    assert_eq!(later["ops"], status["ops"], "{name}: paused means paused");
    // Resuming it would run the guest twice.
    let (code, _, stderr) = source.cli(&["resume", id]);
    assert_ne!(code, 0, "{name}: resumed beside the destination's copy");
    assert!(stderr.contains("migrate --resume"), "{name}: {stderr}");
    match fault {
        Fault::LongCut => {
            hosts.link_up().unwrap();
            // The destination's guest waits on its missing pages: it is there, not crashed.
            let list = destination.json(&["list"]);
            let entries = list.as_array().unwrap();
            assert_eq!(entries.len(), 1, "{name}: {list}");
            assert_eq!(entries[0]["id"], new_id.as_str(), "{name}: {list}");
            assert_eq!(entries[0]["errors"], 0, "{name}: {list}");
            assert_ne!(entries[0]["state"], "crashed", "{name}: {list}");
            let resumed = source
                .command()
                .args(["migrate", "--json", "--from", &source.addr, "--resume", id])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (code, report, stderr) = wait_for_exit(resumed);
            assert_eq!(code, 0, "{name}: {report} {stderr}");
            assert!(
                report["postcopy_recoveries"].as_u64() >= Some(1),
                "{name}: {report}"
            );
            assert_moved(name, &report, source, destination, id);
            eprintln!(
                "{name}: resumed by hand, {} pages sent",
                report["pages_sent"]
            );
        }
        _ => {
            // A reconcile would push the missing pages, but there is nobody to take them: it
            // fails, and the partition stays as it was.
            let (code, _, stderr) = source.cli(&["reconcile", id]);
            assert_ne!(code, 0, "{name}: {stderr}");
            assert!(stderr.contains("stays postcopy-paused"), "{name}: {stderr}");
            let still = source.json(&["status", id]);
            assert_eq!(still["state"], "postcopy-paused", "{name}: {still}");
            // The operator's way out once the destination's copy is gone.
            source.json(&["reconcile", id, "--resume-here"]);
            let (ops_now, checks_now) = ops(&later);
            let resumed = source.wait_progress(id, ops_now + 100_000, checks_now + 1);
            assert_eq!(resumed["state"], "running", "{name}: {resumed}");
        }
    }
}

/// The migration of `report` completed: the guest runs on the destination with zero errors,
/// its operations advancing past where they arrived, and the source's copy is stopped.
fn assert_moved(name: &str, report: &Value, source: &Daemon, destination: &Daemon, id: &str) {
    assert_completed(report, name);
    assert_eq!(report["guest_location"], "destination", "{name}: {report}");
    let moved = report["id_on_destination"].as_str().expect("an id");
    let arrived = destination.json(&["status", moved])["ops"]
        .as_u64()
        .unwrap_or(0);
    let status = destination.wait_progress(moved, arrived + 10_000, 0);
    assert_eq!(status["errors"], 0, "{name}: {status}");
    // One copy: the source's is stopped.
    assert_eq!(source.json(&["status", id])["state"], "stopped", "{name}");
}

/// How close to its end the last sending step must be for a lost-answer case to hold the
/// answers back: the commit follows within a fraction of a second, well before keepalive
/// (a third of the peer timeout, then probes a second apart) would find the held-back
/// connection dead and the commit never left.
const LAST_BYTES: u64 = 12 << 20;

/// The commit reaches the destination, which restores the partition parked, but its answer
/// never comes back: host B holds back everything its API port sends, acknowledgements
/// included. The source cannot learn the outcome, so it neither resumes nor discards: the
/// partition stays `awaiting-handover` and refuses `resume`. Once the answers flow again, a
/// reconcile (by hand here, racing the source daemon's own) ends with exactly one running
/// copy: pre-copy finishes the move (the destination holds every page); hybrid resumes on the
/// source, since the destination dropped its parked copy once the data connections closed and
/// refuses the handover.
fn lost_commit_answer(name: &str, mode: &str) {
    if let Some(why) = kvm_unavailable().or_else(netns_unavailable) {
        return skip(name, &why);
    }
    let started = Instant::now();
    let bed = Bed::start();
    let Bed {
        hosts,
        source,
        destination,
        id,
        progress,
        ..
    } = &bed;
    // One round, then the cutover: pre-copy's last pages in stop-and-copy, hybrid's after its
    // round 0, each ending just before the commit.
    let (args, last_step): (&[&str], Phase) = match mode {
        "precopy" => (&["--converge", "none"], Phase::StopAndCopy),
        _ => (&["--mode", "hybrid"], Phase::Precopy),
    };
    let mut extra = vec![
        "--strategy",
        "address",
        "--max-rounds",
        "1",
        "--bandwidth-limit",
        BANDWIDTH,
    ];
    extra.extend_from_slice(args);
    let migrate = spawn_migrate(source, destination, id, &extra);
    let api_port: u16 = destination
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the destination's port");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut armed = false;
    loop {
        if let Some(p) = progress.get() {
            assert!(!p.phase.is_final(), "{name}: ended before the fault: {p:?}");
            if p.phase == last_step && p.remaining_bytes > LAST_BYTES {
                armed = true;
            }
            if armed && p.phase == last_step && p.remaining_bytes <= LAST_BYTES {
                eprintln!(
                    "{name}: holding the answers back at {:?}: {p:?}",
                    started.elapsed()
                );
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name}: never reached the last pages"
        );
        thread::sleep(Duration::from_millis(5));
    }
    hosts.hold_port(&hosts.b, api_port).unwrap();
    let held_at = Instant::now();
    let (code, report, stderr) = wait_for_exit(migrate);
    let held = held_at.elapsed();
    assert_ne!(code, 0, "{name}: {report} {stderr}");
    assert_eq!(
        report["guest_location"], "awaiting-handover",
        "{name}: {report}"
    );
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("take over"),
        "{name}: the commit went unanswered: {report}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: one clear error: {stderr}"
    );
    let status = source.json(&["status", id]);
    assert_eq!(status["state"], "awaiting-handover", "{name}: {status}");
    let (code, _, _) = source.cli(&["resume", id]);
    assert_ne!(code, 0, "{name}: resumed while the outcome is unknown");
    // Nothing of it runs on the destination yet: parked, or dropped.
    let listed = destination.json(&["list"]);
    let running = |list: &Value| {
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"] != "stopped")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        running(&listed).iter().all(|p| p["state"] == "paused"),
        "{name}: {listed}"
    );
    hosts.release_port(&hosts.b).unwrap();
    let (code, out, err) = source.cli(&["reconcile", id, "--json"]);
    assert!(
        code == 0 || err.contains("awaits no handover") || err.contains("settled meanwhile"),
        "{name}: {out} {err}"
    );
    let deadline = Instant::now() + 4 * PEER_TIMEOUT + Duration::from_secs(30);
    let settled = loop {
        let status = source.json(&["status", id]);
        if status["state"] != "awaiting-handover" {
            break status;
        }
        assert!(Instant::now() < deadline, "{name}: never settled: {status}");
        thread::sleep(Duration::from_millis(250));
    };
    let there = running(&destination.json(&["list"]));
    if mode == "precopy" {
        assert_eq!(settled["state"], "stopped", "{name}: {settled}");
        let [moved] = there.as_slice() else {
            panic!("{name}: one copy on the destination, not {there:?}");
        };
        let moved_id = moved["id"].as_str().unwrap();
        let (ops_now, _) = ops(moved);
        let after = destination.wait_progress(moved_id, ops_now + 100_000, 0);
        assert_eq!(after["state"], "running", "{name}: {after}");
    } else {
        assert!(there.is_empty(), "{name}: nothing runs there: {there:?}");
        let (ops_now, checks_now) = ops(&settled);
        let resumed = source.wait_progress(id, ops_now + 100_000, checks_now + 1);
        assert_eq!(resumed["state"], "running", "{name}: {resumed}");
    }
    eprintln!(
        "{name}: the source stopped waiting {held:?} after the answers were held back; settled \
         {:?} after that, {}",
        held_at.elapsed() - held,
        if mode == "precopy" {
            "moved"
        } else {
            "resumed on the source"
        }
    );
}

#[test]
fn lost_commit_answer_in_precopy() {
    if !long() {
        return skip(
            "lost_commit_answer_in_precopy",
            "long variant (HEATPROBE_LONG_TESTS=1)",
        );
    }
    lost_commit_answer("lost_commit_answer_in_precopy", "precopy");
}

#[test]
fn lost_commit_answer_in_hybrid() {
    lost_commit_answer("lost_commit_answer_in_hybrid", "hybrid");
}

fn long() -> bool {
    std::env::var_os("HEATPROBE_LONG_TESTS").is_some_and(|v| v == "1")
}

macro_rules! matrix {
    ($($name:ident: $fault:ident, $stage:ident, $default:literal;)*) => {$(
        #[test]
        fn $name() {
            if !$default && !long() {
                return skip(stringify!($name), "long variant (HEATPROBE_LONG_TESTS=1)");
            }
            case(stringify!($name), Fault::$fault, Stage::$stage);
        }
    )*};
}

matrix! {
    cut_link_in_setup: CutLink, Setup, false;
    cut_link_in_round_0: CutLink, Round0, true;
    cut_link_in_a_later_round: CutLink, LaterRound, false;
    cut_link_in_stop_and_copy: CutLink, StopAndCopy, false;
    cut_link_after_hybrid_cutover: CutLink, PostCutover, true;
    kill_destination_in_setup: KillDestination, Setup, false;
    kill_destination_in_round_0: KillDestination, Round0, false;
    kill_destination_in_a_later_round: KillDestination, LaterRound, false;
    kill_destination_in_stop_and_copy: KillDestination, StopAndCopy, true;
    kill_destination_after_hybrid_cutover: KillDestination, PostCutover, false;
    brief_cut_in_setup: BriefCut, Setup, false;
    brief_cut_in_round_0: BriefCut, Round0, false;
    brief_cut_in_a_later_round: BriefCut, LaterRound, true;
    brief_cut_in_stop_and_copy: BriefCut, StopAndCopy, false;
    brief_cut_after_hybrid_cutover: BriefCut, PostCutover, false;
    long_cut_after_hybrid_cutover: LongCut, PostCutover, false;
    kill_source_in_setup: KillSource, Setup, false;
    kill_source_in_round_0: KillSource, Round0, true;
    kill_source_in_a_later_round: KillSource, LaterRound, false;
    kill_source_in_stop_and_copy: KillSource, StopAndCopy, false;
    kill_source_after_hybrid_cutover: KillSource, PostCutover, false;
}
