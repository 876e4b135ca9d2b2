//! What a migration reports, at the end and while it runs.

use std::time::Duration;

pub use super::plan_choice::PlanHeatOrigin;

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

/// The guest's faults on the destination over a fixed window from its resume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCutoverFaults {
    /// The window's length (`--fault-window`).
    pub window_ms: u64,
    /// Faults served from memory already there: the guest's first touch of a page that
    /// arrived before it was needed.
    pub local: u64,
    /// Faults on a missing page, which had to ask the source for it (hybrid only).
    pub remote: u64,
    /// The guest's operations over the window, summed over its vCPUs, and the time between
    /// the two readings in microseconds (the end is read on a timer, not when the source
    /// asks); `None` where its counters could not be read.
    #[serde(default)]
    pub ops: Option<u64>,
    #[serde(default)]
    pub ops_us: Option<u64>,
}

/// What the migration cost the guest, as time: the operations it did not do, at its own pace
/// just before the migration, from the first thing the migration did to it (the dirty log,
/// then the heat profile) to the end of the fault window after the resume. Each part is its
/// time less the operations done in it over that pace; a part where the guest ran faster
/// than before counts below zero.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestWorkLost {
    /// The sum of the parts measured.
    pub total_ms: f64,
    /// The heat profile before round 0 (its re-arming faults).
    pub profile_ms: f64,
    /// Warm heat (`plan_heat` `warm`): what the background profile's re-arming cost the
    /// guest over the span of the heat this migration planned from, as its budget priced
    /// the faults (`profile_spent`). Paid before the migration, for it.
    pub warm_heat_ms: f64,
    /// The rounds at full speed (the dirty log's write faults, the copies).
    pub rounds_ms: f64,
    /// The rounds under a throttle.
    pub throttle_ms: f64,
    /// The pause: the guest runs nowhere.
    pub downtime_ms: f64,
    /// After the resume, over the fault window: the faults of a fresh VM and, in hybrid mode,
    /// the waits for missing pages. `None` when not measured (`post_cutover_faults_note`, or
    /// `--fault-window 0s`, or a migration that did not complete).
    pub after_ms: Option<f64>,
    /// The guest's pace before the migration, operations per second over its vCPUs: over
    /// the half minute its host sampled (`vmm::pace`), its own pauses weighed in, or over
    /// the second before the migration where the host has less history than that.
    pub rate_before: f64,
    /// How long `rate_before` was measured over, in milliseconds: up to 30 000 from the host's
    /// history, or about 1 000 just before the migration.
    #[serde(default)]
    pub pace_ms: f64,
    /// How long the parts measured last together, in milliseconds.
    pub counted_ms: f64,
}

/// How a migration ended; serialized as `completed`, `failed` or `cancelled` (an operator's
/// cancel before the handover: the partition runs on here, as after a failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    Completed,
    Failed,
    Cancelled,
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        })
    }
}

/// Where the guest is once a migration ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestLocation {
    /// Running on the destination: the move completed.
    Destination,
    /// Running on the source, as before: the move failed before the handover.
    Source,
    /// Hybrid, failed after the handover: running on the destination on the pages it has,
    /// the source keeping the only complete copy, paused (`postcopy-paused`) until
    /// `migrate --resume` pushes the rest.
    DestinationSourcePaused,
    /// Paused on the source, awaiting the handover: whether the destination runs it is
    /// unknown until a reconcile asks.
    AwaitingHandover,
}

impl std::fmt::Display for GuestLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Destination => "the partition runs on the destination",
            Self::Source => "the partition keeps running on the source",
            Self::DestinationSourcePaused => {
                "the partition runs on the destination on the pages it has; the source keeps \
                 the only complete copy, paused (`migrator migrate --resume` pushes the rest)"
            }
            Self::AwaitingHandover => {
                "the partition is paused on the source, awaiting the handover; the source \
                 daemon asks the destination again by itself (`migrator reconcile` asks now)"
            }
        })
    }
}

