//! The live dashboard: `migrator dash`.
//!
//! Data arrives from a background sampler task over a channel as [`Snapshot`]s; the UI thread
//! owns the [`App`] state, turns keys into [`Action`]s, and draws with `ui::ui`, whose
//! `render_*` functions only draw. No mutex is shared between the two.

pub mod app;
pub mod sampler;
pub mod terminal;
pub mod ui;

pub use app::{Action, App, Snapshot, ViewMode};
