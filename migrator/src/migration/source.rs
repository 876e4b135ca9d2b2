//! The source side of a migration: plan, rounds, convergence, cutover, and rollback.
//!
//! Nothing is ever lost: until the destination confirms it runs the partition, any failure
//! resumes the partition here, with every page intact, and aborts the destination's session.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use heatprobe::{MigrationPlan, Probes, Profiler, probes::error_chain, profiler::ProfilerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};
use xxhash_rust::xxh3::xxh3_64;

use super::{
    link::{self, DataStream, LinkError},
    protocol::PROTOCOL_VERSION,
    report::{Latency, MigrationProgress, MigrationReport, Mode, Phase, Strategy},
    transport::{Frame, FrameReader, PageSender, SendCounts, TransportError},
};
use crate::vmm::{
    Partition, PartitionConfig, PartitionError, dirty::dirty_frames, memory::PAGE_SIZE,
    sampler::profile_partition, state,
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
    /// How long to profile before round 0 (heat strategy).
    pub profile_window: Duration,
    /// Heat strategy, pre-copy: hold back pages that are hot and written (the writable working
    /// set of Clark et al.) from every round but the last, since they would be dirtied again
    /// before the round ends.
    pub defer_hot_writes: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::Heat,
            mode: Mode::Precopy,
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            bandwidth_limit: None,
            profile_window: Duration::from_secs(1),
            defer_hot_writes: true,
        }
    }
}

/// Asks the destination to get ready for a partition of this shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub protocol_min: u16,
    pub protocol_max: u16,
    pub config: PartitionConfig,
    pub mode: Mode,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareReply {
    pub session: u64,
    pub data_port: u16,
}

/// The cutover: the vCPU state, and in hybrid mode the pages whose copy is stale.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitRequest {
    /// The partition's saved state (`vmm::state`), which the destination checks before it
    /// restores anything.
    pub snapshot: Vec<u8>,
    pub stale_pages: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitReply {
    pub id_on_destination: String,
    /// The digest of the memory the destination installed (precopy: at once; hybrid: later,
    /// from `finish`).
    pub dest_digest: Option<String>,
}

/// What the destination says once every page has arrived (hybrid mode).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinishReply {
    pub dest_digest: String,
    pub postcopy_requests: u64,
    pub fault_latency_us: Latency,
    pub post_cutover_faults: Option<u64>,
}

/// The destination as the source sees it. The daemon implements it over tarpc; tests can
/// implement it directly.
pub trait Destination {
    fn prepare(&mut self, request: PrepareRequest) -> Result<PrepareReply, String>;
    fn commit(&mut self, session: u64, request: CommitRequest) -> Result<CommitReply, String>;
    fn finish(&mut self, session: u64) -> Result<FinishReply, String>;
    fn abort(&mut self, session: u64);
    /// Opens the data connection to the listener the destination prepared on `port`.
    fn connect_data(&self, port: u16) -> Result<DataStream, LinkError>;
}

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("the destination refused to prepare: {0}")]
    Prepare(String),
    #[error("cannot open the data connection")]
    Connect(#[from] LinkError),
    #[error("sending pages failed")]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error("profiling the partition failed: {0}")]
    Profile(String),
    #[error("the destination failed to take over: {0}")]
    Commit(String),
    #[error(
        "after cutover, the destination did not get every page: {0}; the source keeps the paused partition with every page"
    )]
    AfterCutover(String),
    #[error("the dirty log was off")]
    DirtyLogOff,
}

/// Page ranks: `rank[frame]` is the frame's position in the plan.
struct Order {
    rank: Vec<u32>,
    /// Pages dirty in the previous round.
    last_dirty: Option<Vec<bool>>,
    /// Frames that are hot and written.
    hot_writes: Vec<bool>,
    /// Frames hottest first (the post-copy push order).
    hottest_first: Vec<u64>,
    /// Round 0's order.
    plan: Vec<u64>,
}

