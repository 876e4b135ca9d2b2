//! The rounds of pre-copy: the plan of round 0, every round's dirty pages, and sending them
//! with the counters and the progress kept current.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use heatprobe::{Probes, Profiler, profiler::ProfilerConfig};
use tracing::info;
use xxhash_rust::xxh3::xxh3_64;

use super::{
    MigrationError, MigrationOptions, PlanHeat, SourceEvent, SourcePhase,
    guest_ops::{self, Ledger, OpsMark, Part},
    stripes::Stripes,
};
use crate::{
    migration::{
        convergence::{self, Check, Converge, Convergence, CutoverReason, Decision, Policy},
        job::{Job, StepError},
        order::Order,
        plan_choice,
        report::{MigrationProgress, MigrationReport, Mode, PlanHeatOrigin, Strategy},
        transport::SendCounts,
    },
    vmm::{
        Partition,
        dirty::dirty_frames,
        memory::PAGE_SIZE,
        sampler::{Sampling, budget_for, profile_partition},
    },
};

pub(super) struct Run<'a> {
    pub(super) partition: &'a Arc<Partition>,
    pub(super) options: &'a MigrationOptions,
    /// The job this migration is: its progress, and an operator's steering.
    pub(super) job: &'a Job,
    pub(super) report: MigrationReport,
    /// The downtime limit in force: the options', or what an operator set since.
    pub(super) downtime_limit: Duration,
    /// The bandwidth limit in force, likewise.
    pub(super) bandwidth_limit: Option<u64>,
    pub(super) sent_once: Vec<bool>,
    /// The xxh3 of each page as last sent.
    pub(super) sent_hash: Vec<u64>,
    pub(super) counts: SendCounts,
    pub(super) started: Instant,
    /// How long the destination took to answer `prepare`: the round trip and the setting up
    /// of a session, the part of the downtime known before the cutover.
    pub(super) prepare_rtt: Duration,
    /// The rate the rounds last measured the link at, in uncompressed bytes per second: pages
    /// move at this rate, whatever compression makes of them on the wire.
    pub(super) link_rate: Option<f64>,
    /// The same rounds' rate in bytes on the wire, for pacing.
    pub(super) wire_rate: Option<f64>,
    /// What the destination says freeing one stale page costs it.
    pub(super) remove_per_page: Duration,
    /// The heat the plan was made from (heat strategy), handed on once the move completes.
    pub(super) plan_heat: Option<PlanHeat>,
    /// The guest's work lost here, part by part.
    pub(super) ledger: Ledger,
}

/// Pages sent per call to the sender, between which the counters, the progress and the
/// timeout are looked at. Also the least a round must send for its rate to count, and the
/// least set a refresh round is worth.
const BATCH: usize = 1024;

/// What sending one round did.
pub(super) struct RoundSent {
    /// The rate it streamed at (uncompressed bytes per second), if it sent enough to measure.
    pub(super) rate: Option<f64>,
    /// The same in bytes on the wire.
    pub(super) wire_rate: Option<f64>,
    /// The pages it did not send because the timeout came first, in order.
    pub(super) unsent: Vec<u64>,
    /// Uncompressed bytes it sent.
    pub(super) bytes: u64,
}

