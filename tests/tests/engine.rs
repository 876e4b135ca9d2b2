//! The source's migration engine against an in-process destination (the real receiving
//! `Session`, no daemons): a migration completes with equal digests in both modes, and a
//! failure at each phase rolls back as that phase says: resume here and abort there before
//! the guest runs on the destination, keep the paused copy after.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use heatprobe::{Access, HeatClass, PageHeat};
use heatprobe_tests::{bpf_unavailable, kvm_unavailable, skip};
use migrator::{
    migration::{
        MigrationReport, MigrationStatus, Mode, Strategy,
        control::{
            CarriedHeat, CommitReply, CommitRequest, Destination, DestinationError, FinishReply,
            HandoverReply, PrepareReply, PrepareRequest, Recovery, Refusal,
        },
        convergence::{Converge, CutoverReason, TimeoutStrategy},
        destination::{ProbeSlot, Session, WindowOrWhyNot},
        job::Job,
        link::{DataLink, DataStream, LinkError},
        report::{PlanHeatOrigin, PostCutoverFaults},
        source::{MigrationOptions, PlanHeat, migrate},
    },
    vmm::{GuestImage, Partition, PartitionConfig, PartitionState},
};

const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the in-process destination fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// It refuses to prepare.
    PrepareRefused,
    /// The data connection cannot be opened.
    Connect,
    /// It refuses the commit (and drops the session).
    CommitRefused,
    /// It commits, but the answer is lost.
    CommitAnswerLost,
    /// It runs the partition at the handover, but the answer is lost.
    HandoverAnswerLost,
    /// A status call reads the parked partition between the commit and the handover, when
    /// nothing would bring a page it lacked.
    StatusBeforeHandover,
    /// Its memory is not the source's: the commit answers with another digest.
    WrongDigest,
    /// Hybrid: every page arrives, but the answer to `finish` is lost.
    FinishAnswerLost,
    /// Hybrid: the destination forgets the session as the push ends (its daemon restarted,
    /// say), its guest still running there, and `finish` goes unanswered.
    SessionLost,
    /// Hybrid: every connection the source opened so far breaks as the handover answers,
    /// before the push starts, and the answer waits a while: the guest runs there meanwhile,
    /// its demands waiting.
    PostcopyCut,
}

#[derive(Default)]
struct Seen {
    aborted: Vec<u64>,
    /// The heat each session was handed once the move completed.
    carried: Vec<(u64, CarriedHeat)>,
    /// Partitions restored here, and whether each is still running.
    arrived: Vec<Arc<Partition>>,
    /// `StatusBeforeHandover`: how long the status call took, if it answered within 5 s.
    status_before_handover: Option<Duration>,
}

struct InProcess {
    fault: Fault,
    sessions: BTreeMap<u64, Arc<Session>>,
    /// The probes that count faults after the resume: empty (never loaded) unless a test
    /// counts them.
    probes: ProbeSlot,
    fault_windows: BTreeMap<u64, WindowOrWhyNot>,
    next: u64,
    seen: Arc<Mutex<Seen>>,
    /// Clones of the connections the source opened, for `PostcopyCut` to break.
    opened: Mutex<Vec<DataStream>>,
    /// The answers of finished sessions, for a `finish` asked again (as the daemon keeps
    /// them).
    finished: BTreeMap<u64, FinishReply>,
}

fn unreachable(what: &'static str) -> DestinationError {
    DestinationError::Unreachable {
        what,
        source: "the test cut the link".into(),
    }
}

impl Destination for InProcess {
    fn prepare(&mut self, request: PrepareRequest) -> Result<PrepareReply, DestinationError> {
        if self.fault == Fault::PrepareRefused {
            return Err(DestinationError::Refused(Refusal::Other("full".into())));
        }
        let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (session, data_port, remove_ns_per_page) = Session::prepare(
            &request,
            bind,
            DataLink::Plain,
            PEER_TIMEOUT,
            self.probes.clone(),
        )
        .map_err(|e| DestinationError::Refused(Refusal::Other(e.to_string())))?;
        self.next += 1;
        self.sessions.insert(self.next, session);
        Ok(PrepareReply {
            session: self.next,
            data_port,
            remove_ns_per_page,
        })
    }