/// The one JSON object `migrator migrate --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The migration's id on its source daemon (`migrator migrations`, `cancel`, `wait`).
    #[serde(default)]
    pub migration: Option<String>,
    /// The downtime limit in force at the end (the options', or what an operator set while
    /// it ran).
    #[serde(default)]
    pub downtime_limit_ms: u64,
    pub status: MigrationStatus,
    pub error: Option<String>,
    /// Where the guest is now.
    pub guest_location: GuestLocation,
    /// Heat strategy: where the plan's heat came from (null for address).
    pub plan_heat: Option<PlanHeatOrigin>,
    /// Heat strategy: why the pages went in address order after all (heat that ranks too
    /// few pages, or a flat popularity: `plan_choice`); null when heat's order was used.
    #[serde(default)]
    pub order_fallback: Option<String>,
    /// Heat strategy: what the profile cost the guest against its budget (`--heat-budget`);
    /// null without a profile or a budget.
    #[serde(default)]
    pub profile_spent: Option<heatprobe::budget::Spent>,
    /// Whether the destination took the plan's heat, to start warm.
    pub heat_carried: bool,
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
    /// Bytes on the data connections, as they went on the wire (compressed, where they were).
    pub bytes_sent: u64,
    /// The same frames' bytes uncompressed: `bytes_sent` without `--compress`.
    pub bytes_uncompressed: u64,
    /// `bytes_uncompressed / bytes_sent`: 1.0 when nothing was compressed.
    pub compression_ratio: f64,
    /// `bytes_sent` over the total time, in Mbit/s: what the link carried.
    pub mbps: f64,
    pub expected_downtime_ms: u64,
    /// Where the downtime went.
    pub downtime_breakdown: DowntimeBreakdown,
    /// Completed with `downtime_ms` within the options' downtime limit; false for a failed
    /// migration.
    pub downtime_limit_met: bool,
    /// Why the downtime differed from `expected_downtime_ms` by more than a fifth of it, when
    /// it did (completed migrations only).
    pub downtime_note: Option<String>,
    /// The guest's operations per second from the start of the dirty log (before heat's
    /// profile) to the pause, over its pace before the migration (`rate_before` of
    /// `guest_work_lost`); `None` if it did no operations then (paused, or an image that keeps
    /// no count) or its counter went backwards.
    pub guest_ops_ratio: Option<f64>,
    /// What the migration cost the guest, by part; `None` where it cannot be measured,
    /// `guest_work_lost_note` saying why.
    #[serde(default)]
    pub guest_work_lost: Option<GuestWorkLost>,
    #[serde(default)]
    pub guest_work_lost_note: Option<String>,
    pub postcopy_requests: u64,
    pub postcopy_fault_latency_us: Latency,
    /// Hybrid: stale pages sent inside the downtime, as many as its budget had room for,
    /// those the guest would likely touch first first.
    pub budgeted_pages: u64,
    /// Hybrid: stale pages the destination dropped while the guest still ran on the source
    /// (QEMU's discard, sent before the pause rather than inside it), and how long that took
    /// from the first discard to the last acknowledgement.
    pub discarded_pages: u64,
    pub discard_ms: f64,
    /// QEMU's postcopy blocktime: how long every vCPU waited on a missing page at once, in
    /// milliseconds (0 in pre-copy, where no page is missing).
    pub postcopy_blocktime_ms: f64,
    /// How long each vCPU waited on missing pages in all, in vCPU order (zeros in pre-copy).
    pub postcopy_vcpu_blocktime_ms: Vec<f64>,
    /// What the guest as a whole lost to the move: the downtime plus the blocktime.
    pub guest_stall_ms: f64,
    /// Hybrid: how often post-copy broke and was recovered over new connections, and how
    /// long it was paused in all (from the failure to the new connections).
    #[serde(default)]
    pub postcopy_recoveries: u32,
    #[serde(default)]
    pub postcopy_paused_ms: u64,
    /// Demands the destination sent again over a recovery's new connection: faults that
    /// waited out the pause, or whose demand was lost with the broken connection.
    #[serde(default)]
    pub postcopy_rerequests: u64,
    /// The guest's faults on the destination over `--fault-window` from its resume; null
    /// when the window is 0, the migration did not complete, or the destination could not
    /// count (then `post_cutover_faults_note` says why).
    pub post_cutover_faults: Option<PostCutoverFaults>,
    pub post_cutover_faults_note: Option<String>,
    /// Dirty pages found at the start of each round after round 0.
    pub dirty_pages_per_round: Vec<u64>,
    /// The rate round 0 moved memory at, in Mbit/s of uncompressed pages (the effective rate:
    /// with compression, more than the link carries); null where round 0 was too quick to
    /// measure (under a millisecond).
    pub round0_mbps: Option<f64>,
    /// The rate round 0 streamed at on the wire, in Mbit/s (`round0_mbps` without
    /// compression); null likewise.
    pub round0_wire_mbps: Option<f64>,
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
            migration: None,
            downtime_limit_ms: 0,
            status: MigrationStatus::Failed,
            error: None,
            guest_location: GuestLocation::Source,
            plan_heat: None,
            order_fallback: None,
            profile_spent: None,
            heat_carried: false,
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
            bytes_uncompressed: 0,
            compression_ratio: 1.0,
            mbps: 0.0,
            expected_downtime_ms: 0,
            downtime_breakdown: DowntimeBreakdown::default(),
            downtime_limit_met: false,
            downtime_note: None,
            guest_ops_ratio: None,
            guest_work_lost: None,
            guest_work_lost_note: None,
            postcopy_requests: 0,
            postcopy_fault_latency_us: Latency::default(),
            budgeted_pages: 0,
            discarded_pages: 0,
            discard_ms: 0.0,
            postcopy_blocktime_ms: 0.0,
            postcopy_vcpu_blocktime_ms: Vec::new(),
            guest_stall_ms: 0.0,
            postcopy_recoveries: 0,
            postcopy_paused_ms: 0,
            postcopy_rerequests: 0,
            post_cutover_faults: None,
            post_cutover_faults_note: None,
            dirty_pages_per_round: Vec::new(),
            round0_mbps: None,
            round0_wire_mbps: None,
            cutover_reason: None,
            throttle_pct_max: 0,
            source_digest: None,
            dest_digest: None,
            id_on_destination: None,
        }
    }

    /// Says whether the downtime kept to `limit` and, when it was far from what was
    /// expected, why. Call once the status, the downtime and its breakdown are final.
    pub fn judge_downtime(&mut self, limit: Duration) {
        let completed = self.status == MigrationStatus::Completed;
        self.downtime_limit_met = completed && Duration::from_millis(self.downtime_ms) <= limit;
        self.downtime_note = if completed {
            downtime_note(
                self.mode,
                self.downtime_ms,
                self.expected_downtime_ms,
                &self.downtime_breakdown,
            )
        } else {
            None
        };
    }
}

