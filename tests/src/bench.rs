//! What the benchmark binaries share in their reports: medians and ranges, how they are
//! shown, and how a report names the command and commit that reproduce it.

/// The median of `values`; NaN when there are none.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// Median and range of some values.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self {
            median: median(values),
            min,
            max,
        })
    }
}

/// `median (min–max)` with `decimals`, or `–` when there is nothing to show.
pub fn show(spread: Option<Spread>, decimals: usize) -> String {
    match spread {
        Some(s) => format!(
            "{:.d$} ({:.d$}–{:.d$})",
            s.median,
            s.min,
            s.max,
            d = decimals
        ),
        None => "–".into(),
    }
}

/// `1 run`, `3 runs`.
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Quotes an argument for a shell when it needs it.
pub fn shell_word(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The command line that reproduces a report: `prefix` and then `args`, quoted.
pub fn reproduce(prefix: &str, args: &[String]) -> String {
    std::iter::once(prefix.to_string())
        .chain(args.iter().map(|a| shell_word(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The commit the bench was built from, if git can tell.
pub fn commit() -> Option<String> {
    let output = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()?;
    let dirty = std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "status", "--porcelain"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    output.status.success().then(|| {
        let hash = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if dirty {
            format!("{hash} + local changes")
        } else {
            hash
        }
    })
}

/// Whether a scenario named `name` is one `--only` picks: every one without `--only`, else
/// those whose name contains one of `only` (lower-cased), in any case.
pub fn picked(name: &str, only: &[String]) -> bool {
    only.is_empty() || only.iter().any(|o| name.to_lowercase().contains(o))
}

/// Two network namespaces joined by a veth pair shaped with `tc tbf` to `rate`, with a daemon
/// on each (port 7700, as in the docs' commands; mutual TLS, as daemons off loopback must),
/// started with `serve`'s further options `serve`. The hosts hold the daemons' credentials
/// too, removed with them.
pub fn shaped_hosts(
    rate: &str,
    serve: &[&str],
) -> anyhow::Result<(ShapedHosts, crate::daemon::Daemon, crate::daemon::Daemon)> {
    use crate::daemon::{Daemon, DaemonConfig, make_certs};
    let hosts = crate::netns::HostPair::create()?;
    hosts.shape(rate)?;
    let certs = make_certs(&[&hosts.a.addr.to_string(), &hosts.b.addr.to_string()])?;
    let start = |host: &crate::netns::Host| {
        Daemon::try_start(
            DaemonConfig {
                listen: host.at(7700),
                ..DaemonConfig::in_namespace(&host.ns, host.addr).tls(Some(certs.dir()))
            }
            .args(serve),
        )
    };
    let a = start(&hosts.a)?;
    let b = start(&hosts.b)?;
    Ok((
        ShapedHosts {
            hosts,
            _certs: certs,
        },
        a,
        b,
    ))
}

/// The two hosts of [`shaped_hosts`] and their daemons' credentials, which go with them.
pub struct ShapedHosts {
    pub hosts: crate::netns::HostPair,
    _certs: crate::daemon::Certs,
}

impl std::ops::Deref for ShapedHosts {
    type Target = crate::netns::HostPair;

    fn deref(&self) -> &crate::netns::HostPair {
        &self.hosts
    }
}

/// The intended page popularity of built-in `workload` with `args` in a 1-vCPU partition of
/// `mem` bytes (`migrator_guest::workloads::popularity`), and the guest frame its share of
/// memory starts at: page `p` of the model is frame `first + p`.
pub fn known_popularity(
    workload: &str,
    args: &str,
    mem: u64,
) -> anyhow::Result<(u64, migrator_guest::workloads::Popularity)> {
    use anyhow::Context;
    use migrator::vmm::{GuestImage, PartitionConfig, loader::Image, partition::BUILTIN_IMAGE};
    let image = BUILTIN_IMAGE.context("the guest image is not built (cargo xtask build)")?;
    // The guest's memory starts at its image's page-aligned end (its linker script says so).
    let image_end = Image::parse(image, mem, migrator_guest::abi::STACK_SIZE)
        .map_err(|e| anyhow::anyhow!("the built-in image: {e}"))?
        .end()
        .0
        .next_multiple_of(4096);
    let share = migrator_guest::workloads::vcpu_share(image_end, mem, 1, 0);
    let boot_args = PartitionConfig {
        name: None,
        mem_size: mem,
        vcpus: 1,
        image: GuestImage::Builtin(workload.into()),
        args: args.into(),
    }
    .boot_args();
    let model = migrator_guest::workloads::popularity(&boot_args, share.end - share.start)
        .map_err(|e| anyhow::anyhow!("{workload} {args}: {e:?}"))?;
    Ok((share.start / 4096, model))
}

/// Runs `migrator ARGS --json` against `daemon` and parses what it prints.
pub fn cli_json(
    daemon: &crate::daemon::Daemon,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let output = daemon.command().args(args).arg("--json").output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).with_context(|| {
        format!(
            "migrator {} printed {stdout:?} ({})",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

/// Launches a fresh partition running built-in `workload` with `args` in `mem` on `a`,
/// migrates it to `b` 1 s after its first operation with `migrator migrate` and `options`,
/// and stops what is left of it on either side; returns the report, with
/// `guest_errors_after` (the guest's error count on `b` after a completed migration) added.
pub fn launch_and_migrate(
    a: &crate::daemon::Daemon,
    b: &crate::daemon::Daemon,
    (workload, args, mem): (&str, &str, &str),
    settle: std::time::Duration,
    options: &[&str],
) -> anyhow::Result<serde_json::Value> {
    use anyhow::{Context, bail};
    use std::time::{Duration, Instant};
    let launch = [
        "launch",
        "--host",
        &a.addr,
        "--workload",
        workload,
        "--args",
        args,
        "--mem",
        mem,
    ];
    let id = cli_json(a, &launch)?["id"]
        .as_str()
        .context("launch id")?
        .to_string();
    let migrated = (|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while cli_json(a, &["status", "--host", &a.addr, &id])?["ops"]
            .as_u64()
            .unwrap_or(0)
            == 0
        {
            if Instant::now() > deadline {
                bail!("{workload} never started");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(settle);
        let mut migrate = vec!["migrate", "--from", &a.addr, "--to", &b.addr, &id];
        migrate.extend_from_slice(options);
        cli_json(a, &migrate)
    })();
    let moved = migrated
        .as_ref()
        .ok()
        .and_then(|r| r["id_on_destination"].as_str().map(str::to_string));
    let Some(there) = moved else {
        let _ = cli_json(a, &["stop", "--host", &a.addr, &id]);
        return migrated;
    };
    let status = cli_json(b, &["status", "--host", &b.addr, &there]);
    let _ = cli_json(b, &["stop", "--host", &b.addr, &there]);
    let mut report = migrated?;
    report["guest_errors_after"] = status?["errors"].clone();
    Ok(report)
}
