//! A chain member and its lease, up close (ARCHITECTURE.md §11): one node in process, real
//! QUIC + mTLS, requests sent with the certificates of the ECS and of the node's
//! predecessor. Each test pins a fencing or ordering rule that a failure test can only hit
//! by luck.

mod common;

use std::time::Duration;

use common::{Certs, TestNode};
use ringkv_transport::Transport;
use ringkv_wire::{HashedKey, Limits, Reply, ReplyBody, Request, RequestBody};

fn transport(certs: &Certs, name: &str) -> Transport {
    Transport::bind_client(
        &certs.identity(name),
        Limits::default(),
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .unwrap()
}

async fn lease(ecs: &Transport, node: &TestNode, millis: u32, echo: Option<u64>) -> u64 {
    let reply: Reply = ecs
        .request(
            &node.addr,
            &Request::new(0, RequestBody::Lease { millis, echo }),
        )
        .await
        .unwrap();
    match reply.body {
        ReplyBody::Leased { stamp } => stamp,
        other => panic!("lease answered {other:?}"),
    }
}

/// A lease runs from a stamp the node took before an answer the ECS received, never from a
/// probe's arrival: a probe delivered late (the ECS gave up on it, then failed the node
/// over) cannot extend it.
#[tokio::test]
async fn a_lease_counts_from_an_echoed_stamp_not_from_a_late_probe() {
    let certs = Certs::new();
    let (node, _) = common::replicated_member(&certs).await;
    let ecs = transport(&certs, "ecs");
    assert!(
        !node.node.leased(),
        "with replication, no lease, no service"
    );

    let first = lease(&ecs, &node, 60_000, None).await;
    assert!(
        !node.node.leased(),
        "a probe without an echo grants nothing"
    );
    lease(&ecs, &node, 300, Some(first)).await;
    assert!(node.node.leased(), "an echoed stamp grants its lease");

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!node.node.leased(), "over after its length");
    // The same echo, delivered late: it would have granted 300 ms from its arrival under a
    // lease counted from arrival; from the stamp, it is already over.
    lease(&ecs, &node, 300, Some(first)).await;
    assert!(!node.node.leased(), "a late probe does not revive a lease");
    // A stamp this process never gave out (from the future) grants nothing either.
    lease(&ecs, &node, 60_000, Some(u64::MAX)).await;
    assert!(!node.node.leased());

    // Without a lease, the node refuses its predecessor's chain writes and clients alike.
    let n1 = transport(&certs, "n1");
    let put = Request::new(
        5,
        RequestBody::Replicate {
            write: ringkv_wire::ChainWrite {
                key: b"k".to_vec(),
                value: Some(b"v".to_vec()),
                version: 1,
                expires_at: None,
                origin: 1,
                seq: 1,
            },
        },
    );
    let reply: Reply = n1.request(&node.addr, &put).await.unwrap();
    assert_eq!(reply.body, ReplyBody::Stopped);
}

