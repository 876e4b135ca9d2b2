//! The phases of an incoming migration session and the one function that moves between them,
//! in the style of Cloud Hypervisor's `ReceiveMigrationState`: an event that does not fit the
//! phase is refused with a typed error, and nothing changes.
//!
//! ```text
//!  Connecting ─connected─▶ Receiving ─pages done─▶ Received
//!                              │ commit                │ commit
//!                              ▼                       ▼
//!         Restoring{received: false} ─pages done─▶ Restoring{received: true}
//!                                                      │ restored (parked)
//!                                                    Parked
//!                                                      │ handover (the source's word)
//!                                         pre-copy ◀───┴───▶ hybrid
//!                                         Restored          Postcopy{pushed: false}
//!                                                              │ pages done (push ended)
//!                                                           Postcopy{pushed: true} ─finish─▶ Finished
//!  Postcopy ─failure, or recover─▶ PostcopyPaused ─connected (a recover's new connections)─▶ Postcopy{pushed: false}
//!  any phase before the guest runs ─abort─▶ Aborted;  ─failure─▶ Failed
//!  Restored, Postcopy, PostcopyPaused ─(guest stopped) discard─▶ Aborted
//! ```
//!
//! A failure after the handover never ends the session: the guest runs here on the pages it
//! has, and only the source holds the rest. The session waits in `PostcopyPaused` for the
//! source to recover it over new connections (QEMU's `postcopy-paused`).

use thiserror::Error;

use crate::migration::report::Mode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionPhase {
    /// Waiting for the source's data connection.
    Connecting,
    /// Pages arrive.
    Receiving,
    /// The source said every page of pre-copy is sent.
    Received,
    /// The commit is restoring the partition (`received`: every pre-copy page is here; a
    /// commit that came before the last pages waits for them).
    Restoring { received: bool },
    /// The commit restored the partition here, parked: it runs only when the source, its
    /// own copy stopped for good, hands over (QEMU's `-S` and `cont`, libvirt's Finish).
    Parked,
    /// Pre-copy: the restored partition runs here.
    Restored,
    /// Hybrid: the restored partition runs here; missing pages arrive on demand and by push
    /// (`pushed`: the push has ended).
    Postcopy { pushed: bool },
    /// Hybrid: a connection broke after the handover. The guest runs on the pages it has, and
    /// a fault on a missing one waits until the source recovers the session.
    PostcopyPaused,
    /// Hybrid: every page is in place.
    Finished,
    /// The session failed before the guest ran here.
    Failed,
    /// The source gave up, and nothing of the session runs here.
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The source's data connection was accepted.
    Connected,
    /// A `Done` frame: the end of pre-copy, or in post-copy the end of the push.
    PagesDone,
    Commit,
    /// The commit restored the partition, parked.
    Restored,
    /// The source stopped its copy for good: the parked partition runs here.
    Handover,
    Finish,
    /// The data connection or a page install failed.
    Failure,
    /// The source gave up on the session.
    Abort,
    /// The partition this session restored was stopped, so the session may end.
    Discard,
    /// Post-copy: the source recovers the session over new connections; the old ones are
    /// dropped.
    Recover,
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum PhaseError {
    #[error("the session is already {phase:?}: a second commit is refused")]
    SecondCommit { phase: SessionPhase },
    #[error(
        "aborting would leave the partition this session restored running beside its source; \
         stop it first"
    )]
    WouldLeaveRunningCopy,
    #[error("{event:?} does not fit a session that is {phase:?}")]
    Unexpected {
        phase: SessionPhase,
        event: SessionEvent,
    },
}

impl SessionPhase {
    /// Whether a partition restored by this session runs here.
    pub fn guest_runs_here(self) -> bool {
        matches!(
            self,
            Self::Restored | Self::Postcopy { .. } | Self::PostcopyPaused | Self::Finished
        )
    }

    /// Whether a call that ends in `event` may wait in this phase for the event to fit, or
    /// why it is refused at once: `finish` waits through the push for the last page; any
    /// other event must fit now.
    pub fn may_await(self, event: SessionEvent, mode: Mode) -> Result<(), PhaseError> {
        match (self, event) {
            (Self::Postcopy { .. }, SessionEvent::Finish) => Ok(()),
            _ => self.next(event, mode).map(|_| ()),
        }
    }

