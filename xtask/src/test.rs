//! `cargo xtask test`: formatting, lints, the supply-chain audit, then every test in release mode (the same profile
//! `cargo xtask build` used, so nothing is compiled twice), then every fuzz target for a
//! bounded time. Ends with one line totalling the test results of every test binary and the
//! fuzz targets.

use std::io::{BufRead, BufReader};

use anyhow::{Context, Result, bail};

use crate::{
    audit, fuzz,
    process::{cargo, run, workspace_root},
};

pub fn test(long: bool) -> Result<()> {
    run(
        cargo().args(["fmt", "--all", "--", "--check"]),
        "cargo fmt --check",
    )?;
    run(
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy",
    )?;
    audit::audit()?;
    let mut test = cargo();
    // Every test binary runs even when one fails, so the summary counts them all.
    test.args(["test", "--workspace", "--release", "--no-fail-fast"]);
    if long {
        test.env("HEATPROBE_LONG_TESTS", "1");
    }
    // Tests that skip (a capability is absent, or a long variant without --long) return
    // early, which libtest counts as passed; they record themselves here instead.
    let skip_log = workspace_root().join("target/test-skips.log");
    let _ = std::fs::remove_file(&skip_log);
    test.env("HEATPROBE_SKIP_LOG", &skip_log);
    let mut child = test
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    for skip in skips.lines() {
        println!("skipped: {skip}");
    }
    totals.add_skips(&skips);
    // Then every fuzz target for a bounded time; each counts as one test.
    let seconds = if long {
        FUZZ_SECONDS_LONG
    } else {
        FUZZ_SECONDS
    };
    let fuzzed = fuzz::run_targets(&fuzz::TARGETS, seconds)?;
    let fuzz_failed = fuzzed.iter().filter(|o| o.failure.is_some()).count() as u64;
    totals.passed += fuzzed.len() as u64 - fuzz_failed;
    totals.failed += fuzz_failed;
    println!(
        "tests: {} passed, {} failed, {} skipped, {} with a part skipped (including {} fuzz \
         targets, {seconds} s each)",
        totals.passed,
        totals.failed,
        totals.skipped,
        totals.parts_skipped,
        fuzzed.len()
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    for outcome in &fuzzed {
        if let Some(why) = &outcome.failure {
            eprintln!("xtask: fuzz {}: {why}", outcome.target);
        }
    }
    if fuzz_failed > 0 {
        bail!("{fuzz_failed} fuzz targets crashed");
    }
    // A long run is meant to run everything: a test that skipped for a missing capability
    // (its reason printed above) fails it.
    if long && totals.skipped + totals.parts_skipped > 0 {
        bail!(
            "{} tests and {} parts of tests skipped in a --long run, which runs everything \
             (reasons above)",
            totals.skipped,
            totals.parts_skipped
        );
    }
    Ok(())
}

/// How the tests library marks a part of a test skipped in the skip log (`skip_part`).
const PART_SKIPPED: &str = "part ";

/// How long `cargo xtask test` runs each fuzz target, and with `--long`.
const FUZZ_SECONDS: u64 = 10;
const FUZZ_SECONDS_LONG: u64 = 60;

/// Sums libtest's `test result: ok. N passed; N failed; N ignored; ...` lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
    parts_skipped: u64,
}

impl Totals {
    /// Counts the skip log's lines. A whole test skipped returned early, and libtest counted
    /// it passed; a part skipped (the tests library's `PART_SKIPPED` lines) leaves its
    /// test's own verdict alone.
    fn add_skips(&mut self, log: &str) {
        let parts = log.lines().filter(|l| l.starts_with(PART_SKIPPED)).count() as u64;
        let skipped = log.lines().count() as u64 - parts;
        self.passed = self.passed.saturating_sub(skipped);
        self.skipped += skipped;
        self.parts_skipped += parts;
    }

    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.skipped += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_test_counts_once_and_a_part_skipped_leaves_its_verdict() {
        let mut totals = Totals::default();
        totals.add("test result: ok. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        // Two tests returned early (counted passed by libtest), one ran all but a part.
        totals.add_skips(
            "a: cannot create a network namespace\nb: no /dev/kvm\npart the heat strategy of c: no BPF\n",
        );
        assert_eq!(
            (
                totals.passed,
                totals.failed,
                totals.skipped,
                totals.parts_skipped
            ),
            (3, 1, 2, 1)
        );
    }
}
