//! The source's migration engine against an in-process destination (the real receiving
//! `Session`, no daemons): a migration completes with equal digests in both modes, and a
//! failure at each phase rolls back as that phase says: resume here and abort there before
//! the guest runs on the destination, keep the paused copy after.

use std::time::Duration;

use heatprobe::{Access, HeatClass, PageHeat};
use heatprobe_tests::{bpf_unavailable, kvm_unavailable, skip};
use migrator::{
    migration::{
        MigrationStatus, Mode, Strategy,
        convergence::{Converge, CutoverReason, TimeoutStrategy},
        destination::ProbeSlot,
        report::PlanHeatOrigin,
        source::{MigrationOptions, PlanHeat},
    },
    vmm::PartitionState,
};

mod in_process;

use in_process::*;

#[test]
fn a_migration_completes_in_both_modes() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_migration_completes_in_both_modes", &why);
    }
    for mode in [Mode::Precopy, Mode::Hybrid] {
        let (report, source, seen) = run(mode, Fault::None);
        assert_eq!(
            report.status,
            MigrationStatus::Completed,
            "{mode:?}: {report:?}"
        );
        assert!(report.source_digest.is_some(), "{mode:?}");
        assert_eq!(report.source_digest, report.dest_digest, "{mode:?}");
        assert_eq!(source.state(), PartitionState::Stopped, "{mode:?}");
        assert!(seen.aborted.is_empty(), "{mode:?}");
        assert_downtime_accounted(
            &report,
            MigrationOptions::default().downtime_limit,
            &format!("{mode:?}"),
        );
        // rw-mix runs flat out: it did work before and during the migration.
        let ratio = report.guest_ops_ratio;
        assert!(ratio.is_some_and(|r| r > 0.0), "{mode:?}: {ratio:?}");
        let [arrived] = seen.arrived.as_slice() else {
            panic!("{mode:?}: {} partitions arrived", seen.arrived.len());
        };
        assert_runs_on(arrived, &format!("{mode:?} on the destination"));
        arrived.stop();
    }
}

/// What the guest feels after the move is measured on the destination, in both modes: its
/// faults over the fault window (local ones in pre-copy, remote ones too in hybrid mode), and
/// in hybrid mode how long its vCPU waited on missing pages.
#[test]
fn the_guests_faults_and_waits_after_the_move_are_counted() {
    let test = "the_guests_faults_and_waits_after_the_move_are_counted";
    if let Some(why) = kvm_unavailable().or_else(bpf_unavailable) {
        return skip(test, &why);
    }
    let probes = ProbeSlot::default();
    if let Err(e) = probes.get_or_load() {
        panic!("the probes load where BPF is available: {e}");
    }
    // Hybrid twice: with room in the downtime for the stale pages, and with a slow link and a
    // limit that leave room for almost none, so the guest resumes with them missing.
    let cases = [
        (Mode::Precopy, Duration::from_millis(300), None),
        (Mode::Hybrid, Duration::from_millis(300), None),
        (Mode::Hybrid, Duration::from_millis(1), Some(20_000_000)),
    ];
    for (mode, downtime_limit, bandwidth_limit) in cases {
        let options = MigrationOptions {
            strategy: Strategy::Address,
            mode,
            downtime_limit,
            bandwidth_limit,
            fault_window: Duration::from_millis(500),
            ..MigrationOptions::default()
        };
        // With room for almost nothing, a written region larger than one discard round's
        // least: its stale copies are dropped before the pause.
        let args = if bandwidth_limit.is_some() {
            "hot_rw=1024"
        } else {
            ""
        };
        let (report, _source, seen) =
            run_counting("rw-mix", args, &options, Fault::None, &probes, None);
        assert_eq!(
            report.source_digest, report.dest_digest,
            "{mode:?}: {report:?}"
        );
        let mode = (mode, downtime_limit);
        assert_eq!(
            report.status,
            MigrationStatus::Completed,
            "{mode:?}: {report:?}"
        );
        let faults = report
            .post_cutover_faults
            .unwrap_or_else(|| panic!("{mode:?}: {:?}", report.post_cutover_faults_note));
        assert_eq!(faults.window_ms, 500, "{mode:?}");
        // A fresh VM has no guest page tables mapped: the pages the guest touches fault once.
        assert!(faults.local > 0, "{mode:?}: {faults:?}");
        assert_eq!(report.postcopy_vcpu_blocktime_ms.len(), 1, "{mode:?}");
        match mode.0 {
            Mode::Precopy => {
                assert_eq!(faults.remote, 0, "{faults:?}");
                assert_eq!(report.postcopy_blocktime_ms, 0.0);
                assert_eq!(report.postcopy_vcpu_blocktime_ms, vec![0.0]);
            }
            // On loopback a 300 ms budget takes every stale page inside the downtime.
            Mode::Hybrid if downtime_limit.as_millis() >= 300 => {
                assert!(report.budgeted_pages > 0, "{report:?}");
                assert_eq!(faults.remote, 0, "{faults:?}: {report:?}");
            }
            Mode::Hybrid => {
                // rw-mix writes its region flat out: its pages are stale at the cutover, and
                // the guest touches them at once. Each demand comes from a fault on a missing
                // page; more than one fault may wait on one page.
                assert!(report.postcopy_requests > 0, "{report:?}");
                assert!(report.discarded_pages > 0, "{report:?}");
                assert!(
                    faults.remote >= report.postcopy_requests,
                    "{faults:?}: {report:?}"
                );
                assert!(report.postcopy_blocktime_ms > 0.0, "{report:?}");
                // One vCPU: all of them waited exactly when it did.
                let vcpu = report.postcopy_vcpu_blocktime_ms[0];
                assert!(
                    (vcpu - report.postcopy_blocktime_ms).abs() < 1e-6,
                    "{report:?}"
                );
            }
        }
        let stall = report.downtime_ms as f64 + report.postcopy_blocktime_ms;
        assert!((report.guest_stall_ms - stall).abs() < 1e-9, "{report:?}");
        for partition in &seen.arrived {
            partition.stop();
        }
    }
}

