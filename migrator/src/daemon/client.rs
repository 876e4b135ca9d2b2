//! Connecting to a daemon: TCP, bincode frames, and the version handshake.

use std::{net::SocketAddr, time::Duration};

use tarpc::{client, context, serde_transport::tcp, tokio_serde::formats::Bincode};
use thiserror::Error;

use super::api::{API_VERSION, ApiError, DaemonInfo, MAX_FRAME, MigratorApiClient};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to the daemon at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at {addr} did not answer")]
    Rpc {
        addr: SocketAddr,
        #[source]
        source: tarpc::client::RpcError,
    },
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

impl Connection {
    pub async fn open(addr: SocketAddr) -> Result<Self, ClientError> {
        let mut connect = tcp::connect(addr, Bincode::default);
        connect.config_mut().max_frame_length(MAX_FRAME);
        let transport = connect
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let client = MigratorApiClient::new(client::Config::default(), transport).spawn();
        let info = client
            .hello(context::current(), API_VERSION, API_VERSION)
            .await
            .map_err(|source| ClientError::Rpc { addr, source })??;
        Ok(Self { client, addr, info })
    }

    /// Maps a transport failure to a clear error.
    pub fn rpc<T>(&self, result: Result<T, tarpc::client::RpcError>) -> Result<T, ClientError> {
        result.map_err(|source| ClientError::Rpc {
            addr: self.addr,
            source,
        })
    }
}
