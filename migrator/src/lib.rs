//! The migrator: KVM micro-VMs ("partitions") that run real guest workloads, and (in later
//! issues) their heat-ordered live migration.

pub mod vmm;
