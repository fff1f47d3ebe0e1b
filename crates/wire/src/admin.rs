//! The ECS protocol: what an operator (an `admin` certificate) asks the External
//! Configuration Service, and what it answers. Framed with the same codec as node traffic.
//!
//! The same protocol carries the Raft messages that the members of a replicated ECS send each
//! other ([`AdminRequest::Raft`], [`AdminReply::Raft`]), so one endpoint and one port serve
//! both. Those are accepted only from `ecs` certificates; this crate only carries their bytes
//! (it knows nothing of Raft), the ECS encodes and decodes them.

use serde::{Deserialize, Serialize};

use crate::gossip::Liveness;
use crate::message::NodeStatus;
use crate::ring::{KeyRange, NodeShare, RingMetadata};

/// An operator's request to the ECS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Add a running node to the ring; it takes an even share of the partitions from the
    /// most loaded nodes ([`crate::placement::join`]).
    AddNode {
        /// The node's name (its certificate name).
        name: String,
        /// Its advertised `host:port`.
        addr: String,
        /// Its failure domain (rack, host, availability zone), if any: copies of a
        /// partition are kept in distinct zones while the ring has enough of them.
        zone: Option<String>,
    },
    /// Remove a node from the ring, live or dead: its copies are rebuilt on the nodes that
    /// take its places in the chains (with replication 1 its partitions move from it to
    /// them, so it must be live).
    RemoveNode {
        /// The node's name.
        name: String,
    },
    /// The ECS's ring metadata.
    Ring,
    /// The ring plus every node's own report (reachability, version, keys, locks).
    Status,
    /// Make every node of the ring serve clients.
    Start,
    /// Make every node of the ring answer `Stopped` to clients.
    Stop,
    /// A Raft message from another ECS member (an `ecs` certificate only; any other role is
    /// refused with [`AdminReply::Error`]). Answered with [`AdminReply::Raft`].
    Raft(RaftRpc),
    /// The ECS group as the member asked sees it: answered by any member (leader or not)
    /// with [`AdminReply::Group`].
    Group,
    /// Add an ECS member to the group (leader only): it must be running with
    /// `--raft-id <id>` and no `--peers`; it catches up as a learner, then votes.
    AddEcsMember {
        /// Its Raft id, never used before in this group.
        id: u64,
        /// Its certificate's name.
        name: String,
        /// Its ECS address (`host:port`).
        addr: String,
    },
    /// Remove an ECS member from the group (leader only).
    RemoveEcsMember {
        /// Its Raft id.
        id: u64,
    },
    /// How far the membership change under way has come (answered by the leader, which
    /// runs it): [`AdminReply::Progress`].
    Progress,
}

/// A membership change under way, as far as it has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeReport {
    /// The change's number.
    pub change: u64,
    /// The ring version it commits.
    pub version: u64,
    /// `forward`, `committed` or `rolling back`.
    pub phase: String,
    /// The stage running, from 1, of `stages` (0 of 0 for a pending change no drive runs).
    pub stage: u32,
    /// Stages of the plan (forward or committed) or of its rollback (rolling back).
    pub stages: u32,
    /// What the running stage does (`transfer`, `lock`, `install`, ...).
    pub doing: String,
    /// Range copies of the change, and how many have sent their snapshot.
    pub copies: u32,
    /// See `copies`.
    pub copies_sent: u32,
    /// Entries and key + value bytes moved so far (snapshots and delta rounds).
    pub entries: u64,
    /// See `entries`.
    pub bytes: u64,
    /// Milliseconds since the change began.
    pub elapsed_ms: u64,
}

/// One member of the ECS group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// Its Raft id.
    pub id: u64,
    /// Its certificate's name.
    pub name: String,
    /// Its ECS address.
    pub addr: String,
    /// Whether it votes (a learner does not yet).
    pub voter: bool,
}

