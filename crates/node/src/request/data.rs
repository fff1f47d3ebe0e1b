//! The client data path: `Get`, `Put`, `Delete`, `PutIf`, `DeleteIf`, and `Replicate`, which
//! carries a write down its chain (ARCHITECTURE.md §11).
//!
//! The head decides every write ([`crate::record::decide`]) from the record it holds, under
//! the key's stripe: no other write of the key runs between that read and the write, so a
//! conditional write (compare-and-set) is atomic, and the version it assigns is above the
//! key's.
//!
//! A write enters at the head of its key's chain and travels down the chain member by
//! member; each member persists it while passing it on, and answers its predecessor once it
//! has persisted it and its successor has answered, so the head acknowledges it once every
//! member has persisted it. Reads are served by the tail, which holds only writes
//! every member holds. Without replication the chain is the owner alone and a write is
//! acknowledged once it is durable there, as before.

use std::time::Duration;

use futures::StreamExt;
use ringkv_certs::PeerIdentity;
use ringkv_wire::{
    key_position, ChainWrite, ErrorKind, Expected, HashedKey, KeyReply, KeyValue, NodeEntry,
    Position, ReplyBody, Request, RequestBody, WireError,
};

use super::{error, storage_error};
use crate::hops::{HopResult, Hops};
use crate::node::{InFlightWrite, RingView};
use crate::record::{
    check_read, decide, millis, wall_clock_us, Decision, Intent, Outcome, ReadCheck, Record,
};
use crate::storage::Pending;
use crate::Node;

/// How long one hop of a chain write may take before it is sent again (to the same
/// successor, or to the one a newer chain names).
const HOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before sending a refused or failed hop again (unless the chain changes first).
const HOP_RETRY: Duration = Duration::from_millis(50);
/// A head gives up a chain write it could not finish for this long (the client sees an
/// error: the write may or may not have been applied).
const CHAIN_DEADLINE: Duration = Duration::from_secs(30);

fn invalid(e: WireError) -> ReplyBody {
    error(e.kind(), e.to_string())
}

/// Checks what every client request needs: running, leased, a valid key.
fn admit(node: &Node, key: &HashedKey<'_>) -> Result<(), ReplyBody> {
    if !node.is_running() || !node.leased() {
        return Err(ReplyBody::Stopped);
    }
    node.config.limits.check_key(key.key).map_err(invalid)
}

/// `Get`: served by the tail of the key's chain, even while a move write-locks the key's
/// range — except, with replication, at a tail whose range is locked by a change (the new
/// tail may be serving it by then). A record near its expiry is served only once the head
/// says it is alive ([`confirm_alive`]).
pub async fn get(node: &Node, key: &[u8]) -> ReplyBody {
    let key = HashedKey::new(key);
    match read(node, &key) {
        Ok(reply) => reply,
        Err(record) => confirm_alive(node, &key, record).await,
    }
}

/// A read at this node without asking anyone: the reply, or the record if the head must be
/// asked whether it expired ([`check_read`]).
fn read(node: &Node, key: &HashedKey<'_>) -> Result<ReplyBody, Record> {
    if let Err(reply) = admit(node, key) {
        return Ok(reply);
    }
    if let Err(reply) = node.check_tail(&key.position) {
        return Ok(reply);
    }
    if node.replication() > 1 && node.moves().is_locked(&key.position) {
        return Ok(ReplyBody::WriteLocked);
    }
    let record = match node.store.get_record(key) {
        Ok(Some(record)) => record,
        Ok(None) => return Ok(ReplyBody::NotFound),
        Err(e) => return Ok(storage_error(e)),
    };
    let is_head = record.expires_at.is_some() && node.check_head(&key.position).is_ok();
    let offset = node.config.max_clock_offset.as_millis() as u64;
    match check_read(record.expires_at, millis(wall_clock_us()), is_head, offset) {
        ReadCheck::Serve => Ok(ReplyBody::Value {
            value: record.value,
            version: record.version,
        }),
        ReadCheck::AskHead => Err(record),
    }
}

/// Times a read asks the head about a record near its expiry and finds another version
/// there (rewritten meanwhile) before it gives up.
const EXPIRY_ROUNDS: usize = 3;

/// Most keys of one batch or scan page asked about at their head at once (each ask is a
/// request to the head, whose removal of a due key then travels down the chain).
pub(crate) const EXPIRY_CONCURRENCY: usize = 64;

