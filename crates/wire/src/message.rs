//! Requests and replies (ARCHITECTURE.md §3).
//!
//! Every request carries the caller's metadata version and every reply the responder's, so
//! either side learns it is stale from any exchange. Client requests are `Get`, `Put`,
//! `Delete`, the conditional `PutIf`/`DeleteIf`, the batches `GetMany`/`PutMany`/`DeleteMany`,
//! `PutTtl` (a write that expires) and `GetMetadata`; everything else is internal, and which roles may send it is decided by
//! the peer's certificate, never by a message.

use serde::{Deserialize, Serialize};

use crate::gossip::{GossipDigest, PeerLiveness};
use crate::ring::{KeyRange, NodeEntry};
use crate::signed::SignedMetadata;

/// A request frame: the caller's metadata version and what it asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Version of the ring metadata the caller holds (0: none).
    pub metadata_version: u64,
    /// The request itself.
    pub body: RequestBody,
}

impl Request {
    /// A request from a caller holding metadata version `metadata_version`.
    pub fn new(metadata_version: u64, body: RequestBody) -> Self {
        Self {
            metadata_version,
            body,
        }
    }
}

/// One attempt at one range move, named in every request of the move so that a node can
/// fence it: `change` is unique per attempt (the ECS allocates it from a persisted counter,
/// so a retried join gets a new one), `target_version` is the metadata version the move
/// leads to. A node that adopts `target_version` (or newer) is past the move, whatever
/// happened to its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MoveId {
    /// Unique per attempt.
    pub change: u64,
    /// The metadata version the move commits.
    pub target_version: u64,
}

/// One write of a `ReplicateBatch` (the fields of `Replicate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainWrite {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value, or `None` for a deletion.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// The key's version after the write, which the head assigned (ARCHITECTURE.md §11
    /// "Versions"); every member stores it with the value.
    pub version: u64,
    /// When the value expires, in milliseconds since the Unix epoch by the head's clock
    /// (`None`: never).
    pub expires_at: Option<u64>,
    /// The head that ordered the write (a random number per head process).
    pub origin: u64,
    /// The write's place in its head's order (increasing; a write sent again keeps it).
    /// A member ignores a write of a key's stripe older than one it already applied from
    /// the same head, so a copy delayed on its way cannot undo a later write.
    pub seq: u64,
}

/// A key and its value in a `PutMany`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One key's answer in a [`ReplyBody::Many`]: what the request for that key alone would
/// have answered. Flat on purpose: it never holds another batch, so decoding never
/// recurses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyReply {
    /// The key's value and version (`GetMany`).
    Value {
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The key's version.
        version: u64,
    },
    /// The key does not exist (`GetMany`; `DeleteMany`: nothing to delete).
    NotFound,
    /// The put is durable on every copy (`PutMany`).
    PutOk {
        /// `true` if the key did not exist before.
        created: bool,
    },
    /// The key was deleted, durably (`DeleteMany`).
    Deleted,
    /// This node does not serve the key; the reply's `metadata` is the node's ring.
    NotResponsible,
    /// The key's range is being moved; retry the write later.
    WriteLocked,
    /// The node is not serving clients.
    Stopped,
    /// Not served in this batch because the reply was full (its values' bytes); nothing was
    /// done for the key: ask again.
    Deferred,
    /// The request for this key failed (as `ReplyBody::Error`).
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// A human-readable explanation.
        message: String,
    },
}

/// The condition of a conditional put ([`RequestBody::PutIf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Expected {
    /// The key must not exist.
    Absent,
    /// The key must exist with this version.
    Version(u64),
}

