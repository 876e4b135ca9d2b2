//! Socket policy of the connections to a migration peer: how long they may stay silent, and how much it may
//! queue. Set through socket2, on the TCP socket itself or on the engine's end of a tunnel.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use thiserror::Error;

/// The send buffer during post-copy: a few push batches, so that a demanded page does not
/// queue behind megabytes of pushed ones.
pub const POSTCOPY_SEND_BUFFER: usize = 512 * 1024;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("cannot set TCP keepalive on the data socket")]
    Keepalive(#[source] io::Error),
    #[error("cannot set TCP_USER_TIMEOUT on the data socket")]
    UserTimeout(#[source] io::Error),
    #[error("cannot set the data socket's send buffer to {bytes} bytes")]
    SendBuffer {
        bytes: usize,
        #[source]
        source: io::Error,
    },
}

/// Bounds how long a connection to a migration peer (its data connections, and the source's
/// control connection to the destination) may stay silent: unacknowledged writes fail after
/// `peer_timeout` (TCP_USER_TIMEOUT), and an idle connection probes its peer (keepalive) so a
/// blocked read fails within about `peer_timeout` too when the peer or the link is gone.
/// Call it on the TCP socket itself, under any tunnel.
pub fn tune_peer_socket(stream: &impl AsFd, peer_timeout: Duration) -> Result<(), SocketError> {
    let socket = SockRef::from(stream);
    // The kernel takes whole seconds, at least one.
    let idle = Duration::from_secs((peer_timeout.as_secs() / 3).max(1));
    let interval = Duration::from_secs((peer_timeout.as_secs() / 6).clamp(1, 5));
    socket
        .set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(3),
        )
        .map_err(SocketError::Keepalive)?;
    socket
        .set_tcp_user_timeout(Some(peer_timeout))
        .map_err(SocketError::UserTimeout)
}

/// Bytes written to a socket that its peer has not yet taken: for TCP, sent but not
/// acknowledged plus not yet sent (SIOCOUTQ, `write_seq - snd_una`), so whatever is still in
/// the send buffer, the qdisc or on the wire; for a Unix stream socket, what the peer has not
/// read yet.
pub fn unsent_bytes(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SIOCOUTQ is TIOCOUTQ's number (linux/sockios.h), which libc names only as the latter.
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points at a live c_int; the
    // descriptor is borrowed, so it stays open for the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Sets the send buffer (SO_SNDBUF) of the socket under `stream`: the TCP socket, or the
/// engine's end of a tunnel.
pub fn set_send_buffer(stream: &impl AsFd, bytes: usize) -> Result<(), SocketError> {
    SockRef::from(stream)
        .set_send_buffer_size(bytes)
        .map_err(|source| SocketError::SendBuffer { bytes, source })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::net::TcpStream;

    use super::*;

    #[test]
    fn unsent_bytes_are_what_the_peer_has_not_taken() {
        use std::{
            io::{Read, Write},
            os::unix::net::UnixStream,
        };
        let (mut writer, mut reader) = UnixStream::pair().unwrap();
        assert_eq!(unsent_bytes(writer.as_fd()).unwrap(), 0);
        writer.write_all(&[7; 1000]).unwrap();
        assert!(unsent_bytes(writer.as_fd()).unwrap() >= 1000);
        let mut buffer = [0; 1000];
        reader.read_exact(&mut buffer).unwrap();
        assert_eq!(unsent_bytes(writer.as_fd()).unwrap(), 0);
        // Not a socket: an error, not a number.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(unsent_bytes(file.as_fd()).is_err());
    }

    #[test]
    fn the_policy_reaches_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        tune_peer_socket(&stream, Duration::from_secs(10)).unwrap();
        let socket = SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(3));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(10))
        );
        set_send_buffer(&stream, POSTCOPY_SEND_BUFFER).unwrap();
        // The kernel doubles what it is given, for its bookkeeping.
        assert!(socket.send_buffer_size().unwrap() >= POSTCOPY_SEND_BUFFER);
        let (pair, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        set_send_buffer(&pair, POSTCOPY_SEND_BUFFER).unwrap();
    }
}
