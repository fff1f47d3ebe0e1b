//! The permission matrix: every request kind, sent by every certificate role over real QUIC +
//! mTLS, is either served or refused with `Forbidden`, exactly as the table below says. The
//! table is written out by hand (not derived from the code under test) and matches on every
//! request kind without a wildcard, so a new kind does not compile until it has a row.

mod common;

use std::time::Duration;

use common::{Certs, TestEcs, TestNode};
use ringkv_certs::Role;
use ringkv_transport::Transport;
use ringkv_wire::{
    AdminReply, AdminRequest, ErrorKind, GossipDigest, KeyRange, Limits, MoveId, NodeEntry,
    Position, ReplyBody, Request, RequestBody,
};

/// The roles a certificate may carry, with the certificate name the test uses for each.
const ROLES: [(Role, &str); 4] = [
    (Role::Client, "client"),
    (Role::Node, "n2"),
    (Role::Admin, "admin"),
    (Role::Ecs, "ecs"),
];

/// Which roles a node serves `body` for (client, node, admin, ecs).
fn node_allows(body: &RequestBody) -> [bool; 4] {
    const ALL: [bool; 4] = [true, true, true, true];
    const NOT_CLIENT: [bool; 4] = [false, true, true, true];
    const NODE: [bool; 4] = [false, true, false, false];
    const ECS: [bool; 4] = [false, false, false, true];
    match body {
        RequestBody::Get { .. }
        | RequestBody::Put { .. }
        | RequestBody::Delete { .. }
        | RequestBody::PutIf { .. }
        | RequestBody::DeleteIf { .. }
        | RequestBody::GetMany { .. }
        | RequestBody::PutMany { .. }
        | RequestBody::DeleteMany { .. }
        | RequestBody::PutTtl { .. }
        | RequestBody::Scan { .. }
        | RequestBody::GetMetadata => ALL,
        RequestBody::Status => NOT_CLIENT,
        // What nodes exchange among themselves (a batch is further checked against the
        // move the ECS announced; a digest against the sender's certificate name).
        // A chain write is further checked against the sender's place in the key's chain.
        // `Expire` asks the head about a record; it removes only what the head's clock says
        // is due.
        RequestBody::PutBatch { .. }
        | RequestBody::Expire { .. }
        | RequestBody::Replicate { .. }
        | RequestBody::ReplicateBatch { .. }
        | RequestBody::Gossip { .. }
        | RequestBody::GossipPush { .. } => NODE,
        // Only the ECS speaks for the ring and drives moves; operators go through it.
        RequestBody::InstallMetadata { .. }
        | RequestBody::Start
        | RequestBody::Stop
        | RequestBody::LockRange { .. }
        | RequestBody::AbortMove { .. }
        | RequestBody::PrepareReceive { .. }
        | RequestBody::TransferRange { .. }
        | RequestBody::TransferDelta { .. }
        | RequestBody::DeleteRange { .. }
        | RequestBody::Lease { .. } => ECS,
        // The ECS leader's requests stamped with its Raft term: only what the ECS may send
        // unfenced, and never one envelope inside another.
        RequestBody::Fenced { body, .. } => match **body {
            RequestBody::Fenced { .. } => [false; 4],
            ref body if node_allows(body)[3] => ECS,
            _ => [false; 4],
        },
    }
}

