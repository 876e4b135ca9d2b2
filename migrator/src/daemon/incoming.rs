//! The destination side of migrations: sessions from `prepare` to `finish` or `abort`, within
//! the daemon's limits, and dropped by themselves when their source vanishes.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{api::ApiError, blocking, error_chain, server::Daemon};
use crate::migration::{
    Mode,
    control::{CommitReply, CommitRequest, FinishReply, PrepareReply, PrepareRequest},
    destination::Session,
    link::DataLink,
    protocol::PROTOCOL_VERSION,
};

impl Daemon {
    pub(super) async fn prepare_incoming(
        &self,
        request: PrepareRequest,
    ) -> Result<PrepareReply, ApiError> {
        if !(request.protocol_min..=request.protocol_max).contains(&PROTOCOL_VERSION) {
            return Err(ApiError::Protocol {
                ours: PROTOCOL_VERSION,
                min: request.protocol_min,
                max: request.protocol_max,
            });
        }
        // Given back by itself if preparing fails.
        let reservation = self
            .registry
            .reserve(&self.limits, request.config.mem_size)?;
        let listen = self.listen;
        let link = DataLink::new(self.security.clone(), tokio::runtime::Handle::current());
        let peer_timeout = self.peer_timeout;
        let (session, data_port) = blocking("prepare", move || {
            Session::prepare(&request, listen, link, peer_timeout)
        })
        .await?
        .map_err(|e| ApiError::Migration(error_chain(&e)))?;
        let id = self.new_session_id();
        reservation.host_session(id, Arc::clone(&session));
        self.reap_on_failure(id, &session);
        info!("migration session {id} waiting on port {data_port}");
        Ok(PrepareReply {
            session: id,
            data_port,
        })
    }

    pub(super) async fn commit_incoming(
        &self,
        session_id: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, ApiError> {
        let session = self.registry.session(session_id)?;
        let committing = Arc::clone(&session);
        let committed = blocking("commit", move || committing.commit(request)).await?;
        let (partition, digest) = match committed {
            Ok(done) => done,
            Err(e) => {
                session.abort();
                self.registry.remove_session(session_id);
                return Err(ApiError::Migration(error_chain(&e)));
            }
        };
        let id = self.new_id();
        info!("migrated partition arrived as {id}");
        let partition = Arc::new(partition);
        match session.mode {
            Mode::Precopy => self
                .registry
                .session_committed(session_id, id.clone(), partition),
            // The session lives on until every page is in place (`finish`).
            Mode::Hybrid => self.registry.add_arrived(id.clone(), partition),
        }
        Ok(CommitReply {
            id_on_destination: id,
            dest_digest: digest.map(|d| d.total_hex()),
        })
    }

    pub(super) async fn finish_incoming(&self, session_id: u64) -> Result<FinishReply, ApiError> {
        let session = self.registry.session(session_id)?;
        let finishing = Arc::clone(&session);
        let finished = blocking("finish", move || finishing.finish()).await?;
        self.registry.remove_session(session_id);
        finished.map_err(|e| ApiError::Migration(error_chain(&e)))
    }

    pub(super) async fn abort_incoming(&self, session_id: u64) {
        if let Some(session) = self.registry.remove_session(session_id) {
            session.abort();
            info!("migration session {session_id} aborted");
            return;
        }
        // A pre-copy session that committed here after its source stopped waiting for the
        // answer: the source resumed its copy, so this one must not run too.
        if let Some(id) = self.registry.take_committed(session_id) {
            warn!("migration session {session_id} was aborted after its commit: stopping {id}");
            if let Err(e) = self.stop_partition(id.clone()).await {
                warn!("stopping {id}: {e}");
            }
        }
    }

    /// Drops incoming session `id` once it fails before its cutover: its source was killed or
    /// cut off and will send no `abort`. Ends when the session leaves the inventory.
    fn reap_on_failure(&self, id: u64, session: &Arc<Session>) {
        let daemon = self.clone();
        let session = Arc::downgrade(session);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(session) = session.upgrade() else {
                    return;
                };
                if !daemon.registry.holds_session(id, &session) {
                    return;
                }
                if let Some(error) = session.failed_before_cutover() {
                    warn!("migration session {id} failed, dropping it: {error}");
                    session.abort();
                    daemon.registry.remove_session(id);
                    return;
                }
            }
        });
    }
}
