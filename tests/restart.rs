//! A node killed with SIGKILL and restarted on the same address and data directory: peers
//! holding connections to the dead process learn at their first packet that those
//! connections are dead (the restarted node answers them with a QUIC stateless reset, its
//! reset key being derived from `<data-dir>/reset.key`), and `Transport::call` sends the
//! request again on a new connection. Nobody waits for a request timeout.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{free_port, Certs, NodeProcess, TestEcs};
use ringkv_transport::Transport;
use ringkv_wire::{AdminReply, AdminRequest, Limits, Request, RequestBody};

/// Waits (up to 20 s) until the node at `addr` answers a `Status` on a new connection of a
/// new transport, and returns when it did.
async fn wait_answers(certs: &Certs, addr: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = Transport::bind_client(
            &certs.identity("admin"),
            Limits::default(),
            Duration::from_millis(200),
            Duration::from_millis(500),
        )
        .expect("admin transport");
        let answered = fresh
            .request(addr, &Request::new(0, RequestBody::Status))
            .await
            .is_ok();
        fresh.close().await;
        if answered {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{addr} never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn ask(admin: &Transport, ecs: &str, request: AdminRequest) -> AdminReply {
    admin
        .call(ecs, &request, Duration::from_secs(60))
        .await
        .expect("ECS answers")
}

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
        let reply = ask(
            &admin,
            &ecs.addr,
            AdminRequest::AddNode {
                name: name.into(),
                addr: node.addr.clone(),
            },
        )
        .await;
        assert!(
            matches!(reply, AdminReply::Changed { .. }),
            "add {name}: {reply:?}"
        );
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
    let reply = ask(&admin, &ecs.addr, AdminRequest::Status).await;
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

    // Kill and restart it once more, with the ECS connected to it (another status makes
    // sure of that even if the first one failed): the ECS's connection and n2's are to the
    // dead process again. Removing the restarted node goes through at once.
    ask(&admin, &ecs.addr, AdminRequest::Status).await;
    nodes[0].kill();
    nodes[0] = NodeProcess::spawn_with(&certs, "n1", addr, dirs[0].path(), &[]);
    wait_answers(&certs, &nodes[0].addr).await;
    let started = Instant::now();
    let removed = ask(
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

    // Every key is still there (now all at n2), read by the old client.
    for key in &keys {
        assert_eq!(
            client.get(key.as_bytes()).await.unwrap(),
            Some(key.clone().into_bytes()),
            "{key}"
        );
    }
    client.disconnect().await;
    ecs.stop().await;
}
