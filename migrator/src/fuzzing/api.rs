//! The API's wire codec (`api::codec`): the framing every connection reads, and postcard
//! messages in both directions, what a daemon reads (`ClientMessage<MigratorApiRequest>`) and
//! what a client reads (`Response<MigratorApiResponse>`).

use std::{io, pin::Pin, time::Instant};

use bytes::BytesMut;
use tarpc::{
    ClientMessage, Response,
    tokio_serde::{Deserializer, Serializer},
};
use tokio_util::codec::Decoder;

use super::FuzzError;
use crate::api::{
    MAX_FRAME, MigratorApiRequest, MigratorApiResponse,
    codec::{Postcard, framing},
};

/// A message read through the API's own codec.
fn decode<T>(bytes: &[u8]) -> io::Result<T>
where
    Postcard<T, ()>: Deserializer<T, Error = io::Error>,
{
    let mut codec = Postcard::<T, ()>::default();
    Pin::new(&mut codec).deserialize(&BytesMut::from(bytes))
}

/// A message written through the API's own codec: whatever decoded must encode.
fn encode<T: serde::Serialize>(item: &T) -> Vec<u8> {
    let mut codec = Postcard::<(), T>::default();
    Pin::new(&mut codec)
        .serialize(item)
        .expect("a decoded message encodes")
        .to_vec()
}

/// What a daemon reads. A decoded request encodes, and decodes again to the same request: the
/// same id, trace and call, byte for byte; its deadline travels as the time left, so it comes
/// back no earlier, and later by no more than the round trip took.
fn request(bytes: &[u8]) -> io::Result<()> {
    let started = Instant::now();
    let first: ClientMessage<MigratorApiRequest> = decode(bytes)?;
    let again = encode(&first);
    let second: ClientMessage<MigratorApiRequest> =
        decode(&again).expect("an encoded request decodes");
    match (&first, &second) {
        (ClientMessage::Request(a), ClientMessage::Request(b)) => {
            assert_eq!(a.id, b.id, "the request id round-trips");
            assert_eq!(a.context.trace_context, b.context.trace_context);
            assert!(
                encode(&a.message) == encode(&b.message),
                "the call round-trips: {:?} came back as {:?}",
                a.message,
                b.message
            );
            assert!(
                b.context.deadline >= a.context.deadline
                    && b.context.deadline - a.context.deadline <= started.elapsed(),
                "the deadline round-trips"
            );
        }
        (ClientMessage::Cancel { .. }, ClientMessage::Cancel { .. }) => {
            assert!(encode(&second) == again, "a cancel round-trips");
        }
        _ => panic!("{first:?} came back as {second:?}"),
    }
    Ok(())
}

/// What a client reads. A decoded response encodes, and decodes again to the same response:
/// the same request id, and the same answer byte for byte, or a server error with the same
/// detail. Not its kind: tarpc writes the kind's number as an `i32` and reads it as a `u32`,
/// which postcard encodes differently (zigzag), so a kind comes back as another (refused
/// connection, 2, as aborted connection, 4). Our clients never read the kind.
fn response(bytes: &[u8]) -> io::Result<()> {
    let first: Response<MigratorApiResponse> = decode(bytes)?;
    let again = encode(&first);
    let second: Response<MigratorApiResponse> =
        decode(&again).expect("an encoded response decodes");
    assert_eq!(first.request_id, second.request_id);
    match (&first.message, &second.message) {
        (Ok(a), Ok(b)) => assert!(
            encode(a) == encode(b),
            "a response round-trips: {a:?} came back as {b:?}"
        ),
        (Err(a), Err(b)) => assert_eq!(a.detail, b.detail, "a server error round-trips"),
        (a, b) => panic!("{a:?} came back as {b:?}"),
    }
    Ok(())
}

/// Input: the bytes of a connection, cut into frames by the API's framing (each no larger than
/// [`MAX_FRAME`]); the whole input, and each frame, read as a request and as a response.
/// Accepted when something decodes.
pub fn api_codec(data: &[u8]) -> Result<(), FuzzError> {
    let mut frames = Vec::new();
    let mut stream = BytesMut::from(data);
    let mut framing = framing();
    while let Ok(Some(frame)) = framing.decode(&mut stream) {
        assert!(frame.len() <= MAX_FRAME, "a frame within the limit");
        frames.push(frame);
    }
    let mut refusal = None;
    let mut accepted = false;
    for body in std::iter::once(data).chain(frames.iter().map(|f| &f[..])) {
        for outcome in [request(body), response(body)] {
            match outcome {
                Ok(()) => accepted = true,
                Err(e) => refusal = Some(e),
            }
        }
    }
    match (accepted, refusal) {
        (false, Some(e)) => Err(FuzzError::Api(e)),
        _ => Ok(()),
    }
}
