//! Gossip: metadata dissemination and failure detection among nodes (ARCHITECTURE.md §6). The
//! algorithm, its parameters and the simulation that checks them are written up in
//! `GOSSIP.md` at the repository root.
//!
//! - [`state`]: [`GossipState`], the synchronous state machine (no network; time and
//!   randomness passed in).
//! - [`driver`]: the tokio task that runs it every interval over the node's transport.
//! - `sim` (tests only): a deterministic simulation of thousands of nodes over an in-memory
//!   network that still serializes every message with the real codec.
//! - [`GossipConfig`] (the `ringkv-node` flags that set it live with the binary).

pub mod driver;
#[cfg(test)]
mod sim;
pub mod state;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use state::{GossipState, Membership, ReplyOutcome};

/// For the state machine's tests and the simulation, which exercise gossip, not signatures: a
/// membership whose "signed" form carries an empty signature (opened with a verifier that
/// accepts anything). Real nodes only ever hold metadata their ring authority verified.
#[cfg(test)]
pub(crate) fn stand_in_membership(metadata: ringkv_wire::RingMetadata) -> Membership {
    let signed = ringkv_wire::SignedMetadata::sign(&metadata, |_| Ok(Default::default()))
        .expect("a valid ring");
    Membership::new(std::sync::Arc::new(metadata), Some(signed))
}

/// Gossip parameters. See `GOSSIP.md` for how they relate: `suspect_after` must exceed the
/// time a heartbeat needs to reach every node (a few intervals for rings up to a few
/// hundred nodes), and `dead_after` must exceed `suspect_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// `T`: how often the node starts exchanges (and advances its heartbeat).
    pub interval: Duration,
    /// `k`: peers contacted per interval.
    pub fanout: usize,
    /// A peer whose heartbeat has not advanced for this long is suspected.
    pub suspect_after: Duration,
    /// A peer whose heartbeat has not advanced for this long is dead.
    pub dead_after: Duration,
    /// Most other nodes' heartbeats in one digest (the bound on its size). Rings up to this
    /// size (plus one) send every heartbeat in every digest.
    pub max_heartbeats: usize,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
            fanout: DEFAULT_FANOUT,
            suspect_after: Duration::from_millis(DEFAULT_SUSPECT_MS),
            dead_after: Duration::from_millis(DEFAULT_DEAD_MS),
            max_heartbeats: DEFAULT_MAX_HEARTBEATS,
        }
    }
}

impl GossipConfig {
    /// How long one exchange may take before the driver gives up on it: the interval,
    /// at least 200 ms and at most 1 s.
    pub fn exchange_timeout(&self) -> Duration {
        self.interval
            .clamp(Duration::from_millis(200), Duration::from_secs(1))
    }
}

/// Default gossip interval `T`, in milliseconds.
pub const DEFAULT_INTERVAL_MS: u64 = 200;
/// Default fanout `k`.
pub const DEFAULT_FANOUT: usize = 3;
/// Default suspect timeout, in milliseconds.
pub const DEFAULT_SUSPECT_MS: u64 = 2_000;
/// Default dead timeout, in milliseconds.
pub const DEFAULT_DEAD_MS: u64 = 10_000;
/// Default bound on other nodes' heartbeats per digest.
pub const DEFAULT_MAX_HEARTBEATS: usize = 128;

/// The first heartbeat counter of a node starting now: the wall-clock time in
/// milliseconds. A node beats at most once per millisecond, so a restarted node starts
/// above any counter it sent before, unless the clock stepped back by more than its
/// downtime (and even then peers that see a higher counter of it tell it so, see
/// [`GossipState`]'s merge).
pub fn first_heartbeat() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}