/// Serves `record` of `key`, read at this node (the tail) within the allowed clock offset of
/// its expiry (or past it, at the head), only if the head's clock says it is alive: the head
/// either answers that it is (`Applied` with the record's version), or removes it through
/// the chain, this node included, before it answers `Deleted`. Another version at the head
/// (a write of the key meanwhile, which has reached this node by then) is read again. This
/// node, heading the key, decides itself (a local `Expire`): a record it reports absent is
/// removed, so that no later head, whose clock may be behind, serves it again.
pub(crate) async fn confirm_alive(
    node: &Node,
    key: &HashedKey<'_>,
    mut record: Record,
) -> ReplyBody {
    for _ in 0..EXPIRY_ROUNDS {
        let view = node.view();
        let Some(head) = view.metadata.head(&key.position) else {
            return error(
                ErrorKind::Peer,
                "the key is near its expiry and its chain has no head; retry",
            );
        };
        let answer = if head.name == node.config.name {
            Ok(expire(node, key.key, record.version).await)
        } else {
            let request = Request::new(
                view.metadata.version,
                RequestBody::Expire {
                    key: key.key.to_vec(),
                    version: record.version,
                },
            );
            node.peers
                .call::<_, ringkv_wire::Reply>(&head.addr, &request, HOP_TIMEOUT)
                .await
                .map(|reply| reply.body)
        };
        match answer {
            Ok(ReplyBody::Applied { version }) if version == record.version => {
                return ReplyBody::Value {
                    value: record.value,
                    version: record.version,
                }
            }
            Ok(ReplyBody::Deleted) => return ReplyBody::NotFound,
            Ok(ReplyBody::Applied { .. } | ReplyBody::Conflict { .. }) => {
                match read(node, key) {
                    Ok(reply) => return reply,
                    Err(again) => record = again,
                }
            }
            Ok(ReplyBody::WriteLocked) => return ReplyBody::WriteLocked,
            Ok(other) => {
                return error(
                    ErrorKind::Peer,
                    format!("the key is near its expiry and its head {} could not confirm it is alive: {other:?}; retry", head.name),
                )
            }
            Err(e) => {
                return error(
                    ErrorKind::Peer,
                    format!("the key is near its expiry and its head {} could not be asked whether it is alive: {e}; retry", head.name),
                )
            }
        }
    }
    error(
        ErrorKind::Peer,
        "the key was rewritten near its expiry while it was read; retry",
    )
}

/// `Expire` from a node serving a read of `key` (or this node's sweep): removes the key's
/// record of `version` through the chain if this head's clock says it is due.
pub async fn expire(node: &Node, key: &[u8], version: u64) -> ReplyBody {
    write(node, &HashedKey::new(key), Intent::Expire { version }).await
}

/// The reply to a write that ended with `outcome`.
fn reply(outcome: Outcome) -> ReplyBody {
    match outcome {
        Outcome::Put { created } => ReplyBody::PutOk { created },
        Outcome::Delete { existed: true } => ReplyBody::Deleted,
        Outcome::Delete { existed: false } => ReplyBody::NotFound,
        Outcome::Applied { version } => ReplyBody::Applied { version },
        Outcome::Conflict { current } => ReplyBody::Conflict { current },
    }
}