impl Run<'_> {
    pub(super) fn set_progress(&self, update: impl FnOnce(&mut MigrationProgress)) {
        update(&mut self.job.progress_mut());
    }

    /// Moves the migration on by `event`, through its phase machine; what users see follows.
    pub(super) fn advance(&mut self, event: SourceEvent) -> Result<(), MigrationError> {
        let next = self
            .job
            .step(event, self.options.mode)
            .map_err(|e| match e {
                StepError::Cancelled => MigrationError::Cancelled,
                StepError::Phase(e) => MigrationError::Phase(e),
            })?;
        self.set_progress(|p| p.phase = next.shown());
        // What the guest loses counts to the part the migration is in.
        match next {
            SourcePhase::Profiling { .. } => self.ledger.enter(self.partition, Part::Profile),
            SourcePhase::Precopy { .. } => self.ledger.enter(self.partition, Part::Rounds),
            SourcePhase::StopAndCopy { .. } => self.ledger.close(self.partition),
            _ => {}
        }
        Ok(())
    }

    /// Takes up what an operator asked since the last look: a cancel (refused by the phase
    /// once past the point of no return, and then left for nobody: the report says what
    /// happened), and new limits.
    pub(super) fn steer(&mut self, sender: Option<&mut Stripes>) -> Result<(), MigrationError> {
        if self.job.cancel_requested() {
            return Err(MigrationError::Cancelled);
        }
        if let Some(limits) = self.job.take_limits() {
            if let Some(downtime) = limits.downtime_limit {
                info!("downtime limit now {downtime:?}");
                self.downtime_limit = downtime;
            }
            if let Some(bandwidth) = limits.bandwidth_limit {
                let limit = (bandwidth > 0).then_some(bandwidth);
                info!("bandwidth limit now {limit:?} bytes/s");
                self.bandwidth_limit = limit;
                if let Some(sender) = sender {
                    sender.set_rate(limit);
                }
            }
        }
        Ok(())
    }

    /// Adds to `known` (sorted, without duplicates) the pages of dirty `bitmap` not in it
    /// whose content changed since they were last sent, keeping it sorted; returns those
    /// added. Only they are hashed: `known` was checked already.
    pub(super) fn add_changed(&mut self, known: &mut Vec<u64>, bitmap: &[u64]) -> Vec<u64> {
        let fresh: Vec<u64> = dirty_frames(bitmap)
            .filter(|f| known.binary_search(f).is_err())
            .collect();
        let fresh = self.changed_only(fresh);
        known.extend_from_slice(&fresh);
        known.sort_unstable();
        fresh
    }

    /// `wire` bytes on the wire as uncompressed bytes, at the last measured rounds' ratio:
    /// what is queued on the socket drains at the wire rate, and the rates the convergence
    /// compares are uncompressed.
    pub(super) fn as_uncompressed(&self, wire: u64) -> u64 {
        match (self.link_rate, self.wire_rate) {
            (Some(rate), Some(wire_rate)) if wire_rate > 0.0 => {
                (wire as f64 * rate / wire_rate) as u64
            }
            _ => wire,
        }
    }

    /// Drops from `frames` the pages whose content is what was last sent. KVM marks a page
    /// dirty whenever it maps it writable, even for a read; such pages need not travel again.
    pub(super) fn changed_only(&mut self, frames: Vec<u64>) -> Vec<u64> {
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

    /// Sends one round (`first`: round 0), stopping early at `deadline`.
    pub(super) fn send_round(
        &mut self,
        sender: &mut Stripes,
        frames: &[u64],
        first: bool,
        deadline: Option<Instant>,
    ) -> Result<RoundSent, MigrationError> {
        let round_start = Instant::now();
        let before = self.counts;
        let sent = self.send_until(sender, frames, deadline)?;
        let elapsed = round_start.elapsed().as_secs_f64();
        let bytes = self.counts.uncompressed_bytes - before.uncompressed_bytes;
        let wire = self.counts.bytes - before.bytes;
        // A round of a few pages measures the latency of its first write, not the link:
        // one of 20 pages once measured a rate at which nothing fit the limit, and a
        // partition with nothing left to send was throttled to 99% and cancelled. Round
        // 0 (every page) always counts.
        let measured = (bytes >= BATCH as u64 * PAGE_SIZE || first) && elapsed > 0.001;
        Ok(RoundSent {
            rate: measured.then(|| bytes as f64 / elapsed),
            wire_rate: measured.then(|| wire as f64 / elapsed),
            unsent: frames[sent..].to_vec(),
            bytes,
        })
    }

    /// Sends `frames` in batches, keeping the counters and the progress current.
    pub(super) fn send(
        &mut self,
        sender: &mut Stripes,
        frames: &[u64],
    ) -> Result<(), MigrationError> {
        self.send_until(sender, frames, None).map(drop)
    }

    /// Sends `frames` in batches until they are all sent or `deadline` passes; returns how
    /// many were sent.
    fn send_until(
        &mut self,
        sender: &mut Stripes,
        frames: &[u64],
        deadline: Option<Instant>,
    ) -> Result<usize, MigrationError> {
        let memory = Arc::clone(self.partition.memory());
        // A batch per connection, so each sends frames as full as with one.
        let per_call = BATCH * sender.len().max(1);
        let mut hashes = Vec::with_capacity(per_call);
        for (i, batch) in frames.chunks(per_call).enumerate() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(i * per_call);
            }
            self.steer(Some(sender))?;
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
            let remaining = (frames.len() - (i * per_call + batch.len())) as u64 * PAGE_SIZE;
            let rate = self.counts.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-6);
            let sent = self.counts.bytes;
            self.set_progress(|p| {
                p.remaining_bytes = remaining;
                p.bytes_sent = sent;
                p.rate_bytes_per_sec = rate;
            });
        }
        Ok(frames.len())
    }
}

