//! The phases of an outgoing migration and the one function that moves between them, as
//! the destination's `SessionPhase` does: an event that does not fit the phase is refused
//! with a typed error, and nothing changes. What a failure rolls back, whether the migration
//! can still be cancelled, and the phase users see all follow from the phase alone.
//!
//! ```text
//!  Preparing ─prepared─▶ Setup ─profile─▶ Profiling
//!                          │                 │
//!                          └────round 0──────┴──▶ Precopy ─pause─▶ StopAndCopy
//!                                                                      │ committed
//!                                  ┌──────────── unanswered ──────── HandingOver
//!                                  ▼                                   │ handed over
//!                              Undecided                 pre-copy ◀────┴────▶ hybrid
//!  StopAndCopy ─unanswered─▶ Undecided                   Completed          Postcopy
//!                                                                 ┌─broke─────┘ ▲ │
//!                                                        PostcopyPaused ─recovered┘ │ finished
//!                                                                                    ▼
//!                                                                                Completed
//!  any phase but Completed and Failed ─fail─▶ Failed (after the rollback of the phase it left)
//! ```
//!
//! The point of no return is the handover: from `HandingOver` on, the destination may run
//! the guest, so the source never resumes on its own and a cancel is refused.

use thiserror::Error;

use crate::migration::report::{Mode, Phase};

/// Where the source is in a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePhase {
    /// Asking the destination to prepare: nothing exists there yet.
    Preparing,
    /// The destination holds session `session`; the data connections open and the dirty log
    /// starts.
    Setup { session: u64 },
    /// The heat profile runs before round 0.
    Profiling { session: u64 },
    /// The rounds: pages flow while the guest runs here.
    Precopy { session: u64 },
    /// Paused here, the last pages and the state on their way; the destination has not
    /// answered the commit.
    StopAndCopy { session: u64 },
    /// The destination restored the partition parked; the source, its copy stopped for good,
    /// asks it to run.
    HandingOver { session: u64 },
    /// A commit or handover went unanswered: the destination may run the guest or not. The
    /// source neither resumes nor discards its copy until a reconcile learns which.
    Undecided { session: u64 },
    /// Hybrid: the destination runs the guest from the pages it has; ours is the only
    /// complete copy.
    Postcopy { session: u64 },
    /// Hybrid: a connection broke after the handover; the source tries to recover it.
    PostcopyPaused { session: u64 },
    /// The destination runs the partition with every page.
    Completed,
    /// The migration failed, and what its phase called for was rolled back.
    Failed,
}

/// What happens to an outgoing migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// The destination prepared session `session`.
    Prepared { session: u64 },
    /// The heat profile starts.
    Profile,
    /// Round 0 starts.
    Round0,
    /// The partition pauses for the cutover.
    Pause,
    /// The destination restored the partition, parked.
    Committed,
    /// The destination runs the partition.
    HandedOver,
    /// The commit or the handover went unanswered.
    Unanswered,
    /// Hybrid: a connection broke after the handover.
    Broke,
    /// Hybrid: new connections replace the broken ones.
    Recovered,
    /// Hybrid: every page is at the destination.
    Finished,
    /// The migration failed (or was cancelled).
    Fail,
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SourcePhaseError {
    #[error("{event:?} does not fit an outgoing migration that is {phase:?}")]
    Unexpected {
        phase: SourcePhase,
        event: SourceEvent,
    },
}

/// What undoing a failed migration takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rollback {
    /// Resume the partition here; abort the destination's session, if it has one.
    Resume { abort: Option<u64> },
    /// Keep the partition paused here, every page intact, marked as holding the pages of
    /// session `session`'s post-copy: the guest already runs on the destination.
    KeepPaused { session: u64 },
    /// Keep the partition paused here, marked as awaiting the handover of `session`: whether
    /// the destination runs it is unknown.
    AwaitHandover { session: u64 },
}

