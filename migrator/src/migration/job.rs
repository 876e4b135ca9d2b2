//! A running outgoing migration as a job: its id, the progress it shows, and how an operator
//! steers it while it runs (libvirt's `domjobinfo`, `domjobabort` and
//! `migrate-setmaxdowntime`; QEMU's `migrate_cancel`, `migrate-set-parameters` and
//! `migrate-start-postcopy`).
//!
//! The engine owns the job for the migration's whole life; whoever started it only holds a
//! handle. Steering is a request the engine takes up at its next step (between batches of
//! pages, or before the handover), so it never races the engine's own transitions: a cancel
//! that comes after the point of no return is refused by the engine's phase, not by a lock.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    report::{MigrationProgress, Mode},
    source::{SourceEvent, SourcePhase, SourcePhaseError},
};

/// Limits an operator changes while a migration runs; a field left `None` is unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveLimits {
    pub downtime_limit: Option<Duration>,
    /// Bytes per second; `Some(0)` lifts the limit.
    pub bandwidth_limit: Option<u64>,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SteerError {
    #[error("the downtime limit must be positive")]
    NoDowntime,
    #[error(
        "the migration is past its handover ({phase:?}): the destination may run the guest, so \
         it can no longer be cancelled"
    )]
    PastHandover { phase: SourcePhase },
    #[error("the migration is over ({phase:?})")]
    Over { phase: SourcePhase },
    #[error("only a hybrid migration switches to post-copy")]
    NotHybrid,
    #[error("the migration is past its rounds ({phase:?}): there is nothing left to switch")]
    PastRounds { phase: SourcePhase },
}

impl LiveLimits {
    pub fn validate(&self) -> Result<(), SteerError> {
        if self.downtime_limit.is_some_and(|d| d.is_zero()) {
            return Err(SteerError::NoDowntime);
        }
        Ok(())
    }
}

/// One outgoing migration, shared by the engine that runs it and whoever watches or steers
/// it.
#[derive(Debug)]
pub struct Job {
    id: String,
    progress: Mutex<MigrationProgress>,
    control: Mutex<Control>,
}

/// The engine's phase and what an operator asked of it, under one lock: a cancel is taken or
/// refused against the phase the engine is in at that instant, so a cancel never lands
/// after the point of no return unnoticed.
#[derive(Debug)]
struct Control {
    phase: SourcePhase,
    cancel: bool,
    postcopy_now: bool,
    limits: Option<LiveLimits>,
}

/// Why the engine may not take a step.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StepError {
    #[error(transparent)]
    Phase(#[from] SourcePhaseError),
    /// The step would pass the point of no return, and a cancel came first.
    #[error("the migration was cancelled")]
    Cancelled,
}

