//! `cargo xtask run`: the demo. Starts two migrator daemons on loopback (a source and a
//! destination), launches a partition running `rw-mix` on the source, and opens the dashboard
//! on it with the destination as its peer: `m` migrates it there, `m` again brings it back.
//! Quitting stops both daemons (and their partitions) and unmounts tracefs if the demo mounted
//! it. `cargo xtask run -- ARGS` runs `migrator dash ARGS` instead.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{build::release_bin, process::run as run_command};

/// A daemon the demo started; killed (with its partitions) on drop.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start() -> Result<Self> {
        let mut child = Command::new(release_bin("migrator"))
            // The demo's partitions end with it.
            .args(["serve", "--listen", "127.0.0.1:0", "--on-exit", "stop"])
            .stderr(Stdio::piped())
            .spawn()
            .context("starting a migrator daemon")?;
        let mut stderr = BufReader::new(child.stderr.take().context("daemon stderr")?);
        let mut line = String::new();
        stderr.read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("migrator: serving on ") else {
            bail!("the daemon did not start: {line}");
        };
        let addr = addr.to_string();
        // Drain the daemon's log so it never blocks; the dashboard owns the terminal.
        std::thread::spawn(move || for _ in stderr.lines() {});
        Ok(Self { child, addr })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM lets the daemon stop its partitions and end their processes (cancelling a
        // migration first, ending any that cannot be); then make sure it is gone. Its own
        // steps are bounded (10 s each for a stop, then a process's exit), so this waits
        // longer than they take.
        // SAFETY: kill(2) on our own child; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TRACEFS: &str = "/sys/kernel/tracing";

fn tracefs_mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir()
}

pub fn run(args: &[String]) -> Result<()> {
    let migrator = release_bin("migrator");
    if !args.is_empty() {
        return run_command(
            Command::new(&migrator).arg("dash").args(args),
            "migrator dash",
        );
    }
    let mounted_before = tracefs_mounted();
    let result = demo(&migrator);
    if !mounted_before && tracefs_mounted() {
        // Leave the machine as we found it.
        let _ = Command::new("umount").arg(TRACEFS).status();
    }
    result
}

fn demo(migrator: &Path) -> Result<()> {
    let source = Daemon::start()?;
    let destination = Daemon::start()?;
    let output = Command::new(migrator)
        .args([
            "launch",
            "--host",
            &source.addr,
            "--workload",
            "rw-mix",
            "--mem",
            "256M",
        ])
        .args(["--vcpus", "1", "--name", "demo", "--args", "rate=2000000"])
        .output()
        .context("launching the demo partition")?;
    if !output.status.success() {
        bail!(
            "launching the demo partition failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
    run_command(
        Command::new(migrator).args([
            "dash",
            "--host",
            &source.addr,
            &id,
            "--peer",
            &destination.addr,
        ]),
        "migrator dash",
    )
}