impl SourcePhase {
    /// The phase `event` leads to in a migration of `mode`, or why it is refused.
    pub fn next(self, event: SourceEvent, mode: Mode) -> Result<Self, SourcePhaseError> {
        use SourceEvent as E;
        use SourcePhase as P;
        match (self, event) {
            (P::Preparing, E::Prepared { session }) => Ok(P::Setup { session }),
            (P::Setup { session }, E::Profile) => Ok(P::Profiling { session }),
            (P::Setup { session } | P::Profiling { session }, E::Round0) => {
                Ok(P::Precopy { session })
            }
            (P::Precopy { session }, E::Pause) => Ok(P::StopAndCopy { session }),
            (P::StopAndCopy { session }, E::Committed) => Ok(P::HandingOver { session }),
            (P::StopAndCopy { session } | P::HandingOver { session }, E::Unanswered) => {
                Ok(P::Undecided { session })
            }
            (P::HandingOver { session }, E::HandedOver) => Ok(match mode {
                Mode::Precopy => P::Completed,
                Mode::Hybrid => P::Postcopy { session },
            }),
            (P::Postcopy { session }, E::Broke) => Ok(P::PostcopyPaused { session }),
            (P::PostcopyPaused { session }, E::Recovered) => Ok(P::Postcopy { session }),
            // Only the answer to `finish` was lost: the recovery learns it is over.
            (P::Postcopy { .. } | P::PostcopyPaused { .. }, E::Finished) => Ok(P::Completed),
            (P::Completed | P::Failed, E::Fail) => {
                Err(SourcePhaseError::Unexpected { phase: self, event })
            }
            (_, E::Fail) => Ok(P::Failed),
            _ => Err(SourcePhaseError::Unexpected { phase: self, event }),
        }
    }

    /// The session the destination holds, if it holds one.
    pub fn session(self) -> Option<u64> {
        match self {
            Self::Setup { session }
            | Self::Profiling { session }
            | Self::Precopy { session }
            | Self::StopAndCopy { session }
            | Self::HandingOver { session }
            | Self::Undecided { session }
            | Self::Postcopy { session }
            | Self::PostcopyPaused { session } => Some(session),
            Self::Preparing | Self::Completed | Self::Failed => None,
        }
    }

    /// The rollback for a failure in this phase. Before the handover (and on its refusal,
    /// which says the destination runs nothing of it) the partition resumes here; when a
    /// commit or handover goes unanswered it stays paused, awaiting the handover; after the
    /// handover of a post-copy it stays paused with the pages the destination lacks.
    pub fn rollback(self) -> Option<Rollback> {
        match self {
            Self::Preparing => Some(Rollback::Resume { abort: None }),
            Self::Setup { session }
            | Self::Profiling { session }
            | Self::Precopy { session }
            | Self::StopAndCopy { session }
            | Self::HandingOver { session } => Some(Rollback::Resume {
                abort: Some(session),
            }),
            Self::Undecided { session } => Some(Rollback::AwaitHandover { session }),
            Self::Postcopy { session } | Self::PostcopyPaused { session } => {
                Some(Rollback::KeepPaused { session })
            }
            Self::Completed | Self::Failed => None,
        }
    }

    /// Whether a cancel may still undo the migration: only before the handover is asked for,
    /// after which the destination may run the guest.
    pub fn cancellable(self) -> bool {
        matches!(
            self,
            Self::Preparing
                | Self::Setup { .. }
                | Self::Profiling { .. }
                | Self::Precopy { .. }
                | Self::StopAndCopy { .. }
        )
    }

    /// Whether the migration is over, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }

