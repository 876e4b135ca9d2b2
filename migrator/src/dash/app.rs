//! Dashboard state and key handling: the mode is matched first, then the key.

use std::collections::VecDeque;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde::{Deserialize, Serialize};

use crate::{
    api::PartitionInfo,
    api::heat_view::HeatView,
    migration::{MigrationProgress, MigrationReport, Mode, Strategy},
};

/// One sample of everything the dashboard shows, taken by the background sampler.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The daemon the partition is on.
    pub host: String,
    pub partition: Option<PartitionInfo>,
    pub heat: Option<HeatView>,
    /// The migration of this partition, if one is running or just ended.
    pub migration: Option<MigrationProgress>,
    /// Guest operations per second since the previous sample.
    pub ops_per_sec: f64,
    /// Why the last sample is incomplete, if it is.
    pub error: Option<String>,
}

/// What is on screen besides the panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewMode {
    Normal,
    Help,
}

/// What the UI loop must do after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Migrate { strategy: Strategy, mode: Mode },
}

/// Samples of ops/s the sparkline keeps.
pub const OPS_HISTORY: usize = 240;

pub struct App {
    pub view: ViewMode,
    /// While set, new snapshots are not shown (the view is frozen).
    pub frozen: bool,
    pub strategy: Strategy,
    pub mode: Mode,
    /// The downtime limit migrations started here use.
    pub downtime_limit: std::time::Duration,
    pub snapshot: Snapshot,
    pub ops_history: VecDeque<u64>,
    /// Selected row of the hot-ranges list.
    pub selected: usize,
    /// Where a migration goes (the other daemon), if there is one.
    pub peer: Option<String>,
    pub migrating: bool,
    pub last_report: Option<MigrationReport>,
    /// A one-line message for the footer.
    pub message: String,
}

impl App {
    pub fn new(peer: Option<String>) -> Self {
        Self {
            view: ViewMode::Normal,
            frozen: false,
            strategy: Strategy::Heat,
            mode: Mode::Precopy,
            downtime_limit: crate::migration::source::MigrationOptions::default().downtime_limit,
            snapshot: Snapshot::default(),
            ops_history: VecDeque::with_capacity(OPS_HISTORY),
            selected: 0,
            peer,
            migrating: false,
            last_report: None,
            message: String::new(),
        }
    }

    /// Takes in a new sample (unless the view is frozen).
    pub fn apply(&mut self, snapshot: Snapshot) {
        if self.frozen {
            return;
        }
        if self.ops_history.len() == OPS_HISTORY {
            self.ops_history.pop_front();
        }
        self.ops_history.push_back(snapshot.ops_per_sec as u64);
        let ranges = snapshot.heat.as_ref().map_or(0, |h| h.hot_ranges.len());
        self.selected = self.selected.min(ranges.saturating_sub(1));
        self.snapshot = snapshot;
    }

    /// A migration ended; the dashboard follows the partition if it moved.
    pub fn migration_done(&mut self, report: MigrationReport) {
        self.migrating = false;
        self.message = match &report.error {
            None => format!(
                "migrated in {} ms, downtime {} ms, {} pages re-sent",
                report.total_time_ms, report.downtime_ms, report.pages_resent
            ),
            Some(error) => format!("migration failed: {error}"),
        };
        self.last_report = Some(report);
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        match self.view {
            ViewMode::Help => match key.code {
                KeyCode::Char('q') => Action::Quit,
                _ => {
                    self.view = ViewMode::Normal;
                    Action::None
                }
            },
            ViewMode::Normal => match key.code {
                KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
                KeyCode::Char('?') => {
                    self.view = ViewMode::Help;
                    Action::None
                }
                KeyCode::Char('p') => {
                    self.frozen = !self.frozen;
                    self.message = if self.frozen {
                        "view paused".into()
                    } else {
                        String::new()
                    };
                    Action::None
                }
                KeyCode::Char('s') => {
                    self.strategy = match self.strategy {
                        Strategy::Heat => Strategy::Address,
                        Strategy::Address => Strategy::Heat,
                    };
                    Action::None
                }
                KeyCode::Char('o') => {
                    self.mode = match self.mode {
                        Mode::Precopy => Mode::Hybrid,
                        Mode::Hybrid => Mode::Precopy,
                    };
                    Action::None
                }
                KeyCode::Char('m') => self.migrate(),
                KeyCode::Down | KeyCode::Char('j') => {
                    let ranges = self
                        .snapshot
                        .heat
                        .as_ref()
                        .map_or(0, |h| h.hot_ranges.len());
                    if self.selected + 1 < ranges {
                        self.selected += 1;
                    }
                    Action::None
                }
                KeyCode::Up | KeyCode::Char('k') => {
                    self.selected = self.selected.saturating_sub(1);
                    Action::None
                }
                _ => Action::None,
            },
        }
    }

