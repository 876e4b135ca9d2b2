//! The destination daemon as the source's migration engine sees it: the `Destination` calls
//! over tarpc, each bounded by the peer timeout, and the data connection.

use std::{net::SocketAddr, time::Duration};

use crate::api::{
    ApiError, MigratorApiClient,
    client::{Connection, context_with},
};
use crate::{
    migration::{
        control::{
            CarriedHeat, CommitReply, CommitRequest, Destination, DestinationError, FinishReply,
            HandoverReply, PrepareReply, PrepareRequest, Recovery, Refusal,
        },
        link::{DataLink, DataStream, LinkError},
        report::PostCutoverFaults,
    },
    tls::Security,
};

/// The destination daemon, driven from the source's migration thread.
pub struct RemoteDestination {
    pub client: MigratorApiClient,
    pub addr: SocketAddr,
    pub handle: tokio::runtime::Handle,
    pub link: DataLink,
    /// Bounds every wait on the destination: a dead peer or link fails the migration in time.
    pub peer_timeout: Duration,
    /// How the control channel is opened again after a broken link.
    pub security: Security,
}

impl RemoteDestination {
    /// Opens the control connection to the destination daemon at `addr`, within the peer
    /// timeout, or says why it could not (for the caller's error).
    pub async fn open(
        addr: SocketAddr,
        security: &Security,
        peer_timeout: Duration,
    ) -> Result<Self, String> {
        let connection = Connection::open_peer(addr, security, peer_timeout)
            .await
            .map_err(|e| format!("destination {addr}: {}", super::error_chain(&e)))?;
        let handle = tokio::runtime::Handle::current();
        Ok(Self {
            client: connection.client,
            addr,
            link: DataLink::new(security.clone(), handle.clone()),
            handle,
            peer_timeout,
            security: security.clone(),
        })
    }

    /// Runs one call; tells a refusal (the destination answered no) from no answer at all.
    ///
    /// A control connection that was already closed (the destination's daemon restarted, and
    /// its partition processes, which hold the sessions, run on) is opened again and the call
    /// made once more on the new one. A call that was in flight when its connection broke
    /// may then reach the destination twice; every call is safe to repeat there: a repeated
    /// commit or prepare is refused or leaves an orphan session the destination drops, and
    /// no copy runs without the handover.
    fn call<T, F, Fut>(&mut self, what: &'static str, call: F) -> Result<T, DestinationError>
    where
        F: Fn(MigratorApiClient) -> Fut,
        Fut: Future<Output = Result<Result<T, ApiError>, tarpc::client::RpcError>>,
    {
        let mut answer = self.handle.block_on(call(self.client.clone()));
        if matches!(answer, Err(tarpc::client::RpcError::Shutdown)) && self.reconnect().is_ok() {
            tracing::info!(
                "the control connection to {} was closed: opened it again",
                self.addr
            );
            answer = self.handle.block_on(call(self.client.clone()));
        }
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(refusal)) => Err(DestinationError::Refused(match refusal {
                ApiError::NothingRunsHere(why) => Refusal::NothingRunsHere(why),
                other => Refusal::Other(other.to_string()),
            })),
            Err(e) => Err(DestinationError::Unreachable {
                what,
                source: format!("{}: {e}", self.addr).into(),
            }),
        }
    }
}

impl Destination for RemoteDestination {
    fn prepare(&mut self, request: PrepareRequest) -> Result<PrepareReply, DestinationError> {
        // Preparing allocates the guest memory: allow for that beyond the peer timeout.
        let ctx = context_with(self.peer_timeout + Duration::from_secs(30));
        self.call("prepare", |c| {
            let request = request.clone();
            async move { c.migration_prepare(ctx, request).await }
        })
    }

    fn commit(
        &mut self,
        session: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, DestinationError> {
        // The destination first waits for the pages still in flight, then restores.
        let ctx = context_with(self.peer_timeout + Duration::from_secs(60));
        self.call("commit", |c| {
            let request = request.clone();
            async move { c.migration_commit(ctx, session, request).await }
        })
    }

    fn handover(&mut self, session: u64) -> Result<HandoverReply, DestinationError> {
        // A handover that comes during the restore waits for it there.
        let ctx = context_with(self.peer_timeout + Duration::from_secs(60));
        self.call("handover", |c| async move {
            c.migration_handover(ctx, session).await
        })
    }

    fn carry_heat(&mut self, session: u64, heat: CarriedHeat) -> Result<(), DestinationError> {
        // A few megabytes at most (a page's heat is some tens of bytes).
        let ctx = context_with(self.peer_timeout + Duration::from_secs(30));
        self.call("carry heat", |c| {
            let heat = heat.clone();
            async move { c.migration_heat(ctx, session, heat).await }
        })
    }

    fn peer(&self) -> String {
        self.addr.to_string()
    }

    fn finish(&mut self, session: u64) -> Result<FinishReply, DestinationError> {
        // Called once every page has been sent: the destination waits for the last to land.
        let ctx = context_with(self.peer_timeout + Duration::from_secs(60));
        self.call("finish", |c| async move {
            c.migration_finish(ctx, session).await
        })
    }

    fn faults(&mut self, session: u64) -> Result<PostCutoverFaults, DestinationError> {
        // The destination answers once its fault window is over (at most a minute).
        let ctx = context_with(self.peer_timeout + Duration::from_secs(60));
        self.call("faults", |c| async move {
            c.migration_faults(ctx, session).await
        })
    }

    fn round_trip(&mut self) -> Option<Duration> {
        let ctx = context_with(self.peer_timeout);
        let asked = std::time::Instant::now();
        let answer = self.handle.block_on(self.client.hello(ctx, 0, u32::MAX));
        matches!(answer, Ok(Ok(_))).then(|| asked.elapsed())
    }

    fn abort(&mut self, session: u64) {
        // Best effort: a destination that cannot be reached drops the session by itself.
        let ctx = context_with(self.peer_timeout);
        let _ = self
            .handle
            .block_on(self.client.migration_abort(ctx, session));
    }

    fn recover(&mut self, session: u64) -> Result<Recovery, DestinationError> {
        let ctx = context_with(self.peer_timeout + Duration::from_secs(30));
        self.call("recover", |c| async move {
            c.migration_recover(ctx, session).await
        })
    }

    fn reconnect(&mut self) -> Result<(), DestinationError> {
        let opened = self.handle.block_on(Connection::open_peer(
            self.addr,
            &self.security,
            self.peer_timeout,
        ));
        let connection = opened.map_err(|e| DestinationError::Unreachable {
            what: "a new control connection",
            source: super::error_chain(&e).into(),
        })?;
        self.client = connection.client;
        Ok(())
    }

    fn connect_data(&self, port: u16) -> Result<DataStream, LinkError> {
        let addr = SocketAddr::new(self.addr.ip(), port);
        self.link.connect(addr, self.peer_timeout)
    }
}
