//! What `page_heat` and `plan` answer, and how the CLI prints it.
//!
//! A partition's heat is reported as `heatprobe record` reports a target's (its types, not a
//! copy of them), with pages as guest frame numbers. A plan preview is round 0's order as the
//! migration builds it ([`Order`]), cut into the segments of heatprobe's plan.

use std::fmt::Write as _;

use heatprobe::{
    Access, HeatClass, MigrationPlan, PAGE_SIZE,
    plan::{PlanError, Segment},
    report::{RecordReport, class_name},
};
use serde::{Deserialize, Serialize};

use super::heat_view::HeatView;
use crate::migration::{Strategy, order::Order, source::MigrationOptions};

/// Pages of each segment a plan preview lists.
pub const FIRST_PAGES: usize = 16;
/// Cells of the text heatmap line.
pub const HEATMAP_WIDTH: usize = 64;
/// Hot ranges the text summary lists.
const HOT_RANGES_SHOWN: usize = 8;

/// A partition's page heat over one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionHeat {
    pub id: String,
    /// Frames of the partition's memory: pages are `0..frames`.
    pub frames: u64,
    /// The window asked for; it is rounded to whole epochs of `record.interval_ms`.
    pub duration_ms: u64,
    /// The heat as `heatprobe record --json` has it: `page` is the guest frame number.
    pub record: RecordReport,
    /// Warm heat (`warm_heat`): what the budget spent over the window; `None` for a window
    /// asked for, or without a budget.
    pub spent: Option<heatprobe::budget::Spent>,
}

/// The heat a plan was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanProfile {
    pub duration_ms: u64,
    pub interval_ms: u64,
    pub epochs: u64,
    pub pages_touched: u64,
}

/// A run of round 0's order sent for one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegmentKind {
    /// Every frame by address (the address strategy).
    Address,
    /// Read-only pages, hottest first.
    ReadOnly,
    /// Pages never touched while profiling, by address.
    Untouched,
    /// Read-write pages, coldest first.
    ReadWrite,
    /// Hot written pages a pre-copy migration holds back from every round but the last
    /// (they are part of the read-write segment too).
    HeldBack,
}

impl From<Segment> for SegmentKind {
    fn from(segment: Segment) -> Self {
        match segment {
            Segment::ReadOnly => Self::ReadOnly,
            Segment::Untouched => Self::Untouched,
            Segment::ReadWrite => Self::ReadWrite,
        }
    }
}

impl SegmentKind {
    fn describe(self) -> &'static str {
        match self {
            Self::Address => "by address",
            Self::ReadOnly => "read-only, hot to cold",
            Self::Untouched => "untouched",
            Self::ReadWrite => "read-write, cold to hot",
            Self::HeldBack => "held back to the last round (hot writes)",
        }
    }
}

/// One segment: its size and its first pages, in the order they are sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSegment {
    pub kind: SegmentKind,
    pub pages: u64,
    /// The first [`FIRST_PAGES`] pages (guest frame numbers).
    pub first: Vec<u64>,
}

impl PlanSegment {
    fn new(kind: SegmentKind, pages: &[u64]) -> Self {
        Self {
            kind,
            pages: pages.len() as u64,
            first: pages.iter().take(FIRST_PAGES).copied().collect(),
        }
    }
}

/// The order a migration of the partition would send round 0 in, if it started now: a dry
/// run, nothing is sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanPreview {
    pub id: String,
    pub strategy: Strategy,
    pub frames: u64,
    pub page_size: u64,
    /// The heat the plan was made from (heat strategy only).
    pub profile: Option<PlanProfile>,
    /// Round 0's segments in the order they are sent; together every frame once.
    pub segments: Vec<PlanSegment>,
    /// What a migration with the default options holds back from round 0.
    pub held_back: Option<PlanSegment>,
}

