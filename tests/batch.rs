//! Batches (`get_many`, `put_many`, `delete_many`) and pipelining, against real nodes over
//! QUIC + mTLS: per-key results in order, requests cut by count and bytes, values deferred
//! past one reply frame, bad keys refused alone, oversized batches refused with a clear
//! error, and many requests in flight from one task.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Certs, TestNode};
use futures::StreamExt;
use kvstore::{KvError, PutOutcome};
use ringkv_transport::Transport;
use ringkv_wire::{ErrorKind, Limits, ReplyBody, Request, RequestBody, MAX_BATCH_KEYS};

/// 2,500 keys (more than two requests' worth) written, read and deleted in batches: one
/// result per key, in order, each what the single-key request would have answered.
#[tokio::test]
async fn batches_answer_every_key_in_order() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let n = 2 * MAX_BATCH_KEYS + 452;
    let keys: Vec<String> = (0..n).map(|i| format!("key-{i}")).collect();
    let entries: Vec<(String, String)> =
        keys.iter().map(|k| (k.clone(), format!("v-{k}"))).collect();
    store.put(b"key-7", b"old").await.unwrap();

    let put = store.put_many(&entries).await;
    assert_eq!(put.len(), n);
    for (i, result) in put.iter().enumerate() {
        let expected = if i == 7 {
            PutOutcome::Updated
        } else {
            PutOutcome::Created
        };
        assert_eq!(result.as_ref().unwrap(), &expected, "key {i}");
    }
    // Absent keys among present ones, in any order.
    let mut asked: Vec<String> = keys.iter().rev().cloned().collect();
    asked.insert(100, "absent-1".into());
    asked.push("absent-2".into());
    let got = store.get_many(&asked).await;
    assert_eq!(got.len(), asked.len());
    for (key, value) in asked.iter().zip(&got) {
        let value = value.as_ref().unwrap();
        if key.starts_with("absent") {
            assert_eq!(value, &None, "{key}");
        } else {
            let value = value.as_ref().unwrap_or_else(|| panic!("{key} missing"));
            assert_eq!(value.value, format!("v-{key}").into_bytes());
            assert!(value.version > 0);
        }
    }
    // The versions are the keys' versions.
    let single = store.get_versioned(b"key-3").await.unwrap().unwrap();
    let at = asked.iter().position(|k| k == "key-3").unwrap();
    let batched = got[at].as_ref().unwrap().clone().unwrap();
    assert_eq!(
        (single.value, single.version),
        (batched.value, batched.version)
    );

    let mut doomed: Vec<&str> = keys.iter().step_by(2).map(String::as_str).collect();
    doomed.push("absent-1");
    let deleted = store.delete_many(&doomed).await;
    assert!(deleted[..deleted.len() - 1]
        .iter()
        .all(|d| *d.as_ref().unwrap()));
    assert!(!deleted.last().unwrap().as_ref().unwrap());
    assert_eq!(store.get(b"key-0").await.unwrap(), None);
    assert_eq!(
        store.get(b"key-1").await.unwrap(),
        Some(b"v-key-1".to_vec())
    );
    store.disconnect().await;
    node.stop().await;
}

/// A key the client refuses (empty, oversized) fails alone: the other keys of the batch are
/// written and read as usual.
#[tokio::test]
async fn a_bad_key_fails_alone() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let big = vec![b'k'; 2000];
    let entries: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"", b"2"), (&big, b"3"), (b"b", b"4")];
    let put = store.put_many(&entries).await;
    assert!(put[0].is_ok() && put[3].is_ok(), "{put:?}");
    assert!(matches!(put[1], Err(KvError::Invalid(_))), "{:?}", put[1]);
    assert!(matches!(put[2], Err(KvError::Invalid(_))), "{:?}", put[2]);
    let got = store.get_many(&[&b"a"[..], b"", b"b"]).await;
    assert_eq!(got[0].as_ref().unwrap().as_ref().unwrap().value, b"1");
    assert!(matches!(got[1], Err(KvError::Invalid(_))));
    assert_eq!(got[2].as_ref().unwrap().as_ref().unwrap().value, b"4");
    store.disconnect().await;
    node.stop().await;
}