/// The steps of the downtime, in milliseconds, from the pause on the source to the guest
/// running on the destination. They follow one another, so they add up to the downtime (to
/// within the rounding of `downtime_ms`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Asking the vCPUs to stop until they are quiet, and the last fetch of the dirty log.
    pub pause_ms: f64,
    /// Pre-copy: picking the last dirty pages that changed, sending them and the done marker,
    /// and the destination's wait for every page still in flight, the last round's included.
    /// Hybrid: working out the stale pages, the done marker and that wait (the stale pages
    /// themselves follow the resume).
    pub last_pages_ms: f64,
    /// Taking the vCPU state and encoding it (`Partition::snapshot`, `state::encode`).
    pub state_encode_ms: f64,
    /// The commit's round trip less what the destination says it spent: carrying the state
    /// there and the answer back.
    pub state_transfer_ms: f64,
    /// Destination: checking and decoding the state and restoring the partition.
    pub restore_ms: f64,
    /// Destination: starting the restored partition's vCPUs.
    pub resume_ms: f64,
}

impl DowntimeBreakdown {
    pub fn total_ms(&self) -> f64 {
        self.pause_ms
            + self.last_pages_ms
            + self.state_encode_ms
            + self.state_transfer_ms
            + self.restore_ms
            + self.resume_ms
    }

    /// The steps in order, for people: `pause 2.1 ms, last pages 40.3 ms, ...`.
    pub fn summary(&self) -> String {
        [
            ("pause", self.pause_ms),
            ("last pages", self.last_pages_ms),
            ("state encode", self.state_encode_ms),
            ("state transfer", self.state_transfer_ms),
            ("restore", self.restore_ms),
            ("resume", self.resume_ms),
        ]
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.1} ms"))
        .collect::<Vec<_>>()
        .join(", ")
    }

    /// The steps the expected downtime does not model (it models only the last pages, at
    /// the rate of the last round), named as a note names them.
    fn unmodelled(&self) -> [(&'static str, f64); 5] {
        [
            ("pause", self.pause_ms),
            ("state encoding", self.state_encode_ms),
            ("state transfer", self.state_transfer_ms),
            ("restore", self.restore_ms),
            ("resume", self.resume_ms),
        ]
    }
}

/// How far the downtime may be from the expectation, as a share of the downtime, before a
/// note explains the difference.
pub const NOTE_THRESHOLD: f64 = 0.2;

