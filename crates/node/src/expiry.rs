//! The expiry sweep (ARCHITECTURE.md §11 "Expiry"): reclaims the space of expired records.
//!
//! Every [`SWEEP_EVERY`] the node walks the entries of its expiry index that are due by its
//! clock ([`crate::storage::Store::due_expiries`]), at most [`SWEEP_BATCH`] at a time, from
//! where the last round stopped (an entry due later sorts after those examined before; the
//! walk starts again from the oldest every [`REVISIT_EVERY`]), and for each one decides with
//! [`sweep_check`]: a record this node heads is expired through
//! its chain like a delete ([`crate::request::data::expire`], which decides again under the
//! key's stripe, so a write of the key meanwhile wins); an entry whose record is gone or was
//! rewritten is removed; a record another node heads is left to that node (its delete
//! reaches this node down the chain, and the entry goes at a later round). Every
//! [`STALE_EVERY`] a slice of the whole index, due or not, is checked for stale entries too
//! (records rewritten at a member, moved away or deleted with their range), so they do not
//! wait for their time. Reads never wait for the sweep: a due record is already absent to
//! them ([`crate::record`]).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ringkv_wire::{HashedKey, ReplyBody};

use crate::record::{millis, sweep_check, wall_clock_us, Sweep};
use crate::storage::parse_index;
use crate::Node;

/// How often the sweep runs when it has nothing left to do.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Most index entries examined per round (the next round goes on after the last one).
pub const SWEEP_BATCH: usize = 1024;

/// Most records expired at once.
const CONCURRENCY: usize = 64;

/// What one round of the sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Index entries examined.
    pub examined: usize,
    /// Records expired through their chain.
    pub expired: usize,
    /// Stale index entries removed.
    pub stale: usize,
}

/// How often the sweep goes back to the oldest due entry: entries it left (another node
/// heads the key, or expiring it failed: a move's lock, a chain that did not answer) are
/// examined again at this pace, not every round.
pub const REVISIT_EVERY: Duration = Duration::from_secs(30);

/// How often a slice of the whole index (entries not due yet included) is checked for stale
/// entries: those of records rewritten at a member, moved away or deleted with their range,
/// which would otherwise wait for their time to come.
pub const STALE_EVERY: Duration = Duration::from_secs(10);

/// Entries checked per slice ([`STALE_EVERY`]).
pub const STALE_BATCH: usize = 4096;

/// Sweeps until the node stops (aborted with the server).
pub async fn run(node: Arc<Node>) {
    // Due entries are walked in expiry order from a cursor: an entry due later sorts after
    // those examined before, so each is examined once, and again every `REVISIT_EVERY`.
    let mut after: Option<Vec<u8>> = None;
    let mut revisit = tokio::time::Instant::now() + REVISIT_EVERY;
    let mut stale_after: Option<Vec<u8>> = None;
    let mut stale_at = tokio::time::Instant::now() + STALE_EVERY;
    loop {
        let now = tokio::time::Instant::now();
        if now >= revisit {
            after = None;
            revisit = now + REVISIT_EVERY;
        }
        match round(&node, after.as_deref()).await {
            Ok((swept, last)) => {
                if swept.expired + swept.stale > 0 {
                    tracing::debug!(node = %node.config().name, ?swept, "expiry sweep");
                }
                if last.is_some() {
                    after = last;
                }
                // A full round: more may be due; go on at once.
                if swept.examined == SWEEP_BATCH {
                    continue;
                }
            }
            Err(e) => tracing::warn!(node = %node.config().name, error = %e, "expiry sweep failed"),
        }
        if now >= stale_at {
            stale_at = now + STALE_EVERY;
            match stale_round(&node, stale_after.as_deref()).await {
                Ok(last) => stale_after = last,
                Err(e) => {
                    tracing::warn!(node = %node.config().name, error = %e, "expiry index check failed")
                }
            }
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// Checks up to [`STALE_BATCH`] entries of the expiry index after `after` (due or not) and
/// removes the stale ones. Returns the last entry checked, or `None` once the index was
/// read to its end (the next slice starts from the beginning).
pub async fn stale_round(
    node: &Arc<Node>,
    after: Option<&[u8]>,
) -> Result<Option<Vec<u8>>, crate::NodeError> {
    let entries = node.store.due_expiries(after, u64::MAX - 1, STALE_BATCH)?;
    let last = (entries.len() == STALE_BATCH)
        .then(|| entries.last().cloned())
        .flatten();
    let mut stale = Vec::new();
    for entry in entries {
        let is_stale = match parse_index(&entry) {
            Some((indexed, storage_key)) => {
                let current = match storage_key.get(20..) {
                    Some(key) => node.store.get_meta(&HashedKey::new(key))?,
                    None => None,
                };
                // As if not due (`now_ms` 0): only a stale entry is acted on.
                sweep_check(indexed, current, false, 0) == Sweep::Stale
            }
            None => true,
        };
        if is_stale {
            stale.push(entry);
        }
    }
    node.store.unindex(stale).await?;
    Ok(last)
}

/// One round: up to [`SWEEP_BATCH`] entries due now, after `after`. Returns what it did and
/// the last entry it examined.
pub async fn round(
    node: &Arc<Node>,
    after: Option<&[u8]>,
) -> Result<(Swept, Option<Vec<u8>>), crate::NodeError> {
    let now_ms = millis(wall_clock_us());
    let entries = node.store.due_expiries(after, now_ms, SWEEP_BATCH)?;
    let mut swept = Swept {
        examined: entries.len(),
        ..Swept::default()
    };
    let last = entries.last().cloned();
    let serving = node.is_running() && node.leased();
    let mut stale = Vec::new();
    let mut expire = Vec::new();
    for entry in entries {
        let Some((at, storage_key)) = parse_index(&entry) else {
            stale.push(entry);
            continue;
        };
        let Some(key) = storage_key.get(20..) else {
            stale.push(entry);
            continue;
        };
        let hashed = HashedKey::new(key);
        let current = node.store.get_meta(&hashed)?;
        let is_head = serving && node.check_head(&hashed.position).is_ok();
        match sweep_check(at, current, is_head, now_ms) {
            Sweep::Stale => stale.push(entry),
            Sweep::Expire { version } => expire.push((key.to_vec(), version, entry)),
            Sweep::Leave => {}
        }
    }
    let mut outcomes = futures::stream::iter(expire)
        .map(|(key, version, entry)| async move {
            let reply = crate::request::data::expire(node, &key, version).await;
            (reply, entry)
        })
        .buffer_unordered(CONCURRENCY);
    while let Some((reply, entry)) = outcomes.next().await {
        if reply == ReplyBody::Deleted {
            swept.expired += 1;
            stale.push(entry); // its record is gone (checked again in the writer)
        }
    }
    swept.stale = stale.len();
    node.store.unindex(stale).await?;
    Ok((swept, last))
}
