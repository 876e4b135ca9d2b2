//! Drawing. `ui` lays the screen out; each `render_*` draws one panel from the app state and
//! does nothing else.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::Style,
    text::{Line, Span},
    widgets::{Bar, BarChart, BarGroup, Block, Clear, Paragraph, Sparkline},
};

use super::app::{App, ViewMode, mode_name, strategy_name};
use crate::migration::report::{Mode, Phase};

mod heat;

use heat::{READ_ONLY, UNTOUCHED, WRITTEN, render_heatmap, render_histogram, render_hot_ranges};

pub fn ui(frame: &mut Frame, app: &App) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(10),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let [top, bottom] =
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(body);
    let [heatmap, migration] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(top);
    let [ranges, histogram, guest] = Layout::horizontal([
        Constraint::Percentage(34),
        Constraint::Percentage(30),
        Constraint::Percentage(36),
    ])
    .areas(bottom);
    render_header(frame, header, app);
    render_heatmap(frame, heatmap, app);
    render_migration(frame, migration, app);
    render_hot_ranges(frame, ranges, app);
    render_histogram(frame, histogram, app);
    render_guest(frame, guest, app);
    render_footer(frame, footer, app);
    if app.view == ViewMode::Help {
        render_help(frame, frame.area());
    }
}

fn render_header(frame: &mut Frame, area: Rect, app: &App) {
    let mut spans = vec![Span::styled(" heatprobe ", Style::new().bold().reversed())];
    match &app.snapshot.partition {
        Some(p) => {
            let state = serde_json::to_value(p.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            spans.push(Span::raw(format!(
                " {} {} on {} · {state} · {} MiB · {} vCPU · {:.0} ops/s ",
                p.id,
                p.image,
                app.snapshot.host,
                p.mem_bytes >> 20,
                p.vcpus,
                app.snapshot.ops_per_sec
            )));
            let errors = format!(" errors {} ", p.errors);
            spans.push(if p.errors > 0 {
                Span::styled(errors, Style::new().bold().white().on_red())
            } else {
                Span::styled(errors, Style::new().green())
            });
        }
        None => spans.push(Span::raw(format!(
            " no partition on {} ",
            app.snapshot.host
        ))),
    }
    if let Some(error) = &app.snapshot.error {
        spans.push(Span::styled(format!(" {error}"), Style::new().red()));
    }
    frame.render_widget(Line::from(spans), area);
}

fn render_migration(frame: &mut Frame, area: Rect, app: &App) {
    let title = format!(
        " migration · {} {} ",
        strategy_name(app.strategy),
        mode_name(app.mode)
    );
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [text, chart] = Layout::vertical([Constraint::Length(5), Constraint::Min(1)]).areas(inner);
    let mut lines = Vec::new();
    match &app.snapshot.migration {
        Some(p) => {
            lines.push(Line::from(format!(
                "{} · round {} · {} MiB left{}",
                phase_name(p.phase),
                p.round,
                p.remaining_bytes >> 20,
                if p.throttle_pct > 0 {
                    format!(" · throttle {}%", p.throttle_pct)
                } else {
                    String::new()
                }
            )));
            lines.push(Line::from(format!(
                "{:.0} MiB/s · expected downtime {} ms / limit {} ms",
                p.rate_bytes_per_sec / (1 << 20) as f64,
                p.expected_downtime_ms,
                app.downtime_limit.as_millis()
            )));
        }
        None => lines.push(Line::from(match &app.peer {
            Some(peer) => format!("idle · m migrates to {peer}"),
            None => "idle · no peer (start with --peer)".to_string(),
        })),
    }
    if let Some(r) = &app.last_report {
        lines.push(Line::from(format!(
            "last: {} · downtime {} ms, {} · {} re-sent · {} post-copy req",
            r.status,
            r.downtime_ms,
            if r.downtime_limit_met {
                "limit met"
            } else {
                "limit missed"
            },
            r.pages_resent,
            r.postcopy_requests
        )));
        // The guest's pace first, and its whole bill: it is what the user's workload felt.
        let bill = r
            .guest_work_lost
            .as_ref()
            .map(|lost| format!("work lost {:.0} ms · ", lost.total_ms))
            .unwrap_or_default();
        let pace = r
            .guest_ops_ratio
            .map(|ratio| format!("ops {:.0}% of before · ", ratio * 100.0))
            .unwrap_or_default();
        // Then what it felt after the move: its stall (downtime and blocktime), its faults
        // there, and how long a demanded page took.
        let faults = r
            .post_cutover_faults
            .map(|f| format!(" {} faults local, {} remote", f.local, f.remote))
            .unwrap_or_default();
        let demand = if r.mode == Mode::Hybrid {
            format!(" · demand p99 {} µs", r.postcopy_fault_latency_us.p99)
        } else {
            String::new()
        };
        lines.push(Line::from(format!(
            "{bill}{pace}stall {:.0} ms (blocked {:.0} ms)",
            r.guest_stall_ms, r.postcopy_blocktime_ms
        )));
        if !faults.is_empty() || !demand.is_empty() {
            lines.push(Line::from(format!("after the move:{faults}{demand}")));
        }
    }
    frame.render_widget(Paragraph::new(lines), text);
    let rounds: Vec<u64> = app
        .snapshot
        .migration
        .as_ref()
        .map(|p| p.dirty_pages_per_round.clone())
        .filter(|r| !r.is_empty())
        .or_else(|| {
            app.last_report
                .as_ref()
                .map(|r| r.dirty_pages_per_round.clone())
        })
        .unwrap_or_default();
    render_dirty_chart(frame, chart, &rounds);
}

/// Dirty pages per round as bars: convergence at a glance.
fn render_dirty_chart(frame: &mut Frame, area: Rect, rounds: &[u64]) {
    if rounds.is_empty() || area.height < 2 {
        return;
    }
    let bars: Vec<Bar> = rounds
        .iter()
        .enumerate()
        .map(|(i, &pages)| {
            Bar::default()
                .value(pages)
                .label(Line::from(format!("{}", i + 1)))
                .text_value(compact(pages))
        })
        .collect();
    let width = (area.width as usize / rounds.len().max(1)).clamp(1, 5) as u16;
    let chart = BarChart::default()
        .block(Block::new().title("dirty pages per round"))
        .data(BarGroup::default().bars(&bars))
        .bar_width(width.saturating_sub(1).max(1))
        .bar_gap(1)
        .bar_style(Style::new().yellow());
    frame.render_widget(chart, area);
}

fn render_guest(frame: &mut Frame, area: Rect, app: &App) {
    let errors = app.snapshot.partition.as_ref().map_or(0, |p| p.errors);
    let title = format!(" guest ops/s · {:.0} ", app.snapshot.ops_per_sec);
    let block = if errors > 0 {
        Block::bordered()
            .title(title)
            .title_bottom(Span::styled(
                format!(" {errors} SELF-CHECK ERRORS "),
                Style::new().bold().white().on_red(),
            ))
            .border_style(Style::new().red())
    } else {
        let checks = app.snapshot.partition.as_ref().map_or(0, |p| p.checks);
        Block::bordered()
            .title(title)
            .title_bottom(format!(" {checks} checks · 0 errors "))
    };
    let data: Vec<u64> = app.ops_history.iter().copied().collect();
    let shown = area.width.saturating_sub(2) as usize;
    let data = &data[data.len().saturating_sub(shown)..];
    frame.render_widget(
        Sparkline::default()
            .block(block)
            .data(data)
            .style(Style::new().green()),
        area,
    );
}

fn render_footer(frame: &mut Frame, area: Rect, app: &App) {
    let keys = " q quit  ? help  m migrate  s strategy  o mode  p pause view  ↑↓/jk move ";
    let mut spans = vec![Span::styled(keys, Style::new().dark_gray())];
    if app.frozen {
        spans.push(Span::styled(" PAUSED ", Style::new().black().on_yellow()));
    }
    if !app.message.is_empty() {
        spans.push(Span::raw(format!(" {}", app.message)));
    }
    frame.render_widget(Line::from(spans), area);
}

fn render_help(frame: &mut Frame, area: Rect) {
    let lines = vec![
        Line::from("q, Esc    quit"),
        Line::from("?         this help (any key closes it)"),
        Line::from("m         migrate the partition to the peer daemon"),
        Line::from("s         strategy: heat / address"),
        Line::from("o         mode: precopy / hybrid"),
        Line::from("p         pause / resume the view"),
        Line::from("↑ ↓ j k   move in the hot ranges"),
        Line::from(""),
        Line::from(format!(
            "heatmap: {WRITTEN} written, {READ_ONLY} read-only, {UNTOUCHED} untouched; colour is heat"
        )),
    ];
    let width = 70.min(area.width);
    let height = (lines.len() as u16 + 2).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" keys ")),
        popup,
    );
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Setup => "setup",
        Phase::Profiling => "profiling",
        Phase::Precopy => "pre-copy",
        Phase::StopAndCopy => "stop-and-copy",
        Phase::Postcopy => "post-copy",
        Phase::PostcopyPaused => "post-copy paused",
        Phase::Completed => "completed",
        Phase::Failed => "failed",
    }
}

