//! `migrator serve --metrics ADDR`: the daemon's figures in the Prometheus text format.
//!
//! Two kinds of figure, kept apart:
//!
//! - what migrations leave behind (`Recorder`): each outgoing migration, when it ends,
//!   counts once by outcome, mode and strategy, and adds its downtime, blocktime, demand
//!   latency, guest work lost, bytes and pages re-sent to counters and histograms that live as
//!   long as the daemon;
//! - what is true now (`exposition::Snapshot`): the partitions by state, their guest
//!   operations, the migrations in flight with their phase and bytes remaining, the memory
//!   admission counts. The supervisor asks its partition processes for these at each scrape,
//!   as `list` and `migrations` do, so they cost nothing between scrapes.
//!
//! `exposition` renders both into one page; `endpoint` serves it over HTTP, behind mutual
//! TLS off loopback.
//!
//! Labels are few and bounded: outcome, mode, strategy, state, side and phase take a handful
//! of values each; `partition` appears only on series of partitions live on this host (at most
//! `serve --max-partitions`) and on its outgoing migrations in flight.

pub mod endpoint;
pub mod exposition;

use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};

use crate::{
    api::ApiError,
    migration::{MigrationReport, MigrationStatus, Mode, Strategy},
};

/// The labels of a migration that ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct Outcome {
    /// `completed`, `failed`, `cancelled`, or `error` (the daemon answered with an error
    /// instead of a report: refused before it started, or its partition's process died).
    pub outcome: &'static str,
    pub mode: &'static str,
    pub strategy: &'static str,
}

/// The labels of what a migration measured.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct Kind {
    pub mode: &'static str,
    pub strategy: &'static str,
}

impl Kind {
    pub fn of(mode: Mode, strategy: Strategy) -> Self {
        Self {
            mode: match mode {
                Mode::Precopy => "precopy",
                Mode::Hybrid => "hybrid",
            },
            strategy: match strategy {
                Strategy::Heat => "heat",
                Strategy::Address => "address",
            },
        }
    }

    fn outcome(&self, outcome: &'static str) -> Outcome {
        Outcome {
            outcome,
            mode: self.mode,
            strategy: self.strategy,
        }
    }
}

/// Bucket bounds, in seconds, of pauses a guest notices: downtime and blocktime.
const STALL_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Of one demanded page's round trip.
const DEMAND_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];
/// Of the guest's work lost to a whole migration.
const WORK_LOST_BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Of a profile's share of the guest's time.
const SHARE_BUCKETS: [f64; 8] = [0.001, 0.002_5, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25];

fn stall_histogram() -> Histogram {
    Histogram::new(STALL_BUCKETS)
}

fn demand_histogram() -> Histogram {
    Histogram::new(DEMAND_BUCKETS)
}

fn work_lost_histogram() -> Histogram {
    Histogram::new(WORK_LOST_BUCKETS)
}

fn share_histogram() -> Histogram {
    Histogram::new(SHARE_BUCKETS)
}

type Histograms = Family<Kind, Histogram, fn() -> Histogram>;

/// What the migrations that ended left behind. Clones share the figures (each metric is
/// shared behind an `Arc`), so the supervisor records into the same ones a scrape reads.
#[derive(Clone)]
pub struct Recorder {
    pub(crate) migrations: Family<Outcome, Counter>,
    pub(crate) downtime: Histograms,
    pub(crate) blocktime: Histograms,
    pub(crate) demand_p99: Histograms,
    pub(crate) work_lost: Histograms,
    pub(crate) sent_bytes: Family<Kind, Counter>,
    pub(crate) resent_pages: Family<Kind, Counter>,
    pub(crate) profile_seconds: Family<Kind, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) profile_share: Histograms,
}

impl Default for Recorder {
    /// Every counter at zero for each outcome, mode and strategy: a series that appears at 1
    /// has no increase for `increase()` or an alert to see.
    fn default() -> Self {
        let recorder = Self {
            migrations: Family::default(),
            downtime: Family::new_with_constructor(stall_histogram),
            blocktime: Family::new_with_constructor(stall_histogram),
            demand_p99: Family::new_with_constructor(demand_histogram),
            work_lost: Family::new_with_constructor(work_lost_histogram),
            sent_bytes: Family::default(),
            resent_pages: Family::default(),
            profile_seconds: Family::default(),
            profile_share: Family::new_with_constructor(share_histogram),
        };
        for mode in [Mode::Precopy, Mode::Hybrid] {
            for strategy in [Strategy::Heat, Strategy::Address] {
                let kind = Kind::of(mode, strategy);
                for outcome in OUTCOMES {
                    let _ = recorder.migrations.get_or_create(&kind.outcome(outcome));
                }
                let _ = recorder.sent_bytes.get_or_create(&kind);
                let _ = recorder.resent_pages.get_or_create(&kind);
            }
        }
        recorder
    }
}

/// The values of the `outcome` label.
const OUTCOMES: [&str; 4] = ["completed", "failed", "cancelled", "error"];

impl Recorder {
    /// Counts one outgoing migration that ended, asked as `mode` and `strategy`: its report,
    /// or the error the daemon answered instead.
    pub fn migration_ended(
        &self,
        mode: Mode,
        strategy: Strategy,
        outcome: &Result<MigrationReport, ApiError>,
    ) {
        let kind = Kind::of(mode, strategy);
        let report = match outcome {
            Ok(report) => report,
            Err(_) => {
                self.migrations.get_or_create(&kind.outcome("error")).inc();
                return;
            }
        };
        let kind = Kind::of(report.mode, report.strategy);
        let status = match report.status {
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
        };
        self.migrations.get_or_create(&kind.outcome(status)).inc();
        // What went on the wire went, whatever the outcome.
        self.sent_bytes
            .get_or_create(&kind)
            .inc_by(report.bytes_sent);
        self.resent_pages
            .get_or_create(&kind)
            .inc_by(report.pages_resent);
        if let Some(spent) = &report.profile_spent {
            self.profile_seconds
                .get_or_create(&kind)
                .inc_by(spent.estimated_ms.max(0.0) / 1e3);
            self.profile_share.get_or_create(&kind).observe(spent.share);
        }
        if let Some(lost) = &report.guest_work_lost {
            self.work_lost
                .get_or_create(&kind)
                .observe(lost.total_ms / 1e3);
        }
        if report.status != MigrationStatus::Completed {
            return;
        }
        self.downtime
            .get_or_create(&kind)
            .observe(report.downtime_ms as f64 / 1e3);
        if report.mode == Mode::Hybrid {
            self.blocktime
                .get_or_create(&kind)
                .observe(report.postcopy_blocktime_ms / 1e3);
            if report.postcopy_requests > 0 {
                self.demand_p99
                    .get_or_create(&kind)
                    .observe(report.postcopy_fault_latency_us.p99 as f64 / 1e6);
            }
        }
    }
}