    fn commit(
        &mut self,
        session: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, DestinationError> {
        let found = self.sessions.get(&session).cloned().expect("a session");
        if self.fault == Fault::CommitRefused {
            found.abort().expect("nothing restored yet");
            self.sessions.remove(&session);
            return Err(DestinationError::Refused(Refusal::Other(
                "refused by the test".into(),
            )));
        }
        let committed = found
            .commit(request)
            .map_err(|e| DestinationError::Refused(Refusal::Other(e.to_string())))?;
        self.seen.lock().unwrap().arrived.push(committed.partition);
        if self.fault == Fault::CommitAnswerLost {
            return Err(unreachable("commit"));
        }
        let mut dest_digest = committed.digest.map(|d| d.total_hex());
        if self.fault == Fault::WrongDigest {
            dest_digest = Some("0123456789abcdef".into());
        }
        Ok(CommitReply {
            id_on_destination: format!("arrived-{session}"),
            dest_digest,
            timings: committed.timings,
        })
    }

    fn handover(&mut self, session: u64) -> Result<HandoverReply, DestinationError> {
        let found = self.sessions.get(&session).cloned().expect("a session");
        if self.fault == Fault::StatusBeforeHandover {
            let parked = self.seen.lock().unwrap().arrived.last().cloned();
            let parked = parked.expect("the commit restored it");
            let (answered, answer) = std::sync::mpsc::channel();
            let asked = Instant::now();
            thread::spawn(move || {
                parked.status();
                let _ = answered.send(asked.elapsed());
            });
            self.seen.lock().unwrap().status_before_handover =
                answer.recv_timeout(Duration::from_secs(5)).ok();
        }
        // As the daemon does: a handover refused drops the session, and nothing of it runs.
        let resume_ms = found
            .handover()
            .map_err(|e| {
                let _ = found.abort();
                DestinationError::Refused(Refusal::NothingRunsHere(e.to_string()))
            })?
            .expect("handed over once");
        // The fault window starts at the resume, which the handover is.
        if let Some(window) = found.fault_window() {
            self.fault_windows.insert(session, window);
        }
        if self.fault == Fault::HandoverAnswerLost {
            return Err(unreachable("handover"));
        }
        if self.fault == Fault::PostcopyCut {
            for stream in self.opened.lock().unwrap().drain(..) {
                stream.shutdown(std::net::Shutdown::Both).unwrap();
            }
            thread::sleep(Duration::from_millis(300));
        }
        Ok(HandoverReply {
            id_on_destination: format!("arrived-{session}"),
            resume_ms,
        })
    }

    fn finish(&mut self, session: u64) -> Result<FinishReply, DestinationError> {
        let Some(found) = self.sessions.get(&session).cloned() else {
            return self.finished.get(&session).cloned().ok_or_else(|| {
                DestinationError::Refused(Refusal::Other(format!("no migration session {session}")))
            });
        };
        if self.fault == Fault::SessionLost {
            self.sessions.remove(&session);
            return Err(unreachable("finish"));
        }
        // As the daemon does: a session whose finish failed lives on, to be recovered.
        let reply = found
            .finish()
            .map_err(|e| DestinationError::Refused(Refusal::Other(e.to_string())))?;
        self.sessions.remove(&session);
        self.finished.insert(session, reply.clone());
        if self.fault == Fault::FinishAnswerLost {
            return Err(unreachable("finish"));
        }
        Ok(reply)
    }

    fn carry_heat(&mut self, session: u64, heat: CarriedHeat) -> Result<(), DestinationError> {
        self.seen.lock().unwrap().carried.push((session, heat));
        Ok(())
    }

    fn faults(&mut self, session: u64) -> Result<PostCutoverFaults, DestinationError> {
        let refused = |why: String| DestinationError::Refused(Refusal::Other(why));
        let window = self
            .fault_windows
            .remove(&session)
            .ok_or_else(|| refused("no fault window".into()))?
            .map_err(refused)?;
        window.report().map_err(|e| refused(e.to_string()))
    }

    fn abort(&mut self, session: u64) {
        let mut seen = self.seen.lock().unwrap();
        seen.aborted.push(session);
        let Some(found) = self.sessions.remove(&session) else {
            return;
        };
        // As the daemon does: the session refuses while a copy it restored runs; that copy is
        // stopped (the source resumes its own), then the session is discarded.
        if found.abort().is_err() {
            for partition in &seen.arrived {
                partition.stop();
            }
            found
                .discard()
                .expect("discarded once its guest is stopped");
        }
    }

    fn connect_data(&self, port: u16) -> Result<DataStream, LinkError> {
        let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        if self.fault == Fault::Connect {
            return Err(LinkError::Connect {
                addr,
                source: std::io::Error::other("the test refused the connection"),
            });
        }
        let stream = DataLink::Plain.connect(addr, PEER_TIMEOUT)?;
        let clone = stream.try_clone().map_err(LinkError::Socket)?;
        self.opened.lock().unwrap().push(clone);
        Ok(stream)
    }

    fn recover(&mut self, session: u64) -> Result<Recovery, DestinationError> {
        let refused = |why: String| DestinationError::Refused(Refusal::Other(why));
        self.sessions
            .get(&session)
            .ok_or_else(|| refused(format!("no session {session}")))?
            .recover()
            .map_err(|e| refused(e.to_string()))
    }
}

fn launch_workload(workload: &str, args: &str) -> Arc<Partition> {
    Arc::new(
        Partition::launch(PartitionConfig {
            name: None,
            mem_size: 16 << 20,
            vcpus: 1,
            image: GuestImage::Builtin(workload.into()),
            args: args.into(),
        })
        .expect("launches"),
    )
}

fn ops(partition: &Partition) -> u64 {
    partition.status().progress.ops
}

/// Migrates a fresh rw-mix partition with `fault` injected; returns the report, the source
/// partition and what the destination saw.
fn run(mode: Mode, fault: Fault) -> (MigrationReport, Arc<Partition>, Seen) {
    let options = MigrationOptions {
        strategy: Strategy::Address,
        mode,
        ..MigrationOptions::default()
    };
    run_with("rw-mix", "", &options, fault)
}

/// Migrates a fresh `workload` partition with `options` and `fault`.
fn run_with(
    workload: &str,
    args: &str,
    options: &MigrationOptions,
    fault: Fault,
) -> (MigrationReport, Arc<Partition>, Seen) {
    run_counting(workload, args, options, fault, &ProbeSlot::default(), None)
}

/// As `run_with`, the destination counting faults after the resume with `probes`.
fn run_counting(
    workload: &str,
    args: &str,
    options: &MigrationOptions,
    fault: Fault,
    probes: &ProbeSlot,
    carried: Option<PlanHeat>,
) -> (MigrationReport, Arc<Partition>, Seen) {
    // Shared with the other tests' migrations, unless this one runs `alone`.
    let _shared = (!ALONE.get()).then(|| MIGRATIONS.read().unwrap_or_else(|p| p.into_inner()));
    let partition = launch_workload(workload, args);
    thread::sleep(Duration::from_millis(100));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut destination = InProcess {
        fault,
        sessions: BTreeMap::new(),
        probes: probes.clone(),
        fault_windows: BTreeMap::new(),
        next: 0,
        seen: Arc::clone(&seen),
        opened: Mutex::new(Vec::new()),
        finished: BTreeMap::new(),
    };
    let job = Job::new("engine-test.m1".into());
    let report = migrate(&partition, &mut destination, None, carried, options, &job);
    drop(destination);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (report, partition, seen)
}

/// The source runs on, advancing, with no errors.
fn assert_runs_on(partition: &Partition, case: &str) {
    assert_eq!(partition.state(), PartitionState::Running, "{case}");
    let before = ops(partition);
    thread::sleep(Duration::from_millis(200));
    assert!(
        ops(partition) > before,
        "{case}: the guest does not advance"
    );
    assert_eq!(partition.status().progress.errors, 0, "{case}");
}

/// Every step of the downtime was timed, on both sides, and together they are the downtime;
/// the verdict on the limit and the note follow from the figures.
fn assert_downtime_accounted(report: &MigrationReport, limit: Duration, case: &str) {
    let b = &report.downtime_breakdown;
    let steps = [
        b.pause_ms,
        b.last_pages_ms,
        b.state_encode_ms,
        b.state_transfer_ms,
        b.restore_ms,
        b.resume_ms,
    ];
    assert!(
        steps.iter().all(|ms| ms.is_finite() && *ms >= 0.0),
        "{case}: {b:?}"
    );
    // Measured, not left at zero: the destination's own figures made it across.
    assert!(b.pause_ms > 0.0 && b.state_encode_ms > 0.0, "{case}: {b:?}");
    assert!(b.restore_ms > 0.0 && b.resume_ms > 0.0, "{case}: {b:?}");
    // `downtime_ms` is truncated to a whole millisecond; the steps keep the fractions.
    let downtime = report.downtime_ms as f64;
    assert!(
        b.total_ms() <= downtime + 1.0 && b.total_ms() >= downtime - 0.01,
        "{case}: {} ms in steps, downtime {downtime} ms: {b:?}",
        b.total_ms()
    );
    assert_eq!(
        report.downtime_limit_met,
        Duration::from_millis(report.downtime_ms) <= limit,
        "{case}: {report:?}"
    );
    let expected = report.expected_downtime_ms as f64;
    assert_eq!(
        report.downtime_note.is_some(),
        (downtime - expected).abs() > 0.2 * downtime,
        "{case}: {report:?}"
    );
}

#[test]
fn a_migration_completes_in_both_modes() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_migration_completes_in_both_modes", &why);
    }
    for mode in [Mode::Precopy, Mode::Hybrid] {
        let (report, source, seen) = run(mode, Fault::None);
        assert_eq!(
            report.status,
            MigrationStatus::Completed,
            "{mode:?}: {report:?}"
        );
        assert!(report.source_digest.is_some(), "{mode:?}");
        assert_eq!(report.source_digest, report.dest_digest, "{mode:?}");
        assert_eq!(source.state(), PartitionState::Stopped, "{mode:?}");
        assert!(seen.aborted.is_empty(), "{mode:?}");
        assert_downtime_accounted(
            &report,
            MigrationOptions::default().downtime_limit,
            &format!("{mode:?}"),
        );
        // rw-mix runs flat out: it did work before and during the migration.
        let ratio = report.guest_ops_ratio;
        assert!(ratio.is_some_and(|r| r > 0.0), "{mode:?}: {ratio:?}");
        let [arrived] = seen.arrived.as_slice() else {
            panic!("{mode:?}: {} partitions arrived", seen.arrived.len());
        };
        assert_runs_on(arrived, &format!("{mode:?} on the destination"));
        arrived.stop();
    }
}