    /// The phase's name as `migrator migrations` shows it (`precopy`, `handing-over`, ...).
    pub fn name(self) -> String {
        match self {
            Self::Preparing => "preparing",
            Self::Setup { .. } => "setup",
            Self::Profiling { .. } => "profiling",
            Self::Precopy { .. } => "precopy",
            Self::StopAndCopy { .. } => "stop-and-copy",
            Self::HandingOver { .. } => "handing-over",
            Self::Undecided { .. } => "undecided",
            Self::Postcopy { .. } => "postcopy",
            Self::PostcopyPaused { .. } => "postcopy-paused",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
        .into()
    }

    /// The phase users see (`migration_progress`, the dashboard).
    pub fn shown(self) -> Phase {
        match self {
            Self::Preparing | Self::Setup { .. } => Phase::Setup,
            Self::Profiling { .. } => Phase::Profiling,
            Self::Precopy { .. } => Phase::Precopy,
            Self::StopAndCopy { .. } | Self::HandingOver { .. } | Self::Undecided { .. } => {
                Phase::StopAndCopy
            }
            Self::Postcopy { .. } => Phase::Postcopy,
            Self::PostcopyPaused { .. } => Phase::PostcopyPaused,
            Self::Completed => Phase::Completed,
            Self::Failed => Phase::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SourceEvent as E, SourcePhase as P, *};

    const S: u64 = 7;

    fn walk(mode: Mode, events: &[SourceEvent]) -> Result<SourcePhase, SourcePhaseError> {
        events
            .iter()
            .try_fold(P::Preparing, |phase, &event| phase.next(event, mode))
    }

    /// Every phase, with the events that reach it from `Preparing` in hybrid mode.
    fn every_phase() -> Vec<(SourcePhase, Vec<SourceEvent>)> {
        let prepared = E::Prepared { session: S };
        let to_precopy = vec![prepared, E::Round0];
        let at = |extra: &[SourceEvent]| [to_precopy.clone(), extra.to_vec()].concat();
        vec![
            (P::Preparing, vec![]),
            (P::Setup { session: S }, vec![prepared]),
            (P::Profiling { session: S }, vec![prepared, E::Profile]),
            (P::Precopy { session: S }, to_precopy.clone()),
            (P::StopAndCopy { session: S }, at(&[E::Pause])),
            (P::HandingOver { session: S }, at(&[E::Pause, E::Committed])),
            (P::Undecided { session: S }, at(&[E::Pause, E::Unanswered])),
            (
                P::Postcopy { session: S },
                at(&[E::Pause, E::Committed, E::HandedOver]),
            ),
            (
                P::PostcopyPaused { session: S },
                at(&[E::Pause, E::Committed, E::HandedOver, E::Broke]),
            ),
            (
                P::Completed,
                at(&[E::Pause, E::Committed, E::HandedOver, E::Finished]),
            ),
            (P::Failed, vec![E::Fail]),
        ]
    }

    #[test]
    fn every_phase_is_reached_by_its_events() {
        for (phase, events) in every_phase() {
            assert_eq!(walk(Mode::Hybrid, &events), Ok(phase), "{events:?}");
        }
    }

    #[test]
    fn a_precopy_migration_completes_at_the_handover() {
        let events = [
            E::Prepared { session: S },
            E::Profile,
            E::Round0,
            E::Pause,
            E::Committed,
            E::HandedOver,
        ];
        assert_eq!(walk(Mode::Precopy, &events), Ok(P::Completed));
        assert_eq!(walk(Mode::Hybrid, &events), Ok(P::Postcopy { session: S }));
    }

    #[test]
    fn post_copy_pauses_and_recovers_as_often_as_it_breaks() {
        let mut phase = P::Postcopy { session: S };
        for _ in 0..3 {
            phase = phase.next(E::Broke, Mode::Hybrid).unwrap();
            assert_eq!(phase, P::PostcopyPaused { session: S });
            phase = phase.next(E::Recovered, Mode::Hybrid).unwrap();
        }
        assert_eq!(phase.next(E::Finished, Mode::Hybrid), Ok(P::Completed));
        // A recovery that finds the destination finished ends it too.
        assert_eq!(
            P::PostcopyPaused { session: S }.next(E::Finished, Mode::Hybrid),
            Ok(P::Completed)
        );
    }

    #[test]
    fn every_rollback_follows_from_the_phase_failed_in() {
        let resume = Rollback::Resume { abort: Some(S) };
        let expected = [
            (P::Preparing, Some(Rollback::Resume { abort: None })),
            (P::Setup { session: S }, Some(resume)),
            (P::Profiling { session: S }, Some(resume)),
            (P::Precopy { session: S }, Some(resume)),
            (P::StopAndCopy { session: S }, Some(resume)),
            // A refused handover says nothing of it runs there: the source resumes.
            (P::HandingOver { session: S }, Some(resume)),
            (
                P::Undecided { session: S },
                Some(Rollback::AwaitHandover { session: S }),
            ),
            (
                P::Postcopy { session: S },
                Some(Rollback::KeepPaused { session: S }),
            ),
            (
                P::PostcopyPaused { session: S },
                Some(Rollback::KeepPaused { session: S }),
            ),
            (P::Completed, None),
            (P::Failed, None),
        ];
        for (phase, rollback) in expected {
            assert_eq!(phase.rollback(), rollback, "{phase:?}");
        }
        // Every phase has its row.
        assert_eq!(expected.len(), every_phase().len());
    }

    #[test]
    fn every_phase_but_the_final_ones_can_fail_once() {
        for (phase, _) in every_phase() {
            let failed = phase.next(E::Fail, Mode::Hybrid);
            if phase.is_final() {
                assert!(failed.is_err(), "{phase:?} failed again");
            } else {
                assert_eq!(failed, Ok(P::Failed), "{phase:?}");
            }
        }
    }

    #[test]
    fn a_cancel_is_possible_only_before_the_handover() {
        for (phase, _) in every_phase() {
            let before = matches!(
                phase,
                P::Preparing
                    | P::Setup { .. }
                    | P::Profiling { .. }
                    | P::Precopy { .. }
                    | P::StopAndCopy { .. }
            );
            assert_eq!(phase.cancellable(), before, "{phase:?}");
            // Whatever can be cancelled rolls back to a resume here.
            if phase.cancellable() {
                assert!(matches!(phase.rollback(), Some(Rollback::Resume { .. })));
            }
        }
    }

    #[test]
    fn events_out_of_order_are_refused_and_change_nothing() {
        let all = [
            E::Prepared { session: S },
            E::Profile,
            E::Round0,
            E::Pause,
            E::Committed,
            E::HandedOver,
            E::Unanswered,
            E::Broke,
            E::Recovered,
            E::Finished,
            E::Fail,
        ];
        let mut accepted = 0;
        for (phase, _) in every_phase() {
            for event in all {
                match phase.next(event, Mode::Hybrid) {
                    Ok(_) => accepted += 1,
                    Err(e) => assert_eq!(e, SourcePhaseError::Unexpected { phase, event }),
                }
            }
        }
        // The diagram's edges, counted by hand: 13 forward (Setup and Profiling both start
        // round 0; StopAndCopy and HandingOver both go undecided; Postcopy and
        // PostcopyPaused both finish) and a failure from each of the 9 phases not final.
        assert_eq!(accepted, 13 + 9);
        assert!(
            P::Precopy { session: S }
                .next(E::Committed, Mode::Hybrid)
                .is_err()
        );
        assert!(P::Completed.next(E::Round0, Mode::Precopy).is_err());
        assert!(
            P::Undecided { session: S }
                .next(E::HandedOver, Mode::Precopy)
                .is_err()
        );
    }

    #[test]
    fn the_shown_phase_is_derived_from_this_one() {
        assert_eq!(P::Setup { session: S }.shown(), Phase::Setup);
        assert_eq!(P::Profiling { session: S }.shown(), Phase::Profiling);
        assert_eq!(P::HandingOver { session: S }.shown(), Phase::StopAndCopy);
        assert_eq!(
            P::PostcopyPaused { session: S }.shown(),
            Phase::PostcopyPaused
        );
        for (phase, _) in every_phase() {
            assert_eq!(phase.shown().is_final(), phase.is_final(), "{phase:?}");
        }
    }
}