/// A copy of a chain write that arrives after a later write of the same stripe from the
/// same head (a hop sent again, its first copy delayed on the way) is ignored; the same
/// write sent again is applied again; another head's order is its own.
#[tokio::test]
async fn a_stale_copy_of_a_chain_write_cannot_undo_a_later_one() {
    let certs = Certs::new();
    let (node, ring) = common::replicated_member(&certs).await;
    let ecs = transport(&certs, "ecs");
    let stamp = lease(&ecs, &node, 60_000, None).await;
    lease(&ecs, &node, 60_000, Some(stamp)).await;
    assert!(node.node.leased());

    // A key whose chain is [n1, n2]: n2 is its tail, n1 its head (our caller).
    let key = (0u32..)
        .map(|i| format!("key-{i}").into_bytes())
        .find(|k| {
            let chain = ring.chain(&HashedKey::new(k).position);
            chain.len() == 2 && chain[0].name == "n1"
        })
        .unwrap();
    let n1 = transport(&certs, "n1");
    let write = |value: &str, origin: u64, seq: u64| {
        Request::new(
            ring.version,
            RequestBody::Replicate {
                write: ringkv_wire::ChainWrite {
                    key: key.clone(),
                    value: Some(value.as_bytes().to_vec()),
                    version: seq,
                    expires_at: None,
                    origin,
                    seq,
                },
            },
        )
    };
    let value = || node.node.store().get(&key).unwrap();
    let send = |request: Request| {
        let (n1, addr) = (&n1, node.addr.clone());
        async move {
            let reply: Reply = n1.request(&addr, &request).await.unwrap();
            assert_eq!(reply.body, ReplyBody::Ok, "{request:?}");
        }
    };

    send(write("second", 7, 2)).await;
    assert_eq!(value(), Some(b"second".to_vec()));
    send(write("first", 7, 1)).await; // the delayed first copy of an earlier write
    assert_eq!(
        value(),
        Some(b"second".to_vec()),
        "a stale copy undid a later write"
    );
    send(write("second", 7, 2)).await; // the same write sent again
    assert_eq!(value(), Some(b"second".to_vec()));
    send(write("third", 7, 3)).await;
    assert_eq!(value(), Some(b"third".to_vec()));
    send(write("other head", 8, 1)).await; // a new head process: its own order
    assert_eq!(value(), Some(b"other head".to_vec()));

    // A chain write from a node that is not the key's predecessor, or at another version,
    // is refused.
    let impostor = transport(&certs, "n3");
    let reply: Reply = impostor
        .request(&node.addr, &write("impostor", 9, 1))
        .await
        .unwrap();
    assert!(
        matches!(
            reply.body,
            ReplyBody::Error {
                kind: ringkv_wire::ErrorKind::Forbidden,
                ..
            }
        ),
        "{reply:?}"
    );
    let mut stale = write("old version", 7, 9);
    stale.metadata_version = ring.version - 1;
    let reply: Reply = n1.request(&node.addr, &stale).await.unwrap();
    assert!(
        matches!(reply.body, ReplyBody::NotResponsible { .. }),
        "{reply:?}"
    );
    assert_eq!(value(), Some(b"other head".to_vec()));
}

/// A `ReplicateBatch` is answered write by write, each as its own `Replicate` would be: the
/// writes of keys this node follows the caller for are applied, a write of a key it does
/// not is refused, a stale copy is ignored, all in one exchange.
#[tokio::test]
async fn a_batch_of_chain_writes_is_answered_write_by_write() {
    let certs = Certs::new();
    let (node, ring) = common::replicated_member(&certs).await;
    let ecs = transport(&certs, "ecs");
    let stamp = lease(&ecs, &node, 60_000, None).await;
    lease(&ecs, &node, 60_000, Some(stamp)).await;

    let headed_by =
        |k: &Vec<u8>, head: &str| ring.head(&HashedKey::new(k).position).unwrap().name == head;
    let candidates = || (0u32..).map(|i| format!("key-{i}").into_bytes());
    let ours: Vec<Vec<u8>> = candidates()
        .filter(|k| headed_by(k, "n1"))
        .take(2)
        .collect(); // chain [n1, n2]
    let theirs = candidates().find(|k| headed_by(k, "n2")).unwrap(); // chain [n2, n1]: n1 is not n2's predecessor
    let write = |key: &[u8], value: &str, seq: u64| ringkv_wire::ChainWrite {
        key: key.to_vec(),
        value: Some(value.as_bytes().to_vec()),
        version: seq,
        expires_at: None,
        origin: 7,
        seq,
    };
    let n1 = transport(&certs, "n1");
    let batch = |writes: Vec<ringkv_wire::ChainWrite>| {
        Request::new(ring.version, RequestBody::ReplicateBatch { writes })
    };
    let reply: Reply = n1
        .request(
            &node.addr,
            &batch(vec![
                write(&ours[0], "a", 10),
                write(&theirs, "x", 11),
                write(&ours[1], "b", 12),
            ]),
        )
        .await
        .unwrap();
    let ReplyBody::Replicated(answers) = reply.body else {
        panic!("{reply:?}")
    };
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0], ReplyBody::Ok);
    assert!(
        matches!(
            answers[1],
            ReplyBody::Error {
                kind: ringkv_wire::ErrorKind::Forbidden,
                ..
            }
        ),
        "{:?}",
        answers[1]
    );
    assert_eq!(answers[2], ReplyBody::Ok);
    let value = |key: &[u8]| node.node.store().get(key).unwrap();
    assert_eq!(value(&ours[0]), Some(b"a".to_vec()));
    assert_eq!(value(&ours[1]), Some(b"b".to_vec()));
    assert_eq!(value(&theirs), None);
}

