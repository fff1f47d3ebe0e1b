//! One node, reached over QUIC with mutual TLS: data path, limits, bad frames, roles.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Certs, TestNode};
use kvstore::{Conditional, KvError, PutOutcome};
use ringkv_certs::{IssueOptions, Role};
use ringkv_transport::Transport;
use ringkv_wire::{ErrorKind, Limits, ReplyBody, Request, RequestBody, StorageEntry};

#[tokio::test]
async fn put_get_delete_round_trip() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;

    assert_eq!(store.get(b"missing").await.unwrap(), None);
    assert_eq!(store.put(b"k", b"v1").await.unwrap(), PutOutcome::Created);
    assert_eq!(store.get(b"k").await.unwrap(), Some(b"v1".to_vec()));
    assert_eq!(store.put(b"k", b"v2").await.unwrap(), PutOutcome::Updated);
    assert_eq!(store.get(b"k").await.unwrap(), Some(b"v2".to_vec()));
    assert!(store.delete(b"k").await.unwrap());
    assert_eq!(store.get(b"k").await.unwrap(), None);
    assert!(!store.delete(b"k").await.unwrap());
    // Binary keys and an empty value are fine.
    assert_eq!(
        store.put(&[0, 255, 10], b"").await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(store.get(&[0, 255, 10]).await.unwrap(), Some(vec![]));

    store.disconnect().await;
    assert!(matches!(store.get(b"k").await, Err(KvError::Disconnected)));
    node.stop().await;
}

/// Versions and conditional writes, one at a time: every write raises the key's version;
/// a condition that holds writes, one that does not writes nothing and reports the key's
/// version; versions survive a restart of the node.
#[tokio::test]
async fn compare_and_set_by_version() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;

    assert_eq!(store.get_versioned(b"k").await.unwrap(), None);
    let Conditional::Applied { version: v1 } = store.put_if_absent(b"k", b"a").await.unwrap()
    else {
        panic!("an absent key takes put_if_absent")
    };
    assert_eq!(
        store.put_if_absent(b"k", b"b").await.unwrap(),
        Conditional::Conflict { current: Some(v1) }
    );
    let read = store.get_versioned(b"k").await.unwrap().unwrap();
    assert_eq!((read.value.as_slice(), read.version), (&b"a"[..], v1));

    let Conditional::Applied { version: v2 } = store.put_if_version(b"k", b"c", v1).await.unwrap()
    else {
        panic!("the version read takes the write")
    };
    assert!(v2 > v1, "{v2} after {v1}");
    assert_eq!(
        store.put_if_version(b"k", b"d", v1).await.unwrap(),
        Conditional::Conflict { current: Some(v2) },
        "a version that is no longer current writes nothing"
    );
    assert_eq!(store.get(b"k").await.unwrap(), Some(b"c".to_vec()));
    // A plain put raises the version too.
    store.put(b"k", b"e").await.unwrap();
    let v3 = store.get_versioned(b"k").await.unwrap().unwrap().version;
    assert!(v3 > v2);
    assert_eq!(
        store.delete_if_version(b"k", v2).await.unwrap(),
        Conditional::Conflict { current: Some(v3) }
    );
    assert_eq!(
        store.put_if_version(b"absent", b"x", v3).await.unwrap(),
        Conditional::Conflict { current: None }
    );
    assert_eq!(
        store.delete_if_version(b"absent", v3).await.unwrap(),
        Conditional::Conflict { current: None }
    );
    store.put(b"kept", b"v").await.unwrap();
    let kept = store.get_versioned(b"kept").await.unwrap().unwrap().version;
    assert_eq!(
        store.delete_if_version(b"k", v3).await.unwrap(),
        Conditional::Applied { version: v3 }
    );
    assert_eq!(store.get(b"k").await.unwrap(), None);
    // Oversized and empty keys are refused before anything is sent, as for put.
    assert!(matches!(
        store.put_if_absent(b"", b"x").await,
        Err(KvError::Invalid(_))
    ));
    store.disconnect().await;

    // The version is stored with the value: a restart keeps it, and it still decides. (On
    // the same address: the node's persisted ring names it.)
    let addr = node.addr.clone();
    let data = node.stop().await;
    // The endpoint's driver lets go of the port once the runtime polls it.
    while std::net::UdpSocket::bind(&addr).is_err() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let node = TestNode::start_with(&certs, "n1", true, data, |c| {
        c.listen = addr.parse().expect("address");
        c.advertise = addr.clone();
    })
    .await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let read = store.get_versioned(b"kept").await.unwrap().unwrap();
    assert_eq!(read.version, kept, "the version survives a restart");
    assert!(store
        .put_if_version(b"kept", b"w", kept)
        .await
        .unwrap()
        .is_applied());
    store.disconnect().await;
    node.stop().await;
}