/// What the guest feels after the move is measured on the destination, in both modes: its
/// faults over the fault window (local ones in pre-copy, remote ones too in hybrid mode), and
/// in hybrid mode how long its vCPU waited on missing pages.
#[test]
fn the_guests_faults_and_waits_after_the_move_are_counted() {
    let test = "the_guests_faults_and_waits_after_the_move_are_counted";
    if let Some(why) = kvm_unavailable().or_else(bpf_unavailable) {
        return skip(test, &why);
    }
    let probes = ProbeSlot::default();
    if let Err(e) = probes.get_or_load() {
        panic!("the probes load where BPF is available: {e}");
    }
    // Hybrid twice: with room in the downtime for the stale pages, and with a slow link and a
    // limit that leave room for almost none, so the guest resumes with them missing.
    let cases = [
        (Mode::Precopy, Duration::from_millis(300), None),
        (Mode::Hybrid, Duration::from_millis(300), None),
        (Mode::Hybrid, Duration::from_millis(1), Some(20_000_000)),
    ];
    for (mode, downtime_limit, bandwidth_limit) in cases {
        let options = MigrationOptions {
            strategy: Strategy::Address,
            mode,
            downtime_limit,
            bandwidth_limit,
            fault_window: Duration::from_millis(500),
            ..MigrationOptions::default()
        };
        // With room for almost nothing, a written region larger than one discard round's
        // least: its stale copies are dropped before the pause.
        let args = if bandwidth_limit.is_some() {
            "hot_rw=1024"
        } else {
            ""
        };
        let (report, _source, seen) =
            run_counting("rw-mix", args, &options, Fault::None, &probes, None);
        assert_eq!(
            report.source_digest, report.dest_digest,
            "{mode:?}: {report:?}"
        );
        let mode = (mode, downtime_limit);
        assert_eq!(
            report.status,
            MigrationStatus::Completed,
            "{mode:?}: {report:?}"
        );
        let faults = report
            .post_cutover_faults
            .unwrap_or_else(|| panic!("{mode:?}: {:?}", report.post_cutover_faults_note));
        assert_eq!(faults.window_ms, 500, "{mode:?}");
        // A fresh VM has no guest page tables mapped: the pages the guest touches fault once.
        assert!(faults.local > 0, "{mode:?}: {faults:?}");
        assert_eq!(report.postcopy_vcpu_blocktime_ms.len(), 1, "{mode:?}");
        match mode.0 {
            Mode::Precopy => {
                assert_eq!(faults.remote, 0, "{faults:?}");
                assert_eq!(report.postcopy_blocktime_ms, 0.0);
                assert_eq!(report.postcopy_vcpu_blocktime_ms, vec![0.0]);
            }
            // On loopback a 300 ms budget takes every stale page inside the downtime.
            Mode::Hybrid if downtime_limit.as_millis() >= 300 => {
                assert!(report.budgeted_pages > 0, "{report:?}");
                assert_eq!(faults.remote, 0, "{faults:?}: {report:?}");
            }
            Mode::Hybrid => {
                // rw-mix writes its region flat out: its pages are stale at the cutover, and
                // the guest touches them at once. Each demand comes from a fault on a missing
                // page; more than one fault may wait on one page.
                assert!(report.postcopy_requests > 0, "{report:?}");
                assert!(report.discarded_pages > 0, "{report:?}");
                assert!(
                    faults.remote >= report.postcopy_requests,
                    "{faults:?}: {report:?}"
                );
                assert!(report.postcopy_blocktime_ms > 0.0, "{report:?}");
                // One vCPU: all of them waited exactly when it did.
                let vcpu = report.postcopy_vcpu_blocktime_ms[0];
                assert!(
                    (vcpu - report.postcopy_blocktime_ms).abs() < 1e-6,
                    "{report:?}"
                );
            }
        }
        let stall = report.downtime_ms as f64 + report.postcopy_blocktime_ms;
        assert!((report.guest_stall_ms - stall).abs() < 1e-9, "{report:?}");
        for partition in &seen.arrived {
            partition.stop();
        }
    }
}

