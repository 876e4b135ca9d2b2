//! The terminal side: the event loop (the terminal held by heatprobe's RAII guard), and text
//! rendering for `--once`.

use crate::tls::Security;
use std::{io, net::SocketAddr, sync::mpsc, time::Duration};

use heatprobe::{console::TerminalGuard, probes::error_chain};
use ratatui::{
    Terminal,
    backend::TestBackend,
    crossterm::event::{self, Event, KeyEventKind},
};
use thiserror::Error;
use tokio::sync::mpsc as async_mpsc;

use super::{
    app::{Action, App},
    sampler::{self, Watch},
    ui,
};
use crate::{
    api::ApiError,
    api::MigrateRequest,
    api::client::ClientError,
    api::client::Connection,
    api::client::context_with,
    migration::{MigrationReport, source::MigrationOptions},
};

#[derive(Debug, Error)]
pub enum DashError {
    #[error("the terminal failed")]
    Terminal(#[from] io::Error),
    #[error("opening a connection to the daemon failed")]
    Connect(#[source] ClientError),
    #[error("the `migrate` call got no answer")]
    MigrateCall(#[source] ClientError),
    #[error("the source daemon did not migrate the partition")]
    Migration(#[source] ApiError),
}

/// What finished in the background.
enum Done {
    Migration(Result<MigrationReport, DashError>),
}

/// Runs the dashboard until `q`. Blocking: call it off the async runtime.
pub fn run(
    handle: tokio::runtime::Handle,
    host: SocketAddr,
    id: Option<String>,
    peer: Option<SocketAddr>,
    security: Security,
) -> Result<(), DashError> {
    let (snapshot_tx, snapshots) = mpsc::channel();
    let (retarget_tx, retarget_rx) = async_mpsc::unbounded_channel();
    let mut watch = Watch { host, id };
    handle.spawn(sampler::run(
        watch.clone(),
        security.clone(),
        snapshot_tx,
        retarget_rx,
    ));
    let (done_tx, done) = mpsc::channel::<Done>();
    let mut peer = peer;
    let mut app = App::new(peer.map(|p| p.to_string()));
    let mut guard = TerminalGuard::new()?;
    loop {
        while let Ok(snapshot) = snapshots.try_recv() {
            if watch.id.is_none()
                && let Some(p) = &snapshot.partition
            {
                watch.id = Some(p.id.clone());
            }
            app.apply(snapshot);
        }
        while let Ok(Done::Migration(result)) = done.try_recv() {
            match result {
                Ok(report) => {
                    // Follow the partition: the peer becomes its host, and the old host the peer.
                    if let (Some(new_id), Some(to)) = (report.id_on_destination.clone(), peer) {
                        peer = Some(watch.host);
                        watch = Watch {
                            host: to,
                            id: Some(new_id),
                        };
                        app.peer = peer.map(|p| p.to_string());
                        let _ = retarget_tx.send(watch.clone());
                    }
                    app.migration_done(report);
                }
                Err(e) => {
                    app.migrating = false;
                    app.message = format!("migration failed: {}", error_chain(&e));
                }
            }
        }
        guard.terminal.draw(|frame| ui::ui(frame, &app))?;
        if !event::poll(Duration::from_millis(100))? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        match app.on_key(key) {
            Action::None => {}
            Action::Quit => return Ok(()),
            Action::Migrate { strategy, mode } => {
                let (Some(to), Some(id)) = (peer, watch.id.clone()) else {
                    continue;
                };
                let from = watch.host;
                let done_tx = done_tx.clone();
                let downtime_limit = app.downtime_limit;
                let security = security.clone();
                handle.spawn(async move {
                    let result =
                        migrate(from, to, id, strategy, mode, downtime_limit, &security).await;
                    let _ = done_tx.send(Done::Migration(result));
                });
            }
        }
    }
}

async fn migrate(
    from: SocketAddr,
    to: SocketAddr,
    id: String,
    strategy: crate::migration::Strategy,
    mode: crate::migration::Mode,
    downtime_limit: Duration,
    security: &Security,
) -> Result<MigrationReport, DashError> {
    let connection = Connection::open(from, security)
        .await
        .map_err(DashError::Connect)?;
    let request = MigrateRequest {
        id,
        to,
        options: MigrationOptions {
            strategy,
            mode,
            downtime_limit,
            profile_window: Duration::from_millis(500),
            ..MigrationOptions::default()
        },
        heat: None,
    };
    let answer = connection.rpc(
        connection
            .client
            .migrate(context_with(Duration::from_secs(3600)), request)
            .await,
    );
    answer
        .map_err(DashError::MigrateCall)?
        .map_err(DashError::Migration)
}

/// One snapshot: two samples half a second apart, so ops/s and heat have moved.
pub async fn once(
    host: SocketAddr,
    id: Option<String>,
    security: &Security,
) -> Result<super::Snapshot, DashError> {
    let connection = Connection::open(host, security)
        .await
        .map_err(DashError::Connect)?;
    let watch = Watch { host, id };
    let (_, previous) = sampler::sample(&connection, &watch, None).await;
    tokio::time::sleep(sampler::PERIOD).await;
    let (snapshot, _) = sampler::sample(&connection, &watch, previous).await;
    Ok(snapshot)
}

/// The dashboard for `app` as plain text, `width` x `height` characters.
pub fn render_text(app: &App, width: u16, height: u16) -> String {
    let Ok(mut terminal) = Terminal::new(TestBackend::new(width, height));
    if terminal.draw(|frame| ui::ui(frame, app)).is_err() {
        return String::new();
    }
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..height {
        let line: String = (0..width)
            .map(|x| buffer.cell((x, y)).map_or(" ", |c| c.symbol()))
            .collect();
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}
