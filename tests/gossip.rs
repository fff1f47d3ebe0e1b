//! Gossip on a real cluster over QUIC + mTLS: a version the ECS seeds at the nodes a change
//! affects reaches the others by gossip; a frozen node is reported suspected, then dead,
//! and when it runs again it is alive and catches up with the versions it missed.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, node_status, NodeProcess, TestCluster, TestEcs, TestNode};
use ringkv_ecs::plan;
use ringkv_node::gossip::GossipConfig;
use ringkv_wire::{AdminReply, AdminRequest, Liveness, NodeEntry, NodeReport};

/// Fast gossip for tests: T = 100 ms, suspected after 1 s, dead after 5 s. A busy 2-core
/// machine can stall a live node's heartbeats past 1 s now and then (everything of a test
/// shares one thread), so the tests take a transient suspicion of a live node for what it
/// is, and hold only death (50 intervals of silence) against a live node.
const DEAD_AFTER: Duration = Duration::from_millis(5000);

fn fast_gossip() -> GossipConfig {
    GossipConfig {
        interval: Duration::from_millis(100),
        suspect_after: Duration::from_millis(1000),
        dead_after: DEAD_AFTER,
        ..GossipConfig::default()
    }
}

/// The same as `ringkv-node` flags.
const FAST_GOSSIP_FLAGS: [&str; 6] = [
    "--gossip-interval-ms",
    "100",
    "--suspect-after-ms",
    "1000",
    "--dead-after-ms",
    "5000",
];

/// An ECS (answering `status` within 300 ms per node) and no nodes yet.
async fn empty_cluster() -> TestCluster {
    let certs = std::sync::Arc::new(common::Certs::new());
    let ecs_state = tempfile::tempdir().unwrap();
    let ecs = TestEcs::start_with(&certs, ecs_state.path(), |c| {
        c.status_timeout = Duration::from_millis(300)
    })
    .await;
    let admin = certs.admin();
    TestCluster {
        certs,
        ecs,
        ecs_state,
        nodes: Vec::new(),
        admin,
    }
}

/// Starts an in-process node with fast gossip and has the ECS add it.
async fn add_node(cluster: &mut TestCluster, name: &str) {
    let data = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(&cluster.certs, name, false, data, |c| {
        c.gossip = fast_gossip()
    })
    .await;
    let reply = cluster
        .ask(AdminRequest::AddNode {
            name: name.into(),
            addr: node.addr.clone(),
        })
        .await;
    assert!(matches!(reply, AdminReply::Changed { .. }), "{reply:?}");
    cluster.nodes.push(node);
}

async fn status(cluster: &TestCluster) -> Vec<NodeReport> {
    match cluster.ask(AdminRequest::Status).await {
        AdminReply::Status { nodes, .. } => nodes,
        other => panic!("status: {other:?}"),
    }
}

fn report<'a>(nodes: &'a [NodeReport], name: &str) -> &'a NodeReport {
    nodes
        .iter()
        .find(|n| n.name == name)
        .expect("node in status")
}