impl Job {
    pub fn new(id: String) -> Self {
        Self {
            id,
            progress: Mutex::new(MigrationProgress::default()),
            control: Mutex::new(Control {
                phase: SourcePhase::Preparing,
                cancel: false,
                postcopy_now: false,
                limits: None,
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn progress(&self) -> MigrationProgress {
        self.progress_mut().clone()
    }

    pub(crate) fn progress_mut(&self) -> MutexGuard<'_, MigrationProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job resumes a post-copy paused after its handover (`migrate --resume`): it starts
    /// where that one stopped.
    pub(crate) fn start_paused_postcopy(&self, session: u64) {
        self.control().phase = SourcePhase::PostcopyPaused { session };
    }

    /// The engine's phase now.
    pub fn phase(&self) -> SourcePhase {
        self.control().phase
    }

    /// The engine moves on by `event`. Refused if it does not fit the phase, and if it would
    /// pass the point of no return after a cancel was taken.
    pub(crate) fn step(&self, event: SourceEvent, mode: Mode) -> Result<SourcePhase, StepError> {
        let mut control = self.control();
        let next = control.phase.next(event, mode)?;
        let settles = matches!(event, SourceEvent::Fail | SourceEvent::Unanswered);
        if control.cancel && control.phase.cancellable() && !next.cancellable() && !settles {
            return Err(StepError::Cancelled);
        }
        control.phase = next;
        Ok(next)
    }

    /// Asks the engine to give up and roll back, which it does at its next step. Refused once
    /// the migration is past its handover, or over.
    pub fn request_cancel(&self) -> Result<(), SteerError> {
        let mut control = self.control();
        let phase = control.phase;
        if phase.is_final() {
            return Err(SteerError::Over { phase });
        }
        if !phase.cancellable() {
            return Err(SteerError::PastHandover { phase });
        }
        control.cancel = true;
        Ok(())
    }

    /// Whether a cancel was taken and the engine can still honour it.
    pub(crate) fn cancel_requested(&self) -> bool {
        let control = self.control();
        control.cancel && control.phase.cancellable()
    }

    /// Asks a hybrid migration to cut over to post-copy at its next check. Refused once it
    /// is past its rounds.
    pub fn request_postcopy(&self, mode: Mode) -> Result<(), SteerError> {
        if mode != Mode::Hybrid {
            return Err(SteerError::NotHybrid);
        }
        let mut control = self.control();
        let phase = control.phase;
        if phase.is_final() {
            return Err(SteerError::Over { phase });
        }
        if !matches!(
            phase,
            SourcePhase::Preparing
                | SourcePhase::Setup { .. }
                | SourcePhase::Profiling { .. }
                | SourcePhase::Precopy { .. }
        ) {
            return Err(SteerError::PastRounds { phase });
        }
        control.postcopy_now = true;
        Ok(())
    }

    pub(crate) fn postcopy_requested(&self) -> bool {
        self.control().postcopy_now
    }

    /// New limits for the engine to take up at its next step (merged with any not yet
    /// taken). Refused from the handover on: the downtime is spent by then, and the post-copy
    /// push keeps the pace it started at.
    pub fn request_limits(&self, limits: LiveLimits) -> Result<(), SteerError> {
        limits.validate()?;
        let mut control = self.control();
        let phase = control.phase;
        if phase.is_final() {
            return Err(SteerError::Over { phase });
        }
        if !phase.cancellable() {
            return Err(SteerError::PastHandover { phase });
        }
        let merged = control.limits.get_or_insert_with(LiveLimits::default);
        if limits.downtime_limit.is_some() {
            merged.downtime_limit = limits.downtime_limit;
        }
        if limits.bandwidth_limit.is_some() {
            merged.bandwidth_limit = limits.bandwidth_limit;
        }
        Ok(())
    }

    /// The limits asked for since the last call, if any.
    pub(crate) fn take_limits(&self) -> Option<LiveLimits> {
        self.control().limits.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_asked_for_twice_before_the_engine_looks_are_merged() {
        let job = Job::new("m1".into());
        assert_eq!(job.take_limits(), None);
        job.request_limits(LiveLimits {
            downtime_limit: Some(Duration::from_millis(50)),
            bandwidth_limit: None,
        })
        .unwrap();
        job.request_limits(LiveLimits {
            downtime_limit: None,
            bandwidth_limit: Some(1 << 20),
        })
        .unwrap();
        assert_eq!(
            job.take_limits(),
            Some(LiveLimits {
                downtime_limit: Some(Duration::from_millis(50)),
                bandwidth_limit: Some(1 << 20),
            })
        );
        // Taken once.
        assert_eq!(job.take_limits(), None);
    }

    #[test]
    fn a_zero_downtime_limit_is_refused() {
        let zero = LiveLimits {
            downtime_limit: Some(Duration::ZERO),
            bandwidth_limit: None,
        };
        assert_eq!(zero.validate(), Err(SteerError::NoDowntime));
        assert_eq!(
            Job::new("m".into()).request_limits(zero),
            Err(SteerError::NoDowntime)
        );
        assert_eq!(LiveLimits::default().validate(), Ok(()));
    }

    fn job_in(events: &[SourceEvent]) -> Job {
        let job = Job::new("m1".into());
        for &event in events {
            job.step(event, Mode::Hybrid).unwrap();
        }
        job
    }

    const TO_PRECOPY: [SourceEvent; 2] =
        [SourceEvent::Prepared { session: 3 }, SourceEvent::Round0];

    #[test]
    fn a_cancel_before_the_handover_stops_the_engine_at_its_next_step() {
        let job = job_in(&TO_PRECOPY);
        assert!(!job.cancel_requested());
        job.request_cancel().unwrap();
        assert!(job.cancel_requested());
        // Steps that keep the migration undoable go on (the engine sees the cancel at its
        // next look), the one past the point of no return is refused.
        job.step(SourceEvent::Pause, Mode::Hybrid).unwrap();
        assert_eq!(
            job.step(SourceEvent::Committed, Mode::Hybrid),
            Err(StepError::Cancelled)
        );
        assert_eq!(job.phase(), SourcePhase::StopAndCopy { session: 3 });
        // Failing, the rollback's step, is never refused.
        assert_eq!(
            job.step(SourceEvent::Fail, Mode::Hybrid),
            Ok(SourcePhase::Failed)
        );
    }

    #[test]
    fn a_cancel_after_the_handover_or_the_end_is_refused_and_changes_nothing() {
        let job = job_in(&[
            TO_PRECOPY[0],
            TO_PRECOPY[1],
            SourceEvent::Pause,
            SourceEvent::Committed,
        ]);
        assert!(matches!(
            job.request_cancel(),
            Err(SteerError::PastHandover { .. })
        ));
        assert!(!job.cancel_requested());
        assert!(matches!(
            job.request_limits(LiveLimits::default()),
            Err(SteerError::PastHandover { .. })
        ));
        assert!(matches!(
            job.request_postcopy(Mode::Hybrid),
            Err(SteerError::PastRounds { .. })
        ));
        job.step(SourceEvent::HandedOver, Mode::Hybrid).unwrap();
        job.step(SourceEvent::Finished, Mode::Hybrid).unwrap();
        assert!(matches!(job.request_cancel(), Err(SteerError::Over { .. })));
        assert!(matches!(
            job.request_limits(LiveLimits::default()),
            Err(SteerError::Over { .. })
        ));
    }

    #[test]
    fn only_a_hybrid_migration_switches_to_post_copy() {
        let job = job_in(&TO_PRECOPY);
        assert_eq!(
            job.request_postcopy(Mode::Precopy),
            Err(SteerError::NotHybrid)
        );
        assert!(!job.postcopy_requested());
        job.request_postcopy(Mode::Hybrid).unwrap();
        assert!(job.postcopy_requested());
    }
}
