//! Hostile peers holding legitimately issued certificates (issue #13's findings), against a
//! real ECS and real nodes over QUIC + mTLS:
//!
//! 1. a `node` certificate cannot install, gossip or piggyback a ring of its own making —
//!    unsigned, signed with its own key, a genuine signature moved onto other bytes, or a
//!    20,000-node ring — and the cluster keeps serving and changing under the ECS;
//! 2. `PutBatch` is accepted only within a move the ECS announced, from the sender it named,
//!    for keys of the range it named;
//! 4. a gossip digest speaks only for its sender, and a forged heartbeat cannot wrap or
//!    freeze another node's counter;
//! 5. `ringkv-certs issue --force` does not follow a symlink at the key path;
//! 6. (issue #21) a `node` certificate cannot swap the ECS's signature of the ring the nodes
//!    hold for one with a padded signer chain.
//!
//! Finding 3 (resources held by unfinished frames) is `tests/resources.rs`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{node_status, Certs, TestCluster};
use ringkv_certs::{Identity, Role};
use ringkv_transport::{Service, Transport};
use ringkv_wire::{
    AdminReply, AdminRequest, ErrorKind, GossipDigest, Heartbeat, KeyRange, Limits,
    MetadataSignature, MoveId, NodeEntry, Reply, ReplyBody, Request, RequestBody, RingMetadata,
    SignedMetadata, StorageEntry, WireError,
};

/// A transport presenting the certificate `name`.
fn transport(certs: &Certs, name: &str) -> Transport {
    Transport::bind_client(
        &certs.identity(name),
        Limits::default(),
        Duration::from_secs(3),
        Duration::from_secs(10),
    )
    .expect("transport")
}

async fn send(t: &Transport, addr: &str, body: RequestBody) -> ReplyBody {
    t.request(addr, &Request::new(0, body))
        .await
        .expect("the node answers")
        .body
}

fn error_kind(reply: &ReplyBody) -> Option<ErrorKind> {
    match reply {
        ReplyBody::Error { kind, .. } => Some(*kind),
        _ => None,
    }
}

/// `caller` sends the node at `addr` a batch of move `id` putting `keys`.
async fn put_batch(caller: &Transport, addr: &str, id: MoveId, keys: &[&Vec<u8>]) -> ReplyBody {
    let entries = keys
        .iter()
        .map(|k| StorageEntry {
            key: k.to_vec(),
            value: Some(b"planted".to_vec()),
            version: 1,
            expires_at: None,
        })
        .collect();
    send(caller, addr, RequestBody::PutBatch { id, entries }).await
}

/// `metadata` "signed" with `id`'s own key and certificate: what a node certificate can do.
fn self_signed(metadata: &RingMetadata, id: &Identity) -> SignedMetadata {
    let key = rustls::crypto::ring::sign::any_supported_type(&id.key).expect("key");
    let signer = key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .expect("an ECDSA key");
    SignedMetadata::sign(metadata, |message| {
        Ok(MetadataSignature {
            scheme: u16::from(signer.scheme()),
            signature: signer.sign(message).map_err(|e| e.to_string())?,
            signer: id
                .chain
                .iter()
                .map(|c| serde_bytes::ByteBuf::from(c.to_vec()))
                .collect(),
        })
    })
    .expect("a valid ring")
}

/// Every forged ring a node certificate can produce: version `u64::MAX`, naming only `addr`.
fn forgeries(mallory: &Identity, genuine: &SignedMetadata, addr: &str) -> Vec<SignedMetadata> {
    let takeover = RingMetadata::new(u64::MAX, vec![NodeEntry::new("mallory", addr)]).unwrap();
    // A genuine signature moved onto the forged bytes.
    let mut moved = genuine.clone();
    moved.version = u64::MAX;
    moved.ring = Arc::new(takeover.to_frame().unwrap());
    // A ring too large to be valid (the decoder never sees it: the signature fails first).
    let huge = RingMetadata {
        version: u64::MAX,
        nodes: (0..20_000)
            .map(|i| NodeEntry::new(format!("x{i}"), format!("10.{}.{}.1:7", i / 256, i % 256)))
            .collect(),
        ..RingMetadata::default()
    };
    let huge = SignedMetadata {
        version: u64::MAX,
        ring: Arc::new(huge.to_frame().unwrap()),
        signature: Arc::default(),
    };
    vec![
        common::unsigned(&takeover),
        self_signed(&takeover, mallory),
        moved,
        huge,
    ]
}

