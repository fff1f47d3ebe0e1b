//! `Gossip` and `GossipPush`: the responder's side of a gossip exchange (the initiator's
//! is [`crate::gossip::driver`]).

use std::time::Instant;

use ringkv_certs::PeerIdentity;
use ringkv_wire::{ErrorKind, GossipDigest, ReplyBody, SignedMetadata};

use super::error;
use crate::Node;

/// `Gossip`: merge the caller's digest, answer with ours (and our metadata if theirs is
/// older). A digest must come from the node it names: `from` is the caller's certificate
/// name, so a node cannot speak for another's heartbeat.
pub fn exchange(node: &Node, peer: &PeerIdentity, digest: GossipDigest) -> ReplyBody {
    if digest.from != peer.name {
        tracing::warn!(node = %node.config.name, peer = %peer.name, claimed = %digest.from, "refused a gossip digest sent in another node's name");
        return error(
            ErrorKind::Forbidden,
            format!(
                "gossip digest from {:?} sent with the certificate of {:?}",
                digest.from, peer.name
            ),
        );
    }
    let (digest, metadata) = node
        .gossip
        .lock()
        .expect("gossip lock")
        .on_digest(&digest, Instant::now());
    ReplyBody::Gossip { digest, metadata }
}

/// `GossipPush`: adopt the caller's metadata if the ECS signed it and it is newer
/// (persisted first, like any install). Metadata that does not verify is refused, counted
/// and changes nothing.
pub async fn push(node: &Node, metadata: SignedMetadata) -> ReplyBody {
    match node.install_metadata(metadata, "gossip").await {
        Ok(_) => ReplyBody::Ok,
        Err(e) => super::metadata::install_error(e),
    }
}