/// One line on why `actual_ms` of downtime was not the `expected_ms` predicted for the last
/// pages, naming the steps that took a noticeable share of it (at least a tenth, and half a
/// millisecond), largest first. `None` when the two agree to within [`NOTE_THRESHOLD`].
pub fn downtime_note(
    mode: Mode,
    actual_ms: u64,
    expected_ms: u64,
    breakdown: &DowntimeBreakdown,
) -> Option<String> {
    let (actual, expected) = (actual_ms as f64, expected_ms as f64);
    if (actual - expected).abs() <= NOTE_THRESHOLD * actual {
        return None;
    }
    let noticeable = |ms: f64| ms >= 0.5 && ms >= 0.1 * actual;
    let mut steps: Vec<(&str, f64)> = breakdown
        .unmodelled()
        .into_iter()
        .filter(|&(_, ms)| noticeable(ms))
        .collect();
    // The last pages and the bytes still in flight at the last check are modelled, so they
    // are named only when they missed the expectation; hybrid mode sends no last pages during
    // the downtime, so the wait for those in flight is all of that step.
    let last_pages = breakdown.last_pages_ms;
    if (last_pages - expected).abs() > NOTE_THRESHOLD * actual {
        steps.push((
            match mode {
                Mode::Precopy => "the last pages and those in flight",
                Mode::Hybrid => "pages still in flight",
            },
            last_pages,
        ));
    }
    steps.sort_by(|a, b| b.1.total_cmp(&a.1));
    let named: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, (name, ms))| {
            if i == 0 {
                format!("{name} took {ms:.0} ms")
            } else {
                format!("{name} {ms:.0} ms")
            }
        })
        .collect();
    let explained = match named.as_slice() {
        [] => format!("the downtime was {actual_ms} ms"),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    };
    Some(format!("expected {expected_ms} ms; {explained}"))
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
    /// Post-copy broke: the source reconnects, with backoff, for `--recover-window`.
    PostcopyPaused,
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
    /// How far the guest's vCPUs are slowed now, in percent (QEMU's cpu-throttle-percentage).
    pub throttle_pct: u8,
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
            throttle_pct: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakdown(last_pages_ms: f64, state_transfer_ms: f64, restore_ms: f64) -> DowntimeBreakdown {
        DowntimeBreakdown {
            pause_ms: 2.0,
            last_pages_ms,
            state_encode_ms: 1.0,
            state_transfer_ms,
            restore_ms,
            resume_ms: 0.1,
        }
    }

    fn completed(downtime_ms: u64, expected_downtime_ms: u64) -> MigrationReport {
        let mut report = MigrationReport::new(Strategy::Heat, Mode::Precopy);
        report.status = MigrationStatus::Completed;
        report.downtime_ms = downtime_ms;
        report.expected_downtime_ms = expected_downtime_ms;
        report.downtime_breakdown = breakdown(downtime_ms as f64 - 3.1, 0.0, 0.0);
        report
    }

    #[test]
    fn no_note_when_the_expectation_is_within_a_fifth() {
        let b = breakdown(95.0, 1.0, 1.0);
        assert_eq!(downtime_note(Mode::Precopy, 100, 80, &b), None);
        assert_eq!(downtime_note(Mode::Precopy, 100, 120, &b), None);
        assert_eq!(downtime_note(Mode::Precopy, 0, 0, &b), None);
    }

    #[test]
    fn the_note_names_what_the_expectation_left_out_largest_first() {
        let b = breakdown(43.0, 120.0, 210.0);
        let note = downtime_note(Mode::Precopy, 376, 43, &b);
        assert_eq!(
            note.as_deref(),
            Some(
                "expected 43 ms; restore took 210 ms and state transfer \
                 120 ms"
            )
        );
        // Just past a fifth of the actual downtime is enough.
        let b = breakdown(79.0, 0.0, 21.0);
        let note = downtime_note(Mode::Precopy, 100, 79, &b).expect("a note");
        assert!(note.starts_with("expected 79 ms"), "{note}");
        assert!(note.contains("restore took 21 ms"), "{note}");
    }

    #[test]
    fn the_note_names_the_last_pages_when_they_missed() {
        let b = breakdown(10.0, 3.0, 4.0);
        let note = downtime_note(Mode::Precopy, 20, 300, &b).expect("a note");
        assert_eq!(
            note,
            "expected 300 ms; the last pages and those in flight took 10 \
             ms, restore 4 ms, state transfer 3 ms and pause 2 ms"
        );
        let note = downtime_note(Mode::Hybrid, 20, 300, &breakdown(0.2, 3.0, 15.0));
        assert_eq!(
            note.as_deref(),
            Some(
                "expected 300 ms; restore took 15 ms, state transfer 3 ms, \
                 pause 2 ms and pages still in flight 0 ms"
            )
        );
    }

    #[test]
    fn the_limit_is_met_only_by_a_completed_migration_within_it() {
        let limit = Duration::from_millis(300);
        let mut report = completed(300, 290);
        report.judge_downtime(limit);
        assert!(report.downtime_limit_met);
        assert_eq!(report.downtime_note, None);
        let mut report = completed(301, 290);
        report.judge_downtime(limit);
        assert!(!report.downtime_limit_met);
        let mut report = completed(10, 290);
        report.status = MigrationStatus::Failed;
        report.judge_downtime(limit);
        assert!(!report.downtime_limit_met);
        assert_eq!(report.downtime_note, None);
    }

    #[test]
    fn the_breakdown_adds_up_and_reads_in_order() {
        let b = breakdown(43.0, 120.0, 210.0);
        assert!((b.total_ms() - 376.1).abs() < 1e-9, "{}", b.total_ms());
        assert_eq!(
            b.summary(),
            "pause 2.0 ms, last pages 43.0 ms, state encode 1.0 ms, state transfer 120.0 ms, \
             restore 210.0 ms, resume 0.1 ms"
        );
    }
}
