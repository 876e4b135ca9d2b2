//! The cutover: pause, the last pages, the state; in hybrid mode, the post-copy push with
//! demands served ahead of it.

use std::{
    collections::VecDeque,
    sync::mpsc,
    time::{Duration, Instant},
};

use tracing::warn;

use super::{MigrationError, SourcePhase, rounds::Run};
use crate::{
    migration::{
        control::{CommitReply, CommitRequest, CommitTimings, Destination},
        link::{self, DataStream},
        order::Order,
        report::Phase,
        transport::{Frame, FrameReader, PageSender},
    },
    vmm::{dirty::dirty_frames, state},
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
fn drain(sender: &PageSender<DataStream>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match sender.stream().unsent_bytes() {
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
    sender: &PageSender<DataStream>,
    mut last_dirty: Vec<u64>,
) -> Result<(Stopwatch, Vec<u64>), MigrationError> {
    let partition = run.partition;
    drain(sender, run.options.downtime_limit);
    run.set_progress(|p| p.phase = Phase::StopAndCopy);
    let mut clock = Stopwatch::start();
    partition.pause()?;
    let bitmap = partition
        .dirty_log_fetch()?
        .ok_or(MigrationError::DirtyLogOff)?;
    run.report.downtime_breakdown.pause_ms = clock.lap();
    // The last check already dropped its unchanged pages: only those dirtied since are
    // hashed, inside the downtime (hashing 9k pages again took about 10 ms there).
    last_dirty.sort_unstable();
    let fresh: Vec<u64> = dirty_frames(&bitmap)
        .filter(|f| last_dirty.binary_search(f).is_err())
        .collect();
    last_dirty.extend(run.changed_only(fresh));
    last_dirty.sort_unstable();
    last_dirty.dedup();
    Ok((clock, last_dirty))
}

/// Pause, send the pages dirtied since the last round and the vCPU state, resume there.
pub(super) fn cutover_precopy(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    sender: &mut PageSender<DataStream>,
    order: &Order,
    last_dirty: Vec<u64>,
) -> Result<(), MigrationError> {
    let partition = run.partition;
    let (mut clock, mut dirty) = pause_for_cutover(run, sender, last_dirty)?;
    order.sort(&mut dirty);
    run.send(sender, &dirty)?;
    sender.send_done()?;
    run.report.downtime_breakdown.last_pages_ms = clock.lap();
    let reply = commit(run, destination, session, clock, Vec::new())?;
    // Still paused here, so this is the memory at the moment of the pause; hashing it after
    // the cutover keeps it out of the downtime.
    run.report.source_digest = Some(partition.digest().total_hex());
    run.report.dest_digest = reply.dest_digest;
    Ok(())
}

/// Sends the paused partition's state (and, in hybrid mode, the pages whose copy is stale);
/// returns once the destination runs it, with the downtime since the pause, its breakdown and
/// the new id recorded.
fn commit(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    mut clock: Stopwatch,
    stale_pages: Vec<u64>,
) -> Result<CommitReply, MigrationError> {
    let snapshot = state::encode(&run.partition.snapshot()?);
    run.report.downtime_breakdown.state_encode_ms = clock.lap();
    let reply = destination
        .commit(
            session,
            CommitRequest {
                snapshot,
                stale_pages,
            },
        )
        .map_err(MigrationError::Commit)?;
    let round_trip = clock.lap();
    run.report.downtime_ms = clock.downtime().as_millis() as u64;
    let (spent, transfer) = split_round_trip(round_trip, reply.timings);
    let breakdown = &mut run.report.downtime_breakdown;
    // Waiting there for pages still in flight is the last pages' time, not the state's.
    breakdown.last_pages_ms += spent.pages_wait_ms;
    breakdown.restore_ms = spent.restore_ms;
    breakdown.resume_ms = spent.resume_ms;
    breakdown.state_transfer_ms = transfer;
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

/// Pause, send the vCPU state and the list of stale pages, resume there at once; then push
/// what the destination lacks, hottest first, serving its demands ahead of the push.
pub(super) fn cutover_hybrid(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    mut sender: PageSender<DataStream>,
    demand_stream: DataStream,
    order: &Order,
    last_dirty: Vec<u64>,
) -> Result<(), MigrationError> {
    let partition = run.partition;
    let (mut clock, stale) = pause_for_cutover(run, &sender, last_dirty)?;
    sender.send_done()?;
    run.report.downtime_breakdown.last_pages_ms = clock.lap();
    commit(run, destination, session, clock, stale.clone())?;
    run.phase = SourcePhase::Postcopy { session };

    // Post-copy: push what the destination lacks, hottest first; demands jump the queue. A
    // small send buffer keeps a demanded page from queueing behind megabytes of pushed ones.
    run.set_progress(|p| p.phase = Phase::Postcopy);
    if let Err(e) = link::set_send_buffer(sender.stream(), link::POSTCOPY_SEND_BUFFER) {
        warn!("{}", heatprobe::probes::error_chain(&e));
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
        return Err(MigrationError::AfterCutover(Box::new(e)));
    }
    let finish = destination.finish(session);
    // The reader holds a clone of the socket: shut it down so the reader sees the end.
    let _ = sender.stream().shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    let finish =
        finish.map_err(|e| MigrationError::AfterCutover(Box::new(MigrationError::Finish(e))))?;
    // The source stayed paused throughout: its memory is that of the pause. Hashing it last
    // keeps it off both the downtime and the post-copy push.
    run.report.source_digest = Some(partition.digest().total_hex());
    run.report.dest_digest = Some(finish.dest_digest);
    run.report.postcopy_requests = finish.postcopy_requests;
    run.report.postcopy_fault_latency_us = finish.fault_latency_us;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(pages_wait_ms: f64, restore_ms: f64, resume_ms: f64) -> CommitTimings {
        CommitTimings {
            pages_wait_ms,
            restore_ms,
            resume_ms,
        }
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
