//! What nodes gossip (ARCHITECTURE.md §6; the algorithm is in `GOSSIP.md`).
//!
//! An exchange is push-pull over one request and its reply, plus a third message when the
//! initiator turns out to hold the newer metadata:
//!
//! 1. `A → B`: `Gossip { digest }`, A's [`GossipDigest`].
//! 2. `B → A`: `Gossip { digest, metadata }`, B's digest, plus B's metadata if it is newer
//!    than the version in A's digest.
//! 3. `A → B`: `GossipPush { metadata }`, only if B's digest showed an older version.
//!
//! A digest is bounded: a version, the sender's own heartbeat and at most a configured
//! number of other nodes' heartbeats, so its size does not grow with the cluster. The full
//! metadata travels only when versions differ, as an [`EncodedMetadata`]: encoded once by
//! the node that adopted it, forwarded byte for byte, decoded only by a node about to adopt
//! it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ring::RingMetadata;
use crate::WireError;

/// One node's heartbeat counter as another node last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node's index in the `nodes` of the metadata version the digest names (the same
    /// list at every node holding that version, so an index is as good as a name and far
    /// smaller).
    pub node: u32,
    /// Its heartbeat counter. Counters only grow: a node starts its counter at its wall-clock
    /// start time in milliseconds and adds one per gossip interval.
    pub counter: u64,
}

/// A bounded summary of what a node knows: its metadata version and some heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipDigest {
    /// The sender's name in the ring.
    pub from: String,
    /// The metadata version the sender holds.
    pub metadata_version: u64,
    /// The sender's own heartbeat counter.
    pub heartbeat: u64,
    /// Other nodes' counters, indexed under `metadata_version`. A receiver holding another
    /// version ignores them (its indices mean other nodes); the versions agree again after
    /// this exchange.
    pub heartbeats: Vec<Heartbeat>,
}

/// Ring metadata in its encoded form (a postcard frame of a [`RingMetadata`]), with its
/// version readable without decoding it. Cloning shares the bytes: a node hands the same
/// encoded metadata to every peer that needs it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedMetadata {
    /// The version of the metadata inside.
    pub version: u64,
    /// The encoded [`RingMetadata`].
    #[serde(with = "shared_bytes")]
    pub bytes: Arc<Vec<u8>>,
}

/// Serde for `Arc<Vec<u8>>` as a byte string (as `serde_bytes` does for `Vec<u8>`).
mod shared_bytes {
    use std::sync::Arc;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Arc<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(bytes.as_slice(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<u8>>, D::Error> {
        serde_bytes::deserialize::<Vec<u8>, D>(d).map(Arc::new)
    }
}

impl std::fmt::Debug for EncodedMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EncodedMetadata(v{}, {} bytes)",
            self.version,
            self.bytes.len()
        )
    }
}

impl EncodedMetadata {
    /// Encodes `metadata`.
    pub fn encode(metadata: &RingMetadata) -> Result<Self, WireError> {
        Ok(Self {
            version: metadata.version,
            bytes: Arc::new(metadata.to_frame()?),
        })
    }

    /// Decodes the metadata ([`RingMetadata::from_frame`]: one frame, fully validated) and
    /// checks that its version is the announced one.
    pub fn decode(&self) -> Result<RingMetadata, WireError> {
        let metadata = RingMetadata::from_frame(&self.bytes)?;
        if metadata.version != self.version {
            return Err(WireError::Malformed(format!(
                "encoded metadata announced version {} but holds version {}",
                self.version, metadata.version
            )));
        }
        Ok(metadata)
    }
}

/// How alive a node seems to another, from its heartbeat counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Liveness {
    /// Its counter advanced within the suspect timeout.
    Alive,
    /// Its counter has not advanced for the suspect timeout.
    Suspected,
    /// Its counter has not advanced for the (longer) dead timeout.
    Dead,
}

impl Liveness {
    /// `alive`, `suspected` or `dead`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspected => "suspected",
            Liveness::Dead => "dead",
        }
    }
}

impl std::fmt::Display for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node's view of a peer, reported in [`crate::NodeStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLiveness {
    /// The peer's name.
    pub name: String,
    /// How alive it seems.
    pub liveness: Liveness,
    /// The highest heartbeat counter seen from it.
    pub heartbeat: u64,
    /// Milliseconds since that counter last advanced.
    pub silent_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeEntry;

    #[test]
    fn encoded_metadata_round_trips_and_checks_what_it_holds() {
        let md = RingMetadata::new(
            4,
            vec![NodeEntry::new("a", "h:1"), NodeEntry::new("b", "h:2")],
        )
        .unwrap();
        let enc = EncodedMetadata::encode(&md).unwrap();
        assert_eq!(enc.version, 4);
        assert_eq!(enc.decode().unwrap(), md);

        let mut lying = enc.clone();
        lying.version = 5;
        assert!(matches!(lying.decode(), Err(WireError::Malformed(_))));

        let mut truncated = enc.clone();
        Arc::make_mut(&mut truncated.bytes).pop();
        assert!(truncated.decode().is_err());

        let mut unsorted = md.clone();
        unsorted.nodes.reverse();
        let enc = EncodedMetadata::encode(&unsorted).unwrap();
        assert!(matches!(enc.decode(), Err(WireError::InvalidRing(_))));
    }

    #[test]
    fn liveness_orders_from_alive_to_dead() {
        assert!(Liveness::Alive < Liveness::Suspected && Liveness::Suspected < Liveness::Dead);
        assert_eq!(Liveness::Suspected.to_string(), "suspected");
    }
}
