//! The destination's session fed data connections and control calls in any order
//! (`migration::destination::offline`, which says what of the session it drives and what it
//! cannot reach: the KVM restore, userfaultfd, TLS, connections read at the same time).
//!
//! After every step: a call the phase machine refuses is refused, and a refused call changes
//! nothing; a call that goes through moves the session exactly as the machine says; a
//! connection's frames move it only as `Done` frames and failures can; every page the session
//! holds is in guest memory with the hash its digest will count, every page it does not hold
//! is zeros, and a page's bytes are ones a frame sent for that very page; what the session
//! writes back is whole frames of the kinds it sends.

use std::collections::{HashMap, HashSet};

use xxhash_rust::xxh3::xxh3_64;

use super::FuzzError;
use crate::migration::{
    destination::{
        SessionEvent, SessionPhase,
        offline::{Control, OfflineSession},
    },
    protocol::MAX_CONNECTIONS,
    report::Mode,
    transport::{Frame, FrameReader},
};

/// Largest connection a step sends: what the socket pair holds without a reader.
const MAX_CONNECTION_BYTES: usize = 64 << 10;

/// One step of the input.
enum Step<'a> {
    /// The source opens a data connection.
    Open,
    /// Connection `.0` (of those opened, modulo their number) sends bytes.
    Send(usize, &'a [u8]),
    /// Connection `.0` closes.
    Close(usize),
    Control(Control),
}

/// Takes the next step off `input`, or `None` at its end.
fn next_step<'a>(input: &mut &'a [u8]) -> Option<Step<'a>> {
    let (&op, rest) = input.split_first()?;
    *input = rest;
    let take = |input: &mut &'a [u8], n: usize| {
        let (taken, rest) = input.split_at(n.min(input.len()));
        *input = rest;
        taken
    };
    let link = |input: &mut &'a [u8]| usize::from(take(input, 1).first().copied().unwrap_or(0));
    Some(match op % 13 {
        0 => Step::Open,
        1 => {
            let link = link(input);
            let len = match take(input, 2) {
                [a, b] => usize::from(u16::from_le_bytes([*a, *b])),
                _ => 0,
            };
            Step::Send(link, take(input, len.min(MAX_CONNECTION_BYTES)))
        }
        2 => Step::Close(link(input)),
        3 => {
            let len = take(input, 1).first().copied().unwrap_or(0);
            Step::Control(Control::CommitUndecodable(
                take(input, usize::from(len)).to_vec(),
            ))
        }
        4 => Step::Control(Control::Commit),
        5 => Step::Control(Control::Restored),
        6 => Step::Control(Control::Handover),
        7 => Step::Control(Control::Finish),
        8 => Step::Control(Control::Failure),
        9 => Step::Control(Control::Abort),
        10 => Step::Control(Control::Discard),
        11 => Step::Control(Control::Recover),
        _ => Step::Control(Control::Failure),
    })
}

/// Every phase a session in `from` may reach on `events` alone.
fn reachable(from: SessionPhase, mode: Mode, events: &[SessionEvent]) -> HashSet<SessionPhase> {
    let mut seen = HashSet::from([from]);
    let mut todo = vec![from];
    while let Some(phase) = todo.pop() {
        for &event in events {
            if let Ok(next) = phase.next(event, mode)
                && seen.insert(next)
            {
                todo.push(next);
            }
        }
    }
    seen
}

/// The hashes of the pages `bytes`' frames send, by page, as the frame decoder reads them.
fn sent_pages(bytes: &[u8], frames: u64, sent: &mut HashMap<u64, HashSet<u64>>) {
    let mut reader = FrameReader::new(bytes, frames);
    while let Ok(Some(frame)) = reader.next_frame() {
        if let Frame::Pages(pages) = frame {
            for (page, data) in pages {
                if let Some(data) = data {
                    sent.entry(page).or_default().insert(xxh3_64(data));
                }
            }
        }
    }
}

/// Checks guest memory against what the session holds and what was sent.
fn check_pages(session: &OfflineSession, sent: &HashMap<u64, HashSet<u64>>) {
    let pages = session.pages().expect("guest memory reads");
    for (page, held) in pages.iter().enumerate() {
        let zero = held.bytes.iter().all(|&b| b == 0);
        let hash = xxh3_64(&held.bytes);
        if held.received {
            assert_eq!(
                hash, held.digest,
                "page {page}: the digest counts what guest memory holds"
            );
        } else {
            assert!(zero, "page {page} is not held, yet memory holds data there");
        }
        assert!(
            zero || sent.get(&(page as u64)).is_some_and(|s| s.contains(&hash)),
            "page {page} holds bytes no frame sent for it"
        );
    }
}