    fn migrate(&mut self) -> Action {
        if self.migrating {
            self.message = "a migration is already running".into();
            return Action::None;
        }
        if self.peer.is_none() {
            self.message = "no peer daemon to migrate to (start with --peer ADDR)".into();
            return Action::None;
        }
        if self.snapshot.partition.is_none() {
            self.message = "no partition to migrate".into();
            return Action::None;
        }
        self.migrating = true;
        self.message = format!(
            "migrating ({}, {})",
            strategy_name(self.strategy),
            mode_name(self.mode)
        );
        Action::Migrate {
            strategy: self.strategy,
            mode: self.mode,
        }
    }
}

pub fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Heat => "heat",
        Strategy::Address => "address",
    }
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Precopy => "precopy",
        Mode::Hybrid => "hybrid",
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::KeyEventKind;

    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent {
            code,
            modifiers: KeyModifiers::NONE,
            kind: KeyEventKind::Press,
            state: ratatui::crossterm::event::KeyEventState::NONE,
        }
    }

    #[test]
    fn keys_follow_the_mode() {
        let mut app = App::new(Some("127.0.0.1:7701".into()));
        assert_eq!(app.on_key(key(KeyCode::Char('?'))), Action::None);
        assert_eq!(app.view, ViewMode::Help);
        // In help, any key but q closes it.
        assert_eq!(app.on_key(key(KeyCode::Char('m'))), Action::None);
        assert_eq!(app.view, ViewMode::Normal);
        assert_eq!(app.on_key(key(KeyCode::Char('s'))), Action::None);
        assert_eq!(app.strategy, Strategy::Address);
        // Nothing to migrate yet.
        assert_eq!(app.on_key(key(KeyCode::Char('m'))), Action::None);
        app.snapshot.partition = Some(PartitionInfo {
            id: "p0".into(),
            name: None,
            image: "workload idle".into(),
            state: crate::vmm::PartitionState::Running,
            ops: 0,
            errors: 0,
            checks: 0,
            mem_bytes: 1 << 20,
            vcpus: 1,
            console: String::new(),
            crash_reason: None,
            check_failures: 0,
            awaiting_handover: None,
            postcopy_paused: None,
            pid: None,
            process_rss_anon_bytes: None,
            unanswered_ms: None,
        });
        assert_eq!(
            app.on_key(key(KeyCode::Char('m'))),
            Action::Migrate {
                strategy: Strategy::Address,
                mode: Mode::Precopy
            }
        );
        assert_eq!(
            app.on_key(key(KeyCode::Char('m'))),
            Action::None,
            "one at a time"
        );
        assert_eq!(app.on_key(key(KeyCode::Char('q'))), Action::Quit);
    }

    #[test]
    fn a_frozen_view_ignores_snapshots() {
        let mut app = App::new(None);
        app.on_key(key(KeyCode::Char('p')));
        app.apply(Snapshot {
            ops_per_sec: 5.0,
            ..Snapshot::default()
        });
        assert!(app.ops_history.is_empty());
        app.on_key(key(KeyCode::Char('p')));
        app.apply(Snapshot {
            ops_per_sec: 5.0,
            ..Snapshot::default()
        });
        assert_eq!(app.ops_history.back(), Some(&5));
    }
}
