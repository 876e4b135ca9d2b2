//! Hosts on one machine: two network namespaces joined by a veth pair, with a link that can
//! be cut and restored, or several on a bridge (`Lan`). Removed on drop.
//!
//! Names carry the test process's id and a counter, so tests running in parallel, in one
//! process or several, never collide; pairs left behind by a killed test process are removed
//! by the next one that starts.

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

/// Prefix of every namespace this module creates.
const PREFIX: &str = "hpt-";

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Why two network namespaces cannot be made here, or `None` if they can. Tests skip,
/// printing the reason, only when this says so.
pub fn netns_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    // Unique per call: tests in one process probe concurrently.
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let probe = format!(
        "{PREFIX}probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    if let Err(e) = run("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {e:#}"));
    }
    let _ = run("ip", &["netns", "del", &probe]);
    None
}

/// One end of the link: a namespace, its veth device and its address.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub dev: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// `ADDR:PORT` on this host.
    pub fn at(&self, port: u16) -> String {
        format!("{}:{port}", self.addr)
    }
}

/// Two namespaces joined by a veth pair: `a` is 10.77.0.1, `b` is 10.77.0.2.
pub struct HostPair {
    pub a: Host,
    pub b: Host,
}

impl HostPair {
    /// Creates the namespaces and the link, up, with loopback up on both sides.
    pub fn create() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_orphans();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names are limited to 15 bytes: "v" + pid (at most 7 digits) + "x" + n + side.
        let pair = Self {
            a: Host {
                ns: format!("{PREFIX}{pid}-{n}a"),
                dev: format!("v{pid}x{n}a"),
                addr: Ipv4Addr::new(10, 77, 0, 1),
            },
            b: Host {
                ns: format!("{PREFIX}{pid}-{n}b"),
                dev: format!("v{pid}x{n}b"),
                addr: Ipv4Addr::new(10, 77, 0, 2),
            },
        };
        // From here on, drop removes whatever was made.
        for host in [&pair.a, &pair.b] {
            run("ip", &["netns", "add", &host.ns])?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                &pair.a.dev,
                "netns",
                &pair.a.ns,
                "type",
                "veth",
                "peer",
                "name",
                &pair.b.dev,
                "netns",
                &pair.b.ns,
            ],
        )?;
        for host in [&pair.a, &pair.b] {
            run(
                "ip",
                &[
                    "-n",
                    &host.ns,
                    "addr",
                    "add",
                    &format!("{}/24", host.addr),
                    "dev",
                    &host.dev,
                ],
            )?;
            run("ip", &["-n", &host.ns, "link", "set", "lo", "up"])?;
        }
        pair.link_up()?;
        Ok(pair)
    }

    /// Shapes both ends of the link with `tc tbf` to `rate` (for example `1gbit`).
    pub fn shape(&self, rate: &str) -> Result<()> {
        for host in [&self.a, &self.b] {
            run(
                "tc",
                &[
                    "-n", &host.ns, "qdisc", "add", "dev", &host.dev, "root", "tbf", "rate", rate,
                    "burst", "1mb", "latency", "50ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Cuts the link: both ends of the veth go down, and packets between the hosts are lost
    /// (each host still reaches its own address).
    pub fn link_down(&self) -> Result<()> {
        for host in [&self.a, &self.b] {
            run("ip", &["-n", &host.ns, "link", "set", &host.dev, "down"])?;
        }
        Ok(())
    }

    /// Holds back every packet `host` sends from its TCP port `port` (its answers on a
    /// connection to that port, acknowledgements included), while all else flows: an answer
    /// lost on its way. tc has no drop action on these hosts, so the packets go to an HTB
    /// class whose queue holds no packet, which drops them.
    pub fn hold_port(&self, host: &Host, port: u16) -> Result<()> {
        let tc = |args: &[&str]| {
            let mut full = vec!["-n", host.ns.as_str()];
            full.extend_from_slice(args);
            run("tc", &full)
        };
        let dev = host.dev.as_str();
        tc(&[
            "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q",
            "100000",
        ])?;
        tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit",
        ])?;
        tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", "1mbit",
        ])?;
        // A queue of no packets: whatever is put in it is dropped.
        tc(&[
            "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "pfifo", "limit", "0",
        ])?;
        let port = port.to_string();
        tc(&[
            "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "sport", &port, "0xffff", "flowid", "1:20",
        ])
    }

    /// Ends [`HostPair::hold_port`].
    pub fn release_port(&self, host: &Host) -> Result<()> {
        run(
            "tc",
            &["-n", &host.ns, "qdisc", "del", "dev", &host.dev, "root"],
        )
    }

    /// Restores the link (the kernel puts the subnet's routes back).
    pub fn link_up(&self) -> Result<()> {
        for host in [&self.a, &self.b] {
            run("ip", &["-n", &host.ns, "link", "set", &host.dev, "up"])?;
        }
        Ok(())
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys its end of the veth, and with it the other end.
        for host in [&self.a, &self.b] {
            let _ = run("ip", &["netns", "del", &host.ns]);
        }
    }
}

