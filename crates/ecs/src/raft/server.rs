//! The serving side of the Raft network: a member's answers to the Raft messages of the others.
//!
//! [`RaftService::handle`] is what the ECS service calls for an [`AdminRequest::Raft`]. The
//! ECS service admits only `admin` certificates today; once it serves a Raft member it must
//! also admit `ecs` ones at connection time, hand their [`AdminRequest::Raft`] messages to
//! [`RaftService::handle`] and refuse them every operator request (an `ecs` certificate is a
//! peer member, not an operator), as [`RaftServer`] does.
//!
//! Who may send what:
//! - A Raft message is taken only from an `ecs` certificate. Any other role gets
//!   [`AdminReply::Error`] and changes nothing.
//! - A message claiming to come from a member (the candidate of a vote, the leader of an
//!   append or a snapshot) is refused if the membership this member knows names that member
//!   with another certificate name: a member's certificate speaks for that member only. A
//!   member the membership does not know yet (this member is new, or behind) is not checked.
//! - The payload is decoded only as the request its kind names, under the frame limit; a
//!   payload that does not decode is answered with an error.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use quinn::Endpoint;
use ringkv_certs::{Identity, PeerIdentity, Role};
use ringkv_transport::{ServeLimits, Service};
use ringkv_wire::{AdminReply, AdminRequest, Limits, RaftRpc, RaftRpcKind, WireError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{MemberId, Raft, RaftError, TypeConfig};

/// Answers other members' Raft messages for one member. Cloning shares the member.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
}

impl RaftService {
    /// The service of the member `raft`.
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }

    /// Answers the Raft message `rpc` from `peer`: [`AdminReply::Raft`] with the encoded
    /// result of the Raft library, or [`AdminReply::Error`] if the message is refused (wrong
    /// role, a certificate that is not the sender's, a payload that does not decode).
    pub async fn handle(&self, peer: &PeerIdentity, rpc: RaftRpc) -> AdminReply {
        if peer.role != Role::Ecs {
            return AdminReply::Error(format!(
                "Raft messages are taken only from ecs certificates; {} presented a {} certificate",
                peer.name, peer.role
            ));
        }
        match rpc.kind {
            RaftRpcKind::AppendEntries => {
                let request = match self.open(
                    peer,
                    &rpc,
                    |r: &openraft::raft::AppendEntriesRequest<TypeConfig>| {
                        r.vote.leader_id().voted_for()
                    },
                ) {
                    Ok(r) => r,
                    Err(refusal) => return AdminReply::Error(refusal),
                };
                reply(&self.raft.append_entries(request).await)
            }
            RaftRpcKind::Vote => {
                let request =
                    match self.open(peer, &rpc, |r: &openraft::raft::VoteRequest<MemberId>| {
                        r.vote.leader_id().voted_for()
                    }) {
                        Ok(r) => r,
                        Err(refusal) => return AdminReply::Error(refusal),
                    };
                reply(&self.raft.vote(request).await)
            }
            RaftRpcKind::InstallSnapshot => {
                let request = match self.open(
                    peer,
                    &rpc,
                    |r: &openraft::raft::InstallSnapshotRequest<TypeConfig>| {
                        r.vote.leader_id().voted_for()
                    },
                ) {
                    Ok(r) => r,
                    Err(refusal) => return AdminReply::Error(refusal),
                };
                reply(&self.raft.install_snapshot(request).await)
            }
        }
    }

    /// Decodes `rpc`'s payload as `T` and checks that `peer` may speak for the member that
    /// `sender` says sent it; the reason for refusing it otherwise.
    fn open<T: DeserializeOwned>(
        &self,
        peer: &PeerIdentity,
        rpc: &RaftRpc,
        sender: impl FnOnce(&T) -> Option<MemberId>,
    ) -> Result<T, String> {
        let request: T = postcard::from_bytes(&rpc.payload)
            .map_err(|e| format!("malformed {:?} message: {e}", rpc.kind))?;
        if let Some(id) = sender(&request) {
            let metrics = self.raft.metrics();
            let membership = metrics.borrow().membership_config.clone();
            if let Some(member) = membership.membership().get_node(&id) {
                if member.name != peer.name {
                    return Err(format!(
                        "a {:?} message from member {id} must come from certificate {}, not {}",
                        rpc.kind, member.name, peer.name
                    ));
                }
            }
        }
        Ok(request)
    }
}