impl Order {
    fn address(frames: u64) -> Self {
        Self {
            rank: (0..frames as u32).collect(),
            last_dirty: None,
            hot_writes: vec![false; frames as usize],
            hottest_first: (0..frames).collect(),
            plan: (0..frames).collect(),
        }
    }

    fn from_heat(pages: &[heatprobe::PageHeat], frames: u64) -> Result<Self, MigrationError> {
        let plan = MigrationPlan::build(pages, Some(0..frames))
            .map_err(|e| MigrationError::Profile(e.to_string()))?;
        let order: Vec<u64> = plan.order().collect();
        let mut rank = vec![0u32; frames as usize];
        for (position, &frame) in order.iter().enumerate() {
            rank[frame as usize] = position as u32;
        }
        let mut hot_writes = vec![false; frames as usize];
        for page in pages {
            if page.class == heatprobe::HeatClass::Hot
                && page.access == heatprobe::Access::ReadWrite
            {
                hot_writes[page.page as usize] = true;
            }
        }
        let mut by_heat: Vec<&heatprobe::PageHeat> = pages.iter().collect();
        by_heat.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.page.cmp(&b.page)));
        let mut hottest_first: Vec<u64> = by_heat.iter().map(|p| p.page).collect();
        hottest_first.extend(plan.untouched.iter().flat_map(Clone::clone));
        Ok(Self {
            rank,
            last_dirty: None,
            hot_writes,
            hottest_first,
            plan: order,
        })
    }

    fn sort(&self, frames: &mut [u64]) {
        frames.sort_by_key(|&f| self.rank[f as usize]);
    }

    /// Folds one round's dirty pages into the write heat: a page dirty in this round and
    /// the one before counts as a hot write (and only such a page), and goes after every other
    /// page of a round.
    fn learn_from_round(&mut self, dirty: &[u64]) {
        let mut now = vec![false; self.hot_writes.len()];
        for &f in dirty {
            now[f as usize] = true;
        }
        let last = self.last_dirty.replace(now.clone());
        let Some(last) = last else {
            return;
        };
        let base = self.rank.len() as u32;
        for (f, (&was, &is)) in last.iter().zip(&now).enumerate() {
            // From round 1 on, what is held back is what the dirty log shows being written
            // round after round; the profile's guess only shapes round 0.
            self.hot_writes[f] = was && is;
            if was && is {
                // Ranks beyond every planned one put it at the end of any round, keeping the
                // plan's order among such pages.
                if self.rank[f] < base {
                    self.rank[f] += base;
                }
            }
        }
    }

    /// Splits `frames` into what to send now and the hot written frames to hold back.
    fn hold_back_hot_writes(&self, frames: Vec<u64>) -> (Vec<u64>, Vec<u64>) {
        frames
            .into_iter()
            .partition(|&f| !self.hot_writes[f as usize])
    }
}

struct Run<'a> {
    partition: &'a Arc<Partition>,
    options: &'a MigrationOptions,
    progress: &'a Mutex<MigrationProgress>,
    report: MigrationReport,
    sent_once: Vec<bool>,
    /// The xxh3 of each page as last sent.
    sent_hash: Vec<u64>,
    counts: SendCounts,
    started: Instant,
}

