//! Hybrid mode after the handover: the push of what the destination lacks, hottest first,
//! with the destination's demands served ahead of it on the urgent connection; and, when a
//! connection breaks, its recovery over new ones (QEMU's `postcopy-paused`, `migrate-recover`
//! and `migrate resume=true`).
//!
//! The guest runs on the destination from the pages it has; the source's copy, paused, is the
//! only complete one. So a broken link never ends the migration: the source reconnects with
//! backoff for `--recover-window`, the destination says which pages it still lacks (whatever
//! was in flight is among them) and the push goes on with those.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use heatprobe::probes::error_chain;
use tracing::{info, warn};

use super::{MigrationError, SourceEvent, rounds::Run, stripes::Stripes};
use crate::{
    migration::{
        control::{Destination, DestinationError, FinishReply},
        link::{self, DataStream, LinkError},
        transport::{Frame, FrameReader, PageSender, SendCounts},
    },
    vmm::GuestMemory,
};

/// Share of the measured link rate the post-copy push is paced at: a little below the link,
/// so that the bottleneck's queue stays short and a demanded page, on its own connection,
/// finds no backlog in front of it there.
const PUSH_RATE_SHARE: f64 = 0.9;

/// Each batch leaves as one burst into the link's queue, and a demanded page on the urgent
/// connection can wait behind it: 16 pages are half a millisecond at 1 Gbit/s. Measured on
/// paced kv-zipf (8 runs each), the runs' p99 demand latency was 0.8-3.6 ms (median 1.6)
/// with batches of 64, 0.6-3.4 ms (median 0.95) with 16.
const PUSH_BATCH: usize = 16;

/// The first wait before trying to recover again, doubled after each failed try up to
/// [`BACKOFF_MAX`]: a link that comes back is found within seconds, and a peer that stays
/// away is not asked more than every few seconds.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// The connections post-copy runs on: the striped data connections of the push and the
/// urgent one of the demands.
pub(super) struct PostcopyLink {
    pub(super) sender: Stripes,
    pub(super) urgent: PageSender<DataStream>,
}

/// Pushes every page `missing` says the destination lacks, hottest first by `hottest_first`
/// (pages it leaves out go after, in address order), serving demands ahead of the push;
/// recovers over new connections whenever a connection breaks, for up to the options'
/// `recover_window` each time. `link` is `None` to start with a recovery (a manual resume),
/// in phase `PostcopyPaused`; otherwise the phase is `Postcopy`. Returns once every page is
/// there, the phase unchanged: the digests decide the rest.
pub(super) fn postcopy(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    mut link: Option<PostcopyLink>,
    hottest_first: &[u64],
    mut missing: Vec<bool>,
) -> Result<(), MigrationError> {
    let mut broken: Option<MigrationError> = None;
    loop {
        let connections = match link.take() {
            Some(connections) => connections,
            None => {
                let paused = Instant::now();
                let recovered = recover(run, destination, session, broken.take());
                run.report.postcopy_paused_ms += paused.elapsed().as_millis() as u64;
                match recovered? {
                    Recovered::Link(connections, lacking) => {
                        run.advance(SourceEvent::Recovered)?;
                        run.report.postcopy_recoveries += 1;
                        missing = lacking;
                        connections
                    }
                    // Only the answer to `finish` was lost.
                    Recovered::Finished(finish) => {
                        finished(run, finish);
                        return Ok(());
                    }
                }
            }
        };
        let queue = push_order(hottest_first, &missing);
        match push(run, destination, session, connections, &queue) {
            Ok(finish) => {
                finished(run, finish);
                return Ok(());
            }
            Err(e) if run.options.recover_window.is_zero() => {
                return Err(MigrationError::AfterCutover(Box::new(e)));
            }
            Err(e) => {
                warn!(
                    "post-copy paused: {}; recovering for up to {:?}",
                    error_chain(&e),
                    run.options.recover_window
                );
                run.advance(SourceEvent::Broke)?;
                broken = Some(e);
            }
        }
    }
}

/// The destination's word that every page is in place, into the report.
fn finished(run: &mut Run<'_>, finish: FinishReply) {
    run.report.dest_digest = Some(finish.dest_digest);
    run.report.postcopy_requests = finish.postcopy_requests;
    run.report.postcopy_rerequests = finish.rerequests;
    run.report.postcopy_fault_latency_us = finish.fault_latency_us;
    run.report.postcopy_blocktime_ms = finish.blocktime_ms;
    run.report.postcopy_vcpu_blocktime_ms = finish.vcpu_blocktime_ms;
}