/// Heat carried by a previous migration plans the next one without a profile (no probes are
/// given here: a profile would fail), and goes on with the guest to the destination.
#[test]
fn carried_heat_plans_without_profiling_and_travels_on() {
    if let Some(why) = kvm_unavailable() {
        return skip("carried_heat_plans_without_profiling_and_travels_on", &why);
    }
    let pages: Vec<PageHeat> = (0..64)
        .map(|page| PageHeat {
            page,
            reads: 10,
            writes: 5,
            heat: 100.0 - page as f64,
            class: if page < 8 {
                HeatClass::Hot
            } else {
                HeatClass::Warm
            },
            access: Access::ReadWrite,
        })
        .collect();
    let carried = PlanHeat {
        pages: pages.clone().into(),
        measured: std::time::Instant::now(),
        origin: PlanHeatOrigin::Carried,
    };
    for mode in [Mode::Precopy, Mode::Hybrid] {
        let options = MigrationOptions {
            strategy: Strategy::Heat,
            mode,
            ..MigrationOptions::default()
        };
        let (report, _source, seen) = run_counting(
            "rw-mix",
            "",
            &options,
            Fault::None,
            &ProbeSlot::default(),
            Some(carried.clone()),
        );
        assert_eq!(
            report.status,
            MigrationStatus::Completed,
            "{mode:?}: {report:?}"
        );
        assert_eq!(report.source_digest, report.dest_digest, "{mode:?}");
        assert_eq!(report.plan_heat, Some(PlanHeatOrigin::Carried), "{mode:?}");
        assert!(report.heat_carried, "{mode:?}");
        let [(session, heat)] = seen.carried.as_slice() else {
            panic!("{mode:?}: {} handed on", seen.carried.len());
        };
        assert_eq!(*session, 1, "{mode:?}");
        assert_eq!(heat.pages, pages, "{mode:?}");
        for partition in &seen.arrived {
            partition.stop();
        }
    }
    // Address order has no heat to hand on.
    let (report, _source, seen) = run(Mode::Precopy, Fault::None);
    assert_eq!(report.plan_heat, None);
    assert!(!report.heat_carried && seen.carried.is_empty());
    for partition in &seen.arrived {
        partition.stop();
    }
}