impl Run<'_> {
    fn set_progress(&self, update: impl FnOnce(&mut MigrationProgress)) {
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        update(&mut progress);
    }

    /// Drops from `frames` the pages whose content is what was last sent. KVM marks a page
    /// dirty whenever it maps it writable, even for a read; such pages need not travel again.
    fn changed_only(&mut self, frames: Vec<u64>) -> Vec<u64> {
        let memory = Arc::clone(self.partition.memory());
        let before = frames.len();
        let mut page = [0u8; PAGE_SIZE as usize];
        let kept: Vec<u64> = frames
            .into_iter()
            .filter(|&f| {
                !self.sent_once[f as usize]
                    || memory
                        .copy_frame(f, &mut page)
                        .map(|()| xxh3_64(&page) != self.sent_hash[f as usize])
                        .unwrap_or(true)
            })
            .collect();
        self.report.unchanged_skipped += (before - kept.len()) as u64;
        kept
    }

    /// Sends `frames` in batches, keeping the counters and the progress current.
    fn send(
        &mut self,
        sender: &mut PageSender<DataStream>,
        frames: &[u64],
    ) -> Result<(), MigrationError> {
        const BATCH: usize = 1024;
        let memory = Arc::clone(self.partition.memory());
        let mut hashes = Vec::with_capacity(BATCH);
        for (i, batch) in frames.chunks(BATCH).enumerate() {
            hashes.clear();
            let counts = sender.send_pages(&memory, batch, &mut hashes)?;
            self.counts += counts;
            for (&frame, &hash) in batch.iter().zip(&hashes) {
                let seen = &mut self.sent_once[frame as usize];
                if *seen {
                    self.report.pages_resent += 1;
                }
                *seen = true;
                self.sent_hash[frame as usize] = hash;
            }
            let remaining = (frames.len() - (i * BATCH + batch.len())) as u64 * PAGE_SIZE;
            let rate = self.counts.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-6);
            let sent = self.counts.bytes;
            self.set_progress(|p| {
                p.remaining_bytes = remaining;
                p.bytes_sent = sent;
                p.rate_bytes_per_sec = rate;
            });
        }
        Ok(())
    }
}

/// Migrates `partition` to `destination`. Always returns a report; on failure before cutover
/// the partition runs on here as before.
pub fn migrate(
    partition: &Arc<Partition>,
    destination: &mut dyn Destination,
    probes: Option<Arc<Probes>>,
    options: &MigrationOptions,
    progress: &Mutex<MigrationProgress>,
) -> MigrationReport {
    let started = Instant::now();
    let frames = partition.memory().frames();
    let mut run = Run {
        partition,
        options,
        progress,
        report: MigrationReport::new(options.strategy, options.mode),
        sent_once: vec![false; frames as usize],
        sent_hash: vec![0; frames as usize],
        counts: SendCounts::default(),
        started,
    };
    run.report.pages_total = frames;
    partition.set_migrating(true);
    let mut session = None;
    let result = execute(&mut run, destination, probes, &mut session);
    let mut report = run.report;
    report.pages_sent = run.counts.pages;
    report.zero_pages = run.counts.zero_pages;
    report.bytes_sent = run.counts.bytes;
    report.total_time_ms = started.elapsed().as_millis() as u64;
    report.mbps = run.counts.bytes as f64 * 8.0 / started.elapsed().as_secs_f64().max(1e-6) / 1e6;
    let phase = match &result {
        Ok(()) => {
            report.status = "completed".into();
            // The destination runs the partition: only now is the source's copy released.
            partition.stop();
            Phase::Completed
        }
        Err(MigrationError::AfterCutover(_)) => {
            // The guest runs on the destination from pages it may still lack; keep ours
            // paused, intact, for whoever recovers the migration (it reads as `paused`).
            partition.set_migrating(false);
            Phase::Failed
        }
        Err(_) => {
            if let Some(session) = session {
                destination.abort(session);
            }
            let _ = partition.dirty_log_stop();
            partition.set_migrating(false);
            if let Err(e) = partition.resume() {
                warn!("resuming the partition after a failed migration: {e}");
            }
            Phase::Failed
        }
    };
    if let Err(e) = &result {
        warn!("migration failed: {}", error_chain(e));
        report.error = Some(error_chain(e));
    }
    run.progress.lock().unwrap_or_else(|p| p.into_inner()).phase = phase;
    report
}

