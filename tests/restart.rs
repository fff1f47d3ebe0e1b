//! A node killed with SIGKILL and restarted on the same address and data directory: peers
//! holding connections to the dead process learn at their first packet that those
//! connections are dead (the restarted node answers them with a QUIC stateless reset, its
//! reset key being derived from `<data-dir>/reset.key`), and `Transport::call` sends the
//! request again on a new connection. Nobody waits for a request timeout.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::{keys_for, Load};
use common::{add_node_via, ask_ecs, free_port, wait_answers, Certs, NodeProcess, TestEcs};
use ringkv_wire::{AdminReply, AdminRequest, KeyRange, NodeEntry, Position};

#[tokio::test]
async fn peers_of_a_restarted_node_reconnect_at_once() {
    let certs = Certs::new();
    let ecs_state = tempfile::tempdir().unwrap();
    let ecs = TestEcs::start(&certs, ecs_state.path()).await;
    let admin = certs.admin();

    // Two node processes, added through the ECS.
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for name in ["n1", "n2"] {
        let data = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let node = NodeProcess::spawn_with(&certs, name, addr, data.path(), &[]);
        wait_answers(&certs, &node.addr).await;
        add_node_via(&admin, &ecs.addr, name, &node.addr).await;
        nodes.push(node);
        dirs.push(data);
    }
    assert!(
        dirs[0].path().join("reset.key").exists(),
        "the node keeps its reset secret in its data dir"
    );

    // A client writes keys to both nodes, and keeps its connections.
    let client = certs
        .client(nodes.iter().map(|n| n.addr.clone()).collect())
        .await;
    let keys: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
    for key in &keys {
        client.put(key.as_bytes(), key.as_bytes()).await.unwrap();
    }
    // And a recorded workload runs through everything below (other keys, other client).
    let all = KeyRange::new(Position::MAX, Position::MAX);
    let load_keys: Vec<Vec<u8>> = keys_for(&all, 24, 0)
        .into_iter()
        .map(|k| [b"load-".as_slice(), &k].concat())
        .collect();
    let load = Load::start(
        Arc::new(
            certs
                .client(nodes.iter().map(|n| n.addr.clone()).collect())
                .await,
        ),
        load_keys,
        4,
    );
    let metadata = ecs.ecs.metadata();
    let victim_key = keys
        .iter()
        .find(|k| metadata.responsible_for_key(k.as_bytes()).unwrap().name == "n1")
        .expect("n1 owns some key")
        .clone();
    assert_eq!(
        client.get(victim_key.as_bytes()).await.unwrap(),
        Some(victim_key.clone().into_bytes())
    );

    // SIGKILL n1 and restart it on the same address and data dir. The client, the ECS and
    // n2 all hold connections to the dead process.
    let addr: SocketAddr = nodes[0].addr.parse().unwrap();
    nodes[0].kill();
    nodes[0] = NodeProcess::spawn_with(&certs, "n1", addr, dirs[0].path(), &[]);
    let answered = wait_answers(&certs, &nodes[0].addr).await;

    // The old client's first request to n1 goes over its connection to the dead process.
    let got = client.get(victim_key.as_bytes()).await;
    let client_wait = answered.elapsed();
    println!("old client's first get from the restarted node: {client_wait:?} after it answered");

    // The ECS's first status sees n1 reachable.
    let started = Instant::now();
    let reply = ask_ecs(&admin, &ecs.addr, AdminRequest::Status).await;
    let status_took = started.elapsed();
    let AdminReply::Status { nodes: reports, .. } = reply else {
        panic!("status: {reply:?}")
    };
    let n1 = reports
        .iter()
        .find(|r| r.name == "n1")
        .expect("n1 in status");
    println!(
        "ECS status right after the restart ({status_took:?}): n1 {}",
        match &n1.error {
            None => "reachable".to_string(),
            Some(e) => format!("unreachable: {e}"),
        }
    );

    // A join that moves a range out of the restarted node (it is the sender), right after
    // the restart: every step of the move reaches it at once.
    let n3_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plan = ringkv_ecs::plan::join(
        &ecs.ecs.metadata(),
        NodeEntry::new("n3", n3_addr.to_string()),
    )
    .unwrap();
    assert!(
        plan.copies.iter().any(|c| c.from.name == "n1"),
        "the newcomer takes a share from n1: {:#?}",
        plan.copies
    );
    let n3_dir = tempfile::tempdir().unwrap();
    let n3 = NodeProcess::spawn_with(&certs, "n3", n3_addr, n3_dir.path(), &[]);
    wait_answers(&certs, &n3.addr).await;
    nodes[0].kill();
    nodes[0] = NodeProcess::spawn_with(&certs, "n1", addr, dirs[0].path(), &[]);
    wait_answers(&certs, &nodes[0].addr).await;
    let started = Instant::now();
    let joined = ask_ecs(
        &admin,
        &ecs.addr,
        AdminRequest::AddNode {
            name: "n3".into(),
            addr: n3.addr.clone(),
            zone: None,
        },
    )
    .await;
    let join_took = started.elapsed();
    println!("AddNode moving a range out of the node right after its restart: {join_took:?}");
    assert!(
        matches!(joined, AdminReply::Changed { .. }),
        "join n3: {joined:?}"
    );
    assert!(
        join_took < Duration::from_secs(5),
        "AddNode took {join_took:?}"
    );

    // Kill and restart it once more, with the ECS connected to it (another status makes
    // sure of that even if the first one failed): the ECS's connection and n2's are to the
    // dead process again. Removing the restarted node goes through at once.
    ask_ecs(&admin, &ecs.addr, AdminRequest::Status).await;
    nodes[0].kill();
    nodes[0] = NodeProcess::spawn_with(&certs, "n1", addr, dirs[0].path(), &[]);
    wait_answers(&certs, &nodes[0].addr).await;
    let started = Instant::now();
    let removed = ask_ecs(
        &admin,
        &ecs.addr,
        AdminRequest::RemoveNode { name: "n1".into() },
    )
    .await;
    let remove_took = started.elapsed();
    println!(
        "RemoveNode of the node right after a second restart: {remove_took:?}, {}",
        match &removed {
            AdminReply::Changed { .. } => "changed".to_string(),
            other => format!("{other:?}"),
        }
    );

    assert_eq!(got.unwrap(), Some(victim_key.clone().into_bytes()));
    assert!(
        client_wait < Duration::from_secs(1),
        "the old client waited {client_wait:?}"
    );
    assert!(
        n1.status.is_some() && n1.error.is_none(),
        "the ECS found n1 unreachable: {:?}",
        n1.error
    );
    assert!(
        matches!(removed, AdminReply::Changed { .. }),
        "remove n1: {removed:?}"
    );
    assert!(
        remove_took < Duration::from_secs(5),
        "RemoveNode took {remove_took:?}"
    );

    // Every key is still there (now at n2 and n3), read by the old client.
    for key in &keys {
        assert_eq!(
            client.get(key.as_bytes()).await.unwrap(),
            Some(key.clone().into_bytes()),
            "{key}"
        );
    }
    client.disconnect().await;
    load.stop_and_check(&certs, vec![nodes[1].addr.clone(), n3.addr.clone()])
        .await;
    ecs.stop().await;
}