#[test]
fn a_failure_before_the_guest_runs_there_resumes_it_here() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_failure_before_the_guest_runs_there_resumes_it_here",
            &why,
        );
    }
    let cases = [
        (Mode::Precopy, Fault::PrepareRefused, false),
        (Mode::Precopy, Fault::Connect, true),
        (Mode::Precopy, Fault::CommitRefused, true),
        (Mode::Hybrid, Fault::Connect, true),
        (Mode::Hybrid, Fault::CommitRefused, true),
    ];
    for (mode, fault, had_session) in cases {
        let case = format!("{mode:?}, {fault:?}");
        let (report, source, seen) = run(mode, fault);
        assert_eq!(report.status, MigrationStatus::Failed, "{case}");
        assert!(report.error.is_some(), "{case}");
        assert!(!report.downtime_limit_met, "{case}");
        assert_eq!(report.downtime_note, None, "{case}");
        // Measured only once the rounds ran, which needs the data connection.
        assert_eq!(
            report.guest_ops_ratio.is_some(),
            had_session && fault != Fault::Connect,
            "{case}: {:?}",
            report.guest_ops_ratio
        );
        assert_runs_on(&source, &case);
        assert_eq!(
            seen.aborted,
            if had_session { vec![1] } else { vec![] },
            "{case}"
        );
        // Nothing runs on the destination: exactly one running copy.
        for arrived in &seen.arrived {
            assert_eq!(arrived.state(), PartitionState::Stopped, "{case}");
        }
        source.stop();
    }
}

