//! Partitions on real KVM: every built-in workload runs and verifies itself, pause and resume,
//! throttling, save and restore into a fresh VM (and the CPUs a restore refuses), a guest image the test
//! builds itself, and bad input.

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{
    guest_images::{elf_image, handmade_image},
    kvm_unavailable, skip,
};
use kvm_ioctls::{Cap, Kvm};
use migrator::vmm::{
    GuestImage, GuestMemory, Partition, PartitionConfig, PartitionError, PartitionState,
    cpu::{CpuError, FEATURE_REGISTERS},
    memory::{GuestAddress, PAGE_SIZE},
};

fn builtin(workload: &str, args: &str, mem_mib: u64, vcpus: u32) -> PartitionConfig {
    PartitionConfig {
        name: Some(workload.into()),
        mem_size: mem_mib << 20,
        vcpus,
        image: GuestImage::Builtin(workload.into()),
        args: args.into(),
    }
}

/// Waits until the partition has done `ops` more operations and `checks` more full checks
/// than `from`, or fails with its status after `limit`.
fn wait_progress(partition: &Partition, ops: u64, checks: u64, limit: Duration) {
    let start = partition.status().progress;
    let deadline = Instant::now() + limit;
    loop {
        let status = partition.status();
        assert_eq!(status.state, PartitionState::Running, "{status:#?}");
        assert_eq!(status.progress.errors, 0, "{status:#?}");
        if status.progress.ops >= start.ops + ops && status.progress.checks >= start.checks + checks
        {
            return;
        }
        assert!(Instant::now() < deadline, "no progress: {status:#?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_builtin_workload_runs_and_checks_itself() {
    if let Some(why) = kvm_unavailable() {
        return skip("every_builtin_workload_runs_and_checks_itself", &why);
    }
    let cases = [
        ("kv-zipf", "keys=4096 check_every=20000", 2),
        ("scan", "", 1),
        ("rw-mix", "check_every=20000", 2),
        ("uniform-write", "check_every=20000", 1),
        ("fill", "check_every=20000", 1),
        ("fill", "content=random check_every=20000", 2),
        ("hotspot", "check_every=20000", 1),
        ("graded", "scatter=1 check_every=20000", 2),
        ("idle", "", 1),
    ];
    for (workload, args, vcpus) in cases {
        let partition = Partition::launch(builtin(workload, args, 32, vcpus))
            .unwrap_or_else(|e| panic!("{workload}: {e}"));
        let checks = if workload == "idle" { 0 } else { 2 };
        wait_progress(&partition, 20, checks, Duration::from_secs(20));
        let status = partition.status();
        assert!(
            status.console.contains(workload),
            "{workload}: {}",
            status.console
        );
        assert_eq!(status.check_failures, 0);
    }
}

#[test]
fn pause_then_resume_continues_without_errors() {
    if let Some(why) = kvm_unavailable() {
        return skip("pause_then_resume_continues_without_errors", &why);
    }
    let partition = Partition::launch(builtin("rw-mix", "check_every=5000", 32, 2)).unwrap();
    wait_progress(&partition, 1000, 1, Duration::from_secs(10));
    partition.pause().unwrap();
    assert_eq!(partition.state(), PartitionState::Paused);
    let frozen = partition.status().progress;
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        partition.status().progress,
        frozen,
        "a paused guest makes no progress"
    );
    partition.resume().unwrap();
    wait_progress(&partition, 1000, 2, Duration::from_secs(10));
}

/// Operations per second over `window`.
fn ops_rate(partition: &Partition, window: Duration) -> f64 {
    let before = partition.status().progress.ops;
    let start = Instant::now();
    thread::sleep(window);
    (partition.status().progress.ops - before) as f64 / start.elapsed().as_secs_f64()
}

#[test]
fn a_throttled_guest_runs_slower_pauses_at_once_and_recovers() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_throttled_guest_runs_slower", &why);
    }
    let partition = Partition::launch(builtin("uniform-write", "", 16, 2)).expect("launches");
    wait_progress(&partition, 1, 0, Duration::from_secs(10));
    let window = Duration::from_millis(500);
    let full = ops_rate(&partition, window);
    partition.set_throttle(75).expect("throttles");
    assert_eq!(partition.throttle_pct(), 75);
    let throttled = ops_rate(&partition, window);
    // Printed for docs/BENCHMARKS.md ("partitions"), which keeps the measured figures.
    eprintln!(
        "throttle 75%: {:.3} of the unthrottled rate",
        throttled / full
    );
    // A quarter of the time; generous bounds, for a noisy machine: they catch a throttle
    // not applied (about 1.0), not a machine's speed.
    assert!(
        throttled < full * 0.5,
        "75% throttle: {throttled:.0} ops/s against {full:.0} unthrottled"
    );
    assert!(throttled > 0.0, "a throttled guest still runs");
    // At 99% a vCPU naps 990 ms at a time, but a pause cuts the nap short.
    partition.set_throttle(99).expect("throttles");
    thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    partition.pause().expect("pauses");
    eprintln!("pause at a 99% throttle took {:?}", asked.elapsed());
    // A pause that waited out the nap would take up to 990 ms.
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "pausing a throttled guest took {:?}",
        asked.elapsed()
    );
    partition.resume().expect("resumes");
    partition.set_throttle(0).expect("unthrottles");
    assert_eq!(partition.throttle_pct(), 0);
    let after = ops_rate(&partition, window);
    assert!(
        after > full * 0.6,
        "unthrottled again: {after:.0} ops/s against {full:.0} before"
    );
    assert_eq!(partition.status().progress.errors, 0);
    partition.stop();
}

