//! Range moves (ARCHITECTURE.md §5): `LockRange`, `AbortMove`, `PrepareReceive`,
//! `TransferRange`, `TransferDelta`, `PutBatch`, `DeleteRange`. Every transition of the
//! node's move state is decided by [`crate::moves::MoveState`]; this module moves the bytes.

use ringkv_certs::PeerIdentity;
use ringkv_wire::{
    key_position, ErrorKind, KeyRange, MoveId, NodeEntry, ReplyBody, Request, RequestBody,
    StorageEntry, TransferStats,
};

use futures::stream::{FuturesUnordered, StreamExt};

use super::{error, storage_error};
use crate::moves::{BatchRefused, MoveError, Round};
use crate::storage::Batcher;
use crate::{Node, NodeError};

/// The reply to a refused move transition.
fn refused(e: MoveError) -> ReplyBody {
    error(ErrorKind::InvalidState, e.to_string())
}

/// The reply to a transition's outcome.
fn done(result: Result<Result<(), NodeError>, MoveError>) -> ReplyBody {
    match result {
        Ok(Ok(())) => ReplyBody::Ok,
        Ok(Err(e)) => storage_error(e),
        Err(e) => refused(e),
    }
}

/// `LockRange`: returns once the lock is durable and no write into the range is in flight.
pub async fn lock(node: &Node, id: MoveId, range: KeyRange) -> ReplyBody {
    let reply = done(
        node.transition(|m, version| Ok(((), m.lock(id, range, version)?)))
            .await,
    );
    if reply == ReplyBody::Ok {
        // New writes into the range are refused now; wait for those still on their way
        // down a chain, so that every acknowledged write is at the tail when this returns.
        node.chain_drained(&range).await;
        tracing::info!(node = %node.config.name, change = id.change, target = id.target_version, range = ?range, "range write-locked");
    }
    reply
}

/// `AbortMove`: releases the sender's lock and tracking of the move, or ends the receiver's
/// part and deletes its partial copy (with no batch of the move in flight: batches hold the
/// write gate while they commit).
pub async fn abort(node: &Node, id: MoveId, range: KeyRange) -> ReplyBody {
    let receiving = match node
        .transition(|m, version| {
            let (unlocked, receiving) = m.abort(id, version)?;
            Ok((receiving, unlocked))
        })
        .await
    {
        Ok(Ok(receiving)) => receiving,
        Ok(Err(e)) => return storage_error(e),
        Err(e) => return refused(e),
    };
    tracing::info!(node = %node.config.name, change = id.change, range = ?range, receiving, "move aborted");
    // A receiver's partial copy goes (also one whose receiving state a restart lost); a
    // sender keeps its range, which it still owns. Checked and deleted with the gate held, so
    // no install makes the range ours in between.
    let _quiet = node.quiesce().await;
    if !node.view().holds_any(&range) {
        if let Err(e) = node.store.delete_range(range).await {
            return storage_error(e);
        }
    }
    ReplyBody::Ok
}

/// `PrepareReceive`: deletes any stale copy of `range` (refused if the node owns any of it)
/// and accepts the move's batches from now on.
pub async fn prepare_receive(node: &Node, id: MoveId, range: KeyRange, from: String) -> ReplyBody {
    // Stop any earlier move's batches first (a superseded attempt), then clear, then open.
    // Ownership is checked with the gate held: an install (which takes it too) cannot make
    // the range ours between the check and the deletion.
    let _quiet = node.quiesce().await;
    let view = node.view();
    if view.holds_any(&range) {
        return error(
            ErrorKind::InvalidState,
            format!(
                "refusing to receive {range:?}: this node holds {:?}",
                view.held
            ),
        );
    }
    if let Err(e) = node.store.delete_range(range).await {
        return storage_error(e);
    }
    let version = node.metadata_version();
    match node.moves().prepare_receive(id, range, &from, version) {
        Ok(()) => ReplyBody::Ok,
        Err(e) => refused(e),
    }
}

/// Transfer batches in flight at once: enough to keep the link and the receiver's disk busy
/// while the next batch is read.
const TRANSFER_WINDOW: usize = 4;

/// `TransferRange`: starts tracking writes into `range`, then streams a consistent snapshot
/// of it to `to` in batches, several in flight; each batch is acknowledged by `to` only
/// after it persisted it. Replies `Transferred` when all are. Writes into the range go on
/// meanwhile; `TransferDelta` rounds send what they changed.
pub async fn transfer(node: &Node, id: MoveId, range: KeyRange, to: NodeEntry) -> ReplyBody {
    // Tracking starts before the snapshot (with no write in flight): every write the
    // snapshot misses is tracked.
    if let Err(e) = node
        .transition(|m, version| Ok((m.start_tracking(id, range, &to.name, version)?, false)))
        .await
    {
        return refused(e);
    }
    let batches = node
        .store
        .scan_range(range, node.config.transfer_batch_bytes);
    let reply = send_batches(node, id, &to, batches, node.config.transfer_rate_limit).await;
    if let ReplyBody::Transferred(stats) = &reply {
        tracing::info!(node = %node.config.name, to = %to.name, range = ?range, entries = stats.entries, bytes = stats.bytes, "range snapshot transferred");
    }
    reply
}

