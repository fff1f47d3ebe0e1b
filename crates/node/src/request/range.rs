//! Range moves: `LockRange`, `UnlockRange`, `TransferRange`, `TransferDelta`, `PutBatch`,
//! `DeleteRange`.

use ringkv_wire::{
    ErrorKind, KeyRange, NodeEntry, ReplyBody, Request, RequestBody, StorageEntry, TransferStats,
};

use futures::stream::{FuturesUnordered, StreamExt};

use super::{error, storage_error};
use crate::storage::Batcher;
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

/// Transfer batches in flight at once: enough to keep the link and the receiver's disk busy
/// while the next batch is read.
const TRANSFER_WINDOW: usize = 4;

/// `TransferRange`: starts tracking writes into `range`, then streams a consistent snapshot
/// of it to `to` in batches, several in flight; each batch is acknowledged by `to` only
/// after it persisted it. Replies `Transferred` when all are. Writes into the range go on
/// meanwhile; `TransferDelta` sends what they changed.
pub async fn transfer(node: &Node, range: KeyRange, to: NodeEntry) -> ReplyBody {
    // Tracking starts before the snapshot: every write the snapshot misses is tracked.
    node.start_tracking(range).await;
    let batches = node
        .store
        .scan_range(range, node.config.transfer_batch_bytes);
    let reply = send_batches(node, &to, batches, node.config.transfer_rate_limit).await;
    if let ReplyBody::Transferred(stats) = &reply {
        tracing::info!(node = %node.config.name, to = %to.name, range = ?range, entries = stats.entries, bytes = stats.bytes, "range snapshot transferred");
    }
    reply
}

/// `TransferDelta`: with `range` write-locked (so the set of changed keys is final), sends
/// the current value or the deletion of every key written since the snapshot, and ends the
/// tracking.
pub async fn transfer_delta(node: &Node, range: KeyRange, to: NodeEntry) -> ReplyBody {
    if !node.is_locked(&range).await {
        return error(
            ErrorKind::InvalidState,
            format!("{range:?} must be write-locked for a delta transfer"),
        );
    }
    let Some(keys) = node.stop_tracking(&range) else {
        return error(
            ErrorKind::InvalidState,
            format!("no transfer of {range:?} is being tracked"),
        );
    };
    let mut batcher = Batcher::new(node.config.transfer_batch_bytes);
    let mut batches = Vec::new();
    for key in keys {
        let value = match node.store.get(&key) {
            Ok(v) => v,
            Err(e) => return storage_error(e),
        };
        batches.extend(batcher.push(StorageEntry { key, value }));
    }
    batches.extend(batcher.finish());
    let (tx, rx) = tokio::sync::mpsc::channel(batches.len().max(1));
    for batch in batches {
        tx.try_send(Ok(batch))
            .expect("channel sized for every batch");
    }
    drop(tx);
    let reply = send_batches(node, &to, rx, None).await;
    if let ReplyBody::Transferred(stats) = &reply {
        tracing::info!(node = %node.config.name, to = %to.name, range = ?range, entries = stats.entries, "range delta transferred");
    }
    reply
}

/// Sends every batch from `batches` to `to` as `PutBatch` requests, up to
/// [`TRANSFER_WINDOW`] in flight and, with a `rate_limit`, no faster than that many bytes
/// per second on average. Replies `Transferred` once all are acknowledged.
async fn send_batches(
    node: &Node,
    to: &NodeEntry,
    mut batches: tokio::sync::mpsc::Receiver<Result<Vec<StorageEntry>, crate::NodeError>>,
    rate_limit: Option<u64>,
) -> ReplyBody {
    let started = tokio::time::Instant::now();
    let mut sent_bytes = 0u64;
    let mut stats = TransferStats::default();
    let version = node.metadata_version();
    let send = |entries: Vec<StorageEntry>| {
        let n = entries.len() as u64;
        let bytes = entry_bytes(&entries);
        let request = Request::new(version, RequestBody::PutBatch { entries });
        async move {
            match node.peers.request(&to.addr, &request).await {
                Ok(reply) if reply.body == ReplyBody::Ok => Ok((n, bytes)),
                Ok(reply) => Err(format!(
                    "{} refused a transfer batch: {:?}",
                    to.name, reply.body
                )),
                Err(e) => Err(format!("transfer to {} failed: {e}", to.name)),
            }
        }
    };
    let mut in_flight = FuturesUnordered::new();
    let mut scanned_all = false;
    loop {
        while !scanned_all && in_flight.len() < TRANSFER_WINDOW {
            match batches.recv().await {
                Some(Ok(entries)) => {
                    if let Some(rate) = rate_limit.filter(|r| *r > 0) {
                        // Pace: the bytes sent so far may not have left before `due`.
                        let due = started
                            + std::time::Duration::from_secs_f64(sent_bytes as f64 / rate as f64);
                        tokio::time::sleep_until(due).await;
                        sent_bytes += entry_bytes(&entries);
                    }
                    in_flight.push(send(entries))
                }
                Some(Err(e)) => return storage_error(e),
                None => scanned_all = true,
            }
        }
        match in_flight.next().await {
            Some(Ok((n, bytes))) => {
                stats.entries += n;
                stats.bytes += bytes;
            }
            Some(Err(message)) => {
                return error(
                    ErrorKind::Peer,
                    format!("{message} (after {} entries acknowledged)", stats.entries),
                )
            }
            None => break, // nothing in flight and nothing left to send
        }
    }
    ReplyBody::Transferred(stats)
}

/// User bytes (keys and values) of a batch.
fn entry_bytes(entries: &[StorageEntry]) -> u64 {
    entries
        .iter()
        .map(|e| (e.key.len() + e.value.as_ref().map_or(0, Vec::len)) as u64)
        .sum()
}

/// `PutBatch`: persists a transfer batch before acknowledging it.
pub async fn put_batch(node: &Node, entries: Vec<StorageEntry>) -> ReplyBody {
    for e in &entries {
        let checked = match &e.value {
            Some(value) => node.config.limits.check_put(&e.key, value),
            None => node.config.limits.check_key(&e.key),
        };
        if let Err(err) = checked {
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