/// What the session wrote back on a connection: whole frames, each a `Discarded` answer or a
/// demand for pages inside memory.
fn check_answers(answers: &[u8], frames: u64) {
    let mut reader = FrameReader::new(answers, frames);
    loop {
        match reader.next_frame() {
            Ok(None) => return,
            Ok(Some(Frame::Discarded | Frame::Demand(_))) => {}
            Ok(Some(_)) => panic!("the session answered with a frame it never sends"),
            Err(e) => panic!("the session's answers are not frames: {e}"),
        }
    }
}

/// Input: a byte for the mode (bit 0: hybrid) and the data connections (bit 1: two), a byte
/// for the pages of guest memory (1 to 16), then steps until the input ends, each an op
/// (modulo 13) and its operands: 0 the source opens a connection; 1 a connection (a byte)
/// sends bytes (a 2-byte length, then its frames); 2 a connection (a byte) closes; 3 a commit
/// whose state does not decode (a length byte, then the state); 4 commit, 5 restored, 6
/// handover, 7 finish, 8 and 12 failure, 9 abort, 10 discard, 11 recover.
pub fn destination_session(data: &[u8]) -> Result<(), FuzzError> {
    let [shape, pages, rest @ ..] = data else {
        return Err(FuzzError::Session("no mode and memory size"));
    };
    let mut input = rest;
    let mode = if shape & 1 == 0 {
        Mode::Precopy
    } else {
        Mode::Hybrid
    };
    let connections = (1 + u32::from(shape >> 1 & 1)).min(MAX_CONNECTIONS);
    let mut session = OfflineSession::new(mode, connections, 1 + u64::from(pages % 16))
        .map_err(|_| FuzzError::Session("no guest memory"))?;
    let frames = session.frames();
    let mut sent: HashMap<u64, HashSet<u64>> = HashMap::new();
    while let Some(step) = next_step(&mut input) {
        let before = session.phase();
        match step {
            Step::Open => {
                let read = session
                    .open()
                    .map_err(|_| FuzzError::Session("no socket pair"))?;
                let after = session.phase();
                let connected = before.next(SessionEvent::Connected, mode);
                assert!(
                    after == before || (read && Ok(after) == connected),
                    "a connection moved the session from {before:?} to {after:?}"
                );
            }
            Step::Send(link, bytes) => {
                sent_pages(bytes, frames, &mut sent);
                let links = session.links().max(1);
                let answers = session
                    .send(link % links, bytes)
                    .map_err(|_| FuzzError::Session("no socket pair"))?;
                check_answers(&answers, frames);
                let after = session.phase();
                let frames_can = [SessionEvent::PagesDone, SessionEvent::Failure];
                assert!(
                    reachable(before, mode, &frames_can).contains(&after),
                    "frames moved the session from {before:?} to {after:?}"
                );
                // Only frames write guest memory.
                check_pages(&session, &sent);
            }
            Step::Close(link) => {
                session.close(link % session.links().max(1));
                let after = session.phase();
                assert!(
                    reachable(before, mode, &[SessionEvent::Failure]).contains(&after),
                    "a close moved the session from {before:?} to {after:?}"
                );
            }
            Step::Control(call) => {
                let event = call.event();
                let undecodable = matches!(call, Control::CommitUndecodable(_));
                let expected = before.next(event, mode);
                let result = session.control(call);
                let after = session.phase();
                if event == SessionEvent::Failure {
                    // A failure is taken, never refused.
                    assert_eq!(after, expected.unwrap_or(before), "a failure in {before:?}");
                } else {
                    assert!(
                        expected.is_ok() || result.is_err(),
                        "{event:?} went through in {before:?}, which refuses it"
                    );
                    assert!(
                        !undecodable || result.is_err(),
                        "a commit whose state does not decode went through"
                    );
                    match result {
                        Ok(()) => assert_eq!(Ok(after), expected, "{event:?} in {before:?}"),
                        Err(_) => {
                            assert_eq!(after, before, "a refused {event:?} changed the phase")
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
