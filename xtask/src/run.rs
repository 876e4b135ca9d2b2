//! `cargo xtask run`: the demo. Until the dashboard lands it starts a small workload, profiles
//! it with heatprobe and prints the heat table. `cargo xtask run -- ARGS` runs
//! `heatprobe ARGS` instead.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::{build::release_bin, process::run as run_command};

pub fn run(args: &[String]) -> Result<()> {
    let heatprobe = release_bin("heatprobe");
    if !args.is_empty() {
        return run_command(Command::new(&heatprobe).args(args), "heatprobe");
    }
    let me = std::env::current_exe().context("locating xtask")?;
    let mut workload = Command::new(me)
        .arg("demo-workload")
        .stdin(Stdio::piped())
        .spawn()
        .context("starting the demo workload")?;
    eprintln!(
        "xtask: demo workload is pid {}: a hot region re-touched every 20 ms (half read, half \
         written), a warm one every 200 ms, a cold one touched once",
        workload.id()
    );
    let result = run_command(
        Command::new(&heatprobe).args([
            "record",
            "--pid",
            &workload.id().to_string(),
            "--duration",
            "3s",
            "--top",
            "12",
        ]),
        "heatprobe record",
    );
    // Closing its stdin stops the workload.
    drop(workload.stdin.take());
    let _ = workload.wait();
    result
}
