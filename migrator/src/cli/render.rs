//! What the client prints of reports and partitions, as text.

use std::fmt::Write;

use migrator::{api::PartitionInfo, migration::MigrationReport};

/// Prints a migration's report: one JSON object, or its summary.
pub(crate) fn print_report(report: &MigrationReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", report_text(report));
    }
    Ok(())
}

/// A migration's report as a summary of a few lines.
pub(crate) fn report_text(report: &MigrationReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} in {} ms ({} rounds, {} pages sent, {} re-sent, {} zero), downtime {} ms, {:.0} Mbit/s",
        report.status,
        report.id_on_destination.as_deref().unwrap_or("-"),
        report.total_time_ms,
        report.rounds,
        report.pages_sent,
        report.pages_resent,
        report.zero_pages,
        report.downtime_ms,
        report.mbps
    );
    // A failed migration's limit was not kept or broken: it has no downtime to judge.
    if report.status == migrator::migration::MigrationStatus::Completed {
        let _ = writeln!(out, "{}", downtime_line(report));
    }
    if let Some(note) = &report.downtime_note {
        let _ = writeln!(out, "  {note}");
    }
    if report.bytes_uncompressed != report.bytes_sent {
        let _ = writeln!(out, "{}", compression_line(report));
    }
    if let Some(ratio) = report.guest_ops_ratio {
        let _ = writeln!(
            out,
            "guest ran at {:.0}% of its operations per second before the migration",
            ratio * 100.0
        );
    }
    match (&report.guest_work_lost, &report.guest_work_lost_note) {
        (Some(lost), _) => {
            let _ = writeln!(out, "{}", work_lost_line(lost));
        }
        (None, Some(why)) => {
            let _ = writeln!(out, "guest work lost {why}");
        }
        (None, None) => {}
    }
    if report.status == migrator::migration::MigrationStatus::Completed {
        let _ = writeln!(out, "{}", after_move_line(report));
    }
    if let Some(error) = &report.error {
        let _ = writeln!(out, "error: {error}");
    }
    out
}

/// The summary's line on the guest's whole bill, by part.
pub(crate) fn work_lost_line(lost: &migrator::migration::report::GuestWorkLost) -> String {
    let after = match lost.after_ms {
        Some(ms) => format!("{ms:.0}"),
        None => "not counted".into(),
    };
    format!(
        "guest work lost {:.0} ms at its pace before ({:.0} ops/s over {:.1} s) over {:.0} ms: \
         profile {:.0}, rounds {:.0}, throttle {:.0}, downtime {:.0}, after the resume {after}",
        lost.total_ms,
        lost.rate_before,
        lost.pace_ms / 1e3,
        lost.counted_ms,
        lost.profile_ms,
        lost.rounds_ms,
        lost.throttle_ms,
        lost.downtime_ms
    )
}

/// The summary's compression line: the bytes before and after, and the rates.
pub(crate) fn compression_line(report: &MigrationReport) -> String {
    let rates = match (report.round0_mbps, report.round0_wire_mbps) {
        (Some(pages), Some(wire)) => {
            format!("round 0 moved {pages:.0} Mbit/s of pages over {wire:.0} Mbit/s of wire")
        }
        _ => "round 0 was too quick to measure".into(),
    };
    format!(
        "compressed {} MiB of pages to {} MiB on the wire ({:.2}x); {rates}",
        report.bytes_uncompressed >> 20,
        report.bytes_sent >> 20,
        report.compression_ratio,
    )
}

/// The summary's downtime line: the total against the limit, then where it went.
pub(crate) fn downtime_line(report: &MigrationReport) -> String {
    let verdict = if report.downtime_limit_met {
        "within"
    } else {
        "not within"
    };
    format!(
        "downtime {} ms, {verdict} the {} ms limit: {}",
        report.downtime_ms,
        report.downtime_limit_ms,
        report.downtime_breakdown.summary()
    )
}

/// The summary's line on what the guest felt after the move: its stall, its faults over the
/// window, and (hybrid) how long demanded pages took.
pub(crate) fn after_move_line(report: &MigrationReport) -> String {
    let faults = match (
        &report.post_cutover_faults,
        &report.post_cutover_faults_note,
    ) {
        (Some(f), _) => format!(
            "{} local and {} remote faults in the {} ms after the resume",
            f.local, f.remote, f.window_ms
        ),
        (None, Some(why)) => format!("faults not counted: {why}"),
        (None, None) => "faults not counted (--fault-window 0)".into(),
    };
    let demand = match report.mode {
        migrator::migration::Mode::Hybrid => {
            let l = report.postcopy_fault_latency_us;
            format!(
                "; {} stale copies dropped before the pause, {} pages sent within the downtime, \
                 {} demanded (p50 {} µs, p99 {} µs, max {} µs)",
                report.discarded_pages,
                report.budgeted_pages,
                report.postcopy_requests,
                l.p50,
                l.p99,
                l.max
            )
        }
        migrator::migration::Mode::Precopy => String::new(),
    };
    format!(
        "guest stalled {:.0} ms (downtime and {:.1} ms blocked on missing pages); {faults}{demand}",
        report.guest_stall_ms, report.postcopy_blocktime_ms
    )
}

/// One line of a running migration's progress, for a progress bar.
pub(crate) fn progress_line(p: &migrator::migration::MigrationProgress) -> String {
    let throttle = if p.throttle_pct > 0 {
        format!("  throttle {}%", p.throttle_pct)
    } else {
        String::new()
    };
    format!(
        "{:?} round {}  remaining {} MiB  {:.0} MiB/s  expected downtime {} ms{throttle}",
        p.phase,
        p.round,
        p.remaining_bytes >> 20,
        p.rate_bytes_per_sec / (1 << 20) as f64,
        p.expected_downtime_ms
    )
}

