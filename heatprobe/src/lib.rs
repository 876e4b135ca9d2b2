//! heatprobe: ranks the memory pages of a process or a KVM guest by how often they are used.
//!
//! Data flows one way:
//!
//! ```text
//! probes (eBPF fault counts in kernel maps)
//!   └─▶ profiler (targets, epochs, active sampling)
//!         └─▶ heat (decay, hot/warm/cold, ro/rw)
//!               └─▶ plan (the migration order)
//! ```
//!
//! [`heat`] and [`plan`] are pure and need no privileges; [`probes`] and [`profiler`] need
//! root (or CAP_BPF with CAP_PERFMON) to load the eBPF programs.

pub mod budget;
pub mod console;
pub mod heat;
pub mod pace;
pub mod plan;
pub mod pooling;
pub mod probes;
pub mod profiler;
pub mod report;
pub mod units;

pub use heat::{Access, HeatClass, HeatConfig, HeatMap, PageHeat};
pub use plan::MigrationPlan;
pub use probes::{PageCounts, ProbeError, Probes, TargetId};
pub use profiler::{ActiveSampler, Credit, Profiler, ProfilerError, SamplerError, Target};

/// Size in bytes of the pages heatprobe counts.
pub const PAGE_SIZE: u64 = 1 << heatprobe_ebpf::PAGE_SHIFT;