/// A key and its value as moved between nodes; `None` is a deletion (a delta transfer
/// carries the keys deleted since the snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageEntry {
    /// The user key (not the storage key).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value, or `None` if the key was deleted.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// The key's version (0 for a deletion).
    pub version: u64,
    /// When the value expires (ms since the Unix epoch; `None`: never).
    pub expires_at: Option<u64>,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Client: read a key. Replies `Value` or `NotFound`.
    Get {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Client: write a key. Replies `PutOk` once the write is durable.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Client: delete a key. Replies `Deleted` or `NotFound`, once durable.
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Client: the node's ring metadata. Replies `Metadata`.
    GetMetadata,
    /// Internal: the node's status. Replies `Status`.
    Status,
    /// Internal (ecs): start serving clients. Replies `Ok`.
    Start,
    /// Internal (ecs): stop serving clients (they get `Stopped`). Replies `Ok`.
    Stop,
    /// Internal (ecs): adopt this metadata if its signature verifies and it is newer than the
    /// node's. Replies `Installed`.
    InstallMetadata {
        /// The metadata to adopt.
        metadata: SignedMetadata,
    },
    /// Internal (ecs), at the sender of move `id`: write-lock `range` (writes there answer
    /// `WriteLocked`), durably: the lock survives a restart and is released only when the
    /// node adopts `id.target_version` or receives `AbortMove` for `id`. Replies `Ok` once
    /// persisted and no write into the range is in flight.
    LockRange {
        /// The move.
        id: MoveId,
        /// The range to lock.
        range: KeyRange,
    },
    /// Internal (ecs): give up move `id`. At the sender, releases its lock and tracking
    /// (refused once the node holds `id.target_version`: the move is then done); at the
    /// receiver, refuses further batches of `id` and deletes its partial copy of `range`.
    /// Replies `Ok`.
    AbortMove {
        /// The move.
        id: MoveId,
        /// The range it moves.
        range: KeyRange,
    },
    /// Internal (ecs), at the receiver of move `id`: delete any stale copy of `range` (the
    /// node must not own any of it) and accept `PutBatch`es of `id` from node `from`, for keys
    /// of `range`, from now on. Replies `Ok`.
    PrepareReceive {
        /// The move.
        id: MoveId,
        /// The range that will arrive.
        range: KeyRange,
        /// The sender's name (its certificate's name): the only peer whose batches of `id`
        /// are accepted.
        from: String,
    },
    /// Internal (ecs): stream a snapshot of every key of `range` to node `to` in batches,
    /// and from then on remember which keys of the range are written. Replies `Transferred`
    /// once `to` acknowledged (persisted) every batch. Writes stay open meanwhile.
    TransferRange {
        /// The move.
        id: MoveId,
        /// The range to send.
        range: KeyRange,
        /// The receiving node.
        to: NodeEntry,
    },
    /// Internal (ecs): send `to` the current value (or the deletion) of every key of
    /// `range` written since the previous round of move `id` (its `TransferRange` or its
    /// last `TransferDelta`), and start a new round. `last` rounds need the range
    /// write-locked (so the set is final); earlier ones run with writes open and shrink
    /// what the locked round has to send. Replies `Transferred`.
    TransferDelta {
        /// The move.
        id: MoveId,
        /// The range (as given to `TransferRange`).
        range: KeyRange,
        /// The receiving node.
        to: NodeEntry,
        /// Whether this is the final, locked round.
        last: bool,
    },
    /// Internal (node): store these entries of move `id` durably. Refused unless the receiver
    /// was prepared for `id` (and not aborted since), the caller's certificate names the
    /// sender the ECS announced, and every key lies in the announced range. Replies `Ok`
    /// after they are persisted.
    PutBatch {
        /// The move.
        id: MoveId,
        /// The entries; at most [`crate::MAX_BATCH_ENTRIES`].
        #[serde(deserialize_with = "crate::bounded::batch_entries")]
        entries: Vec<StorageEntry>,
    },
    /// Internal (ecs): delete every key of a range. Replies `Count` with the number deleted.
    DeleteRange {
        /// The range to delete.
        range: KeyRange,
    },
    /// Internal (node): a gossip exchange (see [`crate::gossip`]). Replies `Gossip`
    /// with the responder's digest, and its metadata if that is newer than the digest's.
    Gossip {
        /// The caller's digest.
        digest: GossipDigest,
    },
    /// Internal (node), from a chain member to its successor in the chain of `key`'s range
    /// (ARCHITECTURE.md §11): apply this write (`value: None` deletes), then pass it on to the
    /// own successor, and reply `Ok` once every member down to the tail persisted it.
    /// Refused (`NotResponsible`, with the receiver's metadata) unless both hold the same
    /// metadata version (the request's) and the caller is the receiver's predecessor in that
    /// chain.
    Replicate {
        /// The write.
        write: ChainWrite,
    },
    /// Internal (node): several chain writes for the receiver at once, each handled as its
    /// own `Replicate` (same checks, same order rules); the sender batches the writes waiting
    /// for the same successor, so a hop costs one exchange for many writes. Replies
    /// `Replicated` with one answer per write, in order.
    ReplicateBatch {
        /// The writes; at most [`crate::MAX_BATCH_ENTRIES`].
        #[serde(deserialize_with = "crate::bounded::batch_entries")]
        writes: Vec<ChainWrite>,
    },
    /// Internal (ecs): the ECS's liveness probe, which also renews the node's lease
    /// (ARCHITECTURE.md §11). The node answers `Leased` with a stamp of its own clock; the
    /// ECS echoes the last stamp it *received* in its next probe, and the node then may serve
    /// until `echo + millis` by its own clock. A lease therefore ends a lease after an answer
    /// the ECS got, however late a probe is delivered. With replication, a node serves
    /// nothing (client requests answer `Stopped`, `Replicate` is refused) outside a lease, so
    /// a node cut off from the ECS stops before the ECS fails it over.
    Lease {
        /// The lease's length.
        millis: u32,
        /// The node's stamp from its last answer the ECS received, if any.
        echo: Option<u64>,
    },
    /// Internal (node): the last leg of a gossip exchange, newer metadata for a responder
    /// whose digest showed an older version. Adopted only if its signature verifies and it
    /// is newer; replies `Ok`.
    GossipPush {
        /// The caller's metadata.
        metadata: SignedMetadata,
    },
    /// Internal (ecs): an ECS request stamped with the Raft term of the ECS leader that sent
    /// it (ARCHITECTURE.md §12). A replicated ECS has one leader per term, but a deposed
    /// leader may not know yet that it lost: the term is what lets a node tell its requests
    /// from the new leader's. The node keeps the highest term it has seen, durably, and
    /// refuses a request of an older one (`StaleTerm`, the inner request not executed); a
    /// newer one is persisted before the inner request runs. Replies whatever `body` replies.
    ///
    /// `body` must be a request the `ecs` role may send and never another `Fenced`: a nested
    /// one is refused when the frame is decoded, so a frame of nested envelopes cannot make
    /// decoding recurse (a 4 MiB frame would hold two million levels).
    Fenced {
        /// The Raft term of the ECS leader that sent the request.
        term: u64,
        /// The request itself.
        #[serde(deserialize_with = "crate::bounded::unfenced_body")]
        body: Box<RequestBody>,
    },
    // New variants go last: a variant's place is its tag on the wire.
    /// Client: write a key if it is as `expected` (compare-and-set). Replies `Applied` with
    /// the key's new version once the write is durable, or `Conflict` with its current
    /// version (nothing written).
    PutIf {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The condition.
        expected: Expected,
    },
    /// Client: delete a key if its version is `version`. Replies `Applied` (with the version
    /// the key had) once durable, or `Conflict` with its current version (nothing deleted).
    DeleteIf {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The version the key must have.
        version: u64,
    },
    /// Client: read several keys the node serves as their chains' tail, each as `Get` would.
    /// Replies `Many`, one answer per key in order; values beyond what fits one reply frame
    /// are `Deferred`.
    GetMany {
        /// The keys; at most [`crate::MAX_BATCH_KEYS`].
        #[serde(deserialize_with = "crate::bounded::batch_entries")]
        keys: Vec<serde_bytes::ByteBuf>,
    },
    /// Client: write several keys the node heads, each as `Put` would (concurrently: a batch
    /// is not a transaction). Replies `Many`, one answer per key in order, once every write
    /// answered.
    PutMany {
        /// The keys and values; at most [`crate::MAX_BATCH_KEYS`].
        #[serde(deserialize_with = "crate::bounded::batch_entries")]
        entries: Vec<KeyValue>,
    },
    /// Client: delete several keys the node heads, each as `Delete` would. Replies `Many`.
    DeleteMany {
        /// The keys; at most [`crate::MAX_BATCH_KEYS`].
        #[serde(deserialize_with = "crate::bounded::batch_entries")]
        keys: Vec<serde_bytes::ByteBuf>,
    },
    /// Client: write a key that expires `ttl_ms` milliseconds after the head of its chain
    /// takes the write, by the head's clock (ARCHITECTURE.md §11 "Expiry"); if `expected`
    /// is given, only if the key is as expected. Replies as `Put` (no condition) or `PutIf`.
    PutTtl {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Time to live, in ms (at least 1).
        ttl_ms: u64,
        /// The condition, if any.
        expected: Option<Expected>,
    },
    /// Client: one page of a scan of the keys beginning with `prefix`, in storage-key order
    /// (SHA-1 of the key, then the key: hash order, not key order), from storage key `from`
    /// (inclusive; empty: the start of the ring), served by the tail of the range holding
    /// `from`'s position. Replies `ScanPage`: at most `limit` keys (1..=[`MAX_SCAN_PAGE`]),
    /// and `next`, where the next page starts (`None`: the scan is complete). A page stops at
    /// the end of the range the node serves, after [`SCAN_EXAMINE`] keys examined, or when
    /// its keys and values would not fit one reply frame; so it may hold fewer than `limit`
    /// keys, even none, with more to come.
    Scan {
        /// Where the page starts: a storage key, or a `next` of an earlier page.
        #[serde(with = "serde_bytes")]
        from: Vec<u8>,
        /// Only keys that begin with these bytes (empty: every key).
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        /// Most keys in the page.
        limit: u32,
        /// Whether to return the values too.
        values: bool,
    },
    /// Internal (node, to the head of the key's chain): the key's record of `version` is
    /// due, or nearly, by the sender's clock; the head decides by its own. Replies `Deleted`
    /// (it was due: removed through the chain, the sender included, before the reply),
    /// `Applied { version }` (not due: alive at that version) or `Conflict { current }`
    /// (the head holds another version).
    Expire {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The version the sender holds.
        version: u64,
    },
}