fn execute(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    probes: Option<Arc<Probes>>,
    session_out: &mut Option<u64>,
) -> Result<(), MigrationError> {
    let partition = run.partition;
    let options = run.options;
    let frames = partition.memory().frames();
    let reply = destination
        .prepare(PrepareRequest {
            protocol_min: PROTOCOL_VERSION,
            protocol_max: PROTOCOL_VERSION,
            config: partition.config().clone(),
            mode: options.mode,
        })
        .map_err(MigrationError::Prepare)?;
    *session_out = Some(reply.session);
    let stream = destination.connect_data(reply.data_port)?;
    let demand_stream = stream
        .try_clone()
        .map_err(|e| MigrationError::Connect(LinkError::Socket(e)))?;
    let mut sender = PageSender::new(stream, options.bandwidth_limit);
    partition.dirty_log_start()?;

    let order = match options.strategy {
        Strategy::Address => Order::address(frames),
        Strategy::Heat => {
            run.set_progress(|p| p.phase = Phase::Profiling);
            let probes = probes.ok_or_else(|| {
                MigrationError::Profile(
                    "the heat strategy needs the eBPF probes, which could not be loaded".into(),
                )
            })?;
            let mut profiler = start_profiler(partition, probes, options)?;
            profiler
                .run_for(options.profile_window)
                .map_err(|e| MigrationError::Profile(error_chain(&e)))?;
            // The profiler stops here. Its read re-arming drops host mappings, and KVM maps a
            // page writable (and so marks it dirty) when the guest faults it back in: left
            // running, it would dirty a quarter of memory per epoch (measured: 70x the pages
            // re-sent on rw-mix). The dirty log carries the write heat from now on.
            Order::from_heat(&profiler.heat().pages(), frames)?
        }
    };
    run.report.setup_time_ms = run.started.elapsed().as_millis() as u64;

    // Round 0: every page in plan order. Writes from now on are caught by the dirty log.
    run.set_progress(|p| {
        p.phase = Phase::Precopy;
        p.round = 0;
    });
    partition.dirty_log_fetch()?;
    let defer = options.defer_hot_writes
        && options.strategy == Strategy::Heat
        && options.mode == Mode::Precopy;
    let (round0, mut deferred) = if defer {
        order.hold_back_hot_writes(order.plan.clone())
    } else {
        (order.plan.clone(), Vec::new())
    };
    let round_start = Instant::now();
    let bytes_before = run.counts.bytes;
    run.send(&mut sender, &round0)?;
    let mut rate =
        (run.counts.bytes - bytes_before) as f64 / round_start.elapsed().as_secs_f64().max(1e-6);
    run.report.round0_mbps = rate * 8.0 / 1e6;
    run.report.rounds = 1;
    let mut previous_dirty = u64::MAX;
    let mut not_shrinking = 0;
    let mut order = order;
    let dirty = loop {
        let dirty: Vec<u64> = dirty_frames(
            &partition
                .dirty_log_fetch()?
                .ok_or(MigrationError::DirtyLogOff)?,
        )
        .collect();
        run.report.dirty_pages_per_round.push(dirty.len() as u64);
        // Keep the heat current from what the kernel's dirty log says: pages dirtied round
        // after round are the hottest writes, and go last (or are held back).
        if options.strategy == Strategy::Heat {
            order.learn_from_round(&dirty);
        }
        // What is left to send: the dirty pages that really changed, and those held back.
        let mut dirty = run.changed_only(dirty);
        dirty.append(&mut deferred);
        dirty.sort_unstable();
        dirty.dedup();
        let count = dirty.len() as u64;
        let expected = Duration::from_secs_f64(count as f64 * PAGE_SIZE as f64 / rate.max(1.0));
        run.report.expected_downtime_ms = expected.as_millis() as u64;
        let per_round = run.report.dirty_pages_per_round.clone();
        run.set_progress(|p| {
            p.expected_downtime_ms = expected.as_millis() as u64;
            p.remaining_bytes = count * PAGE_SIZE;
            p.dirty_pages_per_round = per_round;
        });
        not_shrinking = if count >= previous_dirty {
            not_shrinking + 1
        } else {
            0
        };
        previous_dirty = count;
        let converged = expected <= options.downtime_limit;
        if converged || run.report.rounds >= options.max_rounds || not_shrinking >= 2 {
            info!(
                "cutover after {} rounds: {count} dirty pages, expected downtime {expected:?}",
                run.report.rounds
            );
            break dirty;
        }
        order.sort(&mut dirty);
        let dirty = if defer {
            let (now, later) = order.hold_back_hot_writes(dirty);
            deferred = later;
            now
        } else {
            dirty
        };
        let round = run.report.rounds;
        run.set_progress(|p| p.round = round);
        let round_start = Instant::now();
        let bytes_before = run.counts.bytes;
        run.send(&mut sender, &dirty)?;
        let elapsed = round_start.elapsed().as_secs_f64();
        if elapsed > 0.001 {
            rate = (run.counts.bytes - bytes_before) as f64 / elapsed;
        }
        run.report.rounds += 1;
    };

    match options.mode {
        Mode::Precopy => {
            cutover_precopy(run, destination, reply.session, &mut sender, &order, dirty)
        }
        Mode::Hybrid => cutover_hybrid(
            run,
            destination,
            reply.session,
            sender,
            demand_stream,
            &order,
            dirty,
        ),
    }
}

