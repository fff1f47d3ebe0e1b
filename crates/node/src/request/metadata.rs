//! `GetMetadata` and `InstallMetadata`.

use ringkv_wire::{ReplyBody, RingMetadata};

use super::{error, storage_error};
use crate::Node;

/// `GetMetadata`: answered whether or not the node is running.
pub fn get(node: &Node) -> ReplyBody {
    ReplyBody::Metadata((*node.view().metadata).clone())
}

/// `InstallMetadata`: refused if it breaks a ring invariant; adopted only if newer; `Ok`
/// either way (the reply's version tells the sender what the node now holds).
pub async fn install(node: &Node, metadata: RingMetadata) -> ReplyBody {
    if let Err(e) = metadata.validate() {
        tracing::warn!(node = %node.config.name, version = metadata.version, error = %e, "refused ring metadata");
        return error(e.kind(), e.to_string());
    }
    match node.install_metadata(metadata).await {
        Ok(_) => ReplyBody::Ok,
        Err(e) => storage_error(e),
    }
}