#[test]
fn an_unanswered_commit_or_handover_leaves_one_copy_paused_awaiting_the_handover() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "an_unanswered_commit_or_handover_leaves_one_copy_paused_awaiting_the_handover",
            &why,
        );
    }
    for mode in [Mode::Precopy, Mode::Hybrid] {
        for fault in [Fault::CommitAnswerLost, Fault::HandoverAnswerLost] {
            let case = format!("{mode:?}, {fault:?}");
            let (report, source, seen) = run(mode, fault);
            assert_eq!(report.status, MigrationStatus::Failed, "{case}");
            // Neither resumed nor discarded: paused, saying whose handover it awaits, and
            // refusing to resume by itself.
            assert_eq!(source.state(), PartitionState::AwaitingHandover, "{case}");
            let handover = source.awaiting_handover().expect("awaiting");
            assert_eq!(handover.session, 1, "{case}");
            assert_eq!(handover.postcopy, mode == Mode::Hybrid, "{case}");
            assert!(source.resume().is_err(), "{case}");
            assert_eq!(source.state(), PartitionState::AwaitingHandover, "{case}");
            assert!(seen.aborted.is_empty(), "{case}: {:?}", seen.aborted);
            let [arrived] = seen.arrived.as_slice() else {
                panic!("{case}: {} partitions arrived", seen.arrived.len());
            };
            // The commit restored it parked; only a handover that came through runs it.
            match fault {
                Fault::CommitAnswerLost => {
                    assert_eq!(arrived.state(), PartitionState::Paused, "{case}");
                }
                _ => assert_runs_on(arrived, &case),
            }
            arrived.stop();
            source.stop();
        }
    }
}

/// Every page arrived and the destination finished, but its answer to `finish` was lost: the
/// source's recovery finds nothing to recover, asks `finish` again, gets the same answer, and
/// the migration completes.
#[test]
fn a_lost_finish_answer_is_asked_again_and_the_migration_completes() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_lost_finish_answer_is_asked_again_and_the_migration_completes",
            &why,
        );
    }
    let (report, source, seen) = run(Mode::Hybrid, Fault::FinishAnswerLost);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert!(report.source_digest.is_some());
    assert_eq!(report.source_digest, report.dest_digest, "{report:?}");
    assert_eq!(report.postcopy_recoveries, 0, "{report:?}");
    assert_eq!(source.state(), PartitionState::Stopped);
    for partition in &seen.arrived {
        partition.stop();
    }
}

/// The destination forgets the session in post-copy: there is nothing to recover, and the
/// source keeps the only complete copy, paused.
#[test]
fn a_failure_after_a_hybrid_cutover_keeps_the_paused_copy() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_failure_after_a_hybrid_cutover_keeps_the_paused_copy",
            &why,
        );
    }
    let (report, source, seen) = run(Mode::Hybrid, Fault::SessionLost);
    assert_eq!(report.status, MigrationStatus::Failed);
    let error = report.error.unwrap_or_default();
    assert!(error.contains("after cutover"), "{error}");
    // The session is gone there, so there is nothing to recover: one try.
    assert!(error.contains("in 1 tries"), "{error}");
    // The guest runs on the destination; the source keeps its copy, paused, untouched, and
    // refuses to run it beside that one.
    assert_eq!(source.state(), PartitionState::PostcopyPaused);
    let paused = source
        .postcopy_paused()
        .expect("what it holds the pages of");
    assert_eq!(paused.session, 1);
    assert!(source.resume().is_err());
    assert_eq!(source.state(), PartitionState::PostcopyPaused);
    assert!(seen.aborted.is_empty());
    let [arrived] = seen.arrived.as_slice() else {
        panic!("{} partitions arrived", seen.arrived.len());
    };
    assert_runs_on(arrived, "hybrid on the destination");
    arrived.stop();
    source.stop();
}

