//! Scans (`scan`, `scan_values`) against real nodes over QUIC + mTLS: every key once, in
//! hash order, page by page; prefixes; values cut at a reply frame; the work per page bounded
//! (sparse prefixes give short pages, not long ones); deleted and expired keys left out; a
//! cursor resumed from its text by another client; clear errors for bad page sizes; and a
//! scan over every range of a replicated cluster. (Across a join, a leave and a failover:
//! `tests/failover.rs`.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Certs, TestCluster, TestNode};
use kvstore::{KvError, KvStore, ScanCursor, ScanPage};
use ringkv_wire::{storage_key, ErrorKind, WireError, MAX_SCAN_PAGE};

/// Every page of a scan of `prefix` from the start, with or without values.
async fn scan_all(store: &KvStore, prefix: &[u8], page_size: usize, values: bool) -> Vec<ScanPage> {
    let mut pages = Vec::new();
    let mut cursor = ScanCursor::start();
    loop {
        let page = if values {
            store.scan_values(prefix, page_size, &cursor).await
        } else {
            store.scan(prefix, page_size, &cursor).await
        }
        .unwrap();
        assert!(
            page.entries.len() <= page_size,
            "a page holds at most page_size keys"
        );
        let next = page.next.clone();
        pages.push(page);
        match next {
            Some(next) => cursor = next,
            None => return pages,
        }
        assert!(pages.len() < 100_000, "the scan never ended");
    }
}

/// The keys of `pages`, in the order returned.
fn keys(pages: &[ScanPage]) -> Vec<Vec<u8>> {
    pages
        .iter()
        .flat_map(|p| p.entries.iter().map(|e| e.key.clone()))
        .collect()
}