/// What a recovery found.
enum Recovered {
    /// New connections, and the pages the destination lacks.
    Link(PostcopyLink, Vec<bool>),
    /// Nothing to recover: the destination had finished, and only its answer was lost.
    Finished(FinishReply),
}

/// The push's order: `hottest_first`'s pages that are missing, then any missing page it
/// leaves out, in address order.
fn push_order(hottest_first: &[u64], missing: &[bool]) -> Vec<u64> {
    let mut queued = vec![false; missing.len()];
    let mut queue = Vec::new();
    for &page in hottest_first {
        if let Some(slot) = queued.get_mut(page as usize)
            && missing[page as usize]
            && !*slot
        {
            *slot = true;
            queue.push(page);
        }
    }
    queue.extend(
        (0..missing.len() as u64).filter(|&page| missing[page as usize] && !queued[page as usize]),
    );
    queue
}

/// One attempt at the push over `connections`: every page of `queue` a demand has not
/// brought already, the `Done`, and the destination's `finish`, which confirms every page.
fn push(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    connections: PostcopyLink,
    queue: &[u64],
) -> Result<FinishReply, MigrationError> {
    let PostcopyLink { mut sender, urgent } = connections;
    let frames = run.partition.memory().frames();
    let needed: Arc<Vec<AtomicBool>> =
        Arc::new((0..frames).map(|_| AtomicBool::new(false)).collect());
    for &page in queue {
        needed[page as usize].store(true, Ordering::Relaxed);
    }
    let urgent_end = urgent
        .stream()
        .try_clone()
        .map_err(|e| MigrationError::Connect(LinkError::Socket(e)))?;
    let server = {
        let memory = Arc::clone(run.partition.memory());
        let needed = Arc::clone(&needed);
        std::thread::Builder::new()
            .name("migration-urgent".into())
            .spawn(move || serve_demands(urgent, &memory, &needed))
            .map_err(|e| MigrationError::Connect(LinkError::Socket(e)))?
    };
    let pushed = (|| -> Result<(), MigrationError> {
        let mut batch = Vec::with_capacity(PUSH_BATCH);
        for chunk in queue.chunks(PUSH_BATCH) {
            batch.clear();
            // A page a demand already brought goes no more.
            batch.extend(
                chunk
                    .iter()
                    .filter(|&&f| needed[f as usize].swap(false, Ordering::Relaxed)),
            );
            if !batch.is_empty() {
                run.send(&mut sender, &batch)?;
            }
        }
        sender.send_done()?;
        Ok(())
    })();
    let finish = pushed.and_then(|()| destination.finish(session).map_err(MigrationError::Finish));
    // Shut the urgent connection down so its server sees the end; on a failure, the push's
    // connections go with it.
    let _ = urgent_end.shutdown(std::net::Shutdown::Both);
    if let Ok(counts) = server.join() {
        run.counts += counts;
    }
    finish
}

