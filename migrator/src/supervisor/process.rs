//! A partition process as its supervisor holds it: started (`migrator vmm`) or adopted from
//! a predecessor, reached over its Unix socket, and watched until it ends.

use std::{
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tarpc::client;

use super::{
    SupervisorError,
    runtime_dir::{Record, RuntimeDir, start_time},
};
use crate::{
    api::API_VERSION, api::ApiError, api::MigratorApiClient, api::PartitionInfo,
    api::codec::transport, host::heat_sampling::HeatSampling,
};

/// How long a started process may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What every partition process is started with (the supervisor's own settings).
#[derive(Clone, Debug)]
pub struct ProcessConfig {
    /// The supervisor's API address: data listeners bind to its host.
    pub listen: std::net::SocketAddr,
    pub peer_timeout: Duration,
    pub sampling: HeatSampling,
    /// The TLS directory, for the process's migration peers and data connections.
    pub tls: Option<PathBuf>,
}

/// A partition process.
pub struct VmmProcess {
    pub record: Record,
    pub client: MigratorApiClient,
    /// What the partition last looked like: for `list` when the process is slow to answer,
    /// and for the record of a crash.
    last: Mutex<Option<PartitionInfo>>,
    /// Forwarded calls running: a process is never retired under one.
    in_flight: AtomicUsize,
    /// Set when the supervisor ends the process on purpose: its exit is then no crash.
    retiring: AtomicBool,
    /// When the process last answered a call.
    answered: Mutex<Instant>,
}

/// One forwarded call in flight (see [`VmmProcess::busy`]).
pub struct Busy<'a>(&'a VmmProcess);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VmmProcess {
    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Marks a forwarded call in flight until the guard drops.
    pub fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    pub fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    pub fn remember(&self, info: &PartitionInfo) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.clone());
        self.answered();
    }

    /// The process answered a call just now.
    pub fn answered(&self) {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long since the process last answered a call.
    pub fn unanswered_for(&self) -> Duration {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// The partition as last seen, marked as its process not answering: what `list` and
    /// `status` show of a process that is wedged or too busy, rather than leaving it out or
    /// waiting on it. One that never showed a partition is an incoming migration's.
    pub fn unanswered(&self) -> PartitionInfo {
        let mut info = self.last_seen();
        if !self.seen() {
            info.state = crate::vmm::PartitionState::Migrating;
        }
        info.unanswered_ms = Some(self.unanswered_for().as_millis() as u64);
        info
    }

    /// Whether the partition was ever seen (a process started for an incoming migration has
    /// none until the commit).
    pub fn seen(&self) -> bool {
        self.record.session.is_none()
            || self
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    /// The partition as last seen, or as its record describes it if never seen.
    pub fn last_seen(&self) -> PartitionInfo {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| described(&self.record))
    }

    /// Marks the process as ended on purpose; returns false if it already was.
    pub fn begin_retiring(&self) -> bool {
        !self.retiring.swap(true, Ordering::AcqRel)
    }

    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Acquire)
    }

    /// Asks the process to end (SIGTERM: it stops what it still runs and exits).
    pub fn terminate(&self) {
        if super::runtime_dir::is_alive(&self.record) {
            // SAFETY: kill(2) with a plain signal number; no memory is passed. The pid was
            // checked against the record's start time just above, so it is our process.
            unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Ends the process at once (SIGKILL), for one that did not end when asked.
    pub fn kill(&self) {
        if super::runtime_dir::is_alive(&self.record) {
            // SAFETY: as in `terminate`.
            unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Maps a failed call to the process to an API error naming it.
    pub fn unreachable(&self, error: tarpc::client::RpcError) -> ApiError {
        ApiError::Internal(format!(
            "partition `{}`: its process {} did not answer: {error}",
            self.id(),
            self.pid()
        ))
    }
}

/// A partition as its record describes it, before (or without) its process saying more.
pub fn described(record: &Record) -> PartitionInfo {
    PartitionInfo {
        id: record.id.clone(),
        name: record.name.clone(),
        image: record.image.clone(),
        state: crate::vmm::PartitionState::Running,
        ops: 0,
        errors: 0,
        checks: 0,
        mem_bytes: record.mem_bytes,
        vcpus: record.vcpus,
        console: String::new(),
        crash_reason: None,
        check_failures: 0,
        awaiting_handover: None,
        postcopy_paused: None,
        pid: Some(record.pid),
        process_rss_anon_bytes: None,
        unanswered_ms: None,
    }
}

/// Starts a partition process for `record` (its pid and start time are filled in here),
/// records it in `dir` and connects to it. Returns the process and its child handle, whose
/// exit the caller watches.
pub async fn start(
    dir: &RuntimeDir,
    config: &ProcessConfig,
    mut record: Record,
) -> Result<(Arc<VmmProcess>, tokio::process::Child), SupervisorError> {
    let id = record.id.clone();
    let log = std::fs::File::create(dir.log(&id)).map_err(|source| SupervisorError::Start {
        id: id.clone(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| SupervisorError::Start {
        id: id.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| SupervisorError::Start {
        id: id.clone(),
        source,
    })?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("vmm")
        .arg("--runtime-dir")
        .arg(dir.path())
        .args(["--id", &id])
        .args(["--listen", &config.listen.to_string()])
        .arg("--peer-timeout")
        .arg(humantime::format_duration(config.peer_timeout).to_string())
        .arg("--heat-epoch")
        .arg(humantime::format_duration(config.sampling.epoch()).to_string())
        .arg("--heat-sample-fraction")
        .arg(config.sampling.fraction().to_string())
        .arg("--heat-recheck-fraction")
        .arg(config.sampling.recheck_fraction().to_string())
        .args(config.sampling.pool().then_some("--heat-pool"))
        .arg("--heat-profile")
        .arg(match config.sampling.warm() {
            true => "warm",
            false => "on-demand",
        })
        .arg("--heat-budget")
        .arg(
            config
                .sampling
                .budget()
                .map_or("off".to_string(), |share| share.to_string()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a ^C meant for the daemon in a terminal does not reach the
        // guests.
        .process_group(0)
        .kill_on_drop(false);
    if let Some(session) = record.session {
        command.args(["--session", &session.to_string()]);
    }
    match &config.tls {
        Some(tls) => command.env("MIGRATOR_TLS", tls),
        None => command.env_remove("MIGRATOR_TLS"),
    };
    let mut child = command.spawn().map_err(|source| SupervisorError::Start {
        id: id.clone(),
        source,
    })?;
    record.pid = child.id().unwrap_or_default();
    record.start_time = start_time(record.pid).unwrap_or_default();
    if let Err(e) = dir.write(&record) {
        let _ = child.start_kill();
        return Err(e);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    let client = loop {
        if let Ok(Some(status)) = child.try_wait() {
            dir.remove(&id, true);
            return Err(SupervisorError::Exited {
                id: id.clone(),
                how: exit_cause(status),
                log: dir.log_tail(&id, 5),
            });
        }
        match connect(dir, &id).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                let _ = child.start_kill();
                dir.remove(&id, true);
                return Err(e);
            }
        }
    };
    Ok((Arc::new(adopted(record, client)), child))
}

/// A process found running, reached over `client`.
pub fn adopted(record: Record, client: MigratorApiClient) -> VmmProcess {
    VmmProcess {
        record,
        client,
        last: Mutex::new(None),
        in_flight: AtomicUsize::new(0),
        retiring: AtomicBool::new(false),
        answered: Mutex::new(Instant::now()),
    }
}

/// Connects to partition process `id`'s socket and checks its API version.
pub async fn connect(dir: &RuntimeDir, id: &str) -> Result<MigratorApiClient, SupervisorError> {
    let failed = |what: String| SupervisorError::Connect {
        id: id.to_string(),
        what,
    };
    let client = open(dir, id).await?;
    client
        .hello(
            crate::api::client::context_with(Duration::from_secs(5)),
            API_VERSION,
            API_VERSION,
        )
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    Ok(client)
}

/// A client of partition process `id`'s socket, not yet asked anything; the connection is
/// bounded in time, since a wedged process may never accept it.
pub async fn open(dir: &RuntimeDir, id: &str) -> Result<MigratorApiClient, SupervisorError> {
    let failed = |what: String| SupervisorError::Connect {
        id: id.to_string(),
        what,
    };
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::UnixStream::connect(dir.socket(id)),
    )
    .await
    .map_err(|_| failed("it did not accept a connection within 5 s".into()))?
    .map_err(|e| failed(e.to_string()))?;
    Ok(MigratorApiClient::new(client::Config::default(), transport(Box::new(stream))).spawn())
}

/// Waits until process `pid`, not our child (adopted from a predecessor), has ended.
pub async fn wait_for_exit(pid: u32) {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let opened = Pid::from_raw(pid as i32)
        .ok_or(rustix::io::Errno::INVAL)
        .and_then(|pid| pidfd_open(pid, PidfdFlags::empty()));
    // SAFETY: the OwnedFd is a pidfd we just opened; the AsyncFd owns it and nothing else
    // closes or replaces it while it is registered.
    match opened.map(|fd| unsafe { tokio::io::unix::AsyncFd::register(fd) }) {
        // A pidfd turns readable when its process exits.
        Ok(Ok(fd)) => {
            let _ = fd.readable().await;
        }
        // No pidfd (the process is gone already, or an old kernel): look every 100 ms.
        _ => {
            while start_time(pid).is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How a child process ended, in words.
pub fn exit_cause(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(signal)) => format!("killed by signal {signal} ({})", signal_name(signal)),
        (Some(code), None) => format!("exited with status {code}"),
        (None, None) => "ended".into(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        libc::SIGSYS => "SIGSYS: a system call its seccomp filter forbids",
        _ => "a signal",
    }
}

/// A process's own memory (RssAnon: heap, stacks, buffers; not the guest's shared memfd).
pub fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}