#[test]
fn save_and_restore_into_a_fresh_vm_continues_without_errors() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "save_and_restore_into_a_fresh_vm_continues_without_errors",
            &why,
        );
    }
    let source =
        Partition::launch(builtin("kv-zipf", "keys=8192 check_every=10000", 32, 2)).unwrap();
    wait_progress(&source, 5000, 1, Duration::from_secs(10));
    source.pause().unwrap();
    let snapshot = source.snapshot().unwrap();
    let digest = source.digest();
    let progress = source.status().progress;
    // Copy memory page by page, as a migration would.
    let memory = GuestMemory::new(snapshot.config.mem_size).unwrap();
    for frame in 0..memory.frames() {
        let mut page = [0u8; PAGE_SIZE as usize];
        source.memory().copy_frame(frame, &mut page).unwrap();
        memory
            .write(GuestAddress(frame * PAGE_SIZE), &page)
            .unwrap();
    }
    source.stop();
    let restored = Partition::restore(&snapshot, std::sync::Arc::new(memory), false).unwrap();
    assert_eq!(restored.state(), PartitionState::Paused);
    assert_eq!(restored.digest(), digest);
    assert_eq!(restored.status().progress, progress);
    restored.resume().unwrap();
    wait_progress(&restored, 5000, 2, Duration::from_secs(10));
}

/// A copy of a paused partition's memory, page by page, as a migration would make it.
fn copy_memory(source: &Partition) -> Arc<GuestMemory> {
    let memory = GuestMemory::new(source.config().mem_size).unwrap();
    let mut page = [0u8; PAGE_SIZE as usize];
    for frame in 0..memory.frames() {
        source.memory().copy_frame(frame, &mut page).unwrap();
        memory
            .write(GuestAddress(frame * PAGE_SIZE), &page)
            .unwrap();
    }
    Arc::new(memory)
}

