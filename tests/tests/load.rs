//! Load: one daemon hosting 32 small partitions, four migrations at once in each direction
//! between it and a second daemon on another host (two network namespaces joined by a veth,
//! mutual TLS), and a status script calling each daemon 100 times a second throughout. Every
//! migration must complete with equal digests, every partition must keep checking itself with
//! zero errors (the migrated ones on their new hosts), every status call must answer, quickly
//! (p50/p99/max printed), and each host's own memory (its daemon's, each partition process's, and
//! all of them together) must stay within a stated budget (printed too). Without network namespaces (not root) both daemons run on loopback. The
//! daemons keep their default limits (64 partitions, 4 outgoing migrations; incoming ones count
//! as partitions), which admit four migrations out and four in at once. Migrations use the heat
//! strategy (address order without eBPF), half pre-copy and half hybrid.
//!
//! `HEATPROBE_LONG_TESTS=1` (`cargo xtask test --long`) repeats the migrations for ten waves,
//! back and forth over the same daemons, and checks the daemons' memory does not grow with them.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use heatprobe_tests::{
    bpf_unavailable,
    daemon::{Certs, Daemon, DaemonConfig, make_certs},
    host_memory::{HostMemory, MemorySampler, vms_and_threads},
    kvm_unavailable,
    netns::{HostPair, netns_unavailable},
    skip, skip_part,
};
use migrator::{
    api::{
        LaunchRequest, MigrateRequest, PartitionInfo,
        client::{ClientError, Connection, context_with},
    },
    migration::{MigrationReport, Mode, Strategy, source::MigrationOptions},
    tls::Security,
    vmm::{GuestImage, PartitionState},
};

const MIB: u64 = 1 << 20;
/// Status calls per second the script makes to each daemon.
const STATUS_RATE: u64 = 100;
/// A status call slower than this counts as not answering.
const STATUS_DEADLINE: Duration = Duration::from_secs(5);

/// A status call reads a few counters; a p99 above this means an async worker of the daemon
/// was blocked (it was 282-312 ms while eBPF programs loaded on one). A sanity bound, not a
/// speed bar: runs measured 3.4-105.5 ms on this two-core machine (docs/BENCHMARKS.md,
/// "Load"), so the bound sits between what a loaded machine gives and what the bug gave.
const STATUS_P99_LIMIT: Duration = Duration::from_millis(250);
/// Of the status calls the script means to make, at least this share must have been made for
/// the load to count as having run: a client thread on a loaded two-core machine falls
/// behind its schedule, which says nothing of the daemon (whose answers are checked one by
/// one), so this only guards against a script that stalled.
const LEAST_CALL_SHARE: f64 = 0.5;

/// Memory is own memory (RssAnon: heap, stacks, buffers; guest RAM is a shared memfd and
/// counts as RssShmem), of the daemon and of each partition's process.
///
/// The daemon (a supervisor: it holds no guest) may not exceed `DAEMON_RSS_ANON` (measured:
/// 1.1-2.0 MiB idle, 2.4-3.7 MiB at the peak of eight migrations).
const DAEMON_RSS_ANON: u64 = 16 * MIB;
/// One partition process may not exceed `PROCESS_PEAK_RSS_ANON`, its migration included
/// (measured: 0.9-1.0 MiB idle, 18.8-24.7 MiB at the peak of a heat-ordered migration, which
/// loads the eBPF probes in that process). The host's total (daemon and partition processes) may
/// not exceed `DAEMON_RSS_ANON + PROCESS_RSS_ANON * partitions it may host +
/// RSS_ANON_PER_MIGRATION * migrations it runs at once`, where `PROCESS_RSS_ANON` covers a
/// process that has received a migration (measured: 1.8 MiB once it has unloaded the probes
/// of its fault window) and the host's total peaked at 82-118 MiB with 36 partitions and
/// eight migrations in one wave.
const PROCESS_RSS_ANON: u64 = 4 * MIB;
const PROCESS_PEAK_RSS_ANON: u64 = 32 * MIB;
const RSS_ANON_PER_MIGRATION: u64 = 20 * MIB;
/// Long variant: how much the daemon's own memory may grow from the end of the first wave of
/// migrations to the end of the last (a partition process lives for one move at most).
const RSS_ANON_GROWTH_LIMIT: u64 = 8 * MIB;