/// Every connection breaks as the guest starts on the destination, before the push: the
/// source recovers the session over new ones, the destination says what it lacks, and the
/// migration completes with nothing lost.
#[test]
fn a_broken_postcopy_recovers_over_new_connections_and_completes() {
    let test = "a_broken_postcopy_recovers_over_new_connections_and_completes";
    if let Some(why) = kvm_unavailable() {
        return skip(test, &why);
    }
    // A slow link and a 1 ms limit: the guest resumes with its written pages missing.
    let options = MigrationOptions {
        strategy: Strategy::Address,
        mode: Mode::Hybrid,
        downtime_limit: Duration::from_millis(1),
        bandwidth_limit: Some(20_000_000),
        connections: 2,
        ..MigrationOptions::default()
    };
    let (report, source, seen) = run_with("rw-mix", "hot_rw=1024", &options, Fault::PostcopyCut);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(report.postcopy_recoveries, 1, "{report:?}");
    // rw-mix touches its stale pages at once: the faults that waited out the pause were
    // demanded again over the new urgent connection.
    assert!(report.postcopy_rerequests > 0, "{report:?}");
    assert!(report.source_digest.is_some());
    assert_eq!(report.source_digest, report.dest_digest, "{report:?}");
    assert_eq!(source.state(), PartitionState::Stopped);
    assert!(seen.aborted.is_empty());
    let [arrived] = seen.arrived.as_slice() else {
        panic!("{} partitions arrived", seen.arrived.len());
    };
    assert_runs_on(arrived, "recovered on the destination");
    arrived.stop();
}

/// Uniform writes without the periodic full check, which only reads (a round that falls on it
/// finds nothing dirty).
const WRITE_ONLY: &str = "check_every=1000000000000";

/// A guest that dirties all its memory faster than a 16 MB/s link carries it: pre-copy could
/// meet a 20 ms limit only by throttling it, which even at 99% is not enough.
/// Every migration of this binary holds this shared; one that must not share the machine with
/// the others holds it alone.
static MIGRATIONS: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `migration` with no other migration of this binary running: a guest that must keep
/// dirtying memory to be what the test says (one that cannot converge) needs its CPU, and on
/// two cores ten migrations at once starved it into converging.
fn alone<T>(migration: impl FnOnce() -> T) -> T {
    let _alone = MIGRATIONS.write().unwrap_or_else(|p| p.into_inner());
    ALONE.set(true);
    let result = migration();
    ALONE.set(false);
    result
}

fn cannot_converge() -> MigrationOptions {
    MigrationOptions {
        strategy: Strategy::Address,
        mode: Mode::Precopy,
        downtime_limit: Duration::from_millis(20),
        max_rounds: 4,
        bandwidth_limit: Some(16_000_000),
        ..MigrationOptions::default()
    }
}

#[test]
fn a_migration_that_cannot_meet_the_limit_throttles_then_cancels_and_the_guest_runs_on_here() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_migration_that_cannot_meet_the_limit_throttles", &why);
    }
    let (report, source, seen) =
        alone(|| run_with("uniform-write", WRITE_ONLY, &cannot_converge(), Fault::None));
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("did not converge"), "{error}");
    assert!(report.throttle_pct_max >= 20, "{report:?}");
    assert_eq!(report.cutover_reason, None);
    assert_eq!(report.rounds, 4);
    // Rolled back: running here at full speed, the destination's session aborted, nothing
    // restored there.
    assert_eq!(source.throttle_pct(), 0);
    assert_runs_on(&source, "cancelled");
    assert_eq!(seen.aborted, vec![1]);
    assert!(seen.arrived.is_empty());
    source.stop();
}

