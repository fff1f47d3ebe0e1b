//! The one framing loop on a QUIC stream, for the calling and the serving side alike.

use quinn::RecvStream;
use ringkv_wire::{codec, WireError, FRAME_HEADER_LEN};
use serde::de::DeserializeOwned;

/// Why a frame could not be had from a stream.
#[derive(Debug)]
pub enum FrameError {
    /// The stream or connection failed, or ended before a whole frame arrived.
    Stream(String),
    /// The frame was over the limit or did not decode.
    Protocol(WireError),
}

/// Reads one frame (its header is checked against `max_frame` before the payload is
/// buffered) and decodes it.
pub async fn read_frame<A: DeserializeOwned>(
    recv: &mut RecvStream,
    max_frame: usize,
) -> Result<A, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    let len = codec::frame_len(header, max_frame).map_err(FrameError::Protocol)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    codec::decode(&payload).map_err(FrameError::Protocol)
}
