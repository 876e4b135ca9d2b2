//! The destination side of migrations: sessions from `prepare` to `finish` or `abort`, within
//! the daemon's limits, and dropped by themselves when their source vanishes.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{blocking, error_chain, server::Daemon};
use crate::api::{ApiError, MigrationInfo};
use crate::migration::{
    Mode,
    control::{
        CarriedHeat, CommitReply, CommitRequest, FinishReply, HandoverReply, PrepareReply,
        PrepareRequest, Recovery,
    },
    destination::{Session, SessionError, SessionPhase, WindowOrWhyNot},
    link::DataLink,
    protocol::PROTOCOL_VERSION,
    report::PostCutoverFaults,
};

/// How long after its window ends a session's fault figures wait for their source.
const FAULT_FIGURES_KEPT: Duration = Duration::from_secs(60);

/// How long a finished session's answer is kept for a source that asks again: longer than
/// any recover window's tries take to get through.
const FINISH_KEPT: Duration = Duration::from_secs(15 * 60);

impl Daemon {
    /// The incoming sessions, as `migrations` lists them (`destination` side).
    pub(super) fn incoming_migrations(&self) -> Vec<MigrationInfo> {
        self.registry
            .session_list()
            .into_iter()
            .map(|(id, session, partition)| {
                let phase = session.phase();
                MigrationInfo {
                    id: format!("session {id}"),
                    partition: partition.unwrap_or_default(),
                    peer: None,
                    side: "destination".into(),
                    mode: session.mode,
                    strategy: None,
                    phase: format!("{phase:?}"),
                    cancellable: false,
                    progress: None,
                    started_unix_ms: None,
                    status: None,
                }
            })
            .collect()
    }

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
        let count_faults = request.fault_window_ms > 0;
        let probes = self.probes.clone();
        let (session, data_port, remove_ns_per_page) = blocking("prepare", move || {
            Session::prepare(&request, listen, link, peer_timeout, probes)
        })
        .await?
        .map_err(|e| ApiError::Migration(error_chain(&e)))?;
        if count_faults && self.probes.get().is_none() {
            // The guest's faults after its resume are counted by the probes: load them while
            // the pages travel, not in the downtime, and not before this answer (the source
            // takes its round trip for the cost of a call).
            let daemon = self.clone();
            tokio::spawn(async move { daemon.probes().await.map(drop) });
        }
        let id = self.new_session_id();
        reservation.host_session(id, Arc::clone(&session));
        self.reap_on_failure(id, &session);
        info!("migration session {id} waiting on port {data_port}");
        Ok(PrepareReply {
            session: id,
            data_port,
            remove_ns_per_page,
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
        let committed = match committed {
            Ok(done) => done,
            // Refused by the session's phase (a second commit, say): it goes on as it was.
            Err(e @ SessionError::Phase(_)) => return Err(ApiError::Migration(error_chain(&e))),
            Err(e) => {
                // The commit did not restore anything: the session is over.
                let _ = session.abort();
                self.registry.drop_session(session_id);
                return Err(ApiError::Migration(error_chain(&e)));
            }
        };
        let id = self.new_id();
        info!("migrated partition arrived as {id}, parked until its source hands over");
        // The session lives on until the handover (pre-copy) or until every page is in place
        // (hybrid, `finish`).
        self.registry
            .session_committed(session_id, id.clone(), committed.partition);
        Ok(CommitReply {
            id_on_destination: id,
            dest_digest: committed.digest.map(|d| d.total_hex()),
            timings: committed.timings,
        })
    }

    /// The source's word: run the partition session `session_id` restored parked. Asked
    /// again after it ran, it answers the same. Refused, nothing of the session runs here:
    /// it is dropped, and a copy its commit restored is stopped.
    pub(super) async fn handover_incoming(
        &self,
        session_id: u64,
    ) -> Result<HandoverReply, ApiError> {
        let session = match self.registry.session(session_id) {
            Ok(session) => session,
            // A pre-copy session ends at its handover; asked again, the partition runs.
            Err(e) => {
                return match self.registry.committed_id(session_id) {
                    Some(id) if self.registry.live(&id).is_ok() => Ok(HandoverReply {
                        id_on_destination: id,
                        resume_ms: 0.0,
                    }),
                    // Committed here, and what it restored was stopped since.
                    Some(id) => Err(ApiError::NothingRunsHere(format!(
                        "session {session_id} was dropped and partition `{id}`, which it \
                         restored, stopped"
                    ))),
                    None if self.registry.was_dropped(session_id) => Err(
                        ApiError::NothingRunsHere(format!("session {session_id} was dropped")),
                    ),
                    None => Err(e),
                };
            }
        };
        let handing = Arc::clone(&session);
        let handed = blocking("handover", move || handing.handover()).await?;
        match handed {
            Ok(resumed) => {
                // Started at the resume; a handover asked again finds it kept already.
                if resumed.is_some()
                    && let Some(window) = session.fault_window()
                {
                    self.keep_fault_window(session_id, window);
                }
                let id = self.committed_id_soon(session_id).await;
                if session.mode == Mode::Precopy {
                    self.registry.remove_session(session_id);
                }
                info!("migration session {session_id} handed over: {id} runs here");
                Ok(HandoverReply {
                    id_on_destination: id,
                    resume_ms: resumed.unwrap_or(0.0),
                })
            }
            Err(e) => {
                let _ = session.abort();
                self.registry.drop_session(session_id);
                self.stop_committed(session_id).await;
                Err(ApiError::NothingRunsHere(error_chain(&e)))
            }
        }
    }

    /// The id the commit of session `session_id` gave its partition. A handover that a
    /// reconcile sends while that commit still answers can come before the id is recorded.
    async fn committed_id_soon(&self, session_id: u64) -> String {
        for _ in 0..50 {
            if let Some(id) = self.registry.committed_id(session_id) {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        "?".into()
    }

    /// Stops (and records as stopped) the partition session `session_id`'s commit restored,
    /// if any: it never ran, or must not run on.
    async fn stop_committed(&self, session_id: u64) {
        if let Some(id) = self.registry.take_committed(session_id)
            && self.registry.live(&id).is_ok()
            && let Err(e) = self.stop_partition(id.clone()).await
        {
            warn!("stopping {id}: {e}");
        }
    }

    /// The heat the source's plan was made from, for the partition session `session_id`
    /// became here.
    pub(super) fn heat_incoming(&self, session_id: u64, heat: CarriedHeat) -> Result<(), ApiError> {
        // A post-copy source hands the heat on after its finish, which ends the session.
        let id = self
            .registry
            .committed_id(session_id)
            .or_else(|| {
                self.finished
                    .get(session_id)
                    .and_then(|finished| finished.partition)
            })
            .ok_or(ApiError::UnknownSession(session_id))?;
        let frames = self.registry.live(&id)?.memory().frames();
        self.carried_heat.insert(&id, frames, heat)
    }

    /// Asked again once it finished (its answer lost), it answers the same.
    pub(super) async fn finish_incoming(&self, session_id: u64) -> Result<FinishReply, ApiError> {
        let session = match self.registry.session(session_id) {
            Ok(session) => session,
            Err(e) => {
                return self
                    .finished
                    .get(session_id)
                    .map(|finished| finished.reply)
                    .ok_or(e);
            }
        };
        let finishing = Arc::clone(&session);
        let finished = blocking("finish", move || finishing.finish()).await?;
        // Failed, the session lives on: the source recovers it (the guest runs here on the
        // pages it has, and only the source has the rest).
        let finished = finished.map_err(|e| ApiError::Migration(error_chain(&e)))?;
        self.registry.remove_session(session_id);
        // Every page is in place: the move is over, and no late abort may undo it.
        let partition = self.registry.take_committed(session_id);
        self.finished.keep(
            session_id,
            Finished {
                reply: finished.clone(),
                partition,
            },
            std::time::Instant::now() + FINISH_KEPT,
        );
        Ok(finished)
    }

    /// The source recovers session `session_id`'s post-copy over new connections.
    pub(super) async fn recover_incoming(&self, session_id: u64) -> Result<Recovery, ApiError> {
        let session = self.registry.session(session_id)?;
        let recovery = blocking("recover", move || session.recover())
            .await?
            .map_err(|e| ApiError::Migration(error_chain(&e)))?;
        info!(
            "migration session {session_id}: post-copy recovers on port {}",
            recovery.data_port
        );
        Ok(recovery)
    }

    /// Keeps session `session_id`'s fault window for its source to ask about, and forgets it
    /// a minute after its end if the source never does.
    fn keep_fault_window(&self, session_id: u64, window: WindowOrWhyNot) {
        let forget_at = match &window {
            Ok(window) => window.ends_at(),
            Err(_) => std::time::Instant::now(),
        } + FAULT_FIGURES_KEPT;
        self.fault_windows.keep(session_id, window, forget_at);
    }

    /// The guest's faults over session `session_id`'s fault window, once it is over.
    pub(super) async fn faults_incoming(
        &self,
        session_id: u64,
    ) -> Result<PostCutoverFaults, ApiError> {
        let window = self.fault_windows.take(session_id).ok_or_else(|| {
            ApiError::Migration(format!(
                "session {session_id} has no fault window (a window of 0, no resume yet, or \
                 its figures were already taken)"
            ))
        })?;
        let window = window.map_err(ApiError::Migration)?;
        blocking("counting faults", move || window.report())
            .await?
            .map_err(|e| ApiError::Migration(format!("counting faults: {}", error_chain(&e))))
    }

    /// The source gives up on `session_id`. A partition the session restored here is stopped
    /// first (the source resumes its own copy), so exactly one copy runs.
    pub(super) async fn abort_incoming(&self, session_id: u64) {
        let session = self.registry.session(session_id).ok();
        // A session with nothing running ends here and now; one whose commit restored a
        // partition (or a pre-copy one already handed over) refuses until that copy stops.
        let ended = session.as_ref().is_some_and(|s| s.abort().is_ok());
        if !ended && let Some(id) = self.registry.committed_id(session_id) {
            warn!("migration session {session_id} was aborted after its handover: stopping {id}");
        }
        // Ended, a copy it restored was parked and never ran (the abort stopped it): it is
        // recorded as stopped all the same.
        self.stop_committed(session_id).await;
        if let Some(session) = session {
            if !ended && let Err(e) = session.discard() {
                warn!("migration session {session_id}: {e}");
            }
            self.registry.drop_session(session_id);
            info!("migration session {session_id} aborted");
        }
    }

    /// Drops incoming session `id` once it fails before its cutover: its source was killed or
    /// cut off and will send no `abort`. Drops it too once it has waited parked for its
    /// handover longer than [`parked_limit`]: that copy never ran, so dropping it is safe,
    /// and a source that asks for the handover after all is told that nothing of it runs
    /// here, and resumes. Ends when the session leaves the inventory.
    fn reap_on_failure(&self, id: u64, session: &Arc<Session>) {
        let daemon = self.clone();
        let session = Arc::downgrade(session);
        let parked_limit = parked_limit(self.peer_timeout);
        tokio::spawn(async move {
            let mut parked_since: Option<std::time::Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(session) = session.upgrade() else {
                    return;
                };
                if !daemon.registry.holds_session(id, &session) {
                    return;
                }
                if session.phase() == SessionPhase::Parked {
                    let since = *parked_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > parked_limit {
                        warn!(
                            "migration session {id} waited parked for its handover over \
                             {parked_limit:?}: dropping it and the copy it restored, which never ran"
                        );
                        let _ = session.abort();
                        daemon.registry.drop_session(id);
                        daemon.stop_committed(id).await;
                        return;
                    }
                } else {
                    parked_since = None;
                }
                if let Some(error) = session.failed_before_cutover() {
                    warn!(
                        "migration session {id} failed, dropping it: {}",
                        error_chain(&*error)
                    );
                    let _ = session.abort();
                    daemon.registry.drop_session(id);
                    // Parked there, a copy its commit restored never ran.
                    daemon.stop_committed(id).await;
                    return;
                }
            }
        });
    }
}

/// How long a committed copy waits parked for its handover before the destination drops it:
/// ten peer timeouts, and at least a minute. A source whose commit went unanswered asks again
/// with backoff (at most every 30 s); one that never does has lost the guest's handover for
/// good, and resumes its own copy when it learns nothing runs here.
fn parked_limit(peer_timeout: Duration) -> Duration {
    (peer_timeout * 10).max(Duration::from_secs(60))
}

/// A session that finished, kept for its source to ask about again: its answer, and the
/// partition it became here (for the heat the source hands on after the finish).
#[derive(Clone)]
pub(super) struct Finished {
    pub reply: FinishReply,
    pub partition: Option<String>,
}