    /// The phase `event` leads to, or why it is refused.
    pub fn next(self, event: SessionEvent, mode: Mode) -> Result<Self, PhaseError> {
        use SessionEvent as E;
        use SessionPhase as P;
        match (self, event) {
            (P::Connecting, E::Connected) => Ok(P::Receiving),
            // A recover's first new connection: the push goes on.
            (P::PostcopyPaused, E::Connected) => Ok(P::Postcopy { pushed: false }),
            (P::Postcopy { .. } | P::PostcopyPaused, E::Recover) => Ok(P::PostcopyPaused),
            // The commit came before the receiver saw the connection: it waits all the same.
            (P::Restoring { received: false }, E::Connected) => Ok(self),
            (P::Receiving, E::PagesDone) => Ok(P::Received),
            (P::Restoring { received: false }, E::PagesDone) => Ok(P::Restoring { received: true }),
            (P::Postcopy { pushed: false }, E::PagesDone) => Ok(P::Postcopy { pushed: true }),
            // A commit may come before the last pages: it waits for them.
            (P::Connecting | P::Receiving, E::Commit) => Ok(P::Restoring { received: false }),
            (P::Received, E::Commit) => Ok(P::Restoring { received: true }),
            (
                P::Restoring { .. } | P::Parked | P::Restored | P::Postcopy { .. } | P::Finished,
                E::Commit,
            ) => Err(PhaseError::SecondCommit { phase: self }),
            (P::Restoring { received: true }, E::Restored) => Ok(P::Parked),
            (P::Parked, E::Handover) => Ok(match mode {
                Mode::Precopy => P::Restored,
                Mode::Hybrid => P::Postcopy { pushed: false },
            }),
            // A handover whose answer was lost comes again: it changes nothing.
            (P::Restored | P::Postcopy { .. } | P::PostcopyPaused | P::Finished, E::Handover) => {
                Ok(self)
            }
            (P::Postcopy { pushed: true }, E::Finish) => Ok(P::Finished),
            (
                P::Connecting | P::Receiving | P::Received | P::Restoring { .. } | P::Parked,
                E::Failure,
            ) => Ok(P::Failed),
            (P::Postcopy { .. }, E::Failure) => Ok(P::PostcopyPaused),
            // Once over (or paused), later failures (a connection closing) change nothing.
            (
                P::Restored | P::PostcopyPaused | P::Finished | P::Failed | P::Aborted,
                E::Failure,
            ) => Ok(self),
            (
                P::Connecting
                | P::Receiving
                | P::Received
                | P::Restoring { .. }
                | P::Parked
                | P::Failed
                | P::Aborted,
                E::Abort | E::Discard,
            ) => Ok(P::Aborted),
            (P::Restored | P::Postcopy { .. } | P::PostcopyPaused, E::Abort) => {
                Err(PhaseError::WouldLeaveRunningCopy)
            }
            (P::Restored | P::Postcopy { .. } | P::PostcopyPaused, E::Discard) => Ok(P::Aborted),
            _ => Err(PhaseError::Unexpected { phase: self, event }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SessionEvent as E, SessionPhase as P, *};

    /// A session's events up to its guest running here.
    const HANDED_OVER: &[SessionEvent] = &[
        E::Connected,
        E::PagesDone,
        E::Commit,
        E::Restored,
        E::Handover,
    ];

    fn walk(mode: Mode, events: &[SessionEvent]) -> Result<SessionPhase, PhaseError> {
        events
            .iter()
            .try_fold(P::Connecting, |phase, &event| phase.next(event, mode))
    }

    const EVERY_PHASE: [SessionPhase; 13] = [
        P::Connecting,
        P::Receiving,
        P::Received,
        P::Restoring { received: false },
        P::Restoring { received: true },
        P::Parked,
        P::Restored,
        P::Postcopy { pushed: false },
        P::Postcopy { pushed: true },
        P::PostcopyPaused,
        P::Finished,
        P::Failed,
        P::Aborted,
    ];
    const EVERY_EVENT: [SessionEvent; 10] = [
        E::Connected,
        E::PagesDone,
        E::Commit,
        E::Restored,
        E::Handover,
        E::Finish,
        E::Failure,
        E::Abort,
        E::Discard,
        E::Recover,
    ];

    /// Every transition the machine makes, in either mode unless one is named: written out
    /// as a table, independently of `next`, so that an edge added or lost fails here.
    fn expected(phase: SessionPhase, event: SessionEvent, mode: Mode) -> Option<SessionPhase> {
        let handed_over = match mode {
            Mode::Precopy => P::Restored,
            Mode::Hybrid => P::Postcopy { pushed: false },
        };
        let edges: &[(SessionPhase, SessionEvent, SessionPhase)] = &[
            (P::Connecting, E::Connected, P::Receiving),
            (
                P::PostcopyPaused,
                E::Connected,
                P::Postcopy { pushed: false },
            ),
            (
                P::Restoring { received: false },
                E::Connected,
                P::Restoring { received: false },
            ),
            (P::Postcopy { pushed: false }, E::Recover, P::PostcopyPaused),
            (P::Postcopy { pushed: true }, E::Recover, P::PostcopyPaused),
            (P::PostcopyPaused, E::Recover, P::PostcopyPaused),
            (P::Receiving, E::PagesDone, P::Received),
            (
                P::Restoring { received: false },
                E::PagesDone,
                P::Restoring { received: true },
            ),
            (
                P::Postcopy { pushed: false },
                E::PagesDone,
                P::Postcopy { pushed: true },
            ),
            (P::Connecting, E::Commit, P::Restoring { received: false }),
            (P::Receiving, E::Commit, P::Restoring { received: false }),
            (P::Received, E::Commit, P::Restoring { received: true }),
            (P::Restoring { received: true }, E::Restored, P::Parked),
            (P::Parked, E::Handover, handed_over),
            (P::Restored, E::Handover, P::Restored),
            (
                P::Postcopy { pushed: false },
                E::Handover,
                P::Postcopy { pushed: false },
            ),
            (
                P::Postcopy { pushed: true },
                E::Handover,
                P::Postcopy { pushed: true },
            ),
            (P::PostcopyPaused, E::Handover, P::PostcopyPaused),
            (P::Finished, E::Handover, P::Finished),
            (P::Postcopy { pushed: true }, E::Finish, P::Finished),
            (P::Connecting, E::Failure, P::Failed),
            (P::Receiving, E::Failure, P::Failed),
            (P::Received, E::Failure, P::Failed),
            (P::Restoring { received: false }, E::Failure, P::Failed),
            (P::Restoring { received: true }, E::Failure, P::Failed),
            (P::Parked, E::Failure, P::Failed),
            (P::Postcopy { pushed: false }, E::Failure, P::PostcopyPaused),
            (P::Postcopy { pushed: true }, E::Failure, P::PostcopyPaused),
            (P::Restored, E::Failure, P::Restored),
            (P::PostcopyPaused, E::Failure, P::PostcopyPaused),
            (P::Finished, E::Failure, P::Finished),
            (P::Failed, E::Failure, P::Failed),
            (P::Aborted, E::Failure, P::Aborted),
            (P::Restored, E::Discard, P::Aborted),
            (P::Postcopy { pushed: false }, E::Discard, P::Aborted),
            (P::Postcopy { pushed: true }, E::Discard, P::Aborted),
            (P::PostcopyPaused, E::Discard, P::Aborted),
        ];
        // Abort and discard end every session whose guest never ran here.
        let before_the_guest = [
            P::Connecting,
            P::Receiving,
            P::Received,
            P::Restoring { received: false },
            P::Restoring { received: true },
            P::Parked,
            P::Failed,
            P::Aborted,
        ];
        if matches!(event, E::Abort | E::Discard) && before_the_guest.contains(&phase) {
            return Some(P::Aborted);
        }
        edges
            .iter()
            .find(|(from, on, _)| *from == phase && *on == event)
            .map(|(_, _, to)| *to)
    }

    #[test]
    fn every_transition_is_the_one_in_the_table_and_nothing_else_is_taken() {
        let mut taken = 0;
        for mode in [Mode::Precopy, Mode::Hybrid] {
            for phase in EVERY_PHASE {
                for event in EVERY_EVENT {
                    let got = phase.next(event, mode);
                    assert_eq!(
                        got.ok(),
                        expected(phase, event, mode),
                        "{phase:?} on {event:?} in {mode:?}: {got:?}"
                    );
                    taken += usize::from(got.is_ok());
                }
            }
        }
        // 37 edges and 8 phases that abort and discard end, in each mode.
        assert_eq!(taken, 2 * (37 + 16));
    }

    #[test]
    fn finish_waits_through_the_push_and_nowhere_else() {
        let hybrid = Mode::Hybrid;
        assert_eq!(
            P::Postcopy { pushed: false }.may_await(E::Finish, hybrid),
            Ok(())
        );
        assert_eq!(
            P::Postcopy { pushed: true }.may_await(E::Finish, hybrid),
            Ok(())
        );
        for phase in [
            P::Receiving,
            P::Parked,
            P::PostcopyPaused,
            P::Finished,
            P::Aborted,
        ] {
            assert_eq!(
                phase.may_await(E::Finish, hybrid),
                Err(PhaseError::Unexpected {
                    phase,
                    event: E::Finish
                }),
                "{phase:?}"
            );
        }
        // Any other event must fit now.
        assert_eq!(P::Received.may_await(E::Commit, hybrid), Ok(()));
        assert!(P::Parked.may_await(E::Commit, hybrid).is_err());
    }

    #[test]
    fn a_precopy_session_runs_its_course() {
        let done = walk(Mode::Precopy, HANDED_OVER);
        assert_eq!(done, Ok(P::Restored));
        // A handover again (its answer lost) changes nothing.
        assert_eq!(
            P::Restored.next(E::Handover, Mode::Precopy),
            Ok(P::Restored)
        );
        // The commit may arrive before the last pages, and waits for them.
        let early = walk(Mode::Precopy, &[E::Connected, E::Commit]).unwrap();
        assert_eq!(early, P::Restoring { received: false });
        assert!(early.next(E::Restored, Mode::Precopy).is_err());
        let early = early.next(E::PagesDone, Mode::Precopy).unwrap();
        assert_eq!(early.next(E::Restored, Mode::Precopy), Ok(P::Parked));
    }

    #[test]
    fn a_hybrid_session_runs_its_course() {
        let done = walk(
            Mode::Hybrid,
            &[HANDED_OVER, &[E::PagesDone, E::Finish]].concat(),
        );
        assert_eq!(done, Ok(P::Finished));
        // Finish before the push ended is refused; so is a third `Done`.
        let pushing = walk(Mode::Hybrid, HANDED_OVER).unwrap();
        assert!(pushing.next(E::Finish, Mode::Hybrid).is_err());
        let pushed = pushing.next(E::PagesDone, Mode::Hybrid).unwrap();
        assert!(pushed.next(E::PagesDone, Mode::Hybrid).is_err());
    }

    #[test]
    fn a_second_commit_is_refused() {
        for mode in [Mode::Precopy, Mode::Hybrid] {
            let base = [E::Connected, E::PagesDone, E::Commit];
            assert_eq!(
                walk(mode, &[&base[..], &[E::Commit]].concat()),
                Err(PhaseError::SecondCommit {
                    phase: P::Restoring { received: true }
                })
            );
            let restored = walk(mode, &[&base[..], &[E::Restored]].concat()).unwrap();
            assert!(matches!(
                restored.next(E::Commit, mode),
                Err(PhaseError::SecondCommit { .. })
            ));
        }
    }

    #[test]
    fn an_abort_never_leaves_a_running_copy() {
        // Before the guest runs here, an abort ends the session.
        for events in [
            &[][..],
            &[E::Connected],
            &[E::Connected, E::PagesDone],
            &[E::Connected, E::PagesDone, E::Commit],
            &[E::Failure],
        ] {
            assert_eq!(
                walk(Mode::Hybrid, &[events, &[E::Abort]].concat()),
                Ok(P::Aborted),
                "{events:?}"
            );
        }
        // Restored but parked, nothing runs here yet: an abort ends the session, and a
        // handover after it is refused.
        for mode in [Mode::Precopy, Mode::Hybrid] {
            let parked = walk(mode, &[E::Connected, E::PagesDone, E::Commit, E::Restored]).unwrap();
            assert_eq!(parked, P::Parked);
            assert!(!parked.guest_runs_here());
            let aborted = parked.next(E::Abort, mode).unwrap();
            assert!(aborted.next(E::Handover, mode).is_err());
        }
        // Once handed over, an abort is refused until the guest is stopped.
        for mode in [Mode::Precopy, Mode::Hybrid] {
            let restored = walk(mode, HANDED_OVER).unwrap();
            assert!(restored.guest_runs_here());
            assert_eq!(
                restored.next(E::Abort, mode),
                Err(PhaseError::WouldLeaveRunningCopy)
            );
            assert_eq!(restored.next(E::Discard, mode), Ok(P::Aborted));
        }
        let failed_after = walk(Mode::Hybrid, &[HANDED_OVER, &[E::Failure]].concat()).unwrap();
        assert_eq!(failed_after, P::PostcopyPaused);
        assert!(failed_after.guest_runs_here());
        assert_eq!(
            failed_after.next(E::Abort, Mode::Hybrid),
            Err(PhaseError::WouldLeaveRunningCopy)
        );
    }

    #[test]
    fn a_broken_postcopy_pauses_and_recovers() {
        let pushing = walk(Mode::Hybrid, HANDED_OVER).unwrap();
        // Broken, or recovered before the destination noticed: paused either way.
        let paused = pushing.next(E::Failure, Mode::Hybrid).unwrap();
        assert_eq!(pushing.next(E::Recover, Mode::Hybrid), Ok(paused));
        let pushed = pushing.next(E::PagesDone, Mode::Hybrid).unwrap();
        assert_eq!(pushed.next(E::Recover, Mode::Hybrid), Ok(paused));
        // Paused, nothing finishes, and another recover re-arms it.
        assert!(paused.next(E::Finish, Mode::Hybrid).is_err());
        assert!(paused.next(E::PagesDone, Mode::Hybrid).is_err());
        assert_eq!(paused.next(E::Recover, Mode::Hybrid), Ok(paused));
        assert_eq!(paused.next(E::Failure, Mode::Hybrid), Ok(paused));
        // The new connections: the push goes on, and ends as before.
        let resumed = paused.next(E::Connected, Mode::Hybrid).unwrap();
        assert_eq!(resumed, P::Postcopy { pushed: false });
        let done = walk_from(resumed, &[E::PagesDone, E::Finish]);
        assert_eq!(done, Ok(P::Finished));
        // A finished session, or one before the handover, recovers nothing.
        assert!(P::Finished.next(E::Recover, Mode::Hybrid).is_err());
        assert!(P::Parked.next(E::Recover, Mode::Hybrid).is_err());
        assert!(P::Restored.next(E::Recover, Mode::Precopy).is_err());
    }

    fn walk_from(phase: SessionPhase, events: &[SessionEvent]) -> Result<SessionPhase, PhaseError> {
        events
            .iter()
            .try_fold(phase, |phase, &event| phase.next(event, Mode::Hybrid))
    }

    #[test]
    fn events_out_of_place_are_refused() {
        assert!(P::Connecting.next(E::PagesDone, Mode::Precopy).is_err());
        assert!(P::Receiving.next(E::Connected, Mode::Precopy).is_err());
        assert!(P::Received.next(E::Finish, Mode::Precopy).is_err());
        assert!(P::Restored.next(E::Finish, Mode::Precopy).is_err());
        assert!(P::Receiving.next(E::Restored, Mode::Hybrid).is_err());
        // No handover before the commit restored the partition.
        assert!(P::Receiving.next(E::Handover, Mode::Precopy).is_err());
        assert!(
            P::Restoring { received: true }
                .next(E::Handover, Mode::Hybrid)
                .is_err()
        );
        assert!(P::Aborted.next(E::Commit, Mode::Hybrid).is_err());
        assert!(P::Failed.next(E::Commit, Mode::Hybrid).is_err());
        assert!(P::Finished.next(E::PagesDone, Mode::Hybrid).is_err());
        // A failure once the session is over changes nothing.
        assert_eq!(P::Restored.next(E::Failure, Mode::Precopy), Ok(P::Restored));
    }
}
