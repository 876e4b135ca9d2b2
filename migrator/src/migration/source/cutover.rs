//! The cutover: pause, the last pages, the state, the handover; in hybrid mode, then the
//! post-copy push (`postcopy`).

use std::time::{Duration, Instant};

use super::{
    MigrationError, SourceEvent,
    discard::discard_live,
    postcopy::{PostcopyLink, postcopy, tune_for_postcopy},
    rounds::Run,
    stripes::Stripes,
};
use crate::{
    migration::{
        control::{CommitReply, CommitRequest, CommitTimings, Destination, DestinationError},
        link::DataStream,
        order::Order,
        report::Mode,
        transport::PageSender,
    },
    vmm::{layout, memory::PAGE_SIZE, state},
};

/// The downtime's clock: started at the pause, read step by step into the report's
/// breakdown.
struct Stopwatch {
    paused: Instant,
    lap: Instant,
}

impl Stopwatch {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            paused: now,
            lap: now,
        }
    }

    /// Milliseconds since the last lap (or the pause), with the fraction.
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let ms = (now - self.lap).as_secs_f64() * 1e3;
        self.lap = now;
        ms
    }

    /// From the pause to the last lap, so `downtime_ms` ends where the breakdown does.
    fn downtime(&self) -> Duration {
        self.lap - self.paused
    }
}

/// What counts as drained: a few pages.
const DRAINED: u64 = 64 * 1024;

/// Waits, the guest still running, until what the rounds wrote has reached the destination
/// (or `limit` has passed): the pause would wait for it otherwise. Measured with nothing left
/// to send, that wait was most of the downtime (36-45 ms at 1 Gbit/s: the socket buffers and
/// the link's queue).
fn drain(sender: &Stripes, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match sender.unsent_bytes() {
            Ok(queued) if queued > DRAINED => std::thread::sleep(Duration::from_millis(1)),
            _ => return,
        }
    }
}

/// Starts the cutover: lets what is in flight drain, pauses the partition and returns when it
/// paused, with the pages that
/// still have to travel: those left at the last check (not sent since) and those dirtied
/// after it whose content is not what was last sent, without duplicates.
fn pause_for_cutover(
    run: &mut Run<'_>,
    sender: &Stripes,
    mut last_dirty: Vec<u64>,
) -> Result<(Stopwatch, Vec<u64>), MigrationError> {
    let partition = run.partition;
    drain(sender, run.downtime_limit);
    run.advance(SourceEvent::Pause)?;
    let mut clock = Stopwatch::start();
    partition.pause()?;
    let bitmap = partition
        .dirty_log_fetch()?
        .ok_or(MigrationError::DirtyLogOff)?;
    run.report.downtime_breakdown.pause_ms = clock.lap();
    // The last check already dropped its unchanged pages: only those dirtied since are
    // hashed, inside the downtime (hashing 9k pages again took about 10 ms there).
    last_dirty.sort_unstable();
    last_dirty.dedup();
    run.add_changed(&mut last_dirty, &bitmap);
    Ok((clock, last_dirty))
}

/// Pause, send the pages dirtied since the last round and the vCPU state, resume there.
pub(super) fn cutover_precopy(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    sender: &mut Stripes,
    order: &Order,
    last_dirty: Vec<u64>,
) -> Result<(), MigrationError> {
    let partition = run.partition;
    let (mut clock, mut dirty) = pause_for_cutover(run, sender, last_dirty)?;
    order.sort(&mut dirty);
    run.send(sender, &dirty)?;
    sender.send_done()?;
    run.report.downtime_breakdown.last_pages_ms = clock.lap();
    commit(run, destination, session, clock, Vec::new())?;
    // No page is missing after a pre-copy: no vCPU waits on one.
    run.report.postcopy_vcpu_blocktime_ms = vec![0.0; partition.config().vcpus as usize];
    Ok(())
}

