//! Request handlers, one module per kind of request, dispatched by [`crate::Node::handle`].
//!
//! - [`data`]: `Get`, `Put`, `Delete` (the client data path).
//! - [`metadata`]: `GetMetadata`, `InstallMetadata`.
//! - [`admin`]: `Status`, `Start`, `Stop`.
//! - [`gossip`]: `Gossip`, `GossipPush`.
//! - [`range`]: `LockRange`, `UnlockRange`, `TransferRange`, `TransferDelta`, `PutBatch`,
//!   `DeleteRange`.

pub mod admin;
pub mod data;
pub mod gossip;
pub mod metadata;
pub mod range;

use ringkv_certs::Role;
use ringkv_wire::{ErrorKind, RequestBody};

use crate::NodeError;

/// Whether a peer with certificate role `role` may send `body`: clients only the client
/// requests; nodes also what nodes exchange among themselves (batches of a transfer,
/// metadata, status, gossip); admins (the ECS) everything.
pub fn allowed(role: Role, body: &RequestBody) -> bool {
    match role {
        Role::Admin => true,
        Role::Client => body.is_client_request(),
        Role::Node => {
            body.is_client_request()
                || matches!(
                    body,
                    RequestBody::PutBatch { .. }
                        | RequestBody::InstallMetadata { .. }
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
