//! Term fencing at a node (ARCHITECTURE.md §12): one node in process, real QUIC + mTLS,
//! real storage, requests sent with the certificates of the ECS, an operator and a node.
//! A node keeps the highest Raft term of an ECS leader it has seen (persisted), and refuses
//! the requests of an older one: a deposed leader that does not know it lost can neither
//! keep a node serving under its lease nor lock, stop or change anything.

mod common;

use std::time::Duration;

use common::{node_status, Certs, TestNode};
use ringkv_certs::{PeerIdentity, Role};
use ringkv_transport::Transport;
use ringkv_wire::{
    ErrorKind, HashedKey, KeyRange, Limits, MoveId, Position, ReplyBody, Request, RequestBody,
};

fn transport(certs: &Certs, name: &str) -> Transport {
    Transport::bind_client(
        &certs.identity(name),
        Limits::default(),
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .unwrap()
}

/// `body` stamped with `term`, as an ECS leader sends it.
fn fenced(term: u64, body: RequestBody) -> Request {
    Request::new(
        0,
        RequestBody::Fenced {
            term,
            body: Box::new(body),
        },
    )
}

async fn send(caller: &Transport, node: &TestNode, request: Request) -> ReplyBody {
    caller
        .request(&node.addr, &request)
        .await
        .unwrap_or_else(|e| panic!("{request:?}: {e}"))
        .body
}

/// The message of a `StaleTerm` refusal, or a panic saying what came instead.
#[track_caller]
fn stale(reply: ReplyBody, what: &str) -> String {
    match reply {
        ReplyBody::Error {
            kind: ErrorKind::StaleTerm,
            message,
        } => message,
        other => panic!("{what}: expected StaleTerm, got {other:?}"),
    }
}

#[track_caller]
fn forbidden(reply: ReplyBody, what: &str) -> String {
    match reply {
        ReplyBody::Error {
            kind: ErrorKind::Forbidden,
            message,
        } => message,
        other => panic!("{what}: expected Forbidden, got {other:?}"),
    }
}

#[track_caller]
fn leased(reply: ReplyBody, what: &str) -> u64 {
    match reply {
        ReplyBody::Leased { stamp } => stamp,
        other => panic!("{what}: expected Leased, got {other:?}"),
    }
}

/// The leader of term 5 runs the node; a deposed leader of term 4 can neither lease nor
/// stop it; term 6 takes over and term 5 is deposed in turn; unfenced ECS requests (term 0)
/// are refused from then on, fenced requests from other roles always; the highest term
/// survives a restart.
#[tokio::test]
async fn requests_of_a_deposed_ecs_leader_are_refused_across_a_restart() {
    let certs = Certs::new();
    let (node, ring) = common::replicated_member(&certs).await;
    let ecs = transport(&certs, "ecs");
    let client = transport(&certs, "client");
    assert_eq!(node.node.ecs_term(), 0, "never fenced");

    // A key n2 serves reads of (it is the tail of its chain).
    let key = (0u32..)
        .map(|i| format!("key-{i}").into_bytes())
        .find(|k| ring.tail(&HashedKey::new(k).position).unwrap().name == "n2")
        .unwrap();
    let get = Request::new(ring.version, RequestBody::Get { key: key.clone() });

    // The leader of term 5 starts the node and probes it: a probe without an echo grants
    // no lease yet.
    assert_eq!(
        send(&ecs, &node, fenced(5, RequestBody::Start)).await,
        ReplyBody::Ok
    );
    assert_eq!(node.node.ecs_term(), 5);
    let probe = |millis, echo| RequestBody::Lease { millis, echo };
    let stamp = leased(
        send(&ecs, &node, fenced(5, probe(60_000, None))).await,
        "term 5 probe",
    );
    assert!(!node.node.leased());

    // A deposed leader of term 4 echoes a valid stamp: refused, and no lease is granted.
    let message = stale(
        send(&ecs, &node, fenced(4, probe(60_000, Some(stamp)))).await,
        "term 4 lease after term 5",
    );
    assert!(
        message.contains("term 4") && message.contains("term 5"),
        "the refusal names both terms: {message}"
    );
    assert!(
        !node.node.leased(),
        "a lease of a deposed leader was granted"
    );
    assert_eq!(send(&client, &node, get.clone()).await, ReplyBody::Stopped);
    assert_eq!(node.node.ecs_term(), 5, "a stale term changes nothing");

    // The same echo from the leader of term 5 grants the lease: the node serves.
    leased(
        send(&ecs, &node, fenced(5, probe(60_000, Some(stamp)))).await,
        "term 5 lease",
    );
    assert!(node.node.leased());
    assert_eq!(send(&client, &node, get.clone()).await, ReplyBody::NotFound);

    // A new leader, term 6. The leader of term 5 is deposed: its stop is refused, and so
    // is an unfenced one (an ECS that does not fence counts as term 0).
    leased(
        send(&ecs, &node, fenced(6, probe(60_000, None))).await,
        "term 6 probe",
    );
    assert_eq!(node.node.ecs_term(), 6);
    stale(
        send(&ecs, &node, fenced(5, RequestBody::Stop)).await,
        "term 5 stop after term 6",
    );
    let message = stale(
        send(&ecs, &node, Request::new(0, RequestBody::Stop)).await,
        "unfenced stop after term 6",
    );
    assert!(
        message.contains("unfenced") && message.contains("term 6"),
        "{message}"
    );
    assert!(node.node.is_running(), "a stale stop stopped the node");
    assert_eq!(send(&client, &node, get.clone()).await, ReplyBody::NotFound);
    let ReplyBody::Status(status) = send(&ecs, &node, fenced(6, RequestBody::Status)).await else {
        panic!("term 6 status refused")
    };
    assert_eq!(status.ecs_term, 6, "the node reports the term it holds");

    // Only the ECS may send fenced requests, whatever the term; nobody raises it otherwise.
    for name in ["n1", "admin"] {
        let caller = transport(&certs, name);
        let message = forbidden(
            send(&caller, &node, fenced(7, RequestBody::Status)).await,
            name,
        );
        assert!(message.contains("fenced status"), "{message}");
    }
    assert_eq!(node.node.ecs_term(), 6);
    // An operator's status is not ECS traffic: it is served, and reports the term.
    let admin = certs.admin();
    assert_eq!(node_status(&admin, &node.addr).await.ecs_term, 6);

    // One envelope inside another: its frame does not decode over the wire, and the node's
    // own check refuses it too (built in process, it skips the decoder).
    let nested = fenced(
        7,
        RequestBody::Fenced {
            term: 7,
            body: Box::new(RequestBody::Stop),
        },
    );
    match send(&ecs, &node, nested.clone()).await {
        ReplyBody::Error {
            kind: ErrorKind::Malformed,
            ..
        } => {}
        other => panic!("a nested fenced frame: {other:?}"),
    }
    let ecs_peer = PeerIdentity {
        role: Role::Ecs,
        name: "ecs".into(),
    };
    let message = forbidden(
        node.node.handle(&ecs_peer, nested).await.body,
        "nested, in process",
    );
    assert!(message.contains("another fenced request"), "{message}");
    assert_eq!(
        node.node.ecs_term(),
        6,
        "a refused envelope raised the term"
    );
    assert!(node.node.is_running());

    // Restarted on the same data dir, the node still knows term 6.
    ecs.close().await;
    let data = node.stop().await;
    let node = TestNode::start_in(&certs, "n2", false, data).await;
    let ecs = transport(&certs, "ecs");
    assert_eq!(
        node.node.ecs_term(),
        6,
        "the term did not survive a restart"
    );
    stale(
        send(&ecs, &node, fenced(5, RequestBody::Status)).await,
        "term 5 after a restart at term 6",
    );
    stale(
        send(&ecs, &node, fenced(5, probe(60_000, None))).await,
        "term 5 probe after a restart at term 6",
    );
    assert!(matches!(
        send(&ecs, &node, fenced(6, RequestBody::Status)).await,
        ReplyBody::Status(s) if s.ecs_term == 6
    ));
    node.stop().await;
}

/// A deposed leader's `LockRange` locks nothing: the range stays writable. The same lock
/// from the current leader does lock it, so the refusal is the term's doing.
#[tokio::test]
async fn a_stale_term_lock_locks_nothing() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let ecs = transport(&certs, "ecs");
    let admin = certs.admin();
    assert!(matches!(
        send(&ecs, &node, fenced(3, RequestBody::Status)).await,
        ReplyBody::Status(_)
    ));
    let id = MoveId {
        change: 1,
        target_version: 1000,
    };
    let range = KeyRange::new(Position::MIN, Position::MAX);
    let lock = RequestBody::LockRange { id, range };

    stale(
        send(&ecs, &node, fenced(2, lock.clone())).await,
        "term 2 lock after term 3",
    );
    assert_eq!(node_status(&admin, &node.addr).await.locked, vec![]);
    let client = certs.client(vec![node.addr.clone()]).await;
    assert_eq!(
        client.put(b"k", b"v").await.unwrap(),
        kvstore::PutOutcome::Created,
        "a write after a stale lock"
    );

    assert_eq!(send(&ecs, &node, fenced(3, lock)).await, ReplyBody::Ok);
    assert_eq!(node_status(&admin, &node.addr).await.locked, vec![range]);
    assert_eq!(
        send(&ecs, &node, fenced(3, RequestBody::AbortMove { id, range })).await,
        ReplyBody::Ok
    );
    assert_eq!(node_status(&admin, &node.addr).await.locked, vec![]);
    node.stop().await;
}

