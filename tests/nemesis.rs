//! A Jepsen-style nemesis end to end (issue #21): a three-member ECS group, five node hosts
//! at R = 3 and a client host (network namespaces, real processes, real QUIC + mTLS), clients
//! recording every operation while a nemesis injects one fault after another, each healed
//! before the next:
//! - a node host cut off from the network (its cable pulled);
//! - a node SIGKILLed, started again later;
//! - a node frozen (SIGSTOP) for 0.5–4 s, then resumed;
//! - the client host cut off from one node only;
//! - the ECS leader SIGKILLed and started again;
//! - the ECS leader cut off from the other two members only.
//!
//! A fault lasts 0.5–4 s (past or short of `failover-after`, 2 s). Between faults the nemesis
//! puts the cluster back together as an operator would: a node that was failed over or
//! removed is added again (`add-node` wipes it and copies it what it must hold). At the end
//! every fault is healed, every node is back in the ring with every range at its full chain,
//! and the history of all clients, with a final read of every key, must be linearizable per
//! key with no acknowledged write lost (the suite's checker).
//!
//! The fault sequence comes from a seed (printed; `RINGKV_NEMESIS_SEED=S` replays the same
//! sequence, the timing of real processes aside). CI runs 60 s; `RINGKV_NEMESIS_SECS=N` runs
//! longer. Needs root (CI has it), like `tests/multihost.rs`.

mod common;
mod netns;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::history::{check_with_final, record_delete, record_get, record_put, History};
use kvstore::KvStore;
use netns::{HostCluster, Stopwatch};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use ringkv_wire::{AdminReply, AdminRequest, RingMetadata};

/// One fault of the nemesis.
#[derive(Debug, Clone)]
enum Fault {
    /// The node's host cut off from every other host.
    CutNode(String),
    /// The node SIGKILLed, started again when the fault ends.
    KillNode(String),
    /// The node SIGSTOPped, SIGCONTed when the fault ends.
    PauseNode(String),
    /// The client host cut off from the node's host only.
    CutClientFrom(String),
    /// The ECS leader SIGKILLed, started again when the fault ends.
    KillEcsLeader,
    /// The ECS leader's host cut off from the other members' hosts only.
    IsolateEcsLeader,
}

/// The nemesis's choice of the next fault and how long it lasts.
fn next_fault(rng: &mut SmallRng, nodes: &[String]) -> (Fault, Duration) {
    let node = nodes[rng.random_range(0..nodes.len())].clone();
    let fault = match rng.random_range(0..10) {
        0..=1 => Fault::CutNode(node),
        2..=3 => Fault::KillNode(node),
        4..=5 => Fault::PauseNode(node),
        6 => Fault::CutClientFrom(node),
        7..=8 => Fault::KillEcsLeader,
        _ => Fault::IsolateEcsLeader,
    };
    (fault, Duration::from_millis(rng.random_range(500..4000)))
}

