//! Node configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ringkv_transport::{RingSigner, ServeLimits};
use ringkv_wire::Limits;

use crate::gossip::GossipConfig;

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's name: its certificate name and its name in the ring.
    pub name: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The `host:port` clients and peers dial; the node's ring position is its SHA-1.
    /// Must match a SAN of the node certificate.
    pub advertise: String,
    /// Directory of the storage engine's files.
    pub data_dir: PathBuf,
    /// Serve clients at once, bootstrapping a one-node ring if the node has no metadata
    /// (standalone mode, which needs [`NodeConfig::standalone_signer`]). Without it the node
    /// waits for the ECS.
    pub start: bool,
    /// Standalone mode only: the `ecs`-role key that signs the node's one-node ring, since
    /// no client or peer accepts metadata the ECS did not sign. A node in a cluster has none:
    /// its ring comes from the ECS.
    pub standalone_signer: Option<Arc<RingSigner>>,
    /// Key/value/frame limits.
    pub limits: Limits,
    /// Size of the batches a range transfer sends.
    pub transfer_batch_bytes: usize,
    /// Most bytes per second a range snapshot sends (`None`: as fast as the link and the
    /// receiver's disk allow), so that a move does not starve client traffic. The delta,
    /// sent while the range is write-locked, is never throttled.
    pub transfer_rate_limit: Option<u64>,
    /// Gossip interval, fanout, failure-detection timeouts, digest bound.
    pub gossip: GossipConfig,
    /// What peers may make the node hold: connections, streams and windows by role, the
    /// request read deadline, the idle timeout (ARCHITECTURE.md §3).
    pub serve: ServeLimits,
    /// Write jobs queued to (or being committed by) the storage writer at once; a write
    /// waits for room beyond that, bounded by its client's request timeout
    /// ([`crate::storage::DEFAULT_MAX_QUEUED_WRITES`] by default).
    pub max_queued_writes: usize,
    /// The fewest live copies a key's range must have for this node, as its head, to take a
    /// write of it (Kafka's `min.insync.replicas`): a write to a chain shorter than this is
    /// refused (`NotEnoughCopies`, nothing applied) rather than acknowledged on fewer nodes.
    /// 1 (the default) takes writes while any copy is live. Reads are served either way.
    pub min_copies: u8,
    /// The most this node's wall clock may be off from any other node's: a node serving a
    /// read of a record within this of its expiry (by its own clock) asks the key's head,
    /// whose clock decides expiry (ARCHITECTURE.md §11 "Expiry"). Default
    /// [`DEFAULT_MAX_CLOCK_OFFSET`].
    pub max_clock_offset: std::time::Duration,
}

/// Default of [`NodeConfig::max_clock_offset`]: 500 ms (CockroachDB's default, for hosts
/// whose clocks NTP keeps within a few ms of each other).
pub const DEFAULT_MAX_CLOCK_OFFSET: std::time::Duration = std::time::Duration::from_millis(500);

impl NodeConfig {
    /// A configuration with default limits and gossip, advertising the listen address.
    pub fn new(name: impl Into<String>, listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            listen,
            advertise: listen.to_string(),
            data_dir: data_dir.into(),
            start: false,
            standalone_signer: None,
            limits: Limits::default(),
            transfer_batch_bytes: 1 << 20,
            transfer_rate_limit: None,
            gossip: GossipConfig::default(),
            serve: ServeLimits::default(),
            max_queued_writes: crate::storage::DEFAULT_MAX_QUEUED_WRITES,
            min_copies: 1,
            max_clock_offset: DEFAULT_MAX_CLOCK_OFFSET,
        }
    }
}
