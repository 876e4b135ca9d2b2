//! The API's accept loops: each connection, its TLS handshake included, on a task of its own;
//! TCP for clients and peers, a Unix socket between a supervisor and its partition processes.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;
use tracing::warn;

use crate::tls::{Security, Stream};
use futures::StreamExt;
use heatprobe::probes::error_chain;

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
    #[error("cannot listen on {}", path.display())]
    BindLocal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the API's address.
///
/// Without TLS only a loopback address is accepted: anyone who can reach the port can start
/// partitions and write their memory. With TLS a peer must present a certificate from the
/// daemon's CA; one that does not is dropped in the handshake, before any request is read.
pub async fn bind(
    listen: SocketAddr,
    security: &Security,
) -> Result<tokio::net::TcpListener, ServeError> {
    if !listen.ip().is_loopback() && !security.is_tls() {
        return Err(ServeError::NeedsTls { listen });
    }
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind { listen, source })
}

/// Binds `listen` and serves `api` there: the bound address, and the serving future.
pub async fn listen_and_serve<S: ServesApi>(
    api: S,
    security: Security,
    listen: SocketAddr,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    let listener = bind(listen, &security).await?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { listen, source })?;
    Ok((local, serve(api, security, listener)))
}

/// Serves the API on `listener` (see [`bind`]) until the future is dropped.
pub fn serve<S>(
    api: S,
    security: Security,
    listener: tokio::net::TcpListener,
) -> impl Future<Output = ()>
where
    S: ServesApi,
{
    let accepted = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await;
        Some((next, listener))
    });
    accepted.for_each(move |accepted| {
        let api = api.clone();
        let security = security.clone();
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
                match security.accept(tcp, peer).await {
                    Ok(stream) => api.serve_connection(stream).await,
                    Err(e) => warn!("refused {peer}: {}", error_chain(&e)),
                }
            });
        }
    })
}

/// Serves the API on the Unix socket `path` (a partition process, to its supervisor) until
/// the task is dropped. The socket is created owner-only: a process that can open it is
/// trusted as the daemon is.
pub fn serve_local<S>(api: S, path: &Path) -> Result<impl Future<Output = ()> + use<S>, ServeError>
where
    S: ServesApi,
{
    let bind = |source| ServeError::BindLocal {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(bind)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    Ok(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(api.clone().serve_connection(Box::new(stream)));
                }
                Err(e) => {
                    warn!("accepting a local connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// An API the accept loops serve. Each implementation's request futures are `Send`, which
/// the generic service trait cannot promise, so the connection loop is written out for each.
pub trait ServesApi: Clone + Send + Sync + 'static {
    /// Answers one connection's requests, each on a task of its own: a request whose client
    /// goes away (a supervisor killed mid-migration) runs to its end all the same.
    fn serve_connection(self, stream: Stream) -> impl Future<Output = ()> + Send + 'static;
}

/// Implements [`ServesApi`] for a type that implements [`MigratorApi`](super::MigratorApi):
/// each server of the API (the daemon, the supervisor) invokes it for itself.
macro_rules! serves_api {
    ($api:ty) => {
        impl $crate::api::listener::ServesApi for $api {
            fn serve_connection(
                self,
                stream: $crate::tls::Stream,
            ) -> impl ::std::future::Future<Output = ()> + Send + 'static {
                use ::futures::StreamExt as _;
                use ::tarpc::server::Channel as _;
                use $crate::api::MigratorApi as _;
                ::tarpc::server::BaseChannel::with_defaults($crate::api::codec::transport(stream))
                    .execute(self.serve())
                    .for_each_concurrent(None, |response| async move {
                        tokio::spawn(response);
                    })
            }
        }
    };
}
pub(crate) use serves_api;
