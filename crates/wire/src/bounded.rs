//! Sequences with a bounded element count, for the `Vec` fields of messages whose elements
//! are much larger in memory than on the wire.
//!
//! A frame is at most `max_frame` bytes, but a sequence of tiny elements expands when decoded:
//! a `PutBatch` of 4-byte empty entries becomes 72-byte `StorageEntry`s, and the vector's
//! growth doubles that again (a 4 MiB frame of the 2-byte entries of the time before
//! versions: 128 MiB in one allocation, 192 MiB live, before any permission check). Capping the count bounds the expansion whatever the frame holds:
//! the count announced in the frame is checked before anything is allocated, and the vector
//! never grows past the cap.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

/// Most entries in one `PutBatch` or `ReplicateBatch` (transfer batches are cut at this count
/// as well as at their byte size): 32,768 `StorageEntry`s are 2.25 MiB in memory, 32,768
/// `ChainWrite`s 2.75 MiB, both under a frame's 4 MiB.
pub const MAX_BATCH_ENTRIES: usize = 32_768;

/// Most keys in one client batch (`GetMany`, `PutMany`, `DeleteMany`): the node refuses a
/// larger one whole (`BatchTooLarge`, with a message saying so), and the client cuts larger
/// batches into requests of at most this many keys. (Decoding stops a batch at
/// [`MAX_BATCH_ENTRIES`], which bounds its memory.)
pub const MAX_BATCH_KEYS: usize = 1024;

/// Most certificates in a metadata signer's chain (leaf and intermediates).
pub const MAX_SIGNER_CHAIN: usize = 8;

/// A `Vec<T>` of at most `max` elements, refused as soon as the announced length (or the
/// elements read) exceed it.
pub(crate) fn vec<'de, D, T>(d: D, max: usize, what: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T> {
        max: usize,
        what: &'static str,
        element: PhantomData<T>,
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {} {}", self.max, self.what)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let announced = seq.size_hint().unwrap_or(0);
            if announced > self.max {
                return Err(A::Error::invalid_length(announced, &self));
            }
            let mut out = Vec::with_capacity(announced);
            while let Some(element) = seq.next_element()? {
                if out.len() == self.max {
                    return Err(A::Error::invalid_length(out.len() + 1, &self));
                }
                out.push(element);
            }
            Ok(out)
        }
    }

    d.deserialize_seq(Bounded {
        max,
        what,
        element: PhantomData,
    })
}

/// `PutBatch::entries`, `ReplicateBatch::writes` and the keys of a client batch: at most
/// [`MAX_BATCH_ENTRIES`].
pub(crate) fn batch_entries<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    vec(d, MAX_BATCH_ENTRIES, "batch entries")
}

/// `GossipDigest::heartbeats`: at most one per ring node ([`crate::ring::MAX_RING_NODES`]).
pub(crate) fn heartbeats<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    vec(d, crate::ring::MAX_RING_NODES, "heartbeats")
}

/// `MetadataSignature::signer`: at most [`MAX_SIGNER_CHAIN`] certificates.
pub(crate) fn signer_chain<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    vec(d, MAX_SIGNER_CHAIN, "signer certificates")
}

thread_local! {
    /// Whether this thread is decoding the body of a `Fenced` request right now.
    static IN_FENCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `RequestBody::Fenced::body`: any request but another `Fenced`, refused as soon as the
/// nested envelope's tag is read. `Fenced` is the one recursive request, and decoding
/// recurses on the thread's stack: unbounded, a 4 MiB frame of nested envelopes (two or
/// three bytes each) would overflow it. Decoding is synchronous and depth-first, so a
/// `Fenced` met while this thread is inside a `Fenced` body is nested in it.
pub(crate) fn unfenced_body<'de, D, T>(d: D) -> Result<Box<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    /// Leaves the body, whether it decoded or not.
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            IN_FENCED.with(|inside| inside.set(false));
        }
    }
    if IN_FENCED.with(|inside| inside.replace(true)) {
        // The outer body's `Leave` resets the flag.
        return Err(D::Error::custom(
            "a fenced request may not carry another fenced request",
        ));
    }
    let _leave = Leave;
    T::deserialize(d).map(Box::new)
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use crate::codec;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Three(#[serde(deserialize_with = "three")] Vec<u8>);

    fn three<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        super::vec(d, 3, "bytes")
    }

    #[test]
    fn at_most_the_cap_decodes() {
        for n in 0..=3 {
            let frame = codec::encode(&Three(vec![7; n]), 1 << 20).unwrap();
            let back: Three = codec::decode(&frame[codec::FRAME_HEADER_LEN..]).unwrap();
            assert_eq!(back, Three(vec![7; n]));
        }
        let frame = codec::encode(&Three(vec![7; 4]), 1 << 20).unwrap();
        // (postcard reports every serde error alike; the node answers `Malformed`.)
        let refused = codec::decode::<Three>(&frame[codec::FRAME_HEADER_LEN..]).unwrap_err();
        assert!(
            matches!(refused, crate::WireError::Malformed(_)),
            "{refused}"
        );
    }
}