/// 3,000 keys under two prefixes, some deleted, some expired: a scan returns every live key
/// exactly once, in hash order, and nothing else; a prefix scan its keys only; values match;
/// a scan resumed from a cursor's text by another client finishes it; bad page sizes are
/// refused with a clear error before anything is sent.
#[tokio::test]
async fn a_scan_returns_every_live_key_once_in_hash_order() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let mut live: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut entries = Vec::new();
    for i in 0..1500 {
        for prefix in ["user:", "order:"] {
            entries.push((format!("{prefix}{i}"), format!("value of {prefix}{i}")));
        }
    }
    for result in store.put_many(&entries).await {
        result.unwrap();
    }
    live.extend(
        entries
            .iter()
            .map(|(k, v)| (k.clone().into_bytes(), v.clone().into_bytes())),
    );
    let deleted: Vec<String> = (0..100).map(|i| format!("user:{i}")).collect();
    for result in store.delete_many(&deleted).await {
        assert!(result.unwrap());
    }
    for key in &deleted {
        live.remove(key.as_bytes());
    }
    for i in 0..50 {
        store
            .put_with_ttl(
                format!("user:ttl-{i}").as_bytes(),
                b"t",
                Duration::from_millis(1),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;

    let pages = scan_all(&store, b"", 100, false).await;
    let returned = keys(&pages);
    assert_eq!(
        returned.len(),
        live.len(),
        "every live key once, nothing else"
    );
    let mut sorted = returned.clone();
    sorted.sort_by_key(|k| storage_key(k));
    assert_eq!(
        returned, sorted,
        "hash order: SHA-1 of the key, then the key"
    );
    for key in &returned {
        assert!(live.contains_key(key), "{}", String::from_utf8_lossy(key));
    }
    assert!(pages
        .iter()
        .all(|p| p.entries.iter().all(|e| e.value.is_none())));
    println!("{} keys in {} pages of 100", returned.len(), pages.len());

    // A prefix: its keys only, every one, with their values.
    let users = scan_all(&store, b"user:", 1024, true).await;
    let got: HashMap<Vec<u8>, Vec<u8>> = users
        .iter()
        .flat_map(|p| p.entries.iter())
        .map(|e| (e.key.clone(), e.value.clone().expect("values")))
        .collect();
    let expected: HashMap<Vec<u8>, Vec<u8>> = live
        .iter()
        .filter(|(k, _)| k.starts_with(b"user:"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(got, expected);

    // Two pages by one client, the rest by another from the cursor's text.
    let first = store
        .scan(b"order:", 700, &ScanCursor::start())
        .await
        .unwrap();
    let second = store
        .scan(b"order:", 700, first.next.as_ref().unwrap())
        .await
        .unwrap();
    let text = second.next.as_ref().unwrap().to_string();
    let other = certs.client(vec![node.addr.clone()]).await;
    let mut resumed: Vec<Vec<u8>> = first
        .entries
        .iter()
        .chain(&second.entries)
        .map(|e| e.key.clone())
        .collect();
    let mut cursor: ScanCursor = text.parse().unwrap();
    loop {
        let page = other.scan(b"order:", 700, &cursor).await.unwrap();
        resumed.extend(page.entries.into_iter().map(|e| e.key));
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    resumed.sort();
    let mut orders: Vec<Vec<u8>> = live
        .keys()
        .filter(|k| k.starts_with(b"order:"))
        .cloned()
        .collect();
    orders.sort();
    assert_eq!(resumed, orders);

    for size in [0, MAX_SCAN_PAGE as usize + 1] {
        match store.scan(b"", size, &ScanCursor::start()).await {
            Err(KvError::Invalid(e @ WireError::PageSize { .. })) => {
                assert_eq!(e.kind(), ErrorKind::BatchTooLarge);
                assert!(e.to_string().contains("1 to 1024 keys"), "{e}");
            }
            other => panic!("page size {size}: {other:?}"),
        }
    }
    node.stop().await;
}

/// Work per page is bounded: a prefix that matches one key of 10,000 takes several pages,
/// most of them empty, each one examining at most 8,192 keys, and finds the key.
#[tokio::test]
async fn a_sparse_prefix_gives_short_pages_not_long_ones() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let entries: Vec<(String, &str)> = (0..10_000).map(|i| (format!("k{i}"), "v")).collect();
    for result in store.put_many(&entries).await {
        result.unwrap();
    }
    store.put(b"needle", b"n").await.unwrap();
    let pages = scan_all(&store, b"needle", 10, false).await;
    assert_eq!(keys(&pages), vec![b"needle".to_vec()]);
    assert!(
        pages.len() >= 2,
        "10,001 keys take more than one page of 8,192 examined: {} pages",
        pages.len()
    );
    node.stop().await;
}

/// Values past one reply frame: three values of 2 MiB each come in pages of at most one
/// frame, byte for byte.
#[tokio::test]
async fn a_scan_with_values_stops_a_page_at_a_reply_frame() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let big: Vec<(String, Vec<u8>)> = (0..3u8)
        .map(|i| (format!("big-{i}"), vec![i; 2 << 20]))
        .collect();
    for (key, value) in &big {
        store.put(key.as_bytes(), value).await.unwrap();
    }
    let pages = scan_all(&store, b"big-", 100, true).await;
    assert!(pages.len() >= 2, "6 MiB of values in one page of one frame");
    for page in &pages {
        let bytes: usize = page
            .entries
            .iter()
            .map(|e| e.value.as_ref().unwrap().len())
            .sum();
        assert!(bytes <= 4 << 20, "a page of {bytes} bytes of values");
    }
    let got: HashMap<Vec<u8>, Vec<u8>> = pages
        .iter()
        .flat_map(|p| p.entries.iter())
        .map(|e| (e.key.clone(), e.value.clone().unwrap()))
        .collect();
    for (key, value) in &big {
        assert!(got.get(key.as_bytes()) == Some(value), "{key}");
    }
    node.stop().await;
}

/// R = 3 on three nodes, and a fourth joined: a scan walks every range (each page read by
/// the tail of one range) and returns every key once.
#[tokio::test]
async fn a_scan_walks_every_range_of_a_replicated_cluster() {
    let mut cluster = TestCluster::start_with(3, |c| c.replication = 3, |_| {}).await;
    cluster.wait_converged().await;
    let store = cluster.client().await;
    let entries: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    for result in store.put_many(&entries).await {
        result.unwrap();
    }
    cluster.add_node("n4").await;
    cluster.wait_converged().await;
    let pages = scan_all(&store, b"", 256, true).await;
    let got: HashMap<Vec<u8>, Vec<u8>> = pages
        .iter()
        .flat_map(|p| p.entries.iter())
        .map(|e| (e.key.clone(), e.value.clone().unwrap()))
        .collect();
    assert_eq!(keys(&pages).len(), entries.len(), "every key once");
    for (key, value) in &entries {
        assert_eq!(
            got.get(key.as_bytes()),
            Some(&value.clone().into_bytes()),
            "{key}"
        );
    }
    // At least one page per range: a page never crosses a range's end.
    assert!(pages.len() >= 4, "{} pages over 4 ranges", pages.len());
}