/// A client write at the head (see [`Node`]'s invariant): ownership and write locks are
/// checked under the write gate, the head decides the write from the record it holds
/// ([`decide`]), then the write is made durable here and (with a chain) carried down to the
/// tail at the same time; it is acknowledged once both are done.
async fn write(node: &Node, key: &HashedKey<'_>, intent: Intent) -> ReplyBody {
    if let Err(reply) = admit(node, key) {
        return reply;
    }
    if let Err(reply) = node.check_head(&key.position) {
        return reply;
    }
    // An `Expire` may always go through: it removes only what is due (a read-only answer
    // otherwise), and a read of a key near its expiry must not fail for want of copies.
    if !matches!(intent, Intent::Expire { .. }) {
        if let Err(reply) = node.check_copies(&key.position) {
            return reply;
        }
    }
    let chained = node.replication() > 1;
    // One write of a stripe (the key's and a 4096th of the others) at a time: the decision
    // reads the key's record, and no other write of the key may come between; with a chain,
    // every member also applies a key's writes in the head's order.
    let stripe = node.stripe(&key.position).lock_owned().await;
    let admitted = node.admit_write().await;
    // Ownership may have changed while we waited for the guard.
    if let Err(reply) = node.check_head(&key.position) {
        return reply;
    }
    if node.moves().is_locked(&key.position) {
        return ReplyBody::WriteLocked;
    }
    let current = match node.store.get_meta(key) {
        Ok(meta) => meta,
        Err(e) => return storage_error(e),
    };
    // The expiry index entry of the record this write replaces goes in the same commit.
    let replaces = current.and_then(|(_, expires_at)| expires_at);
    let (record, outcome) = match decide(intent, current, &node.versions, wall_clock_us()) {
        Decision::Write { record, reply } => (record, reply),
        Decision::Refuse(outcome) => {
            // Nothing to write, but the answer reports what the head holds: the chain must
            // hold it too before anyone is told (a write of the key this head gave up, or
            // took as a member before it became the head, may not have reached the tail).
            if chained {
                match node.store.is_unconfirmed(key) {
                    Ok(false) => {}
                    Ok(true) => {
                        let inflight = node.enter_chain(key.position);
                        drop(admitted);
                        if let Err(why) = resend(&node.arc(), key).await {
                            drop((inflight, stripe));
                            return error(
                                ErrorKind::Peer,
                                format!("the key's last write is not confirmed by its chain yet ({why}); nothing was written, retry"),
                            );
                        }
                    }
                    Err(e) => return storage_error(e),
                }
            }
            return reply(outcome);
        }
    };
    node.moves().track(key);
    let place = match node.store.reserve().await {
        Ok(place) => place,
        Err(e) => return storage_error(e),
    };
    // With a chain: the write to send, and its in-flight mark (before the write is queued).
    let chain = chained.then(|| {
        let inflight = node.enter_chain(key.position);
        (chain_write(node, key.key, record.as_ref()), inflight)
    });
    // Applied here (and, with a chain, marked unconfirmed in the same commit until the chain
    // has it). The admission travels with the write to the storage writer, which releases
    // it once the write is durable, even if this handler is cancelled meanwhile.
    let local = match node
        .store
        .submit_head(place, key, record, chained, replaces, Some(admitted))
    {
        Ok(local) => local,
        Err(e) => return storage_error(e),
    };
    // In a task of its own, holding the stripe, so that a client that goes away cannot let
    // the key's next write be decided before this one is durable (nor, with a chain, cut
    // the write off half way).
    let Some((write, inflight)) = chain else {
        let local = tokio::spawn(async move {
            let _stripe = stripe;
            local.done().await
        });
        return match local.await {
            Ok(Ok(())) => reply(outcome),
            Ok(Err(e)) => storage_error(e),
            Err(e) => error(
                ErrorKind::Indeterminate,
                format!("the write's task failed: {e}; it may or may not have been applied"),
            ),
        };
    };
    let head = HeadWrite {
        write,
        outcome,
        position: key.position,
        _stripe: stripe,
        _inflight: inflight,
    };
    match tokio::spawn(head.run(node.arc(), local)).await {
        Ok(Ok(outcome)) => reply(outcome),
        Ok(Err(message)) => error(ErrorKind::Indeterminate, message),
        Err(e) => error(
            ErrorKind::Indeterminate,
            format!("chain write failed: {e}; it may or may not have been applied"),
        ),
    }
}

/// A client write at its chain's head, holding the key's stripe (one write of a key down
/// the chain at a time: the next is decided once this one is durable everywhere, and every
/// member applies a key's writes in the head's order) and its in-flight mark (a move's lock
/// waits for it) until it is over.
struct HeadWrite {
    write: ChainWrite,
    /// The answer once the write is durable everywhere.
    outcome: Outcome,
    position: Position,
    _stripe: tokio::sync::OwnedMutexGuard<()>,
    _inflight: InFlightWrite,
}

impl HeadWrite {
    /// Waits for the local commit (`local`) while carrying the write down the chain, so
    /// that the successors persist while this node does; the write is acknowledged once
    /// every member has. A chain that has it confirms it (its unconfirmed mark goes); one
    /// that may not keeps the mark, and the key is re-driven later
    /// ([`crate::redrive`]).
    async fn run(self, node: std::sync::Arc<Node>, local: Pending) -> Result<Outcome, String> {
        let (local, chained) = tokio::join!(
            local.done(),
            down_the_chain(&node, &self.write, self.position)
        );
        let key = HashedKey {
            key: &self.write.key,
            position: self.position,
        };
        match (local, chained) {
            (Ok(()), Ok(())) => {
                node.store.confirm(key.storage_key());
                Ok(self.outcome)
            }
            (Ok(_), Err(message)) => {
                node.redrive.later(self.write.key.clone());
                Err(message)
            }
            (Err(e), _) => {
                tracing::error!(node = %node.config.name, error = %e, "chain write failed in storage at the head");
                Err(format!("storage failed at the head ({e}) while the write went down the chain; it may or may not have been applied"))
            }
        }
    }
}

