//! The source side of a migration: plan, rounds, convergence, cutover, and rollback.
//!
//! Nothing is ever lost: until the destination confirms it runs the partition, any failure
//! resumes the partition here, with every page intact, and aborts the destination's session.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use heatprobe::{Probes, probes::error_chain};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

use super::{
    compress::{Compress, CompressError},
    control::{CarriedHeat, Destination, DestinationError, PrepareRequest},
    convergence::{Converge, GiveUp, TimeoutStrategy},
    job::Job,
    link::LinkError,
    protocol::{MAX_CONNECTIONS, PROTOCOL_VERSION},
    report::{
        GuestLocation, GuestWorkLost, MigrationReport, MigrationStatus, Mode, PlanHeatOrigin,
        Strategy,
    },
    transport::{PageSender, SendCounts, TransportError},
};
use crate::vmm::{AwaitingHandover, Partition, PartitionError, PostcopyPaused};

mod cutover;
mod discard;
mod guest_ops;
pub mod phase;
mod postcopy;
mod rounds;
pub mod stripes;

pub use self::phase::{Rollback, SourceEvent, SourcePhase, SourcePhaseError};

use self::{
    cutover::{cutover_hybrid, cutover_precopy},
    rounds::{Run, iterate, plan},
    stripes::Stripes,
};

/// Tunables of one migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationOptions {
    pub strategy: Strategy,
    pub mode: Mode,
    pub downtime_limit: Duration,
    pub max_rounds: u32,
    /// Bytes per second the sender may use; `None` for no limit.
    pub bandwidth_limit: Option<u64>,
    /// How long to profile before round 0 (heat strategy). 2 s by default: on kv-zipf with
    /// its keys in place heat re-sent 0.54x the pages of address after 2 s against 0.60-0.62x
    /// after 1 s (docs/BENCHMARKS.md), for one second more of total time.
    pub profile_window: Duration,
    /// Heat strategy, pre-copy: hold back pages that are hot and written (the writable working
    /// set of Clark et al.) from every round but the last, since they would be dirtied again
    /// before the round ends.
    pub defer_hot_writes: bool,
    /// What to do when rounds stop shrinking; `None` for the mode's default (pre-copy:
    /// throttle; hybrid: post-copy).
    pub converge: Option<Converge>,
    /// A bound on the whole migration's time before cutover.
    pub timeout: Option<Duration>,
    /// What the timeout (and, when throttling, the round limit) does.
    pub timeout_strategy: TimeoutStrategy,
    /// How long after the resume the destination counts the guest's faults (zero: not at
    /// all). The migration's report waits for it.
    pub fault_window: Duration,
    /// How page frames are compressed on the data connection (not the urgent one, whose
    /// demanded pages go one at a time, as fast as they can). Off when absent.
    #[serde(default)]
    pub compress: Compress,
    /// Data connections the pages are striped across, each with a sender and a receiver
    /// thread of its own (hybrid mode adds the urgent one).
    #[serde(default = "one_connection")]
    pub connections: u32,
    /// Hybrid: how long the source tries to recover a broken post-copy over new connections
    /// before it gives up and keeps its copy paused (`postcopy-paused`) for a manual
    /// `migrate --resume`. Zero: no recovery, a broken post-copy fails at once.
    #[serde(default = "default_recover_window")]
    pub recover_window: Duration,
    /// Heat strategy: the most the profile may cost the guest, as a share of its vCPUs' time
    /// over the profile (`heatprobe::budget`); `None`: no cap beyond the sampling's own.
    #[serde(default = "default_heat_budget")]
    pub heat_budget: Option<f64>,
}

/// The profile's default budget: 1% of the guest's time, as DAMON's monitoring costs.
pub const DEFAULT_HEAT_BUDGET: f64 = 0.01;

fn default_heat_budget() -> Option<f64> {
    Some(DEFAULT_HEAT_BUDGET)
}

/// QEMU leaves a paused post-copy to its operator; ten minutes of tries cover a link or a
/// peer daemon that comes back, and then the operator decides.
pub const DEFAULT_RECOVER_WINDOW: Duration = Duration::from_secs(600);

fn default_recover_window() -> Duration {
    DEFAULT_RECOVER_WINDOW
}

fn one_connection() -> u32 {
    1
}