/// The ECS group as one member sees it (`ringkv-ecs status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    /// The member that answered.
    pub this: u64,
    /// The leader it knows of, if any.
    pub leader: Option<u64>,
    /// Its current Raft term.
    pub term: u64,
    /// The last log index it applied to the ECS state (its ring and intent log).
    pub applied: u64,
    /// Every member of the group.
    pub members: Vec<GroupMember>,
    /// The group's `failover_after` in milliseconds, which every leader uses whatever its
    /// own configuration says (0: not fixed yet, before the first leader took the lead).
    pub failover_after_ms: u64,
}

/// Which Raft request a [`RaftRpc`] carries: the payload decodes as that request only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRpcKind {
    /// A leader's log entries, or its heartbeat (no entries).
    AppendEntries,
    /// A candidate's request for a vote.
    Vote,
    /// One chunk of a leader's snapshot, for a member too far behind for log entries.
    InstallSnapshot,
}

/// A Raft request between ECS members: the postcard encoding of the Raft library's request of
/// `kind`. The bytes are opaque here, so the wire crate does not depend on the Raft library;
/// the receiving member decodes them as a `kind` request and nothing else, under the same
/// frame limit as every other message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftRpc {
    /// Which request the payload is.
    pub kind: RaftRpcKind,
    /// The postcard-encoded request.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A completed range move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveReport {
    /// The senders, each once, in the order of their first copy.
    pub from: Vec<String>,
    /// The receivers, each once, in the order of their first copy.
    pub to: Vec<String>,
    /// How many range copies the change made (one per run of partitions with the same
    /// source, receiver and head).
    pub copies: u32,
    /// Entries moved.
    pub entries: u64,
    /// Key + value bytes moved.
    pub bytes: u64,
    /// Time from the first write lock taken to the install of the new version at the last
    /// lock holder (which ends its lock), in milliseconds.
    pub locked_ms: u64,
    /// Time of the whole change, in milliseconds.
    pub total_ms: u64,
}

/// One node as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Name in the ring.
    pub name: String,
    /// Advertised address.
    pub addr: String,
    /// Its share of the ring under the ECS's metadata.
    pub share: NodeShare,
    /// What the node said about itself, if it answered.
    pub status: Option<NodeStatus>,
    /// Why it did not answer.
    pub error: Option<String>,
    /// How alive it is: `Alive` if it answered the ECS; otherwise the most alive view the
    /// answering nodes' gossip has of it; `None` if nobody knows.
    pub liveness: Option<Liveness>,
}

/// One ring range as `status` reports it: who replicates it and what is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeReport {
    /// The range.
    pub range: KeyRange,
    /// Its chain under the ECS's metadata, head first, tail last.
    pub chain: Vec<String>,
    /// Copies short of the replication factor (failed members not yet replaced).
    pub missing: u8,
}

/// The ECS's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminReply {
    /// The ring metadata.
    Ring(RingMetadata),
    /// A membership change completed: the new metadata and the move it needed, if any.
    Changed {
        /// The metadata now published.
        metadata: RingMetadata,
        /// The range move, if data had to move.
        moved: Option<MoveReport>,
    },
    /// The cluster status.
    Status {
        /// The ECS's metadata.
        metadata: RingMetadata,
        /// One report per node of the ring.
        nodes: Vec<NodeReport>,
        /// The runs of partitions short of copies (at most a few thousand, in ring order):
        /// each one's chain and how many copies it lacks. Empty when every range is whole.
        ranges: Vec<RangeReport>,
    },
    /// A request without a result completed.
    Done(String),
    /// The request failed; the message says why and what state it left.
    Error(String),
    /// The answer to an [`AdminRequest::Raft`]: the postcard encoding of the Raft library's
    /// result (its response, or its error) for the request's kind.
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The ECS group ([`AdminRequest::Group`]); `None` from a single ECS (no group).
    Group(Option<GroupReport>),
    /// This ECS member does not lead its group: ask the leader, at `leader` (`host:port`)
    /// if it knows one. Nothing was done.
    NotLeader {
        /// The leader's address, if known.
        leader: Option<String>,
    },
    /// The membership change under way, if any ([`AdminRequest::Progress`]).
    Progress(Option<ChangeReport>),
}
