//! A migrator daemon process for tests, and the CLI run against it, on loopback or inside a
//! network namespace (see `netns`).
//!
//! Every migrator process the tests start, daemon or CLI, is built by [`migrator_command`], so
//! settings every process needs (the namespace, the TLS directory) are applied in one place.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::workspace_bin;

/// A `migrator` command, run inside network namespace `ns` if given (`ip netns exec` execs
/// migrator in place, so the child's pid is migrator's), with `MIGRATOR_TLS` set to `tls` if
/// given.
pub fn migrator_command(ns: Option<&str>, tls: Option<&Path>) -> Command {
    let mut command = match ns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", ns])
                .arg(workspace_bin("migrator"));
            command
        }
        None => Command::new(workspace_bin("migrator")),
    };
    if let Some(tls) = tls {
        command.env("MIGRATOR_TLS", tls);
    }
    command
}

/// How to start a daemon: where, with which extra `serve` arguments, with which certificates.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The network namespace to run in (`None`: this process's).
    pub ns: Option<String>,
    /// `--listen` address; port 0 picks a free one.
    pub listen: String,
    /// Extra `serve` arguments (limits, say).
    pub extra: Vec<String>,
    /// A directory written by `migrator certs` (see [`make_certs`]): the daemon gets
    /// `DIR/<listen host>` as `MIGRATOR_TLS`, every CLI run against it `DIR/client`.
    pub tls: Option<PathBuf>,
    /// `--runtime-dir` (`None`: a fresh one under the system's temporary directory, so that
    /// no test adopts another's partitions).
    pub runtime_dir: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            ns: None,
            listen: "127.0.0.1:0".into(),
            extra: Vec::new(),
            tls: None,
            runtime_dir: None,
        }
    }
}

impl DaemonConfig {
    /// A daemon inside namespace `ns`, listening on `addr` (an ephemeral port).
    pub fn in_namespace(ns: &str, addr: std::net::Ipv4Addr) -> Self {
        Self {
            ns: Some(ns.to_string()),
            listen: format!("{addr}:0"),
            ..Self::default()
        }
    }

    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|a| a.to_string()));
        self
    }

    pub fn tls(mut self, dir: Option<PathBuf>) -> Self {
        self.tls = dir;
        self
    }
}

/// A directory of mutual-TLS credentials written by `migrator certs`. Dropping it removes the
/// directory, private keys and all, whether the test passed or panicked: a bench or a failed
/// test otherwise left its keys behind in the temporary directory.
#[derive(Debug)]
pub struct Certs(PathBuf);

impl Certs {
    /// The directory, for [`DaemonConfig::tls`].
    pub fn dir(&self) -> PathBuf {
        self.0.clone()
    }
}

impl std::ops::Deref for Certs {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes mutual-TLS credentials for daemons at `hosts` and for the CLI into a fresh
/// directory under the system's temporary directory (`migrator certs`).
pub fn make_certs(hosts: &[&str]) -> Result<Certs> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "heatprobe-tests-certs-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = Certs(dir);
    let mut command = migrator_command(None, None);
    command.arg("certs").arg("--out").arg(&*certs);
    for host in hosts {
        command.args(["--host", host]);
    }
    let output = command.output().context("running migrator certs")?;
    anyhow::ensure!(
        output.status.success(),
        "migrator certs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(certs)
}

/// A fresh runtime directory for one test daemon.
fn fresh_runtime_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "heatprobe-tests-run-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A running daemon and its partition processes, all killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    ns: Option<String>,
    /// What every CLI run against it passes as `MIGRATOR_TLS`.
    tls: Option<PathBuf>,
    /// How it was started, with the address it got: [`Daemon::restart`] starts the same.
    config: DaemonConfig,
}

