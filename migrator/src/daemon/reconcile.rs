//! Settling a partition that awaits a handover: a migration whose commit or handover went
//! unanswered leaves it paused here, neither resumed nor discarded, because the destination
//! may run the guest. Reconciling asks the destination, by hand (`migrator reconcile`) or
//! by itself with backoff, and ends with exactly one copy running.
//!
//! A partition `postcopy-paused` (its post-copy broke and was not recovered in its window)
//! is settled by hand only: `migrator reconcile` resumes the post-copy, as
//! `migrate --resume` does, and `--resume-here` gives it up on the operator's word.
//!
//! The handover is asked again. Refused, nothing of it runs there (the destination dropped
//! the session and stopped what it restored), and it resumes here. Run there (now or
//! before):
//! - pre-copy: the destination holds every page, so the move is finished and the copy here
//!   stops;
//! - hybrid: the destination's copy needs this one's pages, so its post-copy resumes over new
//!   connections, as `migrate --resume` does, and the copy here stops once every page is
//!   there. Should that fail, the partition stays `postcopy-paused`.

use std::{net::SocketAddr, time::Duration};

use tracing::{info, warn};

use super::{registry::info_of, server::Daemon};
use crate::api::{
    ApiError, Reconciled,
    client::{Connection, context_with},
};
use crate::{
    migration::{MigrationStatus, Mode, Strategy, source::MigrationOptions},
    vmm::{AwaitingHandover, Partition, PartitionState, PostcopyPaused},
};

/// The automatic reconcile's first wait, doubled after each unanswered try up to
/// [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Daemon {
    /// Settles partition `id`'s awaiting handover, or says why it cannot yet; with
    /// `resume_here`, on the operator's word that nothing of it runs on the destination.
    pub(super) async fn reconcile_partition(
        &self,
        id: String,
        resume_here: bool,
    ) -> Result<Reconciled, ApiError> {
        let partition = self.registry.live(&id)?;
        if let Some(paused) = partition.postcopy_paused() {
            if !resume_here {
                drop(partition);
                return self.reconcile_postcopy(id).await;
            }
            warn!(
                "partition {id}: resumed here on the operator's word, giving up the post-copy \
                 of session {} on {}",
                paused.session, paused.peer
            );
            return resume_here_again(&id, &partition);
        }
        let Some(handover) = partition.awaiting_handover() else {
            return Err(ApiError::Partition(format!(
                "partition `{id}` awaits no handover"
            )));
        };
        if resume_here {
            warn!(
                "partition {id}: resumed here on the operator's word, without asking {}",
                handover.peer
            );
            return resume_here_again(&id, &partition);
        }
        let addr: SocketAddr = handover.peer.parse().map_err(|_| {
            ApiError::Partition(format!(
                "partition `{id}` awaits a handover from `{}`, which is no address",
                handover.peer
            ))
        })?;
        let unreachable = |why: String| {
            ApiError::Migration(format!(
                "destination {addr}: {why}; partition `{id}` still awaits the handover of \
                 session {}",
                handover.session
            ))
        };
        let connection = Connection::open_peer(addr, &self.security, self.peer_timeout)
            .await
            .map_err(|e| unreachable(super::error_chain(&e)))?;
        let ctx = context_with(self.peer_timeout + Duration::from_secs(60));
        let outcome = match connection
            .client
            .migration_handover(ctx, handover.session)
            .await
        {
            Ok(Ok(reply)) => Some(reply.id_on_destination),
            Ok(Err(refused @ ApiError::NothingRunsHere(_))) => {
                info!("partition {id}: the destination refused the handover: {refused}");
                None
            }
            // Any other refusal (an unknown session, an internal error) does not say that
            // nothing of it runs there: the partition keeps waiting.
            Ok(Err(refused)) => return Err(unreachable(format!("it answered: {refused}"))),
            Err(e) => return Err(unreachable(e.to_string())),
        };
        // The partition may have changed hands meanwhile (reconciled twice at once).
        if partition.awaiting_handover().as_ref() != Some(&handover) {
            return Err(ApiError::Partition(format!(
                "partition `{id}` was settled meanwhile"
            )));
        }
        match outcome {
            // The guest runs there on the pages it has: they follow it.
            Some(id_on_destination) if handover.postcopy => {
                info!(
                    "partition {id}: it runs on {addr} as {id_on_destination}; pushing the pages \
                     it lacks"
                );
                partition.set_postcopy_paused(Some(PostcopyPaused {
                    peer: handover.peer.clone(),
                    session: handover.session,
                    id_on_destination: Some(id_on_destination),
                }));
                partition.set_awaiting_handover(None);
                drop(partition);
                self.reconcile_postcopy(id).await
            }
            Some(id_on_destination) => {
                partition.stop();
                let mut info = info_of(&id, &partition);
                info.state = PartitionState::Stopped;
                info.console.push_str(&format!(
                    "[vmm] migrated to {addr} as {id_on_destination} (reconciled)\n"
                ));
                drop(partition);
                self.remember_stopped(id.clone(), info);
                info!("partition {id} reconciled: it runs on {addr} as {id_on_destination}");
                Ok(Reconciled::MovedTo {
                    id_on_destination: Some(id_on_destination),
                })
            }
            None => resume_here_again(&id, &partition),
        }
    }

    /// Finishes the move of partition `id`, `postcopy-paused`: the post-copy resumes and
    /// pushes the pages the destination lacks, as `migrate --resume` does.
    async fn reconcile_postcopy(&self, id: String) -> Result<Reconciled, ApiError> {
        info!("partition {id}: resuming its paused post-copy");
        let options = MigrationOptions {
            strategy: Strategy::Address,
            mode: Mode::Hybrid,
            ..MigrationOptions::default()
        };
        let report = self.resume_out(id.clone(), options).await?;
        match report.status {
            MigrationStatus::Completed => Ok(Reconciled::MovedTo {
                id_on_destination: report.id_on_destination,
            }),
            _ => Err(ApiError::Migration(format!(
                "{}; partition `{id}` stays postcopy-paused",
                report.error.unwrap_or_default()
            ))),
        }
    }

    /// Reconciles partition `id` by itself, with backoff, until it is settled (here, by
    /// hand, or by stopping it).
    pub(super) fn reconcile_in_background(&self, id: String, handover: AwaitingHandover) {
        let daemon = self.clone();
        tokio::spawn(async move {
            let mut wait = BACKOFF_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                let still = daemon
                    .registry
                    .live(&id)
                    .ok()
                    .and_then(|p| p.awaiting_handover());
                if still.as_ref() != Some(&handover) {
                    return;
                }
                match daemon.reconcile_partition(id.clone(), false).await {
                    Ok(_) => return,
                    Err(e) => warn!("partition {id}: reconcile: {e}"),
                }
                wait = (wait * 2).min(BACKOFF_MAX);
            }
        });
    }
}

/// Nothing of partition `id` runs on the destination: it runs here again.
fn resume_here_again(id: &str, partition: &Partition) -> Result<Reconciled, ApiError> {
    partition.set_awaiting_handover(None);
    partition.set_postcopy_paused(None);
    if let Err(e) = partition.dirty_log_stop() {
        warn!("partition {id}: stopping the dirty log: {e}");
    }
    partition
        .resume()
        .map_err(|e| ApiError::Partition(super::error_chain(&e)))?;
    info!("partition {id} reconciled: it runs here again");
    Ok(Reconciled::ResumedHere)
}
