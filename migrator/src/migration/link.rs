//! Opening the data connection: plain TCP between loopback daemons, or TLS with the daemons'
//! own identities. Either way the engine gets a [`DataStream`], a blocking socket it can clone
//! for a reader thread and shut down.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::{
        fd::{AsFd, BorrowedFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use thiserror::Error;
use tokio::runtime::Handle;

use crate::tls::{self, Security, TlsError};

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("cannot open the data connection to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot secure the data connection")]
    Tls(#[from] TlsError),
    #[error("cannot set up the data socket")]
    Socket(#[source] io::Error),
}

/// The engine's end of a data connection.
#[derive(Debug)]
pub enum DataStream {
    Tcp(TcpStream),
    /// One end of a socket pair whose other end is pumped through TLS ([`tls::tunnel`]).
    Tunnel(UnixStream),
}

impl DataStream {
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Tunnel(s) => Self::Tunnel(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Tunnel(s) => s.shutdown(how),
        }
    }
}

impl AsFd for DataStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Tunnel(s) => s.as_fd(),
        }
    }
}

impl Read for DataStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Tunnel(s) => s.read(buf),
        }
    }
}

impl Write for DataStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tunnel(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tunnel(s) => s.flush(),
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
        super::transport::tune_data_socket(&tcp, peer_timeout).map_err(LinkError::Socket)?;
        let _ = tcp.set_nodelay(true);
        self.secure(tcp, addr, Side::Client)
    }

    /// Wraps a connection the data listener accepted (destination side). Blocking.
    pub fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Result<DataStream, LinkError> {
        tcp.set_nonblocking(false).map_err(LinkError::Socket)?;
        let _ = tcp.set_nodelay(true);
        self.secure(tcp, peer, Side::Server)
    }

    fn secure(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        side: Side,
    ) -> Result<DataStream, LinkError> {
        let Self::Tls { security, runtime } = self else {
            return Ok(DataStream::Tcp(tcp));
        };
        tcp.set_nonblocking(true).map_err(LinkError::Socket)?;
        let stream = runtime.block_on(async {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(LinkError::Socket)?;
            Ok::<_, LinkError>(match side {
                Side::Client => security.client_handshake(tcp, peer).await?,
                Side::Server => security.accept(tcp, peer).await?,
            })
        })?;
        Ok(DataStream::Tunnel(tls::tunnel(runtime, stream)?))
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}
