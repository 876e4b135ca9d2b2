//! Opening the data connection: plain TCP between loopback daemons, or TLS with the daemons'
//! own identities. Either way the engine gets a [`DataStream`], a blocking socket it can clone
//! for a reader thread and shut down.
//!
//! - `socket`: the socket policy (peer timeouts, keepalive, the post-copy send buffer);
//! - `tunnel`: the pump between the engine's blocking socket and a TLS stream.
//!
//! What travels over the stream (frames, pacing) is `transport`'s, which knows nothing of
//! this module: it writes to any `io::Write` and reads from any `io::Read`.

mod socket;
mod tunnel;

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::net::UnixStream,
    },
    sync::{Arc, mpsc},
    time::Duration,
};

use thiserror::Error;
use tokio::runtime::Handle;

pub use self::{
    socket::{POSTCOPY_SEND_BUFFER, SocketError, set_send_buffer, tune_peer_socket},
    tunnel::{TunnelError, TunnelFailure, TunnelWire, tunnel},
};
use crate::tls::{Security, TlsError};

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("cannot open the data connection to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot apply the socket policy to the data connection")]
    Tune(#[from] SocketError),
    #[error("cannot secure the data connection")]
    Tls(#[from] TlsError),
    #[error("cannot start the TLS tunnel")]
    Tunnel(#[from] TunnelError),
    #[error("cannot set up the data socket")]
    Socket(#[source] io::Error),
}

/// The engine's end of a data connection.
#[derive(Debug)]
pub enum DataStream {
    Tcp(TcpStream),
    /// One end of a socket pair whose other end is pumped through TLS ([`tunnel`]), how the
    /// TLS side ended, and its TCP socket's queue.
    Tunnel(UnixStream, Arc<TunnelFailure>, Arc<TunnelWire>),
}

impl DataStream {
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Tunnel(s, failure, wire) => {
                Self::Tunnel(s.try_clone()?, Arc::clone(failure), Arc::clone(wire))
            }
        })
    }

    /// Bytes written that the peer has not yet acknowledged (or, through a tunnel, that are
    /// still on their way to the TLS socket): what a cutover must wait for on top of the
    /// pages it still has to write.
    pub fn unsent_bytes(&self) -> io::Result<u64> {
        match self {
            Self::Tcp(s) => socket::unsent_bytes(s.as_fd()),
            Self::Tunnel(s, _, wire) => Ok(socket::unsent_bytes(s.as_fd())? + wire.unsent_bytes()?),
        }
    }

    /// How long a read waits before it fails with `WouldBlock` or `TimedOut` (`None`: for
    /// ever). Clones share it: it is the socket's.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(timeout),
            Self::Tunnel(s, ..) => s.set_read_timeout(timeout),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Tunnel(s, ..) => s.shutdown(how),
        }
    }
}

impl AsFd for DataStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Tunnel(s, ..) => s.as_fd(),
        }
    }
}

impl Read for DataStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            // The pair's end is clean even when the link under TLS died: ask the pump.
            Self::Tunnel(s, failure, _) => match s.read(buf) {
                Ok(0) if !buf.is_empty() => match failure.get() {
                    Some(why) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)),
                    None => Ok(0),
                },
                other => other,
            },
        }
    }
}

impl Write for DataStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tunnel(s, ..) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tunnel(s, ..) => s.flush(),
        }
    }
}

/// How this daemon opens and accepts data connections.
#[derive(Clone, Debug, Default)]
pub enum DataLink {
    /// Plain TCP, for daemons on loopback and for tests.
    #[default]
    Plain,
    /// TLS with the daemon's identity; `runtime` runs the handshakes and the tunnels.
    Tls { security: Security, runtime: Handle },
}

impl DataLink {
    pub fn new(security: Security, runtime: Handle) -> Self {
        match security {
            Security::Plain => Self::Plain,
            tls => Self::Tls {
                security: tls,
                runtime,
            },
        }
    }

    /// Connects to the destination's data listener (source side), within `peer_timeout`,
    /// which then bounds how long the connection may stay silent. Blocking.
    pub fn connect(
        &self,
        addr: SocketAddr,
        peer_timeout: Duration,
    ) -> Result<DataStream, LinkError> {
        let tcp = TcpStream::connect_timeout(&addr, peer_timeout)
            .map_err(|source| LinkError::Connect { addr, source })?;
        tune_peer_socket(&tcp, peer_timeout)?;
        let _ = tcp.set_nodelay(true);
        self.secure(tcp, addr)
    }

    /// Secures a connection the data listener accepted (destination side) and sends the
    /// result to `ready`. Plain connections are ready at once. TLS handshakes run on the
    /// runtime, each on its own task: a peer that connects and stays silent delays nobody,
    /// and the first authenticated connection wins.
    pub fn accept_into(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        ready: mpsc::Sender<(SocketAddr, Result<DataStream, LinkError>)>,
    ) {
        let _ = tcp.set_nodelay(true);
        let Self::Tls { security, runtime } = self else {
            let stream = tcp.set_nonblocking(false).map(|()| DataStream::Tcp(tcp));
            let _ = ready.send((peer, stream.map_err(LinkError::Socket)));
            return;
        };
        let security = security.clone();
        let pump = runtime.clone();
        runtime.spawn(async move {
            let secured = async {
                tcp.set_nonblocking(true).map_err(LinkError::Socket)?;
                let wire = tcp.as_raw_fd();
                let tcp = tokio::net::TcpStream::from_std(tcp).map_err(LinkError::Socket)?;
                let stream = security.accept(tcp, peer).await?;
                let (engine_end, failure, wire) = tunnel(&pump, stream, Some(wire))?;
                Ok(DataStream::Tunnel(engine_end, failure, wire))
            };
            let _ = ready.send((peer, secured.await));
        });
    }

    fn secure(&self, tcp: TcpStream, peer: SocketAddr) -> Result<DataStream, LinkError> {
        let Self::Tls { security, runtime } = self else {
            return Ok(DataStream::Tcp(tcp));
        };
        tcp.set_nonblocking(true).map_err(LinkError::Socket)?;
        let wire = tcp.as_raw_fd();
        let stream = runtime.block_on(async {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(LinkError::Socket)?;
            Ok::<_, LinkError>(security.client_handshake(tcp, peer).await?)
        })?;
        let (engine_end, failure, wire) = tunnel(runtime, stream, Some(wire))?;
        Ok(DataStream::Tunnel(engine_end, failure, wire))
    }
}
