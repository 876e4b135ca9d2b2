//! A real Prometheus server for tests (Debian's `prometheus` package, which `cargo xtask
//! setup` installs): started on a scrape configuration of the test's, with its own storage
//! in a fresh directory and its web port on an address of the test's, killed on drop.
//! Whatever service the package itself may run is a different process on its own port and
//! storage, and plays no part.
//!
//! Its HTTP API, and the daemons' metrics pages, are read with plain HTTP/1.0 GETs (the
//! answer ends when the connection does).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::netns::in_namespace;

/// Why Prometheus cannot be run here, or `None` if it can.
pub fn prometheus_unavailable() -> Option<String> {
    for tool in ["prometheus", "promtool"] {
        match Command::new(tool).arg("--version").output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => return Some(format!("`{tool} --version` failed: {}", output.status)),
            Err(e) => {
                return Some(format!(
                    "{tool} is not installed ({e}; `cargo xtask setup` installs Debian's \
                     prometheus package)"
                ));
            }
        }
    }
    None
}

/// A free TCP port on loopback (bound, then let go: nothing else here takes ports at random
/// in between).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

/// A Prometheus server, killed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// Its web address, `IP:PORT`.
    pub addr: String,
    ns: Option<String>,
}

impl Prometheus {
    /// Starts Prometheus in namespace `ns` (this process's without one) serving its API on
    /// `listen`, with `scrape_configs` (YAML, the list under `scrape_configs:`), and waits
    /// until it is ready.
    pub fn start(ns: Option<&str>, listen: &str, scrape_configs: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "heatprobe-tests-prometheus-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).context("Prometheus's directory")?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, format!("scrape_configs:\n{scrape_configs}"))
            .context("writing the Prometheus configuration")?;
        let log = std::fs::File::create(dir.join("log")).context("Prometheus's log")?;
        let mut command = match ns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, "prometheus"]);
                command
            }
            None => Command::new("prometheus"),
        };
        let child = command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let prometheus = Self {
            child,
            dir,
            addr: listen.to_string(),
            ns: ns.map(str::to_string),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = prometheus.get("/-/ready") {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                bail!(
                    "Prometheus was not ready in 30 s; its log:\n{}",
                    prometheus.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let (addr, path) = (self.addr.clone(), path.to_string());
        in_namespace(self.ns.as_deref(), move || http_get(&addr, &path))?
    }

    /// The instant vector `expr` evaluates to now, as the API's `result` list.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let (status, body) = self.get(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        let json: Value =
            serde_json::from_str(&body).with_context(|| format!("the API said {body}"))?;
        if status != 200 || json["status"] != "success" {
            bail!("query {expr}: HTTP {status}: {body}");
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The single value `expr` evaluates to now, if it has one sample.
    pub fn value(&self, expr: &str) -> Result<Option<f64>> {
        let result = self.query(expr)?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
            many => bail!("{expr} has {} samples: {many:?}", many.len()),
        }
    }

    /// Waits up to `within` for `expr` to have one sample satisfying `ok`; its value.
    pub fn wait_for(&self, expr: &str, within: Duration, ok: impl Fn(f64) -> bool) -> Result<f64> {
        let deadline = Instant::now() + within;
        loop {
            let value = self.value(expr)?;
            if let Some(v) = value.filter(|v| ok(*v)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!(
                    "{expr} is {value:?} after {within:?}; Prometheus's log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The scrape targets as the API lists them (`activeTargets`).
    pub fn targets(&self) -> Result<Vec<Value>> {
        let (_, body) = self.get("/api/v1/targets")?;
        let json: Value = serde_json::from_str(&body).context("the targets")?;
        Ok(json["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` from `addr` over HTTP/1.0: the status and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    parse_answer(&answer)
}

/// An HTTP answer's status and body.
pub fn parse_answer(answer: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("not an HTTP answer: {text:?}");
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
