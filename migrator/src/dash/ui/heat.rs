//! The heat panels: the heat map, the hottest ranges and the histogram of classes.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize},
    text::{Line, Span},
    widgets::{Bar, BarChart, BarGroup, Block, List, ListItem, ListState, Paragraph},
};

use super::compact;
use crate::api::heat_view::HeatView;
use crate::dash::app::App;

/// Heat colours from cold to hot.
const SCALE: [Color; 5] = [
    Color::Blue,
    Color::Cyan,
    Color::Yellow,
    Color::LightRed,
    Color::Red,
];

pub(super) const WRITTEN: char = '█';

pub(super) const READ_ONLY: char = '▒';

pub(super) const UNTOUCHED: char = '·';

/// The colour and character of a display cell summarising `cells`.
fn cell_look(view: &HeatView, cells: &[crate::api::heat_view::HeatCell]) -> (char, Color) {
    let touched = cells.iter().any(|c| c.touched > 0);
    if !touched {
        return (UNTOUCHED, Color::DarkGray);
    }
    let heat = cells.iter().map(|c| c.heat).fold(0.0f32, f32::max) as f64;
    let ratio = if view.max_heat > 0.0 {
        heat / view.max_heat
    } else {
        0.0
    };
    let level = ((ratio * SCALE.len() as f64) as usize).min(SCALE.len() - 1);
    let written = cells.iter().any(|c| c.written);
    (if written { WRITTEN } else { READ_ONLY }, SCALE[level])
}

pub(super) fn render_heatmap(frame: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(" memory heat ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(view) = &app.snapshot.heat else {
        frame.render_widget(Paragraph::new("waiting for heat…").dark_gray(), inner);
        return;
    };
    if inner.height < 2 || inner.width == 0 || view.cells.is_empty() {
        return;
    }
    let [map, legend] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    let shown = (map.width as usize) * (map.height as usize);
    let source = view.cells.len();
    let buffer = frame.buffer_mut();
    // Each screen cell shows the hottest of the source cells it covers (or repeats one when
    // the panel has more cells than the view).
    for i in 0..shown {
        let from = i * source / shown;
        let to = ((i + 1) * source / shown).max(from + 1).min(source);
        let (symbol, colour) = cell_look(view, &view.cells[from..to]);
        let x = map.x + (i % map.width as usize) as u16;
        let y = map.y + (i / map.width as usize) as u16;
        if let Some(cell) = buffer.cell_mut((x, y)) {
            cell.set_char(symbol).set_fg(colour);
        }
    }
    let kib_per_cell = (view.frames * 4).div_ceil(shown as u64);
    let mut spans = vec![Span::raw("cold ")];
    for colour in SCALE {
        spans.push(Span::styled("■", Style::new().fg(colour)));
    }
    spans.push(Span::raw(format!(
        " hot {WRITTEN}rw {READ_ONLY}ro {UNTOUCHED}none {kib_per_cell}K/cell"
    )));
    frame.render_widget(Line::from(spans), legend);
}

pub(super) fn render_hot_ranges(frame: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(" hot ranges ");
    let Some(view) = &app.snapshot.heat else {
        frame.render_widget(block, area);
        return;
    };
    let items: Vec<ListItem> = view
        .hot_ranges
        .iter()
        .map(|r| {
            ListItem::new(format!(
                "{:#011x}-{:#011x} {:>5} pg {} {:>7.1}",
                r.start * 4096,
                r.end * 4096,
                r.end - r.start,
                if r.written { "rw" } else { "ro" },
                r.heat
            ))
        })
        .collect();
    let list = List::new(items)
        .block(block)
        .highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = ListState::default().with_selected(Some(app.selected));
    frame.render_stateful_widget(list, area, &mut state);
}

pub(super) fn render_histogram(frame: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(" heat histogram ");
    let Some(view) = &app.snapshot.heat else {
        frame.render_widget(block, area);
        return;
    };
    let bars: Vec<Bar> = view
        .histogram
        .iter()
        .enumerate()
        .map(|(i, &count)| {
            Bar::default()
                .value(count)
                .text_value(compact(count))
                .style(
                    Style::new()
                        .fg(SCALE[(i * SCALE.len() / view.histogram.len()).min(SCALE.len() - 1)]),
                )
        })
        .collect();
    let inner_width = area.width.saturating_sub(2) as usize;
    let width = (inner_width / view.histogram.len().max(1)).clamp(1, 6) as u16;
    let chart = BarChart::default()
        .block(block.title_bottom(format!(
            " hot {} · warm {} · cold {} ",
            view.pages_hot, view.pages_warm, view.pages_cold
        )))
        .data(BarGroup::default().bars(&bars))
        .bar_width(width.saturating_sub(1).max(1))
        .bar_gap(1);
    frame.render_widget(chart, area);
}
