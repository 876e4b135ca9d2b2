//! What a migration reports, at the end and while it runs.

use serde::{Deserialize, Serialize};

use super::convergence::CutoverReason;

/// The order pages are sent in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Heat order: read-write cold to hot, read-only hot to cold, untouched last.
    Heat,
    /// Address order, the baseline that behaves like QEMU's.
    Address,
}

/// How execution moves to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pause, send the last dirty pages and the vCPU state, resume on the destination.
    Precopy,
    /// Pause, send the vCPU state, resume at once; missing pages follow on demand.
    Hybrid,
}

/// Fault latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// How a migration ended; serialized as `completed` or `failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    Completed,
    Failed,
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
        })
    }
}

/// The one JSON object `migrator migrate --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub status: MigrationStatus,
    pub error: Option<String>,
    pub strategy: Strategy,
    pub mode: Mode,
    pub total_time_ms: u64,
    pub setup_time_ms: u64,
    pub downtime_ms: u64,
    pub rounds: u32,
    pub pages_total: u64,
    pub pages_sent: u64,
    pub pages_resent: u64,
    /// Dirty pages not sent again because their content was what was last sent.
    pub unchanged_skipped: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    pub mbps: f64,
    pub expected_downtime_ms: u64,
    pub postcopy_requests: u64,
    pub postcopy_fault_latency_us: Latency,
    /// Dirty pages found at the start of each round after round 0.
    pub dirty_pages_per_round: Vec<u64>,
    /// The rate round 0 streamed at, in Mbit/s.
    pub round0_mbps: f64,
    /// Why execution moved: `converged`, `not-shrinking`, `max-rounds` or `timeout`; null
    /// when the migration did not get that far.
    pub cutover_reason: Option<CutoverReason>,
    /// The highest throttle the guest's vCPUs were slowed to, in percent (0: none).
    pub throttle_pct_max: u8,
    pub source_digest: Option<String>,
    pub dest_digest: Option<String>,
    pub id_on_destination: Option<String>,
}

impl MigrationReport {
    pub fn new(strategy: Strategy, mode: Mode) -> Self {
        Self {
            status: MigrationStatus::Failed,
            error: None,
            strategy,
            mode,
            total_time_ms: 0,
            setup_time_ms: 0,
            downtime_ms: 0,
            rounds: 0,
            pages_total: 0,
            pages_sent: 0,
            pages_resent: 0,
            unchanged_skipped: 0,
            zero_pages: 0,
            bytes_sent: 0,
            mbps: 0.0,
            expected_downtime_ms: 0,
            postcopy_requests: 0,
            postcopy_fault_latency_us: Latency::default(),
            dirty_pages_per_round: Vec::new(),
            round0_mbps: 0.0,
            cutover_reason: None,
            throttle_pct_max: 0,
            source_digest: None,
            dest_digest: None,
            id_on_destination: None,
        }
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Setup,
    Profiling,
    Precopy,
    StopAndCopy,
    Postcopy,
    Completed,
    Failed,
}

impl Phase {
    /// Whether the migration is over, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// A running migration, for progress bars and dashboards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub phase: Phase,
    pub round: u32,
    pub remaining_bytes: u64,
    pub bytes_sent: u64,
    pub rate_bytes_per_sec: f64,
    pub expected_downtime_ms: u64,
    pub dirty_pages_per_round: Vec<u64>,
}

impl Default for MigrationProgress {
    fn default() -> Self {
        Self {
            phase: Phase::Setup,
            round: 0,
            remaining_bytes: 0,
            bytes_sent: 0,
            rate_bytes_per_sec: 0.0,
            expected_downtime_ms: 0,
            dirty_pages_per_round: Vec::new(),
        }
    }
}
