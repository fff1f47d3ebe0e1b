//! The serving side of the Raft network: a member's answers to the Raft messages of the others.
//!
//! [`RaftService::handle`] is what the ECS service calls for an [`AdminRequest::Raft`]. The
//! ECS service admits only `admin` certificates today; once it serves a Raft member it must
//! also admit `ecs` ones at connection time, hand their [`AdminRequest::Raft`] messages to
//! [`RaftService::handle`] and refuse them every operator request (an `ecs` certificate is a
//! peer member, not an operator), as [`RaftServer`] does.
//!
//! Who may send what ([`admit`] decides, before the payload reaches Raft):
//! - A Raft message is taken only from an `ecs` certificate. Any other role gets
//!   [`AdminReply::Error`] and changes nothing.
//! - Once this member knows a membership, a message is taken only from the member it claims
//!   to come from (the candidate of a vote, the leader of an append or a snapshot), and only
//!   if that member is in the membership (voter or learner) under the presenting
//!   certificate's name. An `ecs` certificate that names no member — a spare, or a member
//!   that was removed — is refused, whatever it claims. The membership is the one this member
//!   holds (the latest in its log, committed or not): a removed leader's heartbeats are
//!   refused as soon as the entry removing it is appended here, which only makes the others
//!   elect a new leader sooner (the entry itself was taken while the leader was a member).
//! - A member that knows no membership yet (started to be added, its store pristine) cannot
//!   tell a leader from anyone else: it takes appends and snapshots from any `ecs`
//!   certificate, as it must from the leader that adds it, until an entry or a snapshot gives
//!   it the membership; it takes no vote (it is nobody's voter yet, and a vote could only
//!   raise its term). A member removed and added again under the same id must be able to
//!   check its leader in the membership it last held, else it is added back under a new id
//!   with a fresh state directory.
//! - The term of any vote, append or snapshot may be at most [`MAX_TERM_LEAP`] above this
//!   member's term and never above [`MAX_TERM`], so neither a hostile term nor openraft's
//!   `term + 1` after it can come near `u64::MAX`.
//! - The payload is decoded only as the request its kind names, under the frame limit; a
//!   payload that does not decode is answered with an error.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use openraft::{Membership, Vote};
use quinn::Endpoint;
use ringkv_certs::{Identity, PeerIdentity, Role};
use ringkv_transport::{ServeLimits, Service};
use ringkv_wire::{AdminReply, AdminRequest, Limits, RaftRpc, RaftRpcKind, WireError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Member, MemberId, Raft, RaftError, TypeConfig};

/// How far above this member's term the term of a Raft message may be. Terms grow by one
/// per election round; 2^32 rounds, even at ten a second, take over thirteen years, so a
/// member of a working group is never that far behind a genuine leader or candidate. Without
/// a bound, one message could set the group's term (and, through fencing, every node's) to
/// anything, up to `u64::MAX`, where openraft's `term + 1` at the next election overflows: a
/// panic on every member, again after each restart, since the vote is persisted.
pub const MAX_TERM_LEAP: u64 = 1 << 32;

/// The highest term taken at all, however it was approached in steps of [`MAX_TERM_LEAP`]:
/// half the range, so `term + 1` can never overflow.
pub const MAX_TERM: u64 = u64::MAX / 2;

/// Why a Raft message was refused before it reached Raft; nothing changed. Its text is the
/// [`AdminReply::Error`] the sender gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcRefusal {
    /// The certificate is not an `ecs` one.
    #[error(
        "Raft messages are taken only from ecs certificates; {name} presented a {role} certificate"
    )]
    NotEcs {
        /// The certificate's name.
        name: String,
        /// Its role.
        role: Role,
    },
    /// The payload does not decode as the request its kind names.
    #[error("malformed {kind:?} message: {reason}")]
    Malformed {
        /// The kind it claimed.
        kind: RaftRpcKind,
        /// The decoder's complaint.
        reason: String,
    },
    /// The member the message claims to come from is not in the membership this member
    /// knows (a removed member, or an id nobody holds).
    #[error("a {kind:?} message from certificate {name} claims to come from {}, which is not in the membership", claimed(.id))]
    NotAMember {
        /// The kind of message.
        kind: RaftRpcKind,
        /// The member it claimed to come from.
        id: Option<MemberId>,
        /// The presenting certificate's name.
        name: String,
    },
    /// The member the message claims to come from is in the membership under another
    /// certificate name: a certificate speaks for its own member only.
    #[error(
        "a {kind:?} message from member {id} must come from certificate {expected}, not {name}"
    )]
    NotTheSender {
        /// The kind of message.
        kind: RaftRpcKind,
        /// The member it claimed to come from.
        id: MemberId,
        /// That member's certificate name in the membership.
        expected: String,
        /// The presenting certificate's name.
        name: String,
    },
    /// A vote to a member that knows no membership yet (waiting to be added).
    #[error("a vote from certificate {name} to a member that knows no membership yet")]
    NoMembershipYet {
        /// The presenting certificate's name.
        name: String,
    },
    /// The message's term is more than [`MAX_TERM_LEAP`] above this member's, or above
    /// [`MAX_TERM`].
    #[error("a {kind:?} message in term {term}: more than {MAX_TERM_LEAP} above this member's term {current}, or above {MAX_TERM}")]
    TermTooFar {
        /// The kind of message.
        kind: RaftRpcKind,
        /// Its term.
        term: u64,
        /// This member's term.
        current: u64,
    },
}

