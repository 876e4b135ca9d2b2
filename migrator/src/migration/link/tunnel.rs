//! The TLS tunnel under a data connection.
//!
//! The migration engine is blocking code that reads and writes a socket from several threads.
//! Rather than thread rustls through it, [`tunnel`] hands it one end of a socket pair and
//! pumps the other end through the TLS stream on the runtime.

use std::{
    io,
    os::{
        fd::{BorrowedFd, RawFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex},
};

use thiserror::Error;
use tokio::runtime::Handle;

use crate::tls::Stream;

/// Each direction's buffer in the pump.
const TUNNEL_BUFFER: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("cannot create the tunnel's socket pair")]
    Pair(#[source] io::Error),
    #[error("cannot make the pump's end of the tunnel non-blocking")]
    NonBlocking(#[source] io::Error),
    #[error("cannot register the pump's end of the tunnel with the runtime")]
    Register(#[source] io::Error),
}

/// Why a tunnel's TLS side failed, once it has. The engine's end of the socket pair can only
/// see the end of the stream; it asks here whether that end was clean.
#[derive(Debug, Default)]
pub struct TunnelFailure(Mutex<Option<String>>);

impl TunnelFailure {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, why: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// The TCP socket under a tunnel's TLS, for asking how much it still holds. The pump clears
/// it, under the lock, before the socket closes, so a query never reaches a closed (or
/// reused) descriptor.
#[derive(Debug, Default)]
pub struct TunnelWire(Mutex<Option<RawFd>>);

impl TunnelWire {
    /// Bytes still queued in the TCP socket on the way to the peer. What the pump holds
    /// between the socket pair and TLS (at most its buffer, 1 MiB) cannot be asked and is not
    /// counted: counting it whole whenever the socket held anything made a converged
    /// migration with nothing left look a megabyte away from done.
    pub fn unsent_bytes(&self) -> io::Result<u64> {
        let wire = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fd) = *wire else {
            return Ok(0);
        };
        // SAFETY: the pump clears the descriptor under this lock before the socket is
        // closed, and the lock is held for the whole borrow.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        super::socket::unsent_bytes(socket)
    }

    fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Gives blocking code a plain socket whose bytes travel through `stream` (TLS). The pump
/// runs on `handle` until either side closes or fails; then both ends see the end of stream,
/// and a failure (a dead link, a peer gone without closing TLS) is recorded first.
///
/// `wire` is the TCP socket under `stream`, whose queue [`TunnelWire`] reports while the pump
/// runs.
pub fn tunnel(
    handle: &Handle,
    stream: Stream,
    wire: Option<RawFd>,
) -> Result<(UnixStream, Arc<TunnelFailure>, Arc<TunnelWire>), TunnelError> {
    let (engine_end, pump_end) = UnixStream::pair().map_err(TunnelError::Pair)?;
    pump_end
        .set_nonblocking(true)
        .map_err(TunnelError::NonBlocking)?;
    let pump_end = {
        let _runtime = handle.enter();
        tokio::net::UnixStream::from_std(pump_end).map_err(TunnelError::Register)?
    };
    let failure = Arc::new(TunnelFailure::default());
    let recorded = Arc::clone(&failure);
    let queue = Arc::new(TunnelWire(Mutex::new(wire)));
    let clearing = Arc::clone(&queue);
    handle.spawn(async move {
        let (mut stream, mut pump_end) = (stream, pump_end);
        // Buffers of a frame's size, not tokio's 8 KiB: fewer wakeups and fuller TLS records.
        let copied = tokio::io::copy_bidirectional_with_sizes(
            &mut pump_end,
            &mut stream,
            TUNNEL_BUFFER,
            TUNNEL_BUFFER,
        )
        .await;
        if let Err(e) = copied {
            tracing::debug!("data tunnel closed: {e}");
            // Before the pump's end drops, so the engine's read of the end sees it.
            recorded.set(format!("the TLS connection failed: {e}"));
        }
        clearing.clear();
        drop(stream);
    });
    Ok((engine_end, failure, queue))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn bytes_cross_the_tunnel_and_a_clean_end_is_no_failure() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // A Unix socket pair stands in for the TLS stream: the pump only sees a byte stream.
        let (mut peer, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        // The stand-in's descriptor, as the TCP socket's would be.
        let wire = Some(std::os::fd::AsRawFd::as_raw_fd(&theirs));
        let theirs: Stream = {
            let _runtime = runtime.enter();
            Box::new(tokio::net::UnixStream::from_std(theirs).unwrap())
        };
        let (mut engine_end, failure, queue) = tunnel(runtime.handle(), theirs, wire).unwrap();
        engine_end.write_all(b"pages").unwrap();
        // The pump moves the bytes onto the wire, where they wait for the peer to read them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while queue.unsent_bytes().unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline, "never queued");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(queue.unsent_bytes().unwrap() >= 5);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pages");
        assert_eq!(queue.unsent_bytes().unwrap(), 0);
        peer.write_all(b"demand").unwrap();
        drop(peer);
        let mut back = Vec::new();
        engine_end.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"demand");
        assert_eq!(failure.get(), None);
        // Once the pump is done, the descriptor is forgotten, not queried.
        drop(engine_end);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while queue.0.lock().unwrap().is_some() {
            assert!(std::time::Instant::now() < deadline, "the pump never ended");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(queue.unsent_bytes().unwrap(), 0);
    }
}
