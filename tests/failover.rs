//! Replication and automatic failover (README "Replication and failover", ARCHITECTURE.md
//! §7), end to end: node processes over real QUIC + mTLS, the ECS as a task, clients
//! recording every operation. A node is SIGKILLed under load; the ECS fails it over by
//! itself; the history must be linearizable per key with no acknowledged write lost, and
//! every key must be served again within `failover-after` and a few seconds.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::history::{
    check_with_final, put, record_get, record_put, History, OpOutcome, OpResult,
};
use common::load::{final_values, keys_for, CasCounter, Load};
use common::TestEcs;
use common::{
    add_node_in_zone_via, ask_ecs, free_port, node_status, wait_answers, Certs, NodeProcess,
};
use ringkv_transport::Transport;
use ringkv_wire::{AdminReply, AdminRequest, KeyRange, NodeEntry, Position, RingMetadata};
use tempfile::TempDir;

/// The failover timeout of these tests.
const FAILOVER_AFTER: Duration = Duration::from_secs(2);
/// What "within failover-after and a few seconds" allows on this 2-core machine.
const SERVED_AGAIN_WITHIN: Duration = Duration::from_secs(8);

/// One cluster at a time: these tests time failovers, and five node processes per test
/// running side by side on two cores would starve the leases they measure.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    certs: Arc<Certs>,
    ecs: TestEcs,
    _ecs_state: TempDir,
    admin: Transport,
    nodes: Vec<(String, NodeProcess, TempDir)>,
    /// Last, so that it is released after the processes are gone.
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// An ECS with replication `r` and nodes `n1..=n<n>` (processes), added one by one.
    async fn start(n: usize, r: u8) -> Self {
        Self::start_with(n, r, FAILOVER_AFTER).await
    }

    /// [`Cluster::start`] with another `failover_after`.
    async fn start_with(n: usize, r: u8, failover_after: Duration) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let serial = ONE_AT_A_TIME.lock().await;
        let certs = Arc::new(Certs::new());
        let ecs_state = tempfile::tempdir().unwrap();
        let ecs = TestEcs::start_with(&certs, ecs_state.path(), |c| {
            c.replication = r;
            c.failover_after = failover_after;
            c.probe_interval = Duration::from_millis(200);
        })
        .await;
        let admin = certs.admin();
        let mut cluster = Self {
            _serial: serial,
            certs,
            ecs,
            _ecs_state: ecs_state,
            admin,
            nodes: Vec::new(),
        };
        for i in 1..=n {
            cluster.add(&format!("n{i}")).await;
        }
        cluster
    }

    /// Starts node `name` as a process and adds it through the ECS, in a zone of its own
    /// (`rack-<name>`: placed as without zones, and the zone must survive what the ECS does
    /// to the node).
    async fn add(&mut self, name: &str) {
        let data = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let node = NodeProcess::spawn_with(&self.certs, name, addr, data.path(), &[]);
        wait_answers(&self.certs, &node.addr).await;
        let zone = format!("rack-{name}");
        add_node_in_zone_via(&self.admin, &self.ecs.addr, name, &node.addr, Some(&zone)).await;
        self.nodes.push((name.to_string(), node, data));
    }

    /// Removes `name` through the ECS (a leave); panics if the ECS refuses.
    async fn remove(&self, name: &str) {
        let request = AdminRequest::RemoveNode { name: name.into() };
        let reply = ask_ecs(&self.admin, &self.ecs.addr, request).await;
        assert!(matches!(reply, AdminReply::Changed { .. }), "{reply:?}");
    }

    /// A client that waits long for a reply (10 s) and retries for 30 s.
    async fn patient_client(&self) -> Arc<kvstore::KvStore> {
        let mut config = self.certs.client_config(self.seeds());
        config.request_timeout = Duration::from_secs(10);
        config.retry.deadline = Duration::from_secs(30);
        Arc::new(kvstore::KvStore::connect(config).await.expect("connect"))
    }

    fn metadata(&self) -> RingMetadata {
        (*self.ecs.ecs.metadata()).clone()
    }

    fn seeds(&self) -> Vec<String> {
        self.seeds_without(&[])
    }

    /// The addresses of the nodes not called one of `dead`.
    fn seeds_without(&self, dead: &[&str]) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(n, _, _)| !dead.contains(&n.as_str()))
            .map(|(_, p, _)| p.addr.clone())
            .collect()
    }

    fn node(&mut self, name: &str) -> &mut NodeProcess {
        &mut self
            .nodes
            .iter_mut()
            .find(|(n, _, _)| n == name)
            .expect("known node")
            .1
    }

    /// SIGKILLs `name` (it stays in `nodes`, dead).
    fn kill(&mut self, name: &str) -> Instant {
        self.node(name).kill();
        Instant::now()
    }

    /// Waits (up to 30 s) until the ECS's ring no longer holds `name` and has no failed
    /// node: the failover, rebuild included, is over.
    async fn wait_replaced(&self, name: &str) -> Duration {
        let started = Instant::now();
        loop {
            let md = self.metadata();
            if md.node(name).is_none()
                && md.failed.is_empty()
                && self.ecs.ecs.pending_change().is_none()
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name} was not failed over: ring v{} {:?} failed {:?}",
                md.version,
                md.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
                md.failed
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Checks the data each live node holds against the ECS's ring: every node holds
    /// exactly the keys whose chain contains it (`values`: every key's final value), and
    /// every range has a full chain.
    async fn assert_copies(&self, values: &HashMap<Vec<u8>, Option<Vec<u8>>>) {
        let md = self.metadata();
        for (range, chain) in md.chains() {
            assert_eq!(
                chain.len(),
                md.chain_len(),
                "{range:?} is short of copies: {chain:?}"
            );
        }
        // Gossip and installs settle within a moment; counts are compared once they do.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut mismatches = Vec::new();
            for node in &md.nodes {
                let expected = values
                    .iter()
                    .filter(|(k, v)| {
                        v.is_some() && md.chain_for_key(k).iter().any(|n| n.name == node.name)
                    })
                    .count() as u64;
                let status = node_status(&self.admin, &node.addr).await;
                if status.keys != expected {
                    mismatches.push(format!(
                        "{} holds {} keys, its chains hold {expected}",
                        node.name, status.keys
                    ));
                }
            }
            if mismatches.is_empty() {
                println!("node-side counts match the chains of ring v{}", md.version);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stray or missing copies: {mismatches:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Puts every key until the put succeeds (each attempt recorded), all at once; returns the
/// longest time from `since` to a key's first successful put.
async fn time_until_writable(
    certs: &Certs,
    seeds: Vec<String>,
    history: &History,
    keys: &[Vec<u8>],
    since: Instant,
) -> Duration {
    let store = Arc::new(certs.client(seeds).await);
    let probes = keys.iter().enumerate().map(|(i, key)| {
        let (store, history, key) = (store.clone(), history.clone(), key.clone());
        async move {
            let client = 1000 + i;
            for attempt in 0u32.. {
                let value = format!("probe-{i}-{attempt}");
                let started = since.elapsed();
                match record_put(&history, client, &store, &key, value.as_bytes()).await {
                    Ok(_) => {
                        println!(
                            "{}: put from {started:?} done at {:?} (attempt {attempt})",
                            String::from_utf8_lossy(&key),
                            since.elapsed()
                        );
                        return since.elapsed();
                    }
                    Err(e) if attempt % 25 == 0 => {
                        println!(
                            "{:?}: put {} failed: {e}",
                            since.elapsed(),
                            String::from_utf8_lossy(&key)
                        )
                    }
                    Err(_) => {}
                }
                assert!(
                    since.elapsed() < Duration::from_secs(60),
                    "key never writable again"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            unreachable!()
        }
    });
    let longest = futures::future::join_all(probes)
        .await
        .into_iter()
        .max()
        .unwrap_or_default();
    store.disconnect().await;
    longest
}

/// Which member of a chain a test kills.
#[derive(Debug, Clone, Copy)]
enum Member {
    Head,
    Middle,
    Tail,
}

/// 4 nodes, R = 3, 8 clients over 16 keys (so they conflict): SIGKILL the `member` of the
/// chain of the first key mid-load. With 4 nodes and R = 3 every node is the head of one
/// range, the middle of another and the tail of a third, so each run also kills the other
/// two roles elsewhere; the runs differ in which node and which key's view is measured.
async fn kill_one_member_under_load(member: Member) {
    let mut cluster = Cluster::start(4, 3).await;
    let all = KeyRange::new(Position::MAX, Position::MAX);
    let keys = keys_for(&all, 16, 0);
    let md = cluster.metadata();
    let chain = md.chain_for_key(&keys[0]);
    assert_eq!(chain.len(), 3);
    let victim = match member {
        Member::Head => chain[0].name.clone(),
        Member::Middle => chain[1].name.clone(),
        Member::Tail => chain[2].name.clone(),
    };
    let affected: Vec<Vec<u8>> = keys
        .iter()
        .filter(|k| md.chain_for_key(k).iter().any(|n| n.name == victim))
        .cloned()
        .collect();
    println!("killing {victim} ({member:?} of the first key's chain; {} of 16 keys have it in their chain)", affected.len());

    let load = Load::start(
        Arc::new(cluster.certs.client(cluster.seeds()).await),
        keys.clone(),
        8,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = cluster.kill(&victim);
    let seeds = cluster.seeds_without(&[victim.as_str()]);
    let unavailable = time_until_writable(
        &cluster.certs,
        seeds.clone(),
        &load.history,
        &affected,
        killed,
    )
    .await;
    println!(
        "{member:?} {victim} killed: every affected key writable again after {unavailable:?} (failover-after {FAILOVER_AFTER:?})"
    );
    assert!(
        unavailable < SERVED_AGAIN_WITHIN,
        "keys unavailable for {unavailable:?}"
    );
    let replaced = cluster.wait_replaced(&victim).await;
    println!(
        "{victim} failed over and its copies rebuilt {:?} after the kill (the last {replaced:?} of it observed)",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let finals = load.stop_and_check(&cluster.certs, seeds).await;
    cluster.assert_copies(&finals).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_head_under_load_loses_nothing() {
    kill_one_member_under_load(Member::Head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_middle_replica_under_load_loses_nothing() {
    kill_one_member_under_load(Member::Middle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_tail_under_load_loses_nothing() {
    kill_one_member_under_load(Member::Tail).await;
}

/// Two nodes killed one after the other (the second once the first is replaced), 5 nodes,
/// R = 3, under load: nothing lost, every range back at 3 copies, no strays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_killed_one_after_the_other_lose_nothing() {
    let mut cluster = Cluster::start(5, 3).await;
    let all = KeyRange::new(Position::MAX, Position::MAX);
    let keys = keys_for(&all, 24, 0);
    let load = Load::start(
        Arc::new(cluster.certs.client(cluster.seeds()).await),
        keys.clone(),
        8,
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for victim in ["n2", "n4"] {
        let killed = cluster.kill(victim);
        let took = cluster.wait_replaced(victim).await;
        println!(
            "{victim} killed, failed over and rebuilt in {took:?} ({:?} since the kill)",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seeds = cluster.seeds_without(&["n2", "n4"]);
    let finals = load.stop_and_check(&cluster.certs, seeds).await;
    cluster.assert_copies(&finals).await;
}

/// Join and leave under load with R = 3: linearizable, nothing lost, R copies of every
/// range at the end and no stray copy on any node (node-side key counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_under_load_keep_three_copies_and_no_strays() {
    let mut cluster = Cluster::start(4, 3).await;
    let all = KeyRange::new(Position::MAX, Position::MAX);
    let keys = keys_for(&all, 40, 0);
    let load = Load::start(
        Arc::new(cluster.certs.client(cluster.seeds()).await),
        keys.clone(),
        8,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.add("n5").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.remove("n2").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seeds = cluster.seeds_without(&["n2"]);
    let finals = load.stop_and_check(&cluster.certs, seeds).await;
    assert_eq!(cluster.metadata().nodes.len(), 4);
    cluster.assert_copies(&finals).await;
}

/// `ringkv-ecs remove-node` of a node that is dead (before the automatic failover would):
/// the ECS fails it over at once; the history stays clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_node_works_on_a_dead_node() {
    let mut cluster = Cluster::start(4, 3).await;
    let all = KeyRange::new(Position::MAX, Position::MAX);
    let keys = keys_for(&all, 16, 0);
    let history = History::new();
    let store = cluster.certs.client(cluster.seeds()).await;
    for (i, key) in keys.iter().enumerate() {
        record_put(&history, 0, &store, key, format!("v{i}").as_bytes())
            .await
            .unwrap();
    }
    cluster.kill("n3");
    let reply = ask_ecs(
        &cluster.admin,
        &cluster.ecs.addr,
        AdminRequest::RemoveNode { name: "n3".into() },
    )
    .await;
    assert!(matches!(reply, AdminReply::Changed { .. }), "{reply:?}");
    assert!(cluster.metadata().node("n3").is_none());
    for key in &keys {
        let got = record_get(&history, 0, &store, key).await;
        assert!(got.is_ok(), "{got:?}");
    }
    assert!(history
        .entries()
        .iter()
        .all(|e| *e.status() != OpResult::Failed));
    let seeds = cluster.seeds_without(&["n3"]);
    let finals = final_values(&cluster.certs, seeds, &keys).await;
    check_with_final(&history, &finals).unwrap_or_else(|v| panic!("{v}"));
    cluster.assert_copies(&finals).await;
}

/// Window 7 of #21: a node stopped on purpose (SIGTERM: a planned restart) is not a failure.
/// It tells the ECS at its next probe (giving up its lease first), so the ECS takes it out of
/// its chains after half a `failover-after` (3 s here: others of a planned full restart may
/// still be stopping), not after a whole `failover-after` of silence, writes to its
/// ranges go on, and when it is started again the ECS adds it back by itself. Under load:
/// linearizable, nothing acknowledged lost, every range at three copies at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_on_purpose_is_taken_out_at_once_and_added_again_when_back() {
    let mut cluster = Cluster::start_with(4, 3, Duration::from_secs(6)).await;
    let all = KeyRange::new(Position::MAX, Position::MAX);
    let keys = keys_for(&all, 16, 0);
    let load = Load::start(
        Arc::new(cluster.certs.client(cluster.seeds()).await),
        keys.clone(),
        8,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = cluster.metadata().version;
    cluster.node("n2").signal(libc::SIGTERM);
    let stopped = Instant::now();
    loop {
        let md = cluster.metadata();
        if md.is_failed("n2") || md.node("n2").is_none() {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "n2 never taken out: {md:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken_out = stopped.elapsed();
    println!(
        "n2 stopped on purpose: out of its chains {taken_out:?} after SIGTERM (failover-after 6 s)"
    );
    assert!(
        taken_out < Duration::from_millis(5500),
        "taken out {taken_out:?} after SIGTERM: the ECS waited for silence, as for a failure"
    );
    cluster.wait_replaced("n2").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.node("n2").exited() {
        assert!(Instant::now() < deadline, "n2 did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Started again on its address and data: the ECS adds it back without an operator.
    let i = cluster
        .nodes
        .iter()
        .position(|(n, _, _)| n == "n2")
        .unwrap();
    let (addr, data) = (
        cluster.nodes[i].1.addr.parse::<SocketAddr>().unwrap(),
        cluster.nodes[i].2.path().to_path_buf(),
    );
    cluster.nodes[i].1 = NodeProcess::spawn_with(&cluster.certs, "n2", addr, &data, &[]);
    let restarted = Instant::now();
    loop {
        let md = cluster.metadata();
        if md.node("n2").is_some()
            && md.failed.is_empty()
            && cluster.ecs.ecs.pending_change().is_none()
        {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "n2 was not added again: {md:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // As it was added: in its zone.
    assert_eq!(
        cluster.metadata().node("n2").unwrap().zone.as_deref(),
        Some("rack-n2")
    );
    println!(
        "n2 back in the ring {:?} after it was started again (ring v{} -> v{})",
        restarted.elapsed(),
        before,
        cluster.metadata().version
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let finals = load.stop_and_check(&cluster.certs, cluster.seeds()).await;
    cluster.assert_copies(&finals).await;
}

/// Found by `tests/nemesis.rs` (seed 555145274887352267: a delete answered "did not exist"
/// while the key held a value before and after it). A head that took a write, applied it
/// and died before it answered, then restarted on its address: the client's transport sent
/// the write again to the new process on a fresh connection, which found its own earlier
/// apply and answered as if the write were new. A client write is never sent twice by the
/// transport: its outcome is unknown (an error), never a second application's answer.
/// Set-up: the head's successor is frozen (SIGSTOP), so the head applies the delete and
/// waits for the chain; the head is SIGKILLed and restarted, then the successor resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_taken_by_a_head_that_died_before_answering_is_not_answered_by_its_restart() {
    let mut cluster = Cluster::start_with(3, 3, Duration::from_secs(60)).await;
    let key = b"taken-then-killed".to_vec();
    let store = cluster.patient_client().await;
    store.put(&key, b"v").await.expect("put");
    let md = cluster.metadata();
    let chain: Vec<String> = md
        .chain_for_key(&key)
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let (head, middle) = (chain[0].clone(), chain[1].clone());
    cluster.node(&middle).signal(libc::SIGSTOP);
    let deleting = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.delete(&key).await }
    });
    // The head applies the delete and forwards it to the frozen middle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let i = cluster
        .nodes
        .iter()
        .position(|(n, _, _)| *n == head)
        .unwrap();
    cluster.nodes[i].1.kill();
    let (addr, data) = (
        cluster.nodes[i].1.addr.parse::<SocketAddr>().unwrap(),
        cluster.nodes[i].2.path().to_path_buf(),
    );
    cluster.nodes[i].1 = NodeProcess::spawn_with(&cluster.certs, &head, addr, &data, &[]);
    wait_answers(&cluster.certs, &cluster.nodes[i].1.addr).await;
    cluster.node(&middle).signal(libc::SIGCONT);
    let answer = deleting.await.unwrap();
    println!("the delete taken by {head}, killed before it answered: {answer:?}");
    assert!(
        !matches!(answer, Ok(false)),
        "the delete of a key that held a value was answered 'did not exist' (the restarted head's second application)"
    );
}

/// A head that applied a write and was SIGKILLed before its successors had it, then
/// restarted (within `failover-after`, so nothing was failed over), re-drives the write it
/// marked unconfirmed: its chain ends up holding what the head holds. (Before, the head kept
/// the write alone: reads at the tail never saw it, and a later change of chains that made
/// the head the tail would have shown it.) Set-up as above: the middle is frozen, so the
/// head applies the put and waits for the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_its_head_died_with_reaches_the_chain_after_the_restart() {
    let mut cluster = Cluster::start_with(3, 3, Duration::from_secs(60)).await;
    let key = b"applied-then-killed".to_vec();
    let store = cluster.patient_client().await;
    let md = cluster.metadata();
    let chain: Vec<NodeEntry> = md.chain_for_key(&key).into_iter().cloned().collect();
    let (head, middle) = (chain[0].clone(), chain[1].clone());
    let held_before = node_status(&cluster.admin, &head.addr).await.keys;
    cluster.node(&middle.name).signal(libc::SIGSTOP);
    let putting = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.put(&key, b"new").await }
    });
    // The head applies the put (durably) and forwards it to the frozen middle.
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_status(&cluster.admin, &head.addr).await.keys == held_before {
        assert!(Instant::now() < deadline, "the head never applied the put");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let i = cluster
        .nodes
        .iter()
        .position(|(n, _, _)| *n == head.name)
        .unwrap();
    cluster.nodes[i].1.kill();
    let (addr, data) = (
        cluster.nodes[i].1.addr.parse::<SocketAddr>().unwrap(),
        cluster.nodes[i].2.path().to_path_buf(),
    );
    cluster.nodes[i].1 = NodeProcess::spawn_with(&cluster.certs, &head.name, addr, &data, &[]);
    wait_answers(&cluster.certs, &cluster.nodes[i].1.addr).await;
    cluster.node(&middle.name).signal(libc::SIGCONT);
    let restarted = Instant::now();
    let answer = putting.await.unwrap();
    println!(
        "the put taken by {}, killed before it answered: {answer:?}",
        head.name
    );
    // The tail serves reads: it holds the write once every member before it does.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.get(&key).await {
            Ok(Some(v)) if v == b"new" => break,
            other => assert!(
                Instant::now() < deadline,
                "the tail still reads {other:?} 30 s after the head's restart: the chain never got the write its head holds"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "the chain has the write {:?} after the head's restart",
        restarted.elapsed()
    );
    let finals = HashMap::from([(key.clone(), Some(b"new".to_vec()))]);
    cluster.assert_copies(&finals).await;
}

/// Eight writers increment one counter with compare-and-set (4 nodes, R = 3) while the head
/// of its chain is SIGKILLed and failed over, then while a fifth node joins (ranges move,
/// versions with them): the history is linearizable, one writer wins per version (a
/// version seen with two values would be a violation), the counter goes on after each
/// change, and its final count is the applied increments plus some of those whose outcome
/// was unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_counter_goes_on_across_a_failover_of_its_head_and_a_join() {
    let mut cluster = Cluster::start(4, 3).await;
    let key = b"counter".to_vec();
    let head = cluster.metadata().chain_for_key(&key)[0].name.clone();
    let counter = CasCounter::start(cluster.patient_client().await, key.clone(), 8);
    let applied = || counter.applied.load(std::sync::atomic::Ordering::Relaxed);
    // Writers whose request went to the dead head wait out their request timeout (10 s):
    // the counter is expected to go on within a generous deadline, not at once.
    let goes_on = |from: u64, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(40);
        while applied() <= from {
            assert!(
                Instant::now() < deadline,
                "the counter stopped at the {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = applied();
    let killed = cluster.kill(&head);
    cluster.wait_replaced(&head).await;
    goes_on(before, "failover").await;
    println!(
        "{before} increments before {head} was killed; the counter went on {:?} after the kill",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_join = applied();
    cluster.add("n5").await;
    goes_on(before_join, "join").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seeds = cluster.seeds_without(&[head.as_str()]);
    let (count, applied, unknown, _) = counter.stop_and_check(&cluster.certs, seeds).await;
    println!("final count {count}: {applied} applied, {unknown} unknown");
}

/// Batches while a head is dead and not yet failed over (4 nodes, R = 3, failover after 3 s):
/// a `put_many` over keys of every chain fails exactly the keys the dead node heads, each
/// with its own error (no reply from the dead node within the 20 s request timeout: outcome
/// unknown); every other key is acknowledged (those whose chain held the dead node once the
/// ECS replaced it). Every key's
/// write is recorded as an operation of its own: linearizable, nothing acknowledged lost,
/// and a `get_many` after the failover reads every acknowledged value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_head_dead_fails_only_its_keys_and_loses_nothing() {
    let mut cluster = Cluster::start_with(4, 3, Duration::from_secs(3)).await;
    let all = KeyRange::new(Position::MAX, Position::MAX);
    let keys = keys_for(&all, 64, 0);
    // Every head serving (leased) before the kill.
    let warm = cluster.patient_client().await;
    let first: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), &b"first"[..])).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while warm.put_many(&first).await.iter().any(Result::is_err) {
        assert!(
            Instant::now() < deadline,
            "the cluster never took every key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    warm.disconnect().await;
    let md = cluster.metadata();
    let victim = md.chain_for_key(&keys[0])[0].name.clone();
    let headed: Vec<bool> = keys
        .iter()
        .map(|k| md.chain_for_key(k)[0].name == victim)
        .collect();
    let mut config = cluster.certs.client_config(cluster.seeds());
    config.request_timeout = Duration::from_secs(20);
    let store = kvstore::KvStore::connect(config).await.expect("connect");
    cluster.kill(&victim);

    let history = History::new();
    let values: Vec<Vec<u8>> = (0..keys.len())
        .map(|i| format!("batch-{i}").into_bytes())
        .collect();
    let entries: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let ops: Vec<_> = entries
        .iter()
        .map(|(k, v)| history.invoke(0, put(k, v)))
        .collect();
    let results = store.put_many(&entries).await;
    for ((op, result), (key, _)) in ops.into_iter().zip(&results).zip(&entries) {
        history.complete(
            op,
            match result {
                Ok(_) => OpResult::Ok(OpOutcome::PutDone),
                Err(e) => common::history::classify_error(e),
            },
        );
        if let Err(e) = result {
            println!("{}: {e}", String::from_utf8_lossy(key));
        }
    }
    let failed: Vec<bool> = results.iter().map(Result::is_err).collect();
    println!(
        "{victim} heads {} of {} keys; {} failed",
        headed.iter().filter(|h| **h).count(),
        keys.len(),
        failed.iter().filter(|f| **f).count()
    );
    assert_eq!(failed, headed, "exactly the keys the dead node heads fail");
    store.disconnect().await;

    cluster.wait_replaced(&victim).await;
    let seeds = cluster.seeds_without(&[victim.as_str()]);
    let reader = cluster.certs.client(seeds.clone()).await;
    let read = reader.get_many(&keys).await;
    for ((value, result), failed) in values.iter().zip(&read).zip(&failed) {
        let got = result.as_ref().expect("read after the failover");
        if !failed {
            assert_eq!(got.as_ref().map(|v| &v.value), Some(value));
        }
    }
    reader.disconnect().await;
    let finals = final_values(&cluster.certs, seeds, &keys).await;
    // Every key held "first" (the warm-up) when the history began.
    let options = common::history::CheckOptions {
        initial: keys
            .iter()
            .map(|k| (k.clone(), Some(b"first".to_vec())))
            .collect(),
        final_reads: finals,
        ..Default::default()
    };
    let report = common::history::check_with(&history, &options).unwrap_or_else(|v| panic!("{v}"));
    println!("history: {report}");
}

/// A scan goes on across a join, a leave and a kill -9 with its failover (each started
/// while the scan is under way, at a quarter, half and three quarters of the ring), with
/// writers churning other keys: every key present for the whole scan is returned, once, with
/// its value, and no key deleted before the scan began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_returns_every_stable_key_across_a_join_a_leave_and_a_failover() {
    let mut cluster = Cluster::start_with(4, 3, Duration::from_secs(3)).await;
    let store = cluster.patient_client().await;
    let stable: Vec<(String, String)> = (0..1500)
        .map(|i| (format!("stable-{i}"), format!("s{i}")))
        .collect();
    let gone: Vec<String> = (0..300).map(|i| format!("gone-{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut failed = store
            .put_many(&stable)
            .await
            .iter()
            .filter(|r| r.is_err())
            .count();
        let gone_pairs: Vec<(&str, &str)> = gone.iter().map(|k| (k.as_str(), "x")).collect();
        failed += store
            .put_many(&gone_pairs)
            .await
            .iter()
            .filter(|r| r.is_err())
            .count();
        if failed == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster never took the keys");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for result in store.delete_many(&gone).await {
        result.unwrap();
    }

    // Writers churning other keys all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = (0..2)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("churn-{w}-{}", i % 200);
                    let _ = if i.is_multiple_of(3) {
                        store.delete(key.as_bytes()).await.map(|_| ())
                    } else {
                        store.put(key.as_bytes(), b"c").await.map(|_| ())
                    };
                    i += 1;
                }
            })
        })
        .collect::<Vec<_>>();

    // The faults, one after the other, each when the scan asks for it.
    let (step, mut steps) = tokio::sync::mpsc::channel::<usize>(1);
    let (done, mut dones) = tokio::sync::mpsc::channel::<usize>(1);
    let scanner = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<Vec<u8>, (usize, Vec<u8>)> = HashMap::new();
            let (mut cursor, mut pages, mut fault) = (kvstore::ScanCursor::start(), 0, 0);
            loop {
                let page = store
                    .scan_values(b"", 10, &cursor)
                    .await
                    .expect("scan page");
                pages += 1;
                for entry in page.entries {
                    let value = entry.value.expect("values asked for");
                    let slot = seen.entry(entry.key).or_insert((0, value.clone()));
                    slot.0 += 1;
                    slot.1 = value;
                }
                let Some(next) = page.next else { break };
                // Progress: the first byte of the cursor's ring position.
                let at = next.as_bytes().first().copied().unwrap_or(0) as usize;
                if fault < 3 && at >= 64 * (fault + 1) {
                    if fault > 0 {
                        assert_eq!(dones.recv().await, Some(fault - 1));
                    }
                    step.send(fault).await.unwrap();
                    fault += 1;
                }
                cursor = next;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (seen, pages, fault)
        })
    };
    while let Some(fault) = steps.recv().await {
        match fault {
            0 => {
                println!("scan at 1/4 of the ring: n5 joins");
                cluster.add("n5").await;
            }
            1 => {
                println!("scan at 1/2: n2 leaves");
                cluster.remove("n2").await;
            }
            _ => {
                println!("scan at 3/4: n3 killed");
                cluster.kill("n3");
                let took = cluster.wait_replaced("n3").await;
                println!("n3 failed over in {took:?}");
                let _ = done.send(fault).await;
                break;
            }
        }
        let _ = done.send(fault).await;
    }
    let (seen, pages, faults) = scanner.await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in churn {
        writer.await.unwrap();
    }
    println!("{pages} pages, {} keys returned", seen.len());
    assert_eq!(
        faults, 3,
        "every fault started while the scan was under way"
    );
    for (key, value) in &stable {
        match seen.get(key.as_bytes()) {
            Some((_, got)) => assert_eq!(got, value.as_bytes(), "{key}"),
            None => panic!("{key}, present for the whole scan, was not returned"),
        }
    }
    for key in &gone {
        assert!(
            !seen.contains_key(key.as_bytes()),
            "{key} was deleted before the scan"
        );
    }
    for key in seen.keys() {
        let key = String::from_utf8_lossy(key);
        assert!(
            key.starts_with("stable-") || key.starts_with("churn-"),
            "{key} was never written"
        );
    }
    for (key, _) in &stable {
        assert_eq!(seen[key.as_bytes()].0, 1, "{key} returned more than once");
    }
    store.disconnect().await;
}