/// Heat carried by a previous migration plans the next one without a profile (no probes are
/// given here: a profile would fail), and goes on with the guest to the destination.
#[test]
fn carried_heat_plans_without_profiling_and_travels_on() {
    if let Some(why) = kvm_unavailable() {
        return skip("carried_heat_plans_without_profiling_and_travels_on", &why);
    }
    let pages: Vec<PageHeat> = (0..64)
        .map(|page| PageHeat {
            page,
            reads: 10,
            writes: 5,
            heat: 100.0 - page as f64,
            class: if page < 8 {
                HeatClass::Hot
            } else {
                HeatClass::Warm
            },
            access: Access::ReadWrite,
        })
        .collect();
    let carried = PlanHeat {
        pages: pages.clone().into(),
        measured: std::time::Instant::now(),
        origin: PlanHeatOrigin::Carried,
        spent: None,
    };
    for mode in [Mode::Precopy, Mode::Hybrid] {
        let options = MigrationOptions {
            strategy: Strategy::Heat,
            mode,
            ..MigrationOptions::default()
        };
        let (report, _source, seen) = run_counting(
            "rw-mix",
            "",
            &options,
            Fault::None,
            &ProbeSlot::default(),
            Some(carried.clone()),
        );
        assert_eq!(
            report.status,
            MigrationStatus::Completed,
            "{mode:?}: {report:?}"
        );
        assert_eq!(report.source_digest, report.dest_digest, "{mode:?}");
        assert_eq!(report.plan_heat, Some(PlanHeatOrigin::Carried), "{mode:?}");
        assert!(report.heat_carried, "{mode:?}");
        let [(session, heat)] = seen.carried.as_slice() else {
            panic!("{mode:?}: {} handed on", seen.carried.len());
        };
        assert_eq!(*session, 1, "{mode:?}");
        assert_eq!(heat.pages, pages, "{mode:?}");
        for partition in &seen.arrived {
            partition.stop();
        }
    }
    // Address order has no heat to hand on.
    let (report, _source, seen) = run(Mode::Precopy, Fault::None);
    assert_eq!(report.plan_heat, None);
    assert!(!report.heat_carried && seen.carried.is_empty());
    for partition in &seen.arrived {
        partition.stop();
    }
}