impl Daemon {
    /// A daemon on an ephemeral loopback port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A daemon started with extra `serve` arguments (limits, say).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_config(DaemonConfig::default().args(extra))
    }

    pub fn start_config(config: DaemonConfig) -> Self {
        Self::try_start(config).expect("start migrator serve")
    }

    /// Starts a daemon and waits for the line that says where it serves.
    pub fn try_start(config: DaemonConfig) -> Result<Self> {
        let host = config
            .listen
            .rsplit_once(':')
            .map_or(config.listen.as_str(), |(host, _)| host);
        let daemon_tls = config.tls.as_ref().map(|dir| dir.join(host));
        let mut config = config;
        let runtime_dir = config
            .runtime_dir
            .get_or_insert_with(fresh_runtime_dir)
            .clone();
        let mut child = migrator_command(config.ns.as_deref(), daemon_tls.as_deref())
            .args(["serve", "--listen", &config.listen])
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .args(&config.extra)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting migrator serve")?;
        let mut stderr = BufReader::new(child.stderr.take().context("the daemon's stderr")?);
        let mut line = String::new();
        stderr
            .read_line(&mut line)
            .context("reading the daemon's first line")?;
        let Some(addr) = line.trim().strip_prefix("migrator: serving on ") else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the daemon said {line:?}");
        };
        let addr = addr.to_string();
        // Keep draining stderr so the daemon never blocks on a full pipe.
        thread::spawn(move || for _ in stderr.lines() {});
        config.listen = addr.clone();
        Ok(Self {
            child,
            addr,
            ns: config.ns.clone(),
            tls: config.tls.as_ref().map(|dir| dir.join("client")),
            config,
        })
    }

    /// Starts this daemon again, on the same address and runtime directory, after
    /// [`Daemon::kill_daemon_only`]: the new daemon adopts the partitions left running.
    pub fn restart(&mut self) -> Result<()> {
        let started = Self::try_start(self.config.clone())?;
        let mut old = std::mem::replace(self, started);
        // The old daemon is dead; its partitions now belong to the new one.
        old.config.runtime_dir = None;
        Ok(())
    }

    /// The partition processes recorded in the runtime directory: (id, pid).
    pub fn partition_processes(&self) -> Vec<(String, u32)> {
        self.runtime_dir()
            .map(partition_processes_in)
            .unwrap_or_default()
    }

    /// Where its partition processes are recorded.
    pub fn runtime_dir(&self) -> Option<&Path> {
        self.config.runtime_dir.as_deref()
    }

    /// What kills this daemon's host from another thread: SIGKILL to the daemon and to every
    /// partition process recorded when it runs. The caller reaps the daemon.
    pub fn host_killer(&self) -> impl FnOnce() + Send + 'static {
        let daemon = self.pid();
        let dir = self.config.runtime_dir.clone();
        move || {
            // SAFETY: kill(2) with a plain signal on our child.
            unsafe { libc::kill(daemon as libc::pid_t, libc::SIGKILL) };
            for (_, pid) in dir
                .as_deref()
                .map(partition_processes_in)
                .unwrap_or_default()
            {
                // SAFETY: as above, on the partition processes the daemon started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }

    /// Kills the daemon alone with SIGKILL and reaps it; its partitions run on.
    pub fn kill_daemon_only(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A `migrator` command in this daemon's namespace, with its TLS settings.
    pub fn command(&self) -> Command {
        migrator_command(self.ns.as_deref(), self.tls.as_deref())
    }

    /// The daemon's process id (not a wrapper's: `ip netns exec` execs migrator).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the daemon and every partition process it started with SIGKILL, as the loss of
    /// its host would, and waits until they are gone.
    pub fn kill(&mut self) {
        self.kill_daemon_only();
        let pids: Vec<u32> = self
            .partition_processes()
            .iter()
            .map(|(_, pid)| *pid)
            .collect();
        for &pid in &pids {
            // SAFETY: kill(2) with a plain signal; a pid no longer ours fails harmlessly or,
            // at worst, names a process of a partition already gone.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&pid| process_runs(pid)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `migrator ARGS --host ADDR`; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let output = self
            .command()
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

    /// Runs `migrator migrate --json --from SELF --to TO ID EXTRA...` with this daemon's
    /// namespace and TLS settings; returns the exit code and the report. When it printed no
    /// report, the value is a string with its stderr, so a failed assertion shows why.
    pub fn migrate(&self, to: &Daemon, id: &str, extra: &[&str]) -> (i32, Value) {
        let output = self
            .command()
            .args([
                "migrate", "--json", "--from", &self.addr, "--to", &to.addr, id,
            ])
            .args(extra)
            .output()
            .expect("run migrator migrate");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report = serde_json::from_str(&stdout).unwrap_or_else(|_| {
            Value::String(format!(
                "no report; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        });
        (output.status.code().unwrap_or(-1), report)
    }

    /// Migrates `id` to `to` (as [`Daemon::migrate`]) and checks the move: it completed and
    /// the digests of both sides are equal. Returns the report and the id on the destination.
    pub fn migrate_checked(
        &self,
        to: &Daemon,
        id: &str,
        extra: &[&str],
        case: &str,
    ) -> (Value, String) {
        let (code, report) = self.migrate(to, id, extra);
        assert_eq!(code, 0, "{case}: {report}");
        assert_completed(&report, case);
        // Where the downtime went, with the destination's steps carried over the API: each
        // step measured, together the downtime (`downtime_ms` is truncated, they are not).
        let breakdown = &report["downtime_breakdown"];
        let steps: Vec<f64> = [
            "pause_ms",
            "last_pages_ms",
            "state_encode_ms",
            "state_transfer_ms",
            "restore_ms",
            "resume_ms",
        ]
        .iter()
        .map(|step| breakdown[step].as_f64().expect("a step in ms"))
        .collect();
        assert!(steps.iter().all(|ms| *ms >= 0.0), "{case}: {breakdown}");
        assert!(
            breakdown["restore_ms"].as_f64() > Some(0.0),
            "{case}: {breakdown}"
        );
        let downtime = report["downtime_ms"].as_f64().expect("downtime_ms");
        let total: f64 = steps.iter().sum();
        assert!(
            total <= downtime + 1.0 && total >= downtime - 0.01,
            "{case}: {total} ms in steps, downtime {downtime} ms: {breakdown}"
        );
        assert!(
            report["downtime_limit_met"].is_boolean(),
            "{case}: {report}"
        );
        let new_id = report["id_on_destination"]
            .as_str()
            .expect("id on destination")
            .to_string();
        (report, new_id)
    }

    /// Waits until partition `id` has made `ops` more operations and `checks` more full
    /// self-checks than now, and checks it still runs, with no error.
    pub fn runs_clean(&self, id: &str, ops: u64, checks: u64, case: &str) {
        let now = self.json(&["status", id]);
        let (done_ops, done_checks) = (
            now["ops"].as_u64().unwrap_or(0),
            now["checks"].as_u64().unwrap_or(0),
        );
        let after = self.wait_progress(id, done_ops + ops, done_checks + checks);
        assert_eq!(after["errors"], 0, "{case}: {after}");
        assert_eq!(after["state"], "running", "{case}: {after}");
    }

    /// Runs `migrator ARGS --host ADDR --json` and parses what it prints.
    pub fn try_json(&self, args: &[&str]) -> Result<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let (code, stdout, stderr) = self.cli(&args);
        anyhow::ensure!(code == 0, "migrator {args:?} failed: {stderr}");
        serde_json::from_str(&stdout)
            .with_context(|| format!("migrator {args:?} printed {stdout:?}"))
    }

    pub fn json(&self, args: &[&str]) -> Value {
        self.try_json(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until the partition has made `ops` operations and `checks` checks, with no error.
    /// Launches a built-in `workload` with `args` in `mem` of memory, one vCPU; its id.
    pub fn launch(&self, workload: &str, args: &str, mem: &str) -> String {
        self.json(&[
            "launch",
            "--workload",
            workload,
            "--args",
            args,
            "--mem",
            mem,
        ])["id"]
            .as_str()
            .expect("an id")
            .to_string()
    }

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
        self.kill();
        if let Some(dir) = &self.config.runtime_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits up to `within` for process `pid` to end; returns whether it did.
pub fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while process_runs(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    !process_runs(pid)
}

/// Whether process `pid` runs (exists and is no zombie).
pub fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// A migration report says `completed`, with a source digest equal to the destination's.
pub fn assert_completed(report: &Value, case: &str) {
    assert_eq!(report["status"], "completed", "{case}: {report}");
    assert!(report["source_digest"].is_string(), "{case}: {report}");
    assert_eq!(
        report["source_digest"], report["dest_digest"],
        "{case}: {report}"
    );
}

/// The partition processes recorded in runtime directory `dir`: (id, pid).
pub fn partition_processes_in(dir: &Path) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(record) = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(Into::into))
        else {
            continue;
        };
        if let (Some(id), Some(pid)) = (record["id"].as_str(), record["pid"].as_u64()) {
            found.push((id.to_string(), pid as u32));
        }
    }
    found.sort();
    found
}