fn start_profiler(
    partition: &Arc<Partition>,
    probes: Arc<Probes>,
    options: &MigrationOptions,
) -> Result<Profiler, MigrationError> {
    let interval =
        (options.profile_window / 5).clamp(Duration::from_millis(20), Duration::from_millis(200));
    let profiler = profile_partition(
        probes,
        partition,
        ProfilerConfig {
            interval,
            ..ProfilerConfig::default()
        },
    )
    .map_err(|e| MigrationError::Profile(error_chain(&e)))?;
    Ok(profiler)
}

/// Starts the cutover: pauses the partition and returns when it paused, with the pages that
/// still have to travel: those dirty at the last check (not sent since) and those dirtied
/// after it, without duplicates, minus those whose content is what was last sent.
fn pause_for_cutover(
    run: &mut Run<'_>,
    mut last_dirty: Vec<u64>,
) -> Result<(Instant, Vec<u64>), MigrationError> {
    let partition = run.partition;
    run.set_progress(|p| p.phase = Phase::StopAndCopy);
    let paused = Instant::now();
    partition.pause()?;
    let bitmap = partition
        .dirty_log_fetch()?
        .ok_or(MigrationError::DirtyLogOff)?;
    last_dirty.extend(dirty_frames(&bitmap));
    last_dirty.sort_unstable();
    last_dirty.dedup();
    Ok((paused, run.changed_only(last_dirty)))
}

/// Pause, send the pages dirtied since the last round and the vCPU state, resume there.
fn cutover_precopy(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    sender: &mut PageSender<DataStream>,
    order: &Order,
    last_dirty: Vec<u64>,
) -> Result<(), MigrationError> {
    let partition = run.partition;
    let (paused, mut dirty) = pause_for_cutover(run, last_dirty)?;
    order.sort(&mut dirty);
    run.send(sender, &dirty)?;
    sender.send_done()?;
    let reply = commit(run, destination, session, paused, Vec::new())?;
    // Still paused here, so this is the memory at the moment of the pause; hashing it after
    // the cutover keeps it out of the downtime.
    run.report.source_digest = Some(partition.digest().total_hex());
    run.report.dest_digest = reply.dest_digest;
    Ok(())
}