#[test]
fn a_failure_before_the_guest_runs_there_resumes_it_here() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_failure_before_the_guest_runs_there_resumes_it_here",
            &why,
        );
    }
    let cases = [
        (Mode::Precopy, Fault::PrepareRefused, false),
        (Mode::Precopy, Fault::Connect, true),
        (Mode::Precopy, Fault::CommitRefused, true),
        (Mode::Hybrid, Fault::Connect, true),
        (Mode::Hybrid, Fault::CommitRefused, true),
    ];
    for (mode, fault, had_session) in cases {
        let case = format!("{mode:?}, {fault:?}");
        let (report, source, seen) = run(mode, fault);
        assert_eq!(report.status, MigrationStatus::Failed, "{case}");
        assert!(report.error.is_some(), "{case}");
        assert!(!report.downtime_limit_met, "{case}");
        assert_eq!(report.downtime_note, None, "{case}");
        // Measured only once the rounds ran, which needs the data connection.
        assert_eq!(
            report.guest_ops_ratio.is_some(),
            had_session && fault != Fault::Connect,
            "{case}: {:?}",
            report.guest_ops_ratio
        );
        assert_runs_on(&source, &case);
        assert_eq!(
            seen.aborted,
            if had_session { vec![1] } else { vec![] },
            "{case}"
        );
        // Nothing runs on the destination: exactly one running copy.
        for arrived in &seen.arrived {
            assert_eq!(arrived.state(), PartitionState::Stopped, "{case}");
        }
        source.stop();
    }
}

#[test]
fn an_unanswered_commit_or_handover_leaves_one_copy_paused_awaiting_the_handover() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "an_unanswered_commit_or_handover_leaves_one_copy_paused_awaiting_the_handover",
            &why,
        );
    }
    for mode in [Mode::Precopy, Mode::Hybrid] {
        for fault in [Fault::CommitAnswerLost, Fault::HandoverAnswerLost] {
            let case = format!("{mode:?}, {fault:?}");
            let (report, source, seen) = run(mode, fault);
            assert_eq!(report.status, MigrationStatus::Failed, "{case}");
            // Neither resumed nor discarded: paused, saying whose handover it awaits, and
            // refusing to resume by itself.
            assert_eq!(source.state(), PartitionState::AwaitingHandover, "{case}");
            let handover = source.awaiting_handover().expect("awaiting");
            assert_eq!(handover.session, 1, "{case}");
            assert_eq!(handover.postcopy, mode == Mode::Hybrid, "{case}");
            assert!(source.resume().is_err(), "{case}");
            assert_eq!(source.state(), PartitionState::AwaitingHandover, "{case}");
            assert!(seen.aborted.is_empty(), "{case}: {:?}", seen.aborted);
            let [arrived] = seen.arrived.as_slice() else {
                panic!("{case}: {} partitions arrived", seen.arrived.len());
            };
            // The commit restored it parked; only a handover that came through runs it.
            match fault {
                Fault::CommitAnswerLost => {
                    assert_eq!(arrived.state(), PartitionState::Paused, "{case}");
                }
                _ => assert_runs_on(arrived, &case),
            }
            arrived.stop();
            source.stop();
        }
    }
}

/// Every page arrived and the destination finished, but its answer to `finish` was lost: the
/// source's recovery finds nothing to recover, asks `finish` again, gets the same answer, and
/// the migration completes.
#[test]
fn a_lost_finish_answer_is_asked_again_and_the_migration_completes() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_lost_finish_answer_is_asked_again_and_the_migration_completes",
            &why,
        );
    }
    let (report, source, seen) = run(Mode::Hybrid, Fault::FinishAnswerLost);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert!(report.source_digest.is_some());
    assert_eq!(report.source_digest, report.dest_digest, "{report:?}");
    assert_eq!(report.postcopy_recoveries, 0, "{report:?}");
    assert_eq!(source.state(), PartitionState::Stopped);
    for partition in &seen.arrived {
        partition.stop();
    }
}

