//! Connecting to a daemon: TCP (with mutual TLS off loopback), postcard frames
//! ([`super::codec`]), and the version handshake.

use std::{net::SocketAddr, time::Duration};

use tarpc::{ClientMessage, Response, client, context, serde_transport::Transport};
use thiserror::Error;

use super::{
    API_VERSION, ApiError, DaemonInfo, MigratorApiClient,
    codec::{Postcard, transport},
};
use crate::tls::{Security, Stream, TlsError};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to the daemon at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: Box<TlsError>,
    },
    #[error("the daemon at {addr} did not answer{hint}")]
    Rpc {
        addr: SocketAddr,
        /// Why it may not have answered, when we can tell.
        hint: &'static str,
        #[source]
        source: tarpc::client::RpcError,
    },
    #[error("no answer from the daemon at {addr} within the peer timeout of {after:?}")]
    PeerTimeout { addr: SocketAddr, after: Duration },
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// A connected, version-checked client.
pub struct Connection {
    pub client: MigratorApiClient,
    pub addr: SocketAddr,
    pub info: DaemonInfo,
}

/// A context whose deadline allows slow operations (launching a large partition).
pub fn context_with(timeout: Duration) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}

type ClientTransport = Transport<
    Stream,
    Response<super::MigratorApiResponse>,
    ClientMessage<super::MigratorApiRequest>,
    Postcard<Response<super::MigratorApiResponse>, ClientMessage<super::MigratorApiRequest>>,
>;

impl Connection {
    /// Connects, authenticates when `security` is TLS, and checks the API version.
    pub async fn open(addr: SocketAddr, security: &Security) -> Result<Self, ClientError> {
        Self::open_tuned(addr, security, |_| {}).await
    }

    /// As `open`, for a daemon's connection to its migration peer: opened within
    /// `peer_timeout`, and then a peer or link that goes silent fails the connection within
    /// it too (the data connections' socket policy), not at the deadline of whatever call is
    /// waiting.
    pub async fn open_peer(
        addr: SocketAddr,
        security: &Security,
        peer_timeout: Duration,
    ) -> Result<Self, ClientError> {
        let opening = Self::open_tuned(addr, security, |tcp| {
            if let Err(e) = crate::migration::link::tune_peer_socket(tcp, peer_timeout) {
                tracing::warn!(
                    "the connection to {addr}: {}",
                    heatprobe::probes::error_chain(&e)
                );
            }
        });
        tokio::time::timeout(peer_timeout, opening)
            .await
            .map_err(|_| ClientError::PeerTimeout {
                addr,
                after: peer_timeout,
            })?
    }

    async fn open_tuned(
        addr: SocketAddr,
        security: &Security,
        tune: impl FnOnce(&tokio::net::TcpStream),
    ) -> Result<Self, ClientError> {
        let stream =
            security
                .connect_tuned(addr, tune)
                .await
                .map_err(|e| ClientError::Connect {
                    addr,
                    source: Box::new(e),
                })?;
        let transport: ClientTransport = transport(stream);
        let client = MigratorApiClient::new(client::Config::default(), transport).spawn();
        let info = client
            .hello(context::current(), API_VERSION, API_VERSION)
            .await
            .map_err(|source| ClientError::Rpc {
                addr,
                // A TLS daemon drops a plain client without a word; a TLS 1.3 client learns
                // its certificate was refused only when it first reads.
                hint: if security.is_tls() {
                    " (was our certificate refused?)"
                } else {
                    " (if it runs with TLS, pass --tls DIR)"
                },
                source,
            })??;
        Ok(Self { client, addr, info })
    }

    /// Maps a transport failure to a clear error.
    pub fn rpc<T>(&self, result: Result<T, tarpc::client::RpcError>) -> Result<T, ClientError> {
        result.map_err(|source| ClientError::Rpc {
            addr: self.addr,
            hint: "",
            source,
        })
    }
}
