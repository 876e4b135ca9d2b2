//! The guest side of the migrator: the guest ABI v1 types (shared with the VMM, so the two
//! cannot drift apart) and the built-in workloads.
//!
//! The workloads are written against [`Platform`], so the same code runs inside a partition
//! (the `migrator-guest` binary) and as a host function (the partitions benchmark compares the
//! two).
#![no_std]

// On the host (tests, benchmarks), [`workloads::Popularity::ranking`] returns a `Vec`; the
// guest image has no allocator and never sees it.
#[cfg(not(target_os = "none"))]
extern crate alloc;

pub mod abi;
pub mod args;
pub mod perm;
pub mod rng;
pub mod workloads;
pub mod zipf;

pub use abi::{BootInfo, Progress};

/// What a workload needs from wherever it runs.
pub trait Platform {
    /// A monotonic tick counter (the TSC in a guest).
    fn ticks(&self) -> u64;
    /// Ticks per millisecond.
    fn ticks_per_ms(&self) -> u64;
    /// Publishes progress counters.
    fn report(&mut self, progress: &Progress);
    /// Reports a failed self-check with two words of detail.
    fn check_failed(&mut self, detail0: u64, detail1: u64);
    /// Writes to the console.
    fn console(&mut self, text: &str);
    /// Waits, ideally without burning a CPU, for at most `nanos` nanoseconds.
    fn sleep(&mut self, nanos: u64);
    /// Whether the workload should return (a host benchmark's budget is spent). Guests run
    /// until the VMM stops them.
    fn should_stop(&self, progress: &Progress) -> bool;
}