/// The order of round 0: address order, or the heat profile's plan.
pub(super) fn plan(
    run: &mut Run<'_>,
    probes: Option<Arc<Probes>>,
    carried: Option<PlanHeat>,
) -> Result<Order, MigrationError> {
    let frames = run.partition.memory().frames();
    match run.options.strategy {
        Strategy::Address => Ok(Order::address(frames)),
        // Heat a previous migration carried here, fresh, or a heat file: no profile needed.
        Strategy::Heat if let Some(carried) = carried => {
            run.report.plan_heat = Some(carried.origin);
            // Warm heat is whatever the background profile saw, however little: it is used
            // only if it ranks something, as a profile's is. Carried heat and heat files rank
            // what their source decided.
            if carried.origin == PlanHeatOrigin::Warm {
                run.report.profile_spent = carried.spent;
                if let Some(why) = plan_choice::unusable(&carried.pages, frames) {
                    tracing::info!("address order: the warm heat {why}");
                    run.report.order_fallback = Some(why);
                    return Ok(Order::address(frames));
                }
            }
            let order = Order::from_heat(&carried.pages, frames).map_err(MigrationError::Plan)?;
            run.plan_heat = Some(carried);
            Ok(order)
        }
        Strategy::Heat => {
            run.advance(SourceEvent::Profile)?;
            let probes = probes.ok_or(MigrationError::NoProbes)?;
            let mut profiler = start_profiler(run.partition, probes, run.options)?;
            // The faults are one meter of what the profile costs; the guest's own pace, where
            // it keeps a count, is the other: the probes and each re-arming's TLB shootdown
            // cost it time no fault count shows (measured: a paced guest lost 22% of a 2 s
            // hybrid profile whose faults came to 0.9%). The profile ends once either says
            // the budget is spent.
            let window = run.options.profile_window;
            let allowance_ms = run
                .options
                .heat_budget
                .map(|share| share * window.as_secs_f64() * 1e3);
            let (partition, rate, from) = (
                run.partition,
                run.ledger.rate(),
                OpsMark::now(run.partition),
            );
            profiler
                .run_for_while(window, || match (allowance_ms, rate) {
                    (Some(allowance), Some(rate)) => guest_ops::lost_since(partition, from, rate)
                        .is_none_or(|lost| lost < allowance),
                    _ => true,
                })
                .map_err(MigrationError::Profile)?;
            // The profiler stops here. In hybrid mode its read re-arming drops host mappings,
            // and KVM maps a page writable (and so marks it dirty) when the guest faults it back
            // in: left running, it would dirty a quarter of memory per epoch (measured: 70x the
            // pages re-sent on rw-mix). The dirty log carries the write heat from now on. What
            // the profile's earlier epochs left unmapped still comes back dirty; its last epoch
            // re-armed nothing (`Profiler::run_for`).
            let pages = profiler.heat().pages();
            run.report.profile_spent = profiler.spent();
            run.report.plan_heat = Some(PlanHeatOrigin::Profiled);
            if let Some(why) = plan_choice::unusable(&pages, frames) {
                tracing::info!("address order after all: {why}");
                run.report.order_fallback = Some(why);
                return Ok(Order::address(frames));
            }
            let order = Order::from_heat(&pages, frames).map_err(MigrationError::Plan)?;
            run.plan_heat = Some(PlanHeat {
                pages: pages.into(),
                measured: Instant::now(),
                origin: PlanHeatOrigin::Profiled,
                spent: run.report.profile_spent,
            });
            Ok(order)
        }
    }
}

