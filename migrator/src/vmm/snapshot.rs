//! A partition's snapshot and its restore: the vCPU part of a paused partition's saved state
//! (memory travels separately), and a partition recreated from it on a host that can give the
//! guest the same CPU (vendor, features, TSC rate; [`super::cpu`]).

use std::sync::Arc;

use super::{
    cpu::{self, GuestCpu},
    memory::{GuestMemory, MemoryError},
    partition::{Partition, PartitionConfig, PartitionError},
    vcpu::{Request, VcpuState, VcpuStatus},
};

/// The vCPU part of a partition's saved state (memory travels separately). It travels as
/// bytes in the format of [`super::state`], checked before it is restored.
#[derive(Clone, Debug)]
pub struct PartitionSnapshot {
    pub config: PartitionConfig,
    /// The CPU the guest was given: TSC rate, vendor, features.
    pub cpu: GuestCpu,
    pub vcpus: Vec<VcpuState>,
    /// Recent console output, so `status` reads the same after a move.
    pub console: Vec<u8>,
}

impl Partition {
    /// The vCPU states, CPU and config of a paused partition.
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
                cpu: self.cpu,
                vcpus,
                console: self.control.lock().console.clone(),
            }),
            Err(()) => Err(PartitionError::WrongState(self.state(), "paused")),
        }
    }

    /// Recreates a partition from a snapshot and a memory image already filled in; it starts
    /// paused or running as asked. The vCPUs get this host's CPUID narrowed to the features
    /// the guest saw, and the guest's TSC rate; a host of another CPU vendor, lacking a
    /// feature the guest saw, or unable to match its TSC rate is refused.
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
        let (kvm, vm) = Self::create_vm(&memory)?;
        let mut cpuid = cpu::host_cpuid(&kvm)?;
        snapshot.cpu.fit(&mut cpuid)?;
        let vcpus = Self::create_vcpus(&vm, config.vcpus, &cpuid)?;
        for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
            // The rate first: KVM scales the TSC value set with the MSRs at that rate.
            snapshot.cpu.set_tsc(&kvm, vcpu)?;
            state.apply(vcpu)?;
        }
        let request = if run { Request::Run } else { Request::Pause };
        let partition = Self::start(config, kvm, vm, vcpus, memory, snapshot.cpu, request)?;
        partition.control.lock().console = snapshot.console.clone();
        Ok(partition)
    }
}
