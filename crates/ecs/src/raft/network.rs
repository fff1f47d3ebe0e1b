//! openraft's network over ringkv's transport: each Raft request is postcard-encoded into an
//! [`AdminRequest::Raft`] and sent with [`Transport::call`] (QUIC, mutual TLS with this
//! member's `ecs` certificate, one stream per request, the member's connection reused); the
//! peer answers [`AdminReply::Raft`] with the encoded result ([`super::server`]).
//!
//! How failures reach openraft, which decides what to do with them:
//! - nothing was sent (the peer's address does not resolve, it cannot be dialled, it closed
//!   the connection without taking the request) or the peer refused the message: `Unreachable`,
//!   so openraft backs off before it tries that peer again;
//! - the request may have been sent (the stream broke, no reply in time): `Network`, retried
//!   at the next heartbeat;
//! - an append that would not fit in one frame: `PayloadTooLarge` with half as many entries,
//!   so openraft sends fewer at a time;
//! - the peer's Raft refused it (e.g. a higher term): `RemoteError`, which openraft acts on.
//!
//! Timeouts: openraft bounds every request itself (an append by the heartbeat interval, a
//! vote by the minimum election timeout, a snapshot chunk by its own timeout) and stops
//! waiting when the time is up. The exchange itself runs in a task of its own, which goes on:
//! - so that a dial under way is never abandoned half way. Abandoned, it would be dialled
//!   again at the next heartbeat: a dead peer would collect one half-open QUIC connection
//!   per heartbeat, each retransmitting its handshake (and, once dropped, draining) for
//!   seconds, and a live but slow one would keep every handshake aborted this way until its
//!   QUIC idle timeout (30 s). Running to its end, the dial is the transport's one dial to
//!   that peer, which later requests wait for and share, bounded by the connect timeout.
//! - with the transport's bound set longer than openraft's (twice as long): the
//!   transport closes a connection whose request timed out, cutting off every other request
//!   on it, which is right for a peer that stopped answering but not for one slower than a
//!   heartbeat.
//!
//! A request abandoned this way may reach the peer late. Raft is made for that (late, repeated
//! and reordered messages are recognised by their term and log position), unlike the move
//! protocol, which is why the ECS's node traffic closes the connection instead.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError as OpenRaftError,
    RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::AnyError;
use ringkv_transport::{Transport, TransportError};
use ringkv_wire::{AdminReply, AdminRequest, RaftRpc, RaftRpcKind};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Member, MemberId, TypeConfig};

/// Room a request frame needs around its Raft payload (the frame header, the enum tags, the
/// payload's length).
pub const FRAME_OVERHEAD: usize = 64;

/// The transport's bound on a Raft request is this many times openraft's own (a backstop:
/// openraft stops waiting first, see the module documentation).
const BACKSTOP_FACTOR: u32 = 2;

/// Creates a [`PeerLink`] per peer for openraft, all sharing the member's transport.
pub struct Network {
    transport: Arc<Transport>,
}

impl Network {
    /// A network sending through `transport`.
    pub fn new(transport: Arc<Transport>) -> Self {
        Self { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, target: MemberId, node: &Member) -> PeerLink {
        PeerLink {
            target,
            member: node.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// openraft's connection to one peer. The QUIC connection itself lives in the transport's
/// cache, so creating and dropping links is free.
pub struct PeerLink {
    target: MemberId,
    member: Member,
    transport: Arc<Transport>,
}

/// Why a request got no answer from the peer's Raft.
#[derive(Debug)]
enum Failure {
    /// The encoded request would exceed a frame; nothing was sent.
    TooLarge { bytes: usize, max: usize },
    /// Nothing was sent, or the peer refused the message: back off.
    Unreachable(AnyError),
    /// The request may have been sent: retry.
    Network(AnyError),
}

impl Failure {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<MemberId, Member, E> {
        match self {
            Failure::TooLarge { bytes, max } => RPCError::Unreachable(Unreachable::from(
                AnyError::error(format!("a Raft message of {bytes} bytes exceeds {max}")),
            )),
            Failure::Unreachable(e) => RPCError::Unreachable(Unreachable::from(e)),
            Failure::Network(e) => RPCError::Network(NetworkError::from(e)),
        }
    }
}

impl PeerLink {
    /// Sends `request` as a `kind` message and decodes the peer's result.
    async fn call<Q: Serialize, A: DeserializeOwned, E: DeserializeOwned>(
        &self,
        kind: RaftRpcKind,
        request: &Q,
        timeout: Duration,
    ) -> Result<Result<A, E>, Failure> {
        let payload =
            postcard::to_stdvec(request).map_err(|e| Failure::Unreachable(AnyError::new(&e)))?;
        let max = self.transport.limits().max_frame;
        if payload.len() + FRAME_OVERHEAD > max {
            return Err(Failure::TooLarge {
                bytes: payload.len(),
                max: max - FRAME_OVERHEAD,
            });
        }
        let request = AdminRequest::Raft(RaftRpc { kind, payload });
        let (transport, addr) = (self.transport.clone(), self.member.addr.clone());
        let backstop = timeout * BACKSTOP_FACTOR;
        let exchange = tokio::spawn(async move {
            transport
                .call::<_, AdminReply>(&addr, &request, backstop)
                .await
        });
        let called = exchange.await.map_err(|e| {
            Failure::Network(AnyError::error(format!("the request task failed: {e}")))
        })?;
        let reply = called.map_err(|e| match e {
            TransportError::Address { .. }
            | TransportError::Connect { .. }
            | TransportError::NotTaken { .. }
            | TransportError::Encode(_)
            | TransportError::Tls(_)
            | TransportError::Bind(_) => Failure::Unreachable(AnyError::new(&e)),
            TransportError::Stream { .. } | TransportError::Protocol { .. } => {
                Failure::Network(AnyError::new(&e))
            }
        })?;
        match reply {
            AdminReply::Raft(bytes) => postcard::from_bytes(&bytes).map_err(|e| {
                Failure::Network(AnyError::error(format!(
                    "member {} sent a {kind:?} result that does not decode: {e}",
                    self.target
                )))
            }),
            AdminReply::Error(reason) => Err(Failure::Unreachable(AnyError::error(format!(
                "member {} ({}) refused the {kind:?} message: {reason}",
                self.target, self.member
            )))),
            other => Err(Failure::Network(AnyError::error(format!(
                "member {} answered a {kind:?} message with {other:?}",
                self.target
            )))),
        }
    }

    fn remote<E: std::error::Error>(&self, error: E) -> RPCError<MemberId, Member, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.member.clone(),
            error,
        ))
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RPCError<MemberId, Member, OpenRaftError<MemberId>>>
    {
        let entries = rpc.entries.len() as u64;
        match self
            .call(RaftRpcKind::AppendEntries, &rpc, option.hard_ttl())
            .await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.remote(e)),
            // Fewer entries fit: let openraft split the batch.
            Err(Failure::TooLarge { .. }) if entries > 1 => {
                Err(PayloadTooLarge::new_entries_hint(entries / 2).into())
            }
            Err(failure) => Err(failure.into_rpc()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<MemberId>,
        RPCError<MemberId, Member, OpenRaftError<MemberId, InstallSnapshotError>>,
    > {
        match self
            .call(RaftRpcKind::InstallSnapshot, &rpc, option.hard_ttl())
            .await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(failure) => Err(failure.into_rpc()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MemberId>,
        option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, RPCError<MemberId, Member, OpenRaftError<MemberId>>> {
        match self.call(RaftRpcKind::Vote, &rpc, option.hard_ttl()).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(failure) => Err(failure.into_rpc()),
        }
    }
}