#[tokio::test]
async fn a_version_seeded_at_the_affected_nodes_reaches_all_five_by_gossip() {
    let mut cluster = empty_cluster().await;
    for i in 1..=4 {
        add_node(&mut cluster, &format!("n{i}")).await;
    }
    cluster.wait_converged().await;
    let before = cluster.ecs.ecs.metadata();
    assert_eq!(before.version, 4);

    // The join of n5, as the ECS plans it: the new version goes to the one existing node
    // the join affects (n5's successor, which sends it its range) and to n5, nobody else.
    let data = tempfile::tempdir().unwrap();
    let n5 = TestNode::start_with(&cluster.certs, "n5", false, data, |c| {
        c.gossip = fast_gossip()
    })
    .await;
    let planned = plan::join(&before, NodeEntry::new("n5", n5.addr.clone())).unwrap();
    let seeded = planned.installed_at();
    let sender = planned.copies[0].from.name.clone();
    assert_eq!(seeded, vec![sender.clone(), "n5".to_string()]);

    let reply = cluster
        .ask(AdminRequest::AddNode {
            name: "n5".into(),
            addr: n5.addr.clone(),
        })
        .await;
    let joined = Instant::now();
    assert!(matches!(reply, AdminReply::Changed { .. }), "{reply:?}");
    cluster.nodes.push(n5);
    assert_eq!(cluster.ecs.ecs.metadata().version, 5);

    // The three others get version 5 from their peers within a few intervals (typically
    // well under a second; the deadline leaves room for a loaded machine).
    let deadline = joined + Duration::from_secs(10);
    loop {
        let versions: Vec<(String, u64)> = cluster
            .nodes
            .iter()
            .map(|n| (n.node.config().name.clone(), n.node.metadata_version()))
            .collect();
        if versions.iter().all(|(_, v)| *v == 5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all nodes hold version 5 after 100 intervals: {versions:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "all 5 nodes hold version 5 {:?} after the join returned (T = 100 ms); seeded at {sender} and n5",
        joined.elapsed()
    );
    for node in &cluster.nodes {
        assert!(
            node.node.view().own_range.is_some(),
            "{}",
            node.node.config().name
        );
    }
    // And every node sees every other alive.
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in &cluster.nodes {
        loop {
            let peers = node.node.peer_liveness();
            assert_eq!(peers.len(), 4);
            if peers.iter().all(|p| p.liveness == Liveness::Alive) {
                break;
            }
            assert!(Instant::now() < deadline, "{peers:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn a_frozen_node_is_suspected_then_dead_and_catches_up_when_it_runs_again() {
    let mut cluster = empty_cluster().await;
    for i in 1..=4 {
        add_node(&mut cluster, &format!("n{i}")).await;
    }
    // The fifth node is a process, so that it can be frozen with SIGSTOP.
    let data = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let n5 = NodeProcess::spawn_with(&cluster.certs, "n5", addr, data.path(), &FAST_GOSSIP_FLAGS);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster
        .admin
        .request(
            &n5.addr,
            &ringkv_wire::Request::new(0, ringkv_wire::RequestBody::Status),
        )
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "n5 never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = cluster
        .ask(AdminRequest::AddNode {
            name: "n5".into(),
            addr: n5.addr.clone(),
        })
        .await;
    assert!(matches!(reply, AdminReply::Changed { .. }), "{reply:?}");
    cluster.wait_converged().await;
    let all_alive = |nodes: &[NodeReport]| {
        nodes
            .iter()
            .all(|n| n.liveness == Some(Liveness::Alive) && n.status.is_some())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_alive(&status(&cluster).await) {
        assert!(Instant::now() < deadline, "not all alive at first");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Freeze n5: it answers nobody, its heartbeat stops.
    n5.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let (mut suspected_at, mut dead_at) = (None, None);
    while dead_at.is_none() {
        assert!(
            frozen.elapsed() < Duration::from_secs(30),
            "n5 not reported dead 30 s after it froze"
        );
        let nodes = status(&cluster).await;
        let r = report(&nodes, "n5");
        assert!(r.status.is_none(), "a frozen node answered: {r:?}");
        match r.liveness {
            Some(Liveness::Suspected) => {
                suspected_at.get_or_insert(frozen.elapsed());
            }
            Some(Liveness::Dead) => dead_at = Some(frozen.elapsed()),
            _ => {}
        }
        // The others are never taken for dead (and answer the ECS themselves).
        for other in ["n1", "n2", "n3", "n4"] {
            let r = report(&nodes, other);
            assert_ne!(r.liveness, Some(Liveness::Dead), "{other}: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (suspected_at, dead_at) = (
        suspected_at.expect("reported suspected before dead"),
        dead_at.unwrap(),
    );
    println!("n5 frozen: reported suspected after {suspected_at:?}, dead after {dead_at:?}");
    assert!(
        suspected_at >= Duration::from_millis(1000),
        "{suspected_at:?}"
    );
    assert!(dead_at >= DEAD_AFTER, "{dead_at:?}");
    // And the others are alive (a transient suspicion of a live node has passed).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = status(&cluster).await;
        if ["n1", "n2", "n3", "n4"]
            .iter()
            .all(|n| report(&nodes, n).liveness == Some(Liveness::Alive))
        {
            break;
        }
        assert!(Instant::now() < deadline, "live nodes not alive: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The status table says so too.
    let AdminReply::Status {
        metadata, nodes, ..
    } = cluster.ask(AdminRequest::Status).await
    else {
        unreachable!()
    };
    let table = ringkv::cli::ecs::status_text(&metadata, &nodes);
    println!("{table}");
    let line = table.lines().find(|l| l.starts_with("n5 ")).unwrap();
    assert!(line.contains(" dead "), "{line}");
    assert!(line.contains("unreachable"), "{line}");

    // While n5 is frozen the ring changes without it: a node whose leave does not involve
    // n5 (neither it nor its successor) leaves. The ECS tells only the two nodes involved.
    let ring = cluster.ecs.ecs.metadata();
    let leaving = ring
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|name| name != "n5" && ring.leave_move(name).unwrap().unwrap().to.name != "n5")
        .unwrap();
    cluster.remove_node(&leaving).await;
    let current = cluster.ecs.ecs.metadata().version;
    assert_eq!(current, 6);
    cluster.wait_converged().await;

    // Thaw n5: gossip brings it the version it missed (no status call meanwhile: `status`
    // would install it directly), and everyone sees it alive again.
    n5.signal(libc::SIGCONT);
    let thawed = Instant::now();
    loop {
        let st = node_status(&cluster.admin, &n5.addr).await;
        if st.metadata_version == current {
            break;
        }
        assert!(
            thawed.elapsed() < Duration::from_secs(10),
            "n5 still at version {} 10 s after it thawed",
            st.metadata_version
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caught_up = thawed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = status(&cluster).await;
        let r = report(&nodes, "n5");
        if all_alive(&nodes) {
            assert_eq!(r.status.as_ref().unwrap().metadata_version, current);
            // Its own view of the others is fresh again too.
            let views = &r.status.as_ref().unwrap().peers;
            if views.iter().all(|p| p.liveness == Liveness::Alive) {
                assert!(!views.iter().any(|p| p.name == leaving), "{views:?}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "n5 not alive again: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("n5 thawed: caught up to version {current} by gossip after {caught_up:?}");
}
