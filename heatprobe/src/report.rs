//! What `heatprobe record` and `heatprobe plan` print: one JSON object for scripts, or a
//! table for people.

use std::{fmt::Write as _, ops::Range};

use serde::{Deserialize, Serialize};

use crate::{
    PAGE_SIZE,
    heat::{Access, HeatClass, PageHeat},
    plan::MigrationPlan,
    profiler::Target,
};

/// `{"kind": "process"|"vm", "pid": N}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSummary {
    pub kind: TargetKind,
    pub pid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Process,
    Vm,
}

impl From<&Target> for TargetSummary {
    fn from(target: &Target) -> Self {
        match target {
            Target::Process { pid } => Self {
                kind: TargetKind::Process,
                pid: *pid,
            },
            Target::Vm { pid, .. } => Self {
                kind: TargetKind::Vm,
                pid: *pid,
            },
        }
    }
}

/// The result of `heatprobe record`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordReport {
    pub target: TargetSummary,
    pub page_size: u64,
    pub interval_ms: u64,
    pub epochs: u64,
    /// Faults lost to a full map.
    pub dropped: u64,
    /// Every touched page, in page order.
    pub pages: Vec<PageHeat>,
    /// A process whose profile saw only a sliver of its memory: why, and what would see
    /// more ([`thin_process_note`]); null otherwise.
    #[serde(default)]
    pub blind_spot: Option<String>,
}

/// The share of a process's resident pages below which its profile is called thin.
pub const THIN_SHARE: f64 = 0.01;

/// Why a process profile that saw `touched` of its `resident` pages saw so little, and what
/// would see more, or `None` if it saw enough. `page_idle` and `damon` say whether this
/// kernel has them.
pub fn thin_process_note(
    touched: u64,
    resident: u64,
    page_idle: bool,
    damon: bool,
) -> Option<String> {
    if resident == 0 || touched as f64 >= THIN_SHARE * resident as f64 {
        return None;
    }
    let has = |yes: bool| if yes { "present here" } else { "absent here" };
    Some(format!(
        "only {touched} of the process's {resident} resident pages faulted: a process whose \
         memory is already mapped faults only on a first touch, a copy-on-write or a \
         protection change, so its hot pages stay silent. Faults are the only signal this \
         kernel offers for another process's memory; page_idle ({}) or DAMON's \
         virtual-address monitoring ({}; `damo record` on the pid, where the machine's \
         monitor allows it) would see every access.",
        has(page_idle),
        has(damon)
    ))
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    pub target: TargetSummary,
    pub page_size: u64,
    pub interval_ms: u64,
    pub epochs: u64,
    pub dropped: u64,
    /// Pages in the plan.
    pub pages_total: u64,
    /// Read-write pages, coldest first, then read-only pages, hottest first, then untouched
    /// ranges.
    pub plan: MigrationPlan,
}

/// A human-readable summary of a record run: class counts and the hottest pages.
pub fn render_record(report: &RecordReport, top: usize) -> String {
    let mut out = String::new();
    let kind = match report.target.kind {
        TargetKind::Process => "process",
        TargetKind::Vm => "vm",
    };
    let _ = writeln!(
        out,
        "target {kind} {}: {} pages touched over {} epochs of {} ms ({} faults dropped)",
        report.target.pid,
        report.pages.len(),
        report.epochs,
        report.interval_ms,
        report.dropped
    );
    if report.target.kind == TargetKind::Process {
        let _ = writeln!(
            out,
            "note: process heat is fault-based: it counts first touches, copy-on-write and \
             protection faults, not every access"
        );
    }
    if let Some(blind) = &report.blind_spot {
        let _ = writeln!(out, "thin: {blind}");
    }
    let count = |class: HeatClass, access: Access| {
        report
            .pages
            .iter()
            .filter(|p| p.class == class && p.access == access)
            .count()
    };
    let _ = writeln!(
        out,
        "\n{:<6} {:>10} {:>10}",
        "class", "ro pages", "rw pages"
    );
    for class in [HeatClass::Hot, HeatClass::Warm, HeatClass::Cold] {
        let _ = writeln!(
            out,
            "{:<6} {:>10} {:>10}",
            class_name(class),
            count(class, Access::ReadOnly),
            count(class, Access::ReadWrite)
        );
    }
    let mut hottest: Vec<&PageHeat> = report.pages.iter().collect();
    hottest.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.page.cmp(&b.page)));
    let _ = writeln!(
        out,
        "\n{:>18} {:>18} {:>8} {:>8} {:>10} {:<5} {:<6}",
        "page", "address", "reads", "writes", "heat", "class", "access"
    );
    for page in hottest.iter().take(top) {
        let _ = writeln!(
            out,
            "{:>#18x} {:>#18x} {:>8} {:>8} {:>10.2} {:<5} {:<6}",
            page.page,
            page.page * PAGE_SIZE,
            page.reads,
            page.writes,
            page.heat,
            class_name(page.class),
            access_name(page.access)
        );
    }
    if hottest.len() > top {
        let _ = writeln!(
            out,
            "... {} more pages (use --json for all)",
            hottest.len() - top
        );
    }
    out
}

/// A human-readable summary of a plan.
pub fn render_plan(report: &PlanReport) -> String {
    let plan = &report.plan;
    let untouched: u64 = plan.untouched.iter().map(|r| r.end - r.start).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "migration plan for pid {}: {} pages ({} epochs of {} ms)",
        report.target.pid, report.pages_total, report.epochs, report.interval_ms
    );
    let _ = writeln!(
        out,
        "  1. read-write, cold to hot: {:>8} pages  {}",
        plan.read_write.len(),
        preview(&plan.read_write)
    );
    let _ = writeln!(
        out,
        "  2. read-only, hot to cold:  {:>8} pages  {}",
        plan.read_only.len(),
        preview(&plan.read_only)
    );
    let _ = writeln!(
        out,
        "  3. untouched:               {:>8} pages  {}",
        untouched,
        preview_ranges(&plan.untouched)
    );
    out
}

fn preview(pages: &[u64]) -> String {
    let shown: Vec<String> = pages.iter().take(6).map(|p| format!("{p:#x}")).collect();
    let more = if pages.len() > 6 { ", ..." } else { "" };
    format!("[{}{more}]", shown.join(", "))
}

fn preview_ranges(ranges: &[Range<u64>]) -> String {
    let shown: Vec<String> = ranges
        .iter()
        .take(4)
        .map(|r| format!("{:#x}..{:#x}", r.start, r.end))
        .collect();
    let more = if ranges.len() > 4 { ", ..." } else { "" };
    format!("[{}{more}]", shown.join(", "))
}

pub fn class_name(class: HeatClass) -> &'static str {
    match class {
        HeatClass::Hot => "hot",
        HeatClass::Warm => "warm",
        HeatClass::Cold => "cold",
    }
}

pub fn access_name(access: Access) -> &'static str {
    match access {
        Access::ReadOnly => "ro",
        Access::ReadWrite => "rw",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_that_saw_a_sliver_of_a_process_says_why_and_what_would_see_more() {
        // As measured on redis-server: one page of some 40,000 resident.
        let note = thin_process_note(1, 40_000, false, true).unwrap();
        assert!(
            note.contains("only 1 of the process's 40000 resident pages"),
            "{note}"
        );
        assert!(note.contains("page_idle (absent here)"), "{note}");
        assert!(note.contains("monitoring (present here"), "{note}");
        // A profile that saw 1% or more is not thin; nothing resident, nothing to say.
        assert_eq!(thin_process_note(400, 40_000, false, true), None);
        assert_eq!(thin_process_note(0, 0, false, false), None);
    }
}