#[test]
fn force_cuts_over_at_the_round_limit_and_says_the_limit_was_missed() {
    if let Some(why) = kvm_unavailable() {
        return skip("force_cuts_over_at_the_round_limit", &why);
    }
    let options = MigrationOptions {
        timeout_strategy: TimeoutStrategy::Force,
        ..cannot_converge()
    };
    let (report, source, seen) =
        alone(|| run_with("uniform-write", WRITE_ONLY, &options, Fault::None));
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(report.source_digest, report.dest_digest);
    assert_eq!(report.cutover_reason, Some(CutoverReason::MaxRounds));
    assert!(report.throttle_pct_max >= 20, "{report:?}");
    assert!(report.downtime_ms > 20, "{report:?}");
    let [arrived] = seen.arrived.as_slice() else {
        panic!("{} partitions arrived", seen.arrived.len());
    };
    // The restored copy is not throttled.
    assert_eq!(arrived.throttle_pct(), 0);
    assert_runs_on(arrived, "forced, on the destination");
    arrived.stop();
    source.stop();
}

#[test]
fn the_timeout_cancels_mid_round() {
    if let Some(why) = kvm_unavailable() {
        return skip("the_timeout_cancels_mid_round", &why);
    }
    // Round 0 alone would take 16 MiB / 4 MB/s = 4.2 s; pages go in batches of 4 MiB.
    let options = MigrationOptions {
        bandwidth_limit: Some(4_000_000),
        timeout: Some(Duration::from_millis(1500)),
        ..cannot_converge()
    };
    let (report, source, seen) = run_with("uniform-write", WRITE_ONLY, &options, Fault::None);
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("timeout"), "{error}");
    assert_eq!(report.rounds, 1);
    assert!(report.pages_sent < report.pages_total, "{report:?}");
    assert_runs_on(&source, "timed out");
    assert_eq!(seen.aborted, vec![1]);
    source.stop();
}

#[test]
fn contradictory_options_are_refused_before_anything_is_asked() {
    if let Some(why) = kvm_unavailable() {
        return skip("contradictory_options_are_refused", &why);
    }
    let options = MigrationOptions {
        converge: Some(Converge::Postcopy),
        ..MigrationOptions::default()
    };
    let (report, source, seen) = run_with("rw-mix", "", &options, Fault::None);
    assert_eq!(report.status, MigrationStatus::Failed);
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("--mode hybrid"), "{error}");
    assert_eq!(report.pages_sent, 0);
    assert_runs_on(&source, "refused options");
    assert!(seen.aborted.is_empty() && seen.arrived.is_empty());
    source.stop();
}

/// A status call between the commit and the handover reads only pages that are there: the
/// pages the VMM reads travel within the downtime whatever its budget, and a page that is
/// not there is never waited on. (It once waited for good: nothing brings a page before the
/// handover, and the handover waited behind it.)
#[test]
fn a_status_call_before_the_handover_never_waits_on_a_missing_page() {
    let test = "a_status_call_before_the_handover_never_waits_on_a_missing_page";
    if let Some(why) = kvm_unavailable() {
        return skip(test, &why);
    }
    // Every page stale at the pause, and no budget to send any of them in the downtime.
    let options = MigrationOptions {
        strategy: Strategy::Address,
        mode: Mode::Hybrid,
        max_rounds: 1,
        downtime_limit: Duration::from_millis(1),
        ..MigrationOptions::default()
    };
    let (report, _, seen) = run_with("uniform-write", "", &options, Fault::StatusBeforeHandover);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(report.source_digest, report.dest_digest);
    let took = seen.status_before_handover;
    assert!(took.is_some(), "the status call waited over 5 s");
    for arrived in &seen.arrived {
        arrived.stop();
    }
}

/// Digests decide: a pre-copy destination whose memory is not the source's never runs the
/// guest; the source resumes and the destination's copy is dropped.
#[test]
fn a_precopy_whose_digests_differ_resumes_here_and_never_completes() {
    let test = "a_precopy_whose_digests_differ_resumes_here_and_never_completes";
    if let Some(why) = kvm_unavailable() {
        return skip(test, &why);
    }
    let (report, source, seen) = run(Mode::Precopy, Fault::WrongDigest);
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("digest"), "{error}");
    assert_runs_on(&source, test);
    assert_eq!(
        seen.aborted,
        vec![1],
        "the destination's session is aborted"
    );
    source.stop();
}
