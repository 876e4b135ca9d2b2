//! What users see of a partition: its state, derived from the partition's request and what
//! its vCPUs report (never stored twice), and its progress, read from the guest's boot-info
//! page without stopping anything.

use migrator_guest::Progress;
use serde::{Deserialize, Serialize};

use super::{
    layout,
    partition::Partition,
    vcpu::{Request, VcpuStatus},
};

/// A partition's lifecycle state, as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionState {
    Running,
    Paused,
    Stopped,
    Migrating,
    /// Paused after a migration whose outcome could not be learnt: neither resumed nor
    /// discarded until `reconcile` asks the destination (`PartitionStatus::awaiting_handover`
    /// says which).
    #[serde(rename = "awaiting-handover")]
    AwaitingHandover,
    /// Paused after a hybrid migration whose post-copy broke and was not recovered in its
    /// window: the guest runs on the destination on the pages it has, and this copy holds the
    /// rest (`PartitionStatus::postcopy_paused` says where). `migrate --resume` pushes them.
    #[serde(rename = "postcopy-paused")]
    PostcopyPaused,
    Crashed,
}

impl PartitionState {
    /// The state's name as `status --json` spells it (`running`, `postcopy-paused`, ...).
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{self:?}"))
    }
}

/// The post-copy a partition's copy is kept for: the destination daemon and its session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyPaused {
    pub peer: String,
    pub session: u64,
    /// The partition's id there.
    pub id_on_destination: Option<String>,
}

/// The migration a partition awaits the handover of: the destination daemon and its session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwaitingHandover {
    pub peer: String,
    pub session: u64,
    /// A hybrid migration: the destination's copy depends on this one's pages.
    pub postcopy: bool,
}

/// A point-in-time view of a partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub state: PartitionState,
    /// Progress summed over vCPUs.
    pub progress: Progress,
    /// Per-vCPU progress.
    pub vcpu_progress: Vec<Progress>,
    /// Why it crashed, if it did.
    pub crash_reason: Option<String>,
    /// Exit codes of vCPUs that called the exit hypercall.
    pub exit_codes: Vec<u64>,
    /// Self-check failures reported through the hypercall.
    pub check_failures: u64,
    /// Recent console output.
    pub console: String,
    /// The migration whose handover it awaits, in state `awaiting-handover`.
    pub awaiting_handover: Option<AwaitingHandover>,
    /// The post-copy it holds the pages of, in state `postcopy-paused`.
    pub postcopy_paused: Option<PostcopyPaused>,
}

impl Partition {
    /// Marks the partition as being migrated (or not), for what users see.
    pub fn set_migrating(&self, migrating: bool) {
        *self.migrating.lock().unwrap_or_else(|p| p.into_inner()) = migrating;
    }

    /// Marks the (paused) partition as awaiting the handover of a migration, or no longer:
    /// while it does, it refuses to resume.
    pub fn set_awaiting_handover(&self, handover: Option<AwaitingHandover>) {
        *self.handover.lock().unwrap_or_else(|p| p.into_inner()) = handover;
    }

