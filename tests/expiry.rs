//! Expiry (`put_with_ttl` and its conditional forms) against real nodes over QUIC + mTLS:
//! a key expires on every replica and to every read (single and batched), its space is
//! reclaimed in the background, the head's clock decides a record near its expiry for the
//! tail, an expiring key moved by a join is not resurrected, and a restart keeps expiry.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Certs, NodeProcess, TestCluster};
use kvstore::{Conditional, KvError, KvStore, PutOutcome};
use ringkv_node::storage::Store;
use ringkv_wire::ErrorKind;
use ringkv_wire::HashedKey;

/// Waits (up to `limit`) until `done` holds.
async fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether node `n` of `cluster` stores `key` (expired or not).
fn stores(cluster: &TestCluster, n: usize, key: &[u8]) -> bool {
    cluster.nodes[n].node.store().get(key).unwrap().is_some()
}

/// One read of the history: when it started and ended, and whether it found the value.
#[derive(Debug, Clone, Copy)]
struct Read {
    start: Instant,
    end: Instant,
    found: bool,
}

/// Reads `key` (alone and in a batch, by turns) from `readers` clients at once until
/// `until`, recording each read.
async fn read_through(
    stores: &[Arc<KvStore>],
    key: &'static [u8],
    value: &'static [u8],
    until: Instant,
) -> Vec<Read> {
    let readers = stores.iter().cloned().enumerate().map(|(i, store)| {
        tokio::spawn(async move {
            let mut reads = Vec::new();
            let mut turn = i;
            while Instant::now() < until {
                turn += 1;
                let start = Instant::now();
                let got = if turn % 2 == 0 {
                    store.get(key).await.unwrap()
                } else {
                    let mut many = store.get_many(&[key]).await;
                    many.pop().unwrap().unwrap().map(|v| v.value)
                };
                let end = Instant::now();
                if let Some(got) = &got {
                    assert_eq!(got, value);
                }
                reads.push(Read {
                    start,
                    end,
                    found: got.is_some(),
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        })
    });
    let mut all = Vec::new();
    for reader in futures::future::join_all(readers).await {
        all.extend(reader.unwrap());
    }
    all
}

/// Expiry is one event in the key's history: no read that started after a read which found
/// the key gone had ended may find it again.
fn check_expires_once(reads: &[Read]) {
    let first_gone = reads
        .iter()
        .filter(|r| !r.found)
        .map(|r| r.end)
        .min()
        .expect("some read found the key expired");
    let resurrected: Vec<&Read> = reads
        .iter()
        .filter(|r| r.found && r.start > first_gone)
        .collect();
    assert!(
        resurrected.is_empty(),
        "{} reads found the key after a read had found it expired: {:?}",
        resurrected.len(),
        &resurrected[..resurrected.len().min(3)]
    );
    assert!(
        reads.iter().any(|r| r.found),
        "some read found the key alive"
    );
}

/// R = 3: a key with a TTL is served until it expires, then is absent to every read
/// (single and batched, from several clients, with no read finding it after another found
/// it gone), to every condition, and is removed from every replica by the head's sweep,
/// while keys without a TTL (or a long one) stay.
#[tokio::test]
async fn an_expired_key_is_gone_from_every_read_and_every_replica() {
    let cluster = TestCluster::start_with(3, |c| c.replication = 3, |_| {}).await;
    cluster.wait_converged().await;
    let store = Arc::new(cluster.client().await);
    let ttl = Duration::from_millis(1500);
    assert_eq!(
        store.put_with_ttl(b"short", b"v", ttl).await.unwrap(),
        PutOutcome::Created
    );
    // The head read its clock before this: the key expires by `put_at + ttl`.
    let put_at = Instant::now();
    store
        .put_with_ttl(b"long", b"l", Duration::from_secs(3600))
        .await
        .unwrap();
    store.put(b"forever", b"f").await.unwrap();
    // A put with a TTL over a permanent key, then a put without one: permanent again.
    store
        .put_with_ttl(b"made-permanent", b"1", ttl)
        .await
        .unwrap();
    store.put(b"made-permanent", b"2").await.unwrap();
    for n in 0..3 {
        assert!(stores(&cluster, n, b"short"), "every replica has it");
    }

    let clients: Vec<Arc<KvStore>> = vec![
        store.clone(),
        Arc::new(cluster.client().await),
        Arc::new(cluster.client().await),
    ];
    let reads = read_through(
        &clients,
        b"short",
        b"v",
        put_at + ttl + Duration::from_secs(2),
    )
    .await;
    check_expires_once(&reads);
    assert!(
        reads.iter().all(|r| !r.found || r.start < put_at + ttl),
        "no read that started after the TTL found the key"
    );

    // Gone to every condition: absent for put_if_absent... (a new key, no TTL)
    assert_eq!(store.get_versioned(b"short").await.unwrap(), None);
    assert!(!store.delete(b"short").await.unwrap(), "nothing to delete");
    // ... and reclaimed on every replica (the delete above removed it already, if the sweep
    // had not).
    eventually(
        "the expired key leaves every replica",
        Duration::from_secs(20),
        || (0..3).all(|n| !stores(&cluster, n, b"short")),
    )
    .await;
    for key in [&b"long"[..], b"forever", b"made-permanent"] {
        assert!(store.get(key).await.unwrap().is_some(), "{key:?} stays");
        for n in 0..3 {
            assert!(stores(&cluster, n, key), "{key:?} stays on every replica");
        }
    }

    // A lock that expires: taken once, refused while held, free again after its TTL.
    let lock = b"lock";
    let taken = store
        .put_if_absent_with_ttl(lock, b"a", Duration::from_millis(800))
        .await
        .unwrap();
    let Conditional::Applied { version } = taken else {
        panic!("the free lock was not taken: {taken:?}")
    };
    assert_eq!(
        store
            .put_if_absent_with_ttl(lock, b"b", Duration::from_millis(800))
            .await
            .unwrap(),
        Conditional::Conflict {
            current: Some(version)
        }
    );
    // Renewed by its holder (at its version), then left to expire.
    let renewed = store
        .put_if_version_with_ttl(lock, b"a", version, Duration::from_millis(800))
        .await
        .unwrap();
    assert!(renewed.is_applied(), "{renewed:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = store
        .put_if_absent_with_ttl(lock, b"b", Duration::from_millis(800))
        .await
        .unwrap();
    assert!(again.is_applied(), "an expired lock is free: {again:?}");

    // A zero TTL is refused, nothing written.
    match store.put_with_ttl(b"zero", b"z", Duration::ZERO).await {
        Err(KvError::Server {
            kind: ErrorKind::InvalidTtl,
            ..
        }) => {}
        other => panic!("a zero TTL answered {other:?}"),
    }
    assert_eq!(store.get(b"zero").await.unwrap(), None);
}

/// With an allowed clock offset of an hour, every read of a key with a TTL is near its
/// expiry for the tail, which asks the head (`Expire`) each time: served while the head's
/// clock says the key is alive, and once it says it is due the head removes it from the
/// whole chain before the read answers.
#[tokio::test]
async fn the_heads_clock_decides_expiry_for_the_tail() {
    let offset = |c: &mut ringkv_node::NodeConfig| c.max_clock_offset = Duration::from_secs(3600);
    let cluster = TestCluster::start_with(3, |c| c.replication = 3, offset).await;
    cluster.wait_converged().await;
    let store = cluster.client().await;
    let ttl = Duration::from_millis(1500);
    let sent_at = Instant::now();
    store.put_with_ttl(b"k", b"v", ttl).await.unwrap();
    let mut served = 0;
    loop {
        let start = Instant::now();
        let got = store.get(b"k").await.unwrap();
        match got {
            Some(value) => {
                assert_eq!(value, b"v");
                served += 1;
            }
            None => {
                // The head read its clock after `sent_at` (to the ms).
                let end = Instant::now();
                assert!(
                    end + Duration::from_millis(2) >= sent_at + ttl,
                    "expired {:?} before its TTL",
                    (sent_at + ttl).saturating_duration_since(end)
                );
                break;
            }
        }
        assert!(
            start < sent_at + ttl + Duration::from_secs(10),
            "the key never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served > 0,
        "the tail served the key while the head said it was alive"
    );
    // The read that found it gone had the head remove it from the chain first (or found
    // the sweep's removal, which went down the whole chain before the head answered).
    for n in 0..3 {
        assert!(
            !stores(&cluster, n, b"k"),
            "node {n} still holds the expired key"
        );
    }
    // Without a TTL the tail never asks.
    store.put(b"plain", b"p").await.unwrap();
    assert_eq!(store.get(b"plain").await.unwrap(), Some(b"p".to_vec()));
}

/// Keys with a TTL that expires while a join moves half of them to the new node: none is
/// served after its TTL, from either node, and the new owner reclaims those it received
/// (their expiry came with them); keys without a TTL all stay.
#[tokio::test]
async fn an_expiring_key_moved_by_a_join_is_not_resurrected() {
    let mut cluster = TestCluster::start(1).await;
    let store = cluster.client().await;
    let ttl = Duration::from_millis(1500);
    let expiring: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| (format!("ttl-{i}"), vec![b'x'; 512]))
        .collect();
    let puts = expiring
        .iter()
        .map(|(k, v)| store.put_with_ttl(k.as_bytes(), v, ttl));
    for result in futures::future::join_all(puts).await {
        result.unwrap();
    }
    // Every head read its clock before this: every key expires by `put_at + ttl`.
    let put_at = Instant::now();
    let permanent: Vec<(String, String)> = (0..400)
        .map(|i| (format!("perm-{i}"), format!("p{i}")))
        .collect();
    for result in store.put_many(&permanent).await {
        result.unwrap();
    }
    cluster.add_node("n2").await;
    cluster.wait_converged().await;
    let moved = expiring
        .iter()
        .filter(|(k, _)| {
            cluster.nodes[1]
                .node
                .store()
                .get(k.as_bytes())
                .unwrap()
                .is_some()
        })
        .count();
    let expired_first = Instant::now() >= put_at + ttl;
    tokio::time::sleep((put_at + ttl).saturating_duration_since(Instant::now())).await;

    let keys: Vec<&str> = expiring.iter().map(|(k, _)| k.as_str()).collect();
    // (Read after `put_at + ttl`: every key is due by then.)
    for (key, got) in keys.iter().zip(store.get_many(&keys).await) {
        assert_eq!(got.unwrap(), None, "{key} served after its TTL");
    }
    let keys: Vec<&str> = permanent.iter().map(|(k, _)| k.as_str()).collect();
    for ((key, value), got) in permanent.iter().zip(store.get_many(&keys).await) {
        assert_eq!(
            got.unwrap().map(|v| v.value),
            Some(value.clone().into_bytes()),
            "{key}"
        );
    }
    eventually(
        "both nodes reclaim every expired key",
        Duration::from_secs(30),
        || {
            cluster.nodes.iter().all(|n| {
                expiring
                    .iter()
                    .all(|(k, _)| n.node.store().get(k.as_bytes()).unwrap().is_none())
            })
        },
    )
    .await;
    let held: u64 = cluster
        .nodes
        .iter()
        .map(|n| n.node.store().len().unwrap())
        .sum();
    assert_eq!(
        held,
        permanent.len() as u64,
        "only the permanent keys are left"
    );
    eprintln!(
        "{moved} expiring keys reached the new node before they expired (the join {} their TTL)",
        if expired_first {
            "outlasted"
        } else {
            "ended within"
        }
    );
    // Unless the join outlasted the TTL (a slow machine), some expiring keys moved and the
    // new owner reclaimed them: their expiry travelled with them.
    assert!(moved > 0 || expired_first, "no expiring key was moved");
}

/// A restart (after SIGKILL) keeps every record's expiry and the index that reclaims it: a
/// key still alive at the restart expires on time afterwards, and its space is reclaimed.
#[tokio::test]
async fn a_restart_keeps_expiry() {
    let certs = Certs::new();
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let mut node = NodeProcess::spawn(&certs, "n1", addr, data.path()).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let ttl = Duration::from_secs(3);
    let sent_at = Instant::now();
    store.put_with_ttl(b"soon", b"s", ttl).await.unwrap();
    let put_done = Instant::now();
    store
        .put_with_ttl(b"later", b"l", Duration::from_secs(3600))
        .await
        .unwrap();
    store.disconnect().await;
    node.kill();
    let record = |key: &[u8]| {
        let store = Store::open(data.path()).unwrap();
        store.get_record(&HashedKey::new(key)).unwrap()
    };
    let before = record(b"later").unwrap();
    assert!(before.expires_at.is_some());

    let mut node = NodeProcess::spawn(&certs, "n1", addr, data.path()).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    // The head read its clock after `sent_at` and before `put_done`.
    let got = store.get(b"soon").await.unwrap();
    if Instant::now() < sent_at + ttl {
        assert_eq!(got, Some(b"s".to_vec()), "alive across the restart");
    }
    tokio::time::sleep((put_done + ttl).saturating_duration_since(Instant::now())).await;
    assert_eq!(store.get(b"soon").await.unwrap(), None, "expired on time");
    assert_eq!(store.get(b"later").await.unwrap(), Some(b"l".to_vec()));
    let admin = certs.admin();
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::node_status(&admin, &node.addr).await.keys > 1 {
        assert!(
            Instant::now() < deadline,
            "the restarted node never reclaimed the key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.disconnect().await;
    node.kill();
    assert_eq!(
        record(b"soon"),
        None,
        "the restarted node reclaimed the key"
    );
    assert_eq!(
        record(b"later"),
        Some(before),
        "value, version and expiry kept"
    );
}
