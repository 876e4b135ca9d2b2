//! The background sampler: every half second it asks the daemon for the partition's status,
//! heat and migration progress, and sends a [`Snapshot`] to the UI over a channel.

use std::{
    net::SocketAddr,
    sync::mpsc,
    time::{Duration, Instant},
};

use tarpc::context;
use tokio::sync::mpsc as async_mpsc;

use super::app::Snapshot;
use crate::api::client::{Connection, context_with};
use crate::tls::Security;

/// Heat cells asked of the daemon; the heatmap re-bins them to the panel's size.
pub const HEAT_CELLS: u32 = 4096;
pub const PERIOD: Duration = Duration::from_millis(500);

/// Which partition to watch, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    pub host: SocketAddr,
    /// `None`: the first running partition on the host.
    pub id: Option<String>,
}

/// Samples one partition; `previous` is the last sample's time and ops, for ops/s.
pub async fn sample(
    connection: &Connection,
    watch: &Watch,
    previous: Option<(Instant, u64)>,
) -> (Snapshot, Option<(Instant, u64)>) {
    let mut snapshot = Snapshot {
        host: watch.host.to_string(),
        ..Snapshot::default()
    };
    let client = &connection.client;
    let id = match &watch.id {
        Some(id) => Some(id.clone()),
        None => match client.list(context::current()).await {
            Ok(list) => list
                .into_iter()
                .find(|p| p.state == crate::vmm::PartitionState::Running)
                .map(|p| p.id),
            Err(e) => {
                snapshot.error = Some(format!("list: {e}"));
                None
            }
        },
    };
    let Some(id) = id else {
        return (snapshot, previous);
    };
    match client.status(context::current(), id.clone()).await {
        Ok(Ok(info)) => {
            let now = Instant::now();
            if let Some((then, ops)) = previous {
                let seconds = now.duration_since(then).as_secs_f64();
                if seconds > 0.0 {
                    snapshot.ops_per_sec = info.ops.saturating_sub(ops) as f64 / seconds;
                }
            }
            let next = Some((now, info.ops));
            snapshot.partition = Some(info);
            match client
                .heat(context_with(Duration::from_secs(5)), id.clone(), HEAT_CELLS)
                .await
            {
                Ok(Ok(view)) => snapshot.heat = Some(view),
                Ok(Err(e)) => snapshot.error = Some(format!("heat: {e}")),
                Err(e) => snapshot.error = Some(format!("heat: {e}")),
            }
            if let Ok(progress) = client.migration_progress(context::current(), id).await {
                snapshot.migration = progress;
            }
            (snapshot, next)
        }
        Ok(Err(e)) => {
            snapshot.error = Some(e.to_string());
            (snapshot, previous)
        }
        Err(e) => {
            snapshot.error = Some(format!("status: {e}"));
            (snapshot, previous)
        }
    }
}

/// Samples forever, following retargets, until the UI hangs up.
pub async fn run(
    mut watch: Watch,
    security: Security,
    snapshots: mpsc::Sender<Snapshot>,
    mut retarget: async_mpsc::UnboundedReceiver<Watch>,
) {
    let mut connection: Option<Connection> = None;
    let mut previous = None;
    loop {
        while let Ok(next) = retarget.try_recv() {
            if next.host != watch.host {
                connection = None;
            }
            watch = next;
            previous = None;
        }
        if connection.is_none() {
            connection = Connection::open(watch.host, &security).await.ok();
        }
        let snapshot = match &connection {
            Some(c) => {
                let (snapshot, next) = sample(c, &watch, previous).await;
                previous = next;
                if snapshot
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("status:"))
                {
                    connection = None;
                }
                snapshot
            }
            None => Snapshot {
                host: watch.host.to_string(),
                error: Some(format!("cannot reach the daemon at {}", watch.host)),
                ..Snapshot::default()
            },
        };
        if snapshots.send(snapshot).is_err() {
            return;
        }
        tokio::time::sleep(PERIOD).await;
    }
}