pub(crate) fn table_text(list: &[PartitionInfo]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<14} {:<22} {:<9} {:>8} {:>5} {:>14} {:>7} {:>8}",
        "ID", "NAME", "IMAGE", "STATE", "MEM", "VCPUS", "OPS", "ERRORS", "CHECKS"
    );
    for info in list {
        let _ = writeln!(
            out,
            "{:<12} {:<14} {:<22} {:<9} {:>7}M {:>5} {:>14} {:>7} {:>8}",
            info.id,
            info.name.as_deref().unwrap_or("-"),
            info.image,
            state_shown(info),
            info.mem_bytes >> 20,
            info.vcpus,
            info.ops,
            info.errors,
            info.checks
        );
    }
    out
}

/// The state a table shows: `unanswered` for a partition whose process did not answer (its
/// other columns are what it last said).
pub(crate) fn state_shown(info: &PartitionInfo) -> String {
    match info.unanswered_ms {
        Some(_) => "unanswered".into(),
        None => info.state.name(),
    }
}

pub(crate) fn info_text(info: &PartitionInfo) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id:      {}", info.id);
    let _ = writeln!(out, "name:    {}", info.name.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "image:   {}", info.image);
    let _ = writeln!(out, "state:   {}", info.state.name());
    if let Some(ms) = info.unanswered_ms {
        let _ = writeln!(
            out,
            "process: has not answered for {:.1} s; what follows is what it last said",
            ms as f64 / 1e3
        );
    }
    if let Some(handover) = &info.awaiting_handover {
        let _ = writeln!(
            out,
            "awaits:  the handover of session {} on {} (`migrator reconcile {}` settles it)",
            handover.session, handover.peer, info.id
        );
    }
    if let Some(paused) = &info.postcopy_paused {
        let _ = writeln!(
            out,
            "holds:   the missing pages of session {} on {} (`migrator migrate --resume {}` \
             pushes them)",
            paused.session, paused.peer, info.id
        );
    }
    if let Some(reason) = &info.crash_reason {
        let _ = writeln!(out, "crashed: {reason}");
    }
    let _ = writeln!(
        out,
        "memory:  {} MiB, {} vCPUs",
        info.mem_bytes >> 20,
        info.vcpus
    );
    let _ = writeln!(
        out,
        "guest:   {} ops, {} errors, {} checks",
        info.ops, info.errors, info.checks
    );
    if let Some(pid) = info.pid {
        match info.process_rss_anon_bytes {
            Some(own) => {
                let _ = writeln!(
                    out,
                    "process: {pid}, {:.1} MiB of its own memory (guest memory apart)",
                    own as f64 / (1u64 << 20) as f64
                );
            }
            None => {
                let _ = writeln!(out, "process: {pid}");
            }
        }
    }
    if !info.console.is_empty() {
        let _ = writeln!(out, "console (recent):");
        let lines: Vec<&str> = info.console.lines().collect();
        for line in &lines[lines.len().saturating_sub(10)..] {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use migrator::{
        migration::{MigrationStatus, Mode, Strategy, report::GuestWorkLost},
        vmm::PartitionState,
    };

    use super::*;

    fn partition() -> PartitionInfo {
        PartitionInfo {
            id: "p0-abc".into(),
            name: None,
            image: "workload rw-mix".into(),
            state: PartitionState::Running,
            ops: 10,
            errors: 0,
            checks: 2,
            mem_bytes: 64 << 20,
            vcpus: 1,
            console: String::new(),
            crash_reason: None,
            check_failures: 0,
            awaiting_handover: None,
            postcopy_paused: None,
            pid: Some(42),
            process_rss_anon_bytes: None,
            unanswered_ms: None,
        }
    }

    #[test]
    fn a_completed_report_says_its_downtime_and_the_guests_bill() {
        let mut report = MigrationReport::new(Strategy::Heat, Mode::Precopy);
        report.status = MigrationStatus::Completed;
        report.downtime_ms = 12;
        report.downtime_limit_ms = 300;
        report.downtime_limit_met = true;
        report.guest_work_lost = Some(GuestWorkLost {
            total_ms: 40.0,
            downtime_ms: 12.0,
            rounds_ms: 28.0,
            after_ms: None,
            rate_before: 1000.0,
            counted_ms: 2000.0,
            ..GuestWorkLost::default()
        });
        let text = report_text(&report);
        assert!(text.starts_with("completed: "), "{text}");
        assert!(
            text.contains("downtime 12 ms, within the 300 ms limit"),
            "{text}"
        );
        assert!(text.contains("guest work lost 40 ms"), "{text}");
        assert!(text.contains("after the resume not counted"), "{text}");
        // A failure has no downtime to judge, and says its error.
        report.status = MigrationStatus::Failed;
        report.error = Some("the destination refused".into());
        let text = report_text(&report);
        assert!(!text.contains("within"), "{text}");
        assert!(text.ends_with("error: the destination refused\n"), "{text}");
    }

    #[test]
    fn a_partition_that_does_not_answer_is_shown_so() {
        let mut info = partition();
        assert!(table_text(std::slice::from_ref(&info)).contains("running"));
        info.unanswered_ms = Some(4200);
        let table = table_text(std::slice::from_ref(&info));
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(
            table.lines().nth(1).unwrap().contains("unanswered"),
            "{table}"
        );
        let text = info_text(&info);
        assert!(text.contains("has not answered for 4.2 s"), "{text}");
    }
}