/// Fenced requests of many terms at once: whatever order they are handled in, the node
/// ends at the highest term, in memory and on disk, and never refuses a request of the
/// highest term.
#[tokio::test]
async fn concurrent_terms_end_at_the_highest() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let ecs = transport(&certs, "ecs");
    // 1..=40 in a scrambled order (7 is coprime with 40).
    let terms: Vec<u64> = (0..40u64).map(|i| i * 7 % 40 + 1).collect();
    let replies = futures::future::join_all(
        terms
            .iter()
            .map(|term| send(&ecs, &node, fenced(*term, RequestBody::Status))),
    )
    .await;
    for (term, reply) in terms.iter().zip(replies) {
        match reply {
            ReplyBody::Status(_) => {}
            ReplyBody::Error {
                kind: ErrorKind::StaleTerm,
                ..
            } if *term < 40 => {}
            other => panic!("term {term}: {other:?}"),
        }
    }
    assert_eq!(node.node.ecs_term(), 40, "a higher term was lost");
    assert_eq!(
        node.node.store().load_ecs_term().unwrap(),
        40,
        "a lower term was persisted over a higher one"
    );
    node.stop().await;
}

/// A group member that does not lead sends nothing; a request stamped with term 0 (what a
/// deposed member's stamp read at send time used to give) is refused even by a node that
/// never saw a term, which takes unfenced requests of a single ECS.
#[tokio::test]
async fn a_fenced_request_of_term_0_is_refused_by_a_node_that_never_saw_a_term() {
    let certs = Certs::new();
    let (node, _ring) = common::replicated_member(&certs).await;
    let ecs = transport(&certs, "ecs");
    assert_eq!(node.node.ecs_term(), 0, "never fenced");
    let probe = |echo| RequestBody::Lease {
        millis: 60_000,
        echo,
    };
    let stamp = leased(
        send(&ecs, &node, Request::new(0, probe(None))).await,
        "unfenced probe",
    );
    let message = stale(
        send(&ecs, &node, fenced(0, probe(Some(stamp)))).await,
        "fenced lease of term 0",
    );
    assert!(message.contains("term 0"), "{message}");
    assert!(!node.node.leased(), "a lease of term 0 was granted");
    assert_eq!(
        send(&ecs, &node, Request::new(0, RequestBody::Start)).await,
        ReplyBody::Ok
    );
    stale(
        send(&ecs, &node, fenced(0, RequestBody::Stop)).await,
        "fenced stop of term 0",
    );
    assert!(node.node.is_running(), "a stop of term 0 stopped the node");
    // Unfenced (a single ECS) still works.
    leased(
        send(&ecs, &node, Request::new(0, probe(Some(stamp)))).await,
        "unfenced lease",
    );
    assert!(node.node.leased());
    assert_eq!(node.node.ecs_term(), 0);
}
