//! Framing: a `u32` little-endian payload length, then a postcard-encoded message.
//!
//! The length is checked against the caller's maximum from the 4-byte header alone
//! ([`frame_len`]), so a peer claiming a 4 GiB frame is refused before a byte of payload is
//! buffered. A payload that does not decode is [`WireError::Malformed`], distinct from an
//! incomplete buffer (`Ok(None)` from [`decode_frame`]).

use serde::{de::DeserializeOwned, Serialize};

use crate::WireError;

/// Length of the frame header (the little-endian `u32` payload length).
pub const FRAME_HEADER_LEN: usize = 4;

/// Encodes `msg` as one complete frame (header + payload).
///
/// Fails with [`WireError::FrameTooLarge`] if the payload would exceed `max_frame`.
pub fn encode<T: Serialize>(msg: &T, max_frame: usize) -> Result<Vec<u8>, WireError> {
    let mut buf = postcard::serialize_with_flavor(msg, FrameBuf(vec![0u8; FRAME_HEADER_LEN]))
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = buf.len() - FRAME_HEADER_LEN;
    if len > max_frame || len > u32::MAX as usize {
        return Err(WireError::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    buf[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// The output of [`encode`]: a `Vec` that byte strings are appended to with one
/// `extend_from_slice` (postcard's `to_extend` copies them byte by byte, which costs
/// seconds for large metadata in unoptimised test builds).
struct FrameBuf(Vec<u8>);

impl postcard::ser_flavors::Flavor for FrameBuf {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Reads the payload length from a frame header and checks it against `max_frame`.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max_frame: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max_frame {
        return Err(WireError::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    Ok(len)
}

/// Decodes one message from a complete payload (without the header). Trailing bytes are an
/// error: a frame holds exactly one message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Parses one frame from the front of `buf`.
///
/// Returns `Ok(None)` if `buf` does not yet hold a whole frame (read more and call again),
/// `Ok(Some((msg, consumed)))` for a complete frame, or an error for an oversized header or
/// an undecodable payload.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max_frame: usize,
) -> Result<Option<(T, usize)>, WireError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let len = frame_len(header.try_into().expect("4-byte slice"), max_frame)?;
    let Some(payload) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode(payload)?, FRAME_HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Reply, ReplyBody, Request, RequestBody};

    #[test]
    fn round_trip_frame() {
        let req = Request::new(7, RequestBody::Get { key: b"k".to_vec() });
        let frame = encode(&req, 1024).unwrap();
        let (back, used): (Request, usize) = decode_frame(&frame, 1024).unwrap().unwrap();
        assert_eq!(back, req);
        assert_eq!(used, frame.len());
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let frame = encode(&Reply::new(1, ReplyBody::NotFound), 1024).unwrap();
        for cut in 0..frame.len() {
            assert_eq!(decode_frame::<Reply>(&frame[..cut], 1024), Ok(None));
        }
    }

    #[test]
    fn oversized_header_refused_before_payload() {
        let header = u32::MAX.to_le_bytes();
        assert_eq!(
            frame_len(header, 1 << 20),
            Err(WireError::FrameTooLarge {
                len: u32::MAX as usize,
                max: 1 << 20
            })
        );
        // Only the header is present: still refused, nothing else is needed to decide.
        assert!(matches!(
            decode_frame::<Request>(&header, 1 << 20),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn encoder_refuses_oversized() {
        let req = Request::new(
            0,
            RequestBody::Put {
                key: b"k".to_vec(),
                value: vec![0; 100],
            },
        );
        assert!(matches!(
            encode(&req, 50),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = encode(&Reply::new(1, ReplyBody::Deleted), 1024).unwrap();
        frame.push(0);
        let len = (frame.len() - FRAME_HEADER_LEN) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_frame::<Reply>(&frame, 1024),
            Err(WireError::Malformed(_))
        ));
    }
}
