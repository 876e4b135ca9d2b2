//! The eBPF side of heatprobe: one [`Probes`] is one loaded copy of the eBPF object with its
//! own maps. It is internally locked, so a daemon profiling several targets shares one
//! `Arc<Probes>`.
//!
//! `load` loads the programs and attaches them (with `tracefs` for the format-file offsets),
//! `maps` tracks targets and reads the counts the programs keep.

mod load;
mod maps;
pub mod tracefs;

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use aya::{EbpfError, maps::MapError, programs::ProgramError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use self::maps::Loaded;
pub use self::{load::has_privileges, tracefs::TracefsError};

/// When each page last faulted, by page, in the probes' wrapping units
/// (`heatprobe_ebpf::FAULT_TIME_SHIFT`; see [`fault_time`] and [`fault_wait_ns`]).
pub type LastFaults = BTreeMap<u64, u16>;

/// Nanoseconds in one unit of the probes' fault times (16.384 µs).
pub const FAULT_TIME_UNIT_NS: u64 = 1 << heatprobe_ebpf::FAULT_TIME_SHIFT;

/// [`monotonic_ns`] nanoseconds `ns` in the units the probes time faults by.
pub fn fault_time(ns: u64) -> u16 {
    (ns >> heatprobe_ebpf::FAULT_TIME_SHIFT) as u16
}

/// How long after `since` (a [`fault_time`]) a page faulted at `fault`, in nanoseconds, to
/// the units' 16 µs, given that it faulted within `elapsed_ns` of `since`. `None` if that is
/// longer than the units take to wrap, so the wait cannot be told.
pub fn fault_wait_ns(since: u16, fault: u16, elapsed_ns: u64) -> Option<u64> {
    if elapsed_ns >= heatprobe_ebpf::FAULT_TIME_WRAP_NS {
        return None;
    }
    Some(u64::from(fault.wrapping_sub(since)) * FAULT_TIME_UNIT_NS)
}

/// Now on the clock the probes time faults by (`bpf_ktime_get_ns`, CLOCK_MONOTONIC), in
/// nanoseconds.
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "loading eBPF programs needs root (or CAP_BPF and CAP_PERFMON); run heatprobe with sudo"
    )]
    NotPrivileged,
    #[error("this heatprobe was built without its eBPF object; build it with `cargo xtask build`")]
    NotBuilt,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("the kernel refused the eBPF object")]
    Load(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("cannot load or attach the `{program}` program")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("cannot use the `{map}` map")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the tracepoint {0} is not available on this kernel, so this target cannot be profiled"
    )]
    EventUnavailable(&'static str),
    #[error("target {0:?} is not tracked")]
    UnknownTarget(TargetId),
    #[error("cannot read the map's memory use")]
    MapMemory(#[source] std::io::Error),
}

/// A tracked process or VM, as the probes know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(u32);

impl TargetId {
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Fault counts of one page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    pub reads: u64,
    pub writes: u64,
}

/// What each page of `now` counted since `before` (both cumulative counts of one target), as
/// an epoch's input to a heat map. A count that went backwards counts as none.
pub fn counts_since(
    now: &BTreeMap<u64, PageCounts>,
    before: &BTreeMap<u64, PageCounts>,
) -> Vec<(u64, PageCounts)> {
    now.iter()
        .map(|(&page, now)| {
            let before = before.get(&page).copied().unwrap_or_default();
            (
                page,
                PageCounts {
                    reads: now.reads.saturating_sub(before.reads),
                    writes: now.writes.saturating_sub(before.writes),
                },
            )
        })
        .collect()
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStats {
    /// Faults lost because the counts map was full.
    pub dropped: u64,
    /// Counted faults that hit a present page.
    pub protection: u64,
    /// Events whose fields could not be read.
    pub read_errors: u64,
}

/// What happened to one tracepoint program at load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStatus {
    /// `category:event`.
    pub event: &'static str,
    pub attached: bool,
    /// The program attached: a raw tracepoint reads the event's arguments, a classic one its
    /// record at offsets from the format file.
    pub program: Option<&'static str>,
    /// Why it was skipped, if it was.
    pub skipped_because: Option<String>,
}

/// The event process targets need.
pub const PROCESS_EVENT: &str = "exceptions:page_fault_user";
/// The event VM targets need.
pub const VM_EVENT: &str = "kvmmmu:kvm_mmu_spte_requested";

/// A loaded, attached copy of the heatprobe eBPF object.
pub struct Probes {
    status: Vec<ProbeStatus>,
    loaded: Mutex<Loaded>,
}

impl Probes {
    /// What was attached and what was skipped.
    pub fn status(&self) -> &[ProbeStatus] {
        &self.status
    }

    /// Whether `event` (`category:name`) is attached.
    pub fn is_attached(&self, event: &str) -> bool {
        self.status.iter().any(|s| s.event == event && s.attached)
    }

    fn lock(&self) -> MutexGuard<'_, Loaded> {
        // A panic while holding the lock leaves only plain map handles behind; keep going.
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_waits_are_told_across_a_wrap_but_not_past_one() {
        let unit = FAULT_TIME_UNIT_NS;
        let armed = 65_530 * unit;
        let since = fault_time(armed);
        // Ten units later, across the wrap of the 16-bit time.
        let fault = fault_time(armed + 10 * unit);
        assert!(fault < since);
        assert_eq!(fault_wait_ns(since, fault, 20 * unit), Some(10 * unit));
        assert_eq!(fault_wait_ns(since, since, 0), Some(0));
        // A page that may have faulted a whole wrap later cannot be timed.
        let wrap = heatprobe_ebpf::FAULT_TIME_WRAP_NS;
        assert_eq!(fault_wait_ns(since, fault, wrap), None);
        assert_eq!(wrap, 65_536 * unit);
    }
}
