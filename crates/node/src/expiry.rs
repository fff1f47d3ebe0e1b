//! The expiry sweep (ARCHITECTURE.md §11 "Expiry"): reclaims the space of expired records.
//!
//! Every [`SWEEP_EVERY`] the node walks the entries of its expiry index that are due by its
//! clock ([`crate::storage::Store::due_expiries`]), at most [`SWEEP_BATCH`] at a time, and
//! for each one decides with [`sweep_check`]: a record this node heads is expired through
//! its chain like a delete ([`crate::request::data::expire`], which decides again under the
//! key's stripe, so a write of the key meanwhile wins); an entry whose record is gone or was
//! rewritten is removed; a record another node heads is left to that node (its delete
//! reaches this node down the chain, and the entry goes at the next sweep). Reads never
//! wait for the sweep: a due record is already absent to them ([`crate::record`]).

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

/// Sweeps until the node stops (aborted with the server).
pub async fn run(node: Arc<Node>) {
    let mut after: Option<Vec<u8>> = None;
    loop {
        match round(&node, after.as_deref()).await {
            Ok((swept, last)) => {
                if swept.expired + swept.stale > 0 {
                    tracing::debug!(node = %node.config().name, ?swept, "expiry sweep");
                }
                // A full round: more may be due; go on after it at once.
                if swept.examined == SWEEP_BATCH {
                    after = last;
                    continue;
                }
            }
            Err(e) => tracing::warn!(node = %node.config().name, error = %e, "expiry sweep failed"),
        }
        after = None;
        tokio::time::sleep(SWEEP_EVERY).await;
    }
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