/// Sends the paused partition's state (and, in hybrid mode, the pages whose copy is stale);
/// returns once the destination runs it, with the downtime since the pause, its breakdown and
/// the new id recorded. In pre-copy, the digests decide before the handover: the memory here
/// is hashed while the commit is on its way, and a destination whose memory differs never
/// runs the guest.
fn commit(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    mut clock: Stopwatch,
    stale_pages: Vec<u64>,
) -> Result<CommitReply, MigrationError> {
    let snapshot = state::encode(&run.partition.snapshot()?);
    run.report.downtime_breakdown.state_encode_ms = clock.lap();
    let request = CommitRequest {
        snapshot,
        stale_pages,
    };
    // Still paused here, so this is the memory at the moment of the pause. Hashed on another
    // thread while the destination restores, it costs the downtime only what the hashing
    // takes beyond the commit's round trip.
    let partition = run.partition;
    let (reply, source_digest) = std::thread::scope(|scope| {
        let hashing = (run.options.mode == Mode::Precopy)
            .then(|| scope.spawn(|| partition.digest().total_hex()));
        let reply = destination.commit(session, request);
        (reply, hashing.map(|h| h.join()))
    });
    let reply = match reply {
        Ok(reply) => reply,
        // Unanswered, the destination may have restored the partition or not: this copy
        // neither resumes nor goes until a reconcile asks. Refused, nothing was restored
        // that could run: a parked copy runs only on the handover.
        Err(e) => {
            if matches!(e, DestinationError::Unreachable { .. }) {
                run.advance(SourceEvent::Unanswered)?;
            }
            return Err(MigrationError::Commit(e));
        }
    };
    let round_trip = clock.lap();
    if let Some(digest) = source_digest {
        run.report.dest_digest = reply.dest_digest.clone();
        record_digests(run, digest.map_err(|_| MigrationError::DigestPanicked)?)?;
    }
    // The last moment a cancel can undo the migration: the copy there is parked.
    run.steer(None)?;
    // Restored there, parked. This copy is stopped for good (still paused, it is never
    // resumed unless the destination says it runs nothing of it): only now may that one run.
    run.advance(SourceEvent::Committed)?;
    let handover = match destination.handover(session) {
        Ok(handover) => handover,
        Err(e) => {
            if !e.nothing_runs_there() {
                run.advance(SourceEvent::Unanswered)?;
            }
            return Err(MigrationError::Handover(e));
        }
    };
    run.advance(SourceEvent::HandedOver)?;
    let handover_ms = clock.lap();
    run.report.downtime_ms = clock.downtime().as_millis() as u64;
    let (spent, transfer) = split_round_trip(round_trip, reply.timings);
    let breakdown = &mut run.report.downtime_breakdown;
    // Waiting there for pages still in flight is the last pages' time, not the state's.
    breakdown.last_pages_ms += spent.pages_wait_ms;
    breakdown.restore_ms = spent.restore_ms;
    // The handover's round trip: the destination's resume, its word bounded by the trip, and
    // the rest transfer.
    let resume_ms = if handover.resume_ms.is_finite() {
        handover.resume_ms.clamp(0.0, handover_ms)
    } else {
        0.0
    };
    breakdown.resume_ms = resume_ms;
    breakdown.state_transfer_ms = transfer + (handover_ms - resume_ms);
    run.report.id_on_destination = Some(reply.id_on_destination.clone());
    Ok(reply)
}

/// Splits the commit's round trip, as the source measured it, into what the destination says
/// it spent and the rest (the transfer both ways). The destination's figures are its word
/// only: negative or non-finite ones count as zero, and together they are scaled down to fit
/// the round trip, so the breakdown never adds up to more than the downtime.
fn split_round_trip(round_trip_ms: f64, claimed: CommitTimings) -> (CommitTimings, f64) {
    let sane = |ms: f64| if ms.is_finite() && ms > 0.0 { ms } else { 0.0 };
    let round_trip_ms = sane(round_trip_ms);
    let mut spent = CommitTimings {
        pages_wait_ms: sane(claimed.pages_wait_ms),
        restore_ms: sane(claimed.restore_ms),
        resume_ms: sane(claimed.resume_ms),
    };
    let total = spent.pages_wait_ms + spent.restore_ms + spent.resume_ms;
    if total > round_trip_ms {
        let scale = round_trip_ms / total;
        spent.pages_wait_ms *= scale;
        spent.restore_ms *= scale;
        spent.resume_ms *= scale;
    }
    let left = round_trip_ms - (spent.pages_wait_ms + spent.restore_ms + spent.resume_ms);
    (spent, left.max(0.0))
}

