//! `GetMetadata` and `InstallMetadata`.

use ringkv_wire::{ReplyBody, RingMetadata};

use super::storage_error;
use crate::Node;

/// `GetMetadata`: answered whether or not the node is running.
pub fn get(node: &Node) -> ReplyBody {
    ReplyBody::Metadata((*node.view().metadata).clone())
}

/// `InstallMetadata`: adopted only if newer; `Ok` either way (the reply's version tells the
/// sender what the node now holds).
pub async fn install(node: &Node, metadata: RingMetadata) -> ReplyBody {
    match node.install_metadata(metadata).await {
        Ok(_) => ReplyBody::Ok,
        Err(e) => storage_error(e),
    }
}
