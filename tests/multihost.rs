//! A cluster across separate network hosts (Linux network namespaces on a private bridge,
//! see `netns`): the ECS, every node and the client each on a host of its own, talking over
//! real QUIC + mTLS between real addresses. Needs root (CI has it); without it these tests
//! fail with the reason.
//!
//! Run alone: `cargo test --test multihost` (each test prints its duration).

mod common;
mod netns;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore::{KvError, KvStore};
use netns::{HostCluster, Stopwatch, ECS_NODE_TIMEOUT_S};
use ringkv_certs::Role;
use ringkv_wire::{AdminReply, AdminRequest, GroupReport, NodeEntry, RingMetadata};

fn value_of(key: &str) -> Vec<u8> {
    format!("v-{key}").into_bytes()
}

/// Puts every key (64 in flight at a time) with [`value_of`]; the first error, if any.
async fn try_put_all(store: &KvStore, keys: &[String]) -> Result<(), KvError> {
    for chunk in keys.chunks(64) {
        let puts = chunk.iter().map(|k| async move {
            let value = value_of(k);
            store.put(k.as_bytes(), &value).await
        });
        for result in futures::future::join_all(puts).await {
            result?;
        }
    }
    Ok(())
}

/// Reads every key, asserting it holds [`value_of`] it; the first error, if any.
async fn try_read_all(store: &KvStore, keys: &[String]) -> Result<(), KvError> {
    for chunk in keys.chunks(64) {
        let gets = chunk.iter().map(|k| store.get(k.as_bytes()));
        for (key, result) in chunk.iter().zip(futures::future::join_all(gets).await) {
            assert_eq!(result?, Some(value_of(key)), "{key}");
        }
    }
    Ok(())
}

async fn put_all(store: &KvStore, keys: &[String]) {
    if let Err(e) = try_put_all(store, keys).await {
        panic!("put: {e}");
    }
}

async fn assert_all_readable(store: &KvStore, keys: &[String]) {
    if let Err(e) = try_read_all(store, keys).await {
        panic!("get: {e}");
    }
}

/// Raises its flag when dropped, also while a failed assertion unwinds.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// The ring version the ECS reports (`ringkv-ecs ring`, from `from`).
fn ecs_version(cluster: &HostCluster, from: &netns::Host) -> u64 {
    let out = cluster.ecs_cmd(from, &["ring"]).ok();
    out.stdout
        .strip_prefix("ring version ")
        .and_then(|rest| rest.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `ring` output: {}", out.stdout))
}

#[test]
fn put_get_across_hosts_and_peers_verify_host_names() {
    let _watch = Stopwatch::start("put_get_across_hosts_and_peers_verify_host_names");
    let mut cluster = HostCluster::start(3);

    // The library client on its own host: every key lands on the node that owns it.
    let all = keys("key", 300);
    let config = cluster.client_config();
    let metadata = cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        put_all(&store, &all).await;
        assert_all_readable(&store, &all).await;
        let metadata = (*store.metadata()).clone();
        store.disconnect().await;
        metadata
    });
    assert_eq!(metadata.version, 3);
    let mut stored = 0;
    for node in &cluster.nodes {
        let entry = metadata.node(&node.name).expect("in the ring");
        assert_eq!(entry.addr, node.addr, "the ring holds the host's address");
        let want = all
            .iter()
            .filter(|k| metadata.responsible_for_key(k.as_bytes()).unwrap().name == node.name)
            .count() as u64;
        let status = cluster.node_status(&node.addr).expect("status");
        assert_eq!(status.keys, want, "keys on {}", node.name);
        assert!(want > 0, "{} got no key of 300", node.name);
        stored += status.keys;
    }
    assert_eq!(stored, all.len() as u64);

    // The command-line client, on the client host too.
    cluster.ringkv(&["put", "cli-key", "hello"]).ok();
    let out = cluster.ringkv(&["get", "cli-key"]).ok();
    assert_eq!(out.stdout.trim(), "hello");
    let out = cluster.ringkv(&["ring"]).ok();
    for node in &cluster.nodes {
        assert!(out.stdout.contains(&node.addr), "{}", out.stdout);
    }

    // An impostor: a node whose certificate was issued for another address. Its peers
    // dial its address and verify the certificate against it, so none will talk to it.
    let impostor = cluster.add_host("impostor");
    cluster
        .lab
        .issue(&impostor, Role::Node, "n4", &["10.77.0.99".to_string()]);
    cluster.spawn_node(&impostor, "n4");
    let addr = cluster.node("n4").addr.clone();
    // The client host's dial fails on the certificate (which also shows the node is up).
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match cluster.node_status(&addr) {
            Err(e) if e.to_string().contains("certificate") => break e.to_string(),
            Ok(status) => panic!("the impostor was accepted: {status:?}"),
            Err(e) => assert!(Instant::now() < deadline, "impostor never came up: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(refused.contains("not valid for name"), "{refused}");
    // The ECS refuses to add it: the join aborts at its first step, nothing changes.
    let out = cluster.ecs_cmd(
        &cluster.client,
        &["add-node", "--name", "n4", "--addr", &addr],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("aborted"), "{}", out.stderr);
    assert!(out.stderr.contains("not valid for name"), "{}", out.stderr);
    assert_eq!(ecs_version(&cluster, &cluster.client), 3);
    // A client given it as its only seed refuses it too.
    let out = cluster.lab.exec(
        &cluster.client,
        &common::bin("ringkv"),
        &[
            "--seed".into(),
            addr.clone(),
            "--certs".into(),
            cluster.client.certs_dir().display().to_string(),
            "get".into(),
            "cli-key".into(),
        ],
        netns::TOOL_LIMIT,
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("not valid for name"), "{}", out.stderr);

    // The same host with a certificate for its own address joins (the control).
    cluster.kill_node("n4");
    cluster.start_node(&impostor, "n5");
    let out = cluster.add_node("n5");
    assert!(out.stdout.contains("version 4"), "{}", out.stdout);
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        assert_eq!(store.metadata().version, 4);
        assert_all_readable(&store, &all).await;
        store.disconnect().await;
    });
    assert!(cluster.node_status(&cluster.node("n5").addr).unwrap().keys > 0);
}

