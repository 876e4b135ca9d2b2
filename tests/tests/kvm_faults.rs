//! heatprobe on a real KVM guest: exact per-frame fault counts, and active sampling that keeps
//! faults flowing so heat measures frequency, not just first touch.

use std::{collections::BTreeMap, sync::Arc};

use heatprobe::{
    Access, HeatClass, HeatConfig, MigrationPlan, PageCounts, Probes, Profiler, Target,
    profiler::ProfilerConfig,
};
use heatprobe_tests::{
    bpf_unavailable, kvm_unavailable, skip,
    testvm::{DATA, PAGE, TestVm},
};

const MEM: usize = 8 << 20;

fn unavailable() -> Option<String> {
    bpf_unavailable().or_else(kvm_unavailable)
}

fn frame(index: u64) -> u64 {
    DATA / PAGE + index
}

/// Counts restricted to the data frames (the code, touch list and page tables fault too).
fn data_counts(counts: &BTreeMap<u64, PageCounts>) -> BTreeMap<u64, PageCounts> {
    counts
        .iter()
        .filter(|(f, _)| **f >= DATA / PAGE)
        .map(|(f, c)| (*f, *c))
        .collect()
}

#[test]
fn exact_gfn_counts_for_a_guest() {
    if let Some(why) = unavailable() {
        return skip("exact_gfn_counts_for_a_guest", &why);
    }
    let probes = Probes::load().expect("load probes");
    let vm = TestVm::new(MEM).expect("test VM");
    let target = probes.track_vcpus(&[vm.vcpu_tid()]).expect("track vCPU");
    let reads = [0, 1, 7, 100];
    let writes = [3, 4, 200];
    let mut touches: Vec<(u64, bool)> = reads.iter().map(|&i| (frame(i) * PAGE, false)).collect();
    touches.extend(writes.iter().map(|&i| (frame(i) * PAGE + 8, true)));
    vm.set_touch_list(&touches).expect("touch list");
    vm.run_pass().expect("guest pass");
    // A second pass faults nothing new: the frames stay mapped.
    vm.run_pass().expect("guest pass");
    let mut expected = BTreeMap::new();
    for i in reads {
        expected.insert(
            frame(i),
            PageCounts {
                reads: 1,
                writes: 0,
            },
        );
    }
    for i in writes {
        expected.insert(
            frame(i),
            PageCounts {
                reads: 0,
                writes: 1,
            },
        );
    }
    assert_eq!(
        data_counts(&probes.counts(target).expect("counts")),
        expected
    );
    assert_eq!(probes.stats().expect("stats").dropped, 0);
}

#[test]
fn guest_faults_of_an_untracked_vm_are_not_counted() {
    if let Some(why) = unavailable() {
        return skip("guest_faults_of_an_untracked_vm_are_not_counted", &why);
    }
    let probes = Probes::load().expect("load probes");
    let tracked = TestVm::new(MEM).expect("test VM");
    let other = TestVm::new(MEM).expect("test VM");
    let target = probes.track_vcpus(&[tracked.vcpu_tid()]).expect("track");
    other
        .set_touch_list(&[(frame(50) * PAGE, true)])
        .expect("touch list");
    other.run_pass().expect("guest pass");
    assert!(
        !probes
            .counts(target)
            .expect("counts")
            .contains_key(&frame(50)),
        "another VM's fault was counted"
    );
    assert_eq!(probes.chunk_count().expect("map"), 0);
}

#[test]
fn active_sampling_measures_how_often_frames_are_used() {
    if let Some(why) = unavailable() {
        return skip("active_sampling_measures_how_often_frames_are_used", &why);
    }
    let probes = Arc::new(Probes::load().expect("load probes"));
    let vm = TestVm::new(MEM).expect("test VM");
    let mut profiler = Profiler::start(
        probes,
        Target::Vm {
            pid: std::process::id(),
            vcpu_threads: Some(vec![vm.vcpu_tid()]),
        },
        ProfilerConfig {
            heat: HeatConfig {
                decay: 0.9,
                ..HeatConfig::default()
            },
            // Every frame re-armed every epoch, so each pass faults each touched frame once.
            sample_fraction: 1.0,
            ..ProfilerConfig::default()
        },
    )
    .expect("profile the VM");
    profiler.set_sampler(Box::new(vm.sampler()));

    let hot_reads: Vec<u64> = (0..8).collect();
    let hot_writes: Vec<u64> = (8..12).collect();
    let cold: Vec<u64> = (100..140).collect();
    let hot_touches: Vec<(u64, bool)> = hot_reads
        .iter()
        .map(|&i| (frame(i) * PAGE, false))
        .chain(hot_writes.iter().map(|&i| (frame(i) * PAGE, true)))
        .collect();
    let mut first: Vec<(u64, bool)> = hot_touches.clone();
    first.extend(cold.iter().map(|&i| (frame(i) * PAGE, false)));
    vm.set_touch_list(&first).expect("touch list");
    vm.run_pass().expect("pass");
    profiler.end_epoch().expect("epoch");
    vm.set_touch_list(&hot_touches).expect("touch list");
    let passes = 6;
    for _ in 0..passes {
        vm.run_pass().expect("pass");
        profiler.end_epoch().expect("epoch");
    }

    let totals = profiler.totals();
    for &i in &hot_reads {
        assert_eq!(
            totals[&frame(i)],
            PageCounts {
                reads: passes + 1,
                writes: 0
            },
            "hot read frame {i}"
        );
    }
    for &i in &hot_writes {
        assert_eq!(
            totals[&frame(i)],
            PageCounts {
                reads: 0,
                writes: passes + 1
            },
            "hot written frame {i}"
        );
    }
    for &i in &cold {
        assert_eq!(
            totals[&frame(i)],
            PageCounts {
                reads: 1,
                writes: 0
            },
            "cold frame {i}"
        );
    }

    let pages = profiler.heat().pages();
    let by_frame: BTreeMap<u64, _> = pages.iter().map(|p| (p.page, *p)).collect();
    for &i in hot_reads.iter().chain(&hot_writes) {
        assert_eq!(by_frame[&frame(i)].class, HeatClass::Hot, "frame {i}");
    }
    for &i in &cold {
        assert_eq!(by_frame[&frame(i)].class, HeatClass::Cold, "frame {i}");
        assert_eq!(by_frame[&frame(i)].access, Access::ReadOnly);
    }
    for &i in &hot_writes {
        assert_eq!(by_frame[&frame(i)].access, Access::ReadWrite);
    }

    // The plan sends written frames first (cold to hot), read-only frames hot to cold, and
    // the never-touched frames last.
    let frames = (MEM as u64) / PAGE;
    let plan = MigrationPlan::build(&pages, Some(0..frames)).expect("plan");
    assert_eq!(plan.len(), frames);
    let position: BTreeMap<u64, usize> = plan.order().enumerate().map(|(i, f)| (f, i)).collect();
    let last_hot_read = hot_reads
        .iter()
        .map(|&i| position[&frame(i)])
        .max()
        .unwrap();
    let first_cold = cold.iter().map(|&i| position[&frame(i)]).min().unwrap();
    assert!(
        last_hot_read < first_cold,
        "hot read-only frames go before cold ones"
    );
    let last_written = hot_writes
        .iter()
        .map(|&i| position[&frame(i)])
        .max()
        .unwrap();
    assert!(
        last_written < position[&frame(150)],
        "untouched frames go last"
    );
}