impl RequestBody {
    /// Whether a `client` certificate may send this request.
    pub fn is_client_request(&self) -> bool {
        matches!(
            self,
            RequestBody::Get { .. }
                | RequestBody::Put { .. }
                | RequestBody::Delete { .. }
                | RequestBody::PutIf { .. }
                | RequestBody::DeleteIf { .. }
                | RequestBody::GetMany { .. }
                | RequestBody::PutMany { .. }
                | RequestBody::DeleteMany { .. }
                | RequestBody::PutTtl { .. }
                | RequestBody::Scan { .. }
                | RequestBody::GetMetadata
        )
    }

    /// The Raft term this request is stamped with: a `Fenced` request's, `None` for any
    /// other (the node counts an unfenced request from the ECS as term 0).
    pub fn term(&self) -> Option<u64> {
        match self {
            RequestBody::Fenced { term, .. } => Some(*term),
            _ => None,
        }
    }

    /// The request to execute: the body of a `Fenced` request, the request itself otherwise.
    pub fn unfenced(&self) -> &RequestBody {
        match self {
            RequestBody::Fenced { body, .. } => body,
            other => other,
        }
    }

    /// A short name for logs and errors. A `Fenced` request is named after the request it
    /// carries: the term is an envelope, the inner request is what happens (and what an
    /// ECS log line about a failed step should name).
    pub fn name(&self) -> &'static str {
        match self {
            RequestBody::Fenced { body, .. } => body.name(),
            RequestBody::Get { .. } => "get",
            RequestBody::Put { .. } => "put",
            RequestBody::Delete { .. } => "delete",
            RequestBody::PutIf { .. } => "put_if",
            RequestBody::DeleteIf { .. } => "delete_if",
            RequestBody::GetMany { .. } => "get_many",
            RequestBody::PutMany { .. } => "put_many",
            RequestBody::DeleteMany { .. } => "delete_many",
            RequestBody::PutTtl { .. } => "put_ttl",
            RequestBody::Expire { .. } => "expire",
            RequestBody::Scan { .. } => "scan",
            RequestBody::GetMetadata => "get_metadata",
            RequestBody::Status => "status",
            RequestBody::Start => "start",
            RequestBody::Stop => "stop",
            RequestBody::InstallMetadata { .. } => "install_metadata",
            RequestBody::LockRange { .. } => "lock_range",
            RequestBody::AbortMove { .. } => "abort_move",
            RequestBody::PrepareReceive { .. } => "prepare_receive",
            RequestBody::TransferRange { .. } => "transfer_range",
            RequestBody::TransferDelta { .. } => "transfer_delta",
            RequestBody::PutBatch { .. } => "put_batch",
            RequestBody::DeleteRange { .. } => "delete_range",
            RequestBody::Gossip { .. } => "gossip",
            RequestBody::GossipPush { .. } => "gossip_push",
            RequestBody::Replicate { .. } => "replicate",
            RequestBody::ReplicateBatch { .. } => "replicate_batch",
            RequestBody::Lease { .. } => "lease",
        }
    }
}