/// One harmless request of every kind (Stop comes before Start, so the node ends running;
/// the ranges hold no key; the transfer target does not exist; the lock is aborted again
/// at the end).
fn every_request_kind() -> Vec<RequestBody> {
    let mut end = [0u8; 20];
    end[19] = 1;
    let range = KeyRange::new(Position([0; 20]), Position(end));
    let nowhere = NodeEntry::new("nowhere", "127.0.0.1:9");
    // A move of a version far ahead, so nothing here can commit it.
    let id = MoveId {
        change: 1,
        target_version: 1000,
    };
    vec![
        RequestBody::Get {
            key: b"perm".to_vec(),
        },
        RequestBody::Put {
            key: b"perm".to_vec(),
            value: b"v".to_vec(),
        },
        // A long TTL (the delete below removes the key).
        RequestBody::PutTtl {
            key: b"perm".to_vec(),
            value: b"v".to_vec(),
            ttl_ms: 3_600_000,
            expected: None,
        },
        // Not version 1, and not due: the head answers `Conflict`, removes nothing.
        RequestBody::Expire {
            key: b"perm".to_vec(),
            version: 1,
        },
        // Both conditions fail (the key exists, and not at version 1): nothing written.
        RequestBody::PutIf {
            key: b"perm".to_vec(),
            value: b"v".to_vec(),
            expected: ringkv_wire::Expected::Absent,
        },
        RequestBody::DeleteIf {
            key: b"perm".to_vec(),
            version: 1,
        },
        RequestBody::Delete {
            key: b"perm".to_vec(),
        },
        RequestBody::GetMany {
            keys: vec![serde_bytes::ByteBuf::from(b"perm".to_vec())],
        },
        RequestBody::PutMany {
            entries: vec![ringkv_wire::KeyValue {
                key: b"perm".to_vec(),
                value: b"v".to_vec(),
            }],
        },
        RequestBody::DeleteMany {
            keys: vec![serde_bytes::ByteBuf::from(b"perm".to_vec())],
        },
        RequestBody::Scan {
            from: Vec::new(),
            prefix: b"perm".to_vec(),
            limit: 10,
            values: true,
        },
        RequestBody::GetMetadata,
        RequestBody::Status,
        RequestBody::Stop,
        RequestBody::Start,
        RequestBody::InstallMetadata {
            metadata: common::unsigned(&Default::default()),
        },
        RequestBody::LockRange { id, range },
        RequestBody::AbortMove { id, range },
        RequestBody::PrepareReceive {
            id,
            range,
            from: "n2".into(),
        },
        RequestBody::TransferRange {
            id,
            range,
            to: nowhere.clone(),
        },
        RequestBody::TransferDelta {
            id,
            range,
            to: nowhere,
            last: false,
        },
        RequestBody::PutBatch {
            id,
            entries: vec![],
        },
        RequestBody::AbortMove { id, range },
        RequestBody::DeleteRange { range },
        RequestBody::Gossip {
            digest: GossipDigest {
                from: "n2".into(),
                metadata_version: 0,
                heartbeat: 1,
                heartbeats: vec![],
            },
        },
        RequestBody::GossipPush {
            metadata: common::unsigned(&Default::default()),
        },
        RequestBody::Replicate {
            write: ringkv_wire::ChainWrite {
                key: b"perm".to_vec(),
                value: Some(b"v".to_vec()),
                version: 1,
                expires_at: None,
                origin: 1,
                seq: 1,
            },
        },
        RequestBody::ReplicateBatch { writes: vec![] },
        RequestBody::Lease {
            millis: 1000,
            echo: None,
        },
        // Last: once the ECS sent a term, its unfenced requests are refused (`StaleTerm`,
        // not `Forbidden`). (One envelope inside another does not even decode: the node
        // answers `Malformed`, tests/fence.rs.)
        RequestBody::Fenced {
            term: 1,
            body: Box::new(RequestBody::PutBatch {
                id,
                entries: vec![],
            }),
        },
        RequestBody::Fenced {
            term: 1,
            body: Box::new(RequestBody::Start),
        },
    ]
}

fn transport(certs: &Certs, name: &str) -> Transport {
    Transport::bind_client(
        &certs.identity(name),
        Limits::default(),
        Duration::from_secs(1),
        Duration::from_secs(10),
    )
    .unwrap()
}