/// How many of `stale` pages fit what is left of the downtime budget, `spent` of it gone:
/// the limit less what is spent, less the rest of the cutover as the prepare's round trip
/// foretold it, less a tenth of the limit to spare, less freeing the `to_free` stale copies
/// the destination still holds (those discarded before the pause are gone already).
fn budgeted_pages(run: &Run<'_>, spent: Duration, stale: usize, to_free: usize) -> usize {
    let Some(rate) = run.link_rate.filter(|r| r.is_finite() && *r > 0.0) else {
        return 0;
    };
    budget(
        run.downtime_limit,
        // The commit's round trip and the handover's.
        spent + 2 * run.prepare_rtt,
        (stale, to_free),
        Duration::from_secs_f64(PAGE_SIZE as f64 / rate),
        run.remove_per_page,
    )
}

/// The pages `b` of `stale` to send within `limit`, `committed` of it already spoken for,
/// when sending one takes `send` and freeing each of `to_free` copies takes `remove`: the
/// largest `b` with `committed + limit/10 + to_free × remove + b × send ≤ limit`. A page sent
/// may be one whose freeing it saves; counting the freeing anyway keeps to the limit.
fn budget(
    limit: Duration,
    committed: Duration,
    (stale, to_free): (usize, usize),
    send: Duration,
    remove: Duration,
) -> usize {
    let left = limit.saturating_sub(committed).saturating_sub(limit / 10);
    let room = left.as_secs_f64() - remove.as_secs_f64() * to_free as f64;
    if room <= 0.0 {
        return 0;
    }
    if send.is_zero() {
        return stale;
    }
    ((room / send.as_secs_f64()) as usize).min(stale)
}

/// Discard the stale copies there while the guest runs, pause, send the budgeted pages, the
/// vCPU state and the stale copies left, hand over; then push what the destination lacks
/// (`postcopy`).
pub(super) fn cutover_hybrid(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    mut sender: Stripes,
    urgent: PageSender<DataStream>,
    order: &Order,
    last_dirty: Vec<u64>,
) -> Result<(), MigrationError> {
    let discarded = discard_live(run, &mut sender, last_dirty)?;
    let (mut clock, mut stale) = pause_for_cutover(run, &sender, discarded.stale.clone())?;
    // What the downtime budget still has room for goes now, the pages the guest will likely
    // touch first first: each one is a fault the guest does not take across the network.
    let held = stale
        .iter()
        .filter(|&&f| discarded.held_there(run, f))
        .count();
    let room = budgeted_pages(run, clock.paused.elapsed(), stale.len(), held);
    order.sort_touch_first(&mut stale);
    // The pages the VMM reads go whatever the budget: after the handover nothing that serves
    // the destination's control path may touch a page that has not arrived.
    let vmm_first = vmm_pages_first(&mut stale, run.partition.config().vcpus);
    let rest = stale.split_off(room.max(vmm_first).min(stale.len()));
    run.send(&mut sender, &stale)?;
    run.report.budgeted_pages = stale.len() as u64;
    let stale = rest;
    sender.send_done()?;
    run.report.downtime_breakdown.last_pages_ms = clock.lap();
    // The destination frees only the stale copies it still holds: the discarded ones are
    // gone there already, and it counts pages it has no copy of as missing.
    let to_free: Vec<u64> = stale
        .iter()
        .copied()
        .filter(|&f| discarded.held_there(run, f))
        .collect();
    commit(run, destination, session, clock, to_free)?;

    // Post-copy: what the destination lacks is the stale pages and those never sent.
    let mut missing = run.sent_once.iter().map(|sent| !sent).collect::<Vec<_>>();
    for &f in &stale {
        missing[f as usize] = true;
    }
    tune_for_postcopy(run, &mut sender);
    let link = PostcopyLink { sender, urgent };
    postcopy(
        run,
        destination,
        session,
        Some(link),
        &order.hottest_first,
        missing,
    )?;
    digests_decide(run)
}

/// Hybrid, every page at the destination: the move completes if the destination's memory is
/// this copy's. The source stayed paused throughout, so its memory is that of the pause;
/// hashing it last keeps it off both the downtime and the post-copy push. The guest already
/// runs there, so a mismatch fails the migration loudly and keeps this copy paused, the one
/// known good, for the operator.
pub(super) fn digests_decide(run: &mut Run<'_>) -> Result<(), MigrationError> {
    record_digests(run, run.partition.digest().total_hex())?;
    run.advance(SourceEvent::Finished)
}