/// A "node" that answers every request with forged metadata: `GetMetadata` with a ring naming
/// itself, anything else `NotResponsible`.
struct Impostor {
    forged: SignedMetadata,
}

impl Service for Impostor {
    type Request = Request;
    type Reply = Reply;

    fn name(&self) -> &str {
        "impostor"
    }

    fn max_frame(&self) -> usize {
        Limits::default().max_frame
    }

    async fn handle(&self, _peer: &ringkv_certs::PeerIdentity, request: Request) -> Reply {
        let metadata = Some(self.forged.clone());
        let body = match request.body {
            RequestBody::GetMetadata => ReplyBody::Metadata(metadata),
            _ => ReplyBody::NotResponsible { metadata },
        };
        Reply::new(u64::MAX, body)
    }

    fn bad_frame(&self, error: WireError) -> Reply {
        Reply::new(
            0,
            ReplyBody::Error {
                kind: error.kind(),
                message: error.to_string(),
            },
        )
    }

    fn unencodable(&self, error: WireError) -> Reply {
        self.bad_frame(error)
    }
}

#[tokio::test]
async fn a_node_certificate_cannot_take_over_the_ring() {
    let mut cluster = TestCluster::start(3).await;
    let store = cluster.client().await;
    for i in 0..30 {
        store
            .put(format!("k{i}").as_bytes(), b"before")
            .await
            .unwrap();
    }
    let version = cluster.ecs.ecs.metadata().version;
    let genuine = cluster
        .node("n1")
        .node
        .view()
        .signed
        .clone()
        .expect("n1 holds a ring");
    let mallory = cluster.certs.identity("mallory");
    let attacker = transport(&cluster.certs, "mallory");
    let forged = forgeries(&mallory, &genuine, "127.0.0.1:9");

    // Installing is the ECS's alone, whatever the metadata.
    let n1 = cluster.node("n1").addr.clone();
    for metadata in &forged {
        let reply = send(
            &attacker,
            &n1,
            RequestBody::InstallMetadata {
                metadata: metadata.clone(),
            },
        )
        .await;
        assert_eq!(error_kind(&reply), Some(ErrorKind::Forbidden), "{reply:?}");
    }
    // Gossip may carry metadata, but only what the ECS signed is adopted.
    for node in &cluster.nodes {
        for metadata in &forged {
            let reply = send(
                &attacker,
                &node.addr,
                RequestBody::GossipPush {
                    metadata: metadata.clone(),
                },
            )
            .await;
            assert_eq!(
                error_kind(&reply),
                Some(ErrorKind::Unauthenticated),
                "{reply:?}"
            );
        }
    }
    // Nothing changed anywhere; every refusal was counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in &cluster.nodes {
        let status = node_status(&cluster.admin, &node.addr).await;
        assert_eq!(status.metadata_version, version, "{}", status.name);
        assert_eq!(
            status.metadata_refused,
            forged.len() as u64,
            "{}",
            status.name
        );
    }

    // A client refuses forged metadata from an impostor seed, and from NotResponsible.
    let endpoint = ringkv_transport::bind_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        ringkv_certs::server_config(&mallory).unwrap(),
        None,
    )
    .unwrap();
    let impostor_addr = endpoint.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let impostor = tokio::spawn(ringkv_transport::serve(
        endpoint,
        Arc::new(Impostor {
            forged: forged[1].clone(),
        }),
        async {
            let _ = stopped.await;
        },
    ));
    let mut seeds = vec![impostor_addr.clone()];
    seeds.extend(cluster.seeds());
    let client = cluster.certs.client(seeds).await;
    assert_eq!(client.metadata().version, version);
    for metadata in &forged {
        assert!(!client.adopt_metadata(metadata), "adopted {metadata:?}");
    }
    assert!(client.stats().metadata_refused > forged.len() as u64);
    // A client whose only seed is the impostor gets no ring at all.
    let only_impostor = cluster.certs.client_config(vec![impostor_addr]);
    assert!(kvstore::KvStore::connect(only_impostor).await.is_err());
    let _ = stop.send(());
    impostor.await.unwrap();

    // The cluster keeps serving, and the ECS keeps changing it.
    for i in 0..30 {
        assert_eq!(
            client.get(format!("k{i}").as_bytes()).await.unwrap(),
            Some(b"before".to_vec())
        );
    }
    let reply = cluster.add_node("n4").await;
    assert!(matches!(reply, AdminReply::Changed { .. }));
    cluster.wait_converged().await;
    assert_eq!(cluster.ecs.ecs.metadata().version, version + 1);
    for i in 0..30 {
        assert_eq!(
            client.get(format!("k{i}").as_bytes()).await.unwrap(),
            Some(b"before".to_vec())
        );
    }
}