#[tokio::test]
async fn every_node_request_kind_by_every_role() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let mut checked = 0;
    for (i, (role, name)) in ROLES.into_iter().enumerate() {
        let caller = transport(&certs, name);
        for body in every_request_kind() {
            let fenced = if body.term().is_some() { "fenced " } else { "" };
            let kind = format!("{fenced}{}", body.name());
            let allowed = node_allows(&body)[i];
            let reply = caller
                .request(&node.addr, &Request::new(0, body))
                .await
                .unwrap_or_else(|e| panic!("{role} {kind}: {e}"));
            let forbidden = matches!(
                reply.body,
                ReplyBody::Error {
                    kind: ErrorKind::Forbidden,
                    ..
                }
            );
            assert_eq!(
                forbidden, !allowed,
                "a {role} certificate sending {kind}: got {:?}",
                reply.body
            );
            checked += 1;
        }
        caller.close().await;
    }
    assert_eq!(checked, ROLES.len() * every_request_kind().len());
    // The refused requests changed nothing; the allowed ones left the node serving.
    assert!(node.node.is_running());
    assert_eq!(
        node.node.ecs_term(),
        1,
        "only the ECS's fenced start raised the term"
    );
    assert_eq!(node.node.store().get(b"perm").unwrap(), None);
    node.stop().await;
}

/// Which roles the ECS answers `request` for (client, node, admin, ecs): only operators
/// administer.
fn ecs_allows(request: &AdminRequest) -> [bool; 4] {
    match request {
        AdminRequest::AddNode { .. }
        | AdminRequest::RemoveNode { .. }
        | AdminRequest::Ring
        | AdminRequest::Status
        | AdminRequest::Progress
        | AdminRequest::Start
        | AdminRequest::Stop
        | AdminRequest::Group
        | AdminRequest::AddEcsMember { .. }
        | AdminRequest::RemoveEcsMember { .. } => [false, false, true, false],
        // A single ECS is no Raft member: it refuses Raft messages from everyone (an `ecs`
        // peer is closed at connection time, an operator gets an error).
        AdminRequest::Raft(_) => [false, false, false, false],
    }
}

#[tokio::test]
async fn every_ecs_request_kind_by_every_role() {
    let certs = Certs::new();
    let state = tempfile::tempdir().unwrap();
    let ecs = TestEcs::start(&certs, state.path()).await;
    // Harmless on an empty ring: the changes name nodes that are not there.
    let requests = [
        AdminRequest::Ring,
        AdminRequest::Status,
        AdminRequest::Stop,
        AdminRequest::Start,
        AdminRequest::RemoveNode {
            name: "absent".into(),
        },
        AdminRequest::AddNode {
            name: "bad name".into(),
            addr: "127.0.0.1:9".into(),
            zone: None,
        },
        AdminRequest::Raft(ringkv_wire::RaftRpc {
            kind: ringkv_wire::RaftRpcKind::Vote,
            payload: vec![0; 8],
        }),
        AdminRequest::Group,
        AdminRequest::AddEcsMember {
            id: 4,
            name: "ecs4".into(),
            addr: "127.0.0.1:9".into(),
        },
        AdminRequest::RemoveEcsMember { id: 2 },
        AdminRequest::Progress,
    ];
    for (i, (role, name)) in ROLES.into_iter().enumerate() {
        let caller = transport(&certs, name);
        for request in &requests {
            // A role the ECS does not admit is closed at connection time, before any frame
            // of it is read; the request check stays as a second line.
            let refused = match caller
                .call::<_, AdminReply>(&ecs.addr, request, Duration::from_secs(10))
                .await
            {
                Ok(reply) => {
                    matches!(&reply, AdminReply::Error(m) if m.contains("admin certificate is needed") || m.contains("takes no Raft messages"))
                }
                Err(e) => {
                    let admitted = format!("ecs does not admit {role} certificates");
                    assert!(e.to_string().contains(&admitted), "{role} {request:?}: {e}");
                    true
                }
            };
            assert_eq!(
                refused,
                !ecs_allows(request)[i],
                "a {role} certificate sending {request:?}"
            );
        }
        caller.close().await;
    }
    assert_eq!(ecs.ecs.metadata().version, 0, "nothing was changed");
    ecs.stop().await;
}