/// How [`RpcRefusal::NotAMember`] names the member claimed.
fn claimed(id: &Option<MemberId>) -> String {
    id.map_or_else(|| "no member".into(), |id| format!("member {id}"))
}

/// Whether this member (whose term is `current` and whose membership is `membership`) takes a
/// message of `kind` in `vote` from the certificate `peer` (module documentation).
pub fn admit(
    peer: &PeerIdentity,
    kind: RaftRpcKind,
    vote: &Vote<MemberId>,
    membership: &Membership<MemberId, Member>,
    current: u64,
) -> Result<(), RpcRefusal> {
    if peer.role != Role::Ecs {
        return Err(RpcRefusal::NotEcs {
            name: peer.name.clone(),
            role: peer.role,
        });
    }
    if membership.nodes().next().is_none() {
        if kind == RaftRpcKind::Vote {
            return Err(RpcRefusal::NoMembershipYet {
                name: peer.name.clone(),
            });
        }
    } else {
        let id = vote.leader_id().voted_for();
        match id.and_then(|id| membership.get_node(&id).map(|member| (id, member))) {
            None => {
                return Err(RpcRefusal::NotAMember {
                    kind,
                    id,
                    name: peer.name.clone(),
                })
            }
            Some((id, member)) if member.name != peer.name => {
                return Err(RpcRefusal::NotTheSender {
                    kind,
                    id,
                    expected: member.name.clone(),
                    name: peer.name.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let term = vote.leader_id().term;
    if term > current.saturating_add(MAX_TERM_LEAP) || term > MAX_TERM {
        return Err(RpcRefusal::TermTooFar {
            kind,
            term,
            current,
        });
    }
    Ok(())
}

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
    /// result of the Raft library, or [`AdminReply::Error`] if the message is refused
    /// ([`RpcRefusal`]).
    pub async fn handle(&self, peer: &PeerIdentity, rpc: RaftRpc) -> AdminReply {
        match self.answer(peer, &rpc).await {
            Ok(reply) => reply,
            Err(refusal) => {
                tracing::warn!(peer = %peer.name, role = %peer.role, kind = ?rpc.kind, %refusal, "refused a Raft message");
                AdminReply::Error(refusal.to_string())
            }
        }
    }

    async fn answer(&self, peer: &PeerIdentity, rpc: &RaftRpc) -> Result<AdminReply, RpcRefusal> {
        if peer.role != Role::Ecs {
            // Not even decoded.
            return Err(RpcRefusal::NotEcs {
                name: peer.name.clone(),
                role: peer.role,
            });
        }
        Ok(match rpc.kind {
            RaftRpcKind::AppendEntries => {
                let request = self.open(
                    peer,
                    rpc,
                    |r: &openraft::raft::AppendEntriesRequest<TypeConfig>| &r.vote,
                )?;
                reply(&self.raft.append_entries(request).await)
            }
            RaftRpcKind::Vote => {
                let request =
                    self.open(peer, rpc, |r: &openraft::raft::VoteRequest<MemberId>| {
                        &r.vote
                    })?;
                reply(&self.raft.vote(request).await)
            }
            RaftRpcKind::InstallSnapshot => {
                let request = self.open(
                    peer,
                    rpc,
                    |r: &openraft::raft::InstallSnapshotRequest<TypeConfig>| &r.vote,
                )?;
                reply(&self.raft.install_snapshot(request).await)
            }
        })
    }

    /// Decodes `rpc`'s payload as `T` and checks ([`admit`]) that `peer` may send it, given
    /// its `vote`.
    fn open<T: DeserializeOwned>(
        &self,
        peer: &PeerIdentity,
        rpc: &RaftRpc,
        vote: impl FnOnce(&T) -> &Vote<MemberId>,
    ) -> Result<T, RpcRefusal> {
        let request: T = postcard::from_bytes(&rpc.payload).map_err(|e| RpcRefusal::Malformed {
            kind: rpc.kind,
            reason: e.to_string(),
        })?;
        let (membership, current) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            (
                metrics.membership_config.membership().clone(),
                metrics.current_term,
            )
        };
        admit(peer, rpc.kind, vote(&request), &membership, current)?;
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