/// What a re-drive of an unconfirmed key did ([`redrive`]).
#[derive(Debug)]
pub(crate) enum Redriven {
    /// The chain has the head's current value: the mark is gone.
    Confirmed,
    /// No longer marked: nothing to do.
    Forgotten,
    /// The node does not head the key: the mark stays (it is the chain's head's to
    /// re-drive; this node re-drives it if it becomes the head, at that install).
    NotHead,
    /// To be tried again later, and why.
    Later(String),
}

/// Re-drives an unconfirmed key (`key`): as its chain's head, this node sends its current
/// value of the key down its current chain, as a write of its own, under the key's stripe
/// (so after any write of the key under way, and before the next). Sending the current
/// value again is harmless: the chain then holds what the head holds.
pub(crate) async fn redrive(node: &std::sync::Arc<Node>, key: &[u8]) -> Redriven {
    let key = HashedKey::new(key);
    match node.store.is_unconfirmed(&key) {
        Ok(true) => {}
        Ok(false) => return Redriven::Forgotten,
        Err(e) => return Redriven::Later(format!("reading its mark: {e}")),
    }
    if !node.is_running() || !node.leased() {
        return Redriven::Later("the node is not leased".into());
    }
    if node.check_head(&key.position).is_err() {
        return Redriven::NotHead; // checked again under the stripe
    }
    let stripe = node.stripe(&key.position).lock_owned().await;
    let admitted = node.admit_write().await;
    if node.check_head(&key.position).is_err() {
        return Redriven::NotHead;
    }
    if node.moves().is_locked(&key.position) {
        return Redriven::Later("its range is write-locked by a move".into());
    }
    let inflight = node.enter_chain(key.position);
    drop(admitted);
    let result = resend(node, &key).await;
    drop((inflight, stripe));
    match result {
        Ok(()) => Redriven::Confirmed,
        Err(why) if node.check_head(&key.position).is_err() => {
            tracing::debug!(node = %node.config.name, %why, "an unconfirmed key is no longer this node's to re-drive");
            Redriven::NotHead
        }
        Err(why) => Redriven::Later(why),
    }
}

/// Sends the head's current record of `key` down its current chain as a write of its own,
/// and confirms the key once the tail has it. The caller holds the key's stripe and has
/// entered the chain ([`Node::enter_chain`]) after its checks.
async fn resend(node: &std::sync::Arc<Node>, key: &HashedKey<'_>) -> Result<(), String> {
    let record = node
        .store
        .get_record(key)
        .map_err(|e| format!("reading its value: {e}"))?;
    let write = chain_write(node, key.key, record.as_ref());
    down_the_chain(node, &write, key.position).await?;
    node.store.confirm(key.storage_key());
    Ok(())
}

/// The chain write of `record` (`None`: a deletion) of `key`, as this head's next write.
fn chain_write(node: &Node, key: &[u8], record: Option<&Record>) -> ChainWrite {
    ChainWrite {
        key: key.to_vec(),
        value: record.map(|r| r.value.clone()),
        version: record.map_or(0, |r| r.version),
        expires_at: record.and_then(|r| r.expires_at),
        origin: node.origin,
        seq: node.next_seq(),
    }
}