/// Eight writers increment one counter with compare-and-set: the history (every read and
/// conditional write) is linearizable, and the final count is exactly the number of
/// increments acknowledged as applied (no fault: no outcome is unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_of_a_cas_counter_each_win_once_per_version() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = Arc::new(certs.client(vec![node.addr.clone()]).await);
    let counter = common::load::CasCounter::start(store.clone(), b"counter".to_vec(), 8);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (count, applied, unknown, report) = counter
        .stop_and_check(&certs, vec![node.addr.clone()])
        .await;
    assert_eq!(unknown, 0, "nothing failed, yet {report}");
    assert_eq!(count, applied);
    assert!(
        applied >= 20,
        "too few increments to mean anything: {applied}"
    );
    store.disconnect().await;
    node.stop().await;
}

#[tokio::test]
async fn concurrent_clients_read_their_own_writes() {
    let certs = Arc::new(Certs::new());
    let node = TestNode::start(&certs, "n1", true).await;
    let mut tasks = Vec::new();
    for c in 0..32u32 {
        let certs = certs.clone();
        let addr = node.addr.clone();
        tasks.push(tokio::spawn(async move {
            let store = certs.client(vec![addr]).await;
            for i in 0..500u32 {
                // 10 keys per client, rewritten over and over: each read must see the
                // client's own latest write.
                let key = format!("c{c}-k{}", i % 10);
                let value = format!("c{c}-v{i}");
                store.put(key.as_bytes(), value.as_bytes()).await.unwrap();
                let read = store.get(key.as_bytes()).await.unwrap();
                assert_eq!(read.as_deref(), Some(value.as_bytes()), "client {c} op {i}");
            }
            store.disconnect().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(node.node.store().len().unwrap(), 32 * 10);
    node.stop().await;
}

#[tokio::test]
async fn invalid_keys_and_values_get_typed_errors_and_node_keeps_serving() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let limits = Limits::default();

    // Client side: refused before sending.
    assert!(matches!(
        store.put(b"", b"v").await,
        Err(KvError::Invalid(ringkv_wire::WireError::EmptyKey))
    ));
    assert!(matches!(
        store.get(&[b'k'; 1025]).await,
        Err(KvError::Invalid(ringkv_wire::WireError::KeyTooLarge {
            len: 1025,
            max: 1024
        }))
    ));
    let big = vec![0u8; limits.max_value + 1];
    assert!(matches!(
        store.put(b"k", &big).await,
        Err(KvError::Invalid(
            ringkv_wire::WireError::ValueTooLarge { .. }
        ))
    ));

    // Node side: the same requests sent raw (bypassing the client's checks) get error
    // replies. A frame limit above the node's lets the oversized value through the codec.
    let raw = Transport::bind_client(
        &certs.identity("client"),
        Limits {
            max_frame: limits.max_frame * 2,
            ..limits
        },
        Duration::from_secs(3),
        Duration::from_secs(10),
    )
    .unwrap();
    let cases = [
        (
            RequestBody::Put {
                key: vec![],
                value: b"v".to_vec(),
            },
            ErrorKind::EmptyKey,
        ),
        (
            RequestBody::Get {
                key: vec![b'k'; 1025],
            },
            ErrorKind::KeyTooLarge,
        ),
        (RequestBody::Delete { key: vec![] }, ErrorKind::EmptyKey),
        (
            RequestBody::Put {
                key: b"k".to_vec(),
                value: vec![0; limits.max_value + 1],
            },
            ErrorKind::ValueTooLarge,
        ),
    ];
    for (body, want) in cases {
        let reply = raw
            .request(&node.addr, &Request::new(0, body))
            .await
            .unwrap();
        match reply.body {
            ReplyBody::Error { kind, .. } => assert_eq!(kind, want),
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }
    // A frame over the node's maximum is refused from its header.
    let huge = RequestBody::Put {
        key: b"k".to_vec(),
        value: vec![1; limits.max_frame + 10],
    };
    let reply = raw
        .request(&node.addr, &Request::new(0, huge))
        .await
        .unwrap();
    assert!(matches!(
        reply.body,
        ReplyBody::Error {
            kind: ErrorKind::FrameTooLarge,
            ..
        }
    ));

    // A value at the limit is fine; the node still serves.
    let max = vec![7u8; limits.max_value];
    store.put(b"big", &max).await.unwrap();
    assert_eq!(store.get(b"big").await.unwrap(), Some(max));
    assert_eq!(store.get(b"nothing").await.unwrap(), None);
    node.stop().await;
}

#[tokio::test]
async fn garbage_and_huge_frames_on_a_raw_stream_do_not_hurt_other_clients() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let other = certs.client(vec![node.addr.clone()]).await;
    other.put(b"before", b"1").await.unwrap();

    // A raw authenticated QUIC connection.
    ringkv_certs::install_crypto_provider();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .set_default_client_config(ringkv_certs::client_config(&certs.identity("client")).unwrap());
    let conn = endpoint
        .connect(node.addr.parse().unwrap(), "127.0.0.1")
        .unwrap()
        .await
        .unwrap();

    async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<ringkv_wire::Reply> {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // The node may stop reading early; a failed write is an acceptable answer.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        let data = recv.read_to_end(1 << 20).await.ok()?;
        let (reply, _) = ringkv_wire::codec::decode_frame(&data, 1 << 20).ok()??;
        Some(reply)
    }

    // Garbage payload with a valid length prefix: a Malformed error reply.
    let mut garbage = 9u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0x13, 0x37, 0, 1, 2, 3, 4, 5]);
    let reply = send_raw(&conn, &garbage).await.expect("an error reply");
    assert!(
        matches!(
            reply.body,
            ReplyBody::Error {
                kind: ErrorKind::Malformed,
                ..
            }
        ),
        "{reply:?}"
    );

    // A header claiming 4 GiB: refused from the header alone.
    let mut claim = u32::MAX.to_le_bytes().to_vec();
    claim.extend_from_slice(&[0u8; 64]);
    let reply = send_raw(&conn, &claim).await.expect("an error reply");
    assert!(
        matches!(
            reply.body,
            ReplyBody::Error {
                kind: ErrorKind::FrameTooLarge,
                ..
            }
        ),
        "{reply:?}"
    );

    // Truncated frame (stream finished early): the stream is dropped, nothing answered.
    let mut short = 100u32.to_le_bytes().to_vec();
    short.extend_from_slice(b"abc");
    assert!(send_raw(&conn, &short).await.is_none());

    // Random bytes of many shapes.
    for seed in 0..20u8 {
        let junk: Vec<u8> = (0..(seed as usize * 7 + 1))
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect();
        let _ = send_raw(&conn, &junk).await;
    }

    // The same connection still works for a real request, and so does another client.
    let frame = ringkv_wire::codec::encode(
        &Request::new(
            0,
            RequestBody::Get {
                key: b"before".to_vec(),
            },
        ),
        1 << 20,
    )
    .unwrap();
    let reply = send_raw(&conn, &frame).await.unwrap();
    assert!(
        matches!(&reply.body, ReplyBody::Value { value, .. } if value == b"1"),
        "{:?}",
        reply.body
    );
    other.put(b"after", b"2").await.unwrap();
    assert_eq!(other.get(b"after").await.unwrap(), Some(b"2".to_vec()));
    node.stop().await;
}

#[tokio::test]
async fn client_certificates_cannot_send_internal_requests() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let limits = Limits::default();
    let transport = |name: &str| {
        Transport::bind_client(
            &certs.identity(name),
            limits,
            Duration::from_secs(3),
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let client = transport("client");
    let internal = [
        RequestBody::Status,
        RequestBody::Stop,
        RequestBody::PutBatch {
            id: ringkv_wire::MoveId {
                change: 1,
                target_version: 9,
            },
            entries: vec![StorageEntry {
                key: b"x".to_vec(),
                value: Some(b"y".to_vec()),
                version: 1,
                expires_at: None,
            }],
        },
        RequestBody::InstallMetadata {
            metadata: common::unsigned(&Default::default()),
        },
        RequestBody::Gossip {
            digest: ringkv_wire::GossipDigest {
                from: "n1".into(),
                metadata_version: 9,
                heartbeat: u64::MAX,
                heartbeats: vec![],
            },
        },
        RequestBody::GossipPush {
            metadata: common::unsigned(&Default::default()),
        },
    ];
    for body in internal {
        let name = body.name();
        let reply = client
            .request(&node.addr, &Request::new(0, body))
            .await
            .unwrap();
        assert!(
            matches!(
                reply.body,
                ReplyBody::Error {
                    kind: ErrorKind::Forbidden,
                    ..
                }
            ),
            "{name}: {reply:?}"
        );
    }
    // Nothing was written or stopped by those.
    assert!(node.node.is_running());
    assert_eq!(node.node.store().get(b"x").unwrap(), None);

    // An operator's admin certificate may read the status.
    let admin = transport("admin");
    let reply = admin
        .request(&node.addr, &Request::new(0, RequestBody::Status))
        .await
        .unwrap();
    match reply.body {
        ReplyBody::Status(s) => {
            assert_eq!(s.name, "n1");
            assert!(s.running);
        }
        other => panic!("{other:?}"),
    }
    // Only the ECS stops and starts nodes. Stopped nodes answer Stopped to clients, and
    // serve again after Start.
    let ecs = transport("ecs");
    ecs.request(&node.addr, &Request::new(0, RequestBody::Stop))
        .await
        .unwrap();
    let reply = client
        .request(
            &node.addr,
            &Request::new(0, RequestBody::Get { key: b"k".to_vec() }),
        )
        .await
        .unwrap();
    assert_eq!(reply.body, ReplyBody::Stopped);
    ecs.request(&node.addr, &Request::new(0, RequestBody::Start))
        .await
        .unwrap();
    let reply = client
        .request(
            &node.addr,
            &Request::new(0, RequestBody::Get { key: b"k".to_vec() }),
        )
        .await
        .unwrap();
    assert_eq!(reply.body, ReplyBody::NotFound);
    node.stop().await;
}

#[tokio::test]
async fn bad_certificates_are_refused_at_the_handshake() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;

    // Another CA's client certificate.
    let foreign = Certs::new();
    let mut config = foreign.client_config(vec![node.addr.clone()]);
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(2);
    let err = KvStore_connect_err(config).await;
    assert!(
        err.is_unreachable() || matches!(err, KvError::NoNodeReachable { .. }),
        "{err}"
    );

    // An expired certificate from the right CA.
    let mut opts = IssueOptions::new(Role::Client, "expired");
    opts.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    opts.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    ringkv_certs::issue(certs.path(), &opts).unwrap();
    let mut config = kvstore::ClientConfig::new(
        vec![node.addr.clone()],
        ringkv_certs::Identity::from_dir(certs.path(), "expired").unwrap(),
    );
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(2);
    let err = KvStore_connect_err(config).await;
    assert!(matches!(err, KvError::NoNodeReachable { .. }), "{err}");

    // No certificate at all: a rustls client without client auth.
    ringkv_certs::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in &certs.identity("client").ca {
        roots.add(ca.clone()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ringkv_certs::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let refused = async {
        let conn = endpoint
            .connect(node.addr.parse().unwrap(), "127.0.0.1")
            .ok()?
            .await
            .ok()?;
        // TLS 1.3: the server's refusal of the client certificate arrives after the client
        // finished its side of the handshake, so it shows on first use.
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&[0; 8]).await.ok()?;
        send.finish().ok()?;
        recv.read_to_end(1024).await.ok()
    };
    assert!(tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .unwrap()
        .is_none());

    // The node still serves a good client.
    let store = certs.client(vec![node.addr.clone()]).await;
    store.put(b"ok", b"1").await.unwrap();
    node.stop().await;
}

#[allow(non_snake_case)]
async fn KvStore_connect_err(config: kvstore::ClientConfig) -> KvError {
    match kvstore::KvStore::connect(config).await {
        Ok(_) => panic!("connect should have failed"),
        Err(e) => e,
    }
}
