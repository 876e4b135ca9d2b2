//! The engine tests' harness: an in-process destination (the real receiving `Session`, no
//! daemons) that fails where a test asks, and the helpers that launch a partition and
//! migrate it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use migrator::{
    migration::{
        MigrationReport, Mode, Strategy,
        control::{
            CarriedHeat, CommitReply, CommitRequest, Destination, DestinationError, FinishReply,
            HandoverReply, PrepareReply, PrepareRequest, Recovery, Refusal,
        },
        destination::{ProbeSlot, Session, WindowOrWhyNot},
        job::Job,
        link::{DataLink, DataStream, LinkError},
        report::PostCutoverFaults,
        source::{MigrationOptions, PlanHeat, migrate},
    },
    vmm::{GuestImage, Partition, PartitionConfig, PartitionState},
};

pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the in-process destination fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
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
pub(crate) struct Seen {
    pub(crate) aborted: Vec<u64>,
    /// The heat each session was handed once the move completed.
    pub(crate) carried: Vec<(u64, CarriedHeat)>,
    /// Partitions restored here, and whether each is still running.
    pub(crate) arrived: Vec<Arc<Partition>>,
    /// `StatusBeforeHandover`: how long the status call took, if it answered within 5 s.
    pub(crate) status_before_handover: Option<Duration>,
}

pub(crate) struct InProcess {
    pub(crate) fault: Fault,
    pub(crate) sessions: BTreeMap<u64, Arc<Session>>,
    /// The probes that count faults after the resume: empty (never loaded) unless a test
    /// counts them.
    pub(crate) probes: ProbeSlot,
    pub(crate) fault_windows: BTreeMap<u64, WindowOrWhyNot>,
    pub(crate) next: u64,
    pub(crate) seen: Arc<Mutex<Seen>>,
    /// Clones of the connections the source opened, for `PostcopyCut` to break.
    pub(crate) opened: Mutex<Vec<DataStream>>,
    /// The answers of finished sessions, for a `finish` asked again (as the daemon keeps
    /// them).
    pub(crate) finished: BTreeMap<u64, FinishReply>,
}

pub(crate) fn unreachable(what: &'static str) -> DestinationError {
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

pub(crate) fn launch_workload(workload: &str, args: &str) -> Arc<Partition> {
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

pub(crate) fn ops(partition: &Partition) -> u64 {
    partition.status().progress.ops
}

/// Migrates a fresh rw-mix partition with `fault` injected; returns the report, the source
/// partition and what the destination saw.
pub(crate) fn run(mode: Mode, fault: Fault) -> (MigrationReport, Arc<Partition>, Seen) {
    let options = MigrationOptions {
        strategy: Strategy::Address,
        mode,
        ..MigrationOptions::default()
    };
    run_with("rw-mix", "", &options, fault)
}

/// Migrates a fresh `workload` partition with `options` and `fault`.
pub(crate) fn run_with(
    workload: &str,
    args: &str,
    options: &MigrationOptions,
    fault: Fault,
) -> (MigrationReport, Arc<Partition>, Seen) {
    run_counting(workload, args, options, fault, &ProbeSlot::default(), None)
}

/// As `run_with`, the destination counting faults after the resume with `probes`.
pub(crate) fn run_counting(
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
pub(crate) fn assert_runs_on(partition: &Partition, case: &str) {
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
pub(crate) fn assert_downtime_accounted(report: &MigrationReport, limit: Duration, case: &str) {
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

/// Uniform writes without the periodic full check, which only reads (a round that falls on it
/// finds nothing dirty).
pub(crate) const WRITE_ONLY: &str = "check_every=1000000000000";

/// A guest that dirties all its memory faster than a 16 MB/s link carries it: pre-copy could
/// meet a 20 ms limit only by throttling it, which even at 99% is not enough.
/// Every migration of this binary holds this shared; one that must not share the machine with
/// the others holds it alone.
pub(crate) static MIGRATIONS: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `migration` with no other migration of this binary running: a guest that must keep
/// dirtying memory to be what the test says (one that cannot converge) needs its CPU, and on
/// two cores ten migrations at once starved it into converging.
pub(crate) fn alone<T>(migration: impl FnOnce() -> T) -> T {
    let _alone = MIGRATIONS.write().unwrap_or_else(|p| p.into_inner());
    ALONE.set(true);
    let result = migration();
    ALONE.set(false);
    result
}

pub(crate) fn cannot_converge() -> MigrationOptions {
    MigrationOptions {
        strategy: Strategy::Address,
        mode: Mode::Precopy,
        downtime_limit: Duration::from_millis(20),
        max_rounds: 4,
        bandwidth_limit: Some(16_000_000),
        ..MigrationOptions::default()
    }
}
