//! `heatprobe top`: the hottest pages of a process or KVM guest, live, bpftop-style.
//!
//! A background thread runs the profiler's epochs and sends each epoch's pages over a channel;
//! the UI thread owns the view state, handles keys by mode, and only draws.

use std::{sync::mpsc, time::Duration};

use heatprobe::console::TerminalGuard;
use heatprobe::{Access, HeatClass, PAGE_SIZE, PageHeat, Profiler};
use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Color, Style, Stylize},
    text::Line,
    widgets::{Block, Clear, Paragraph, Row, Table},
};

/// One epoch's view of the target.
pub struct Sample {
    pub epochs: u64,
    pub pages: Vec<PageHeat>,
    pub dropped: u64,
    pub target_gone: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Help,
}

struct View {
    mode: Mode,
    frozen: bool,
    title: String,
    sample: Option<Sample>,
    offset: usize,
}

/// Runs the view until `q` (or the target exits and a key is pressed).
pub fn run(mut profiler: Profiler, title: String) -> anyhow::Result<()> {
    let (tx, samples) = mpsc::channel();
    let interval = profiler.config().interval;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(interval);
            if profiler.end_epoch().is_err() {
                return;
            }
            let sample = Sample {
                epochs: profiler.heat().epochs(),
                pages: profiler.heat().pages(),
                dropped: profiler.dropped().unwrap_or(0),
                target_gone: !profiler.target_alive(),
            };
            let gone = sample.target_gone;
            if tx.send(sample).is_err() || gone {
                return;
            }
        }
    });
    let mut view = View {
        mode: Mode::Normal,
        frozen: false,
        title,
        sample: None,
        offset: 0,
    };
    let mut guard = TerminalGuard::new()?;
    loop {
        while let Ok(sample) = samples.try_recv() {
            if !view.frozen {
                view.sample = Some(sample);
            }
        }
        guard.terminal.draw(|frame| ui(frame, &view))?;
        if !event::poll(Duration::from_millis(100))? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        match (view.mode, key.code) {
            (_, KeyCode::Char('q')) | (Mode::Normal, KeyCode::Esc) => return Ok(()),
            (Mode::Help, _) => view.mode = Mode::Normal,
            (Mode::Normal, KeyCode::Char('?')) => view.mode = Mode::Help,
            (Mode::Normal, KeyCode::Char('p')) => view.frozen = !view.frozen,
            (Mode::Normal, KeyCode::Down | KeyCode::Char('j')) => view.offset += 1,
            (Mode::Normal, KeyCode::Up | KeyCode::Char('k')) => {
                view.offset = view.offset.saturating_sub(1)
            }
            _ => {}
        }
    }
}

fn ui(frame: &mut Frame, view: &View) {
    let [header, table, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, view);
    render_table(frame, table, view);
    frame.render_widget(
        Line::from(" q quit  ? help  p pause view  ↑↓/jk scroll ").dark_gray(),
        footer,
    );
    if view.mode == Mode::Help {
        let area = frame.area();
        let popup = ratatui::layout::Rect {
            x: area.width.saturating_sub(50) / 2,
            y: area.height.saturating_sub(8) / 2,
            width: 50.min(area.width),
            height: 8.min(area.height),
        };
        frame.render_widget(Clear, popup);
        frame.render_widget(
            Paragraph::new(vec![
                Line::from("q        quit"),
                Line::from("?        this help (any key closes it)"),
                Line::from("p        pause / resume the view"),
                Line::from("↑ ↓ j k  scroll the pages"),
                Line::from("heat is fault-based for processes"),
            ])
            .block(Block::bordered().title(" keys ")),
            popup,
        );
    }
}

fn render_header(frame: &mut Frame, area: ratatui::layout::Rect, view: &View) {
    let text = match &view.sample {
        None => format!(" {} · waiting for the first epoch…", view.title),
        Some(s) => {
            let count = |c: HeatClass| s.pages.iter().filter(|p| p.class == c).count();
            format!(
                " {} · {} epochs · {} pages · hot {} warm {} cold {} · dropped {}{}{}",
                view.title,
                s.epochs,
                s.pages.len(),
                count(HeatClass::Hot),
                count(HeatClass::Warm),
                count(HeatClass::Cold),
                s.dropped,
                if s.target_gone {
                    " · target exited"
                } else {
                    ""
                },
                if view.frozen { " · PAUSED" } else { "" },
            )
        }
    };
    frame.render_widget(Line::from(text).bold(), area);
}

fn render_table(frame: &mut Frame, area: ratatui::layout::Rect, view: &View) {
    let mut pages: Vec<&PageHeat> = view.sample.iter().flat_map(|s| &s.pages).collect();
    pages.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.page.cmp(&b.page)));
    let max = pages.first().map_or(1.0, |p| p.heat.max(1e-9));
    let rows = pages.iter().skip(view.offset).map(|p| {
        let colour = match p.class {
            HeatClass::Hot => Color::Red,
            HeatClass::Warm => Color::Yellow,
            HeatClass::Cold => Color::Blue,
        };
        let bar = "█".repeat(((p.heat / max) * 10.0).ceil() as usize);
        Row::new(vec![
            format!("{:#x}", p.page * PAGE_SIZE),
            p.reads.to_string(),
            p.writes.to_string(),
            format!("{:.2}", p.heat),
            heatprobe::report::class_name(p.class).to_string(),
            match p.access {
                Access::ReadOnly => "ro".into(),
                Access::ReadWrite => "rw".into(),
            },
            bar,
        ])
        .style(Style::new().fg(colour))
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(18),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(5),
            Constraint::Length(6),
            Constraint::Min(10),
        ],
    )
    .header(Row::new(["address", "reads", "writes", "heat", "class", "access", ""]).bold())
    .block(Block::bordered().title(" hottest pages "));
    frame.render_widget(table, area);
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;

    fn page(page: u64, heat: f64, class: HeatClass, access: Access) -> PageHeat {
        PageHeat {
            page,
            reads: 3,
            writes: u64::from(access == Access::ReadWrite),
            heat,
            class,
            access,
        }
    }

    fn text(view: &View, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| ui(frame, view)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer.cell((x, y)).unwrap().symbol())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn the_hottest_page_comes_first_and_keys_are_listed() {
        let mut view = View {
            mode: Mode::Normal,
            frozen: false,
            title: "process 42".into(),
            sample: Some(Sample {
                epochs: 7,
                pages: vec![
                    page(0x10, 1.0, HeatClass::Cold, Access::ReadOnly),
                    page(0x20, 9.0, HeatClass::Hot, Access::ReadWrite),
                ],
                dropped: 0,
                target_gone: false,
            }),
            offset: 0,
        };
        let screen = text(&view, 80, 24);
        let hot = screen.find("0x20000").unwrap();
        let cold = screen.find("0x10000").unwrap();
        assert!(hot < cold, "{screen}");
        assert!(
            screen.contains("process 42 · 7 epochs · 2 pages · hot 1 warm 0 cold 1"),
            "{screen}"
        );
        assert!(screen.contains("q quit"), "{screen}");
        view.mode = Mode::Help;
        assert!(text(&view, 80, 24).contains("pause / resume the view"));
        let _ = text(&view, 10, 3);
    }
}
