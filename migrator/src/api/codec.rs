//! The API's wire format: postcard messages in length-delimited frames.
//!
//! postcard is serde's compact, maintained, non-self-describing format (varint integers,
//! enum variants by index). Like any positional format it numbers a service's calls by their
//! place in the `MigratorApi` trait: new calls go at the end, and the golden-bytes tests below
//! pin the handshake's bytes and every call's number, so a reordering fails the build's tests
//! instead of a peer.

use std::{io, marker::PhantomData, pin::Pin, time::Duration};

use bytes::{Bytes, BytesMut};
use tarpc::{
    ClientMessage, Response,
    serde_transport::{self, Transport},
    tokio_serde::{Deserializer, Serializer},
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::MAX_FRAME;
use crate::tls::Stream;

/// tokio-serde's codec for postcard (tokio-serde itself ships bincode, JSON, CBOR and
/// MessagePack).
pub struct Postcard<Item, SinkItem> {
    types: PhantomData<Directions<Item, SinkItem>>,
}

/// What a codec reads and writes, as function types: the codec owns neither, so it is `Send`
/// and `Sync` whatever they are.
type Directions<Item, SinkItem> = (fn() -> Item, fn(&SinkItem));

impl<Item, SinkItem> Default for Postcard<Item, SinkItem> {
    fn default() -> Self {
        Self { types: PhantomData }
    }
}

impl<Item, SinkItem: serde::Serialize> Serializer<SinkItem> for Postcard<Item, SinkItem> {
    type Error = io::Error;

    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, io::Error> {
        postcard::to_stdvec(item)
            .map(Bytes::from)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }
}

/// The furthest deadline a request may carry: a year away. tarpc adds a request's deadline to
/// the clock as it decodes it, which panics past what an `Instant` holds, and its server queues
/// the deadline in a timer wheel that panics past 2^36 ms (2.2 years); our clients' longest is
/// an hour.
pub const MAX_DEADLINE: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// What the codec checks of a message's bytes before serde reads them.
pub trait Checked {
    fn check(bytes: &[u8]) -> io::Result<()>;
}

impl<T> Checked for ClientMessage<T> {
    /// A request's deadline is at most [`MAX_DEADLINE`] away.
    fn check(bytes: &[u8]) -> io::Result<()> {
        /// How a `ClientMessage` starts on the wire: which message, and a request's deadline,
        /// which tarpc sends as the time left.
        #[derive(serde::Deserialize)]
        enum Start {
            Request(Duration),
            Cancel,
        }
        match postcard::take_from_bytes::<Start>(bytes) {
            Ok((Start::Request(left), _)) if left > MAX_DEADLINE => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a request whose deadline is {left:?} away (at most {MAX_DEADLINE:?})"),
            )),
            // Anything else is the decoder's to accept or refuse.
            _ => Ok(()),
        }
    }
}

impl<T> Checked for Response<T> {
    fn check(_: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

impl<Item, SinkItem> Deserializer<Item> for Postcard<Item, SinkItem>
where
    Item: for<'de> serde::Deserialize<'de> + Checked,
{
    type Error = io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, io::Error> {
        Item::check(src)?;
        let (item, rest) = postcard::take_from_bytes(src)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if !rest.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} bytes after the end of a message", rest.len()),
            ));
        }
        Ok(item)
    }
}

/// Postcard messages in length-delimited frames, no larger than [`MAX_FRAME`].
pub fn transport<Item, SinkItem>(
    stream: Stream,
) -> Transport<Stream, Item, SinkItem, Postcard<Item, SinkItem>>
where
    Item: for<'de> serde::Deserialize<'de> + Checked,
    SinkItem: serde::Serialize,
{
    serde_transport::new(Framed::new(stream, framing()), Postcard::default())
}