/// The encoded result of the Raft library, as the reply.
fn reply<T: Serialize>(result: &T) -> AdminReply {
    match postcard::to_stdvec(result) {
        Ok(bytes) => AdminReply::Raft(bytes),
        Err(e) => AdminReply::Error(format!("cannot encode the Raft result: {e}")),
    }
}

/// A standalone server of one member's Raft messages (a [`ringkv_transport::Service`], run
/// with [`ringkv_transport::serve`]): for members whose endpoint serves nothing else, and for
/// tests. It admits `ecs` certificates, which it serves, and `admin` ones, which get a clear
/// refusal per request rather than a closed connection; it closes any other role's connection
/// at connection time, before reading a frame.
pub struct RaftServer {
    service: RaftService,
    limits: ServeLimits,
}

impl RaftServer {
    /// A server of `service`, enforcing `limits`.
    pub fn new(service: RaftService, limits: ServeLimits) -> Self {
        Self { service, limits }
    }
}

impl Service for RaftServer {
    type Request = AdminRequest;
    type Reply = AdminReply;

    fn name(&self) -> &str {
        "ecs-raft"
    }

    fn max_frame(&self) -> usize {
        Limits::default().max_frame
    }

    fn serve_limits(&self) -> ServeLimits {
        self.limits
    }

    fn admits(&self, role: Role) -> bool {
        matches!(role, Role::Ecs | Role::Admin)
    }

    fn handle(
        &self,
        peer: &PeerIdentity,
        request: AdminRequest,
    ) -> impl Future<Output = AdminReply> + Send {
        let service = self.service.clone();
        let peer = peer.clone();
        async move {
            match request {
                AdminRequest::Raft(rpc) => service.handle(&peer, rpc).await,
                _ => AdminReply::Error(
                    "this endpoint serves only Raft messages between ECS members; operator \
                     requests go to the ECS service"
                        .into(),
                ),
            }
        }
    }

    fn bad_frame(&self, error: WireError) -> AdminReply {
        AdminReply::Error(format!("bad request frame: {error}"))
    }

    fn unencodable(&self, error: WireError) -> AdminReply {
        AdminReply::Error(format!("reply too large: {error}"))
    }
}

/// Binds a member's endpoint on `listen` with its `identity` (an `ecs` certificate whose SANs
/// cover the address peers dial), its stateless-reset key kept in `state_dir` (so peers of a
/// restarted member drop their old connections at once, ARCHITECTURE.md §3) and `limits`.
/// The same endpoint serves ([`RaftServer`]) and dials the other members.
pub fn bind(
    listen: SocketAddr,
    identity: &Identity,
    state_dir: &Path,
    limits: ServeLimits,
) -> Result<Endpoint, RaftError> {
    ringkv_certs::install_crypto_provider();
    std::fs::create_dir_all(state_dir)?;
    let secret = ringkv_transport::reset_secret(state_dir)?;
    let mut server_config = ringkv_certs::server_config(identity)?;
    limits.apply(&mut server_config);
    Ok(ringkv_transport::bind_endpoint(
        listen,
        server_config,
        Some(&secret),
    )?)
}

/// Serves `server` on `endpoint` until `shutdown` (see [`ringkv_transport::serve`]).
pub async fn run(endpoint: Endpoint, server: Arc<RaftServer>, shutdown: impl Future<Output = ()>) {
    ringkv_transport::serve(endpoint, server, shutdown).await;
}