#[tokio::test]
async fn put_batch_only_within_an_announced_move_from_its_sender() {
    let cluster = TestCluster::start(2).await;
    let store = cluster.client().await;
    let ring = cluster.ecs.ecs.metadata();
    let n1 = cluster.node("n1");
    let own = ring.held_by("n1")[0];
    let theirs = ring.held_by("n2")[0];
    // A key n1 serves, and a key of n2's range.
    let key_in = |range: KeyRange| {
        (0..)
            .map(|i| format!("key{i}").into_bytes())
            .find(|k| range.contains(&ringkv_wire::key_position(k)))
            .unwrap()
    };
    let (mine, other) = (key_in(own), key_in(theirs));
    store.put(&mine, b"honest").await.unwrap();
    let mallory = transport(&cluster.certs, "mallory");
    let n2_cert = transport(&cluster.certs, "n2");
    let ecs = transport(&cluster.certs, "ecs");
    let id = MoveId {
        change: 77,
        target_version: ring.version + 100,
    };

    // No move announced: refused, from anyone, running or stopped.
    for (who, caller) in [("mallory", &mallory), ("n2", &n2_cert)] {
        let reply = put_batch(caller, &n1.addr, id, &[&mine, &other]).await;
        assert_eq!(
            error_kind(&reply),
            Some(ErrorKind::InvalidState),
            "{who}: {reply:?}"
        );
    }
    let reply = cluster.ask(AdminRequest::Stop).await;
    assert!(matches!(reply, AdminReply::Done(_)), "{reply:?}");
    let reply = put_batch(&mallory, &n1.addr, id, &[&mine]).await;
    assert!(error_kind(&reply).is_some(), "{reply:?}");
    let reply = cluster.ask(AdminRequest::Start).await;
    assert!(matches!(reply, AdminReply::Done(_)), "{reply:?}");

    // The ECS announces a move of n2's range to n1, sent by n2.
    let reply = send(
        &ecs,
        &n1.addr,
        RequestBody::PrepareReceive {
            id,
            range: theirs,
            from: "n2".into(),
        },
    )
    .await;
    assert_eq!(reply, ReplyBody::Ok);
    // Another node certificate may not send its batches.
    let reply = put_batch(&mallory, &n1.addr, id, &[&other]).await;
    assert_eq!(error_kind(&reply), Some(ErrorKind::Forbidden), "{reply:?}");
    // The named sender may not reach outside the announced range (into what n1 serves).
    let reply = put_batch(&n2_cert, &n1.addr, id, &[&other, &mine]).await;
    assert_eq!(error_kind(&reply), Some(ErrorKind::Forbidden), "{reply:?}");
    // Nor send another move's batches.
    let other_id = MoveId { change: 78, ..id };
    let reply = put_batch(&n2_cert, &n1.addr, other_id, &[&other]).await;
    assert_eq!(
        error_kind(&reply),
        Some(ErrorKind::InvalidState),
        "{reply:?}"
    );
    // What the ECS announced is accepted.
    let reply = put_batch(&n2_cert, &n1.addr, id, &[&other]).await;
    assert_eq!(reply, ReplyBody::Ok);
    assert_eq!(
        n1.node.store().get(&other).unwrap(),
        Some(b"planted".to_vec())
    );
    // Once aborted, not even from the sender.
    let reply = send(&ecs, &n1.addr, RequestBody::AbortMove { id, range: theirs }).await;
    assert_eq!(reply, ReplyBody::Ok);
    let reply = put_batch(&n2_cert, &n1.addr, id, &[&other]).await;
    assert_eq!(
        error_kind(&reply),
        Some(ErrorKind::InvalidState),
        "{reply:?}"
    );

    // What n1 serves was never touched; the aborted copy is gone.
    assert_eq!(store.get(&mine).await.unwrap(), Some(b"honest".to_vec()));
    assert_eq!(n1.node.store().get(&other).unwrap(), None);
}