/// Round 0 (every page, in plan order) and the rounds of dirty pages after it, until the
/// convergence decision cuts over (or gives up). Returns the pages still to send at the
/// cutover.
pub(super) fn iterate(
    run: &mut Run<'_>,
    sender: &mut Stripes,
    order: &mut Order,
) -> Result<Vec<u64>, MigrationError> {
    let partition = run.partition;
    let options = run.options;
    // Writes from now on are caught by the dirty log.
    run.steer(Some(sender))?;
    run.advance(SourceEvent::Round0)?;
    run.set_progress(|p| p.round = 0);
    partition.dirty_log_fetch()?;
    // Hybrid too: its rounds go on while they shrink the set, and hot writes sent in each
    // would come back dirty in each; held back, they go in the refresh before a converged
    // cutover, or with the stale set post-copy pushes hottest first.
    let defer = options.defer_hot_writes && options.strategy == Strategy::Heat;
    let (round0, mut deferred) = if defer {
        // Round 0 has no measured rate to size the room by; what it holds back comes back
        // in the first check, and is held back within the room from then on.
        order.hold_back_hot_writes(order.plan.clone(), usize::MAX)
    } else {
        (order.plan.clone(), Vec::new())
    };
    let deadline = options.timeout.map(|t| run.started + t);
    let first = run.send_round(sender, &round0, true, deadline)?;
    let mut rate = decision_rate(first.rate, first.bytes);
    run.link_rate = first.rate;
    run.wire_rate = first.wire_rate;
    // Held-back pages count as sent (and come back dirty in the next check): the ratio of
    // the two is then the same whether a strategy holds its hot pages back or sends them.
    let mut sent = (round0.len() - first.unsent.len() + deferred.len()) as u64;
    // Pages a timeout kept from being sent: never in a dirty log, so carried by hand.
    let mut unsent = first.unsent;
    // Not measured (round 0 took under a millisecond): the report says so.
    run.report.round0_mbps = first.rate.map(|r| r * 8.0 / 1e6);
    run.report.round0_wire_mbps = first.wire_rate.map(|r| r * 8.0 / 1e6);
    run.report.rounds = 1;
    let mut refreshed = false;
    let mut convergence = Convergence::new(Policy {
        downtime_limit: run.downtime_limit,
        max_rounds: options.max_rounds,
        converge: options.converge(),
        timeout: options.timeout,
        timeout_strategy: options.timeout_strategy,
        // The cutover's two calls, the commit and the handover; in pre-copy, the digests too:
        // both sides hash all of memory inside the pause, at once, before the handover
        // (about 60 ms for 512 MiB here, which left address order 35-40 ms over a 300 ms
        // limit while its estimate met it).
        fixed_cost: 2 * run.prepare_rtt
            + match options.mode {
                Mode::Precopy => partition.memory().digest_time(),
                Mode::Hybrid => Duration::ZERO,
            },
    });
    loop {
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
        // What is left to send: the dirty pages that really changed, those held back, and
        // those a timeout left unsent.
        let mut dirty = run.changed_only(dirty);
        dirty.append(&mut deferred);
        dirty.append(&mut unsent);
        dirty.sort_unstable();
        dirty.dedup();
        let count = dirty.len() as u64;
        run.steer(Some(sender))?;
        convergence.set_downtime_limit(run.downtime_limit);
        // What the last round wrote may still sit in socket buffers and the link's queue
        // (megabytes: tens of milliseconds at 1 Gbit/s). The cutover lets it drain before the
        // pause, but the pages dirtied meanwhile take its place in the last set: as many, at
        // most, while the guest dirties no faster than the link carries, as it does once
        // the rounds converge.
        let queued = run.as_uncompressed(sender.unsent_bytes().unwrap_or(0));
        let expected = convergence.expected_downtime(count, queued, rate);
        run.report.expected_downtime_ms = expected.as_millis() as u64;
        let per_round = run.report.dirty_pages_per_round.clone();
        run.set_progress(|p| {
            p.expected_downtime_ms = expected.as_millis() as u64;
            p.remaining_bytes = count * PAGE_SIZE;
            p.dirty_pages_per_round = per_round;
        });
        let check = Check {
            pages: count,
            queued,
            sent,
            rate,
            rounds: run.report.rounds,
            elapsed: run.started.elapsed(),
        };
        // Whether the round about to go is heat's refresh, which holds nothing back.
        let mut refreshing = false;
        let decision = if options.mode == Mode::Hybrid && run.job.postcopy_requested() {
            Decision::CutOver(CutoverReason::Requested)
        } else {
            convergence.decide(check)
        };
        match decision {
            // Heat knows which of the pages left are hot writes. Everything left moves now, in
            // one more round while the guest runs, the hot ones last, so that only what is
            // dirtied again during it waits for the pause: the method's "refresh, then move".
            // The check after it still guards the limit. (Sending only the cold ones left the
            // held-back hot pages to the pause: measured on kv-zipf in place, heat's downtime
            // was then 1.17x address's.)
            Decision::CutOver(CutoverReason::Converged)
                if defer && !refreshed && worth_refreshing(order, &dirty) =>
            {
                refreshed = true;
                refreshing = true;
                info!(
                    "round {}: converged with {count} pages left; refreshing them before the \
                     pause",
                    run.report.rounds
                );
            }
            Decision::CutOver(reason) => {
                info!(
                    "cutover after {} rounds ({reason:?}): {count} pages left, expected downtime \
                     {expected:?}, throttle {}%",
                    run.report.rounds,
                    convergence.throttle()
                );
                run.report.cutover_reason = Some(reason);
                return Ok(dirty);
            }
            Decision::Cancel(reason) => {
                return Err(MigrationError::NotConverged {
                    reason,
                    pages: count,
                    expected_ms: expected.as_millis() as u64,
                    limit_ms: run.downtime_limit.as_millis() as u64,
                    throttle_pct: convergence.throttle(),
                });
            }
            Decision::Throttle(pct) => {
                info!(
                    "round {}: {count} pages left of {sent} sent; throttling the guest to {pct}%",
                    run.report.rounds
                );
                partition.set_throttle(pct)?;
                if run.ledger.part() != Some(Part::Throttle) {
                    run.ledger.enter(partition, Part::Throttle);
                }
                run.report.throttle_pct_max = run.report.throttle_pct_max.max(pct);
                run.set_progress(|p| p.throttle_pct = pct);
            }
            Decision::Iterate => {}
        }
        order.sort(&mut dirty);
        let dirty = if defer && !refreshing {
            let room = match options.converge() {
                Converge::Throttle => usize::MAX,
                _ => pause_room(run.downtime_limit, 2 * run.prepare_rtt, rate),
            };
            let (now, later) = order.hold_back_hot_writes(dirty, room);
            deferred = later;
            now
        } else {
            dirty
        };
        let round = run.report.rounds;
        run.set_progress(|p| p.round = round);
        let round_sent = run.send_round(sender, &dirty, false, deadline)?;
        if let Some(measured) = round_sent.rate {
            rate = measured;
            run.link_rate = Some(measured);
            run.wire_rate = round_sent.wire_rate;
        }
        sent = (dirty.len() - round_sent.unsent.len() + deferred.len()) as u64;
        unsent = round_sent.unsent;
        run.report.rounds += 1;
    }
}