#[test]
fn join_and_leave_on_a_fourth_host_lose_no_acknowledged_write() {
    let _watch = Stopwatch::start("join_and_leave_on_a_fourth_host_lose_no_acknowledged_write");
    let mut cluster = HostCluster::start(3);
    let spare = cluster.add_host("n4");
    cluster.start_node(&spare, "n4");
    // Some data, so that the moves take a little while.
    let preload = keys("pre", 3000);
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        put_all(&store, &preload).await;
        store.disconnect().await;
    });

    // Writers on the client host, each with its own connections, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let config = cluster.client_config();
    let writers = cluster.client.spawn({
        let stop = stop.clone();
        move || async move {
            let writer = |w: u32| {
                let config = config.clone();
                let stop = stop.clone();
                async move {
                    let store = KvStore::connect(config).await.expect("connect");
                    let acked = common::write_until_stopped(&store, w, &stop).await;
                    let stats = store.stats();
                    store.disconnect().await;
                    (acked, stats)
                }
            };
            futures::future::join_all((0..6).map(writer)).await
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let joined = cluster.add_node("n4");
    assert!(joined.stdout.contains("version 4"), "{}", joined.stdout);
    std::thread::sleep(Duration::from_millis(300));
    let left = cluster
        .ecs_cmd(&cluster.client, &["remove-node", "--name", "n4"])
        .ok();
    assert!(left.stdout.contains("version 5"), "{}", left.stdout);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = writers.join().expect("writers");
    println!("join: {}leave: {}", joined.stdout, left.stdout);

    let config = cluster.client_config();
    let (writes, locked, redirected) = cluster.client.run(|| async {
        let reader = KvStore::connect(config).await.expect("connect");
        assert_eq!(reader.metadata().version, 5);
        let (mut writes, mut locked, mut redirected) = (0usize, 0u64, 0u64);
        for (acked, stats) in &results {
            writes += acked.len();
            locked += stats.write_locked;
            redirected += stats.not_responsible;
            for (key, i) in acked {
                let got = reader.get(key.as_bytes()).await.expect("get");
                assert_eq!(
                    got,
                    Some(i.to_le_bytes().to_vec()),
                    "acknowledged {key} lost or stale"
                );
            }
        }
        assert_all_readable(&reader, &preload).await;
        reader.disconnect().await;
        (writes, locked, redirected)
    });
    println!(
        "{writes} distinct keys acknowledged by 6 writers on the client host while n4 joined \
         and left on its own host; {locked} writes met WRITE_LOCKED and {redirected} \
         NOT_RESPONSIBLE, all retried"
    );
    assert!(writes > 100, "the writers barely ran: {writes}");
    assert!(
        locked + redirected > 0,
        "no write met the moves; the test proved nothing"
    );
    // n4 handed everything back.
    assert_eq!(
        cluster.node_status(&cluster.node("n4").addr).unwrap().keys,
        0
    );
}

#[test]
fn a_cut_off_node_host_fails_its_keys_quickly_and_catches_up_when_healed() {
    let _watch =
        Stopwatch::start("a_cut_off_node_host_fails_its_keys_quickly_and_catches_up_when_healed");
    // Eleven nodes: with balanced placement every node takes part in every change of a
    // smaller ring, and the test needs a change the cut-off node has no part in.
    let mut cluster = HostCluster::start(11);
    let all = keys("key", 300);
    let config = cluster.client_config();
    let metadata: RingMetadata = cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        put_all(&store, &all).await;
        let metadata = (*store.metadata()).clone();
        store.disconnect().await;
        metadata
    });
    // The victim is cut off; meanwhile n12 joins, taking its share from the other nodes, so
    // the ring moves on without the victim: it is a node the ECS's own planner leaves out of
    // that join (one with the smallest share).
    let planned = ringkv_ecs::plan::join(&metadata, NodeEntry::new("n12", "10.0.0.1:1")).unwrap();
    let victim = metadata
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| !planned.involves(n))
        .expect("a node the join of n12 leaves out");
    let victim_addr = cluster.node(&victim).addr.clone();
    let victim_host = cluster.node(&victim).host.clone();
    let target = metadata.version + 1;
    let owner = |k: &String| {
        metadata
            .responsible_for_key(k.as_bytes())
            .unwrap()
            .name
            .clone()
    };
    let victim_keys: Vec<String> = all.iter().filter(|k| owner(k) == victim).cloned().collect();
    let other_keys: Vec<String> = all.iter().filter(|k| owner(k) != victim).cloned().collect();
    assert!(!victim_keys.is_empty() && !other_keys.is_empty());

    // A client connected before the cut, on its own thread in the client host: the test
    // sends it commands and gets a report for each.
    let (to_client, commands) = std::sync::mpsc::channel::<&'static str>();
    let (to_test, reports) = std::sync::mpsc::channel::<Report>();
    let mut config = cluster.client_config();
    config.retry.deadline = Duration::from_secs(3);
    let client = cluster.client.spawn({
        let (victim_keys, other_keys) = (victim_keys.clone(), other_keys.clone());
        move || async move {
            let store = KvStore::connect(config).await.expect("connect");
            while let Ok(command) = commands.recv() {
                let started = Instant::now();
                let result = match command {
                    // One read of the victim's: must fail with a clear error.
                    "victim" => match store.get(victim_keys[0].as_bytes()).await {
                        Err(e) => Err(e),
                        Ok(v) => Ok(format!("read {v:?}")),
                    },
                    // Everything but the victim's keys.
                    "others" => {
                        async {
                            try_put_all(&store, &other_keys).await?;
                            try_read_all(&store, &other_keys).await?;
                            Ok("ok".to_string())
                        }
                        .await
                    }
                    // Everything.
                    _ => {
                        async {
                            try_put_all(&store, &victim_keys).await?;
                            try_read_all(&store, &victim_keys).await?;
                            try_read_all(&store, &other_keys).await?;
                            Ok("ok".to_string())
                        }
                        .await
                    }
                };
                let took = started.elapsed();
                let report = Report { result, took };
                to_test.send(report).expect("report");
            }
            store.disconnect().await;
        }
    });
    let ask = |command: &'static str| {
        to_client.send(command).expect("command");
        let report = reports
            .recv_timeout(Duration::from_secs(60))
            .expect("the client hangs");
        println!("library client, {command}: {report:?}");
        report
    };
    // Asks until the command succeeds, for at most 40 s after `since`.
    let ask_until_ok = |command: &'static str, since: Instant| loop {
        let report = ask(command);
        if report.result.is_ok() {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(40),
            "the long-lived client never got through: {report:?}"
        );
    };

    cluster.lab.cut(&victim_host);
    // The victim's keys: a clear error, within the retry deadline (3 s) plus the request
    // (2 s) and metadata refresh (1 s connect) that may be in flight when it expires.
    let report = ask("victim");
    match &report.result {
        Err(e @ KvError::Timeout { .. }) => {
            assert!(e.to_string().contains(&victim_addr), "{e}")
        }
        other => panic!("expected a timeout naming {}: {other:?}", victim_addr),
    }
    assert!(report.took < Duration::from_secs(7), "{report:?}");
    // Everyone else's keys: served as usual.
    let report = ask("others");
    assert!(report.result.is_ok(), "{report:?}");

    // The command-line client (a fresh process): a clear error bounded by --timeout.
    let out = cluster.ringkv(&["--timeout", "2", "get", &victim_keys[0]]);
    println!(
        "ringkv --timeout 2 get <victim's key>: {:?} in {:?}: {}",
        out.code,
        out.elapsed,
        out.stderr.trim()
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("gave up after"), "{}", out.stderr);
    assert!(out.stderr.contains(&victim_addr), "{}", out.stderr);
    assert!(out.elapsed < Duration::from_secs(12), "{out:?}");
    let out = cluster.ringkv(&["--timeout", "2", "get", &other_keys[0]]);
    println!(
        "ringkv --timeout 2 get <other key>: {:?} in {:?}",
        out.code, out.elapsed
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim().as_bytes(), value_of(&other_keys[0]));

    // The ring changes while the victim cannot hear about it.
    let host = cluster.add_host("h12");
    cluster.start_node(&host, "n12");
    let out = cluster.add_node("n12");
    println!(
        "add-node n12 while {} is cut off: {:?}: {}",
        victim,
        out.elapsed,
        out.stdout.trim()
    );
    assert!(
        out.stdout.contains(&format!("version {target}")),
        "{}",
        out.stdout
    );
    // Its peers' heartbeats stop advancing: `status` shows it suspected (then dead) by
    // gossip, not just unreachable from the ECS. Suspicion takes the suspect timeout (2 s)
    // after the last heartbeat got through; polled with a wide margin for a loaded machine.
    let cut_for = Instant::now();
    let line = loop {
        let out = cluster.ecs_cmd(&cluster.client, &["status"]).ok();
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&victim))
            .unwrap_or_else(|| panic!("{} missing from status:\n{}", victim, out.stdout))
            .to_string();
        if line.contains("suspected") || line.contains("dead") {
            println!("{}", out.stdout);
            break line;
        }
        assert!(
            cut_for.elapsed() < Duration::from_secs(30),
            "gossip never suspected the cut-off node: {line}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(line.contains("unreachable"), "{line}");
    let report = ask("others");
    assert!(report.result.is_ok(), "after the leave: {report:?}");

    // Healed: it serves its keys again and catches up to the ring's current version.
    cluster.lab.heal(&victim_host);
    let healed = Instant::now();
    // A fresh client reaches it at once.
    let out = cluster.ringkv(&["--timeout", "5", "get", &victim_keys[0]]);
    println!(
        "ringkv get <victim's key> right after the heal: {:?} in {:?}",
        out.code, out.elapsed
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim().as_bytes(), value_of(&victim_keys[0]));
    // The long-lived client's connection to it lived through the cut, with QUIC's probe
    // timeout backed off exponentially meanwhile; it recovers once a probe gets through,
    // at the latest when the connection's 30 s idle timeout replaces it.
    ask_until_ok("all", healed);
    println!(
        "the long-lived client reads and writes all keys again {:?} after the heal",
        healed.elapsed()
    );
    let caught_up = |cluster: &HostCluster| {
        cluster
            .node_status(&victim_addr)
            .map(|s| s.metadata_version)
            .unwrap_or(0)
            == target
    };
    // Gossip brings the new version to it by itself (nobody else sends it): its peers push the
    // newer version at their next exchange with it, or it pulls it at its own.
    let deadline = healed + Duration::from_secs(30);
    while !caught_up(&cluster) {
        assert!(
            Instant::now() < deadline,
            "{victim} did not catch up with version {target} by gossip within 30 s of the heal"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "{} caught up with version {target} by gossip {:?} after the heal",
        victim,
        healed.elapsed()
    );
    let status = cluster.node_status(&victim_addr).expect("status");
    assert_eq!(status.metadata_version, target, "{status:?}");
    assert!(status.running, "{status:?}");

    // Paused (SIGSTOP) instead of cut: the connection stays up but nothing answers; the
    // client gives up within its bounds, and the node serves again once resumed.
    let proc = cluster.node(&victim).proc.as_ref().expect("running");
    proc.pause();
    let report = ask("victim");
    assert!(
        matches!(report.result, Err(KvError::Timeout { .. })),
        "while paused: {report:?}"
    );
    assert!(report.took < Duration::from_secs(7), "{report:?}");
    proc.resume();
    let resumed = Instant::now();
    ask_until_ok("all", resumed);
    println!(
        "all keys served again {:?} after the resume",
        resumed.elapsed()
    );
    drop(to_client);
    client.join().expect("client thread");

    // Killed (SIGKILL: no flush, no goodbye) and restarted from its config file on its
    // host: it serves every key it acknowledged.
    cluster.kill_node(&victim);
    cluster.restart_node(&victim);
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        assert_all_readable(&store, &victim_keys).await;
        assert_all_readable(&store, &other_keys).await;
        store.disconnect().await;
    });
}