/// The destination forgets the session in post-copy: there is nothing to recover, and the
/// source keeps the only complete copy, paused.
#[test]
fn a_failure_after_a_hybrid_cutover_keeps_the_paused_copy() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_failure_after_a_hybrid_cutover_keeps_the_paused_copy",
            &why,
        );
    }
    let (report, source, seen) = run(Mode::Hybrid, Fault::SessionLost);
    assert_eq!(report.status, MigrationStatus::Failed);
    let error = report.error.unwrap_or_default();
    assert!(error.contains("after cutover"), "{error}");
    // The session is gone there, so there is nothing to recover: one try.
    assert!(error.contains("in 1 tries"), "{error}");
    // The guest runs on the destination; the source keeps its copy, paused, untouched, and
    // refuses to run it beside that one.
    assert_eq!(source.state(), PartitionState::PostcopyPaused);
    let paused = source
        .postcopy_paused()
        .expect("what it holds the pages of");
    assert_eq!(paused.session, 1);
    assert!(source.resume().is_err());
    assert_eq!(source.state(), PartitionState::PostcopyPaused);
    assert!(seen.aborted.is_empty());
    let [arrived] = seen.arrived.as_slice() else {
        panic!("{} partitions arrived", seen.arrived.len());
    };
    assert_runs_on(arrived, "hybrid on the destination");
    arrived.stop();
    source.stop();
}

/// Every connection breaks as the guest starts on the destination, before the push: the
/// source recovers the session over new ones, the destination says what it lacks, and the
/// migration completes with nothing lost.
#[test]
fn a_broken_postcopy_recovers_over_new_connections_and_completes() {
    let test = "a_broken_postcopy_recovers_over_new_connections_and_completes";
    if let Some(why) = kvm_unavailable() {
        return skip(test, &why);
    }
    // A slow link and a 1 ms limit: the guest resumes with its written pages missing.
    let options = MigrationOptions {
        strategy: Strategy::Address,
        mode: Mode::Hybrid,
        downtime_limit: Duration::from_millis(1),
        bandwidth_limit: Some(20_000_000),
        connections: 2,
        ..MigrationOptions::default()
    };
    let (report, source, seen) = run_with("rw-mix", "hot_rw=1024", &options, Fault::PostcopyCut);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(report.postcopy_recoveries, 1, "{report:?}");
    // rw-mix touches its stale pages at once: the faults that waited out the pause were
    // demanded again over the new urgent connection.
    assert!(report.postcopy_rerequests > 0, "{report:?}");
    assert!(report.source_digest.is_some());
    assert_eq!(report.source_digest, report.dest_digest, "{report:?}");
    assert_eq!(source.state(), PartitionState::Stopped);
    assert!(seen.aborted.is_empty());
    let [arrived] = seen.arrived.as_slice() else {
        panic!("{} partitions arrived", seen.arrived.len());
    };
    assert_runs_on(arrived, "recovered on the destination");
    arrived.stop();
}

#[test]
fn a_migration_that_cannot_meet_the_limit_throttles_then_cancels_and_the_guest_runs_on_here() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_migration_that_cannot_meet_the_limit_throttles", &why);
    }
    let (report, source, seen) =
        alone(|| run_with("uniform-write", WRITE_ONLY, &cannot_converge(), Fault::None));
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("did not converge"), "{error}");
    assert!(report.throttle_pct_max >= 20, "{report:?}");
    assert_eq!(report.cutover_reason, None);
    assert_eq!(report.rounds, 4);
    // Rolled back: running here at full speed, the destination's session aborted, nothing
    // restored there.
    assert_eq!(source.throttle_pct(), 0);
    assert_runs_on(&source, "cancelled");
    assert_eq!(seen.aborted, vec![1]);
    assert!(seen.arrived.is_empty());
    source.stop();
}