    pub fn awaiting_handover(&self) -> Option<AwaitingHandover> {
        self.handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks the (paused) partition as holding the pages of a paused post-copy, or no
    /// longer: while it does, it refuses to resume, since the guest runs on the destination.
    pub fn set_postcopy_paused(&self, paused: Option<PostcopyPaused>) {
        *self
            .postcopy_paused
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = paused;
    }

    pub fn postcopy_paused(&self) -> Option<PostcopyPaused> {
        self.postcopy_paused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current state, derived from the request and what the vCPUs say.
    pub fn state(&self) -> PartitionState {
        let state = self.control.lock();
        let crashed = state
            .vcpus
            .iter()
            .any(|s| matches!(s, VcpuStatus::Crashed(_)));
        if crashed {
            return PartitionState::Crashed;
        }
        let all_done = state
            .vcpus
            .iter()
            .all(|s| matches!(s, VcpuStatus::Exited(_) | VcpuStatus::Stopped));
        if state.request == Request::Stop || all_done {
            return PartitionState::Stopped;
        }
        if *self.migrating.lock().unwrap_or_else(|p| p.into_inner()) {
            return PartitionState::Migrating;
        }
        if self.awaiting_handover().is_some() {
            return PartitionState::AwaitingHandover;
        }
        if self.postcopy_paused().is_some() {
            return PartitionState::PostcopyPaused;
        }
        match state.request {
            Request::Pause => PartitionState::Paused,
            _ => PartitionState::Running,
        }
    }

    /// The progress of all vCPUs together: see [`total`].
    pub fn total_progress(&self) -> Progress {
        total(&self.progress())
    }

    /// Reads each vCPU's progress from the boot-info page, without stopping anything. Where
    /// that page is not there (post-copy, before it arrives) the last reading stands in:
    /// reading it would wait for the page, and the thread that serves the handover, or a
    /// status call, must never wait on one.
    pub fn progress(&self) -> Vec<Progress> {
        let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
        last.resize(self.config.vcpus as usize, Progress::default());
        for (i, kept) in last.iter_mut().enumerate() {
            let at = layout::progress_address(i as u32);
            let word = |n: u64| {
                self.memory
                    .read_u64_if_present(at.offset(8 * n).unwrap_or(at))
                    .ok()
                    .flatten()
            };
            let read = (|| {
                Some(Progress {
                    ops: word(0)?,
                    errors: word(1)?,
                    checks: word(2)?,
                    heartbeat: word(3)?,
                })
            })();
            if let Some(read) = read {
                *kept = read;
            }
        }
        last.clone()
    }

    pub fn status(&self) -> PartitionStatus {
        let vcpu_progress = self.progress();
        let progress = total(&vcpu_progress);
        let state = self.state();
        let control = self.control.lock();
        let crash_reason = control.vcpus.iter().enumerate().find_map(|(i, s)| match s {
            VcpuStatus::Crashed(reason) => Some(format!("vCPU {i}: {reason}")),
            _ => None,
        });
        let exit_codes = control
            .vcpus
            .iter()
            .filter_map(|s| match s {
                VcpuStatus::Exited(code) => Some(*code),
                _ => None,
            })
            .collect();
        PartitionStatus {
            state,
            progress,
            vcpu_progress,
            crash_reason,
            exit_codes,
            check_failures: control.check_failures,
            console: String::from_utf8_lossy(&control.console).into_owned(),
            awaiting_handover: self.awaiting_handover(),
            postcopy_paused: self.postcopy_paused(),
        }
    }
}

/// Per-vCPU progress summed (the heartbeat is the latest). The guest writes these words, so
/// the sums saturate rather than overflow.
pub fn total(progress: &[Progress]) -> Progress {
    progress
        .iter()
        .fold(Progress::default(), |sum, p| Progress {
            ops: sum.ops.saturating_add(p.ops),
            errors: sum.errors.saturating_add(p.errors),
            checks: sum.checks.saturating_add(p.checks),
            heartbeat: sum.heartbeat.max(p.heartbeat),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_and_saturate_on_words_the_guest_wrote() {
        let p = |ops, errors, checks, heartbeat| Progress {
            ops,
            errors,
            checks,
            heartbeat,
        };
        let sum = total(&[p(3, 1, 2, 9), p(4, 0, 5, 7)]);
        assert_eq!(
            (sum.ops, sum.errors, sum.checks, sum.heartbeat),
            (7, 1, 7, 9)
        );
        let sum = total(&[p(u64::MAX, 0, 0, 0), p(5, u64::MAX, 1, 0), p(0, 1, 0, 0)]);
        assert_eq!((sum.ops, sum.errors), (u64::MAX, u64::MAX));
        assert_eq!(total(&[]).ops, 0);
    }
}
