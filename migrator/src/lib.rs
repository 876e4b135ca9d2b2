//! The migrator: KVM micro-VMs ("partitions") that run real guest workloads, their
//! heat-ordered live migration, and the daemon and supervisor that host them.

pub mod api;
pub mod certs;
pub mod daemon;
pub mod dash;
pub mod fuzzing;
pub mod host;
pub mod metrics;
pub mod migration;
pub mod supervisor;
pub mod tls;
pub mod vmm;