/// Carries a write the head is applying down its chain, and returns once the tail has it.
/// Each attempt goes to this node's successor in the chain of the metadata it holds then;
/// a refused or failed hop is sent again (the same write: applying it twice is applying it
/// once) after a pause or as soon as a new chain is adopted (the ECS replaced a failed
/// member), until the tail has it, this node is no longer in the chain, or [`CHAIN_DEADLINE`]
/// passes. Hops go out only while the node is leased: a lease that lapsed is waited for
/// while it may still be renewed (a new ECS leader's first grant takes two probes,
/// [`crate::lease::Lease::may_return`]), and past that the write is given up.
async fn down_the_chain(
    node: &std::sync::Arc<Node>,
    write: &ChainWrite,
    position: Position,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + CHAIN_DEADLINE;
    let unknown = |why: String| format!("{why}; the write may or may not have been applied");
    let mut last = String::new();
    loop {
        if !node.leased() {
            if !node.lease_may_return() || tokio::time::Instant::now() >= deadline {
                return Err(unknown("the node's lease expired".into()));
            }
            tokio::time::sleep(HOP_RETRY).await;
            continue;
        }
        let view = node.view();
        let version = view.metadata.version;
        let Some((_, next)) = view.neighbours(&node.config.name, &position) else {
            return Err(unknown(format!(
                "the node left the key's chain at metadata v{version}"
            )));
        };
        let Some(next) = next else {
            return Ok(()); // this node is the tail now
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(unknown(format!(
                "the write did not reach the tail in {CHAIN_DEADLINE:?} ({last})"
            )));
        }
        let hop = tokio::select! {
            hop = Hops::send(node, &next.addr, version, write.clone(), HOP_TIMEOUT) => Some(hop),
            () = node.version_changed(version) => None,
        };
        match hop {
            None => continue, // a new chain: send again along it
            Some(Ok(ReplyBody::Ok)) => return Ok(()),
            Some(Ok(ReplyBody::NotResponsible { metadata })) => {
                // The metadata of whoever down the chain refused it.
                let theirs = metadata.as_ref().map_or(0, |m| m.version);
                last = format!("a node down the chain holds metadata v{theirs}");
                match metadata {
                    // Someone down the chain is ahead: catch up and retry at once (after
                    // the pause if the install failed).
                    Some(theirs)
                        if theirs.version > version
                            && node.install_metadata(theirs.clone(), "chain").await.is_ok() =>
                    {
                        continue;
                    }
                    _ if theirs < version => {
                        hand_ours(node, &view, next).await; // the successor is behind
                    }
                    _ => {}
                }
            }
            Some(Ok(other)) => last = format!("{} answered {other:?}", next.name),
            Some(Err(e)) => last = e,
        }
        tracing::debug!(node = %node.config.name, next = %next.name, %last, "chain hop failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(HOP_RETRY) => {}
            () = node.version_changed(version) => {}
        }
    }
}

/// Hands `next`, found behind, the metadata of `view` (as gossip would), so that the chain
/// write sent again finds it caught up.
async fn hand_ours(node: &Node, view: &crate::node::RingView, next: &ringkv_wire::NodeEntry) {
    if let Some(ours) = view.signed.clone() {
        let push = Request::new(
            view.metadata.version,
            RequestBody::GossipPush { metadata: ours },
        );
        let _ = node
            .peers
            .call::<_, ringkv_wire::Reply>(&next.addr, &push, HOP_TIMEOUT)
            .await;
    }
}

/// `Put`: acknowledged once durable at every member of the key's chain.
pub async fn put(node: &Node, key: &[u8], value: Vec<u8>) -> ReplyBody {
    put_if(node, key, value, None, None).await
}

/// `PutIf` (`expected` `Some`), `PutTtl` (`ttl_ms` `Some`) or `Put`: decided by the head,
/// acknowledged once durable at every member of the key's chain.
pub async fn put_if(
    node: &Node,
    key: &[u8],
    value: Vec<u8>,
    expected: Option<Expected>,
    ttl_ms: Option<u64>,
) -> ReplyBody {
    if let Err(e) = node.config.limits.check_put(key, &value) {
        return invalid(e);
    }
    let intent = Intent::Put {
        value,
        expected,
        ttl_ms,
    };
    write(node, &HashedKey::new(key), intent).await
}

/// `PutTtl`: a put (conditional if `expected` is given) that expires `ttl_ms` after the
/// head takes it, by the head's clock.
pub async fn put_ttl(
    node: &Node,
    key: &[u8],
    value: Vec<u8>,
    ttl_ms: u64,
    expected: Option<Expected>,
) -> ReplyBody {
    if ttl_ms == 0 {
        return error(
            ErrorKind::InvalidTtl,
            "a time to live must be at least 1 ms; nothing was written",
        );
    }
    put_if(node, key, value, expected, Some(ttl_ms)).await
}

/// `Delete`: acknowledged once durable at every member of the key's chain.
pub async fn delete(node: &Node, key: &[u8]) -> ReplyBody {
    write(node, &HashedKey::new(key), Intent::Delete { version: None }).await
}

/// `DeleteIf`: decided by the head, acknowledged once durable at every member of the key's
/// chain.
pub async fn delete_if(node: &Node, key: &[u8], version: u64) -> ReplyBody {
    let intent = Intent::Delete {
        version: Some(version),
    };
    write(node, &HashedKey::new(key), intent).await
}