/// Options that contradict each other.
#[derive(Debug, Error, PartialEq)]
pub enum OptionsError {
    #[error(
        "--converge postcopy needs --mode hybrid (pre-copy never runs the guest on missing pages)"
    )]
    PostcopyInPrecopy,
    #[error("--max-rounds must be at least 1")]
    NoRounds,
    #[error("--downtime-limit must be positive")]
    NoDowntime,
    #[error("--connections must be 1 to {MAX_CONNECTIONS}, got {0}")]
    Connections(u32),
    #[error("bad --compress")]
    Compress(#[from] CompressError),
    #[error("--heat-budget must be a share of the guest's time in (0, 1] (as 1% or 0.01), got {0}")]
    HeatBudget(f64),
}

impl MigrationOptions {
    /// What happens when rounds stop shrinking.
    pub fn converge(&self) -> Converge {
        self.converge.unwrap_or(match self.mode {
            Mode::Precopy => Converge::Throttle,
            Mode::Hybrid => Converge::Postcopy,
        })
    }

    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.mode == Mode::Precopy && self.converge() == Converge::Postcopy {
            return Err(OptionsError::PostcopyInPrecopy);
        }
        if self.max_rounds == 0 {
            return Err(OptionsError::NoRounds);
        }
        if self.downtime_limit.is_zero() {
            return Err(OptionsError::NoDowntime);
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(OptionsError::Connections(self.connections));
        }
        self.compress.validate()?;
        if let Some(share) = self.heat_budget
            && !(share > 0.0 && share <= 1.0)
        {
            return Err(OptionsError::HeatBudget(share));
        }
        Ok(())
    }
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::Heat,
            mode: Mode::Precopy,
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            bandwidth_limit: None,
            profile_window: Duration::from_secs(2),
            defer_hot_writes: true,
            converge: None,
            timeout: None,
            timeout_strategy: TimeoutStrategy::Cancel,
            fault_window: Duration::from_secs(2),
            connections: 1,
            compress: Compress::None,
            recover_window: DEFAULT_RECOVER_WINDOW,
            heat_budget: default_heat_budget(),
        }
    }
}

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("bad migration options")]
    Options(#[from] OptionsError),
    #[error(
        "pre-copy did not converge: {reason} with {pages} pages left ({expected_ms} ms at the measured rate, limit {limit_ms} ms) at {throttle_pct}% throttle; the partition runs on here"
    )]
    NotConverged {
        reason: GiveUp,
        pages: u64,
        expected_ms: u64,
        limit_ms: u64,
        throttle_pct: u8,
    },
    #[error("the destination did not prepare")]
    Prepare(#[source] DestinationError),
    #[error("cannot open the data connection")]
    Connect(#[from] LinkError),
    #[error("sending pages failed")]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error("the heat strategy needs the eBPF probes, which could not be loaded")]
    NoProbes,
    #[error("profiling the partition failed")]
    Profile(#[source] heatprobe::ProfilerError),
    #[error("the profile's budget is invalid")]
    Budget(#[source] heatprobe::budget::BudgetError),
    #[error("the profile does not fit the partition")]
    Plan(#[source] heatprobe::plan::PlanError),
    #[error("the destination failed to take over")]
    Commit(#[source] DestinationError),
    #[error(
        "after cutover, the destination did not get every page; the source keeps the paused partition with every page"
    )]
    AfterCutover(#[source] Box<MigrationError>),
    #[error("the destination did not run the partition it restored")]
    Handover(#[source] DestinationError),
    #[error("the destination did not confirm every page")]
    Finish(#[source] DestinationError),
    #[error("the dirty log was off")]
    DirtyLogOff,
    #[error("a hybrid migration has no urgent connection")]
    NoUrgentConnection,
    #[error("the destination sent a frame other than `Discarded` on the data connection")]
    UnexpectedFrame,
    #[error("the destination did not recover post-copy")]
    Recover(#[source] DestinationError),
    #[error("the destination's missing pages are {words} words, not a bitmap of {frames} pages")]
    BadRecovery { words: usize, frames: u64 },
    #[error(
        "post-copy broke ({broken}) and was not recovered in {tries} tries within the recover window of {window:?}"
    )]
    NotRecovered {
        tries: u32,
        window: Duration,
        broken: String,
        #[source]
        last: Box<MigrationError>,
    },
    #[error("the migration was cancelled")]
    Cancelled,
    #[error("hashing the source's memory panicked")]
    DigestPanicked,
    #[error(
        "the destination's memory is not the source's (digest {dest} there, {source_digest} here)"
    )]
    DigestMismatch { source_digest: String, dest: String },
    #[error("the migration's phases went out of order")]
    Phase(#[from] SourcePhaseError),
}

/// Heat a plan can be made from without profiling: what a migration carried here, or a heat
/// file, and when it was measured.
#[derive(Clone, Debug)]
pub struct PlanHeat {
    pub pages: Arc<[heatprobe::PageHeat]>,
    pub measured: Instant,
    /// Where it came from, for the report.
    pub origin: PlanHeatOrigin,
    /// What measuring it cost the guest, where that is known (warm heat: the budget's spend
    /// over its span).
    pub spent: Option<heatprobe::budget::Spent>,
}

/// Migrates `partition` to `destination`. Always returns a report; on failure before cutover
/// the partition runs on here as before.
pub fn migrate(
    partition: &Arc<Partition>,
    destination: &mut dyn Destination,
    probes: Option<Arc<Probes>>,
    carried: Option<PlanHeat>,
    options: &MigrationOptions,
    job: &Job,
) -> MigrationReport {
    let started = Instant::now();
    // The guest's pace before the migration touches it, to compare with its pace during the
    // rounds; part of the setup time.
    let pace = guest_ops::rate_before(partition, guest_ops::BEFORE_WINDOW);
    let ops_before = pace.map(|p| p.per_second);
    let mut run = Run::new(partition, options, job, started);
    run.ledger = guest_ops::Ledger::new(pace);
    partition.set_migrating(true);
    let result = execute(&mut run, destination, probes, carried, ops_before);
    conclude(run, destination, result)
}

/// Resumes the post-copy of `partition`, paused here (`postcopy-paused`) after its recover
/// window ran out: recovers the session `paused` names over new connections and pushes the
/// pages the destination lacks, in address order (the heat the plan had is long stale).
/// Always returns a report; on failure the partition stays paused, holding the pages.
pub fn resume_postcopy(
    partition: &Arc<Partition>,
    destination: &mut dyn Destination,
    paused: PostcopyPaused,
    options: &MigrationOptions,
    job: &Job,
) -> MigrationReport {
    let session = paused.session;
    let mut run = Run::new(partition, options, job, Instant::now());
    // Paused after the handover: the recovery comes first.
    job.start_paused_postcopy(session);
    run.report.id_on_destination = paused.id_on_destination;
    partition.set_postcopy_paused(None);
    partition.set_migrating(true);
    let result = options
        .validate()
        .map_err(MigrationError::from)
        .and_then(|()| postcopy::postcopy(&mut run, destination, session, None, &[], Vec::new()))
        .and_then(|()| cutover::digests_decide(&mut run))
        .map(|()| session);
    conclude(run, destination, result)
}

impl<'a> Run<'a> {
    fn new(
        partition: &'a Arc<Partition>,
        options: &'a MigrationOptions,
        job: &'a Job,
        started: Instant,
    ) -> Self {
        let frames = partition.memory().frames();
        let mut report = MigrationReport::new(options.strategy, options.mode);
        report.pages_total = frames;
        Run {
            partition,
            options,
            job,
            report,
            downtime_limit: options.downtime_limit,
            bandwidth_limit: options.bandwidth_limit,
            sent_once: vec![false; frames as usize],
            sent_hash: vec![0; frames as usize],
            counts: SendCounts::default(),
            started,
            prepare_rtt: Duration::ZERO,
            link_rate: None,
            wire_rate: None,
            remove_per_page: Duration::ZERO,
            plan_heat: None,
            ledger: guest_ops::Ledger::new(None),
        }
    }
}

/// The report of `run`, which ended with `result`; rolls back what a failure calls for.
fn conclude(
    mut run: Run<'_>,
    destination: &mut dyn Destination,
    result: Result<u64, MigrationError>,
) -> MigrationReport {
    let partition = run.partition;
    let options = run.options;
    // The phase failed in decides the rollback; from here the migration is over.
    let rollback = match &result {
        Ok(_) => None,
        Err(_) => {
            let rollback = run.job.phase().rollback();
            if let Err(e) = run.advance(SourceEvent::Fail) {
                warn!("{}", error_chain(&e));
            }
            rollback
        }
    };
    // The move is over; what follows (the fault window) is measurement.
    let total_time = run.started.elapsed();
    // Full speed again, whatever happened: a paused partition is unaffected, a resumed one
    // must not stay slowed.
    if let Err(e) = partition.set_throttle(0) {
        warn!("unthrottling the partition: {}", error_chain(&e));
    }
    let mut report = run.report;
    report.migration = Some(run.job.id().to_string());
    report.pages_sent = run.counts.pages;
    report.zero_pages = run.counts.zero_pages;
    report.bytes_sent = run.counts.bytes;
    report.bytes_uncompressed = run.counts.uncompressed_bytes;
    report.compression_ratio = compression_ratio(run.counts);
    report.total_time_ms = total_time.as_millis() as u64;
    report.mbps = run.counts.bytes as f64 * 8.0 / total_time.as_secs_f64().max(1e-6) / 1e6;
    match &result {
        Ok(_) => {
            report.status = MigrationStatus::Completed;
            report.guest_location = GuestLocation::Destination;
            // The destination runs the partition: only now is the source's copy released.
            partition.stop();
        }
        Err(e) => {
            warn!("migration failed: {}", error_chain(e));
            report.error = Some(error_chain(e));
            if matches!(e, MigrationError::Cancelled) {
                report.status = MigrationStatus::Cancelled;
            }
            match rollback {
                Some(Rollback::Resume { abort }) => {
                    if let Some(session) = abort {
                        destination.abort(session);
                    }
                    let _ = partition.dirty_log_stop();
                    partition.set_migrating(false);
                    if let Err(e) = partition.resume() {
                        warn!("resuming the partition after a failed migration: {e}");
                    }
                }
                // It reads as `postcopy-paused`, not `migrating`, and refuses to resume.
                Some(Rollback::KeepPaused { session }) => {
                    partition.set_postcopy_paused(Some(PostcopyPaused {
                        peer: destination.peer(),
                        session,
                        id_on_destination: report.id_on_destination.clone(),
                    }));
                    partition.set_migrating(false);
                    report.guest_location = GuestLocation::DestinationSourcePaused;
                }
                Some(Rollback::AwaitHandover { session }) => {
                    partition.set_awaiting_handover(Some(AwaitingHandover {
                        peer: destination.peer(),
                        session,
                        postcopy: options.mode == Mode::Hybrid,
                    }));
                    partition.set_migrating(false);
                    report.guest_location = GuestLocation::AwaitingHandover;
                }
                None => {}
            }
        }
    }
    report.downtime_limit_ms = run.downtime_limit.as_millis() as u64;
    report.judge_downtime(run.downtime_limit);
    // Whatever the engine did, users see the phase it ended in.
    run.job.progress_mut().phase = run.job.phase().shown();
    if report.status == MigrationStatus::Completed {
        report.guest_stall_ms = report.downtime_ms as f64 + report.postcopy_blocktime_ms;
    }
    // The heat the plan was made from goes on with the guest (not in the downtime: it runs
    // there already).
    if let (Ok(session), Some(heat)) = (&result, run.plan_heat.take()) {
        let carried = CarriedHeat {
            age_ms: heat.measured.elapsed().as_millis() as u64,
            pages: heat.pages.to_vec(),
        };
        match destination.carry_heat(*session, carried) {
            Ok(()) => report.heat_carried = true,
            Err(e) => warn!("handing the heat on: {}", error_chain(&e)),
        }
    }
    if let Ok(session) = result
        && !options.fault_window.is_zero()
    {
        match destination.faults(session) {
            Ok(faults) => report.post_cutover_faults = Some(faults),
            Err(e) => report.post_cutover_faults_note = Some(error_chain(&e)),
        }
    }
    // A failure left the ledger open where it failed.
    run.ledger.close(partition);
    match work_lost(&run.ledger, &report) {
        Ok(lost) => report.guest_work_lost = Some(lost),
        Err(why) => report.guest_work_lost_note = Some(why),
    }
    report
}

/// The guest's whole bill: the ledger's parts here, the downtime, and the fault window after
/// the resume as the destination counted it.
fn work_lost(
    ledger: &guest_ops::Ledger,
    report: &MigrationReport,
) -> Result<GuestWorkLost, String> {
    let Some((pace, [profile_ms, rounds_ms, throttle_ms], counted)) = ledger.totals() else {
        return Err(
            "not measured: the guest did no operations just before the migration (paused, \
             idle, or an image that keeps no count)"
                .into(),
        );
    };
    let downtime_ms = report.downtime_ms as f64;
    let after = report
        .post_cutover_faults
        .and_then(|f| Some((f.ops?, f.ops_us?)))
        .map(|(done, took_us)| {
            let took = Duration::from_micros(took_us);
            (
                guest_ops::lost_ms(took, done, pace.per_second),
                took.as_secs_f64() * 1e3,
            )
        });
    let warm_heat_ms = match report.plan_heat {
        Some(PlanHeatOrigin::Warm) => report.profile_spent.map_or(0.0, |s| s.estimated_ms),
        _ => 0.0,
    };
    let counted_ms = counted.as_secs_f64() * 1e3 + downtime_ms + after.map_or(0.0, |a| a.1);
    let after_ms = after.map(|a| a.0);
    Ok(GuestWorkLost {
        total_ms: warm_heat_ms
            + profile_ms
            + rounds_ms
            + throttle_ms
            + downtime_ms
            + after_ms.unwrap_or(0.0),
        profile_ms,
        warm_heat_ms,
        rounds_ms,
        throttle_ms,
        downtime_ms,
        after_ms,
        rate_before: pace.per_second,
        pace_ms: pace.over.as_secs_f64() * 1e3,
        counted_ms,
    })
}

/// Uncompressed bytes over bytes on the wire: 1 when nothing was compressed (or sent).
fn compression_ratio(counts: SendCounts) -> f64 {
    if counts.bytes == 0 {
        return 1.0;
    }
    counts.uncompressed_bytes as f64 / counts.bytes as f64
}

fn execute(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    probes: Option<Arc<Probes>>,
    carried: Option<PlanHeat>,
    ops_before: Option<f64>,
) -> Result<u64, MigrationError> {
    let partition = run.partition;
    let options = run.options;
    options.validate()?;
    let asked = Instant::now();
    let reply = destination
        .prepare(PrepareRequest {
            protocol_min: PROTOCOL_VERSION,
            protocol_max: PROTOCOL_VERSION,
            config: partition.config().clone(),
            mode: options.mode,
            fault_window_ms: options.fault_window.as_millis() as u64,
            connections: options.connections,
        })
        .map_err(MigrationError::Prepare)?;
    let session = reply.session;
    run.advance(SourceEvent::Prepared { session })?;
    // The prepare's round trip includes setting the session up, which can be slow once (a busy
    // host, the destination's first migration): a plain call's bounds it, or a fixed cost
    // above the limit would keep even an empty set from fitting.
    run.prepare_rtt = asked.elapsed();
    if let Some(rtt) = destination.round_trip() {
        run.prepare_rtt = run.prepare_rtt.min(rtt);
    }
    // The destination's word, bounded: at most a millisecond a page.
    run.remove_per_page = Duration::from_nanos(reply.remove_ns_per_page.min(1_000_000));
    let streams = (0..options.connections)
        .map(|_| destination.connect_data(reply.data_port))
        .collect::<Result<Vec<_>, _>>()?;
    // Hybrid: a second connection for the destination's demands and the pages they ask for,
    // so that none waits behind the push (QEMU's postcopy-preempt channel).
    let urgent = match options.mode {
        Mode::Precopy => None,
        Mode::Hybrid => {
            let mut urgent = PageSender::new(destination.connect_data(reply.data_port)?, None);
            urgent.send_urgent()?;
            Some(urgent)
        }
    };
    let mut sender = Stripes::new(streams, options.bandwidth_limit);
    sender.set_compression(options.compress)?;
    // From here the guest pays for the migration: the dirty log, heat's profile (whose
    // re-arming faults cost it more than the rounds do in hybrid mode), then the rounds.
    let under_migration = guest_ops::OpsMark::now(partition);
    run.ledger.enter(partition, guest_ops::Part::Rounds);
    // Pre-copy's profile reads write heat from the dirty log, so the log starts first.
    // Hybrid's reads heat from dropped mappings: a log on through its profile would make the
    // guest pay a write fault on every page it writes meanwhile for nothing round 0 needs
    // (measured: 62k faults, 1.5 s of a flat-out guest's 2 s), so it starts after it.
    let log_first = options.mode == Mode::Precopy;
    if log_first {
        partition.dirty_log_start()?;
    }
    let mut order = plan(run, probes, carried)?;
    if !log_first {
        partition.dirty_log_start()?;
    }
    run.report.setup_time_ms = run.started.elapsed().as_millis() as u64;
    let dirty = iterate(run, &mut sender, &mut order)?;
    // The pause comes next.
    let during = guest_ops::rate(under_migration, guest_ops::OpsMark::now(partition));
    run.report.guest_ops_ratio = guest_ops::ratio(ops_before, during);
    match options.mode {
        Mode::Precopy => cutover_precopy(run, destination, session, &mut sender, &order, dirty),
        Mode::Hybrid => cutover_hybrid(
            run,
            destination,
            session,
            sender,
            urgent.ok_or(MigrationError::NoUrgentConnection)?,
            &order,
            dirty,
        ),
    }?;
    Ok(session)
}
