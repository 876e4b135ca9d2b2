//! The API's accept loop: each connection, its TLS handshake included, on a task of its own.

use std::{net::SocketAddr, time::Duration};

use futures::StreamExt;
use tarpc::server::{self, Channel};
use thiserror::Error;
use tracing::warn;

use super::{api::MigratorApi, codec::transport, error_chain, server::Daemon};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "listening on {listen} needs mutual TLS: pass --tls DIR (make one with `migrator certs`), \
         or listen on a loopback address"
    )]
    NeedsTls { listen: SocketAddr },
    #[error("cannot listen on {listen}")]
    Bind {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the API on `listen` until the task is dropped. Returns the bound address.
///
/// Without TLS only a loopback address is accepted: anyone who can reach the port can start
/// partitions and write their memory. With TLS a peer must present a certificate from the
/// daemon's CA; one that does not is dropped in the handshake, before any request is read.
pub async fn serve(
    daemon: Daemon,
    listen: SocketAddr,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    if !listen.ip().is_loopback() && !daemon.security.is_tls() {
        return Err(ServeError::NeedsTls { listen });
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind { listen, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { listen, source })?;
    let accepted = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await;
        Some((next, listener))
    });
    let serving = accepted.for_each(move |accepted| {
        let daemon = daemon.clone();
        async move {
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: back off rather than spin on the error.
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
            };
            // Each connection, its handshake included, on a task of its own.
            tokio::spawn(async move {
                let stream = match daemon.security.accept(tcp, peer).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        warn!("refused {peer}: {}", error_chain(&e));
                        return;
                    }
                };
                server::BaseChannel::with_defaults(transport(stream))
                    .execute(daemon.serve())
                    .for_each_concurrent(None, |response| async move {
                        tokio::spawn(response);
                    })
                    .await;
            });
        }
    });
    Ok((local, serving))
}
