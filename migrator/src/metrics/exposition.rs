//! One scrape's page: the recorder's counters and histograms, and gauges of what a snapshot
//! of the daemon says now, in the Prometheus text format (0.0.4).

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::Recorder;
use crate::{
    api::{MigrationInfo, PartitionInfo},
    vmm::PartitionState,
};

/// The `Content-Type` of the page.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every state a partition can be in, so that each has a series, zero or not: an alert on
/// `awaiting-handover` then has a series to watch before the first one happens.
const STATES: [PartitionState; 7] = [
    PartitionState::Running,
    PartitionState::Paused,
    PartitionState::Stopped,
    PartitionState::Migrating,
    PartitionState::AwaitingHandover,
    PartitionState::PostcopyPaused,
    PartitionState::Crashed,
];

/// What the daemon says now, gathered for one scrape.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// As `list` answers: live partitions and those that ended lately.
    pub partitions: Vec<PartitionInfo>,
    /// As `migrations` answers: both sides, running or ended lately.
    pub migrations: Vec<MigrationInfo>,
    /// Guest memory hosted and reserved, and what one more partition may take.
    pub memory_used: u64,
    pub memory_free: u64,
}

/// What gathers a snapshot (the supervisor).
pub trait Scrape: Clone + Send + Sync + 'static {
    fn snapshot(&self) -> impl Future<Output = Snapshot> + Send;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Partition {
    partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Flight {
    side: String,
    phase: String,
}

/// The page for one scrape.
pub fn render(recorder: &Recorder, snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("migrator");
    register_recorded(&mut registry, recorder);
    register_now(&mut registry, snapshot);
    let mut page = String::new();
    prometheus_text::encode(&mut page, &registry)?;
    Ok(page)
}

fn register_recorded(registry: &mut Registry, recorder: &Recorder) {
    let r = recorder.clone();
    registry.register(
        "migrations",
        "Outgoing migrations that ended, by outcome (completed, failed, cancelled; error: the \
         daemon answered with an error instead of a report), mode and strategy",
        r.migrations,
    );
    registry.register_with_unit(
        "migration_downtime",
        "Completed migrations' downtime: the guest paused, running nowhere",
        Unit::Seconds,
        r.downtime,
    );
    registry.register_with_unit(
        "migration_blocktime",
        "Completed hybrid migrations' post-copy blocktime: every vCPU waiting on a missing page \
         at once",
        Unit::Seconds,
        r.blocktime,
    );
    registry.register_with_unit(
        "migration_demand_latency_p99",
        "Completed hybrid migrations that demanded pages: each one's 99th percentile of a \
         demanded page's latency (one observation per migration)",
        Unit::Seconds,
        r.demand_p99,
    );
    registry.register_with_unit(
        "migration_guest_work_lost",
        "What each migration cost its guest, as time at its own pace before it (below zero \
         where it ran faster)",
        Unit::Seconds,
        r.work_lost,
    );
    registry.register_with_unit(
        "migration_sent",
        "Bytes migrations sent on their data connections (as on the wire, compressed where \
         they were), whatever their outcome",
        Unit::Bytes,
        r.sent_bytes,
    );
    registry.register(
        "migration_resent_pages",
        "Pages migrations sent again because the guest wrote them after they were sent",
        r.resent_pages,
    );
    registry.register_with_unit(
        "migration_profile_guest",
        "The heat profiles' estimated cost to their guests, in the guests' time",
        Unit::Seconds,
        r.profile_seconds,
    );
    registry.register_with_unit(
        "migration_profile_guest_share",
        "Each heat profile's cost as a share of its guest's time over the profile",
        Unit::Ratios,
        r.profile_share,
    );
}

fn register_now(registry: &mut Registry, snapshot: &Snapshot) {
    let states = Family::<State, Gauge>::default();
    for state in STATES {
        let count = snapshot
            .partitions
            .iter()
            .filter(|p| p.state == state)
            .count();
        states
            .get_or_create(&State {
                state: state.name(),
            })
            .set(count as i64);
    }
    registry.register(
        "partitions",
        "Partitions by state: live here, or ended lately (stopped, crashed, migrated away are \
         remembered a while)",
        states,
    );

    let ops = Family::<Partition, Counter>::default();
    let errors = Family::<Partition, Counter>::default();
    for p in snapshot.partitions.iter().filter(|p| p.pid.is_some()) {
        let label = Partition {
            partition: p.id.clone(),
        };
        ops.get_or_create(&label).inc_by(p.ops);
        errors.get_or_create(&label).inc_by(p.errors);
    }
    registry.register(
        "partition_guest_operations",
        "Operations the guest of each partition live here counted (its workload's own count)",
        ops,
    );
    registry.register(
        "partition_guest_errors",
        "Errors the guest of each partition live here found in its self-checks",
        errors,
    );

    let flights = Family::<Flight, Gauge>::default();
    let remaining = Family::<Partition, Gauge<u64, AtomicU64>>::default();
    for m in snapshot.migrations.iter().filter(|m| m.status.is_none()) {
        flights
            .get_or_create(&Flight {
                side: m.side.clone(),
                phase: m.phase.to_lowercase(),
            })
            .inc();
        if let Some(progress) = &m.progress {
            remaining
                .get_or_create(&Partition {
                    partition: m.partition.clone(),
                })
                .set(progress.remaining_bytes);
        }
    }
    registry.register(
        "migrations_in_flight",
        "Migrations running now, by side (source, destination) and phase",
        flights,
    );
    registry.register_with_unit(
        "migration_remaining",
        "Bytes an outgoing migration in flight still has to send, by partition",
        Unit::Bytes,
        remaining,
    );

    let used = Gauge::<u64, AtomicU64>::default();
    used.set(snapshot.memory_used);
    registry.register_with_unit(
        "memory_used",
        "Guest memory hosted here, and reserved for partitions starting",
        Unit::Bytes,
        used,
    );
    let free = Gauge::<u64, AtomicU64>::default();
    free.set(snapshot.memory_free);
    registry.register_with_unit(
        "memory_free",
        "Guest memory one more partition may still take here (under serve --max-memory and \
         the host's MemAvailable)",
        Unit::Bytes,
        free,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::ApiError,
        migration::{MigrationProgress, MigrationReport, MigrationStatus, Mode, Strategy},
    };

    fn line<'a>(page: &'a str, start: &str) -> Option<&'a str> {
        page.lines().find(|l| l.starts_with(start))
    }

    #[test]
    fn a_completed_migration_counts_once_with_its_labels_and_figures() {
        let recorder = Recorder::default();
        let mut report = MigrationReport::new(Strategy::Address, Mode::Hybrid);
        report.status = MigrationStatus::Completed;
        report.downtime_ms = 30;
        report.bytes_sent = 5 << 20;
        report.pages_resent = 7;
        report.postcopy_requests = 3;
        report.postcopy_fault_latency_us.p99 = 400;
        report.profile_spent = Some(heatprobe::budget::Spent {
            estimated_ms: 20.0,
            share: 0.004,
            ..Default::default()
        });
        recorder.migration_ended(Mode::Hybrid, Strategy::Address, &Ok(report));
        recorder.migration_ended(
            Mode::Precopy,
            Strategy::Heat,
            &Err(ApiError::Limit("full".into())),
        );
        let page = render(&recorder, &Snapshot::default()).unwrap();
        let completed = "migrator_migrations_total{outcome=\"completed\",mode=\"hybrid\",\
                         strategy=\"address\"}";
        assert_eq!(line(&page, completed), Some(&*format!("{completed} 1")));
        let error = "migrator_migrations_total{outcome=\"error\",mode=\"precopy\",\
                     strategy=\"heat\"}";
        assert_eq!(line(&page, error), Some(&*format!("{error} 1")));
        // Outcomes that did not happen are there, at zero.
        let failed = "migrator_migrations_total{outcome=\"failed\",mode=\"hybrid\",\
                      strategy=\"address\"}";
        assert_eq!(line(&page, failed), Some(&*format!("{failed} 0")));
        let sent = "migrator_migration_sent_bytes_total{mode=\"hybrid\",strategy=\"address\"}";
        assert_eq!(line(&page, sent), Some(&*format!("{sent} 5242880")));
        let kind = "mode=\"hybrid\",strategy=\"address\"";
        for series in [
            format!("migrator_migration_downtime_seconds_bucket{{{kind},le=\"0.05\"}} 1"),
            format!("migrator_migration_downtime_seconds_bucket{{{kind},le=\"0.025\"}} 0"),
            format!("migrator_migration_downtime_seconds_sum{{{kind}}} 0.03"),
            format!("migrator_migration_demand_latency_p99_seconds_count{{{kind}}} 1"),
            format!("migrator_migration_profile_guest_seconds_total{{{kind}}} 0.02"),
            format!(
                "migrator_migration_profile_guest_share_ratios_bucket{{{kind},le=\"0.005\"}} 1"
            ),
        ] {
            assert!(page.lines().any(|l| l == series), "{series}: {page}");
        }
        assert!(page.contains("# TYPE migrator_migration_blocktime_seconds histogram"));
    }

    #[test]
    fn the_snapshot_shows_states_partitions_and_migrations_in_flight() {
        let partition = |id: &str, state: PartitionState, ops: u64| PartitionInfo {
            id: id.into(),
            name: None,
            image: "workload idle".into(),
            state,
            ops,
            errors: 0,
            checks: 0,
            mem_bytes: 1 << 26,
            vcpus: 1,
            console: String::new(),
            crash_reason: None,
            check_failures: 0,
            awaiting_handover: None,
            postcopy_paused: None,
            pid: (state != PartitionState::Stopped).then_some(1),
            process_rss_anon_bytes: None,
            unanswered_ms: None,
        };
        let flight = MigrationInfo {
            id: "p1.m1".into(),
            partition: "p1".into(),
            peer: None,
            side: "source".into(),
            mode: Mode::Precopy,
            strategy: Some(Strategy::Heat),
            phase: "precopy".into(),
            cancellable: true,
            progress: Some(MigrationProgress {
                remaining_bytes: 4096,
                ..MigrationProgress::default()
            }),
            started_unix_ms: None,
            status: None,
        };
        let ended = MigrationInfo {
            status: Some(MigrationStatus::Completed),
            ..flight.clone()
        };
        let snapshot = Snapshot {
            partitions: vec![
                partition("p1", PartitionState::Migrating, 10),
                partition("p2", PartitionState::Running, 20),
                partition("p3", PartitionState::Stopped, 30),
            ],
            migrations: vec![flight, ended],
            memory_used: 3 << 26,
            memory_free: 1 << 30,
        };
        let page = render(&Recorder::default(), &snapshot).unwrap();
        for (state, count) in [
            ("running", 1),
            ("migrating", 1),
            ("stopped", 1),
            ("crashed", 0),
        ] {
            let series = format!("migrator_partitions{{state=\"{state}\"}} {count}");
            assert!(page.lines().any(|l| l == series), "{series}: {page}");
        }
        let ops = "migrator_partition_guest_operations_total{partition=\"p2\"} 20";
        assert!(page.lines().any(|l| l == ops), "{page}");
        // A stopped partition has no process, and no guest to count.
        assert!(!page.contains("partition=\"p3\""), "{page}");
        let flights = "migrator_migrations_in_flight{side=\"source\",phase=\"precopy\"} 1";
        assert!(page.lines().any(|l| l == flights), "{page}");
        let left = "migrator_migration_remaining_bytes{partition=\"p1\"} 4096";
        assert!(page.lines().any(|l| l == left), "{page}");
    }
}