/// The share of what the downtime limit carries that held-back hot writes may take, leaving
/// the rest for the pages the last round dirties.
const HELD_BACK_SHARE: f64 = 0.5;

/// How many held-back hot writes the pause has room for: [`HELD_BACK_SHARE`] of the pages the
/// downtime limit, less the cutover's fixed cost, carries at `rate` bytes a second. Without a
/// throttle to make room (hybrid, `--converge none`), a held-back set larger than the pause
/// can carry never converges: on kv-zipf flat out in hybrid, heat's rounds went on for 15
/// checks and re-sent 1.8x the pages of the same order sending its hot writes every round.
/// Pre-copy's throttle slows the guest until its set fits, so it holds back every hot write.
fn pause_room(limit: Duration, fixed: Duration, rate: f64) -> usize {
    (convergence::pages_within(limit, fixed, rate) * HELD_BACK_SHARE) as usize
}

/// The link rate the convergence decision works with after round 0: the measured one, or,
/// where round 0 was too quick to measure (under a millisecond), at least its bytes (and a
/// page) a millisecond. (It was 1 B/s once: a partition of a few pages was then expected
/// to take hours to move, and was throttled and cancelled.)
fn decision_rate(measured: Option<f64>, round0_bytes: u64) -> f64 {
    measured.unwrap_or(round0_bytes.max(PAGE_SIZE) as f64 / 0.001)
}

