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
    Crashed,
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
}

impl Partition {
    /// Marks the partition as being migrated (or not), for what users see.
    pub fn set_migrating(&self, migrating: bool) {
        *self.migrating.lock().unwrap_or_else(|p| p.into_inner()) = migrating;
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
        match state.request {
            Request::Pause => PartitionState::Paused,
            _ => PartitionState::Running,
        }
    }

    /// Reads each vCPU's progress from the boot-info page, without stopping anything.
    pub fn progress(&self) -> Vec<Progress> {
        (0..self.config.vcpus)
            .map(|i| {
                let at = layout::progress_address(i);
                let word = |n: u64| {
                    self.memory
                        .read_u64_volatile(at.offset(8 * n).unwrap_or(at))
                        .unwrap_or_default()
                };
                Progress {
                    ops: word(0),
                    errors: word(1),
                    checks: word(2),
                    heartbeat: word(3),
                }
            })
            .collect()
    }

    pub fn status(&self) -> PartitionStatus {
        let vcpu_progress = self.progress();
        let progress = vcpu_progress
            .iter()
            .fold(Progress::default(), |sum, p| Progress {
                ops: sum.ops + p.ops,
                errors: sum.errors + p.errors,
                checks: sum.checks + p.checks,
                heartbeat: sum.heartbeat.max(p.heartbeat),
            });
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
        }
    }
}
