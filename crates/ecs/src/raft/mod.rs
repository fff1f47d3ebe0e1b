//! The foundation of a highly available ECS: the ECS's durable state (its ring and its intent
//! log, [`crate::state`]) replicated by Raft ([openraft] 0.9) among a few ECS members, so
//! that the group keeps deciding membership changes while a minority of members is down.
//!
//! What is replicated is the state machine [`EcsState`] (the ring metadata and the intent
//! log), changed only by [`EcsCommand`]s that the leader proposes ([`EcsRaft::propose`]) and
//! that every member applies in log order. What each member keeps on disk, in its state
//! directory, is its Raft log, its vote and that state ([`store`]). Members talk to each other
//! with the ECS protocol ([`ringkv_wire::AdminRequest::Raft`]) over the same QUIC + mutual
//! TLS transport as everything else, and take Raft messages only from `ecs` certificates.
//!
//! Invariants:
//! - **Strictly increasing ring versions.** The state machine applies a ring only if its
//!   version is greater than the current one ([`EcsState::apply`]); anything else is refused
//!   as a value ([`Refusal`]), never a panic, and leaves the state unchanged. Since every member
//!   applies the same commands in the same order, all make the same decision.
//! - **Persist before answering.** A vote and log entries are fsynced (fjall,
//!   `PersistMode::SyncAll`) before openraft is told they are stored, and hence before a
//!   member answers a vote or an append; applied state is fsynced with the log id it
//!   reached, in one atomic batch, so a restart never applies an entry twice or skips one.
//! - **One leader per term.** Raft's. A leader learns it was deposed only by hearing of a
//!   higher term, so a member that must not act as a stale leader asks
//!   [`EcsRaft::ensure_leader`] (a round of heartbeats confirmed by a majority) first, and
//!   stamps what it publishes with the term it got.
//!
//! # Layout
//! - [`command`]: [`EcsCommand`], [`EcsState`] and the pure decision of applying one to the
//!   other ([`EcsState::apply`]), with its [`EcsResponse`].
//! - [`store`]: the durable Raft log and state machine on fjall (openraft's `RaftLogStorage`
//!   and `RaftStateMachine`), snapshots included.
//! - [`network`]: openraft's `RaftNetworkFactory` over [`ringkv_transport::Transport`].
//! - [`server`]: [`RaftService`], the answers to other members' Raft messages (for the ECS
//!   service to call), and [`RaftServer`], a standalone [`ringkv_transport::Service`] that
//!   serves only them.
//! - [`handle`]: [`EcsRaft`], a started member: propose, read the state, watch it, check
//!   leadership, change the membership, shut down; and its [`RaftConfig`].
//! - [`error`]: the error type, [`RaftError`].
//!
//! [openraft]: https://docs.rs/openraft/0.9

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod command;
pub mod error;
pub mod handle;
pub mod network;
pub mod server;
pub mod store;
#[cfg(test)]
mod tests;

pub use command::{EcsCommand, EcsResponse, EcsState, LeaseSettings, Refusal};
pub use error::RaftError;
pub use handle::{Applied, EcsRaft, LeaderTerm, RaftConfig, RaftStatus};
/// A member's role in the group as openraft reports it ([`RaftStatus::state`]).
pub use openraft::ServerState;
pub use server::{RaftServer, RaftService, RpcRefusal, MAX_TERM, MAX_TERM_LEAP};

/// A member's Raft id: unique in the group and never reused, because Raft remembers votes and
/// log positions by id (a member whose state directory was lost must rejoin under a new id).
pub type MemberId = u64;

/// How to reach a member: what openraft calls a node, stored in the replicated membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The `host:port` its Raft messages are sent to (its ECS endpoint).
    pub addr: String,
    /// Its certificate's name (subject CN): a Raft message claiming to come from this member
    /// is refused from a certificate with another name.
    pub name: String,
}

impl Member {
    /// A member at `addr` whose certificate is called `name`.
    pub fn new(addr: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

openraft::declare_raft_types!(
    /// The types openraft is instantiated with: [`EcsCommand`]s in the log, [`EcsResponse`]s
    /// from applying them, members named by [`MemberId`] and reached at a [`Member`], and the
    /// snapshot as an in-memory buffer (the state is small), and openraft's defaults for the rest
    /// (tokio, its log entry, a oneshot responder).
    pub TypeConfig:
        D = EcsCommand,
        R = EcsResponse,
        NodeId = MemberId,
        Node = Member,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// openraft's handle of a member, with our types.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub(crate) type Entry = openraft::Entry<TypeConfig>;
/// A log position: the term (and leader) that created the entry, and its index.
pub(crate) type LogId = openraft::LogId<MemberId>;
/// The replicated membership with the log id of the entry that set it.
pub(crate) type StoredMembership = openraft::StoredMembership<MemberId, Member>;
/// openraft's storage error.
pub(crate) type StorageError = openraft::StorageError<MemberId>;