/// One partition to launch: workload, its arguments, memory.
#[derive(Clone)]
struct Spec {
    workload: &'static str,
    args: &'static str,
    mem: u64,
}

/// Light, paced workloads: 2 host cores run 40 of them, two daemons and eight migrations.
/// Below a thousand operations a second a paced workload sleeps between operations instead of
/// spinning (at 1000/s and more it spins), and each still checks its data every second or so
/// (`scan` verifies each page it reads, and the whole table every few seconds). 32 of them
/// take about 40% of one core.
const WORKLOADS: [(&str, &str); 4] = [
    ("kv-zipf", "keys=4096 check_every=200 rate=200"),
    ("rw-mix", "check_every=200 rate=200"),
    ("scan", "hot_pages=16 rate=500"),
    ("idle", ""),
];

/// Whether the workload completes a full self-check within a couple of seconds (`scan`
/// sweeps its whole table between checks, but verifies every page it reads).
fn checks_quickly(spec: &Spec) -> bool {
    matches!(spec.workload, "kv-zipf" | "rw-mix")
}

fn spec(i: usize) -> Spec {
    let (workload, args) = WORKLOADS[i % WORKLOADS.len()];
    Spec {
        workload,
        args,
        // Half 16 MiB, half 32 MiB, each workload in both sizes.
        mem: if (i + i / 4).is_multiple_of(2) {
            16 * MIB
        } else {
            32 * MIB
        },
    }
}

/// Where the two daemons run and how clients reach them.
struct Network {
    /// Two namespaces joined by a veth; `None` on loopback.
    pair: Option<HostPair>,
    /// Certificates for the daemons and the test's client (`client/`).
    certs: Option<Certs>,
}

impl Network {
    fn create() -> Self {
        if let Some(why) = netns_unavailable() {
            skip_part(
                "the two-namespace part of the load test (both daemons on loopback)",
                &why,
            );
            return Self {
                pair: None,
                certs: None,
            };
        }
        let pair = HostPair::create().expect("two network namespaces");
        let certs = make_certs(&[&pair.a.addr.to_string(), &pair.b.addr.to_string()])
            .expect("certificates for both daemons");
        Self {
            pair: Some(pair),
            certs: Some(certs),
        }
    }

    fn daemon(&self, host: usize) -> Daemon {
        match &self.pair {
            Some(pair) => {
                let host = [&pair.a, &pair.b][host];
                Daemon::start_config(
                    DaemonConfig::in_namespace(&host.ns, host.addr)
                        .tls(self.certs.as_ref().map(|c| c.dir())),
                )
            }
            None => Daemon::start(),
        }
    }

    fn security(&self) -> Security {
        Security::from_dir(self.certs.as_ref().map(|c| c.join("client")).as_deref())
            .expect("the client's certificate")
    }

    /// Moves the calling thread into host A's namespace (threads it starts follow), so the
    /// test's clients reach A on its own address and B over the veth.
    fn enter_host_a(&self) {
        let Some(pair) = &self.pair else {
            return;
        };
        let file =
            std::fs::File::open(format!("/run/netns/{}", pair.a.ns)).expect("the namespace's file");
        // SAFETY: setns on a valid namespace descriptor; it changes only this thread's network
        // namespace, which no other thread relies on.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    fn describe(&self) -> String {
        match &self.pair {
            Some(pair) => format!(
                "daemons in two network namespaces ({} and {}, veth), mutual TLS",
                pair.a.addr, pair.b.addr
            ),
            None => "daemons on loopback, plain TCP".into(),
        }
    }
}

/// A daemon as the test drives it: the process (for its memory) and its address.
struct Host {
    name: &'static str,
    daemon: Daemon,
    addr: SocketAddr,
}

impl Host {
    /// The daemon's pid and its runtime directory, where its partition processes are
    /// recorded.
    fn processes(&self) -> (u32, PathBuf) {
        let dir = self.daemon.runtime_dir().expect("a runtime directory");
        (self.daemon.pid(), dir.to_path_buf())
    }
}

