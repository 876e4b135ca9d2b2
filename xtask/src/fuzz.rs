//! `cargo xtask fuzz [--seconds N] [TARGET]`: builds the fuzz targets (`fuzz/`, cargo-fuzz on
//! nightly) and runs each for a bounded time.
//!
//! Each run starts from the checked-in seeds (`fuzz/seeds/<target>/`) and the kept crashing
//! inputs (`fuzz/regressions/<target>/`), copied into a scratch corpus under
//! `target/fuzz/corpus/`, so runs never dirty the tree. A crashing input is copied into
//! `fuzz/regressions/<target>/`, where the regression tests replay it on stable once fixed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, Result, bail};

use crate::process::{cargo_nightly, run, workspace_root};

/// The fuzz targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 6] = [
    "frames",
    "state",
    "elf",
    "boot_args",
    "api_codec",
    "destination_session",
];

/// How one target's run went.
pub struct Outcome {
    pub target: &'static str,
    /// Inputs tried, and how many a second.
    pub runs: Option<(u64, u64)>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

/// The command: the named target, or every target.
pub fn fuzz(seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&'static str> = match target {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|t| **t == name) {
            Some(t) => vec![*t],
            None => bail!("no fuzz target `{name}`; there are {}", TARGETS.join(", ")),
        },
    };
    let outcomes = run_targets(&targets, seconds)?;
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    if !failed.is_empty() {
        bail!("{} of {} fuzz targets failed", failed.len(), outcomes.len());
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// Builds every target once, then runs each for `seconds`, printing one line per target.
pub fn run_targets(targets: &[&'static str], seconds: u64) -> Result<Vec<Outcome>> {
    eprintln!("xtask: building the fuzz targets (nightly, libFuzzer, fuzz/target)");
    let mut build = cargo_nightly();
    build.current_dir(fuzz_dir()).args(["fuzz", "build"]);
    if let [one] = targets {
        build.arg(one);
    }
    run(
        &mut build,
        "cargo fuzz build with the pinned nightly (is cargo-fuzz installed? `cargo xtask setup` installs it)",
    )?;
    let mut outcomes = Vec::new();
    for &target in targets {
        let outcome = run_target(target, seconds)?;
        match (&outcome.failure, outcome.runs) {
            (None, Some((runs, rate))) => {
                println!("fuzz {target}: ok, {runs} inputs in {seconds} s ({rate}/s)")
            }
            (None, None) => println!("fuzz {target}: ok"),
            (Some(why), _) => println!("fuzz {target}: FAILED: {why}"),
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Copies every file of `from` (if it exists) into `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_file() {
            fs::copy(&path, to.join(entry.file_name()))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

fn run_target(target: &'static str, seconds: u64) -> Result<Outcome> {
    let scratch = workspace_root().join("target/fuzz");
    let corpus = scratch.join("corpus").join(target);
    let artifacts = scratch.join("artifacts").join(target);
    let log = scratch.join(format!("{target}.log"));
    let _ = fs::remove_dir_all(&artifacts);
    for dir in [&corpus, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let fuzz = fuzz_dir();
    copy_files(&fuzz.join("seeds").join(target), &corpus)?;
    copy_files(&fuzz.join("regressions").join(target), &corpus)?;
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    eprintln!(
        "xtask: fuzzing {target} for {seconds} s (log: {})",
        log.display()
    );
    let status = cargo_nightly()
        .current_dir(&fuzz)
        .args(["fuzz", "run", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(Stdio::null())
        .stderr(log_file)
        .status()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let runs = text.lines().find_map(parse_done);
    if status.success() {
        return Ok(Outcome {
            target,
            runs,
            failure: None,
        });
    }
    // Keep what crashed it where the regression tests will replay it.
    let kept_dir = fuzz.join("regressions").join(target);
    let mut kept = Vec::new();
    for entry in fs::read_dir(&artifacts)
        .map(|e| e.filter_map(Result::ok).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        fs::create_dir_all(&kept_dir)
            .with_context(|| format!("creating {}", kept_dir.display()))?;
        let to = kept_dir.join(entry.file_name());
        fs::copy(entry.path(), &to)
            .with_context(|| format!("copying {}", entry.path().display()))?;
        kept.push(to);
    }
    // From the panic (or sanitizer report) on: what broke, and where.
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains("panicked at") || l.starts_with("==") || l.contains("ERROR:"))
        .unwrap_or(lines.len().saturating_sub(30));
    for line in lines.iter().skip(start).take(30) {
        eprintln!("  {line}");
    }
    let failure = match kept.first() {
        Some(input) => {
            let relative = input.strip_prefix(&fuzz).unwrap_or(input);
            format!(
                "{target} crashed ({status}); the input is kept as fuzz/{}: reproduce with \
                 `cd fuzz && cargo {} fuzz run {target} {}`, fix the decoder, and commit \
                 the input (tests/tests/fuzz_regressions.rs replays it)",
                relative.display(),
                crate::toolchain::plus(),
                relative.display()
            )
        }
        None => format!(
            "{target} failed ({status}) without a crashing input; see {}",
            log.display()
        ),
    };
    Ok(Outcome {
        target,
        runs,
        failure: Some(failure),
    })
}

/// libFuzzer's last status line: `#N DONE cov: ... exec/s: R ...`.
fn parse_done(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix('#')?;
    let mut words = rest.split_whitespace();
    let runs = words.next()?.parse().ok()?;
    if words.next()? != "DONE" {
        return None;
    }
    let rate = rest
        .split("exec/s:")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((runs, rate))
}

#[cfg(test)]
mod tests {
    use super::parse_done;

    #[test]
    fn reads_libfuzzers_final_line() {
        assert_eq!(
            parse_done(
                "#995474\tDONE   cov: 275 ft: 401 corp: 42/185Kb lim: 8337 exec/s: 47403 rss: 434Mb"
            ),
            Some((995474, 47403))
        );
        assert_eq!(parse_done("#5\tNEW    cov: 186 exec/s: 0"), None);
    }
}
