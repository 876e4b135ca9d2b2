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