/// What the status script saw on one daemon.
#[derive(Default)]
struct StatusLog {
    /// Latency of every answered call, in microseconds.
    latency: Option<Histogram<u64>>,
    calls: u64,
    failures: Vec<String>,
    /// The slowest calls (over `SLOW_CALL`): when they started after the load began, how
    /// long they took, and which partition they asked for, to line up with the migrations.
    slow: Vec<(Duration, Duration, String)>,
}

/// A status call slower than this is listed with its time and partition.
const SLOW_CALL: Duration = Duration::from_millis(50);

/// The status script: `STATUS_RATE` calls a second to `addr`, round-robin over `ids`, each
/// call started on time whether or not the previous one has answered (so a slow daemon shows
/// up as latency, not as fewer calls).
async fn status_script(
    addr: SocketAddr,
    security: Security,
    ids: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
) -> StatusLog {
    let connection = Connection::open(addr, &security)
        .await
        .unwrap_or_else(|e| panic!("status script: {e}"));
    let log = Arc::new(Mutex::new(StatusLog {
        latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")),
        ..StatusLog::default()
    }));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / STATUS_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let id = {
            let ids = ids.lock().unwrap();
            ids[n % ids.len()].clone()
        };
        n += 1;
        let client = connection.client.clone();
        let log = Arc::clone(&log);
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .status(context_with(STATUS_DEADLINE), id.clone())
                .await;
            let elapsed = started.elapsed();
            let mut log = log.lock().unwrap();
            log.calls += 1;
            match result {
                Ok(Ok(_)) => {
                    let micros = (elapsed.as_micros() as u64).max(1);
                    log.latency.as_mut().unwrap().saturating_record(micros);
                    if elapsed > SLOW_CALL {
                        log.slow.push((started - epoch, elapsed, id));
                    }
                }
                Ok(Err(e)) => log.failures.push(format!("status {id}: {e}")),
                Err(e) => log
                    .failures
                    .push(format!("status {id}: no answer after {elapsed:?}: {e}")),
            }
        }));
    }
    for call in calls {
        call.await.expect("a status call task");
    }
    let mut log = log.lock().unwrap();
    StatusLog {
        latency: log.latency.take(),
        calls: log.calls,
        failures: std::mem::take(&mut log.failures),
        slow: std::mem::take(&mut log.slow),
    }
}

async fn launch(connection: &Connection, spec: &Spec, name: String) -> String {
    let request = LaunchRequest {
        name: Some(name.clone()),
        image: GuestImage::Builtin(spec.workload.into()),
        args: spec.args.into(),
        mem_size: spec.mem,
        vcpus: 1,
    };
    connection
        .client
        .launch(context_with(Duration::from_secs(60)), request)
        .await
        .unwrap_or_else(|e| panic!("launch {name}: no answer: {e}"))
        .unwrap_or_else(|e| panic!("launch {name}: {e}"))
}

async fn status(connection: &Connection, id: &str) -> PartitionInfo {
    connection
        .client
        .status(context_with(STATUS_DEADLINE), id.to_string())
        .await
        .unwrap_or_else(|e| panic!("status {id} on {}: no answer: {e}", connection.addr))
        .unwrap_or_else(|e| panic!("status {id} on {}: {e}", connection.addr))
}