/// `GetMany`: each key as `Get` answers it. Values that would not fit one reply frame (with
/// the node's ring, if some key needs it) are `Deferred`, for the client to ask again.
pub async fn get_many(node: &Node, keys: Vec<serde_bytes::ByteBuf>) -> ReplyBody {
    if let Err(refused) = bounded_batch(keys.len()) {
        return refused;
    }
    let hashed: Vec<HashedKey<'_>> = keys.iter().map(|key| HashedKey::new(key)).collect();
    let reads: Vec<Result<ReplyBody, Record>> = hashed.iter().map(|key| read(node, key)).collect();
    // Records near their expiry: the head is asked about each, [`EXPIRY_CONCURRENCY`] at once.
    let answers: Vec<_> = hashed
        .iter()
        .zip(reads)
        .map(|(key, read)| async move {
            match read {
                Ok(reply) => reply,
                Err(record) => confirm_alive(node, key, record).await,
            }
        })
        .collect();
    let replies: Vec<ReplyBody> = futures::stream::iter(answers)
        .buffered(EXPIRY_CONCURRENCY)
        .collect()
        .await;
    let (mut answers, metadata) = many(node, replies);
    let ring = metadata.as_ref().map_or(0, |m| m.encoded_len_bound());
    let room =
        (node.config.limits.max_frame).saturating_sub(ringkv_wire::limits::FRAME_OVERHEAD + ring);
    let mut used = 0;
    for answer in &mut answers {
        if let KeyReply::Value { value, .. } = answer {
            if used + value.len() > room {
                *answer = KeyReply::Deferred;
            } else {
                used += value.len();
            }
        }
    }
    ReplyBody::Many { answers, metadata }
}

/// `PutMany`: each entry as `Put` handles it, all at once (a batch is not a transaction:
/// each key is written on its own, and the writes share group commits and chain hops).
pub async fn put_many(node: &Node, entries: Vec<KeyValue>) -> ReplyBody {
    if let Err(refused) = bounded_batch(entries.len()) {
        return refused;
    }
    let puts = entries
        .into_iter()
        .map(|KeyValue { key, value }| async move { put(node, &key, value).await });
    let (answers, metadata) = many(node, futures::future::join_all(puts).await);
    ReplyBody::Many { answers, metadata }
}

/// `DeleteMany`: each key as `Delete` handles it, all at once.
pub async fn delete_many(node: &Node, keys: Vec<serde_bytes::ByteBuf>) -> ReplyBody {
    if let Err(refused) = bounded_batch(keys.len()) {
        return refused;
    }
    let deletes = keys.iter().map(|key| delete(node, key));
    let (answers, metadata) = many(node, futures::future::join_all(deletes).await);
    ReplyBody::Many { answers, metadata }
}

/// Refuses a batch of more than [`ringkv_wire::MAX_BATCH_KEYS`] keys.
fn bounded_batch(keys: usize) -> Result<(), ReplyBody> {
    if keys > ringkv_wire::MAX_BATCH_KEYS {
        return Err(error(
            ErrorKind::BatchTooLarge,
            format!(
                "a batch holds at most {} keys, this one {keys}; nothing was done (the client library cuts larger batches)",
                ringkv_wire::MAX_BATCH_KEYS
            ),
        ));
    }
    Ok(())
}

/// The answers of a batch from the replies each key got alone, and the node's ring if some
/// key is not this node's.
fn many(
    node: &Node,
    replies: Vec<ReplyBody>,
) -> (Vec<KeyReply>, Option<ringkv_wire::SignedMetadata>) {
    let mut not_responsible = false;
    let answers = replies
        .into_iter()
        .map(|reply| match reply {
            ReplyBody::Value { value, version } => KeyReply::Value { value, version },
            ReplyBody::NotFound => KeyReply::NotFound,
            ReplyBody::PutOk { created } => KeyReply::PutOk { created },
            ReplyBody::Deleted => KeyReply::Deleted,
            ReplyBody::NotResponsible { .. } => {
                not_responsible = true;
                KeyReply::NotResponsible
            }
            ReplyBody::WriteLocked => KeyReply::WriteLocked,
            ReplyBody::Stopped => KeyReply::Stopped,
            ReplyBody::Error { kind, message } => KeyReply::Error { kind, message },
            other => KeyReply::Error {
                kind: ErrorKind::Storage,
                message: format!("unexpected answer {other:?}"),
            },
        })
        .collect();
    let metadata = not_responsible
        .then(|| node.view().signed.clone())
        .flatten();
    (answers, metadata)
}

