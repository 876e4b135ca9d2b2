//! A partition's page heat, condensed for a dashboard: binned cells, hot ranges, a histogram.
//!
//! The heat comes from the partition's shared profiler (`profilers`); this module only
//! condenses it.

use heatprobe::{Access, HeatClass, PageHeat};
use serde::{Deserialize, Serialize};

/// One cell of the heatmap: a run of consecutive frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeatCell {
    /// Hottest page's heat in the cell.
    pub heat: f32,
    /// Whether any page in the cell was written.
    pub written: bool,
    /// Pages touched in the cell.
    pub touched: u32,
}

/// A run of hot pages.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HotRange {
    pub start: u64,
    pub end: u64,
    pub heat: f64,
    pub written: bool,
}

/// The heat of a partition's memory as a dashboard shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeatView {
    pub frames: u64,
    pub epochs: u64,
    /// Frames per cell.
    pub frames_per_cell: u64,
    pub cells: Vec<HeatCell>,
    pub max_heat: f64,
    /// Hot ranges, hottest first (at most 16).
    pub hot_ranges: Vec<HotRange>,
    /// Touched pages per heat bucket, eight equal buckets from 0 to `max_heat`.
    pub histogram: Vec<u64>,
    pub pages_hot: u64,
    pub pages_warm: u64,
    pub pages_cold: u64,
}

impl HeatView {
    /// Condenses `pages` (sorted by page) of a memory of `frames` frames into `cells` cells.
    pub fn build(pages: &[PageHeat], frames: u64, cells: usize, epochs: u64) -> Self {
        let cells = cells.clamp(1, frames.max(1) as usize);
        let frames_per_cell = frames.div_ceil(cells as u64).max(1);
        let mut view = Self {
            frames,
            epochs,
            frames_per_cell,
            cells: vec![HeatCell::default(); cells],
            histogram: vec![0; 8],
            ..Self::default()
        };
        view.max_heat = pages.iter().map(|p| p.heat).fold(0.0, f64::max);
        for page in pages {
            let index = ((page.page / frames_per_cell) as usize).min(cells - 1);
            let cell = &mut view.cells[index];
            cell.heat = cell.heat.max(page.heat as f32);
            cell.written |= page.access == Access::ReadWrite;
            cell.touched += 1;
            match page.class {
                HeatClass::Hot => view.pages_hot += 1,
                HeatClass::Warm => view.pages_warm += 1,
                HeatClass::Cold => view.pages_cold += 1,
            }
            if view.max_heat > 0.0 {
                let bucket = ((page.heat / view.max_heat) * 8.0) as usize;
                view.histogram[bucket.min(7)] += 1;
            }
        }
        let mut ranges: Vec<HotRange> = Vec::new();
        for page in pages.iter().filter(|p| p.class == HeatClass::Hot) {
            match ranges.last_mut() {
                Some(last) if last.end == page.page => {
                    last.end += 1;
                    last.heat += page.heat;
                    last.written |= page.access == Access::ReadWrite;
                }
                _ => ranges.push(HotRange {
                    start: page.page,
                    end: page.page + 1,
                    heat: page.heat,
                    written: page.access == Access::ReadWrite,
                }),
            }
        }
        ranges.sort_by(|a, b| b.heat.total_cmp(&a.heat));
        ranges.truncate(16);
        view.hot_ranges = ranges;
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(page: u64, heat: f64, class: HeatClass, access: Access) -> PageHeat {
        PageHeat {
            page,
            reads: 1,
            writes: 0,
            heat,
            class,
            access,
        }
    }

    #[test]
    fn binning_keeps_the_hottest_page_of_each_cell() {
        let pages = [
            page(0, 1.0, HeatClass::Cold, Access::ReadOnly),
            page(1, 9.0, HeatClass::Hot, Access::ReadWrite),
            page(2, 8.0, HeatClass::Hot, Access::ReadOnly),
            page(7, 4.0, HeatClass::Warm, Access::ReadOnly),
        ];
        let view = HeatView::build(&pages, 8, 4, 3);
        assert_eq!(view.frames_per_cell, 2);
        assert_eq!(view.cells[0].heat, 9.0);
        assert!(view.cells[0].written);
        assert_eq!(view.cells[0].touched, 2);
        assert_eq!(view.cells[1].heat, 8.0);
        assert_eq!(view.cells[2], HeatCell::default());
        assert_eq!(view.cells[3].heat, 4.0);
        assert_eq!(view.hot_ranges.len(), 1);
        assert_eq!((view.hot_ranges[0].start, view.hot_ranges[0].end), (1, 3));
        assert_eq!(view.histogram.iter().sum::<u64>(), 4);
        assert_eq!(
            (view.pages_hot, view.pages_warm, view.pages_cold),
            (2, 1, 1)
        );
    }

    #[test]
    fn more_cells_than_frames_is_clamped() {
        let view = HeatView::build(&[], 3, 100, 0);
        assert_eq!(view.cells.len(), 3);
        assert_eq!(view.max_heat, 0.0);
    }
}
