//! The matrix's statistics: figures out of reports, medians with their spread, and the
//! heat/address ratios, of the medians and paired by run.

use std::collections::BTreeMap;

use heatprobe_tests::bench::{Spread, median, plural};
use serde_json::Value;

pub(crate) fn completed(report: &Value) -> bool {
    report["status"] == "completed"
}

pub(crate) fn digests_equal(report: &Value) -> bool {
    report["source_digest"].is_string() && report["source_digest"] == report["dest_digest"]
}

/// The median of `key` over the reports that have it as a number (for the tls section).
pub(crate) fn field(reports: &[Value], key: &str) -> f64 {
    median(reports.iter().filter_map(|r| r[key].as_f64()).collect())
}

/// The number at JSON `pointer` in each completed report that has one.
pub(crate) fn completed_values(reports: &[Value], pointer: &str) -> Vec<f64> {
    reports
        .iter()
        .filter(|r| completed(r))
        .filter_map(|r| r.pointer(pointer).and_then(Value::as_f64))
        .collect()
}

pub(crate) fn stat(reports: &[Value], pointer: &str) -> Option<Spread> {
    Spread::of(completed_values(reports, pointer))
}

/// `n/RUNS` of the reports for which `test` holds.
pub(crate) fn count(reports: &[Value], test: impl Fn(&Value) -> bool) -> String {
    format!(
        "{}/{}",
        reports.iter().filter(|r| test(r)).count(),
        reports.len()
    )
}

/// `n/RUNS` of the reports whose `downtime_limit_met` is true, or `–` if none has the field.
pub(crate) fn limit_met(reports: &[Value]) -> String {
    if reports
        .iter()
        .all(|r| !r["downtime_limit_met"].is_boolean())
    {
        return "–".into();
    }
    count(reports, |r| r["downtime_limit_met"] == true)
}

/// Each `cutover_reason` with how many runs gave it, or `–`.
pub(crate) fn cutover_reasons(reports: &[Value]) -> String {
    let mut reasons = BTreeMap::new();
    for reason in reports.iter().filter_map(|r| r["cutover_reason"].as_str()) {
        *reasons.entry(reason).or_insert(0) += 1;
    }
    if reasons.is_empty() {
        return "–".into();
    }
    reasons
        .iter()
        .map(|(reason, n)| format!("{reason} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A ratio of two figures, or `None` when the denominator is not positive.
pub(crate) fn ratio(heat: f64, address: f64) -> Option<f64> {
    (address > 0.0 && heat.is_finite()).then(|| heat / address)
}

pub(crate) fn show_ratio(heat: Option<Spread>, address: Option<Spread>) -> String {
    match (heat, address) {
        (Some(h), Some(a)) => match ratio(h.median, a.median) {
            Some(r) => format!("{r:.2}x"),
            None if h.median == 0.0 => "– (both 0)".into(),
            None => "– (address 0)".into(),
        },
        _ => "–".into(),
    }
}

/// The ratios of run i of heat to run i of address at `pointer`, over the pairs where both
/// completed and address's figure is positive.
pub(crate) fn paired(heat: &[Value], address: &[Value], pointer: &str) -> Vec<f64> {
    heat.iter()
        .zip(address)
        .filter(|(h, a)| completed(h) && completed(a))
        .filter_map(|(h, a)| {
            let (h, a) = (
                h.pointer(pointer).and_then(Value::as_f64)?,
                a.pointer(pointer).and_then(Value::as_f64)?,
            );
            ratio(h, a)
        })
        .collect()
}

pub(crate) fn show_paired(heat: &[Value], address: &[Value], pointer: &str) -> String {
    let ratios = paired(heat, address, pointer);
    let n = ratios.len();
    match Spread::of(ratios) {
        Some(s) => format!(
            "{:.2}x ({:.2}–{:.2}x, {})",
            s.median,
            s.min,
            s.max,
            plural(n, "pair")
        ),
        None => "– (no pair)".into(),
    }
}
