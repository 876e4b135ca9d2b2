//! A host's memory and processes as the load test watches them: its daemon's own memory
//! and its partition processes', their KVM VMs and threads, sampled while migrations run.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{ProcessMemory, daemon::partition_processes_in};

const MIB: u64 = 1 << 20;

/// A host's memory: its daemon's, and its partition processes' together.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostMemory {
    pub daemon: ProcessMemory,
    pub partitions: ProcessMemory,
    /// The largest own memory (RssAnon) of one partition process.
    pub largest_process_anon: u64,
    pub processes: usize,
}

impl HostMemory {
    pub fn of((daemon, dir): &(u32, PathBuf)) -> Self {
        let mut memory = Self {
            daemon: ProcessMemory::of(*daemon),
            ..Self::default()
        };
        for (_, pid) in partition_processes_in(dir) {
            // A process that ended since the directory was read counts for nothing.
            if let Some(process) = ProcessMemory::try_of(pid) {
                memory.partitions = memory.partitions.plus(process);
                memory.largest_process_anon = memory.largest_process_anon.max(process.rss_anon);
                memory.processes += 1;
            }
        }
        memory
    }

    /// Own memory of the daemon and every partition process.
    pub fn total_anon(&self) -> u64 {
        self.daemon.rss_anon + self.partitions.rss_anon
    }

    pub fn max(self, other: Self) -> Self {
        Self {
            daemon: self.daemon.max(other.daemon),
            partitions: self.partitions.max(other.partitions),
            largest_process_anon: self.largest_process_anon.max(other.largest_process_anon),
            processes: self.processes.max(other.processes),
        }
    }
}

impl std::fmt::Display for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "daemon RssAnon {:.1} MiB; {} partition processes: RssAnon {:.1} MiB together, \
             {:.1} MiB the largest, RssShmem {} MiB",
            self.daemon.rss_anon as f64 / MIB as f64,
            self.processes,
            self.partitions.rss_anon as f64 / MIB as f64,
            self.largest_process_anon as f64 / MIB as f64,
            self.partitions.rss_shmem / MIB
        )
    }
}

/// How many KVM VMs (open `kvm-vm` descriptors) a host's partition processes hold, and how
/// many threads they and the daemon run.
pub fn vms_and_threads((daemon, dir): &(u32, PathBuf)) -> (usize, usize) {
    let mut vms = 0;
    let mut threads = threads_of(*daemon);
    for (_, pid) in partition_processes_in(dir) {
        let (v, t) = process_vms_and_threads(pid);
        vms += v;
        threads += t;
    }
    (vms, threads)
}

pub fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// How many KVM VMs (open `kvm-vm` descriptors) and threads process `pid` has (none if it
/// is gone).
pub fn process_vms_and_threads(pid: u32) -> (usize, usize) {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let vms = fds
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:kvm-vm")
        })
        .count();
    (vms, threads_of(pid))
}

/// Samples both hosts' memory every 50 ms until told to stop; returns the peaks, and the
/// peak of each host's total own memory.
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<(HostMemory, u64)>>,
}

impl MemorySampler {
    pub fn start(hosts: Vec<(u32, PathBuf)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut peaks: Vec<(HostMemory, u64)> = hosts
                .iter()
                .map(|h| {
                    let memory = HostMemory::of(h);
                    (memory, memory.total_anon())
                })
                .collect();
            while !stopping.load(Ordering::Relaxed) {
                for ((peak, total), host) in peaks.iter_mut().zip(&hosts) {
                    let memory = HostMemory::of(host);
                    *peak = peak.max(memory);
                    *total = (*total).max(memory.total_anon());
                }
                thread::sleep(Duration::from_millis(50));
            }
            peaks
        });
        Self { stop, thread }
    }

    pub fn finish(self) -> Vec<(HostMemory, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the memory sampler")
    }
}