/// Node `n2` with `--min-copies 2`, serving (leased, started) a ring of three at R = 3
/// where `n1` and `n3` failed: it is every chain alone, one copy. Returns it and the ring.
async fn alone_below_min_copies(certs: &Certs) -> (TestNode, ringkv_wire::RingMetadata) {
    let data = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(certs, "n2", false, data, |c| c.min_copies = 2).await;
    let ring = ringkv_wire::RingMetadata::new(
        5,
        vec![
            ringkv_wire::NodeEntry::new("n1", "127.0.0.1:9"),
            ringkv_wire::NodeEntry::new("n2", node.addr.clone()),
            ringkv_wire::NodeEntry::new("n3", "127.0.0.1:11"),
        ],
    )
    .unwrap()
    .with_replication(3)
    .unwrap()
    .with_failed("n1")
    .unwrap()
    .with_failed("n3")
    .unwrap();
    let signed = certs.ecs_signer().sign(&ring).unwrap();
    assert!(node.node.install_metadata(signed, "test").await.unwrap());
    let ecs = transport(certs, "ecs");
    let first = lease(&ecs, &node, 60_000, None).await;
    lease(&ecs, &node, 60_000, Some(first)).await;
    let start: Reply = ecs
        .request(&node.addr, &Request::new(0, RequestBody::Start))
        .await
        .unwrap();
    assert_eq!(start.body, ReplyBody::Ok);
    (node, ring)
}

/// `--min-copies`: a head refuses a write to a range with fewer live copies than that
/// (`NotEnoughCopies`, nothing applied) instead of acknowledging it on fewer nodes; reads
/// are still served. (The default, 1, takes writes while any copy is live, as before.)
#[tokio::test]
async fn a_write_below_min_copies_is_refused_and_applies_nothing() {
    let certs = Certs::new();
    let (node, ring) = alone_below_min_copies(&certs).await;
    let client = transport(&certs, "client");
    let key = b"k".to_vec();
    let put = Request::new(
        ring.version,
        RequestBody::Put {
            key: key.clone(),
            value: b"v".to_vec(),
        },
    );
    let reply: Reply = client.request(&node.addr, &put).await.unwrap();
    match reply.body {
        ReplyBody::Error {
            kind: ringkv_wire::ErrorKind::NotEnoughCopies,
            message,
        } => assert!(
            message.contains("1 live copies") && message.contains("--min-copies 2"),
            "{message}"
        ),
        other => panic!("a write to a chain of one copy with --min-copies 2 answered {other:?}"),
    }
    let get = Request::new(ring.version, RequestBody::Get { key: key.clone() });
    let reply: Reply = client.request(&node.addr, &get).await.unwrap();
    assert_eq!(
        reply.body,
        ReplyBody::NotFound,
        "nothing was applied; reads are served"
    );
}

/// A read of an expired key is served below `--min-copies` too: the head removes the record
/// it reports absent (a local `Expire`), and that removal is not refused for want of copies
/// (it failed with `Peer` before). The key is gone from the store when the read answers.
#[tokio::test]
async fn an_expired_key_reads_as_absent_below_min_copies_and_is_removed() {
    let certs = Certs::new();
    let (node, ring) = alone_below_min_copies(&certs).await;
    // A record that expired a second ago (written as a move or the chain would have).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let record = ringkv_node::record::Record {
        value: b"v".to_vec(),
        version: 7,
        expires_at: Some(now_ms - 1000),
    };
    node.node.store().put(b"k", record).await.unwrap();
    let client = transport(&certs, "client");
    let get = Request::new(ring.version, RequestBody::Get { key: b"k".to_vec() });
    let reply: Reply = client.request(&node.addr, &get).await.unwrap();
    assert_eq!(reply.body, ReplyBody::NotFound, "an expired key is absent");
    assert_eq!(
        node.node.store().get(b"k").unwrap(),
        None,
        "the head removed what it reported absent"
    );
}