/// Whether a refresh round before the pause pays: what is left is at least one batch (a
/// smaller set takes a few milliseconds to send; refreshing scan's 67 pages only re-sent
/// them), and at least a tenth of it is not held back as a hot write (a set of hot writes
/// only, such as rw-mix's, would come back whole).
fn worth_refreshing(order: &Order, left: &[u64]) -> bool {
    let cold = left.iter().filter(|&&f| !order.is_hot_write(f)).count();
    left.len() >= BATCH && cold * 10 >= left.len()
}

fn start_profiler(
    partition: &Arc<Partition>,
    probes: Arc<Probes>,
    options: &MigrationOptions,
) -> Result<Profiler, MigrationError> {
    // A budgeted profile stops once it has spent its share of the window (`run_for`), so its
    // epochs are short enough for the stop to come near the mark: a flat-out guest under
    // the dirty log spends a 2 s window's 1% within some tens of milliseconds.
    let interval = match options.heat_budget {
        Some(_) => Duration::from_millis(20),
        None => (options.profile_window / 5)
            .clamp(Duration::from_millis(20), Duration::from_millis(200)),
    };
    let profiler = profile_partition(
        probes,
        partition,
        ProfilerConfig {
            interval,
            budget: options
                .heat_budget
                .map(|share| budget_for(partition, share))
                .transpose()
                .map_err(MigrationError::Budget)?,
            ..ProfilerConfig::default()
        },
        match options.mode {
            Mode::Precopy => Sampling::WritesOnly,
            // Post-copy pushes the pages the guest reads most first.
            Mode::Hybrid => Sampling::ReadsAndWrites,
        },
    )
    .map_err(MigrationError::Profile)?;
    Ok(profiler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_has_room_for_half_of_what_the_limit_carries() {
        // 100 ms at 1 Gbit/s carries 3,051 pages: half of them, less the fixed cost's share.
        let gbit = 125_000_000.0;
        assert_eq!(
            pause_room(Duration::from_millis(100), Duration::ZERO, gbit),
            1525
        );
        assert_eq!(
            pause_room(Duration::from_millis(100), Duration::from_millis(20), gbit),
            1220
        );
        // A fixed cost past the limit leaves no room.
        assert_eq!(
            pause_room(Duration::from_millis(100), Duration::from_millis(200), gbit),
            0
        );
    }

    #[test]
    fn an_unmeasured_round_0_is_taken_as_fast_as_it_must_have_been() {
        assert_eq!(decision_rate(Some(5e6), 4096), 5e6);
        // 64 KiB in under a millisecond: at least 64 MiB/s.
        assert_eq!(decision_rate(None, 65_536), 65_536_000.0);
        // Nothing sent: at least a page a millisecond, never 1 B/s.
        assert_eq!(decision_rate(None, 0), PAGE_SIZE as f64 * 1000.0);
    }
}
