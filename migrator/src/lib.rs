//! The migrator: KVM micro-VMs ("partitions") that run real guest workloads, the daemon that
//! hosts them, and (in later issues) their heat-ordered live migration.

pub mod certs;
pub mod daemon;
pub mod dash;
pub mod fuzzing;
pub mod migration;
pub mod supervisor;
pub mod tls;
pub mod vmm;
