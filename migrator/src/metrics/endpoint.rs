//! The metrics endpoint: `GET /metrics` over HTTP/1.1 on a port of its own, one request per
//! connection, behind the API's mutual TLS off loopback.
//!
//! Hand-written rather than hyper: no HTTP crate is in the dependency tree, and this answers
//! one path to one kind of client; hyper and hyper-util would bring about ten crates for it.
//! What it takes from a client is bounded: a request head of at most [`HEAD_LIMIT`] bytes,
//! read within [`READ_TIMEOUT`], on at most [`CONNECTIONS`] connections at once; the body
//! is never read (a GET has none), and every connection is closed after its answer.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::{
    Recorder,
    exposition::{self, Scrape},
};
use crate::tls::{Security, Stream};

/// The longest request head read.
pub const HEAD_LIMIT: usize = 8 << 10;
/// How long a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once.
pub const CONNECTIONS: usize = 16;
/// The path the page is served at.
pub const PATH: &str = "/metrics";

#[derive(Debug, Error)]
pub enum EndpointError {
    #[error(
        "serving metrics on {listen} needs mutual TLS: pass --tls DIR, as for the API (scrapers \
         then need a client certificate from its CA), or serve them on a loopback address"
    )]
    NeedsTls { listen: SocketAddr },
    #[error("cannot serve metrics on {listen}")]
    Bind {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the metrics address: without TLS, only a loopback one (the figures name partitions
/// and their migrations, which is the API's business).
pub async fn bind(
    listen: SocketAddr,
    security: &Security,
) -> Result<tokio::net::TcpListener, EndpointError> {
    if !listen.ip().is_loopback() && !security.is_tls() {
        return Err(EndpointError::NeedsTls { listen });
    }
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| EndpointError::Bind { listen, source })
}

/// Serves the page on `listener` until the future is dropped.
pub async fn serve<S: Scrape>(
    listener: tokio::net::TcpListener,
    security: Security,
    source: S,
    recorder: Recorder,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("accepting a metrics connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            debug!("metrics: {CONNECTIONS} connections open; closing {peer}'s");
            continue;
        };
        let (security, source, recorder) = (security.clone(), source.clone(), recorder.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match security.accept(tcp, peer).await {
                Ok(stream) => answer(stream, &source, &recorder).await,
                Err(e) => warn!(
                    "metrics: refused {peer}: {}",
                    heatprobe::probes::error_chain(&e)
                ),
            }
        });
    }
}

/// Reads one request and answers it.
async fn answer<S: Scrape>(mut stream: Stream, source: &S, recorder: &Recorder) {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await;
    let response = match head {
        Ok(Some(head)) => match route(&head) {
            Route::Metrics => {
                let snapshot = source.snapshot().await;
                match exposition::render(recorder, &snapshot) {
                    Ok(page) => response("200 OK", exposition::CONTENT_TYPE, &page),
                    Err(_) => plain("500 Internal Server Error", "cannot render the metrics"),
                }
            }
            Route::NotFound => plain("404 Not Found", "the metrics are at /metrics"),
            Route::NotAllowed => plain("405 Method Not Allowed", "only GET is served"),
            Route::BadRequest => plain("400 Bad Request", "not an HTTP/1 request"),
        },
        Ok(None) => plain(
            "400 Bad Request",
            "the request head is too long or cut short",
        ),
        Err(_) => return,
    };
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

/// Bytes up to the end of the request head (an empty line), or `None` if the client closed
/// first or sent more than [`HEAD_LIMIT`] without one.
async fn read_head(stream: &mut Stream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Some(head);
        }
        if head.len() >= HEAD_LIMIT {
            return None;
        }
        let room = (HEAD_LIMIT - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Where the request head ends (after its empty line), if it has.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    NotAllowed,
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Route::BadRequest;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::BadRequest;
    };
    let mut words = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Route::BadRequest;
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::NotAllowed;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path == PATH {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn plain(status: &str, body: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", &format!("{body}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_get_of_the_metrics_path_gets_the_page() {
        let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
        assert_eq!(route(get), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\n\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::NotAllowed);
        assert_eq!(route(b"GET /metrics HTTP/2\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET  /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }

    #[test]
    fn the_head_ends_at_its_first_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn an_answer_says_its_length_and_closes() {
        let bytes = plain("404 Not Found", "no");
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n\r\nno\n"), "{text}");
    }

    #[tokio::test]
    async fn a_head_too_long_or_cut_short_is_refused_without_reading_more() {
        let (client, server) = tokio::io::duplex(64 << 10);
        let mut client = client;
        let mut server: Stream = Box::new(server);
        client
            .write_all(&vec![b'a'; HEAD_LIMIT + 100])
            .await
            .unwrap();
        assert_eq!(read_head(&mut server).await, None);
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server: Stream = Box::new(server);
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        drop(client);
        assert_eq!(read_head(&mut server).await, None);
    }
}
