//! heatprobe on real processes: exact per-page fault counts, through the library and the CLI.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    ops::Range,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use heatprobe::{
    ActiveSampler, Credit, PageCounts, Probes, Profiler, SamplerError, Target,
    profiler::ProfilerConfig,
    report::{PlanReport, RecordReport},
};
use heatprobe_tests::{bpf_unavailable, skip, workspace_bin};

const READ: &[u64] = &[0, 1, 2, 5];
const WRITE: &[u64] = &[10, 11, 30];
const READ_THEN_WRITE: &[u64] = &[20, 21];
const PAGES: u64 = 40;

/// A `touch_pages` child, parked before touching anything.
struct Toucher {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    base_page: u64,
}

fn list(pages: &[u64]) -> String {
    let joined: Vec<String> = pages.iter().map(u64::to_string).collect();
    joined.join(",")
}

impl Toucher {
    fn spawn() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_touch_pages"))
            .args([
                PAGES.to_string(),
                list(READ),
                list(WRITE),
                list(READ_THEN_WRITE),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn touch_pages");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("base line");
        let base = line
            .trim()
            .strip_prefix("base 0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .expect("touch_pages prints its base");
        Self {
            child,
            stdin,
            stdout,
            base_page: base >> 12,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the child touch its pages and waits until it has.
    fn touch(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").expect("signal child");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("done line");
        assert!(line.starts_with("done"), "child said {line:?}");
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        self.child.wait().expect("child exits");
    }

    /// The expected counts, keyed by absolute virtual page number. A read maps the shared
    /// zero page; a later write to it is a copy-on-write protection fault.
    fn expected(&self) -> BTreeMap<u64, PageCounts> {
        let mut expected = BTreeMap::new();
        for &p in READ {
            expected.insert(
                self.base_page + p,
                PageCounts {
                    reads: 1,
                    writes: 0,
                },
            );
        }
        for &p in WRITE {
            expected.insert(
                self.base_page + p,
                PageCounts {
                    reads: 0,
                    writes: 1,
                },
            );
        }
        for &p in READ_THEN_WRITE {
            expected.insert(
                self.base_page + p,
                PageCounts {
                    reads: 1,
                    writes: 1,
                },
            );
        }
        expected
    }

    fn region(&self) -> std::ops::Range<u64> {
        self.base_page..self.base_page + PAGES
    }
}

fn in_region(
    counts: impl IntoIterator<Item = (u64, PageCounts)>,
    region: std::ops::Range<u64>,
) -> BTreeMap<u64, PageCounts> {
    counts
        .into_iter()
        .filter(|(p, _)| region.contains(p))
        .collect()
}

#[test]
fn exact_counts_for_a_child_process() {
    if let Some(why) = bpf_unavailable() {
        return skip("exact_counts_for_a_child_process", &why);
    }
    let probes = Arc::new(Probes::load().expect("load probes"));
    let mut toucher = Toucher::spawn();
    let mut profiler = Profiler::start(
        Arc::clone(&probes),
        Target::Process { pid: toucher.pid() },
        ProfilerConfig::default(),
    )
    .expect("track child");
    toucher.touch();
    profiler.end_epoch().expect("epoch");
    let got = in_region(profiler.totals().clone(), toucher.region());
    assert_eq!(got, toucher.expected());
    // The heat map agrees, and knows which pages were written.
    let pages = profiler.heat().pages();
    for page in pages.iter().filter(|p| toucher.region().contains(&p.page)) {
        let index = page.page - toucher.base_page;
        let written = WRITE.contains(&index) || READ_THEN_WRITE.contains(&index);
        assert_eq!(
            page.access == heatprobe::Access::ReadWrite,
            written,
            "{page:?}"
        );
    }
    assert_eq!(probes.stats().expect("stats").dropped, 0);
    toucher.finish();
}

/// The probes time each fault: every page the child touched has a fault time between the
/// moments before and after its touching, in the probes' units.
#[test]
fn the_probes_time_each_fault() {
    if let Some(why) = bpf_unavailable() {
        return skip("the_probes_time_each_fault", &why);
    }
    let probes = Arc::new(Probes::load().expect("load probes"));
    let mut toucher = Toucher::spawn();
    let target = probes.track_process(toucher.pid()).expect("track child");
    let before = heatprobe::probes::monotonic_ns();
    toucher.touch();
    let elapsed = heatprobe::probes::monotonic_ns() - before;
    let since = heatprobe::probes::fault_time(before);
    let (counts, times) = probes.counts_and_last_faults(target).expect("counts");
    let touched = in_region(counts, toucher.region());
    assert_eq!(touched.len(), toucher.expected().len(), "{touched:?}");
    // A fault time is truncated to its unit, so it may read up to one unit before `before`.
    let unit = heatprobe::probes::FAULT_TIME_UNIT_NS;
    for page in touched.keys() {
        let at = *times.get(page).expect("a time for every counted page");
        let wait = heatprobe::probes::fault_wait_ns(since.wrapping_sub(1), at, elapsed + unit)
            .expect("well within a wrap");
        assert!(
            wait <= elapsed + 2 * unit,
            "page {page}: faulted {wait} ns after the touching began, which took {elapsed} ns"
        );
    }
    toucher.finish();
}

#[test]
fn an_untracked_process_leaves_no_entries() {
    if let Some(why) = bpf_unavailable() {
        return skip("an_untracked_process_leaves_no_entries", &why);
    }
    let probes = Probes::load().expect("load probes");
    let mut toucher = Toucher::spawn();
    toucher.touch();
    assert_eq!(probes.chunk_count().expect("read map"), 0);
    assert_eq!(probes.stats().expect("stats").protection, 0);
    toucher.finish();
}

/// Runs the heatprobe CLI on the toucher, starting the touching once heatprobe says it is
/// profiling.
fn run_cli(args: &[&str], toucher: &mut Toucher) -> String {
    let mut cli = Command::new(workspace_bin("heatprobe"))
        .args(args)
        .args([
            "--pid",
            &toucher.pid().to_string(),
            "--duration",
            "600ms",
            "--interval",
            "100ms",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn heatprobe (built by cargo xtask build)");
    let mut stderr = BufReader::new(cli.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("heatprobe stderr");
    assert!(
        line.contains("profiling process"),
        "heatprobe said {line:?}"
    );
    toucher.touch();
    let output = cli.wait_with_output().expect("heatprobe exits");
    assert!(output.status.success(), "heatprobe failed");
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
fn cli_record_reports_exact_counts_as_json() {
    if let Some(why) = bpf_unavailable() {
        return skip("cli_record_reports_exact_counts_as_json", &why);
    }
    let mut toucher = Toucher::spawn();
    let stdout = run_cli(&["record"], &mut toucher);
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    for key in [
        "target",
        "page_size",
        "interval_ms",
        "epochs",
        "dropped",
        "pages",
    ] {
        assert!(value.get(key).is_some(), "missing {key} in {value}");
    }
    assert_eq!(value["target"]["kind"], "process");
    assert_eq!(value["target"]["pid"], toucher.pid());
    assert_eq!(value["page_size"], 4096);
    assert_eq!(value["interval_ms"], 100);
    let first = &value["pages"][0];
    for key in ["page", "reads", "writes", "heat", "class", "access"] {
        assert!(first.get(key).is_some(), "missing pages[].{key} in {first}");
    }
    let report: RecordReport = serde_json::from_value(value).expect("typed report");
    assert!(report.epochs >= 1);
    let got = in_region(
        report.pages.iter().map(|p| {
            (
                p.page,
                PageCounts {
                    reads: p.reads,
                    writes: p.writes,
                },
            )
        }),
        toucher.region(),
    );
    assert_eq!(got, toucher.expected());
    toucher.finish();
}

#[test]
fn cli_plan_puts_written_pages_first_and_read_only_pages_after() {
    if let Some(why) = bpf_unavailable() {
        return skip(
            "cli_plan_puts_written_pages_first_and_read_only_pages_after",
            &why,
        );
    }
    let mut toucher = Toucher::spawn();
    let stdout = run_cli(&["plan"], &mut toucher);
    let report: PlanReport = serde_json::from_str(&stdout).expect("plan JSON");
    let region = toucher.region();
    let ours = |pages: &[u64]| -> Vec<u64> {
        pages
            .iter()
            .filter(|p| region.contains(p))
            .map(|p| p - toucher.base_page)
            .collect()
    };
    let mut written = ours(&report.plan.read_write);
    written.sort();
    let mut read_only = ours(&report.plan.read_only);
    read_only.sort();
    let mut expected_written: Vec<u64> = WRITE.iter().chain(READ_THEN_WRITE).copied().collect();
    expected_written.sort();
    assert_eq!(written, expected_written);
    assert_eq!(read_only, READ);
    assert!(
        report.plan.untouched.is_empty(),
        "process plans have no universe"
    );
    assert_eq!(report.pages_total, report.plan.order().count() as u64);
    toucher.finish();
}

#[test]
fn cli_rejects_a_missing_process_with_one_clear_error() {
    if let Some(why) = bpf_unavailable() {
        return skip("cli_rejects_a_missing_process_with_one_clear_error", &why);
    }
    let output = Command::new(workspace_bin("heatprobe"))
        .args(["record", "--pid", "4000000000", "--duration", "100ms"])
        .output()
        .expect("run heatprobe");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(
        errors[0].contains("no process with pid 4000000000"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

/// A profiler on `toucher` with 20 ms epochs.
fn profile_every_20ms(toucher: &Toucher) -> Profiler {
    let probes = Arc::new(Probes::load().expect("load probes"));
    Profiler::start(
        probes,
        Target::Process { pid: toucher.pid() },
        ProfilerConfig {
            interval: Duration::from_millis(20),
            ..ProfilerConfig::default()
        },
    )
    .expect("track child")
}

#[test]
fn profiling_stops_when_the_target_exits() {
    if let Some(why) = bpf_unavailable() {
        return skip("profiling_stops_when_the_target_exits", &why);
    }
    let mut toucher = Toucher::spawn();
    let mut profiler = profile_every_20ms(&toucher);
    toucher.touch();
    toucher.finish();
    let exited = profiler.run_for(Duration::from_secs(60)).expect("run");
    assert!(exited, "run_for returns early once the target is gone");
}

/// A sampler over a make-believe memory that only counts the frames it is asked to re-arm.
struct CountingSampler {
    frames: u64,
    rearmed: Arc<AtomicU64>,
}

impl ActiveSampler for CountingSampler {
    fn frames(&self) -> u64 {
        self.frames
    }

    fn rearm_writes(&mut self, _frames: Range<u64>) -> Result<(), SamplerError> {
        Ok(())
    }

    fn rearm_accesses(&mut self, frames: Range<u64>) -> Result<(), SamplerError> {
        self.rearmed
            .fetch_add(frames.end - frames.start, Ordering::Relaxed);
        Ok(())
    }
}

#[test]
fn a_timed_profile_leaves_nothing_armed_that_no_epoch_reads() {
    if let Some(why) = bpf_unavailable() {
        return skip(
            "a_timed_profile_leaves_nothing_armed_that_no_epoch_reads",
            &why,
        );
    }
    let toucher = Toucher::spawn();
    let mut profiler = profile_every_20ms(&toucher);
    let rearmed = Arc::new(AtomicU64::new(0));
    profiler.set_sampler(Box::new(CountingSampler {
        frames: 64,
        rearmed: Arc::clone(&rearmed),
    }));
    profiler.set_credit(Credit::ArmedLastEpoch);
    let exited = profiler.run_for(Duration::from_millis(200)).expect("run");
    assert!(!exited);
    let rearmed = rearmed.load(Ordering::Relaxed);
    // Every frame re-armed had its check read by a later epoch: the last epoch armed none,
    // which would be faults after the profile that nobody counts.
    let checked: u64 = profiler.checks().iter().map(|&c| u64::from(c)).sum();
    assert!(rearmed > 0, "the profile ran more than one epoch");
    assert_eq!(checked, rearmed);
    toucher.finish();
}

/// A process whose memory is all mapped and that touches nothing new faults on nothing: its
/// record says how little it saw, why, and what would see more, instead of an empty list.
#[test]
fn a_profile_that_sees_a_sliver_of_a_process_says_so() {
    if let Some(why) = bpf_unavailable() {
        return skip("a_profile_that_sees_a_sliver_of_a_process_says_so", &why);
    }
    let mut quiet = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let output = Command::new(workspace_bin("heatprobe"))
        .args(["record", "--pid", &quiet.id().to_string()])
        .args(["--duration", "300ms", "--interval", "100ms", "--json"])
        .output()
        .expect("run heatprobe (built by cargo xtask build)");
    let _ = quiet.kill();
    let _ = quiet.wait();
    assert!(output.status.success(), "heatprobe failed: {output:?}");
    let report: RecordReport = serde_json::from_slice(&output.stdout).expect("one JSON object");
    let blind = report.blind_spot.expect("a thin profile says so");
    assert!(
        blind.contains(&format!("only {} of", report.pages.len())),
        "{blind}"
    );
    assert!(
        blind.contains("page_idle") && blind.contains("DAMON"),
        "{blind}"
    );
}