/// Recovers post-copy after `broken`: opens the control channel again, asks the destination
/// to recover the session, and opens new connections to it, trying again with backoff until
/// the options' `recover_window` has passed. Returns the connections and the pages the
/// destination lacks. A destination that refuses (it no longer knows the session, say) ends
/// the tries at once, unless it finished the session: then its answer to `finish`, asked
/// again, is returned.
fn recover(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
    broken: Option<MigrationError>,
) -> Result<Recovered, MigrationError> {
    let window = run.options.recover_window;
    let deadline = Instant::now() + window;
    let mut wait = BACKOFF_FIRST;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let error = match try_recover(run, destination, session) {
            Ok((link, missing)) => {
                info!("post-copy recovered after {tries} tries");
                return Ok(Recovered::Link(link, missing));
            }
            Err(Attempt::Refused(e)) => match destination.finish(session) {
                // The session was over there: every page had arrived.
                Ok(finish) => {
                    info!("post-copy had finished; only the answer was lost");
                    return Ok(Recovered::Finished(finish));
                }
                Err(_) => e,
            },
            Err(Attempt::Unreachable(e)) if Instant::now() + wait < deadline => {
                warn!(
                    "post-copy recovery: {}; trying again in {wait:?}",
                    error_chain(&e)
                );
                std::thread::sleep(wait);
                wait = (wait * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(Attempt::Unreachable(e)) => e,
        };
        return Err(MigrationError::AfterCutover(Box::new(
            MigrationError::NotRecovered {
                tries,
                window,
                // No failure of this run: a resume of a post-copy paused before it.
                broken: broken.map_or_else(
                    || "paused before this resume".to_string(),
                    |e| error_chain(&e),
                ),
                last: Box::new(error),
            },
        )));
    }
}

/// Why one try at a recovery failed: worth another try, or not.
enum Attempt {
    Unreachable(MigrationError),
    Refused(MigrationError),
}

fn try_recover(
    run: &mut Run<'_>,
    destination: &mut dyn Destination,
    session: u64,
) -> Result<(PostcopyLink, Vec<bool>), Attempt> {
    let answer = |e: DestinationError| match e {
        DestinationError::Refused(_) => Attempt::Refused(MigrationError::Recover(e)),
        DestinationError::Unreachable { .. } => Attempt::Unreachable(MigrationError::Recover(e)),
    };
    destination.reconnect().map_err(answer)?;
    let recovery = destination.recover(session).map_err(answer)?;
    let frames = run.partition.memory().frames();
    if recovery.missing.len() as u64 != frames.div_ceil(64) {
        return Err(Attempt::Refused(MigrationError::BadRecovery {
            words: recovery.missing.len(),
            frames,
        }));
    }
    let missing: Vec<bool> = (0..frames)
        .map(|page| recovery.missing[(page / 64) as usize] & (1 << (page % 64)) != 0)
        .collect();
    let retry = |e: LinkError| Attempt::Unreachable(MigrationError::Connect(e));
    let streams = (0..run.options.connections)
        .map(|_| destination.connect_data(recovery.data_port))
        .collect::<Result<Vec<_>, _>>()
        .map_err(retry)?;
    let mut urgent = PageSender::new(
        destination
            .connect_data(recovery.data_port)
            .map_err(retry)?,
        None,
    );
    urgent
        .send_urgent()
        .map_err(|e| Attempt::Unreachable(e.into()))?;
    let mut sender = Stripes::new(streams, run.bandwidth_limit);
    sender
        .set_compression(run.options.compress)
        .map_err(|e| Attempt::Refused(e.into()))?;
    tune_for_postcopy(run, &mut sender);
    Ok((PostcopyLink { sender, urgent }, missing))
}

/// A small send buffer and a pace below the link keep the queues the urgent connection
/// shares with the push short.
pub(super) fn tune_for_postcopy(run: &Run<'_>, sender: &mut Stripes) {
    if let Err(e) = sender.set_send_buffer(link::POSTCOPY_SEND_BUFFER) {
        warn!("{}", error_chain(&e));
    }
    // The pacer counts bytes on the wire: the wire rate, whatever compression makes of it.
    let push_rate = run
        .wire_rate
        .map(|rate| (rate * PUSH_RATE_SHARE) as u64)
        .into_iter()
        .chain(run.bandwidth_limit)
        .min();
    sender.set_rate(push_rate);
}

/// Serves the destination's demands on the urgent connection until it ends: reads each
/// demand and sends the pages it names at once, from this thread (QEMU's preempt-full does
/// the same from its return-path thread). A page is sent even if the push already sent it:
/// that copy may still be on its way. Returns what it sent.
fn serve_demands(
    mut urgent: PageSender<DataStream>,
    memory: &GuestMemory,
    needed: &[AtomicBool],
) -> SendCounts {
    let mut counts = SendCounts::default();
    let stream = match urgent.stream().try_clone() {
        Ok(stream) => stream,
        Err(e) => {
            warn!("the urgent connection: {e}");
            return counts;
        }
    };
    let mut reader = FrameReader::new(stream, memory.frames());
    let mut hashes = Vec::new();
    while let Ok(Some(frame)) = reader.next_frame() {
        let Frame::Demand(pages) = frame else {
            continue;
        };
        for &page in &pages {
            if let Some(flag) = needed.get(page as usize) {
                flag.store(false, Ordering::Relaxed);
            }
        }
        hashes.clear();
        match urgent.send_pages(memory, &pages, &mut hashes) {
            Ok(sent) => counts += sent,
            Err(e) => {
                // The push, on the same link, fails too and says why.
                warn!("serving demanded pages: {e}");
                break;
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_sends_each_missing_page_once_hottest_first() {
        let missing = [true, false, true, true, false, true];
        // Page 4 is not missing, page 9 is out of range and 3 is named twice: only the
        // missing pages go, once each, the hottest first and those the order leaves out last.
        assert_eq!(push_order(&[3, 4, 9, 0, 3], &missing), vec![3, 0, 2, 5]);
        assert_eq!(push_order(&[], &missing), vec![0, 2, 3, 5]);
        assert!(push_order(&[1, 4], &[false; 6]).is_empty());
    }
}
