//! A partition's snapshot and its restore: the vCPU part of a paused partition's saved state
//! (memory travels separately), and a partition recreated from it.

use std::sync::Arc;

use super::{
    memory::{GuestMemory, MemoryError},
    partition::{Partition, PartitionConfig, PartitionError},
    vcpu::{Request, VcpuState, VcpuStatus},
};

/// The vCPU part of a partition's saved state (memory travels separately). It travels as
/// bytes in the format of [`super::state`], checked before it is restored.
#[derive(Clone, Debug)]
pub struct PartitionSnapshot {
    pub config: PartitionConfig,
    pub tsc_khz: u64,
    pub vcpus: Vec<VcpuState>,
    /// Recent console output, so `status` reads the same after a move.
    pub console: Vec<u8>,
}

impl Partition {
    /// The vCPU states and config of a paused partition.
    pub fn snapshot(&self) -> Result<PartitionSnapshot, PartitionError> {
        let state = self.control.lock();
        let vcpus = state
            .vcpus
            .iter()
            .map(|s| match s {
                VcpuStatus::Paused(saved) => Ok((**saved).clone()),
                _ => Err(()),
            })
            .collect::<Result<Vec<_>, ()>>();
        drop(state);
        match vcpus {
            Ok(vcpus) => Ok(PartitionSnapshot {
                config: self.config.clone(),
                tsc_khz: self.tsc_khz,
                vcpus,
                console: self.control.lock().console.clone(),
            }),
            Err(()) => Err(PartitionError::WrongState(self.state(), "paused")),
        }
    }

    /// Recreates a partition from a snapshot and a memory image already filled in; it starts
    /// paused or running as asked.
    pub fn restore(
        snapshot: &PartitionSnapshot,
        memory: Arc<GuestMemory>,
        run: bool,
    ) -> Result<Self, PartitionError> {
        let config = snapshot.config.clone();
        if snapshot.vcpus.len() != config.vcpus as usize {
            return Err(PartitionError::SnapshotShape {
                got: snapshot.vcpus.len(),
                want: config.vcpus,
            });
        }
        if memory.size() != config.mem_size {
            return Err(MemoryError::BadSize(memory.size()).into());
        }
        let (kvm, vm, vcpus, tsc_khz) = Self::create_vm(&config, &memory)?;
        for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
            state.apply(vcpu)?;
        }
        let request = if run { Request::Run } else { Request::Pause };
        let partition = Self::start(config, kvm, vm, vcpus, memory, tsc_khz, request)?;
        partition.control.lock().console = snapshot.console.clone();
        Ok(partition)
    }
}