/// Sends the paused partition's state (and, in hybrid mode, the pages whose copy is stale);
/// returns once the destination runs it, with the downtime since `paused` and the new id
/// recorded.
fn commit(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    paused: Instant,
    stale_pages: Vec<u64>,
) -> Result<CommitReply, MigrationError> {
    let snapshot = state::encode(&run.partition.snapshot()?);
    let reply = destination
        .commit(
            session,
            CommitRequest {
                snapshot,
                stale_pages,
            },
        )
        .map_err(MigrationError::Commit)?;
    run.report.downtime_ms = paused.elapsed().as_millis() as u64;
    run.report.id_on_destination = Some(reply.id_on_destination.clone());
    Ok(reply)
}

/// Pause, send the vCPU state and the list of stale pages, resume there at once; then push
/// what the destination lacks, hottest first, serving its demands ahead of the push.
fn cutover_hybrid(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    mut sender: PageSender<DataStream>,
    demand_stream: DataStream,
    order: &Order,
    last_dirty: Vec<u64>,
) -> Result<(), MigrationError> {
    let partition = run.partition;
    let (paused, stale) = pause_for_cutover(run, last_dirty)?;
    sender.send_done()?;
    commit(run, destination, session, paused, stale.clone())?;

    // Post-copy: push what the destination lacks, hottest first; demands jump the queue. A
    // small send buffer keeps a demanded page from queueing behind megabytes of pushed ones.
    run.set_progress(|p| p.phase = Phase::Postcopy);
    if let Err(e) = link::set_send_buffer(sender.stream(), link::POSTCOPY_SEND_BUFFER) {
        warn!("{}", error_chain(&e));
    }
    let frames = partition.memory().frames();
    let mut needed = vec![false; frames as usize];
    for &f in &stale {
        needed[f as usize] = true;
    }
    for (f, sent) in run.sent_once.iter().enumerate() {
        if !sent {
            needed[f] = true;
        }
    }
    let mut queue: VecDeque<u64> = order
        .hottest_first
        .iter()
        .copied()
        .filter(|&f| needed[f as usize])
        .collect();
    let (demand_tx, demand_rx) = mpsc::channel::<Vec<u64>>();
    let reader = std::thread::spawn(move || {
        let mut reader = FrameReader::new(demand_stream, frames);
        while let Ok(Some(frame)) = reader.next_frame() {
            if let Frame::Demand(pages) = frame
                && demand_tx.send(pages).is_err()
            {
                break;
            }
        }
    });
    const PUSH_BATCH: usize = 64;
    let result = (|| -> Result<(), MigrationError> {
        let mut remaining = queue.len();
        while remaining > 0 {
            let mut batch = Vec::with_capacity(PUSH_BATCH);
            while let Ok(pages) = demand_rx.try_recv() {
                batch.extend(pages.into_iter().filter(|&f| needed[f as usize]));
            }
            while batch.len() < PUSH_BATCH {
                match queue.pop_front() {
                    Some(f) if needed[f as usize] => batch.push(f),
                    Some(_) => {}
                    None => break,
                }
            }
            batch.sort_unstable();
            batch.dedup();
            for &f in &batch {
                if needed[f as usize] {
                    needed[f as usize] = false;
                    remaining -= 1;
                }
            }
            if !batch.is_empty() {
                run.send(&mut sender, &batch)?;
            }
        }
        sender.send_done()?;
        Ok(())
    })();
    if let Err(e) = result {
        return Err(MigrationError::AfterCutover(error_chain(&e)));
    }
    let finish = destination.finish(session);
    // The reader holds a clone of the socket: shut it down so the reader sees the end.
    let _ = sender.stream().shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    let finish = finish.map_err(MigrationError::AfterCutover)?;
    // The source stayed paused throughout: its memory is that of the pause. Hashing it last
    // keeps it off both the downtime and the post-copy push.
    run.report.source_digest = Some(partition.digest().total_hex());
    run.report.dest_digest = Some(finish.dest_digest);
    run.report.postcopy_requests = finish.postcopy_requests;
    run.report.postcopy_fault_latency_us = finish.fault_latency_us;
    run.report.post_cutover_faults = finish.post_cutover_faults;
    Ok(())
}
