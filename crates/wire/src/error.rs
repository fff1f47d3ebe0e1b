//! The error type of the wire crate.

use crate::ErrorKind;

/// Everything that can go wrong while encoding, decoding or validating protocol data.
///
/// None of these leave any state behind: the codec and the validators are pure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A reply of `bytes` was not sent: the replies its connection (or the server) holds
    /// unread would then exceed `budget` bytes. The peer is not reading its replies.
    #[error("reply of {bytes} bytes not sent: unread replies would exceed the budget of {budget} bytes; read replies before asking for more")]
    ReplyBudget {
        /// The reply's encoded size.
        bytes: usize,
        /// The budget it would have exceeded.
        budget: usize,
    },
    /// A frame header announced (or an encoder produced) a payload larger than the
    /// configured maximum. Detected from the 4-byte header alone, before any buffering.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced or produced payload length.
        len: usize,
        /// Configured maximum payload length.
        max: usize,
    },
    /// The payload did not decode as the expected message (garbage, truncation or a
    /// message from an incompatible protocol version).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The key is empty; ringkv keys are 1..=max bytes.
    #[error("key is empty")]
    EmptyKey,
    /// The key is longer than the configured maximum.
    #[error("key of {len} bytes exceeds the maximum of {max} bytes")]
    KeyTooLarge {
        /// Length of the offending key.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The value is longer than the configured maximum.
    #[error("value of {len} bytes exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// Length of the offending value.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// Ring metadata would hold two nodes with the same name, address or position.
    #[error("node {0} is already in the ring (same name, address or position)")]
    DuplicateNode(String),
    /// A ring operation named a node the metadata does not hold.
    #[error("node {0} is not in the ring")]
    UnknownNode(String),
    /// Ring metadata breaks a structural invariant (see `RingMetadata::validate`).
    #[error("invalid ring metadata: {0}")]
    InvalidRing(String),
    /// Ring metadata whose ECS signature is missing or did not verify (see
    /// `SignedMetadata::open`).
    #[error("unauthenticated ring metadata: {0}")]
    Unauthenticated(String),
    /// A scan page size outside `1..=MAX_SCAN_PAGE`.
    #[error("a scan page holds 1 to {max} keys, not {asked}; nothing was done")]
    PageSize {
        /// The size asked for.
        asked: u64,
        /// The most a page holds.
        max: u32,
    },
    /// Signed metadata whose encoding would exceed `crate::MAX_SIGNED_METADATA` (see
    /// `SignedMetadata::open`): it would not fit the messages that carry it on.
    #[error("signed metadata of up to {len} bytes, more than the maximum of {max}")]
    MetadataTooLarge {
        /// Its encoded length (an upper bound).
        len: usize,
        /// The maximum.
        max: usize,
    },
}

impl WireError {
    /// The [`ErrorKind`] an error reply carries for this error: the one mapping from
    /// validation failures to what a peer is told.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WireError::EmptyKey => ErrorKind::EmptyKey,
            WireError::KeyTooLarge { .. } => ErrorKind::KeyTooLarge,
            WireError::ValueTooLarge { .. } => ErrorKind::ValueTooLarge,
            WireError::FrameTooLarge { .. } => ErrorKind::FrameTooLarge,
            WireError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            WireError::ReplyBudget { .. } => ErrorKind::InvalidState,
            WireError::PageSize { .. } => ErrorKind::BatchTooLarge,
            WireError::Malformed(_)
            | WireError::DuplicateNode(_)
            | WireError::UnknownNode(_)
            | WireError::InvalidRing(_)
            | WireError::MetadataTooLarge { .. } => ErrorKind::Malformed,
        }
    }
}
