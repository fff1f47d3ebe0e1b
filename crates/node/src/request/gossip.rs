//! `Gossip` and `GossipPush`: the responder's side of a gossip exchange (the initiator's
//! is [`crate::gossip::driver`]).

use std::time::Instant;

use ringkv_wire::{EncodedMetadata, ErrorKind, GossipDigest, ReplyBody};

use super::{error, storage_error};
use crate::Node;

/// `Gossip`: merge the caller's digest, answer with ours (and our metadata if theirs is
/// older).
pub fn exchange(node: &Node, digest: GossipDigest) -> ReplyBody {
    let (digest, metadata) = node
        .gossip
        .lock()
        .expect("gossip lock")
        .on_digest(&digest, Instant::now());
    ReplyBody::Gossip { digest, metadata }
}

/// `GossipPush`: adopt the caller's metadata if it is newer (persisted first, like any
/// install). Metadata that does not decode is refused and changes nothing.
pub async fn push(node: &Node, metadata: EncodedMetadata) -> ReplyBody {
    if metadata.version <= node.metadata_version() {
        return ReplyBody::Ok;
    }
    let decoded = match metadata.decode() {
        Ok(decoded) => decoded,
        Err(e) => {
            tracing::warn!(node = %node.config.name, error = %e, "refused gossiped metadata");
            return error(ErrorKind::Malformed, format!("gossiped metadata: {e}"));
        }
    };
    match node.install_gossiped(decoded, metadata).await {
        Ok(_) => ReplyBody::Ok,
        Err(e) => storage_error(e),
    }
}