/// Why a plan cannot be previewed.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("the heat cannot be planned")]
    Plan(#[source] PlanError),
    #[error("the order has {order} pages but its segments {segments}")]
    Segments { order: u64, segments: u64 },
}

impl PlanPreview {
    /// Address order: one segment, every frame.
    pub fn address(id: &str, frames: u64) -> Self {
        let order = Order::address(frames);
        Self {
            id: id.to_string(),
            strategy: Strategy::Address,
            frames,
            page_size: PAGE_SIZE,
            profile: None,
            segments: vec![PlanSegment::new(SegmentKind::Address, &order.plan)],
            held_back: None,
        }
    }

    /// Heat order from `record`'s pages: round 0's order is the migration's own
    /// ([`Order::from_heat`]), cut at the sizes of heatprobe's plan segments.
    pub fn heat(
        id: &str,
        frames: u64,
        duration_ms: u64,
        record: &RecordReport,
    ) -> Result<Self, PreviewError> {
        let order = Order::from_heat(&record.pages, frames).map_err(PreviewError::Plan)?;
        let plan =
            MigrationPlan::build(&record.pages, Some(0..frames)).map_err(PreviewError::Plan)?;
        let sizes = plan.precopy_segments();
        let total: u64 = sizes.iter().map(|(_, len)| len).sum();
        if total != order.plan.len() as u64 {
            return Err(PreviewError::Segments {
                order: order.plan.len() as u64,
                segments: total,
            });
        }
        let mut rest = order.plan.as_slice();
        let mut segments = Vec::new();
        for (segment, len) in sizes {
            // The sizes add up to the order's length (checked above), so this never clamps.
            let (this, after) = rest.split_at((len as usize).min(rest.len()));
            segments.push(PlanSegment::new(segment.into(), this));
            rest = after;
        }
        let options = MigrationOptions::default();
        let held_back = options.defer_hot_writes.then(|| {
            let (_, later) = order.hold_back_hot_writes(order.plan.clone(), usize::MAX);
            PlanSegment::new(SegmentKind::HeldBack, &later)
        });
        Ok(Self {
            id: id.to_string(),
            strategy: Strategy::Heat,
            frames,
            page_size: PAGE_SIZE,
            profile: Some(PlanProfile {
                duration_ms,
                interval_ms: record.interval_ms,
                epochs: record.epochs,
                pages_touched: record.pages.len() as u64,
            }),
            segments,
            held_back,
        })
    }
}

/// Characters of the heatmap line, coolest first; a space is a run no page of which was
/// touched.
const RAMP: &[u8] = b".:-=+*#%@";

