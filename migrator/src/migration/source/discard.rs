//! Hybrid mode, between the last round and the pause: the destination drops its stale copies
//! while the guest still runs here (QEMU's discard, moved out of the downtime).
//!
//! Freeing a page at the destination costs about 2.3 µs (docs/BENCHMARKS.md). Done at the
//! commit, freeing a flat-out guest's tens of thousands of stale pages took most of a 100 ms
//! downtime and left its budget no room for pages. Sent as `Discard` frames before the pause
//! and acknowledged, it takes the guest's time instead, and what the guest writes meanwhile
//! is discarded in turn, in rounds that shrink as fast as freeing outruns the guest.

use std::time::{Duration, Instant};

use tracing::warn;

use super::{MigrationError, rounds::Run, stripes::Stripes};
use crate::migration::{
    link::{DataStream, LinkError},
    transport::{Frame, FrameReader},
};

/// At most this many rounds of discards before the pause.
const ROUNDS: usize = 4;

/// A set of fresh stale copies smaller than this is left to the commit to free: a round costs
/// a dirty-log fetch and a round trip, which so few pages do not repay.
const ENOUGH: usize = 256;

/// What discarding did: every stale page known at the end, and which of them have no copy
/// at the destination any more.
pub(super) struct Discarded {
    pub(super) stale: Vec<u64>,
    pub(super) gone: Vec<bool>,
}

impl Discarded {
    /// Whether the destination still holds a copy of `page` that the commit must free.
    pub(super) fn held_there(&self, run: &Run<'_>, page: u64) -> bool {
        run.sent_once[page as usize] && !self.gone[page as usize]
    }
}

/// Discards at the destination the copies of `stale` pages (the last check's, changed since
/// they were sent), then those the guest dirtied meanwhile, until few are left. A destination
/// that does not acknowledge in time ends the rounds: what it has not dropped the commit
/// frees, as it would have without them.
pub(super) fn discard_live(
    run: &mut Run<'_>,
    sender: &mut Stripes,
    mut stale: Vec<u64>,
) -> Result<Discarded, MigrationError> {
    let frames = run.partition.memory().frames() as usize;
    let mut gone = vec![false; frames];
    stale.sort_unstable();
    stale.dedup();
    let mut batch: Vec<u64> = stale
        .iter()
        .copied()
        .filter(|&f| run.sent_once[f as usize])
        .collect();
    let started = Instant::now();
    // Each connection answers for the discards sent on it.
    let mut answers: Vec<FrameReader<DataStream>> = sender
        .clone_streams()?
        .into_iter()
        .map(|stream| FrameReader::new(stream, frames as u64))
        .collect();
    for _ in 0..ROUNDS {
        if batch.len() < ENOUGH {
            break;
        }
        let sent = sender.send_discard(&batch)?;
        // The destination's own figure for freeing, four times over, and the round trip.
        let expected = run.remove_per_page * batch.len() as u32;
        let patience = expected * 4 + run.prepare_rtt * 4 + Duration::from_millis(100);
        match acknowledged(&mut answers, &sent, patience) {
            Ok(true) => {}
            Ok(false) => {
                warn!(
                    "the destination did not acknowledge {} discarded pages within {patience:?}; \
                     the commit frees them",
                    batch.len()
                );
                break;
            }
            Err(e) => return Err(e),
        }
        for &f in &batch {
            gone[f as usize] = true;
        }
        run.report.discarded_pages += batch.len() as u64;
        // What the guest wrote while the destination freed.
        let bitmap = run
            .partition
            .dirty_log_fetch()?
            .ok_or(MigrationError::DirtyLogOff)?;
        batch = run.add_changed(&mut stale, &bitmap);
        batch.retain(|&f| run.sent_once[f as usize]);
    }
    // Back to what the connections had: the source reads nothing more on them.
    for answers in answers {
        let _ = answers.into_inner().set_read_timeout(None);
    }
    run.report.discard_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(Discarded { stale, gone })
}

/// Reads on each connection the acknowledgements of the `frames` sent on it, within
/// `patience` in all: `Ok(false)` if they did not all come.
fn acknowledged(
    answers: &mut [FrameReader<DataStream>],
    frames: &[usize],
    patience: Duration,
) -> Result<bool, MigrationError> {
    let deadline = Instant::now() + patience;
    for (answers, &frames) in answers.iter_mut().zip(frames) {
        if !acknowledged_on(answers, frames, deadline)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reads `frames` acknowledgements on one connection by `deadline`.
fn acknowledged_on(
    answers: &mut FrameReader<DataStream>,
    frames: usize,
    deadline: Instant,
) -> Result<bool, MigrationError> {
    for _ in 0..frames {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        answers
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| MigrationError::Connect(LinkError::Socket(e)))?;
        match answers.next_frame() {
            Ok(Some(Frame::Discarded)) => {}
            Ok(Some(_)) => return Err(MigrationError::UnexpectedFrame),
            // The connection ended: the push on it fails next and says why.
            Ok(None) => return Ok(false),
            Err(crate::migration::transport::TransportError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}