/// 1234567 → "1.2M".
fn compact(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend, style::Color};

    use super::*;
    use crate::{
        api::PartitionInfo,
        api::heat_view::HotRange,
        api::heat_view::{HeatCell, HeatView},
        dash::{Snapshot, terminal::render_text},
        migration::{
            MigrationProgress, MigrationReport, MigrationStatus, Strategy,
            report::{Phase, PostCutoverFaults},
        },
        vmm::PartitionState,
    };

    fn partition(errors: u64) -> PartitionInfo {
        PartitionInfo {
            id: "p0-abc".into(),
            name: None,
            image: "workload rw-mix".into(),
            state: PartitionState::Running,
            ops: 1000,
            errors,
            checks: 7,
            mem_bytes: 64 << 20,
            vcpus: 2,
            console: String::new(),
            crash_reason: None,
            check_failures: 0,
            awaiting_handover: None,
            postcopy_paused: None,
            pid: None,
            process_rss_anon_bytes: None,
            unanswered_ms: None,
        }
    }

    /// 64 cells: the first eight hot and written, the next eight warm and read-only, the rest
    /// untouched.
    fn heat() -> HeatView {
        let mut cells = vec![HeatCell::default(); 64];
        for cell in &mut cells[..8] {
            *cell = HeatCell {
                heat: 10.0,
                written: true,
                touched: 4,
            };
        }
        for cell in &mut cells[8..16] {
            *cell = HeatCell {
                heat: 3.0,
                written: false,
                touched: 4,
            };
        }
        HeatView {
            frames: 64 * 4,
            epochs: 5,
            frames_per_cell: 4,
            cells,
            max_heat: 10.0,
            hot_ranges: vec![HotRange {
                start: 0,
                end: 32,
                heat: 320.0,
                written: true,
            }],
            histogram: vec![32, 0, 0, 32, 0, 0, 0, 32],
            pages_hot: 32,
            pages_warm: 32,
            pages_cold: 0,
        }
    }

    fn app() -> App {
        let mut app = App::new(Some("127.0.0.1:7701".into()));
        app.apply(Snapshot {
            host: "127.0.0.1:7700".into(),
            partition: Some(partition(0)),
            heat: Some(heat()),
            migration: Some(MigrationProgress {
                phase: Phase::Precopy,
                round: 3,
                remaining_bytes: 8 << 20,
                bytes_sent: 1 << 30,
                rate_bytes_per_sec: 100.0 * (1 << 20) as f64,
                expected_downtime_ms: 80,
                dirty_pages_per_round: vec![900, 400, 100],
                throttle_pct: 40,
            }),
            ops_per_sec: 12345.0,
            error: None,
        });
        app
    }

    #[test]
    fn the_heatmap_bins_hot_cells_first_and_marks_untouched_ones() {
        let app = app();
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|frame| ui(frame, &app)).unwrap();
        let buffer = terminal.backend().buffer();
        // The heatmap's first cell (inside the border at 1,2) is hot and written.
        let first = buffer.cell((1, 2)).unwrap();
        assert_eq!(first.symbol(), WRITTEN.to_string());
        assert_eq!(first.fg, Color::Red);
        let text = render_text(&app, 80, 24);
        assert!(text.contains(&READ_ONLY.to_string()), "{text}");
        assert!(text.contains(&UNTOUCHED.to_string()), "{text}");
        assert!(text.contains("memory heat"), "{text}");
        assert!(text.contains("K/cell"), "{text}");
    }

    #[test]
    fn the_convergence_chart_shows_every_round() {
        let text = render_text(&app(), 100, 30);
        assert!(text.contains("dirty pages per round"), "{text}");
        assert!(
            text.contains("900") && text.contains("400") && text.contains("100"),
            "{text}"
        );
        assert!(text.contains("pre-copy · round 3 · 8 MiB left"), "{text}");
        let wide = render_text(&app(), 160, 30);
        assert!(
            wide.contains("pre-copy · round 3 · 8 MiB left · throttle 40%"),
            "{wide}"
        );
        assert!(text.contains("expected downtime 80 ms"), "{text}");
    }

    #[test]
    fn the_last_report_says_whether_the_limit_held_and_how_the_guest_fared() {
        let mut app = app();
        let mut report = MigrationReport::new(Strategy::Heat, Mode::Precopy);
        report.status = MigrationStatus::Completed;
        report.downtime_ms = 12;
        report.downtime_limit_met = true;
        report.guest_ops_ratio = Some(0.85);
        report.guest_stall_ms = 19.4;
        report.postcopy_blocktime_ms = 7.2;
        report.post_cutover_faults = Some(PostCutoverFaults {
            window_ms: 2000,
            local: 310,
            remote: 4,
            ops: Some(1000),
            ops_us: Some(2_000_000),
        });
        report.guest_work_lost = Some(crate::migration::report::GuestWorkLost {
            total_ms: 431.6,
            ..Default::default()
        });
        app.migration_done(report.clone());
        let text = render_text(&app, 160, 30);
        assert!(text.contains("downtime 12 ms, limit met"), "{text}");
        assert!(text.contains("work lost 432 ms"), "{text}");
        assert!(text.contains("ops 85% of before"), "{text}");
        assert!(text.contains("stall 19 ms (blocked 7 ms)"), "{text}");
        assert!(text.contains("310 faults local, 4 remote"), "{text}");
        report.downtime_limit_met = false;
        report.guest_ops_ratio = None;
        app.migration_done(report);
        let text = render_text(&app, 160, 30);
        assert!(text.contains("downtime 12 ms, limit missed"), "{text}");
        // (The ops panel's title says "guest ops/s": look for the ratio's own words.)
        assert!(!text.contains("of before"), "{text}");
    }

    #[test]
    fn it_fits_80_by_24_and_survives_tiny_terminals() {
        let text = render_text(&app(), 80, 24);
        assert_eq!(text.lines().count(), 24);
        assert!(text.lines().all(|l| l.chars().count() <= 80));
        assert!(text.contains("q quit"), "{text}");
        assert!(text.contains("p0-abc"), "{text}");
        for (w, h) in [(20, 5), (1, 1), (200, 60)] {
            let _ = render_text(&app(), w, h);
        }
    }

    #[test]
    fn guest_errors_are_loud_and_help_lists_the_keys() {
        let mut app = app();
        app.apply(Snapshot {
            partition: Some(partition(3)),
            ..app.snapshot.clone()
        });
        let text = render_text(&app, 100, 30);
        assert!(text.contains("3 SELF-CHECK ERRORS"), "{text}");
        app.view = ViewMode::Help;
        let text = render_text(&app, 100, 30);
        for key in ["quit", "migrate the partition", "strategy", "pause"] {
            assert!(text.contains(key), "{key}: {text}");
        }
    }
}
