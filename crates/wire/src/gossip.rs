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
//! metadata travels only when versions differ, as the [`crate::SignedMetadata`] the ECS
//! made: forwarded byte for byte, verified and decoded only by a node about to adopt it.

use serde::{Deserialize, Serialize};

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
    /// this exchange. At most one per ring node ([`crate::ring::MAX_RING_NODES`]).
    #[serde(deserialize_with = "crate::bounded::heartbeats")]
    pub heartbeats: Vec<Heartbeat>,
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

    #[test]
    fn liveness_orders_from_alive_to_dead() {
        assert!(Liveness::Alive < Liveness::Suspected && Liveness::Suspected < Liveness::Dead);
        assert_eq!(Liveness::Suspected.to_string(), "suspected");
    }
}