#[tokio::test]
async fn gossip_speaks_only_for_its_sender() {
    let mut cluster = TestCluster::start(0).await;
    for name in ["n1", "n2", "n3"] {
        cluster
            .add_node_with(name, |c| {
                c.gossip.interval = Duration::from_millis(100);
                c.gossip.suspect_after = Duration::from_millis(1000);
                c.gossip.dead_after = Duration::from_millis(2000);
            })
            .await;
    }
    cluster.wait_converged().await;
    let ring = cluster.ecs.ecs.metadata();
    let victim = ring.nodes.iter().position(|n| n.name == "n1").unwrap() as u32;
    // n2's certificate, held by an attacker.
    let n2_cert = transport(&cluster.certs, "n2");
    for target in ["n1", "n3"] {
        let addr = cluster.node(target).addr.clone();
        // In n1's name: refused.
        let reply = send(
            &n2_cert,
            &addr,
            RequestBody::Gossip {
                digest: GossipDigest {
                    from: "n1".into(),
                    metadata_version: ring.version,
                    heartbeat: u64::MAX,
                    heartbeats: vec![],
                },
            },
        )
        .await;
        assert_eq!(error_kind(&reply), Some(ErrorKind::Forbidden), "{reply:?}");
        // In its own name, relaying an absurd counter for n1: ignored.
        let reply = send(
            &n2_cert,
            &addr,
            RequestBody::Gossip {
                digest: GossipDigest {
                    from: "n2".into(),
                    metadata_version: ring.version,
                    heartbeat: 1,
                    heartbeats: vec![Heartbeat {
                        node: victim,
                        counter: u64::MAX,
                    }],
                },
            },
        )
        .await;
        assert!(matches!(reply, ReplyBody::Gossip { .. }), "{reply:?}");
    }
    // Twice the dead timeout later, every node still sees n1 alive, with a sane counter.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        for name in ["n2", "n3"] {
            let status = node_status(&cluster.admin, &cluster.node(name).addr).await;
            let n1 = status.peers.iter().find(|p| p.name == "n1").unwrap();
            assert!(n1.heartbeat < u64::MAX / 2, "{name} sees {n1:?}");
            assert_ne!(
                n1.liveness,
                ringkv_wire::Liveness::Dead,
                "{name} sees {n1:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
#[tokio::test]
async fn a_renewed_ecs_certificate_re_signs_the_ring_nodes_hold() {
    let cluster = TestCluster::start(2).await;
    let ring = cluster.ecs.ecs.metadata();
    let n1 = cluster.node("n1");
    let before = n1.node.view().signed.clone().unwrap();
    // The operator renews the ECS certificate (a new key); the ECS republishes the ring.
    let mut opts = ringkv_certs::IssueOptions::new(Role::Ecs, "ecs");
    opts.sans = vec!["127.0.0.1".into()];
    opts.force = true;
    ringkv_certs::issue(cluster.certs.path(), &opts).unwrap();
    let renewed = cluster.certs.ecs_signer().sign(&ring).unwrap();
    assert_ne!(renewed.signature.signer, before.signature.signer);
    let ecs = transport(&cluster.certs, "ecs");
    let reply = send(
        &ecs,
        &n1.addr,
        RequestBody::InstallMetadata {
            metadata: renewed.clone(),
        },
    )
    .await;
    assert_eq!(reply, ReplyBody::Installed { adopted: false });
    // The node now hands out the fresh signature (also after a restart: it persisted it).
    let reply = send(&ecs, &n1.addr, RequestBody::GetMetadata).await;
    assert_eq!(reply, ReplyBody::Metadata(Some(renewed.clone())));
    // Another ring at the same version is not taken, signed or not.
    let other = ringkv_wire::RingMetadata::new(ring.version, ring.nodes[..1].to_vec()).unwrap();
    assert_ne!(&other, ring.as_ref());
    let forged = common::unsigned(&other);
    let reply = send(
        &ecs,
        &n1.addr,
        RequestBody::InstallMetadata { metadata: forged },
    )
    .await;
    assert_eq!(reply, ReplyBody::Installed { adopted: false });
    assert_eq!(n1.node.view().signed, Some(renewed));
    assert_eq!(n1.node.view().metadata.as_ref(), ring.as_ref());
}

#[test]
fn issue_force_does_not_follow_a_symlink_at_the_key_path() {
    let certs = Certs::new();
    let victim = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(victim.path(), b"precious").unwrap();
    let key = certs.path().join("n9.key");
    std::os::unix::fs::symlink(victim.path(), &key).unwrap();
    let out = std::process::Command::new(common::bin("ringkv-certs"))
        .args([
            "issue", "--role", "node", "--name", "n9", "--force", "--dir",
        ])
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(victim.path()).unwrap(), b"precious");
    let meta = std::fs::symlink_metadata(&key).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the key path is a regular file now"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        Identity::from_dir(certs.path(), "n9")
            .unwrap()
            .role()
            .unwrap(),
        Role::Node
    );
}

