//! `Status`, `Start`, `Stop`.

use ringkv_wire::{NodeStatus, ReplyBody};

use super::storage_error;
use crate::Node;

/// `Status`: name, address, serving state, metadata version, key count, locked ranges,
/// the node's gossip view of its peers' liveness, and the highest ECS term it has seen.
pub async fn status(node: &Node) -> ReplyBody {
    let keys = match node.store.len() {
        Ok(n) => n,
        Err(e) => return storage_error(e),
    };
    let stats = node.store.write_stats();
    ReplyBody::Status(Box::new(NodeStatus {
        name: node.config.name.clone(),
        addr: node.config.advertise.clone(),
        running: node.is_running(),
        metadata_version: node.metadata_version(),
        keys,
        writes: stats.writes,
        write_commits: stats.commits,
        hop_batches: node.hops.sent().batches,
        hop_writes: node.hops.sent().writes,
        metadata_refused: node.authority.refused(),
        locked: node.moves().locked_ranges(),
        peers: node.peer_liveness(),
        ecs_term: node.ecs_term(),
    }))
}

/// `Start` / `Stop`.
pub fn set_running(node: &Node, running: bool) -> ReplyBody {
    node.set_running(running);
    ReplyBody::Ok
}