/// What the client thread of the cut-off test answers to a command.
#[derive(Debug)]
struct Report {
    result: Result<String, KvError>,
    took: Duration,
}

#[test]
fn with_the_ecs_host_cut_off_data_is_served_and_membership_changes_are_refused() {
    let _watch = Stopwatch::start(
        "with_the_ecs_host_cut_off_data_is_served_and_membership_changes_are_refused",
    );
    let mut cluster = HostCluster::start(3);
    let spare = cluster.add_host("n4");
    cluster.start_node(&spare, "n4");
    let before = keys("before", 200);
    let during = keys("during", 200);
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        put_all(&store, &before).await;
        store.disconnect().await;
    });

    cluster.lab.cut(&cluster.ecs_host);
    // The data path does not involve the ECS: a fresh client connects, reads and writes.
    let started = Instant::now();
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config)
            .await
            .expect("connect without the ECS");
        assert_all_readable(&store, &before).await;
        put_all(&store, &during).await;
        assert_all_readable(&store, &during).await;
        store.disconnect().await;
    });
    println!("400 requests with the ECS cut off: {:?}", started.elapsed());
    let out = cluster.ringkv(&["get", &before[0]]).ok();
    assert_eq!(out.stdout.trim().as_bytes(), value_of(&before[0]));

    // The operator elsewhere cannot reach the ECS: a clear, bounded error.
    let addr = cluster.node("n4").addr.clone();
    let add = ["add-node", "--name", "n4", "--addr", addr.as_str()];
    let out = cluster.ecs_cmd(&cluster.client, &add);
    println!(
        "add-node from the client host: {:?} in {:?}: {}",
        out.code,
        out.elapsed,
        out.stderr.trim()
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("asking the ECS at"), "{}", out.stderr);
    assert!(out.stderr.contains(&cluster.ecs_addr), "{}", out.stderr);
    assert!(out.elapsed < Duration::from_secs(15), "{out:?}");
    // The operator on the ECS's own host reaches it, but the ECS cannot reach the nodes:
    // the change aborts at its first step, within the ECS's node timeout per step.
    let out = cluster.ecs_cmd(&cluster.ecs_host, &add);
    println!(
        "add-node on the ECS host: {:?} in {:?}: {}",
        out.code,
        out.elapsed,
        out.stderr.trim()
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("aborted"), "{}", out.stderr);
    assert!(out.stderr.contains("n4"), "{}", out.stderr);
    assert!(
        out.elapsed < Duration::from_secs(4 * ECS_NODE_TIMEOUT_S + 5),
        "{out:?}"
    );
    assert_eq!(ecs_version(&cluster, &cluster.ecs_host), 3);

    // The ECS is back: the same change goes through, and nothing was lost.
    cluster.lab.heal(&cluster.ecs_host);
    let out = cluster.add_node("n4");
    assert!(out.stdout.contains("version 4"), "{}", out.stdout);
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        assert_eq!(store.metadata().version, 4);
        assert_all_readable(&store, &before).await;
        assert_all_readable(&store, &during).await;
        store.disconnect().await;
    });
    assert!(cluster.node_status(&addr).unwrap().keys > 0);
}

