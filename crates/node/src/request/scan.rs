//! `Scan`: one page of a scan of the keys, in hash order, at the tail of the range holding
//! the page's start (ARCHITECTURE.md §7 "Scans").
//!
//! The cursor is a storage key (`SHA-1(key) ++ key`), so it names a point of the ring, not a
//! node: whichever node serves that point when the next page is asked for continues from it.
//! A page reads only the range the node serves as its chain's tail (a tail holds every
//! write every member has), from the cursor on, and stops at the end of that range (the
//! next page goes to the next range's tail), after [`SCAN_EXAMINE`] keys examined, at
//! `limit` keys, at a reply frame of keys and values, or at a range a move write-locks (with
//! replication; the next page is then answered `WriteLocked` until the move is over). So a
//! key present for the whole scan is returned, exactly once (pages follow one another on the
//! cursor, and a key's position never changes), across joins, leaves and failovers, and a
//! key deleted before the scan began is never returned. Expired
//! keys are not returned (a key near its expiry is confirmed with its head, as a `Get`
//! does).

use ringkv_wire::{
    limits::FRAME_OVERHEAD, scan_position, ErrorKind, HashedKey, ReplyBody, ScanEntry, WireError,
    MAX_SCAN_PAGE, SCAN_EXAMINE,
};

use futures::StreamExt;

use super::data::{confirm_alive, EXPIRY_CONCURRENCY};
use super::{error, storage_error};
use crate::record::{check_read, millis, wall_clock_us, ReadCheck, Record};
use crate::storage::{ScanBounds, Scanned};
use crate::Node;

/// `Scan` (see the module documentation).
pub async fn scan(
    node: &Node,
    from: Vec<u8>,
    prefix: Vec<u8>,
    limit: u32,
    values: bool,
) -> ReplyBody {
    if !(1..=MAX_SCAN_PAGE).contains(&limit) {
        let e = WireError::PageSize {
            asked: limit.into(),
            max: MAX_SCAN_PAGE,
        };
        return error(e.kind(), e.to_string());
    }
    let max_key = node.config.limits.max_key;
    if prefix.len() > max_key {
        let e = WireError::KeyTooLarge {
            len: prefix.len(),
            max: max_key,
        };
        return error(e.kind(), format!("scan prefix: {e}"));
    }
    // A storage key is a hash and a key; a cursor one byte longer is a key's successor.
    if from.len() > 20 + max_key + 1 {
        return error(
            ErrorKind::Malformed,
            format!(
                "a scan cursor of {} bytes is not one this node gave",
                from.len()
            ),
        );
    }
    if !node.is_running() || !node.leased() {
        return ReplyBody::Stopped;
    }
    let position = scan_position(&from);
    // The tail check and the run come from one view: an install in between must not make
    // this node serve a run it no longer ends.
    let view = node.view();
    let is_tail = view
        .metadata
        .tail(&position)
        .is_some_and(|n| n.name == node.config().name);
    let Some(range) = view.run_at(&position).filter(|_| is_tail) else {
        return ReplyBody::NotResponsible {
            metadata: view.signed.clone(),
        };
    };
    // The span of the range holding the position (spans are bounded by positions), read
    // from the cursor or, if the cursor is shorter than a position, from the span's start.
    let Some(span) = range.storage_spans().into_iter().find(|span| {
        span.from.is_none_or(|f| position.0 >= f) && span.to.is_none_or(|t| position.0 < t)
    }) else {
        return error(
            ErrorKind::Malformed,
            "the scan cursor is outside the range holding its position",
        );
    };
    let from = match span.from {
        Some(start) if from.as_slice() < &start[..] => start.to_vec(),
        _ => from,
    };
    // With replication, a range a move write-locks may be served by its new tail already:
    // not read here (the page stops before it; the next one waits for the move).
    let locked = if node.replication() > 1 {
        node.moves().locked_ranges()
    } else {
        Vec::new()
    };
    if locked.iter().any(|l| l.contains(&position)) {
        return ReplyBody::WriteLocked;
    }
    let is_head = node.check_head(&position).is_ok();
    let offset = node.config.max_clock_offset.as_millis() as u64;
    // Room in the reply for `next` too (a storage key and one byte) and its encoding.
    let cursor_room = 20 + node.config.limits.max_key + 16;
    let page = ScanBounds {
        limit: limit as usize,
        examine: SCAN_EXAMINE,
        max_bytes: node
            .config
            .limits
            .max_frame
            .saturating_sub(FRAME_OVERHEAD + cursor_room),
        values,
    };
    let store = node.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        store.scan_page(
            &from,
            span.to.as_ref().map(|t| &t[..]),
            &prefix,
            page,
            |storage_key| {
                let at = scan_position(storage_key);
                locked.iter().any(|l| l.contains(&at))
            },
        )
    })
    .await;
    let read = match read {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => return storage_error(e),
        Err(e) => return error(ErrorKind::Storage, format!("the scan's reader failed: {e}")),
    };
    let next = read.next.or_else(|| span.to.map(|t| t.to_vec()));
    // Expiry is judged by the clock after the read (as `Get` does): a record near its expiry,
    // or due at the head, is decided by the head (`confirm_alive`), as many at once as
    // [`EXPIRY_CONCURRENCY`]; one the head removed is left out, one rewritten meanwhile comes
    // as the head's chain now holds it.
    let now_ms = millis(wall_clock_us());
    let checks: Vec<_> = read
        .entries
        .into_iter()
        .map(|entry| async move {
            if check_read(entry.expires_at, now_ms, is_head, offset) == ReadCheck::Serve {
                return Ok(Some(ScanEntry {
                    key: entry.key,
                    value: entry.value,
                }));
            }
            let Scanned {
                key,
                value,
                version,
                expires_at,
            } = entry;
            let record = Record {
                value: value.unwrap_or_default(),
                version,
                expires_at,
            };
            match confirm_alive(node, &HashedKey::new(&key), record).await {
                ReplyBody::Value { value: current, .. } => Ok(Some(ScanEntry {
                    key,
                    value: values.then_some(current),
                })),
                ReplyBody::NotFound => Ok(None),
                refused => Err(refused),
            }
        })
        .collect();
    let checked: Vec<Result<Option<ScanEntry>, ReplyBody>> = futures::stream::iter(checks)
        .buffered(EXPIRY_CONCURRENCY)
        .collect()
        .await;
    let mut entries = Vec::with_capacity(checked.len());
    for entry in checked {
        match entry {
            Ok(Some(entry)) => entries.push(entry),
            Ok(None) => {}
            Err(refused) => return refused,
        }
    }
    ReplyBody::ScanPage { entries, next }
}