/// The frames messages travel in: a 4-byte big-endian length, then that many bytes, no more
/// than [`MAX_FRAME`].
pub fn framing() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tarpc::{ClientMessage, Request, Response, context, trace};

    use super::*;
    use crate::api::{API_VERSION, ApiError, DaemonInfo, MigratorApiRequest, MigratorApiResponse};

    fn encode<T: serde::Serialize>(item: &T) -> Vec<u8> {
        let mut codec = Postcard::<(), T>::default();
        Pin::new(&mut codec)
            .serialize(item)
            .expect("encodes")
            .to_vec()
    }

    fn decode<T: for<'de> serde::Deserialize<'de> + Checked>(bytes: &[u8]) -> io::Result<T> {
        let mut codec = Postcard::<T, ()>::default();
        Pin::new(&mut codec).deserialize(&BytesMut::from(bytes))
    }

    /// A request context with small fixed ids and a deadline 10 s away, as a client sends it.
    fn fixed_context() -> context::Context {
        let mut ctx = context::current();
        ctx.deadline = std::time::Instant::now() + Duration::from_secs(10);
        ctx.trace_context = trace::Context {
            trace_id: trace::TraceId::from(3u128),
            span_id: trace::SpanId::from(4u64),
            sampling_decision: trace::SamplingDecision::Unsampled,
        };
        ctx
    }

    /// The handshake as a client of this API version writes it. The deadline travels as the
    /// time left, so its bytes are read rather than pinned.
    #[test]
    fn the_hello_request_is_pinned() {
        let request = ClientMessage::Request(Request {
            context: fixed_context(),
            id: 1,
            message: MigratorApiRequest::Hello {
                min: API_VERSION,
                max: API_VERSION,
            },
        });
        let bytes = encode(&request);
        let (kind, rest) = bytes.split_first().expect("bytes");
        assert_eq!(*kind, 0, "ClientMessage::Request: {bytes:02x?}");
        // The deadline: 9 or 10 seconds left, then varint nanoseconds.
        let (seconds, rest) = rest.split_first().expect("bytes");
        assert!(*seconds == 9 || *seconds == 10, "{bytes:02x?}");
        let nanos = rest.iter().position(|b| b & 0x80 == 0).expect("a varint") + 1;
        assert_eq!(
            &rest[nanos..],
            [
                3,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0, // trace id: 16 bytes
                4, // span id: varint
                1, // SamplingDecision::Unsampled
                1, // request id
                0, // MigratorApiRequest::Hello
                API_VERSION as u8,
                API_VERSION as u8,
            ],
            "{bytes:02x?}"
        );
        let back: ClientMessage<MigratorApiRequest> = decode(&bytes).expect("decodes");
        match back {
            ClientMessage::Request(Request {
                id: 1,
                message: MigratorApiRequest::Hello { min, max },
                ..
            }) => assert_eq!((min, max), (API_VERSION, API_VERSION)),
            other => panic!("decoded {other:?}"),
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode::<ClientMessage<MigratorApiRequest>>(&trailing).is_err());
        assert!(decode::<ClientMessage<MigratorApiRequest>>(&[0; 16]).is_err());
    }

    /// A request whose deadline is further away than a clock or tarpc's timers hold is
    /// refused as it is read (tarpc would panic), and one a year away is read.
    #[test]
    fn a_deadline_past_a_year_is_refused() {
        let request = |seconds: u64| {
            let mut bytes = vec![0]; // ClientMessage::Request
            bytes.extend(postcard::to_stdvec(&Duration::from_secs(seconds)).expect("encodes"));
            bytes.extend(postcard::to_stdvec(&fixed_context().trace_context).expect("encodes"));
            bytes.extend([1, 2]); // id 1, MigratorApiRequest::List
            bytes
        };
        let year = MAX_DEADLINE.as_secs();
        let read: ClientMessage<MigratorApiRequest> = decode(&request(year)).expect("decodes");
        assert!(matches!(
            read,
            ClientMessage::Request(Request {
                message: MigratorApiRequest::List {},
                ..
            })
        ));
        for seconds in [year + 1, u64::MAX] {
            let refused = decode::<ClientMessage<MigratorApiRequest>>(&request(seconds));
            assert_eq!(
                refused.expect_err("refused").kind(),
                io::ErrorKind::InvalidData
            );
        }
    }

    /// A daemon's refusal of a version it does not speak, and its welcome, byte for byte.
    #[test]
    fn the_version_refusal_is_pinned() {
        let refusal: Response<MigratorApiResponse> = Response {
            request_id: 1,
            message: Ok(MigratorApiResponse::Hello(Err(ApiError::Version {
                ours: 2,
                min: 7,
                max: 9,
            }))),
        };
        assert_eq!(
            encode(&refusal),
            [
                1, // request id
                0, // Ok: no server error
                0, // MigratorApiResponse::Hello
                1, // Err
                1, // ApiError::Version
                2, 7, 9,
            ]
        );
        let welcome: Response<MigratorApiResponse> = Response {
            request_id: 1,
            message: Ok(MigratorApiResponse::Hello(Ok(DaemonInfo {
                api_version: 4,
                guest_abi_version: 1,
                partitions: 5,
                holds: 3,
                memory_used: 64 << 20,
                memory_free: Some(1 << 30),
            }))),
        };
        // Varints: 64 MiB is 0x80 0x80 0x80 0x20; `Some` is 1, then 1 GiB 0x80 0x80 0x80 0x80 0x04.
        assert_eq!(
            encode(&welcome),
            [
                1, 0, 0, 0, 4, 1, 5, 3, 0x80, 0x80, 0x80, 0x20, 1, 0x80, 0x80, 0x80, 0x80, 0x04
            ]
        );
    }

    /// The commit's answer carries the destination's timings since API 4; an answer of API 3,
    /// without them, does not decode as one.
    #[test]
    fn the_commit_reply_is_pinned() {
        use crate::migration::control::{CommitReply, CommitTimings};
        let reply = CommitReply {
            id_on_destination: "p1".into(),
            dest_digest: None,
            timings: CommitTimings {
                pages_wait_ms: 0.0,
                restore_ms: 1.0,
                resume_ms: 0.5,
            },
        };
        let bytes = encode(&reply);
        assert_eq!(
            bytes,
            [
                2, b'p', b'1', // the id
                0,    // no digest
                0, 0, 0, 0, 0, 0, 0, 0, // pages_wait_ms: 0.0
                0, 0, 0, 0, 0, 0, 0xf0, 0x3f, // restore_ms: 1.0
                0, 0, 0, 0, 0, 0, 0xe0, 0x3f, // resume_ms: 0.5
            ],
            "{bytes:02x?}"
        );
        let back: CommitReply = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back.timings, reply.timings);
        assert!(postcard::from_bytes::<CommitReply>(&bytes[..4]).is_err());
    }

    /// Calls' numbers on the wire: a call added anywhere but at the end of the service would
    /// renumber the ones after it and fail here.
    #[test]
    fn calls_keep_their_numbers() {
        use crate::api::{LaunchRequest, MigrateRequest};
        let id = || "p0".to_string();
        let calls = [
            (0, MigratorApiRequest::Hello { min: 1, max: 1 }),
            (
                1,
                MigratorApiRequest::Launch {
                    request: LaunchRequest {
                        name: None,
                        image: crate::vmm::GuestImage::Builtin("idle".into()),
                        args: String::new(),
                        mem_size: 1,
                        vcpus: 1,
                    },
                },
            ),
            (2, MigratorApiRequest::List {}),
            (3, MigratorApiRequest::Status { id: id() }),
            (4, MigratorApiRequest::Pause { id: id() }),
            (5, MigratorApiRequest::Resume { id: id() }),
            (6, MigratorApiRequest::Stop { id: id() }),
            (
                7,
                MigratorApiRequest::Migrate {
                    request: MigrateRequest {
                        id: id(),
                        to: "127.0.0.1:1".parse().expect("address"),
                        options: Default::default(),
                        heat: None,
                    },
                },
            ),
            (8, MigratorApiRequest::MigrationProgress { id: id() }),
            (11, MigratorApiRequest::MigrationFinish { session: 1 }),
            (12, MigratorApiRequest::MigrationAbort { session: 1 }),
            (13, MigratorApiRequest::Heat { id: id(), cells: 1 }),
            (14, MigratorApiRequest::MigrationFaults { session: 1 }),
            (
                15,
                MigratorApiRequest::PageHeat {
                    id: id(),
                    duration: Duration::from_secs(2),
                },
            ),
            (
                16,
                MigratorApiRequest::Plan {
                    id: id(),
                    strategy: crate::migration::Strategy::Heat,
                    duration: Duration::from_secs(2),
                },
            ),
        ];
        for (number, call) in &calls {
            assert_eq!(encode(call)[0], *number, "{call:?} moved");
        }
        assert!(postcard::from_bytes::<MigratorApiRequest>(&[200, 0]).is_err());
    }
}