#[test]
fn force_cuts_over_at_the_round_limit_and_says_the_limit_was_missed() {
    if let Some(why) = kvm_unavailable() {
        return skip("force_cuts_over_at_the_round_limit", &why);
    }
    let options = MigrationOptions {
        timeout_strategy: TimeoutStrategy::Force,
        ..cannot_converge()
    };
    let (report, source, seen) =
        alone(|| run_with("uniform-write", WRITE_ONLY, &options, Fault::None));
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(report.source_digest, report.dest_digest);
    assert_eq!(report.cutover_reason, Some(CutoverReason::MaxRounds));
    assert!(report.throttle_pct_max >= 20, "{report:?}");
    assert!(report.downtime_ms > 20, "{report:?}");
    let [arrived] = seen.arrived.as_slice() else {
        panic!("{} partitions arrived", seen.arrived.len());
    };
    // The restored copy is not throttled.
    assert_eq!(arrived.throttle_pct(), 0);
    assert_runs_on(arrived, "forced, on the destination");
    arrived.stop();
    source.stop();
}

#[test]
fn the_timeout_cancels_mid_round() {
    if let Some(why) = kvm_unavailable() {
        return skip("the_timeout_cancels_mid_round", &why);
    }
    // Round 0 alone would take 16 MiB / 4 MB/s = 4.2 s; pages go in batches of 4 MiB.
    let options = MigrationOptions {
        bandwidth_limit: Some(4_000_000),
        timeout: Some(Duration::from_millis(1500)),
        ..cannot_converge()
    };
    let (report, source, seen) = run_with("uniform-write", WRITE_ONLY, &options, Fault::None);
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("timeout"), "{error}");
    assert_eq!(report.rounds, 1);
    assert!(report.pages_sent < report.pages_total, "{report:?}");
    assert_runs_on(&source, "timed out");
    assert_eq!(seen.aborted, vec![1]);
    source.stop();
}

#[test]
fn contradictory_options_are_refused_before_anything_is_asked() {
    if let Some(why) = kvm_unavailable() {
        return skip("contradictory_options_are_refused", &why);
    }
    let options = MigrationOptions {
        converge: Some(Converge::Postcopy),
        ..MigrationOptions::default()
    };
    let (report, source, seen) = run_with("rw-mix", "", &options, Fault::None);
    assert_eq!(report.status, MigrationStatus::Failed);
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("--mode hybrid"), "{error}");
    assert_eq!(report.pages_sent, 0);
    assert_runs_on(&source, "refused options");
    assert!(seen.aborted.is_empty() && seen.arrived.is_empty());
    source.stop();
}

/// A status call between the commit and the handover reads only pages that are there: the
/// pages the VMM reads travel within the downtime whatever its budget, and a page that is
/// not there is never waited on. (It once waited for good: nothing brings a page before the
/// handover, and the handover waited behind it.)
#[test]
fn a_status_call_before_the_handover_never_waits_on_a_missing_page() {
    let test = "a_status_call_before_the_handover_never_waits_on_a_missing_page";
    if let Some(why) = kvm_unavailable() {
        return skip(test, &why);
    }
    // Every page stale at the pause, and no budget to send any of them in the downtime.
    let options = MigrationOptions {
        strategy: Strategy::Address,
        mode: Mode::Hybrid,
        max_rounds: 1,
        downtime_limit: Duration::from_millis(1),
        ..MigrationOptions::default()
    };
    let (report, _, seen) = run_with("uniform-write", "", &options, Fault::StatusBeforeHandover);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(report.source_digest, report.dest_digest);
    let took = seen.status_before_handover;
    assert!(took.is_some(), "the status call waited over 5 s");
    for arrived in &seen.arrived {
        arrived.stop();
    }
}

/// Digests decide: a pre-copy destination whose memory is not the source's never runs the
/// guest; the source resumes and the destination's copy is dropped.
#[test]
fn a_precopy_whose_digests_differ_resumes_here_and_never_completes() {
    let test = "a_precopy_whose_digests_differ_resumes_here_and_never_completes";
    if let Some(why) = kvm_unavailable() {
        return skip(test, &why);
    }
    let (report, source, seen) = run(Mode::Precopy, Fault::WrongDigest);
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("digest"), "{error}");
    assert_runs_on(&source, test);
    assert_eq!(
        seen.aborted,
        vec![1],
        "the destination's session is aborted"
    );
    source.stop();
}
