//! The one framing loop on a stream, for the calling and the serving side alike.
//!
//! Invariant: the payload buffer grows with the bytes that actually arrived, never with the
//! length a header claims. A header over `max_frame` is refused before anything else is
//! read; a header under it reserves at most [`FIRST_CHUNK`] bytes, and the buffer then at
//! most doubles, up to the claimed length, as the payload arrives. So a peer that claims
//! 4 MiB and sends 10 bytes costs [`FIRST_CHUNK`] bytes, not 4 MiB, and the memory of a
//! frame being received is at most about twice what the peer sent (ARCHITECTURE.md §3).

use ringkv_wire::{codec, WireError, FRAME_HEADER_LEN};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// The buffer reserved for a payload before any of it arrived (or the whole payload, if
/// shorter). Most requests (gets, small puts, gossip) fit in it, so they cost one
/// allocation.
pub const FIRST_CHUNK: usize = 16 * 1024;

/// Why a frame could not be had from a stream.
#[derive(Debug)]
pub enum FrameError {
    /// The stream or connection failed, or ended before a whole frame arrived.
    Stream(String),
    /// The frame was over the limit or did not decode.
    Protocol(WireError),
}

/// Reads one frame (its header is checked against `max_frame` before the payload is
/// buffered, and the buffer grows only as the payload arrives) and decodes it.
///
/// Generic over the byte source so that decoders can be tested (and fuzzed) on plain byte
/// slices; on QUIC it reads a `quinn::RecvStream`.
pub async fn read_frame<A: DeserializeOwned, R: AsyncRead + Unpin>(
    recv: &mut R,
    max_frame: usize,
) -> Result<A, FrameError> {
    let stream = |e: std::io::Error| FrameError::Stream(e.to_string());
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(stream)?;
    let len = codec::frame_len(header, max_frame).map_err(FrameError::Protocol)?;
    let mut payload = Vec::with_capacity(len.min(FIRST_CHUNK));
    while payload.len() < len {
        if payload.len() == payload.capacity() {
            // Double, but never past the claimed length.
            let grow = payload.capacity().max(FIRST_CHUNK).min(len - payload.len());
            payload.reserve_exact(grow);
        }
        let room = (payload.capacity() - payload.len()).min(len - payload.len());
        let read = (&mut *recv)
            .take(room as u64)
            .read_buf(&mut payload)
            .await
            .map_err(stream)?;
        if read == 0 {
            return Err(FrameError::Stream(format!(
                "stream ended after {} of {len} payload bytes",
                payload.len()
            )));
        }
    }
    codec::decode(&payload).map_err(FrameError::Protocol)
}

/// [`read_frame`], given up at `deadline`: `Ok(None)` if the whole frame had not arrived by
/// then (whatever had arrived is dropped). The serving side reads every request this way,
/// so a stream that sends nothing, or trickles its frame, is cut off
/// (`ServeLimits::request_read_timeout`).
pub async fn read_frame_until<A: DeserializeOwned, R: AsyncRead + Unpin>(
    recv: &mut R,
    max_frame: usize,
    deadline: Instant,
) -> Result<Option<A>, FrameError> {
    match tokio::time::timeout_at(deadline, read_frame(recv, max_frame)).await {
        Ok(frame) => frame.map(Some),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(msg: &str) -> Vec<u8> {
        codec::encode(&msg.to_string(), 1 << 20).unwrap()
    }

    #[tokio::test]
    async fn reads_a_frame_from_a_byte_slice_and_leaves_the_rest() {
        let mut bytes = frame("hello");
        bytes.extend_from_slice(&frame("world"));
        let mut slice = &bytes[..];
        let a: String = read_frame(&mut slice, 1 << 20).await.unwrap();
        let b: String = read_frame(&mut slice, 1 << 20).await.unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("hello", "world"));
        assert!(slice.is_empty());
    }

    #[tokio::test]
    async fn a_large_frame_arriving_in_pieces_decodes() {
        let big = "x".repeat(3 * FIRST_CHUNK + 17);
        let bytes = frame(&big);
        let (mut tx, mut rx) = tokio::io::duplex(1000);
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(777) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let got: String = read_frame(&mut rx, 1 << 20).await.unwrap();
        assert_eq!(got, big);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_before_its_payload_is_read() {
        let mut bytes = 1001u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"rest");
        let mut slice = &bytes[..];
        let e = read_frame::<String, _>(&mut slice, 1000).await.unwrap_err();
        assert!(
            matches!(e, FrameError::Protocol(WireError::FrameTooLarge { .. })),
            "{e:?}"
        );
        assert_eq!(slice, b"rest", "nothing past the header was read");
    }

    #[tokio::test]
    async fn a_stream_that_ends_early_is_a_stream_error() {
        let mut bytes = 100u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let e = read_frame::<String, _>(&mut &bytes[..], 1000)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FrameError::Stream(m) if m.contains("3 of 100")),
            "{e:?}"
        );
        let e = read_frame::<String, _>(&mut &b"ab"[..], 1000)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Stream(_)), "{e:?}");
    }

    #[tokio::test]
    async fn garbage_of_the_claimed_length_is_a_protocol_error() {
        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let e = read_frame::<String, _>(&mut &bytes[..], 1000)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Protocol(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_silent_or_trickling_stream_is_given_up_at_the_deadline() {
        // Nothing at all.
        let (_tx, mut rx) = tokio::io::duplex(64);
        let started = Instant::now();
        let deadline = started + Duration::from_millis(150);
        let got = read_frame_until::<String, _>(&mut rx, 1 << 20, deadline).await;
        assert!(matches!(got, Ok(None)), "{got:?}");
        assert!(started.elapsed() >= Duration::from_millis(150));

        // A header, then one byte every 20 ms: never whole by the deadline.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tx.write_all(&1000u32.to_le_bytes()).await.unwrap();
        let trickle = tokio::spawn(async move {
            while tx.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let deadline = Instant::now() + Duration::from_millis(200);
        let got = read_frame_until::<String, _>(&mut rx, 1 << 20, deadline).await;
        assert!(matches!(got, Ok(None)), "{got:?}");
        drop(rx);
        trickle.await.unwrap();

        // A whole frame in time is returned.
        let bytes = frame("in time");
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = read_frame_until::<String, _>(&mut &bytes[..], 1 << 20, deadline).await;
        assert_eq!(got.unwrap().as_deref(), Some("in time"));
    }
}