/// `Replicate` from `peer`: a batch of one.
pub async fn replicate(
    node: &Node,
    peer: &PeerIdentity,
    version: u64,
    write: ChainWrite,
) -> ReplyBody {
    match replicate_batch(node, peer, version, vec![write]).await {
        ReplyBody::Replicated(mut answers) if answers.len() == 1 => {
            answers.pop().expect("one answer")
        }
        whole => whole,
    }
}

/// `ReplicateBatch` from `peer`, which sent it holding metadata `version`, answered write
/// by write. A write is accepted only from this node's predecessor in the key's chain, both
/// holding the same version (so a write only ever travels along one chain). The accepted
/// writes are applied durably here as one storage write while they travel on to the
/// successors (one batch per successor), and each is answered `Ok` once the tail has it.
pub async fn replicate_batch(
    node: &Node,
    peer: &PeerIdentity,
    version: u64,
    writes: Vec<ChainWrite>,
) -> ReplyBody {
    if !node.leased() {
        return ReplyBody::Stopped;
    }
    let admitted = node.admit_write().await;
    let place = match node.store.reserve().await {
        Ok(place) => place,
        Err(e) => return storage_error(e),
    };
    let view = node.view();
    if view.metadata.version != version {
        return ReplyBody::NotResponsible {
            metadata: view.signed.clone(),
        };
    }
    let mut answers: Vec<Option<ReplyBody>> = vec![None; writes.len()];
    let mut accepted = Vec::with_capacity(writes.len());
    for (i, write) in writes.into_iter().enumerate() {
        match check_member(node, &view, peer, &write) {
            Ok((position, next)) => accepted.push(Member {
                index: i,
                write,
                position,
                next,
            }),
            Err(reply) => answers[i] = Some(reply),
        }
    }
    // Order: a copy of a write older than one already applied here from the same head (a
    // hop sent again, whose first copy was delayed on its way) is ignored, so it cannot undo
    // the later write. Checked and queued in one step under the order lock, so that two
    // writes of a stripe are queued (and applied: the writer is first in, first out) in the
    // order they were checked.
    let (fresh, pending) = {
        let mut applied = node.applied_seq.lock().expect("applied seq lock");
        let mut fresh = Vec::with_capacity(accepted.len());
        for member in accepted {
            let write = &member.write;
            let slot = (write.origin, Node::stripe_of(&member.position));
            match applied.get(&slot) {
                Some(&newest) if write.seq < newest => {
                    tracing::debug!(node = %node.config.name, seq = write.seq, newest, "ignored a stale copy of a chain write");
                    answers[member.index] = Some(ReplyBody::Ok);
                }
                _ => {
                    applied.insert(slot, write.seq);
                    fresh.push(member);
                }
            }
        }
        let mut entries = Vec::with_capacity(fresh.len());
        let mut marks = Vec::new();
        {
            let mut moves = node.moves();
            for member in &fresh {
                let hashed = member.hashed();
                moves.track(&hashed);
                let key = hashed.storage_key();
                // Passed on: unconfirmed here until the successor answers (this node may
                // become the head before it does, and must then re-drive it).
                if member.next.is_some() {
                    marks.push(key.clone());
                }
                let write = &member.write;
                let value = write.value.clone().map(|value| {
                    Record {
                        value,
                        version: write.version,
                        expires_at: write.expires_at,
                    }
                    .encode()
                });
                entries.push((key, value));
            }
        }
        // Nothing to store (every write refused or stale): no commit.
        let pending = (!entries.is_empty())
            .then(|| {
                node.store
                    .submit_entries(place, entries, marks, Some(admitted))
            })
            .transpose();
        (fresh, pending)
    };
    let pending = match pending {
        Ok(pending) => pending,
        Err(e) => {
            let failed = storage_error(e);
            for member in fresh {
                answers[member.index] = Some(failed.clone());
            }
            return ReplyBody::Replicated(answers.into_iter().flatten().collect());
        }
    };
    // Persist here while the successors do (each write answered once both have).
    let mut tails = Vec::new();
    let mut hops: Vec<(&NodeEntry, Vec<usize>, Vec<ChainWrite>)> = Vec::new();
    let mut keys: Vec<Option<Vec<u8>>> = vec![None; answers.len()];
    for member in fresh {
        if member.next.is_some() {
            keys[member.index] = Some(member.hashed().storage_key());
        }
        match member.next {
            None => tails.push(member.index),
            Some(next) => match hops.iter_mut().find(|(n, ..)| n.name == next.name) {
                Some((_, indexes, writes)) => {
                    indexes.push(member.index);
                    writes.push(member.write);
                }
                None => hops.push((next, vec![member.index], vec![member.write])),
            },
        }
    }
    let forwards = futures::future::join_all(hops.into_iter().map(|(next, indexes, writes)| {
        let view = &view;
        async move {
            let answers = Hops::call(node, &next.addr, version, writes, HOP_TIMEOUT).await;
            let behind = answers.iter().any(|a| {
                matches!(a, Ok(ReplyBody::NotResponsible { metadata })
                    if metadata.as_ref().map_or(0, |m| m.version) < version)
            });
            if behind {
                // A successor behind us gets our metadata first, so that the head's retry
                // finds it caught up.
                hand_ours(node, view, next).await;
            }
            (next, indexes, answers)
        }
    }));
    let local = async {
        match pending {
            Some(pending) => pending.done().await,
            None => Ok(()),
        }
    };
    let (local, forwarded) = tokio::join!(local, forwards);
    if let Err(e) = local {
        let failed = storage_error(e);
        for slot in answers.iter_mut().filter(|a| a.is_none()) {
            *slot = Some(failed.clone());
        }
        return ReplyBody::Replicated(answers.into_iter().flatten().collect());
    }
    for i in tails {
        answers[i] = Some(ReplyBody::Ok);
    }
    for (next, indexes, hop_answers) in forwarded {
        for (i, answer) in indexes.into_iter().zip(hop_answers) {
            // The rest of the chain has it: confirmed here before this node answers, so
            // before the head can send the key's next write (whose mark it must not remove).
            if matches!(answer, Ok(ReplyBody::Ok)) {
                if let Some(key) = keys[i].take() {
                    node.store.confirm(key);
                }
            }
            answers[i] = Some(hop_answer(next, answer));
        }
    }
    ReplyBody::Replicated(
        answers
            .into_iter()
            .map(|a| a.expect("every chain write is answered"))
            .collect(),
    )
}