/// The index (in `cluster.ecs`) of the member that leads, as a running member sees it.
fn ecs_leader(cluster: &HostCluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for member in &cluster.ecs {
            if let Ok(report) = cluster.group_report(&cluster.client, &member.addr) {
                if let Some(id) = report.leader {
                    return cluster
                        .ecs
                        .iter()
                        .position(|m| m.id == id)
                        .expect("a known member");
                }
            }
        }
        assert!(Instant::now() < deadline, "no ECS leader within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asks the group (through redirects, waiting out elections).
fn ask(cluster: &HostCluster, request: AdminRequest) -> Result<AdminReply, String> {
    let members: Vec<String> = cluster.ecs.iter().map(|m| m.addr.clone()).collect();
    cluster.ecs_ask(&cluster.client, &members, request, Duration::from_secs(60))
}

fn ring(cluster: &HostCluster) -> Option<RingMetadata> {
    match ask(cluster, AdminRequest::Ring) {
        Ok(AdminReply::Ring(ring)) => Some(ring),
        _ => None,
    }
}

/// Puts the cluster back together after a fault, as an operator would: waits until the ring
/// holds every node, live, adding again those that were failed over or removed (a failed
/// one is first removed by the ECS's own failover). Returns how many it added.
fn recover(cluster: &HostCluster, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut added = 0;
    loop {
        if let Some(ring) = ring(cluster) {
            let missing: Vec<&netns::HostNode> = cluster
                .nodes
                .iter()
                .filter(|n| ring.node(&n.name).is_none())
                .collect();
            if missing.is_empty() && ring.failed.is_empty() {
                return added;
            }
            for node in missing {
                let reply = ask(
                    cluster,
                    AdminRequest::AddNode {
                        name: node.name.clone(),
                        addr: node.addr.clone(),
                        zone: None,
                    },
                );
                match reply {
                    Ok(AdminReply::Changed { .. }) => added += 1,
                    other => println!("  add {} again: {other:?}", node.name),
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cluster was not whole again within {within:?}: {:?}",
            ring(cluster)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_nemesis_of_partitions_kills_and_pauses_loses_nothing_and_stays_linearizable() {
    let seed: u64 = std::env::var("RINGKV_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let secs: u64 = std::env::var("RINGKV_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let _watch = Stopwatch::start_with_limit(
        "a_nemesis_of_partitions_kills_and_pauses_loses_nothing_and_stays_linearizable",
        Stopwatch::LIMIT + Duration::from_secs(secs),
    );
    println!("nemesis seed {seed} for {secs} s (replay: RINGKV_NEMESIS_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut cluster = HostCluster::start_group(
        5,
        "replication-factor = 3\nfailover-after = \"2s\"\nprobe-interval = \"200ms\"\n",
    );
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();

    // Clients on the client host: 6 tasks over 24 keys, puts, gets and deletes.
    let keys: Vec<Vec<u8>> = (0..24).map(|i| format!("nk{i}").into_bytes()).collect();
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = cluster.client_config();
    config.retry.deadline = Duration::from_secs(5);
    let load = {
        let (history, stop, keys) = (history.clone(), stop.clone(), keys.clone());
        cluster.client.spawn(move || async move {
            let store = Arc::new(KvStore::connect(config).await.expect("connect"));
            let tasks: Vec<_> = (0..6)
                .map(|c| {
                    let (history, stop, keys, store) =
                        (history.clone(), stop.clone(), keys.clone(), store.clone());
                    tokio::spawn(async move {
                        let mut i = 0usize;
                        while !stop.load(Ordering::Relaxed) {
                            let key = &keys[(i * 7 + c * 5) % keys.len()];
                            match i % 10 {
                                0..=3 => {
                                    let _ = record_get(&history, c, &store, key).await;
                                }
                                4 => {
                                    let _ = record_delete(&history, c, &store, key).await;
                                }
                                _ => {
                                    let value = format!("c{c}-{i}");
                                    let _ = record_put(&history, c, &store, key, value.as_bytes())
                                        .await;
                                }
                            }
                            i += 1;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            store.disconnect().await;
        })
    };

    let started = Instant::now();
    let mut faults = 0;
    let mut readded = 0;
    std::thread::sleep(Duration::from_secs(1));
    while started.elapsed() < Duration::from_secs(secs) {
        let (fault, lasts) = next_fault(&mut rng, &names);
        let at = started.elapsed();
        match &fault {
            Fault::CutNode(name) => {
                let host = cluster.node(name).host.clone();
                cluster.lab.cut(&host);
                std::thread::sleep(lasts);
                cluster.lab.heal(&host);
            }
            Fault::KillNode(name) => {
                cluster.kill_node(name);
                std::thread::sleep(lasts);
                cluster.restart_node(name);
            }
            Fault::PauseNode(name) => {
                let node = cluster.node(name);
                let proc = node.proc.as_ref().expect("the node runs");
                proc.pause();
                std::thread::sleep(lasts);
                proc.resume();
            }
            Fault::CutClientFrom(name) => {
                let host = cluster.node(name).host.clone();
                cluster.lab.cut_between(&cluster.client, &host);
                std::thread::sleep(lasts);
                cluster.lab.heal_between(&cluster.client, &host);
            }
            Fault::KillEcsLeader => {
                let leader = ecs_leader(&cluster);
                cluster.restart_ecs_after(leader, lasts);
            }
            Fault::IsolateEcsLeader => {
                let leader = ecs_leader(&cluster);
                let host = cluster.ecs[leader].host.clone();
                let others: Vec<netns::Host> = cluster
                    .ecs
                    .iter()
                    .filter(|m| m.host.name != host.name)
                    .map(|m| m.host.clone())
                    .collect();
                for other in &others {
                    cluster.lab.cut_between(&host, other);
                }
                std::thread::sleep(lasts);
                for other in &others {
                    cluster.lab.heal_between(&host, other);
                }
            }
        }
        faults += 1;
        // Healed; give the failure detector time to act on what it saw, then make whole.
        std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
        let again = recover(&cluster, Duration::from_secs(90));
        readded += again;
        println!(
            "{at:>6.1?}: {fault:?} for {lasts:?}{}",
            if again > 0 {
                format!(", {again} node(s) added again")
            } else {
                String::new()
            }
        );
    }
    // Quiet for a moment with the cluster whole, then stop the clients.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("the clients");

    // Every range at its full chain on the group's ring.
    let out = cluster.ecs_cmd(&cluster.client, &["status"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        !out.stdout.contains("missing"),
        "a range is short of copies:\n{}",
        out.stdout
    );
    let entries = history.entries();
    let ok = entries.iter().filter(|e| e.is_ok()).count();
    println!(
        "{faults} faults in {:.1?}, {readded} re-adds; {} operations, {ok} acknowledged",
        started.elapsed(),
        entries.len()
    );
    assert!(ok > 0, "no operation succeeded");
    let finals = cluster.final_reads(&keys);
    let report = check_with_final(&history, &finals).unwrap_or_else(|v| panic!("seed {seed}: {v}"));
    println!("history: {report}");
}