/// Records the source's digest beside the destination's (in the report already), and fails
/// unless they are equal: no migration completes with memory that differs.
fn record_digests(run: &mut Run<'_>, source_digest: String) -> Result<(), MigrationError> {
    run.report.source_digest = Some(source_digest.clone());
    match &run.report.dest_digest {
        Some(dest) if *dest == source_digest => Ok(()),
        dest => Err(MigrationError::DigestMismatch {
            source_digest,
            dest: dest.clone().unwrap_or_else(|| "none".into()),
        }),
    }
}

/// Moves the stale pages the VMM reads to the front of `stale`, the rest keeping their order;
/// returns how many there are.
fn vmm_pages_first(stale: &mut Vec<u64>, vcpus: u32) -> usize {
    let vmm = layout::vmm_read_frames(vcpus);
    let (mut first, rest): (Vec<u64>, Vec<u64>) =
        stale.iter().partition(|f| vmm.binary_search(f).is_ok());
    let count = first.len();
    first.extend(rest);
    *stale = first;
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_the_vmm_reads_go_first_whatever_the_order() {
        let boot = layout::vmm_read_frames(2);
        assert!(!boot.is_empty());
        let mut stale = vec![900, 3, boot[0], 7];
        assert_eq!(vmm_pages_first(&mut stale, 2), 1);
        assert_eq!(stale, vec![boot[0], 900, 3, 7]);
        let mut none = vec![900, 3];
        assert_eq!(vmm_pages_first(&mut none, 2), 0);
        assert_eq!(none, vec![900, 3]);
    }

    fn timings(pages_wait_ms: f64, restore_ms: f64, resume_ms: f64) -> CommitTimings {
        CommitTimings {
            pages_wait_ms,
            restore_ms,
            resume_ms,
        }
    }

    #[test]
    fn the_budget_pays_for_freeing_the_copies_left() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        // 100 ms, 10 spent, 10 spare: 80 ms. Freeing 10k copies at 4 µs is 40 ms; the other
        // 40 ms send 40 ms / 30 µs = 1333 pages.
        assert_eq!(
            budget(ms(100), ms(10), (20_000, 10_000), us(30), us(4)),
            1333
        );
        // Every copy discarded before the pause: the whole 80 ms goes to pages.
        assert_eq!(budget(ms(100), ms(10), (20_000, 0), us(30), us(4)), 2666);
        // Freeing alone overruns: nothing is sent.
        assert_eq!(budget(ms(100), ms(10), (30_000, 30_000), us(30), us(4)), 0);
        // Nothing left of the limit.
        assert_eq!(budget(ms(100), ms(95), (10, 0), us(30), us(0)), 0);
        // Never more than there is.
        assert_eq!(budget(ms(100), ms(0), (10, 10), us(30), us(0)), 10);
        assert_eq!(budget(ms(100), ms(0), (10, 0), Duration::ZERO, us(4)), 10);
    }

    #[test]
    fn the_round_trip_less_the_destinations_steps_is_the_transfer() {
        let (spent, transfer) = split_round_trip(100.0, timings(5.0, 60.0, 1.0));
        assert_eq!(spent, timings(5.0, 60.0, 1.0));
        assert!((transfer - 34.0).abs() < 1e-9, "{transfer}");
    }

    #[test]
    fn a_destination_claiming_more_than_the_round_trip_is_scaled_to_fit() {
        let (spent, transfer) = split_round_trip(10.0, timings(0.0, 30.0, 10.0));
        assert!((spent.restore_ms - 7.5).abs() < 1e-9, "{spent:?}");
        assert!((spent.resume_ms - 2.5).abs() < 1e-9, "{spent:?}");
        assert_eq!(transfer, 0.0);
    }

    #[test]
    fn nonsense_figures_count_as_zero() {
        let (spent, transfer) = split_round_trip(10.0, timings(f64::NAN, -4.0, f64::INFINITY));
        assert_eq!(spent, timings(0.0, 0.0, 0.0));
        assert_eq!(transfer, 10.0);
    }
}
