//! Range moves: `LockRange`, `UnlockRange`, `TransferRange`, `PutBatch`, `DeleteRange`.

use ringkv_wire::{
    ErrorKind, KeyRange, NodeEntry, ReplyBody, Request, RequestBody, StorageEntry, TransferStats,
};

use super::{error, storage_error};
use crate::Node;

/// `LockRange`: returns once no write into the range is in flight.
pub async fn lock(node: &Node, range: KeyRange) -> ReplyBody {
    node.lock_range(range).await;
    ReplyBody::Ok
}

/// `UnlockRange`.
pub async fn unlock(node: &Node, range: KeyRange) -> ReplyBody {
    node.unlock_range(range).await;
    ReplyBody::Ok
}

/// `TransferRange`: streams a consistent snapshot of `range` to `to` in batches; each batch
/// is acknowledged by `to` only after it persisted it. Replies `Transferred` when all are.
pub async fn transfer(node: &Node, range: KeyRange, to: NodeEntry) -> ReplyBody {
    let mut batches = node
        .store
        .scan_range(range, node.config.transfer_batch_bytes);
    let mut stats = TransferStats::default();
    let version = node.metadata_version();
    while let Some(batch) = batches.recv().await {
        let entries = match batch {
            Ok(entries) => entries,
            Err(e) => return storage_error(e),
        };
        let n = entries.len() as u64;
        let bytes: u64 = entries
            .iter()
            .map(|e| (e.key.len() + e.value.len()) as u64)
            .sum();
        let request = Request::new(version, RequestBody::PutBatch { entries });
        match node.peers.request(&to.addr, &request).await {
            Ok(reply) if reply.body == ReplyBody::Ok => {
                stats.entries += n;
                stats.bytes += bytes;
            }
            Ok(reply) => {
                return error(
                    ErrorKind::Peer,
                    format!("{} refused a transfer batch: {:?}", to.name, reply.body),
                )
            }
            Err(e) => {
                return error(
                    ErrorKind::Peer,
                    format!(
                        "transfer to {} failed after {} entries: {e}",
                        to.name, stats.entries
                    ),
                )
            }
        }
    }
    tracing::info!(node = %node.config.name, to = %to.name, range = ?range, entries = stats.entries, bytes = stats.bytes, "range transferred");
    ReplyBody::Transferred(stats)
}

/// `PutBatch`: persists a transfer batch before acknowledging it.
pub async fn put_batch(node: &Node, entries: Vec<StorageEntry>) -> ReplyBody {
    for e in &entries {
        if let Err(err) = node.config.limits.check_put(&e.key, &e.value) {
            return error(ErrorKind::Malformed, format!("bad entry in batch: {err}"));
        }
    }
    match node.store.put_batch(entries).await {
        Ok(()) => ReplyBody::Ok,
        Err(e) => storage_error(e),
    }
}

/// `DeleteRange`: refused while the node still owns any of the range under its metadata,
/// so that data is never deleted before the new owner is official.
pub async fn delete(node: &Node, range: KeyRange) -> ReplyBody {
    if let Some(own) = node.view().own_range {
        if own.intersects(&range) {
            return error(
                ErrorKind::InvalidState,
                format!(
                    "refusing to delete {range:?}: this node still owns {own:?} at metadata v{}",
                    node.metadata_version()
                ),
            );
        }
    }
    match node.store.delete_range(range).await {
        Ok(n) => ReplyBody::Count(n),
        Err(e) => storage_error(e),
    }
}
