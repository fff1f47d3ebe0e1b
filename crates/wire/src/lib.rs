//! `ringkv-wire`: the sans-IO core of the ringkv protocol.
//!
//! Everything here is plain data and pure functions: no sockets, no tokio, no quinn.
//! Both ends of every link (client, node, ECS) speak through these types, so the
//! protocol is defined in exactly one place.
//!
//! # Layout
//! - [`ring`]: SHA-1 positions on the 160-bit ring, [`KeyRange`], [`RingMetadata`] and the
//!   ownership math (which partition holds a key, and which chain of nodes holds it).
//! - [`placement`]: which nodes the ECS gives each partition to, evenly, on a join or a
//!   leave.
//! - [`message`]: the request and reply enums carried in frames (ARCHITECTURE.md §3).
//! - [`codec`]: the length-prefixed postcard framing with a maximum frame size, checked
//!   before anything is buffered.
//! - [`limits`]: key/value/frame size limits and their validation.
//! - [`signed`]: [`SignedMetadata`], the one form in which ring metadata travels and is
//!   stored: encoded once, signed by the ECS, opened only through a signature check.
//! - [`gossip`]: what nodes gossip: bounded digests of versions and heartbeats, and the
//!   [`Liveness`] a node sees in its peers.
//! - [`admin`]: the ECS protocol an operator speaks ([`AdminRequest`], [`AdminReply`]), which
//!   also carries the Raft messages between ECS members ([`RaftRpc`]).
//! - [`error`]: [`WireError`], the one error type of this crate.
//!
//! The gossip types ([`Liveness`], [`PeerLiveness`]) and the operator protocol
//! ([`AdminRequest`], [`NodeReport`]) stay here although only some parts use them: they
//! cross the wire between parts (node ↔ node, node → ECS in `Status`, operator → ECS), so
//! both ends need them, and the only crate both ends share without depending on each other is
//! this one.
#![warn(missing_docs)]

pub mod admin;
pub mod bounded;
pub mod codec;
pub mod error;
pub mod gossip;
pub mod limits;
pub mod message;
pub mod placement;
pub mod ring;
pub mod signed;

pub use admin::{
    AdminReply, AdminRequest, ChangeReport, GroupMember, GroupReport, MoveReport, NodeReport,
    RaftRpc, RaftRpcKind, RangeReport,
};
pub use bounded::{MAX_BATCH_ENTRIES, MAX_BATCH_KEYS, MAX_SIGNER_CHAIN};
pub use codec::{decode, encode, frame_len, FRAME_HEADER_LEN};
pub use error::WireError;
pub use gossip::{GossipDigest, Heartbeat, Liveness, PeerLiveness};
pub use limits::Limits;
pub use message::{
    scan_position, ChainWrite, ErrorKind, Expected, KeyReply, KeyValue, MoveId, NodeStatus, Reply,
    ReplyBody, Request, RequestBody, ScanEntry, StorageEntry, TransferStats, MAX_SCAN_PAGE,
    SCAN_EXAMINE,
};
pub use ring::{
    key_position, storage_key, HashedKey, KeyRange, NodeEntry, NodeShare, Position, RingMetadata,
    StorageSpan, MAX_REPLICATION,
};
pub use signed::{
    signed_message, MetadataSignature, SignedMetadata, MAX_SIGNED_METADATA, SIGNED_DOMAIN,
};