#[test]
fn a_restore_refuses_a_cpu_this_host_cannot_give() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_restore_refuses_a_cpu_this_host_cannot_give", &why);
    }
    let source = Partition::launch(builtin("idle", "", 8, 1)).unwrap();
    wait_progress(&source, 3, 0, Duration::from_secs(5));
    source.pause().unwrap();
    let snapshot = source.snapshot().unwrap();
    // The guest was given this host's TSC rate, not a made-up one.
    let kvm = Kvm::new().unwrap();
    let probe = kvm.create_vm().unwrap().create_vcpu(0).unwrap();
    let host_khz = probe.get_tsc_khz().unwrap();
    assert_eq!(snapshot.cpu.tsc_khz.get(), host_khz);
    assert_eq!(source.tsc_khz(), u64::from(host_khz));

    let mut other_vendor = snapshot.clone();
    other_vendor.cpu.vendor = if &snapshot.cpu.vendor == b"GenuineIntel" {
        *b"AuthenticAMD"
    } else {
        *b"GenuineIntel"
    };
    let refused = Partition::restore(&other_vendor, copy_memory(&source), false);
    assert!(
        matches!(refused, Err(PartitionError::Cpu(CpuError::Vendor { .. }))),
        "{:?}",
        refused.err()
    );

    // A feature the guest saw that this host lacks: a clear bit of leaf 7's EBX.
    let at = FEATURE_REGISTERS
        .iter()
        .position(|&(leaf, subleaf, _)| (leaf, subleaf) == (7, 0))
        .unwrap();
    let lacking = !snapshot.cpu.features[at];
    if lacking != 0 {
        let mut more = snapshot.clone();
        more.cpu.features[at] |= 1 << lacking.trailing_zeros();
        let refused = Partition::restore(&more, copy_memory(&source), false);
        assert!(
            matches!(
                refused,
                Err(PartitionError::Cpu(CpuError::Features { leaf: 7, .. }))
            ),
            "{:?}",
            refused.err()
        );
    }

    // A TSC 10% faster: set where KVM scales guests' TSCs, refused where it cannot (this
    // nested PVM host has no KVM_CAP_TSC_CONTROL).
    let mut faster = snapshot.clone();
    faster.cpu.tsc_khz = faster.cpu.tsc_khz.saturating_add(host_khz / 10);
    let restored = Partition::restore(&faster, copy_memory(&source), false);
    match (restored, kvm.check_extension(Cap::TscControl)) {
        (Ok(partition), true) => assert_eq!(partition.cpu().tsc_khz, faster.cpu.tsc_khz),
        (Err(PartitionError::Cpu(CpuError::TscScaling { saved, host })), false) => {
            assert_eq!((saved, host), (faster.cpu.tsc_khz.get(), host_khz));
        }
        (other, scaling) => panic!("scaling {scaling}: {:?}", other.err()),
    }

    // The same host gives the guest the same CPU.
    let restored = Partition::restore(&snapshot, copy_memory(&source), true).unwrap();
    source.stop();
    assert_eq!(restored.cpu(), &snapshot.cpu);
    wait_progress(&restored, 3, 0, Duration::from_secs(5));
}

#[test]
fn a_handmade_image_runs_under_the_abi() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_handmade_image_runs_under_the_abi", &why);
    }
    let partition = Partition::launch(PartitionConfig {
        name: None,
        mem_size: 8 << 20,
        vcpus: 1,
        image: GuestImage::Elf(handmade_image()),
        args: "anything".into(),
    })
    .unwrap();
    wait_progress(&partition, 1_000_000, 0, Duration::from_secs(10));
    assert!(partition.status().console.contains("handmade guest up"));
    partition.pause().unwrap();
    partition.resume().unwrap();
    wait_progress(&partition, 1_000_000, 0, Duration::from_secs(10));
}

#[test]
fn a_guest_that_dies_is_crashed_with_its_reason() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_guest_that_dies_is_crashed_with_its_reason", &why);
    }
    // ud2 with no IDT: #UD, then a triple fault.
    let crashing = elf_image(0x20_0000, &[0x0F, 0x0B]);
    let partition = Partition::launch(PartitionConfig {
        name: None,
        mem_size: 8 << 20,
        vcpus: 1,
        image: GuestImage::Elf(crashing),
        args: String::new(),
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while partition.state() != PartitionState::Crashed {
        assert!(Instant::now() < deadline, "{:#?}", partition.status());
        thread::sleep(Duration::from_millis(10));
    }
    let reason = partition.status().crash_reason.unwrap();
    assert!(reason.contains("triple fault"), "{reason}");
    // Another partition is unaffected.
    let other = Partition::launch(builtin("idle", "", 8, 1)).unwrap();
    wait_progress(&other, 3, 0, Duration::from_secs(5));
}

#[test]
fn bad_input_gets_one_clear_error() {
    let bad = [
        (builtin("no-such-workload", "", 32, 1), "unknown workload"),
        (builtin("idle", "", 32, 0), "vCPUs"),
        (
            PartitionConfig {
                mem_size: (32 << 20) + 100,
                ..builtin("idle", "", 32, 1)
            },
            "multiple of 4096",
        ),
        (builtin("idle", "", 1 << 30, 1), "limited to"),
        (builtin("idle", &"x".repeat(300), 32, 1), "longer than"),
        (
            PartitionConfig {
                image: GuestImage::Elf(b"not an elf".to_vec()),
                ..builtin("idle", "", 32, 1)
            },
            "bad guest image",
        ),
        (
            PartitionConfig {
                image: GuestImage::Elf(elf_image(0x1000, &[0x90])),
                ..builtin("idle", "", 32, 1)
            },
            "bad guest image",
        ),
    ];
    for (config, expected) in bad {
        let error: PartitionError = match Partition::launch(config.clone()) {
            Ok(_) => panic!("{config:?} was accepted"),
            Err(e) => e,
        };
        assert!(
            error.to_string().contains(expected),
            "{error} (wanted {expected})"
        );
    }
}
