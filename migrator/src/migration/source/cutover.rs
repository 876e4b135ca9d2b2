//! The cutover: pause, the last pages, the state; in hybrid mode, the post-copy push with
//! demands served ahead of it.

use std::{collections::VecDeque, sync::mpsc, time::Instant};

use tracing::warn;

use super::{MigrationError, SourcePhase, rounds::Run};
use crate::{
    migration::{
        control::{CommitReply, CommitRequest, Destination},
        link::{self, DataStream},
        order::Order,
        report::Phase,
        transport::{Frame, FrameReader, PageSender},
    },
    vmm::{dirty::dirty_frames, state},
};

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
pub(super) fn cutover_precopy(
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
    let (paused, stale) = pause_for_cutover(run, last_dirty)?;
    sender.send_done()?;
    commit(run, destination, session, paused, stale.clone())?;
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