/// `TransferDelta`: sends the current value (or the deletion) of every key written since
/// the previous round, starting the next round with no write in flight (so none is missed).
/// The `last` round needs the range write-locked by this move, so its set is final.
pub async fn transfer_delta(
    node: &Node,
    id: MoveId,
    range: KeyRange,
    to: NodeEntry,
    last: bool,
) -> ReplyBody {
    let round = node
        .transition(|m, _| Ok((m.next_round(id, &range, &to.name, last)?, false)))
        .await;
    let round = match round {
        Ok(Ok(round)) => round,
        Ok(Err(e)) => return storage_error(e),
        Err(e) => return refused(e),
    };
    let rx = match round {
        Round::Rescan => node
            .store
            .scan_range(range, node.config.transfer_batch_bytes),
        Round::Keys(keys) => {
            let mut batcher = Batcher::new(node.config.transfer_batch_bytes);
            let mut batches = Vec::new();
            for key in keys {
                let record = match node.store.get_record(&ringkv_wire::HashedKey::new(&key)) {
                    Ok(record) => record,
                    Err(e) => return storage_error(e),
                };
                batches.extend(batcher.push(StorageEntry {
                    key,
                    version: record.as_ref().map_or(0, |r| r.version),
                    expires_at: record.as_ref().and_then(|r| r.expires_at),
                    value: record.map(|r| r.value),
                }));
            }
            batches.extend(batcher.finish());
            let (tx, rx) = tokio::sync::mpsc::channel(batches.len().max(1));
            for batch in batches {
                tx.try_send(Ok(batch))
                    .expect("channel sized for every batch");
            }
            rx
        }
    };
    // Only the rounds with writes open are paced; the locked one must be quick.
    let pace = if last {
        None
    } else {
        node.config.transfer_rate_limit
    };
    let reply = send_batches(node, id, &to, rx, pace).await;
    if let ReplyBody::Transferred(stats) = &reply {
        tracing::info!(node = %node.config.name, to = %to.name, range = ?range, last, entries = stats.entries, "range delta transferred");
    }
    reply
}

/// Sends every batch from `batches` to `to` as `PutBatch` requests, up to
/// [`TRANSFER_WINDOW`] in flight and, with a `rate_limit`, no faster than that many bytes
/// per second on average. Replies `Transferred` once all are acknowledged.
async fn send_batches(
    node: &Node,
    id: MoveId,
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
        let request = Request::new(version, RequestBody::PutBatch { id, entries });
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

/// `PutBatch`: persists a batch of a move this node was prepared to receive, before
/// acknowledging it. Least privilege: a node certificate writes through a batch only within
/// a move the ECS announced to both ends (`TransferRange` to the sender, `PrepareReceive` to
/// this node), only as the sender it named, only keys of the range it named — a range this
/// node does not own (checked at `PrepareReceive`), so no batch ever overwrites data the node
/// serves. The sender's write lock, not the receiver's running state, is what holds the
/// range still: a joining receiver is not serving yet. Holds the write gate while it commits,
/// so an `AbortMove` or a new `PrepareReceive` waits for it and no batch of an aborted move
/// lands after either.
pub async fn put_batch(
    node: &Node,
    peer: &PeerIdentity,
    id: MoveId,
    entries: Vec<StorageEntry>,
) -> ReplyBody {
    for e in &entries {
        let checked = match &e.value {
            Some(value) => node.config.limits.check_put(&e.key, value),
            None => node.config.limits.check_key(&e.key),
        };
        if let Err(err) = checked {
            return error(ErrorKind::Malformed, format!("bad entry in batch: {err}"));
        }
    }
    let positions: Vec<_> = entries.iter().map(|e| key_position(&e.key)).collect();
    let admitted = node.admit_write().await;
    let checked = node.moves().check_batch(id, &peer.name, positions.iter());
    if let Err(refused) = checked {
        tracing::warn!(node = %node.config.name, peer = %peer.name, error = %refused, "refused a transfer batch");
        let kind = match refused {
            BatchRefused::NotReceiving(_) => ErrorKind::InvalidState,
            BatchRefused::WrongSender { .. } | BatchRefused::OutOfRange(_) => ErrorKind::Forbidden,
        };
        return error(kind, refused.to_string());
    }
    match node.store.put_batch(entries, Some(admitted)).await {
        Ok(()) => ReplyBody::Ok,
        Err(e) => storage_error(e),
    }
}

/// `DeleteRange`: refused while the node still owns any of the range under its metadata,
/// so that data is never deleted before the new owner is official.
pub async fn delete(node: &Node, range: KeyRange) -> ReplyBody {
    let view = node.view();
    if view.holds_any(&range) {
        return error(
            ErrorKind::InvalidState,
            format!(
                "refusing to delete {range:?}: this node still holds {:?} at metadata v{}",
                view.held, view.metadata.version
            ),
        );
    }
    match node.store.delete_range(range).await {
        Ok(n) => ReplyBody::Count(n),
        Err(e) => storage_error(e),
    }
}
