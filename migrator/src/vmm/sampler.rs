//! The heat profiler's active sampler over a partition's memory.

use std::{ops::Range, sync::Arc, time::Duration};

use heatprobe::{
    ActiveSampler, Probes, Profiler, ProfilerError, SamplerError, Target,
    budget::{Budget, BudgetError},
    profiler::ProfilerConfig,
};

use super::partition::Partition;

/// What one fault the sampler causes costs a guest here: the time its vCPU loses to the
/// exit, KVM's fault handling (through PVM's shadow paging on these hosts) and the re-entry.
/// Measured with the ruler (`docs/BENCHMARKS.md`, "What a fault costs the guest"): the guest
/// work a 2 s profile without a cap lost, divided by the faults it counted, was 18-25 µs on
/// kv-zipf, paced and flat out, in either mode.
pub const GUEST_FAULT_COST: Duration = Duration::from_micros(20);

/// The budget of `share` of `partition`'s time, with the cost of one fault here.
pub fn budget_for(partition: &Partition, share: f64) -> Result<Budget, BudgetError> {
    Budget::new(share, GUEST_FAULT_COST, partition.vcpu_tids().len() as u32)
}

/// What the sampler re-arms each epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// Writes (through the dirty log) and reads (by dropping host mappings): the full heat,
    /// for post-copy's push order and for users who ask for it.
    ReadsAndWrites,
    /// Writes only. Pre-copy re-sends only what is written, so read heat cannot change what
    /// it sends again, while a dropped mapping costs the guest a fault and KVM, which maps a
    /// faulted frame writable, marks it dirty: measured, it doubled the dirty pages found
    /// after round 0, each to be hashed before it could be skipped.
    WritesOnly,
}

/// Re-arms a partition's frames so the guest faults on them again.
pub struct PartitionSampler {
    partition: Arc<Partition>,
    sampling: Sampling,
}

impl PartitionSampler {
    pub fn new(partition: Arc<Partition>, sampling: Sampling) -> Self {
        Self {
            partition,
            sampling,
        }
    }
}

impl ActiveSampler for PartitionSampler {
    fn frames(&self) -> u64 {
        self.partition.memory().frames()
    }

    fn rearm_writes(&mut self, _frames: Range<u64>) -> Result<(), SamplerError> {
        // The classic dirty log re-protects the whole slot; dirty bits are kept for the
        // migration (see `dirty`). Without logging on, write heat comes from rearm_accesses.
        self.partition
            .dirty_log_rearm()
            .map(drop)
            .map_err(|e| SamplerError {
                what: e.to_string(),
                source: None,
            })
    }

    fn rearm_accesses(&mut self, frames: Range<u64>) -> Result<(), SamplerError> {
        if self.sampling == Sampling::WritesOnly {
            return Ok(());
        }
        self.partition
            .memory()
            .drop_mapping(frames)
            .map_err(|e| SamplerError {
                what: e.to_string(),
                source: None,
            })
    }
}

/// A heatprobe profiler on `partition`'s vCPU threads, with its active sampler.
pub fn profile_partition(
    probes: Arc<Probes>,
    partition: &Arc<Partition>,
    config: ProfilerConfig,
    sampling: Sampling,
) -> Result<Profiler, ProfilerError> {
    let mut profiler = Profiler::start(
        probes,
        Target::Vm {
            pid: std::process::id(),
            vcpu_threads: Some(partition.vcpu_tids().to_vec()),
        },
        config,
    )?;
    profiler.set_sampler(Box::new(PartitionSampler::new(
        Arc::clone(partition),
        sampling,
    )));
    Ok(profiler)
}
