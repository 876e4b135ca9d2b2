//! `cargo xtask bench SUITE`: runs a benchmark binary and prints its Markdown report.

use std::process::Command;

use anyhow::Result;
use clap::ValueEnum;

use crate::{build::release_bin, process::run};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Suite {
    /// Probe cost per event, slowdown of a fault-heavy process, map memory per page.
    Heatprobe,
    /// Guest ops/s in a partition against the same code on the host; launch time of 1 GiB.
    Partitions,
    /// Heat against address order over a shaped link between two network namespaces (and
    /// `loopback`, `tls`, `compress`: the page stream's rate, TLS's cost, compression's).
    Migration,
    /// Recall of the daemon's heat against guests' known hot sets, and the guest's slowdown
    /// while profiled, per sampling configuration.
    Heat,
    /// Warm heat at the default budget: its recall against time, and what keeping it costs a
    /// flat-out guest.
    Warm,
    /// What each step of the page stream costs a page alone: the zero check, the hash, the
    /// copy out of guest memory, the write into fresh memory.
    Pages,
    /// A model of the demands after a hybrid cutover on workloads of known popularity: what
    /// the best order (the true popularity) leaves against address order.
    OrderBound,
    /// Heat against address order and against the oracle (the workload's true popularity as
    /// a heat file) on the shaped link: heat's share of the best saving any order could make.
    Oracle,
}

pub fn bench(suite: Suite, args: &[String]) -> Result<()> {
    let name = match suite {
        Suite::Heatprobe => "bench_heatprobe",
        Suite::Partitions => "bench_partitions",
        Suite::Migration => "bench_migration",
        Suite::Heat => "bench_heat",
        Suite::Warm => "bench_warm",
        Suite::Pages => "bench_pages",
        Suite::OrderBound => "model_postcopy",
        Suite::Oracle => "bench_oracle",
    };
    run(Command::new(release_bin(name)).args(args), name)
}