/// Waits until partition `id` has done `ops` operations and `checks` full self-checks, with no
/// error and running; fails with its status otherwise.
async fn wait_progress(connection: &Connection, id: &str, ops: u64, checks: u64, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = status(connection, id).await;
        assert_eq!(
            info.errors, 0,
            "{why}: partition {id} on {} reports self-check errors: {info:?}",
            connection.addr
        );
        assert_eq!(
            info.state,
            PartitionState::Running,
            "{why}: partition {id} on {} is not running: {info:?}",
            connection.addr
        );
        if info.ops >= ops && info.checks >= checks {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: partition {id} on {} made no progress in 60 s (wanted {ops} ops, {checks} \
             checks): {info:?}",
            connection.addr
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A partition the test launched and where it lives now.
struct Placed {
    spec: Spec,
    id: String,
    /// Index into the hosts.
    host: usize,
}

/// Asks daemon `from` to migrate partition `id` to `to`; the report, and how long it took.
async fn migrate(
    from: SocketAddr,
    to: SocketAddr,
    security: Security,
    id: String,
    options: MigrationOptions,
) -> (MigrationReport, Instant, Duration) {
    let connection = Connection::open(from, &security)
        .await
        .unwrap_or_else(|e| panic!("migrate {id}: {e}"));
    let started = Instant::now();
    let report = connection
        .client
        .migrate(
            context_with(Duration::from_secs(300)),
            MigrateRequest {
                id: id.clone(),
                to,
                options,
                heat: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("migrate {id} {from} -> {to}: no answer: {e}"))
        .unwrap_or_else(|e| panic!("migrate {id} {from} -> {to}: refused: {e}"));
    (report, started, started.elapsed())
}

struct Scenario {
    /// Partitions on the busy daemon (host A).
    partitions_a: usize,
    /// Partitions on host B before any arrive.
    partitions_b: usize,
    /// Migrations at once in each direction.
    migrations_each_way: usize,
    /// How many times the migrations are repeated (back and forth).
    waves: usize,
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn run(network: &Network, scenario: &Scenario, strategy: Strategy) {
    network.enter_host_a();
    let security = network.security();
    let hosts: Vec<Host> = ["A", "B"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let daemon = network.daemon(i);
            let addr = daemon.addr.parse().expect("the daemon's address");
            Host { name, daemon, addr }
        })
        .collect();
    let pids: Vec<(u32, PathBuf)> = hosts.iter().map(Host::processes).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let open = |addr: SocketAddr| -> Result<Connection, ClientError> {
        runtime.block_on(Connection::open(addr, &security))
    };
    let connections: Vec<Connection> = hosts
        .iter()
        .map(|h| open(h.addr).unwrap_or_else(|e| panic!("host {}: {e}", h.name)))
        .collect();
    eprintln!("load: {}", network.describe());

    // Launch: 32 on A, a few on B.
    let started = Instant::now();
    let mut placed: Vec<Placed> = Vec::new();
    for (host, count) in [(0, scenario.partitions_a), (1, scenario.partitions_b)] {
        for i in 0..count {
            let spec = spec(i);
            let name = format!("{}-{i}-{}", hosts[host].name, spec.workload);
            let id = runtime.block_on(launch(&connections[host], &spec, name));
            placed.push(Placed { spec, id, host });
        }
    }
    let launch_time = started.elapsed();
    runtime.block_on(async {
        for p in &placed {
            let checks = u64::from(checks_quickly(&p.spec));
            wait_progress(&connections[p.host], &p.id, 5, checks, "before the load").await;
        }
    });
    let idle_memory: Vec<HostMemory> = pids.iter().map(HostMemory::of).collect();
    eprintln!(
        "load: launched {} partitions on A and {} on B in {launch_time:.1?}",
        scenario.partitions_a, scenario.partitions_b
    );

    // The status script, against both daemons, for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let ids: Vec<Arc<Mutex<Vec<String>>>> = (0..hosts.len())
        .map(|h| {
            Arc::new(Mutex::new(
                placed
                    .iter()
                    .filter(|p| p.host == h)
                    .map(|p| p.id.clone())
                    .collect(),
            ))
        })
        .collect();
    let load_started = Instant::now();
    let scripts: Vec<_> = hosts
        .iter()
        .zip(&ids)
        .map(|(h, ids)| {
            runtime.spawn(status_script(
                h.addr,
                security.clone(),
                Arc::clone(ids),
                Arc::clone(&stop),
                load_started,
            ))
        })
        .collect();
    let sampler = MemorySampler::start(pids.clone());

    let mut migrations: Vec<(String, Duration, Duration, MigrationReport)> = Vec::new();
    // Each daemon's own memory at the end of each wave.
    let mut wave_anon: Vec<Vec<u64>> = Vec::new();
    for wave in 0..scenario.waves {
        // The first `migrations_each_way` partitions on each host (one of each workload, both
        // sizes), rotating with the wave so later waves move others; modes alternate.
        let mut chosen: Vec<usize> = Vec::new();
        for host in 0..hosts.len() {
            let mut on_host: Vec<usize> = (0..placed.len())
                .filter(|&i| placed[i].host == host)
                .collect();
            let shift = (wave * scenario.migrations_each_way) % on_host.len().max(1);
            on_host.rotate_left(shift);
            chosen.extend(on_host.into_iter().take(scenario.migrations_each_way));
        }
        let tasks: Vec<_> = chosen
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let p = &placed[i];
                let options = MigrationOptions {
                    strategy,
                    mode: if k % 2 == 0 {
                        Mode::Precopy
                    } else {
                        Mode::Hybrid
                    },
                    profile_window: Duration::from_millis(500),
                    ..MigrationOptions::default()
                };
                let (from, to) = (hosts[p.host].addr, hosts[1 - p.host].addr);
                runtime.spawn(migrate(from, to, security.clone(), p.id.clone(), options))
            })
            .collect();
        let reports: Vec<(MigrationReport, Instant, Duration)> = runtime.block_on(async {
            let mut reports = Vec::new();
            for task in tasks {
                reports.push(task.await.expect("a migration task"));
            }
            reports
        });
        // Check every report, then move the partitions in our books and in the scripts'.
        for (&i, (report, started, took)) in chosen.iter().zip(reports) {
            let p = &placed[i];
            let case = format!(
                "wave {wave}: {} ({} {} MiB) {} -> {}, {:?} {:?}",
                p.id,
                p.spec.workload,
                p.spec.mem / MIB,
                hosts[p.host].name,
                hosts[1 - p.host].name,
                report.strategy,
                report.mode
            );
            assert_eq!(
                report.status,
                migrator::migration::MigrationStatus::Completed,
                "{case}: the migration failed: {:?}\n{report:?}",
                report.error
            );
            assert!(
                report.source_digest.is_some(),
                "{case}: no source digest: {report:?}"
            );
            assert_eq!(
                report.source_digest, report.dest_digest,
                "{case}: the destination's memory differs from the source's: {report:?}"
            );
            let new_id = report
                .id_on_destination
                .clone()
                .unwrap_or_else(|| panic!("{case}: no id on the destination: {report:?}"));
            ids[1 - p.host].lock().unwrap().push(new_id.clone());
            migrations.push((case, started - load_started, took, report));
            let p = &mut placed[i];
            p.id = new_id;
            p.host = 1 - p.host;
        }
        // The migrated partitions run on their new hosts and keep passing their self-checks.
        runtime.block_on(async {
            for &i in &chosen {
                let p = &placed[i];
                let info = status(&connections[p.host], &p.id).await;
                let checks = u64::from(checks_quickly(&p.spec));
                wait_progress(
                    &connections[p.host],
                    &p.id,
                    info.ops + 5,
                    info.checks + checks,
                    &format!("wave {wave}, after migrating to {}", hosts[p.host].name),
                )
                .await;
            }
        });
        let anon: Vec<u64> = pids
            .iter()
            .map(|host| HostMemory::of(host).total_anon())
            .collect();
        // A partition that left ends with its process, just after its migration answers:
        // give that a moment before counting VMs.
        let hosted: Vec<usize> = (0..hosts.len())
            .map(|h| placed.iter().filter(|p| p.host == h).count())
            .collect();
        let counted = Instant::now();
        let (vms, threads): (Vec<usize>, Vec<usize>) = loop {
            let (vms, threads): (Vec<usize>, Vec<usize>) = pids.iter().map(vms_and_threads).unzip();
            if vms == hosted || counted.elapsed() > Duration::from_secs(10) {
                break (vms, threads);
            }
            thread::sleep(Duration::from_millis(100));
        };
        eprintln!(
            "load: after wave {wave}: own memory (RssAnon, daemon and partition processes) A \
             {:.1} MiB, B {:.1} MiB; KVM VMs A {}, B {}; threads A {}, B {}",
            anon[0] as f64 / MIB as f64,
            anon[1] as f64 / MIB as f64,
            vms[0],
            vms[1],
            threads[0],
            threads[1]
        );
        for (h, host) in hosts.iter().enumerate() {
            let hosted = placed.iter().filter(|p| p.host == h).count();
            assert_eq!(
                vms[h], hosted,
                "wave {wave}: host {} holds {} KVM VMs but hosts {hosted} partitions: the VMs \
                 of partitions that left were not freed",
                host.name, vms[h]
            );
        }
        // The daemon's own memory, for the growth check: the partition processes are new
        // with every move, so their memory cannot grow with waves, only with partitions.
        wave_anon.push(
            pids.iter()
                .map(|host| HostMemory::of(host).daemon.rss_anon)
                .collect(),
        );
    }
    let load_time = load_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<StatusLog> = runtime.block_on(async {
        let mut logs = Vec::new();
        for script in scripts {
            logs.push(script.await.expect("a status script"));
        }
        logs
    });
    let peaks = sampler.finish();

    // Every partition, migrated or not, is running with zero errors.
    runtime.block_on(async {
        for p in &placed {
            let info = status(&connections[p.host], &p.id).await;
            assert_eq!(info.errors, 0, "after the load: {info:?}");
            assert_eq!(
                info.state,
                PartitionState::Running,
                "after the load: {info:?}"
            );
        }
    });
    let end_memory: Vec<HostMemory> = pids.iter().map(HostMemory::of).collect();

    // The figures.
    for (case, at, took, report) in &migrations {
        eprintln!(
            "load: {case}: at {at:.2?}, {took:.2?} (setup {} ms, downtime {} ms, {} rounds)",
            report.setup_time_ms, report.downtime_ms, report.rounds
        );
    }
    let mut times: Vec<Duration> = migrations.iter().map(|(_, _, t, _)| *t).collect();
    times.sort();
    let mut downtimes: Vec<u64> = migrations
        .iter()
        .map(|(_, _, _, r)| r.downtime_ms)
        .collect();
    downtimes.sort();
    eprintln!(
        "load: {} migrations in {} waves, {load_time:.1?}: each took {:.2?} median, {:.2?} max; \
         downtime {} ms median, {} ms max",
        times.len(),
        scenario.waves,
        times[times.len() / 2],
        times[times.len() - 1],
        downtimes[downtimes.len() / 2],
        downtimes[downtimes.len() - 1]
    );
    for (h, host) in hosts.iter().enumerate() {
        let (log, latency) = (&logs[h], logs[h].latency.as_ref().unwrap());
        eprintln!(
            "load: host {}: {} status calls ({:.0}/s), {} failed; latency p50 {:.2} ms, p99 \
             {:.2} ms, max {:.2} ms",
            host.name,
            log.calls,
            log.calls as f64 / load_time.as_secs_f64(),
            log.failures.len(),
            ms(latency.value_at_quantile(0.5)),
            ms(latency.value_at_quantile(0.99)),
            ms(latency.max())
        );
        let mut slow = log.slow.clone();
        slow.sort_by_key(|call| std::cmp::Reverse(call.1));
        for (at, took, id) in slow.iter().take(5) {
            eprintln!(
                "load: host {}: slow status {id} at {at:.2?}: {took:.1?}",
                host.name
            );
        }
        eprintln!(
            "load: host {}: memory idle: {}\nload: host {}: peak: {}, {:.1} MiB RssAnon in \
             all\nload: host {}: end: {}",
            host.name,
            idle_memory[h],
            host.name,
            peaks[h].0,
            peaks[h].1 as f64 / MIB as f64,
            host.name,
            end_memory[h]
        );
    }

    // The checks on the figures.
    for (h, host) in hosts.iter().enumerate() {
        let log = &logs[h];
        assert!(
            log.failures.is_empty(),
            "host {}: {} of {} status calls failed during the load, first: {}",
            host.name,
            log.failures.len(),
            log.calls,
            log.failures[0]
        );
        let expected = (load_time.as_secs_f64() * STATUS_RATE as f64 * LEAST_CALL_SHARE) as u64;
        assert!(
            log.calls >= expected,
            "host {}: the script made only {} status calls in {load_time:.1?} (wanted {} a \
             second)",
            host.name,
            log.calls,
            STATUS_RATE
        );
        let p99 = Duration::from_micros(log.latency.as_ref().unwrap().value_at_quantile(0.99));
        assert!(
            p99 <= STATUS_P99_LIMIT,
            "host {}: status p99 latency {p99:.1?} during the migrations, over {:?}: something \
             blocks the daemon's async workers or holds its partitions lock",
            host.name,
            STATUS_P99_LIMIT
        );
    }
    let most_partitions = placed.len() as u64;
    let concurrent = 2 * scenario.migrations_each_way as u64;
    // Every partition could end up on one host; each host runs migrations_each_way outgoing
    // and as many incoming migrations at once.
    let budget =
        DAEMON_RSS_ANON + PROCESS_RSS_ANON * most_partitions + RSS_ANON_PER_MIGRATION * concurrent;
    for (h, host) in hosts.iter().enumerate() {
        let (peak, total) = peaks[h];
        assert!(
            peak.daemon.rss_anon <= DAEMON_RSS_ANON,
            "host {}: the daemon's own memory (RssAnon) peaked at {:.1} MiB, over its budget of \
             {} MiB",
            host.name,
            peak.daemon.rss_anon as f64 / MIB as f64,
            DAEMON_RSS_ANON / MIB
        );
        assert!(
            peak.largest_process_anon <= PROCESS_PEAK_RSS_ANON,
            "host {}: a partition process's own memory peaked at {:.1} MiB, over its budget of \
             {} MiB",
            host.name,
            peak.largest_process_anon as f64 / MIB as f64,
            PROCESS_PEAK_RSS_ANON / MIB,
        );
        assert!(
            total <= budget,
            "host {}: own memory (RssAnon of the daemon and its partition processes) peaked at \
             {:.1} MiB, over its budget of {} MiB = {} MiB + {} MiB per partition \
             ({most_partitions}) + {} MiB per migration at once ({concurrent})",
            host.name,
            total as f64 / MIB as f64,
            budget / MIB,
            DAEMON_RSS_ANON / MIB,
            PROCESS_RSS_ANON / MIB,
            RSS_ANON_PER_MIGRATION / MIB,
        );
        // Guest RAM is what the partitions hosted now touched, and no more: the memory of
        // the partitions that left was freed.
        let hosted: u64 = placed
            .iter()
            .filter(|p| p.host == h)
            .map(|p| p.spec.mem)
            .sum();
        assert!(
            end_memory[h].partitions.rss_shmem <= hosted,
            "host {}: {} MiB of shared memory mapped after the load, more than the {} MiB of \
             guest RAM of the partitions it hosts: the memory of migrated partitions was not \
             freed",
            host.name,
            end_memory[h].partitions.rss_shmem / MIB,
            hosted / MIB
        );
        if wave_anon.len() > 1 {
            let (first, last) = (wave_anon[0][h], wave_anon[wave_anon.len() - 1][h]);
            eprintln!(
                "load: host {}: the daemon's own memory after wave 0 {:.1} MiB, after wave {} \
                 {:.1} MiB",
                host.name,
                first as f64 / MIB as f64,
                wave_anon.len() - 1,
                last as f64 / MIB as f64
            );
            assert!(
                last <= first + RSS_ANON_GROWTH_LIMIT,
                "host {}: the daemon's own memory grew from {:.1} MiB after the first wave of \
                 migrations to {:.1} MiB after wave {}: something keeps memory per migration",
                host.name,
                first as f64 / MIB as f64,
                last as f64 / MIB as f64,
                wave_anon.len() - 1
            );
        }
    }
}

fn long() -> bool {
    std::env::var_os("HEATPROBE_LONG_TESTS").is_some_and(|v| v == "1")
}

#[test]
fn thirty_two_partitions_four_migrations_each_way_status_at_100_per_second() {
    let name = "thirty_two_partitions_four_migrations_each_way_status_at_100_per_second";
    if let Some(why) = kvm_unavailable() {
        return skip(name, &why);
    }
    let strategy = match bpf_unavailable() {
        None => Strategy::Heat,
        Some(why) => {
            skip_part(&format!("the heat strategy of {name}"), &why);
            Strategy::Address
        }
    };
    let scenario = Scenario {
        partitions_a: 32,
        partitions_b: 4,
        migrations_each_way: 4,
        waves: if long() { 10 } else { 1 },
    };
    let network = Network::create();
    // On its own thread: it enters host A's namespace.
    thread::scope(|scope| {
        scope
            .spawn(|| run(&network, &scenario, strategy))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    });
}
