//! Shared helpers for the integration tests and benchmarks: a page-touching child process, a
//! minimal KVM test VM, the checks that decide whether a privileged test can run here, and
//! the benchmarks' report helpers.

pub mod bench;
pub mod daemon;
pub mod guest_images;
pub mod host_memory;
pub mod hot_set;
pub mod netns;
pub mod prometheus;
pub mod svg;
pub mod testvm;

use std::path::PathBuf;

/// Why a privileged capability is missing, or `None` if it is present. Tests skip, printing
/// the reason, only when this says the capability is truly absent.
pub fn bpf_unavailable() -> Option<String> {
    if !heatprobe::probes::has_privileges() {
        return Some("not root and no CAP_BPF+CAP_PERFMON".into());
    }
    None
}

/// Why `/dev/kvm` cannot be used, or `None` if it can.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm: {e}")),
    }
}

/// Prints why a test is skipped, in a form the test log shows, and records it for
/// `cargo xtask test`'s summary (libtest counts a test that returns early as passed).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    record_skip(&format!("{test}: {why}"));
}

/// Marks a line of the skip log as a part of a test skipped, the rest of it run.
pub const PART_SKIPPED: &str = "part ";

/// Prints why `part` of a test is skipped while the rest of it runs, and records it: the
/// test still counts as passed or failed, and the part as skipped (a `--long` run fails on
/// either kind).
pub fn skip_part(part: &str, why: &str) {
    eprintln!("SKIPPED {part}: {why}");
    record_skip(&format!("{PART_SKIPPED}{part}: {why}"));
}

fn record_skip(line: &str) {
    if let Some(log) = std::env::var_os("HEATPROBE_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// A binary of the workspace, built in the same profile as the running test.
pub fn workspace_bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/, binaries in target/<profile>/.
    let exe = std::env::current_exe().expect("the process knows its own path");
    let mut dir = exe.parent().expect("an executable lives in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps/ has a parent");
    }
    dir.join(name)
}

/// Memory of one process, from /proc/PID/status, in bytes. Guest RAM is a shared memfd, so it
/// shows as `rss_shmem`; a daemon's own memory is `rss_anon`.
///
/// Hand-written where a crate exists: procfs's `Status` has these three fields, but it and
/// procfs-core are 14,500 lines that took 11.6 s to build here, for three lines of one file.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessMemory {
    pub vm_rss: u64,
    pub rss_anon: u64,
    pub rss_shmem: u64,
}

impl ProcessMemory {
    pub fn of(pid: u32) -> Self {
        Self::try_of(pid).unwrap_or_else(|| panic!("no memory figures in /proc/{pid}/status"))
    }

    /// As [`ProcessMemory::of`], or `None` for a process that is gone.
    pub fn try_of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        };
        Some(Self {
            vm_rss: field("VmRSS:")?,
            rss_anon: field("RssAnon:")?,
            rss_shmem: field("RssShmem:")?,
        })
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            vm_rss: self.vm_rss + other.vm_rss,
            rss_anon: self.rss_anon + other.rss_anon,
            rss_shmem: self.rss_shmem + other.rss_shmem,
        }
    }

    pub fn max(self, other: Self) -> Self {
        Self {
            vm_rss: self.vm_rss.max(other.vm_rss),
            rss_anon: self.rss_anon.max(other.rss_anon),
            rss_shmem: self.rss_shmem.max(other.rss_shmem),
        }
    }
}

impl std::fmt::Display for ProcessMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {} MiB (RssAnon {:.1} MiB, RssShmem {} MiB)",
            self.vm_rss >> 20,
            self.rss_anon as f64 / (1u64 << 20) as f64,
            self.rss_shmem >> 20
        )
    }
}
