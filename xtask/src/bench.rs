//! `cargo xtask bench SUITE`: runs a benchmark binary and prints its Markdown report.

use std::process::Command;

use anyhow::Result;
use clap::ValueEnum;

use crate::{build::release_bin, process::run};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Suite {
    /// Probe cost per event, slowdown of a fault-heavy process, map memory per page.
    Heatprobe,
}

pub fn bench(suite: Suite) -> Result<()> {
    match suite {
        Suite::Heatprobe => run(
            &mut Command::new(release_bin("bench_heatprobe")),
            "bench_heatprobe",
        ),
    }
}
