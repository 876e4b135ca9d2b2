//! A migrator daemon process for tests, and the CLI run against it.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::workspace_bin;

/// A daemon on an ephemeral loopback port, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A daemon started with extra `serve` arguments (limits, say).
    pub fn start_with(extra: &[&str]) -> Self {
        let mut child = Command::new(workspace_bin("migrator"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start migrator serve");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("daemon's first line");
        let addr = line
            .trim()
            .strip_prefix("migrator: serving on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        // Keep draining stderr so the daemon never blocks on a full pipe.
        thread::spawn(move || for _ in stderr.lines() {});
        Self { child, addr }
    }

    /// Runs `migrator ARGS --host ADDR`; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(workspace_bin("migrator"))
            .args(args)
            .args(["--host", &self.addr])
            .output()
            .expect("run migrator");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let (code, stdout, stderr) = self.cli(&args);
        assert_eq!(code, 0, "migrator {args:?} failed: {stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    /// Waits until the partition has made `ops` operations and `checks` checks, with no error.
    pub fn wait_progress(&self, id: &str, ops: u64, checks: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.json(&["status", id]);
            assert_eq!(status["errors"], 0, "{status}");
            assert_ne!(status["state"], "crashed", "{status}");
            if status["ops"].as_u64() >= Some(ops) && status["checks"].as_u64() >= Some(checks) {
                return status;
            }
            assert!(Instant::now() < deadline, "no progress: {status}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