/// A reply frame: the responder's metadata version and the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Version of the ring metadata the responder holds.
    pub metadata_version: u64,
    /// The answer.
    pub body: ReplyBody,
}

impl Reply {
    /// A reply from a responder holding metadata version `metadata_version`.
    pub fn new(metadata_version: u64, body: ReplyBody) -> Self {
        Self {
            metadata_version,
            body,
        }
    }
}

/// Kinds of `Error` replies, so callers can tell them apart without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request frame did not decode.
    Malformed,
    /// The request frame was over the maximum size.
    FrameTooLarge,
    /// The key was empty.
    EmptyKey,
    /// The key was over the maximum size.
    KeyTooLarge,
    /// The value was over the maximum size.
    ValueTooLarge,
    /// The caller's certificate role may not send this request.
    Forbidden,
    /// The storage engine failed; the request had no effect.
    Storage,
    /// A peer the request needed (e.g. a transfer target) failed or was unreachable.
    Peer,
    /// The request is not valid in the node's current state.
    InvalidState,
    /// A write was applied at the head of its chain but could not be confirmed at the tail
    /// (a member failed and no new chain formed in time, or the head lost its place): it
    /// may or may not take effect.
    Indeterminate,
    /// Ring metadata in the request was not signed by the ECS (or the signature did not
    /// verify); it was refused and counted.
    Unauthenticated,
    /// The request came from an ECS leader of an older Raft term than one this node has
    /// seen (or, unfenced, from an ECS after the node saw a fenced one): a newer leader
    /// exists, and the request was not executed. The sender should step down.
    StaleTerm,
    /// A write to a range whose chain has fewer live copies than the head's `--min-copies`:
    /// refused, nothing applied. It is taken again once the range's copies are rebuilt.
    NotEnoughCopies,
    /// A batch held more keys than [`crate::MAX_BATCH_KEYS`]: refused whole, nothing done.
    BatchTooLarge,
    /// A time to live of 0: refused, nothing written.
    InvalidTtl,
}

/// Counters of a completed range transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TransferStats {
    /// Entries sent and acknowledged.
    pub entries: u64,
    /// Key + value bytes sent and acknowledged.
    pub bytes: u64,
}

/// A node's view of itself, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name.
    pub name: String,
    /// The advertised address.
    pub addr: String,
    /// Whether it serves clients (`false`: answers `Stopped`).
    pub running: bool,
    /// The metadata it holds.
    pub metadata_version: u64,
    /// Keys stored on this node.
    pub keys: u64,
    /// Writes committed since the node started.
    pub writes: u64,
    /// Commits (each one fsync) since the node started: `writes / write_commits` is the
    /// mean group-commit size.
    pub write_commits: u64,
    /// `ReplicateBatch`es this node sent down chains since it started (as head or member).
    pub hop_batches: u64,
    /// Chain writes in those batches: `hop_writes / hop_batches` is the mean hop batch.
    pub hop_writes: u64,
    /// Ring metadata refused since the node started (not signed by the ECS, or not a valid
    /// ring), from any source.
    pub metadata_refused: u64,
    /// Ranges currently write-locked.
    pub locked: Vec<KeyRange>,
    /// The node's gossip view of every other node of its ring: how alive each seems.
    pub peers: Vec<PeerLiveness>,
    /// The highest Raft term of an ECS leader the node has seen in a `Fenced` request
    /// (persisted; 0: never fenced). ECS requests of an older term are refused.
    pub ecs_term: u64,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyBody {
    /// The value of the key asked for, and its version.
    Value {
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The key's version (ARCHITECTURE.md §11 "Versions").
        version: u64,
    },
    /// The key does not exist.
    NotFound,
    /// The put is durable; `created` tells whether the key was new.
    PutOk {
        /// `true` if the key did not exist before.
        created: bool,
    },
    /// The key was deleted, durably.
    Deleted,
    /// This node does not own the key; here is its (newer) metadata, as the ECS signed it
    /// (`None` if the node holds none yet).
    NotResponsible {
        /// The responder's metadata.
        metadata: Option<SignedMetadata>,
    },
    /// The key's range is being moved; retry the write later. Reads are still served.
    WriteLocked,
    /// The node is not serving clients.
    Stopped,
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// A human-readable explanation.
        message: String,
    },
    /// The responder's metadata as the ECS signed it, `None` if it holds none yet (answer to
    /// `GetMetadata`).
    Metadata(Option<SignedMetadata>),
    /// The responder's status (answer to `Status`).
    Status(Box<NodeStatus>),
    /// Generic success of an internal request.
    Ok,
    /// Answer to `InstallMetadata`: whether this request's metadata was adopted (`false`: the
    /// node already held that version or a newer one; the reply's `metadata_version` says
    /// which). Metadata that fails its signature or validation gets an `Error` instead.
    Installed {
        /// Whether the node adopted the metadata just now.
        adopted: bool,
    },
    /// Answer to `ReplicateBatch`: one answer per write, in order (each what a `Replicate`
    /// of it would have answered).
    Replicated(#[serde(deserialize_with = "crate::bounded::batch_entries")] Vec<ReplyBody>),
    /// Answer to `Lease`: the node's clock (microseconds since it started) when it answered.
    Leased {
        /// The stamp, to be echoed by the ECS's next probe.
        stamp: u64,
    },
    /// Result of a `TransferRange`.
    Transferred(TransferStats),
    /// A count (answer to `DeleteRange`).
    Count(u64),
    /// The responder's side of a gossip exchange (answer to `Gossip`).
    Gossip {
        /// The responder's digest.
        digest: GossipDigest,
        /// The responder's metadata, if newer than the version in the caller's digest.
        metadata: Option<SignedMetadata>,
    },
    /// Answer to `Lease` from a node that is stopping on purpose (SIGTERM: a planned
    /// restart or maintenance): it granted nothing, gave up the lease it held before
    /// answering, and serves no read or write from now on, so the ECS may take it out of its
    /// chains at once rather than after `failover_after` of silence (ARCHITECTURE.md §11).
    Leaving,
    /// A conditional write's condition held and the write is durable: the key's new version
    /// (`PutIf`), or the version it had (`DeleteIf`).
    Applied {
        /// The version.
        version: u64,
    },
    /// A conditional write's condition did not hold; nothing was written.
    Conflict {
        /// The key's current version (`None`: it does not exist).
        current: Option<u64>,
    },
    /// Answer to `GetMany`, `PutMany`, `DeleteMany`: one answer per key, in order, and the
    /// node's ring (as the ECS signed it) if some key is `NotResponsible`.
    Many {
        /// The answers.
        #[serde(deserialize_with = "crate::bounded::batch_entries")]
        answers: Vec<KeyReply>,
        /// The node's metadata, when some answer is `NotResponsible`.
        metadata: Option<SignedMetadata>,
    },
    /// Answer to `Scan`.
    ScanPage {
        /// The keys (with their values if asked), in storage-key order.
        #[serde(deserialize_with = "crate::bounded::batch_entries")]
        entries: Vec<ScanEntry>,
        /// Where the next page starts (`None`: the scan is complete).
        #[serde(with = "serde_bytes")]
        next: Option<Vec<u8>>,
    },
}

