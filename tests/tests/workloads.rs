//! The workloads whose hot data sits where users' does: `hotspot` and `graded`, flat and
//! scattered, and `kv-zipf` plain and scrambled. Each runs in a real partition, migrates once
//! between two daemons on loopback with equal digests and keeps checking itself with zero
//! errors; and the pages the host-side model (`workloads::popularity`) ranks hottest are the
//! ones the guest really wrote most.

use std::{
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{bpf_unavailable, daemon::Daemon, kvm_unavailable, skip, skip_part};
use migrator::vmm::{
    GuestImage, Partition, PartitionConfig, PartitionState, loader::Image, memory::GuestAddress,
    partition::BUILTIN_IMAGE,
};
use migrator_guest::{
    abi::STACK_SIZE,
    workloads::{popularity, vcpu_share},
};

const CASES: [(&str, &str, u32); 6] = [
    ("hotspot", "check_every=20000", 1),
    ("hotspot", "scatter=1 hot=1/32 check_every=20000", 2),
    ("graded", "check_every=20000", 1),
    ("graded", "scatter=1 alpha=0.8 check_every=20000", 2),
    ("kv-zipf", "keys=4096 check_every=20000", 1),
    ("kv-zipf", "keys=4096 scramble=1 check_every=20000", 2),
];

#[test]
fn hot_sets_flat_and_scattered_run_and_migrate_without_errors() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "hot_sets_flat_and_scattered_run_and_migrate_without_errors",
            &why,
        );
    }
    let strategy = match bpf_unavailable() {
        None => "heat",
        Some(why) => {
            skip_part("the heat strategy of hot_sets_flat_and_scattered", &why);
            "address"
        }
    };
    let source = Daemon::start();
    let destination = Daemon::start();
    for (workload, args, vcpus) in CASES {
        let case = format!("{workload} {args}");
        let id = source.json(&[
            "launch",
            "--workload",
            workload,
            "--args",
            args,
            "--mem",
            "16M",
            "--vcpus",
            &vcpus.to_string(),
        ])["id"]
            .as_str()
            .expect("an id")
            .to_string();
        let before = source.wait_progress(&id, 1000, 1);
        let after = source.wait_progress(&id, before["ops"].as_u64().unwrap() + 1000, 2);
        assert_eq!(after["errors"], 0, "{case}: {after}");
        let (_, new_id) = source.migrate_checked(
            &destination,
            &id,
            &["--profile-window", "200ms", "--strategy", strategy],
            &case,
        );
        // Past the next full check: every page of the copy read back as it should be.
        destination.runs_clean(&new_id, 1000, 1, &case);
        destination.json(&["stop", &new_id]);
    }
}

#[test]
fn the_modelled_hottest_pages_are_the_ones_a_guest_writes_most() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "the_modelled_hottest_pages_are_the_ones_a_guest_writes_most",
            &why,
        );
    }
    const MEM: u64 = 16 << 20;
    let image = BUILTIN_IMAGE.expect("built with cargo xtask build");
    // The guest's memory starts at its image's page-aligned end (its linker script says so).
    let image_end = Image::parse(image, MEM, STACK_SIZE)
        .expect("the built-in image parses")
        .end()
        .0
        .next_multiple_of(4096);
    let share = vcpu_share(image_end, MEM, 1, 0);
    // Write-only, so a data page's version counts its writes. `hotspot`'s hot pages weigh
    // alike, so all of them are compared (None); `graded`'s top k are clearly apart.
    for (workload, args, k) in [
        ("hotspot", "scatter=1 seed=7 check_every=1000000", None),
        (
            "graded",
            "scatter=1 seed=7 write=1 check_every=1000000",
            Some(8),
        ),
    ] {
        let config = PartitionConfig {
            name: None,
            mem_size: MEM,
            vcpus: 1,
            image: GuestImage::Builtin(workload.into()),
            args: args.into(),
        };
        let model = popularity(&config.boot_args(), share.end - share.start)
            .unwrap_or_else(|e| panic!("{workload}: {e:?}"));
        let partition = Partition::launch(config).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while partition.status().progress.ops < 400_000 {
            let status = partition.status();
            assert_eq!(status.state, PartitionState::Running, "{status:#?}");
            assert!(Instant::now() < deadline, "no progress: {status:#?}");
            thread::sleep(Duration::from_millis(20));
        }
        partition.pause().unwrap();
        assert_eq!(partition.status().progress.errors, 0);
        let word = |page: usize, index: usize| {
            let at = share.start + page as u64 * 4096 + index as u64 * 8;
            partition
                .memory()
                .read_u64_volatile(GuestAddress(at))
                .unwrap()
        };
        let data = model.data_pages();
        // The model's page numbers are the guest's: data page d carries index d in word 0.
        for d in [0, 1, data.len() - 1] {
            let id = word(data.start + d, 0);
            assert_eq!(
                (id & 0xff_ffff_ffff, id >> 40 != 0),
                (d as u64, true),
                "{workload}"
            );
        }
        let lightest = data
            .clone()
            .map(|p| model.weight(p))
            .fold(f64::MAX, f64::min);
        let k = k.unwrap_or_else(|| {
            data.clone()
                .filter(|&p| model.weight(p) > 2.0 * lightest)
                .count()
        });
        // Data page d's version is word d of the table at the start of the share.
        let mut by_writes: Vec<usize> = (0..data.len()).collect();
        by_writes.sort_by_key(|&d| std::cmp::Reverse(word(d / 512, d % 512)));
        let mut measured: Vec<usize> = by_writes[..k].iter().map(|d| d + data.start).collect();
        let mut modelled: Vec<usize> = model
            .ranking()
            .into_iter()
            .filter(|p| data.contains(p))
            .take(k)
            .collect();
        measured.sort_unstable();
        modelled.sort_unstable();
        assert_eq!(measured, modelled, "{workload} {args}");
        partition.stop();
    }
}