/// Replication, a node cut off by a partition (README "Replication and failover"): 4 node
/// hosts, R = 3. The victim is the tail (the reader) of some keys. A client *inside the
/// victim's host* keeps reading and writing through the partition (it can reach the victim
/// only), a client on the client host goes on with the rest of the cluster. The victim must
/// stop serving (its lease runs out) before the ECS fails it over and another node serves
/// its keys: no stale read in the history of both clients together, nothing acknowledged
/// lost. Healed, the victim serves nothing until it is added again.
#[test]
fn a_partitioned_node_stops_serving_before_it_is_replaced_and_stays_out_when_healed() {
    use common::history::{check_with_final, record_get, record_put, History, OpResult};
    use ringkv_wire::{ReplyBody, Request, RequestBody};

    let _watch = Stopwatch::start(
        "a_partitioned_node_stops_serving_before_it_is_replaced_and_stays_out_when_healed",
    );
    let cluster = HostCluster::start_with(
        4,
        "replication-factor = 3\nfailover-after = \"2s\"\nprobe-interval = \"200ms\"\n",
    );
    let keys: Vec<Vec<u8>> = (0..16).map(|i| format!("p{i}").into_bytes()).collect();
    let metadata: RingMetadata = {
        let config = cluster.client_config();
        cluster.client.run(|| async {
            let store = KvStore::connect(config).await.expect("connect");
            let md = (*store.metadata()).clone();
            store.disconnect().await;
            md
        })
    };
    assert_eq!(metadata.replication, 3);
    let victim = metadata
        .tail(&ringkv_wire::key_position(&keys[0]))
        .unwrap()
        .name
        .clone();
    let victim_host = cluster.node(&victim).host.clone();
    let victim_addr = cluster.node(&victim).addr.clone();
    let tail_keys: Vec<Vec<u8>> = keys
        .iter()
        .filter(|k| metadata.chain_for_key(k).last().unwrap().name == victim)
        .cloned()
        .collect();
    println!(
        "victim {victim}: tail of {} of {} keys",
        tail_keys.len(),
        keys.len()
    );
    cluster.lab.install(&victim_host, "client");

    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    // Client 0..4: inside the victim's host. Client 4..8: on the client host.
    // The inside clients only read the victim's keys (so they keep asking the victim
    // itself); the outside clients read and write everything.
    let workload = |host: &netns::Host,
                    first: usize,
                    config: kvstore::ClientConfig,
                    keys: Vec<Vec<u8>>,
                    writes: bool| {
        let (history, stop) = (history.clone(), stop.clone());
        host.spawn(move || async move {
            let store = Arc::new(KvStore::connect(config).await.expect("connect"));
            let tasks: Vec<_> = (first..first + 4)
                .map(|c| {
                    let (history, stop, keys, store) =
                        (history.clone(), stop.clone(), keys.clone(), store.clone());
                    tokio::spawn(async move {
                        let mut i = 0usize;
                        while !stop.load(Ordering::Relaxed) {
                            let key = &keys[(i * 5 + c) % keys.len()];
                            if i.is_multiple_of(2) || !writes {
                                let _ = record_get(&history, c, &store, key).await;
                            } else {
                                let value = format!("c{c}-{i}");
                                let _ =
                                    record_put(&history, c, &store, key, value.as_bytes()).await;
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
    let mut inside = cluster.client_config();
    inside.identity = ringkv_certs::Identity::from_dir(&victim_host.certs_dir(), "client")
        .expect("client identity in the victim's host");
    inside.retry.deadline = Duration::from_secs(2);
    let outside = cluster.client_config();
    let inside_load = workload(&victim_host, 0, inside, tail_keys.clone(), false);
    let outside_load = workload(&cluster.client, 4, outside, keys.clone(), true);

    std::thread::sleep(Duration::from_millis(1500));
    cluster.lab.cut(&victim_host);
    let cut = Instant::now();
    // The ECS fails the victim over (failover-after 2 s) and rebuilds its copies.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster.ecs_cmd(&cluster.client, &["ring"]);
        if !out.stdout.contains(&victim_addr) && out.code == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim was never failed over:\n{}",
            out.stdout
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{victim} failed over {:?} after the cut", cut.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    let healed = Instant::now();
    cluster.lab.heal(&victim_host);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    inside_load.join().expect("inside client");
    outside_load.join().expect("outside client");

    // Healed, the victim serves none of its old keys to anyone: asked directly, it
    // redirects or refuses.
    let identity = cluster.admin_identity();
    let answers: Vec<ReplyBody> = cluster.client.run(|| async move {
        let admin = ringkv_transport::Transport::bind_client(
            &identity,
            ringkv_wire::Limits::default(),
            Duration::from_secs(1),
            Duration::from_secs(2),
        )
        .unwrap();
        let mut answers = Vec::new();
        for key in &tail_keys {
            let get = Request::new(0, RequestBody::Get { key: key.clone() });
            answers.push(
                admin
                    .request(&victim_addr, &get)
                    .await
                    .expect("the victim answers")
                    .body,
            );
        }
        admin.close().await;
        answers
    });
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, ReplyBody::NotResponsible { .. } | ReplyBody::Stopped)),
        "the healed victim serves: {answers:?}"
    );

    // Stopped serving before anyone else took over: until the heal the inside client
    // reaches the victim only, so its last success before the heal is the victim's last
    // answer; it must precede the outside client's first successful write of a key the
    // victim was the tail of. And the whole history is linearizable with nothing lost.
    let entries = history.entries();
    let last_inside_ok = entries
        .iter()
        .filter(|e| e.client < 4 && e.is_ok())
        .filter_map(|e| e.end)
        .filter(|end| *end < healed)
        .max();
    let first_outside_write = entries
        .iter()
        .filter(|e| e.client >= 4 && e.start >= cut && e.is_ok())
        .filter(|e| matches!(e.op, common::history::Op::Put { .. }))
        .filter(|e| {
            metadata
                .chain_for_key(e.op.key())
                .last()
                .is_some_and(|n| n.name == victim)
        })
        .filter_map(|e| e.end)
        .min();
    let after_cut = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(cut));
    println!(
        "inside client's last success {:?} after the cut; outside client's first write of a victim key {:?} after it",
        after_cut(last_inside_ok),
        after_cut(first_outside_write)
    );
    let (last, first) = (
        last_inside_ok.expect("the victim served the inside client"),
        first_outside_write.expect("the victim's keys were written again"),
    );
    assert!(last < first, "the victim served after its replacement did");
    let failed = entries
        .iter()
        .filter(|e| *e.status() == OpResult::Failed)
        .count();
    println!("{} operations, {failed} refused", entries.len());
    let finals = cluster.final_reads(&keys);
    let report = check_with_final(&history, &finals).unwrap_or_else(|v| panic!("{v}"));
    println!("history: {report}");
}

/// Every member's view of the ECS group once all of them agree (same leader, which reports
/// itself the leader, same term, same applied index), within `within`.
fn wait_group_agrees(cluster: &HostCluster, within: Duration) -> GroupReport {
    let deadline = Instant::now() + within;
    loop {
        let reports: Vec<Result<GroupReport, String>> = cluster
            .ecs
            .iter()
            .map(|e| cluster.group_report(&cluster.client, &e.addr))
            .collect();
        if let Some(Ok(first)) = reports.first() {
            let agree = first.leader.is_some()
                && reports.iter().all(|r| {
                    r.as_ref().is_ok_and(|r| {
                        (r.leader, r.term, r.applied) == (first.leader, first.term, first.applied)
                    })
                })
                && reports
                    .iter()
                    .any(|r| r.as_ref().is_ok_and(|r| Some(r.this) == r.leader));
            if agree {
                return first.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the ECS members did not agree within {within:?}: {reports:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The group's ring, asked of `members` (through redirects).
fn group_ring(cluster: &HostCluster, members: &[String]) -> RingMetadata {
    match cluster.ecs_ask(
        &cluster.client,
        members,
        AdminRequest::Ring,
        Duration::from_secs(5),
    ) {
        Ok(AdminReply::Ring(ring)) => ring,
        other => panic!("Ring from {members:?}: {other:?}"),
    }
}

/// Waits (up to 15 s) until every node of `ring` holds exactly `ring`.
fn wait_nodes_hold(cluster: &HostCluster, ring: &RingMetadata) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let behind: Vec<(String, Option<u64>)> = ring
            .nodes
            .iter()
            .filter_map(|n| match cluster.node_ring(&n.addr) {
                Ok(Some(held)) if held == *ring => None,
                Ok(held) => Some((n.name.clone(), held.map(|r| r.version))),
                Err(_) => Some((n.name.clone(), None)),
            })
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes not holding the group's ring v{}: {behind:?}",
            ring.version
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the isolated old leader showed while it was cut off from the other members.
#[derive(Debug, Default)]
struct OldLeaderView {
    /// Ring versions it answered `Ring` with, and when (after the cut).
    rings: Vec<(Duration, u64)>,
    /// Its `Group` reports: (after the cut, leader, term, applied).
    groups: Vec<(Duration, Option<u64>, u64, u64)>,
    /// Anything else it answered `Ring` with (a redirect, an error).
    other: Vec<(Duration, String)>,
}

/// An ECS group partitioned (README "A highly available ECS: three members", ARCHITECTURE.md
/// §12): three ECS members on hosts of their own, 3 node hosts (replication 3), 2 spare node
/// hosts, a client host. The leader's host is cut off from the two other members' hosts only
/// (it still reaches the nodes and the client host, and they it): the isolated leader must
/// commit nothing (a join sent to it directly fails, and neither its ring nor any node's
/// moves to a version the majority did not commit), the majority must elect a leader and
/// serve a join, and once healed all three members must agree on one leader, term and
/// applied index, with one ring everywhere and every key written before and during the
/// partition readable.
#[test]
fn the_ecs_leader_cut_off_from_its_group_commits_nothing_and_the_majority_goes_on() {
    let _watch = Stopwatch::start(
        "the_ecs_leader_cut_off_from_its_group_commits_nothing_and_the_majority_goes_on",
    );
    let mut cluster = HostCluster::start_group(3, "replication-factor = 3\n");
    for spare in ["n4", "n5"] {
        let host = cluster.add_host(spare);
        cluster.start_node(&host, spare);
    }
    let all_members: Vec<String> = cluster.ecs.iter().map(|e| e.addr.clone()).collect();
    let before = keys("before", 200);
    let during = keys("during", 200);
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        put_all(&store, &before).await;
        store.disconnect().await;
    });

    let agreed = wait_group_agrees(&cluster, Duration::from_secs(20));
    let ring_before = group_ring(&cluster, &all_members);
    assert_eq!(ring_before.nodes.len(), 3, "{ring_before:?}");
    assert_eq!(ring_before.replication, 3);
    let old = cluster.ecs_member(agreed.leader.expect("a leader"));
    let majority: Vec<&netns::HostEcs> = cluster.ecs.iter().filter(|e| e.id != old.id).collect();
    let majority_addrs: Vec<String> = majority.iter().map(|e| e.addr.clone()).collect();
    eprintln!(
        "leader {} (term {}, applied {}), ring v{}; cutting it off from {} and {}",
        old.name,
        agreed.term,
        agreed.applied,
        ring_before.version,
        majority[0].name,
        majority[1].name
    );

    let stop_watching = AtomicBool::new(false);
    let (view, isolated, ring_after, joined_at) = std::thread::scope(|scope| {
        // The scope joins the watcher before a failed assertion below can end the test: it
        // must stop then too, or the test hangs instead of failing.
        let _stop = StopOnDrop(&stop_watching);
        for m in &majority {
            cluster.lab.cut_between(&old.host, &m.host);
        }
        let cut = Instant::now();

        // What the old leader shows meanwhile, asked from the client host every 200 ms.
        let watcher = {
            let (cluster, stop_watching) = (&cluster, &stop_watching);
            scope.spawn(move || {
                let mut view = OldLeaderView::default();
                while !stop_watching.load(Ordering::Relaxed) {
                    let at = cut.elapsed();
                    match cluster.ecs_call(
                        &cluster.client,
                        &old.addr,
                        AdminRequest::Ring,
                        Duration::from_secs(2),
                    ) {
                        Ok(AdminReply::Ring(ring)) => view.rings.push((at, ring.version)),
                        other => view.other.push((at, format!("{other:?}"))),
                    }
                    if let Ok(g) = cluster.group_report(&cluster.client, &old.addr) {
                        view.groups.push((at, g.leader, g.term, g.applied));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                view
            })
        };

        // A join sent to the isolated old leader directly (no redirect followed): it may
        // answer an error or a redirect, or nothing, but it must not commit.
        let n5_addr = cluster.node("n5").addr.clone();
        let isolated = scope.spawn(|| {
            let started = Instant::now();
            let reply = cluster.ecs_call(
                &cluster.client,
                &old.addr,
                AdminRequest::AddNode {
                    name: "n5".into(),
                    addr: n5_addr,
                    zone: None,
                },
                Duration::from_secs(40),
            );
            (reply, started.elapsed())
        });

        // The majority elects a leader, which answers Group naming itself.
        let deadline = cut + Duration::from_secs(20);
        let new = 'elected: loop {
            for m in &majority {
                if let Ok(g) = cluster.group_report(&cluster.client, &m.addr) {
                    if g.leader == Some(g.this) && g.this != old.id {
                        break 'elected g;
                    }
                }
            }
            assert!(Instant::now() < deadline, "the majority elected no leader");
            std::thread::sleep(Duration::from_millis(20));
        };
        let elected = cut.elapsed();
        eprintln!(
            "new leader {} (term {}) answered Group {elected:.2?} after the cut",
            cluster.ecs_member(new.this).name,
            new.term
        );
        assert!(new.term > agreed.term, "{new:?}");

        // It serves: n4 joins through the majority, and the nodes adopt the new ring.
        let started = Instant::now();
        let n4_addr = cluster.node("n4").addr.clone();
        let reply = cluster.ecs_ask(
            &cluster.client,
            &majority_addrs,
            AdminRequest::AddNode {
                name: "n4".into(),
                addr: n4_addr,
                zone: None,
            },
            Duration::from_secs(60),
        );
        let ring_after = match reply {
            Ok(AdminReply::Changed { metadata, .. }) => metadata,
            other => panic!("n4's join through the majority: {other:?}"),
        };
        let joined_at = cut.elapsed();
        eprintln!(
            "n4 joined through the majority in {:.2?} ({joined_at:.2?} after the cut): ring v{}",
            started.elapsed(),
            ring_after.version
        );
        assert_eq!(ring_after.version, ring_before.version + 1);
        assert!(ring_after.node("n4").is_some() && ring_after.node("n5").is_none());
        wait_nodes_hold(&cluster, &ring_after);
        assert_eq!(group_ring(&cluster, &majority_addrs), ring_after);

        // Clients carry on: nothing on the data path involves the ECS.
        let config = cluster.client_config();
        cluster.client.run(|| async {
            let store = KvStore::connect(config).await.expect("connect");
            put_all(&store, &during).await;
            store.disconnect().await;
        });

        let isolated = isolated.join().expect("isolated join thread");
        eprintln!(
            "the isolated old leader answered the join of n5 after {:.2?}: {:?}",
            isolated.1, isolated.0
        );
        drop(_stop);
        let view = watcher.join().expect("watcher thread");
        (view, isolated, ring_after, joined_at)
    });

    // The isolated leader committed nothing.
    assert!(
        !matches!(isolated.0, Ok(AdminReply::Changed { .. })),
        "the isolated old leader reports a committed change: {:?}",
        isolated.0
    );
    let versions: std::collections::BTreeSet<u64> = view.rings.iter().map(|(_, v)| *v).collect();
    let stale: Vec<Duration> = view
        .rings
        .iter()
        .filter(|(at, v)| *at > joined_at && *v < ring_after.version)
        .map(|(at, _)| *at)
        .collect();
    let leaders: std::collections::BTreeSet<(Option<u64>, u64)> =
        view.groups.iter().map(|(_, l, t, _)| (*l, *t)).collect();
    eprintln!(
        "the old leader while cut off: answered Ring {} times with versions {versions:?} \
         ({} of them after v{} was committed, the last {:.2?} after the cut); other answers \
         {:?}; its Group (leader, term): {leaders:?}",
        view.rings.len(),
        stale.len(),
        ring_after.version,
        stale.last().copied().unwrap_or_default(),
        view.other,
    );
    assert!(
        view.rings.iter().all(|(_, v)| *v == ring_before.version),
        "the isolated old leader showed a ring the majority did not commit: {:?}",
        view.rings
    );
    // It stops acting within half a second of losing its majority, before the others can
    // elect a leader: it never serves a ring the majority has moved past.
    assert!(
        stale.is_empty(),
        "the isolated old leader served ring v{} {} times after v{} was committed (at {stale:?} after the cut)",
        ring_before.version,
        stale.len(),
        ring_after.version
    );
    assert!(
        view.groups
            .iter()
            .all(|(_, _, _, applied)| *applied == agreed.applied),
        "the isolated old leader applied entries while cut off: {:?}",
        view.groups
    );

    // Healed: one leader, one term, one applied index, one ring.
    for m in cluster.ecs.iter().filter(|e| e.id != old.id) {
        cluster.lab.heal_between(&old.host, &m.host);
    }
    let healed = Instant::now();
    let after = wait_group_agrees(&cluster, Duration::from_secs(30));
    eprintln!(
        "all three members agree {:.2?} after the heal: leader {}, term {}, applied {}",
        healed.elapsed(),
        cluster.ecs_member(after.leader.unwrap()).name,
        after.term,
        after.applied
    );
    assert_ne!(after.leader, Some(old.id), "{after:?}");
    match cluster.ecs_call(
        &cluster.client,
        &old.addr,
        AdminRequest::Ring,
        Duration::from_secs(5),
    ) {
        Ok(AdminReply::NotLeader { leader: Some(to) }) => {
            assert_eq!(to, cluster.ecs_member(after.leader.unwrap()).addr)
        }
        other => panic!("the old leader, healed, answers Ring with {other:?}"),
    }
    assert_eq!(group_ring(&cluster, &all_members), ring_after);
    wait_nodes_hold(&cluster, &ring_after);
    let n5 = cluster.node_ring(&cluster.node("n5").addr).expect("n5");
    eprintln!(
        "n5 (offered to the isolated leader) holds ring {:?}",
        n5.as_ref().map(|r| r.version)
    );
    // The isolated leader confirms its lead before a join touches the joining node: n5 was
    // neither given a ring nor wiped.
    assert!(n5.is_none(), "the isolated old leader touched n5: {n5:?}");

    // Every key written before and during the partition is there.
    let config = cluster.client_config();
    cluster.client.run(|| async {
        let store = KvStore::connect(config).await.expect("connect");
        assert_eq!(store.metadata().version, ring_after.version);
        assert_all_readable(&store, &before).await;
        assert_all_readable(&store, &during).await;
        store.disconnect().await;
    });
}