/// Most keys in one `Scan` page.
pub const MAX_SCAN_PAGE: u32 = 1024;

/// Most keys a node examines for one `Scan` page (those a prefix filters out included), so
/// that a page costs a bounded amount of work whatever the prefix.
pub const SCAN_EXAMINE: usize = 8192;

/// The ring position a `Scan`'s `from` points into: its first 20 bytes (the hash of a
/// storage key), padded with zeros; the client routes the page there, and the node serves it
/// if it is that position's tail.
pub fn scan_position(from: &[u8]) -> crate::ring::Position {
    let mut position = [0u8; 20];
    let n = from.len().min(20);
    position[..n].copy_from_slice(&from[..n]);
    crate::ring::Position(position)
}

/// A key of a [`ReplyBody::ScanPage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanEntry {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Its value, if the scan asked for values.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, decode_frame, encode};
    use crate::ring::{Position, RingMetadata};
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..64)
    }

    fn arb_range() -> impl Strategy<Value = KeyRange> {
        (any::<[u8; 20]>(), any::<[u8; 20]>())
            .prop_map(|(a, b)| KeyRange::new(Position(a), Position(b)))
    }

    fn arb_node() -> impl Strategy<Value = NodeEntry> {
        (
            "[a-z]{1,8}",
            1u16..u16::MAX,
            proptest::option::of("[a-z]{1,4}"),
        )
            .prop_map(|(n, p, zone)| NodeEntry {
                zone,
                ..NodeEntry::new(n, format!("h:{p}"))
            })
    }

    fn arb_metadata() -> impl Strategy<Value = RingMetadata> {
        (any::<u64>(), proptest::collection::vec(arb_node(), 0..4)).prop_map(|(v, nodes)| {
            RingMetadata::new(v, nodes.clone()).unwrap_or(RingMetadata {
                version: v,
                ..RingMetadata::default()
            })
        })
    }

    fn arb_digest() -> impl Strategy<Value = GossipDigest> {
        let heartbeat = (any::<u32>(), any::<u64>())
            .prop_map(|(node, counter)| crate::gossip::Heartbeat { node, counter });
        (
            "[a-z]{1,8}",
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(heartbeat, 0..8),
        )
            .prop_map(
                |(from, metadata_version, heartbeat, heartbeats)| GossipDigest {
                    from,
                    metadata_version,
                    heartbeat,
                    heartbeats,
                },
            )
    }

    fn arb_signed_metadata() -> impl Strategy<Value = SignedMetadata> {
        let signature = (
            any::<u16>(),
            bytes(),
            proptest::collection::vec(bytes(), 0..3),
        )
            .prop_map(|(scheme, signature, signer)| crate::MetadataSignature {
                scheme,
                signature,
                signer: signer.into_iter().map(serde_bytes::ByteBuf::from).collect(),
            });
        // Whatever a peer may send: the outer codec carries it untouched.
        (
            arb_metadata(),
            any::<u64>(),
            bytes(),
            signature,
            any::<bool>(),
        )
            .prop_map(|(md, version, junk, signature, valid)| SignedMetadata {
                version: if valid { md.version } else { version },
                ring: std::sync::Arc::new(if valid { md.to_frame().unwrap() } else { junk }),
                signature: std::sync::Arc::new(signature),
            })
    }

    fn arb_peer_liveness() -> impl Strategy<Value = PeerLiveness> {
        use crate::gossip::Liveness;
        let liveness = prop_oneof![
            Just(Liveness::Alive),
            Just(Liveness::Suspected),
            Just(Liveness::Dead)
        ];
        ("[a-z]{1,8}", liveness, any::<u64>(), any::<u64>()).prop_map(
            |(name, liveness, heartbeat, silent_ms)| PeerLiveness {
                name,
                liveness,
                heartbeat,
                silent_ms,
            },
        )
    }

    fn arb_id() -> impl Strategy<Value = MoveId> {
        (any::<u64>(), any::<u64>()).prop_map(|(change, target_version)| MoveId {
            change,
            target_version,
        })
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let plain = arb_plain_body().boxed();
        let body = prop_oneof![
            20 => plain.clone(),
            1 => (any::<u64>(), plain).prop_map(|(term, body)| RequestBody::Fenced {
                term,
                body: Box::new(body)
            }),
        ];
        (any::<u64>(), body).prop_map(|(v, b)| Request::new(v, b))
    }

    /// Any request but `Fenced`.
    fn arb_plain_body() -> impl Strategy<Value = RequestBody> {
        prop_oneof![
            bytes().prop_map(|key| RequestBody::Get { key }),
            (bytes(), bytes()).prop_map(|(key, value)| RequestBody::Put { key, value }),
            bytes().prop_map(|key| RequestBody::Delete { key }),
            (bytes(), bytes(), arb_expected()).prop_map(|(key, value, expected)| {
                RequestBody::PutIf {
                    key,
                    value,
                    expected,
                }
            }),
            (bytes(), any::<u64>())
                .prop_map(|(key, version)| RequestBody::DeleteIf { key, version }),
            keys().prop_map(|keys| RequestBody::GetMany { keys }),
            proptest::collection::vec((bytes(), bytes()), 0..4).prop_map(|entries| {
                RequestBody::PutMany {
                    entries: entries
                        .into_iter()
                        .map(|(key, value)| KeyValue { key, value })
                        .collect(),
                }
            }),
            keys().prop_map(|keys| RequestBody::DeleteMany { keys }),
            (
                bytes(),
                bytes(),
                any::<u64>(),
                proptest::option::of(arb_expected())
            )
                .prop_map(|(key, value, ttl_ms, expected)| RequestBody::PutTtl {
                    key,
                    value,
                    ttl_ms,
                    expected,
                }),
            (bytes(), any::<u64>()).prop_map(|(key, version)| RequestBody::Expire { key, version }),
            (bytes(), bytes(), any::<u32>(), any::<bool>()).prop_map(
                |(from, prefix, limit, values)| RequestBody::Scan {
                    from,
                    prefix,
                    limit,
                    values
                }
            ),
            Just(RequestBody::GetMetadata),
            Just(RequestBody::Status),
            Just(RequestBody::Start),
            Just(RequestBody::Stop),
            arb_signed_metadata().prop_map(|metadata| RequestBody::InstallMetadata { metadata }),
            (arb_id(), arb_range()).prop_map(|(id, range)| RequestBody::LockRange { id, range }),
            (arb_id(), arb_range()).prop_map(|(id, range)| RequestBody::AbortMove { id, range }),
            (arb_id(), arb_range()).prop_map(|(id, range)| RequestBody::PrepareReceive {
                id,
                range,
                from: "n1".into()
            }),
            (arb_id(), arb_range(), arb_node())
                .prop_map(|(id, range, to)| RequestBody::TransferRange { id, range, to }),
            (arb_id(), arb_range(), arb_node(), any::<bool>()).prop_map(|(id, range, to, last)| {
                RequestBody::TransferDelta {
                    id,
                    range,
                    to,
                    last,
                }
            }),
            (
                arb_id(),
                proptest::collection::vec(
                    (
                        bytes(),
                        proptest::option::of(bytes()),
                        any::<u64>(),
                        proptest::option::of(any::<u64>())
                    ),
                    0..4
                )
            )
                .prop_map(|(id, v)| {
                    RequestBody::PutBatch {
                        id,
                        entries: v
                            .into_iter()
                            .map(|(key, value, version, expires_at)| StorageEntry {
                                key,
                                value,
                                version,
                                expires_at,
                            })
                            .collect(),
                    }
                }),
            arb_range().prop_map(|range| RequestBody::DeleteRange { range }),
            arb_digest().prop_map(|digest| RequestBody::Gossip { digest }),
            arb_signed_metadata().prop_map(|metadata| RequestBody::GossipPush { metadata }),
            arb_chain_write().prop_map(|write| RequestBody::Replicate { write }),
            (any::<u32>(), proptest::option::of(any::<u64>()))
                .prop_map(|(millis, echo)| RequestBody::Lease { millis, echo }),
            proptest::collection::vec(arb_chain_write(), 0..4)
                .prop_map(|writes| RequestBody::ReplicateBatch { writes }),
        ]
    }

    fn arb_expected() -> impl Strategy<Value = Expected> {
        prop_oneof![
            Just(Expected::Absent),
            any::<u64>().prop_map(Expected::Version)
        ]
    }

    fn arb_chain_write() -> impl Strategy<Value = ChainWrite> {
        (
            bytes(),
            proptest::option::of(bytes()),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(key, value, version, expires_at, origin, seq)| ChainWrite {
                    key,
                    value,
                    version,
                    expires_at,
                    origin,
                    seq,
                },
            )
    }

    fn keys() -> impl Strategy<Value = Vec<serde_bytes::ByteBuf>> {
        proptest::collection::vec(bytes().prop_map(serde_bytes::ByteBuf::from), 0..4)
    }

    fn arb_key_reply() -> impl Strategy<Value = KeyReply> {
        prop_oneof![
            (bytes(), any::<u64>()).prop_map(|(value, version)| KeyReply::Value { value, version }),
            Just(KeyReply::NotFound),
            any::<bool>().prop_map(|created| KeyReply::PutOk { created }),
            Just(KeyReply::Deleted),
            Just(KeyReply::NotResponsible),
            Just(KeyReply::WriteLocked),
            Just(KeyReply::Stopped),
            Just(KeyReply::Deferred),
            ".{0,8}".prop_map(|message| KeyReply::Error {
                kind: ErrorKind::Storage,
                message
            }),
        ]
    }

    fn arb_reply() -> impl Strategy<Value = Reply> {
        let kind = prop_oneof![
            Just(ErrorKind::Malformed),
            Just(ErrorKind::FrameTooLarge),
            Just(ErrorKind::EmptyKey),
            Just(ErrorKind::KeyTooLarge),
            Just(ErrorKind::ValueTooLarge),
            Just(ErrorKind::Forbidden),
            Just(ErrorKind::Storage),
            Just(ErrorKind::Peer),
            Just(ErrorKind::InvalidState),
            Just(ErrorKind::StaleTerm),
            Just(ErrorKind::BatchTooLarge),
            Just(ErrorKind::InvalidTtl),
        ];
        let body = prop_oneof![
            (bytes(), any::<u64>())
                .prop_map(|(value, version)| ReplyBody::Value { value, version }),
            any::<u64>().prop_map(|version| ReplyBody::Applied { version }),
            proptest::option::of(any::<u64>()).prop_map(|current| ReplyBody::Conflict { current }),
            (
                proptest::collection::vec(arb_key_reply(), 0..4),
                proptest::option::of(arb_signed_metadata())
            )
                .prop_map(|(answers, metadata)| ReplyBody::Many { answers, metadata }),
            (
                proptest::collection::vec(
                    (bytes(), proptest::option::of(bytes()))
                        .prop_map(|(key, value)| ScanEntry { key, value }),
                    0..4
                ),
                proptest::option::of(bytes())
            )
                .prop_map(|(entries, next)| ReplyBody::ScanPage { entries, next }),
            Just(ReplyBody::NotFound),
            any::<bool>().prop_map(|created| ReplyBody::PutOk { created }),
            Just(ReplyBody::Deleted),
            proptest::option::of(arb_signed_metadata())
                .prop_map(|metadata| ReplyBody::NotResponsible { metadata }),
            Just(ReplyBody::WriteLocked),
            Just(ReplyBody::Stopped),
            (kind, ".{0,16}").prop_map(|(kind, message)| ReplyBody::Error { kind, message }),
            proptest::option::of(arb_signed_metadata()).prop_map(ReplyBody::Metadata),
            (
                arb_node(),
                any::<bool>(),
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(arb_range(), 0..3),
                proptest::collection::vec(arb_peer_liveness(), 0..3),
            )
                .prop_map(|(n, running, metadata_version, keys, locked, peers)| {
                    ReplyBody::Status(Box::new(NodeStatus {
                        name: n.name,
                        addr: n.addr,
                        running,
                        metadata_version,
                        keys,
                        writes: keys / 2,
                        write_commits: keys / 4,
                        hop_batches: keys / 3,
                        hop_writes: keys / 5,
                        metadata_refused: keys / 8,
                        locked,
                        peers,
                        ecs_term: keys / 7,
                    }))
                }),
            Just(ReplyBody::Ok),
            any::<bool>().prop_map(|adopted| ReplyBody::Installed { adopted }),
            (any::<u64>(), any::<u64>()).prop_map(|(entries, bytes)| ReplyBody::Transferred(
                TransferStats { entries, bytes }
            )),
            any::<u64>().prop_map(ReplyBody::Count),
            any::<u64>().prop_map(|stamp| ReplyBody::Leased { stamp }),
            Just(ReplyBody::Leaving),
            proptest::collection::vec(
                prop_oneof![Just(ReplyBody::Ok), Just(ReplyBody::Stopped)],
                0..4
            )
            .prop_map(ReplyBody::Replicated),
            (arb_digest(), proptest::option::of(arb_signed_metadata()))
                .prop_map(|(digest, metadata)| ReplyBody::Gossip { digest, metadata }),
        ];
        (any::<u64>(), body).prop_map(|(v, b)| Reply::new(v, b))
    }

    proptest! {
        #[test]
        fn every_request_round_trips(req in arb_request()) {
            let frame = encode(&req, 1 << 20).unwrap();
            let (back, used): (Request, usize) = decode_frame(&frame, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, req);
        }

        #[test]
        fn every_reply_round_trips(reply in arb_reply()) {
            let frame = encode(&reply, 1 << 20).unwrap();
            let (back, _): (Reply, usize) = decode_frame(&frame, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(back, reply);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&data);
            let _ = decode::<Reply>(&data);
            let _ = decode_frame::<Request>(&data, 128);
        }

        #[test]
        fn truncated_frames_never_decode_wrongly(req in arb_request(), cut in any::<prop::sample::Index>()) {
            let frame = encode(&req, 1 << 20).unwrap();
            let cut = cut.index(frame.len());
            // A strict prefix is either incomplete or an error, never a different message.
            match decode_frame::<Request>(&frame[..cut], 1 << 20) {
                Ok(None) | Err(_) => {}
                Ok(Some(_)) => prop_assert!(false, "a truncated frame decoded"),
            }
        }
    }

    fn arb_admin_request() -> impl Strategy<Value = crate::AdminRequest> {
        use crate::AdminRequest::*;
        prop_oneof![
            arb_node().prop_map(|n| AddNode {
                name: n.name,
                addr: n.addr,
                zone: n.zone,
            }),
            "[a-z]{1,8}".prop_map(|name| RemoveNode { name }),
            Just(Ring),
            Just(Status),
            Just(Start),
            Just(Stop),
            (
                prop_oneof![
                    Just(crate::RaftRpcKind::AppendEntries),
                    Just(crate::RaftRpcKind::Vote),
                    Just(crate::RaftRpcKind::InstallSnapshot),
                ],
                proptest::collection::vec(any::<u8>(), 0..64),
            )
                .prop_map(|(kind, payload)| Raft(crate::RaftRpc { kind, payload })),
        ]
    }

    fn arb_admin_reply() -> impl Strategy<Value = crate::AdminReply> {
        use crate::{AdminReply, MoveReport, NodeReport};
        let report = (
            arb_node(),
            proptest::option::of(arb_range()),
            any::<bool>(),
            ".{0,8}",
        )
            .prop_map(|(n, range, up, err)| NodeReport {
                status: up.then(|| NodeStatus {
                    name: n.name.clone(),
                    addr: n.addr.clone(),
                    running: true,
                    metadata_version: 3,
                    keys: 9,
                    writes: 12,
                    write_commits: 4,
                    hop_batches: 2,
                    hop_writes: 5,
                    metadata_refused: 1,
                    locked: range.into_iter().collect(),
                    peers: vec![],
                    ecs_term: 2,
                }),
                error: (!up).then_some(err),
                liveness: up.then_some(crate::Liveness::Alive),
                name: n.name,
                addr: n.addr,
                share: crate::NodeShare {
                    heads: 3,
                    tails: 2,
                    copies: 7,
                },
            });
        let moved = (arb_node(), arb_node(), any::<u64>(), any::<u64>()).prop_map(
            |(a, b, entries, bytes)| MoveReport {
                from: vec![a.name, b.name.clone()],
                to: vec![b.name],
                copies: (entries % 100) as u32,
                entries,
                bytes,
                locked_ms: entries % 1000,
                total_ms: bytes % 1000,
            },
        );
        prop_oneof![
            arb_metadata().prop_map(AdminReply::Ring),
            (arb_metadata(), proptest::option::of(moved))
                .prop_map(|(metadata, moved)| AdminReply::Changed { metadata, moved }),
            (arb_metadata(), proptest::collection::vec(report, 0..4)).prop_map(
                |(metadata, nodes)| AdminReply::Status {
                    metadata,
                    nodes,
                    ranges: vec![]
                }
            ),
            ".{0,16}".prop_map(AdminReply::Done),
            ".{0,16}".prop_map(AdminReply::Error),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(AdminReply::Raft),
        ]
    }

    proptest! {
        #[test]
        fn every_admin_message_round_trips(req in arb_admin_request(), reply in arb_admin_reply()) {
            let frame = encode(&req, 1 << 20).unwrap();
            let (back, _): (crate::AdminRequest, usize) = decode_frame(&frame, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(back, req);
            let frame = encode(&reply, 1 << 20).unwrap();
            let (back, _): (crate::AdminReply, usize) = decode_frame(&frame, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(back, reply);
        }
    }

    fn fenced(term: u64, body: RequestBody) -> RequestBody {
        RequestBody::Fenced {
            term,
            body: Box::new(body),
        }
    }

    #[test]
    fn a_fenced_request_is_named_after_and_unwraps_to_its_body() {
        let lock = RequestBody::LockRange {
            id: MoveId {
                change: 1,
                target_version: 2,
            },
            range: KeyRange::new(Position::MIN, Position::MAX),
        };
        let request = fenced(7, lock.clone());
        assert_eq!(request.name(), "lock_range");
        assert_eq!(request.term(), Some(7));
        assert_eq!(request.unfenced(), &lock);
        assert_eq!(lock.term(), None);
        assert_eq!(lock.unfenced(), &lock);
        assert!(!fenced(7, RequestBody::GetMetadata).is_client_request());
    }

    /// One envelope decodes; an envelope in an envelope is refused when decoded, however
    /// deep the nesting (a frame of a million envelopes costs one level of recursion), and
    /// the refusal leaves the decoder usable.
    #[test]
    fn a_fenced_request_inside_a_fenced_request_does_not_decode() {
        let once = Request::new(3, fenced(5, RequestBody::Start));
        let frame = encode(&once, 1 << 20).unwrap();
        let back: Request = decode(&frame[crate::codec::FRAME_HEADER_LEN..]).unwrap();
        assert_eq!(back, once);

        let twice = Request::new(3, fenced(5, fenced(6, RequestBody::Start)));
        let frame = encode(&twice, 1 << 20).unwrap();
        let refused = decode::<Request>(&frame[crate::codec::FRAME_HEADER_LEN..]).unwrap_err();
        assert!(
            matches!(refused, crate::WireError::Malformed(_)),
            "{refused}"
        );

        // Request { metadata_version: 0, Fenced { term: 0, Fenced { term: 0, ... } } },
        // written by hand: encoding it would recurse as deep.
        let fenced_tag = encode(&fenced(0, RequestBody::Start), 1 << 20).unwrap()
            [crate::codec::FRAME_HEADER_LEN];
        let mut payload = vec![0];
        for _ in 0..1_000_000 {
            payload.extend([fenced_tag, 0]);
        }
        payload.push(5); // Start
        assert!(decode::<Request>(&payload).is_err());

        let back: Request =
            decode(&encode(&once, 1 << 20).unwrap()[crate::codec::FRAME_HEADER_LEN..]).unwrap();
        assert_eq!(back, once, "the refusal left the decoder's state behind");
    }

    #[test]
    fn client_requests_are_the_data_requests_and_get_metadata() {
        assert!(RequestBody::GetMetadata.is_client_request());
        assert!(RequestBody::PutIf {
            key: b"k".to_vec(),
            value: vec![],
            expected: Expected::Absent
        }
        .is_client_request());
        assert!(RequestBody::DeleteIf {
            key: b"k".to_vec(),
            version: 1
        }
        .is_client_request());
        assert!(!RequestBody::Status.is_client_request());
        assert!(!RequestBody::PutBatch {
            id: MoveId {
                change: 1,
                target_version: 2
            },
            entries: vec![]
        }
        .is_client_request());
    }
}
