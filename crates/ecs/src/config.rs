//! ECS configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;

use ringkv_transport::ServeLimits;

use crate::raft::{Member, MemberId, RaftConfig};
use crate::EcsError;

/// Default bound on one range copy: 15 minutes, ~90 GB at the ~100 MB/s a move measured on
/// loopback (README, performance).
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(900);

/// Default replication factor of a new ring.
pub const DEFAULT_REPLICATION: u8 = 3;
/// Default time after which a node that answers no probe is failed over.
pub const DEFAULT_FAILOVER_AFTER: Duration = Duration::from_secs(3);
/// Default interval between liveness probes (and lease renewals).
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Default bound on the leader's probes per second: about a third of one core at the
/// ~60 µs of ECS CPU a probe costs (`ringkv-bench lease-scale`, ARCHITECTURE.md §11).
pub const DEFAULT_MAX_PROBE_RATE: u32 = 6_000;
/// Default bound on the steps of a change one node takes part in at once: two range copies
/// per node keep its disk and the link busy while one of them waits for a batch's fsync.
pub const DEFAULT_STEPS_PER_NODE: usize = 2;

/// A function the executor calls just before it sends each step of a change to its node,
/// with the step: for observing a change (metrics, logs) and for tests that inject a fault
/// at an exact step. It runs on the ECS's runtime thread and must not block for long.
#[derive(Clone)]
pub struct StepHook(pub std::sync::Arc<dyn Fn(&crate::plan::Step) + Send + Sync>);

impl std::fmt::Debug for StepHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepHook")
    }
}

/// How the ECS runs.
#[derive(Debug, Clone)]
pub struct EcsConfig {
    /// UDP address to listen on for operators.
    pub listen: SocketAddr,
    /// Directory of the ECS's persisted ring.
    pub state_dir: PathBuf,
    /// Timeout of a short request to a node (lock, install, status, ...).
    pub node_timeout: Duration,
    /// Timeout of one whole range copy (`TransferRange` or `TransferDelta`): set it above
    /// the largest range's size divided by the transfer rate.
    pub transfer_timeout: Duration,
    /// How long a change retries steps that must eventually succeed (after its commit, or
    /// the aborts of a rollback) before the operator's request returns `Pending`; the ECS
    /// keeps retrying in the background.
    pub retry_budget: Duration,
    /// Called before each step of a change is sent (see [`StepHook`]).
    pub before_step: Option<StepHook>,
    /// How long `status` waits for each node (all are asked at once); a node that has not
    /// answered by then is reported from its peers' gossip views.
    pub status_timeout: Duration,
    /// Copies of every key in a ring this ECS creates (1..=7; 1: no replication). A ring
    /// keeps the factor it was created with.
    pub replication: u8,
    /// A node whose liveness probes have all failed for this long is declared failed and
    /// replaced in its chains (with replication above 1). Shorter fails over sooner; too
    /// short fails over nodes that were only slow (README, "Replication and failover"). A
    /// group uses its first leader's value, kept in its replicated state
    /// ([`crate::Ecs::failover_after`]).
    pub failover_after: Duration,
    /// How often the ECS probes every node; each probe also renews the node's lease (half of
    /// `failover_after`).
    pub probe_interval: Duration,
    /// The most probes per second the leader sends: in a ring of more than
    /// `max_probe_rate × probe_interval` live nodes the interval stretches to keep to it, up
    /// to a quarter of `failover_after` (two renewals per lease), past which the rate grows
    /// with the ring ([`crate::liveness::probe_interval`]).
    pub max_probe_rate: u32,
    /// What peers may make the ECS hold: connections, streams and windows by role, the
    /// request read deadline, the idle timeout (ARCHITECTURE.md §3). Only `admin`
    /// certificates are admitted at all.
    pub serve: ServeLimits,
    /// The founding members of a replicated ECS group, `(certificate name, host:port)`, the
    /// same list in the same order on every founding member: member `i` (from 1) is the
    /// `i`th. Empty (the default): a single ECS with its state in files, unless `raft_id`
    /// is set.
    pub peers: Vec<(String, String)>,
    /// This member's Raft id: by default its place in `peers` (found by its certificate
    /// name). Set alone (no `peers`) for a member that joins an existing group: it waits
    /// until the leader adds it (`ringkv-ecs add-ecs-member`).
    pub raft_id: Option<u64>,
    /// The most steps of a change a node takes part in at once (a stage of a plan runs its
    /// steps together, [`crate::plan::Plan::stages`]): a node sends or receives at most this
    /// many range copies at a time. 1 runs a node's steps one after another.
    pub steps_per_node: usize,
}

impl EcsConfig {
    /// A configuration with default timeouts (5 s per request, [`DEFAULT_TRANSFER_TIMEOUT`]
    /// per transfer, 2 s per node for `status`).
    pub fn new(listen: SocketAddr, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            state_dir: state_dir.into(),
            node_timeout: Duration::from_secs(5),
            transfer_timeout: DEFAULT_TRANSFER_TIMEOUT,
            status_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_secs(30),
            before_step: None,
            serve: ServeLimits::default(),
            replication: DEFAULT_REPLICATION,
            failover_after: DEFAULT_FAILOVER_AFTER,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            max_probe_rate: DEFAULT_MAX_PROBE_RATE,
            peers: Vec::new(),
            raft_id: None,
            steps_per_node: DEFAULT_STEPS_PER_NODE,
        }
    }

    /// The Raft configuration of this member (whose certificate is called `name`), or
    /// `None` for a single ECS.
    pub fn group(&self, name: &str) -> Result<Option<RaftConfig>, EcsError> {
        if self.peers.is_empty() && self.raft_id.is_none() {
            return Ok(None);
        }
        let members: BTreeMap<MemberId, Member> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, (name, addr))| (i as MemberId + 1, Member::new(addr, name)))
            .collect();
        let id = match self.raft_id {
            Some(id) => id,
            None => members
                .iter()
                .find(|(_, m)| m.name == name)
                .map(|(id, _)| *id)
                .ok_or_else(|| {
                    EcsError::Config(format!(
                        "this ECS's certificate is {name}, which is not in --peers; give --raft-id to join a group"
                    ))
                })?,
        };
        Ok(Some(RaftConfig::new(id, members, self.state_dir.clone())))
    }
}
