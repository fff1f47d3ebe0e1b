//! Scans: the keys of the store (those beginning with a prefix), page by page, with a
//! resumable cursor (ARCHITECTURE.md §7 "Scans").
//!
//! Keys come in **hash order** (SHA-1 of the key), not key order: the ring places keys by
//! hash, so a prefix does not narrow the ring, and each page is read from one range, by the
//! tail of its chain. The cursor names a point of the ring, not a node, so a scan goes on
//! across joins, leaves and failovers. As with Redis `SCAN`, every key present for the whole
//! scan is returned, a key written or deleted meanwhile may or may not be, and a page may hold
//! fewer keys than asked, even none, with more to come; unlike it, no key is returned twice.

use std::fmt;
use std::str::FromStr;

use ringkv_wire::{ReplyBody, RequestBody, ScanEntry, WireError, MAX_SCAN_PAGE};

use crate::{KvError, KvStore};

/// Where a scan goes on: [`ScanCursor::start`] for a new scan, then the `next` of each page.
/// Opaque; its text form (`Display`/`FromStr`: `0` for the start, hex otherwise) can be kept
/// and a scan resumed later, by another client too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ScanCursor(Vec<u8>);

impl ScanCursor {
    /// The start of a scan.
    pub fn start() -> Self {
        Self::default()
    }

    /// The cursor's bytes (a storage key: the hash of a key and the key).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for ScanCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("0");
        }
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for ScanCursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "0" {
            return Ok(Self::start());
        }
        let bad = || format!("{text:?} is not a scan cursor (0, or the hex a page gave)");
        if !text.len().is_multiple_of(2) {
            return Err(bad());
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>, String>>()
            .map(Self)
    }
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The keys (with their values, from [`KvStore::scan_values`]), in hash order.
    pub entries: Vec<ScanEntry>,
    /// Where the next page starts; `None`: the scan is complete.
    pub next: Option<ScanCursor>,
}

impl KvStore {
    /// One page of the keys beginning with `prefix` (empty: every key) from `cursor`: at
    /// most `page_size` keys (1 to 1,024), in hash order. Each page is one request to one
    /// node, which reads at most 8,192 keys for it (those the prefix skips included), so a
    /// page may be short, even empty, before the end: go on while `next` is `Some`.
    pub async fn scan(
        &self,
        prefix: &[u8],
        page_size: usize,
        cursor: &ScanCursor,
    ) -> Result<ScanPage, KvError> {
        self.scan_page(prefix, page_size, cursor, false).await
    }

    /// [`KvStore::scan`] with the values: a page also stops before its keys and values
    /// would pass one reply frame (about 4 MiB).
    pub async fn scan_values(
        &self,
        prefix: &[u8],
        page_size: usize,
        cursor: &ScanCursor,
    ) -> Result<ScanPage, KvError> {
        self.scan_page(prefix, page_size, cursor, true).await
    }

    async fn scan_page(
        &self,
        prefix: &[u8],
        page_size: usize,
        cursor: &ScanCursor,
        values: bool,
    ) -> Result<ScanPage, KvError> {
        let limit = u32::try_from(page_size)
            .ok()
            .filter(|n| (1..=MAX_SCAN_PAGE).contains(n))
            .ok_or(KvError::Invalid(WireError::PageSize {
                asked: page_size as u64,
                max: MAX_SCAN_PAGE,
            }))?;
        let max_key = self.config.limits.max_key;
        if prefix.len() > max_key {
            return Err(KvError::Invalid(WireError::KeyTooLarge {
                len: prefix.len(),
                max: max_key,
            }));
        }
        let position = ringkv_wire::scan_position(&cursor.0);
        let body = RequestBody::Scan {
            from: cursor.0.clone(),
            prefix: prefix.to_vec(),
            limit,
            values,
        };
        match self
            .execute_at(position, cursor.0.len() as u64, body)
            .await?
        {
            ReplyBody::ScanPage { entries, next } => Ok(ScanPage {
                entries,
                next: next.map(ScanCursor),
            }),
            other => Err(KvError::UnexpectedReply {
                request: "scan",
                reply: format!("{other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_through_its_text() {
        assert_eq!(ScanCursor::start().to_string(), "0");
        assert_eq!("0".parse::<ScanCursor>().unwrap(), ScanCursor::start());
        let cursor = ScanCursor(vec![0, 0xab, 0x10, 0xff]);
        assert_eq!(cursor.to_string(), "00ab10ff");
        assert_eq!("00ab10ff".parse::<ScanCursor>().unwrap(), cursor);
        for bad in ["abc", "zz", "0x12", "é1"] {
            assert!(bad.parse::<ScanCursor>().is_err(), "{bad}");
        }
    }
}