/// `genuine` with its signer chain padded by one junk "intermediate" so that a `GossipPush`
/// carrying it is exactly `max_frame` bytes: the largest a node takes, one byte short of a
/// reply that hands it back.
fn padded_to_frame(genuine: &SignedMetadata, max_frame: usize) -> SignedMetadata {
    let push_len = |metadata: &SignedMetadata| {
        let push = Request::new(
            0,
            RequestBody::GossipPush {
                metadata: metadata.clone(),
            },
        );
        ringkv_wire::codec::encode(&push, usize::MAX >> 1)
            .unwrap()
            .len()
            - ringkv_wire::codec::FRAME_HEADER_LEN
    };
    let mut signature = MetadataSignature::clone(&genuine.signature);
    signature
        .signer
        .push(serde_bytes::ByteBuf::from(vec![0x30; 16]));
    let mut padded = SignedMetadata {
        signature: Arc::new(signature),
        ..genuine.clone()
    };
    // The junk's length prefix grows with it: settle in a few rounds.
    for _ in 0..4 {
        let missing = max_frame as i64 - push_len(&padded) as i64;
        let mut signature = MetadataSignature::clone(&padded.signature);
        let junk = signature.signer.last_mut().unwrap();
        let len = (junk.len() as i64 + missing) as usize;
        junk.resize(len, 0x30);
        padded.signature = Arc::new(signature);
    }
    assert_eq!(push_len(&padded), max_frame);
    padded
}

/// Issue #21: a `node` certificate gossips the ring the nodes hold, at its version, with the
/// ECS's genuine signature but a signer chain padded with a junk intermediate to the frame
/// limit. Were it taken as a fresh signature of the same ring, it would be persisted and
/// handed out, and every `GetMetadata` and `NotResponsible` reply would exceed the frame
/// limit until the next version: no client could bootstrap. It is not taken: `GetMetadata`
/// still answers with the ECS's signature, and a client bootstraps from that node alone.
#[tokio::test]
async fn a_padded_signer_chain_does_not_replace_the_ecs_signature() {
    let cluster = TestCluster::start(2).await;
    let n1 = cluster.node("n1");
    let genuine = n1.node.view().signed.clone().expect("n1 holds a ring");
    let padded = padded_to_frame(&genuine, Limits::default().max_frame);
    let attacker = transport(&cluster.certs, "mallory");
    let reply = send(
        &attacker,
        &n1.addr,
        RequestBody::GossipPush {
            metadata: padded.clone(),
        },
    )
    .await;
    eprintln!("the padded push: {:?}", error_kind(&reply).ok_or(&reply));
    // Even from the ECS's certificate a padded chain is refused: too large, or (below the
    // size cap) more than the signer's leaf.
    let mut small = MetadataSignature::clone(&genuine.signature);
    small
        .signer
        .push(serde_bytes::ByteBuf::from(vec![0x30; 16]));
    let small = SignedMetadata {
        signature: Arc::new(small),
        ..genuine.clone()
    };
    let ecs = transport(&cluster.certs, "ecs");
    for (metadata, kind) in [
        (padded, ErrorKind::Malformed),
        (small.clone(), ErrorKind::Unauthenticated),
    ] {
        let reply = send(&ecs, &n1.addr, RequestBody::InstallMetadata { metadata }).await;
        assert_eq!(error_kind(&reply), Some(kind), "{reply:?}");
    }
    let reply = send(
        &attacker,
        &n1.addr,
        RequestBody::GossipPush { metadata: small },
    )
    .await;
    eprintln!(
        "the small padded push: {:?}",
        error_kind(&reply).ok_or(&reply)
    );
    let client = transport(&cluster.certs, "client");
    let reply = send(&client, &n1.addr, RequestBody::GetMetadata).await;
    assert_eq!(reply, ReplyBody::Metadata(Some(genuine.clone())));
    assert_eq!(n1.node.view().signed, Some(genuine));
    let store = kvstore::KvStore::connect(cluster.certs.client_config(vec![n1.addr.clone()]))
        .await
        .expect("a client bootstraps from n1");
    store.put(b"after", b"padding").await.unwrap();
    assert_eq!(
        store.get(b"after").await.unwrap(),
        Some(b"padding".to_vec())
    );
}