/// One line of characters whose intensity is the hottest page's heat in each run of frames,
/// as damo's text heatmaps show memory.
pub fn heatmap_line(view: &HeatView) -> String {
    view.cells
        .iter()
        .map(|cell| {
            if cell.touched == 0 {
                return ' ';
            }
            let share = if view.max_heat > 0.0 {
                (f64::from(cell.heat) / view.max_heat).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let level = ((share * (RAMP.len() - 1) as f64).round() as usize).min(RAMP.len() - 1);
            char::from(RAMP[level])
        })
        .collect()
}

/// The text summary of `migrator heat`: the window, the classes, the hot ranges and a
/// heatmap line.
pub fn render_heat(heat: &PartitionHeat) -> String {
    let record = &heat.record;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "partition {}: {} of {} frames touched in {} epochs of {} ms ({} faults dropped)",
        heat.id,
        record.pages.len(),
        heat.frames,
        record.epochs,
        record.interval_ms,
        record.dropped
    );
    let count = |class: HeatClass, access: Access| {
        record
            .pages
            .iter()
            .filter(|p| p.class == class && p.access == access)
            .count()
    };
    let mut classes = Vec::new();
    for class in [HeatClass::Hot, HeatClass::Warm, HeatClass::Cold] {
        let (ro, rw) = (
            count(class, Access::ReadOnly),
            count(class, Access::ReadWrite),
        );
        classes.push(format!(
            "{} {} ({ro} ro, {rw} rw)",
            class_name(class),
            ro + rw
        ));
    }
    let _ = writeln!(out, "classes: {}", classes.join(", "));
    let view = HeatView::build(&record.pages, heat.frames, HEATMAP_WIDTH, record.epochs);
    if view.hot_ranges.is_empty() {
        let _ = writeln!(out, "hot ranges: none");
    } else {
        let _ = writeln!(out, "hot ranges, hottest first:");
        for range in view.hot_ranges.iter().take(HOT_RANGES_SHOWN) {
            let _ = writeln!(
                out,
                "  {:#x}..{:#x}  {:>6} pages  heat {:>10.1}  {}",
                range.start,
                range.end,
                range.end - range.start,
                range.heat,
                if range.written { "rw" } else { "ro" }
            );
        }
        if view.hot_ranges.len() > HOT_RANGES_SHOWN {
            let _ = writeln!(
                out,
                "  ... {} more (use --json for every page)",
                view.hot_ranges.len() - HOT_RANGES_SHOWN
            );
        }
    }
    let _ = writeln!(
        out,
        "heatmap |{}| {:#x}..{:#x}, {} frames a character, ' ' untouched, '{}' coolest to '{}' hottest",
        heatmap_line(&view),
        0,
        heat.frames,
        view.frames_per_cell,
        char::from(RAMP[0]),
        char::from(RAMP[RAMP.len() - 1])
    );
    out
}

/// The text of `migrator plan`.
pub fn render_plan(preview: &PlanPreview) -> String {
    let mut out = String::new();
    let strategy = match preview.strategy {
        Strategy::Heat => "heat",
        Strategy::Address => "address",
    };
    let _ = writeln!(
        out,
        "round 0 of a {strategy} migration of partition {} now: {} pages of {} bytes (a dry run)",
        preview.id, preview.frames, preview.page_size
    );
    if let Some(profile) = &preview.profile {
        let _ = writeln!(
            out,
            "heat from {} ms of profiling: {} epochs of {} ms, {} pages touched",
            profile.duration_ms, profile.epochs, profile.interval_ms, profile.pages_touched
        );
    }
    let line = |out: &mut String, label: String, segment: &PlanSegment| {
        let pages: Vec<String> = segment.first.iter().map(|p| format!("{p:#x}")).collect();
        let more = if segment.pages > segment.first.len() as u64 {
            " ..."
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {label:<45} {:>8} pages  [{}{more}]",
            segment.pages,
            pages.join(" ")
        );
    };
    for (n, segment) in preview.segments.iter().enumerate() {
        line(
            &mut out,
            format!("{}. {}:", n + 1, segment.kind.describe()),
            segment,
        );
    }
    if let Some(held) = &preview.held_back {
        line(&mut out, format!("   {}:", held.kind.describe()), held);
    }
    let _ = writeln!(out, "(the first {FIRST_PAGES} pages of each segment)");
    out
}

#[cfg(test)]
mod tests {
    use heatprobe::{
        PageHeat,
        report::{TargetKind, TargetSummary},
    };

    use super::*;

    fn page(page: u64, heat: f64, class: HeatClass, access: Access) -> PageHeat {
        PageHeat {
            page,
            reads: heat as u64,
            writes: u64::from(access == Access::ReadWrite),
            heat,
            class,
            access,
        }
    }

    fn record(pages: Vec<PageHeat>) -> RecordReport {
        RecordReport {
            target: TargetSummary {
                kind: TargetKind::Vm,
                pid: 1,
            },
            page_size: PAGE_SIZE,
            interval_ms: 200,
            epochs: 10,
            dropped: 0,
            pages,
            blind_spot: None,
        }
    }

