//! Request handlers, one module per kind of request, dispatched by [`crate::Node::handle`].
//!
//! - [`data`]: `Get`, `Put`, `Delete`, their conditional, batch and expiring forms (the
//!   client data path), and `Replicate`/`ReplicateBatch`/`Expire` between nodes.
//! - [`metadata`]: `GetMetadata`, `InstallMetadata`.
//! - [`admin`]: `Status`, `Start`, `Stop`.
//! - [`gossip`]: `Gossip`, `GossipPush`.
//! - [`scan`]: `Scan`, one page of a scan in hash order.
//! - [`range`]: `LockRange`, `AbortMove`, `PrepareReceive`, `TransferRange`, `TransferDelta`,
//!   `PutBatch`, `DeleteRange`.

pub mod admin;
pub mod data;
pub mod gossip;
pub mod metadata;
pub mod range;
pub mod scan;

use ringkv_certs::Role;
use ringkv_wire::{ErrorKind, RequestBody};

use crate::NodeError;

/// Whether a peer with certificate role `role` may send `body` (least privilege, README
/// "Security model"):
/// - `client`: the client requests only;
/// - `admin` (an operator): the client requests and `Status`; operators change the cluster
///   through the ECS, not by talking to nodes;
/// - `node`: the client requests, `Status`, gossip, the batches of a move the ECS
///   announced ([`range::put_batch`] checks the rest), chain writes from its predecessor
///   ([`data::replicate`] checks that) and `Expire` (a tail asking the head);
/// - `ecs`: everything else (metadata, leases, locks, transfers, range deletion,
///   start/stop), but neither batches, chain writes, `Expire` nor gossip, which only nodes
///   send;
///   and `Fenced`, the same requests stamped with the ECS leader's Raft term
///   ([`crate::Node::handle`] checks the term), never one `Fenced` inside another.
pub fn allowed(role: Role, body: &RequestBody) -> bool {
    match role {
        Role::Ecs => match body {
            RequestBody::Fenced { body, .. } => {
                !matches!(**body, RequestBody::Fenced { .. }) && allowed(Role::Ecs, body)
            }
            body => !matches!(
                body,
                RequestBody::PutBatch { .. }
                    | RequestBody::Gossip { .. }
                    | RequestBody::GossipPush { .. }
                    | RequestBody::Replicate { .. }
                    | RequestBody::ReplicateBatch { .. }
                    | RequestBody::Expire { .. }
            ),
        },
        Role::Client => body.is_client_request(),
        Role::Admin => body.is_client_request() || matches!(body, RequestBody::Status),
        Role::Node => {
            body.is_client_request()
                || matches!(
                    body,
                    RequestBody::PutBatch { .. }
                        | RequestBody::Replicate { .. }
                        | RequestBody::ReplicateBatch { .. }
                        | RequestBody::Expire { .. }
                        | RequestBody::Status
                        | RequestBody::Gossip { .. }
                        | RequestBody::GossipPush { .. }
                )
        }
    }
}

/// An `Error` reply.
pub fn error(kind: ErrorKind, message: impl Into<String>) -> ringkv_wire::ReplyBody {
    ringkv_wire::ReplyBody::Error {
        kind,
        message: message.into(),
    }
}

/// The `Error` reply for a node-side failure.
pub fn storage_error(e: NodeError) -> ringkv_wire::ReplyBody {
    tracing::error!(error = %e, "request failed in storage");
    error(ErrorKind::Storage, e.to_string())
}