/// A chain write accepted at this member.
struct Member<'v> {
    /// Its place in the batch.
    index: usize,
    write: ChainWrite,
    position: Position,
    /// Its successor in the key's chain (`None` at the tail).
    next: Option<&'v NodeEntry>,
}

impl Member<'_> {
    fn hashed(&self) -> HashedKey<'_> {
        HashedKey {
            key: &self.write.key,
            position: self.position,
        }
    }
}

/// Checks one chain write of a batch from `peer` at the version of `view`: a valid key and
/// value, and `peer` this node's predecessor in the key's chain. Returns the key's position
/// and this node's successor in the chain (`None` at the tail).
fn check_member<'v>(
    node: &Node,
    view: &'v RingView,
    peer: &PeerIdentity,
    write: &ChainWrite,
) -> Result<(Position, Option<&'v NodeEntry>), ReplyBody> {
    let checked = match &write.value {
        Some(value) => node.config.limits.check_put(&write.key, value),
        None => node.config.limits.check_key(&write.key),
    };
    checked.map_err(invalid)?;
    let position = key_position(&write.key);
    match view.neighbours(&node.config.name, &position) {
        Some((Some(before), next)) if before.name == peer.name => Ok((position, next)),
        _ => {
            let version = view.metadata.version;
            tracing::warn!(node = %node.config.name, peer = %peer.name, version, "refused a chain write from a node that is not this node's predecessor");
            Err(error(
                ErrorKind::Forbidden,
                format!(
                    "{} is not this node's predecessor in the key's chain at metadata v{version}",
                    peer.name
                ),
            ))
        }
    }
}

/// What a member answers for a write its successor `next` answered with `answer`: the
/// successor's refusal goes up the chain as is (the head retries, and catches up on newer
/// metadata it carries); anything else is an error.
fn hop_answer(next: &NodeEntry, answer: HopResult) -> ReplyBody {
    match answer {
        Ok(body @ (ReplyBody::Ok | ReplyBody::NotResponsible { .. } | ReplyBody::Stopped)) => body,
        Ok(other) => error(
            ErrorKind::Peer,
            format!("{} refused the chain write: {other:?}", next.name),
        ),
        Err(e) => error(
            ErrorKind::Peer,
            format!("chain write to {}: {e}", next.name),
        ),
    }
}