    fn sample() -> RecordReport {
        record(vec![
            page(1, 5.0, HeatClass::Hot, Access::ReadWrite),
            page(2, 1.0, HeatClass::Cold, Access::ReadWrite),
            page(3, 9.0, HeatClass::Hot, Access::ReadOnly),
            page(4, 2.0, HeatClass::Warm, Access::ReadOnly),
            page(6, 3.0, HeatClass::Warm, Access::ReadWrite),
        ])
    }

    #[test]
    fn the_preview_is_the_migrations_order_cut_into_its_segments() {
        let record = sample();
        let preview = PlanPreview::heat("p0", 8, 2000, &record).expect("plans");
        let order = Order::from_heat(&record.pages, 8).expect("plans");
        let kinds: Vec<SegmentKind> = preview.segments.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                SegmentKind::ReadOnly,
                SegmentKind::Untouched,
                SegmentKind::ReadWrite
            ]
        );
        let joined: Vec<u64> = preview
            .segments
            .iter()
            .flat_map(|s| s.first.clone())
            .collect();
        assert_eq!(joined, order.plan);
        assert_eq!(joined, vec![3, 4, 0, 5, 7, 2, 6, 1]);
        assert_eq!(
            preview.segments.iter().map(|s| s.pages).collect::<Vec<_>>(),
            [2, 3, 3]
        );
        // Page 1 is the only hot written page.
        let held = preview.held_back.expect("defer is the default");
        assert_eq!((held.pages, held.first), (1, vec![1]));
        let text = render_plan(&PlanPreview::heat("p0", 8, 2000, &record).expect("plans"));
        assert!(text.contains("read-only, hot to cold:"), "{text}");
        assert!(text.contains("[0x3 0x4]"), "{text}");
    }

    #[test]
    fn long_segments_show_their_first_pages_only() {
        let preview = PlanPreview::address("p0", 1000);
        assert_eq!(preview.segments.len(), 1);
        assert_eq!(preview.segments[0].pages, 1000);
        assert_eq!(
            preview.segments[0].first,
            (0..FIRST_PAGES as u64).collect::<Vec<_>>()
        );
        assert!(render_plan(&preview).contains("0xf ...]"));
    }

    #[test]
    fn pages_beyond_the_memory_are_an_error_not_a_panic() {
        let record = record(vec![page(9, 1.0, HeatClass::Cold, Access::ReadOnly)]);
        assert!(matches!(
            PlanPreview::heat("p0", 8, 2000, &record),
            Err(PreviewError::Plan(_))
        ));
    }

    #[test]
    fn the_heatmap_line_shows_where_the_heat_is() {
        let record = record(vec![
            page(0, 1.0, HeatClass::Cold, Access::ReadOnly),
            page(70, 100.0, HeatClass::Hot, Access::ReadWrite),
        ]);
        let view = HeatView::build(&record.pages, 80, 8, 10);
        // Ten frames a character: frame 0 is barely warm, frame 70 the hottest, nothing else.
        assert_eq!(heatmap_line(&view), ".      @");
        let heat = PartitionHeat {
            id: "p0".into(),
            frames: 80,
            duration_ms: 2000,
            record,
            spent: None,
        };
        let text = render_heat(&heat);
        assert!(
            text.contains("2 of 80 frames touched in 10 epochs"),
            "{text}"
        );
        assert!(text.contains("hot 1 (0 ro, 1 rw)"), "{text}");
        assert!(text.contains("0x46..0x47"), "{text}");
        assert!(text.contains("heatmap |"), "{text}");
    }

    #[test]
    fn an_empty_heat_renders() {
        let heat = PartitionHeat {
            id: "p0".into(),
            frames: 0,
            duration_ms: 200,
            record: record(Vec::new()),
            spent: None,
        };
        let text = render_heat(&heat);
        assert!(text.contains("hot ranges: none"), "{text}");
        assert_eq!(heatmap_line(&HeatView::build(&[], 0, 64, 0)), " ");
    }
}