/// Hosts on one Ethernet segment: a namespace each, joined by a bridge in a namespace of its
/// own; host `i` is 10.78.0.(i+1). Removed on drop.
pub struct Lan {
    pub hosts: Vec<Host>,
    hub: String,
}

impl Lan {
    /// Creates `count` hosts (at most 9), up, with loopback up on each.
    pub fn create(count: usize) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        anyhow::ensure!((1..=9).contains(&count), "1 to 9 hosts on a LAN");
        remove_orphans();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let hub = format!("{PREFIX}{pid}-{n}hub");
        // Interface names are limited to 15 bytes: "l" + pid (at most 7) + "x" + n + "h" + i.
        let hosts = (0..count)
            .map(|i| Host {
                ns: format!("{PREFIX}{pid}-{n}l{i}"),
                dev: format!("l{pid}x{n}h{i}"),
                addr: Ipv4Addr::new(10, 78, 0, i as u8 + 1),
            })
            .collect();
        // From here on, drop removes whatever was made.
        let lan = Self { hosts, hub };
        run("ip", &["netns", "add", &lan.hub])?;
        run(
            "ip",
            &["-n", &lan.hub, "link", "add", "br0", "type", "bridge"],
        )?;
        run("ip", &["-n", &lan.hub, "link", "set", "br0", "up"])?;
        for (i, host) in lan.hosts.iter().enumerate() {
            let port = format!("l{pid}x{n}p{i}");
            run("ip", &["netns", "add", &host.ns])?;
            run(
                "ip",
                &[
                    "link", "add", &host.dev, "netns", &host.ns, "type", "veth", "peer", "name",
                    &port, "netns", &lan.hub,
                ],
            )?;
            run(
                "ip",
                &["-n", &lan.hub, "link", "set", &port, "master", "br0"],
            )?;
            run("ip", &["-n", &lan.hub, "link", "set", &port, "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &host.ns,
                    "addr",
                    "add",
                    &format!("{}/24", host.addr),
                    "dev",
                    &host.dev,
                ],
            )?;
            run("ip", &["-n", &host.ns, "link", "set", &host.dev, "up"])?;
            run("ip", &["-n", &host.ns, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = run("ip", &["netns", "del", &host.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.hub]);
    }
}

/// Runs `work` on a thread of its own inside namespace `ns` (this process's own without one):
/// what it connects to, it reaches as a process of that host would.
pub fn in_namespace<T: Send + 'static>(
    ns: Option<&str>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = ns.map(|ns| format!("/run/netns/{ns}"));
    std::thread::spawn(move || -> Result<T> {
        if let Some(path) = path {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace descriptor; it changes only this thread's
            // network namespace, and the thread ends with `work`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
        }
        Ok(work())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
}

/// Removes namespaces of this module whose test process no longer exists.
fn remove_orphans() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}
