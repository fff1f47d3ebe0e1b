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
            zone: None,
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

/// The names of the ten-node rings below, in the order they join: n5 last. With balanced
/// placement every node takes part in a change of a small ring; in this one the join of an
/// eleventh node leaves n5 out (it has the smallest share, and the newcomer takes from the
/// largest), which the tests check with the ECS's own planner before relying on it.
fn ten_before_n5() -> Vec<String> {
    (1..=10)
        .filter(|i| *i != 5)
        .map(|i| format!("n{i}"))
        .collect()
}

/// Asserts the ECS would plan the join of `name` into `ring` without involving n5.
fn assert_join_leaves_n5_out(ring: &ringkv_wire::RingMetadata, name: &str) -> plan::Plan {
    let planned = plan::join(ring, NodeEntry::new(name, "127.0.0.1:1")).unwrap();
    assert!(
        !planned.involves("n5"),
        "the join involves n5: {:#?}",
        planned.steps
    );
    planned
}

#[tokio::test]
async fn a_version_seeded_at_the_affected_nodes_reaches_all_by_gossip() {
    let mut cluster = empty_cluster().await;
    for name in ten_before_n5().iter().chain([&"n5".to_string()]) {
        add_node(&mut cluster, name).await;
    }
    cluster.wait_converged().await;
    let before = cluster.ecs.ecs.metadata();
    assert_eq!(before.version, 10);

    // The join of n11, as the ECS plans it: the new version goes to the nodes the join
    // affects (those it takes partitions from) and to n11, not to n5.
    let planned = assert_join_leaves_n5_out(&before, "n11");
    let seeded = planned.installed_at();
    assert!(seeded.contains(&"n11".to_string()), "{seeded:?}");
    let data = tempfile::tempdir().unwrap();
    let n11 = TestNode::start_with(&cluster.certs, "n11", false, data, |c| {
        c.gossip = fast_gossip()
    })
    .await;
    let reply = cluster
        .ask(AdminRequest::AddNode {
            name: "n11".into(),
            addr: n11.addr.clone(),
            zone: None,
        })
        .await;
    let joined = Instant::now();
    assert!(matches!(reply, AdminReply::Changed { .. }), "{reply:?}");
    cluster.nodes.push(n11);
    assert_eq!(cluster.ecs.ecs.metadata().version, 11);

    // n5 gets version 11 from its peers within a few intervals (typically well under a
    // second; the deadline leaves room for a loaded machine).
    let deadline = joined + Duration::from_secs(10);
    loop {
        let versions: Vec<(String, u64)> = cluster
            .nodes
            .iter()
            .map(|n| (n.node.config().name.clone(), n.node.metadata_version()))
            .collect();
        if versions.iter().all(|(_, v)| *v == 11) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all nodes hold version 11 after 100 intervals: {versions:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "all 11 nodes hold version 11 {:?} after the join returned (T = 100 ms); seeded at {seeded:?}",
        joined.elapsed()
    );
    for node in &cluster.nodes {
        assert!(
            !node.node.view().held.is_empty(),
            "{}",
            node.node.config().name
        );
    }
    // And every node sees every other alive.
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in &cluster.nodes {
        loop {
            let peers = node.node.peer_liveness();
            assert_eq!(peers.len(), cluster.nodes.len() - 1);
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
    let others = ten_before_n5();
    for name in &others {
        add_node(&mut cluster, name).await;
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
            zone: None,
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
        for other in &others {
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
        if others
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

    // While n5 is frozen the ring changes without it: n11 joins, taking its share from the
    // most loaded nodes, which n5 (the last to join, with the smallest share) is not. The
    // ECS tells only the nodes involved.
    let joining = "n11";
    assert_join_leaves_n5_out(&cluster.ecs.ecs.metadata(), joining);
    add_node(&mut cluster, joining).await;
    let current = cluster.ecs.ecs.metadata().version;
    assert_eq!(current, 11);
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
                assert!(views.iter().any(|p| p.name == joining), "{views:?}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "n5 not alive again: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("n5 thawed: caught up to version {current} by gossip after {caught_up:?}");
}