/// Values that do not fit one reply frame are deferred by the node and asked again by the
/// client: three 3 MiB values come back whole from one `get_many`.
#[tokio::test]
async fn values_past_one_reply_frame_are_deferred_and_fetched() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    let values: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 3 << 20]).collect();
    let keys = ["big-0", "big-1", "big-2"];
    let entries: Vec<(&str, &[u8])> = keys
        .iter()
        .copied()
        .zip(values.iter().map(Vec::as_slice))
        .collect();
    assert!(store.put_many(&entries).await.iter().all(Result::is_ok));
    let got = store.get_many(&keys).await;
    for (value, expected) in got.iter().zip(&values) {
        assert_eq!(&value.as_ref().unwrap().as_ref().unwrap().value, expected);
    }

    // What the node answered to the batch as one request: the first value, the rest
    // deferred (each fits a frame alone, not together).
    let transport = Transport::bind_client(
        &certs.identity("client"),
        Limits::default(),
        Duration::from_secs(3),
        Duration::from_secs(10),
    )
    .unwrap();
    let request = Request::new(
        0,
        RequestBody::GetMany {
            keys: keys
                .iter()
                .map(|k| serde_bytes::ByteBuf::from(k.as_bytes()))
                .collect(),
        },
    );
    let reply = transport.request(&node.addr, &request).await.unwrap();
    let ReplyBody::Many { answers, .. } = reply.body else {
        panic!("{:?}", reply.body)
    };
    let deferred = answers
        .iter()
        .filter(|a| **a == ringkv_wire::KeyReply::Deferred)
        .count();
    assert_eq!(
        deferred,
        2,
        "{:?}",
        answers
            .iter()
            .map(|a| format!("{a:?}").chars().take(30).collect::<String>())
            .collect::<Vec<_>>()
    );
    transport.close().await;
    store.disconnect().await;
    node.stop().await;
}

/// A batch over the key cap is refused whole, with an error that says why; nothing of it
/// is applied. (The client never sends one: it cuts batches at the cap.)
#[tokio::test]
async fn a_batch_over_the_cap_is_refused_with_a_clear_error() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let transport = Transport::bind_client(
        &certs.identity("client"),
        Limits::default(),
        Duration::from_secs(3),
        Duration::from_secs(10),
    )
    .unwrap();
    let entries = (0..=MAX_BATCH_KEYS)
        .map(|i| ringkv_wire::KeyValue {
            key: format!("k{i}").into_bytes(),
            value: b"v".to_vec(),
        })
        .collect();
    let reply = transport
        .request(
            &node.addr,
            &Request::new(0, RequestBody::PutMany { entries }),
        )
        .await
        .unwrap();
    match reply.body {
        ReplyBody::Error {
            kind: ErrorKind::BatchTooLarge,
            message,
        } => assert!(
            message.contains("at most 1024 keys, this one 1025"),
            "{message}"
        ),
        other => panic!("an oversized batch answered {other:?}"),
    }
    assert_eq!(node.node.store().len().unwrap(), 0, "nothing was applied");
    transport.close().await;
    node.stop().await;
}

/// Many requests in flight from one task, without a task per request: the client's futures
/// are driven together by a stream (`buffer_unordered`), over one connection.
#[tokio::test]
async fn one_task_keeps_many_requests_in_flight() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let store = Arc::new(certs.client(vec![node.addr.clone()]).await);
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let puts = futures::stream::iter(0..2000u32)
        .map(|i| {
            let (store, in_flight, most) = (store.clone(), in_flight.clone(), most.clone());
            async move {
                let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                let key = format!("p{i}");
                let result = store.put(key.as_bytes(), b"v").await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                result
            }
        })
        .buffer_unordered(64);
    let results: Vec<_> = puts.collect().await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(node.node.store().len().unwrap(), 2000);
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most > 1, "never more than one request in flight");
    println!("at most {most} puts in flight from one task");
    store.disconnect().await;
    node.stop().await;
}
