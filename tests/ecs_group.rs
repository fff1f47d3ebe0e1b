//! A replicated ECS (README "A highly available ECS", ARCHITECTURE.md §12), end to end: three
//! `ringkv-ecs serve --peers` processes forming a Raft group, node processes, clients
//! recording every operation, all over real QUIC + mTLS. The leader is SIGKILLed in the
//! middle of a join under load: a new leader must finish or roll back the join by itself,
//! the history must stay linearizable with nothing acknowledged lost, and the ring must
//! converge everywhere. All three members restarted keep the ring and its version.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::{keys_for, Load};
use common::{free_port, node_status, wait_answers, Certs, EcsProcess, NodeProcess};
use ringkv_certs::Role;
use ringkv_ecs::client::ask;
use ringkv_transport::Transport;
use ringkv_wire::{AdminReply, AdminRequest, GroupReport, KeyRange, Position, RingMetadata};
use tempfile::TempDir;

/// One group at a time: elections and leases are timed, and two groups of processes side by
/// side on two cores would starve them.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One ECS member process.
struct Member {
    name: String,
    addr: SocketAddr,
    state: TempDir,
    /// Steps of changes it completed (from its log).
    steps: Arc<AtomicUsize>,
    process: Option<EcsProcess>,
}

struct Group {
    certs: Arc<Certs>,
    admin: Transport,
    members: Vec<Member>,
    nodes: Vec<(String, NodeProcess, TempDir)>,
    /// The `--failover-after` members are (re)started with.
    failover_after: &'static str,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Group {
    /// Three ECS members `ecs1..ecs3` (replication 3, failover after 2 s) and no node.
    async fn start() -> Self {
        Self::start_with("2s").await
    }

    /// Three ECS members started with `--failover-after failover_after`.
    async fn start_with(failover_after: &'static str) -> Self {
        let serial = ONE_AT_A_TIME.lock().await;
        let certs = Arc::new(Certs::new());
        let mut group = Self {
            admin: certs.admin(),
            certs,
            members: Vec::new(),
            nodes: Vec::new(),
            failover_after,
            _serial: serial,
        };
        for _ in 0..3 {
            group.new_member();
        }
        for i in 0..3 {
            group.spawn(i).await;
        }
        group
    }

    /// Starts member `i` (again), on its address and state directory: one of the founding
    /// three (`--peers`), or a later one that waits to be added (`--raft-id`).
    async fn spawn(&mut self, i: usize) {
        let founding: Vec<String> = self.members[..3]
            .iter()
            .map(|m| format!("{}@{}", m.name, m.addr))
            .collect();
        let founding = founding.join(",");
        let raft_id = (i + 1).to_string();
        let (flag, value) = if i < 3 {
            ("--peers", founding.as_str())
        } else {
            ("--raft-id", raft_id.as_str())
        };
        let member = &self.members[i];
        let process = EcsProcess::spawn_as(
            &self.certs,
            &member.name,
            member.addr,
            member.state.path(),
            member.steps.clone(),
            &[
                flag,
                value,
                "--replication-factor",
                "3",
                "--failover-after",
                self.failover_after,
                "--probe-interval",
                "200ms",
            ],
        )
        .await;
        self.members[i].process = Some(process);
    }

    /// Issues the certificate of member `ecs<n>` and adds it to the list (not started).
    fn new_member(&mut self) -> usize {
        let i = self.members.len();
        let name = format!("ecs{}", i + 1);
        self.certs.issue(Role::Ecs, &name);
        self.members.push(Member {
            name,
            addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            state: tempfile::tempdir().unwrap(),
            steps: Arc::new(AtomicUsize::new(0)),
            process: None,
        });
        i
    }

    /// The addresses of the members that run.
    fn addrs(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.process.is_some())
            .map(|m| m.addr.to_string())
            .collect()
    }

    async fn ask(&self, request: AdminRequest) -> AdminReply {
        ask(
            &self.admin,
            &self.addrs(),
            &request,
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{request:?}: {e}"))
    }

    /// The group as a running member sees it, once it knows a leader.
    async fn group(&self) -> GroupReport {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let AdminReply::Group(Some(group)) = self.ask(AdminRequest::Group).await {
                if group.leader.is_some() {
                    return group;
                }
            }
            assert!(Instant::now() < deadline, "no leader within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the member that leads (by a running member's view).
    async fn leader(&self) -> usize {
        let group = self.group().await;
        let id = group.leader.expect("a leader");
        (id - 1) as usize
    }

    async fn ring(&self) -> RingMetadata {
        match self.ask(AdminRequest::Ring).await {
            AdminReply::Ring(ring) => ring,
            other => panic!("ring: {other:?}"),
        }
    }

    /// Starts node `name` as a process (not yet in the ring).
    async fn spawn_node(&mut self, name: &str) -> String {
        let data = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let node = NodeProcess::spawn_with(&self.certs, name, addr, data.path(), &[]);
        wait_answers(&self.certs, &node.addr).await;
        let addr = node.addr.clone();
        self.nodes.push((name.to_string(), node, data));
        addr
    }

    /// SIGKILLs node `name`'s process.
    fn kill_node(&mut self, name: &str) {
        self.nodes
            .iter_mut()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no node {name}"))
            .1
            .kill();
    }

    /// A group ([`Group::start`]) with `nodes` nodes, and `clients` clients recording a
    /// load over `keys` keys spread over the whole ring, running for 800 ms already.
    async fn under_load(nodes: usize, keys: usize, clients: usize) -> (Self, Load) {
        let mut group = Group::start().await;
        group.add_nodes(nodes).await;
        let all = KeyRange::new(Position::MAX, Position::MAX);
        let load = Load::start(
            Arc::new(group.certs.client(group.seeds()).await),
            keys_for(&all, keys, 0),
            clients,
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        (group, load)
    }

    /// SIGKILLs member `i` (it must be running).
    fn kill_member(&mut self, i: usize) {
        self.members[i]
            .process
            .take()
            .expect("the member runs")
            .kill();
    }

    /// SIGKILLs the member that leads now; returns its index.
    async fn kill_leader(&mut self) -> usize {
        let leader = self.leader().await;
        self.kill_member(leader);
        leader
    }

    /// Starts nodes `n1..=n<n>` and adds them to the ring one by one.
    async fn add_nodes(&mut self, n: usize) {
        for i in 1..=n {
            let name = format!("n{i}");
            let addr = self.spawn_node(&name).await;
            add_until_in_ring(self, &name, &addr).await;
        }
    }

    fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|(_, p, _)| p.addr.clone()).collect()
    }

    /// Waits (up to `within`) until the group's ring satisfies `done` (described by `what`);
    /// how long it took.
    async fn wait_ring(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&RingMetadata) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let ring = self.ring().await;
            if done(&ring) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{what} not within {within:?}: {ring:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 30 s) until every node holds the ring version the group holds.
    async fn wait_converged(&self) -> RingMetadata {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ring = self.ring().await;
            let mut behind = Vec::new();
            for n in &ring.nodes {
                let status = node_status(&self.admin, &n.addr).await;
                if status.metadata_version != ring.version {
                    behind.push((n.name.clone(), status.metadata_version));
                }
            }
            if behind.is_empty() {
                return ring;
            }
            assert!(
                Instant::now() < deadline,
                "nodes behind ring v{}: {behind:?}",
                ring.version
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Adds `name` at `addr` through the group, asking again (after a leader change, or while
/// the change a crash left behind is finished or rolled back) until it is in the ring.
async fn add_until_in_ring(group: &Group, name: &str, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if group.ring().await.node(name).is_some() {
            return;
        }
        let reply = ask(
            &group.admin,
            &group.addrs(),
            &AdminRequest::AddNode {
                name: name.into(),
                addr: addr.into(),
                zone: None,
            },
            Duration::from_secs(60),
        )
        .await;
        if let Ok(AdminReply::Changed { .. }) = reply {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never joined: last {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sends the join of `name` at `addr` to the group in a task of its own, and returns once
/// the leader has completed a step of it: the leader's index, the task, the leader's step
/// counter and its count before the join.
async fn join_until_a_step(
    group: &Group,
    name: &str,
    addr: &str,
) -> (
    usize,
    tokio::task::JoinHandle<Result<AdminReply, ringkv_ecs::client::AskError>>,
    Arc<AtomicUsize>,
    usize,
) {
    let leader = group.leader().await;
    let steps = group.members[leader].steps.clone();
    let done_before = steps.load(Ordering::SeqCst);
    let request = AdminRequest::AddNode {
        name: name.into(),
        addr: addr.into(),
        zone: None,
    };
    let (admin, members) = (group.certs.admin(), group.addrs());
    let joining =
        tokio::spawn(async move { ask(&admin, &members, &request, Duration::from_secs(60)).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while steps.load(Ordering::SeqCst) == done_before {
        assert!(Instant::now() < deadline, "the join never took a step");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (leader, joining, steps, done_before)
}

/// SIGKILL of the leader in the middle of a join, under client load: another member takes
/// the lead, finishes or rolls back the join from the replicated intent log by itself (the
/// operator then asks again if it was rolled back), clients see a linearizable history with
/// nothing acknowledged lost, and every node converges on the group's ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_join_under_load_loses_nothing() {
    let (mut group, load) = Group::under_load(3, 32, 8).await;
    let before = group.ring().await;
    assert_eq!(before.nodes.len(), 3);

    // The join, killed at its leader after its first completed step.
    let addr = group.spawn_node("n4").await;
    let (leader, joining, steps, done_before) = join_until_a_step(&group, "n4", &addr).await;
    group.kill_member(leader);
    let killed = Instant::now();
    eprintln!(
        "killed the leader {} after {} step(s) of the join",
        group.members[leader].name,
        steps.load(Ordering::SeqCst) - done_before
    );
    let first = joining.await.unwrap();
    eprintln!(
        "the join's own answer, {:.2?} after the kill: {first:?}",
        killed.elapsed()
    );
    let new_leader = group.leader().await;
    assert_ne!(new_leader, leader, "a running member leads");
    eprintln!(
        "new leader {} answering {:.2?} after the kill",
        group.members[new_leader].name,
        killed.elapsed()
    );
    add_until_in_ring(&group, "n4", &addr).await;
    let ring = group.wait_converged().await;
    assert_eq!(ring.nodes.len(), 4, "{ring:?}");
    assert!(ring.version > before.version);
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop_and_check(&group.certs, group.seeds()).await;
    let status = group.group().await;
    assert_eq!(status.members.len(), 3);
    // Every node has heard from the new leader with its term stamped on the requests, so
    // the killed leader could no longer act on any of them.
    for n in &ring.nodes {
        let node = node_status(&group.admin, &n.addr).await;
        assert_eq!(node.ecs_term, status.term, "{}'s ECS term", n.name);
    }
}

/// The ECS leader SIGKILLed under load costs the clients nothing: no failed request, no
/// unknown outcome. The nodes' leases from the killed leader run out (a lease is half of
/// `failover_after`, 1 s here) before a new leader is elected and has leased them afresh
/// (an election, then a probe whose answer the next probe echoes), so every node stops
/// serving for a moment. A write a head took just before then must not be given up as
/// "may or may not have been applied" when its lease lapses: the head waits for the new
/// leader's lease and finishes it; and the new leader leases every node as it takes the
/// lead, a first answer followed by a second probe at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_under_load_fails_no_client_request() {
    let (mut group, load) = Group::under_load(3, 32, 8).await;
    for round in 0..2 {
        let leader = group.kill_leader().await;
        let killed = Instant::now();
        let new_leader = loop {
            let now_leading = group.leader().await;
            if now_leading != leader {
                break now_leading;
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no new leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!(
            "round {round}: killed the leader {}; {} leads {:.2?} later",
            group.members[leader].name,
            group.members[new_leader].name,
            killed.elapsed()
        );
        // Through the lapse and the new leader's first leases, then the killed member back.
        tokio::time::sleep(Duration::from_secs(3)).await;
        group.spawn(leader).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (_, report) = load.stop_and_report(&group.certs, group.seeds()).await;
    assert_eq!(
        (report.failed, report.unknown),
        (0, 0),
        "client requests failed or ended unknown across the leader changes: {report}"
    );
}

/// All three members SIGKILLed and restarted from their state directories, in the middle of
/// a join: the ring, its version and the change in progress survive; the group elects a
/// leader, which finishes or rolls back the join by itself, and changes go on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_and_a_change_in_progress_survive_a_restart_of_every_member() {
    let mut group = Group::start().await;
    group.add_nodes(2).await;
    let before = group.ring().await;
    let term_before = group.group().await.term;
    // A join, and every member killed once its leader has taken a step of it.
    let addr = group.spawn_node("n3").await;
    let (_leader, joining, steps, done_before) = join_until_a_step(&group, "n3", &addr).await;
    for member in &mut group.members {
        member.process.take().expect("runs").kill();
    }
    joining.abort();
    eprintln!(
        "killed every member after {} step(s) of the join",
        steps.load(Ordering::SeqCst) - done_before
    );
    for i in 0..3 {
        group.spawn(i).await;
    }
    let after = group.ring().await;
    assert!(
        after.version >= before.version,
        "the ring went back: v{} after v{}",
        after.version,
        before.version
    );
    assert_eq!(
        after.nodes.len(),
        before.nodes.len() + usize::from(after.node("n3").is_some()),
        "{after:?}"
    );
    eprintln!(
        "after the restart: ring v{} ({}), the join {}",
        after.version,
        after.nodes.len(),
        if after.node("n3").is_some() {
            "committed"
        } else {
            "not committed (rolled back, or finished later)"
        }
    );
    let status = group.group().await;
    assert!(status.term >= term_before, "terms never go back");
    add_until_in_ring(&group, "n3", &addr).await;
    let ring = group.wait_converged().await;
    assert_eq!(ring.nodes.len(), 3);
    assert!(ring.version > before.version);
}

/// Window 5 of #21: the lease bound across a leader change holds only if every leader uses
/// the same `failover_after`, so the group keeps the one it was founded with in its
/// replicated state. Every member restarted with a shorter `--failover-after` still waits the
/// group's (6 s) before failing a dead node over, not its own (1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_leader_fails_over_after_the_groups_failover_after_not_its_own() {
    let mut group = Group::start_with("6s").await;
    group.add_nodes(4).await;
    for member in &mut group.members {
        member.process.take().expect("runs").kill();
    }
    group.failover_after = "1s";
    for i in 0..3 {
        group.spawn(i).await;
    }
    let leader = group.leader().await;
    assert_eq!(
        group.group().await.failover_after_ms,
        6000,
        "the group's failover_after"
    );
    // The new leader leases every node before one dies.
    group.wait_converged().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    group.kill_node("n2");
    let killed = Instant::now();
    group
        .wait_ring(Duration::from_secs(60), "n2 failed over", |ring| {
            ring.node("n2").is_none() || ring.is_failed("n2")
        })
        .await;
    let took = killed.elapsed();
    eprintln!(
        "n2 failed over {took:.2?} after it was killed (leader {}, started with --failover-after 1s, the group's is 6s)",
        group.members[leader].name
    );
    // Its last answer came at most a probe interval (200 ms) before the kill.
    assert!(
        took >= Duration::from_millis(5800),
        "failed over {took:?} after the kill: the leader used its own --failover-after (1s), not the group's (6s)"
    );
}

/// SIGKILL of the ECS leader while a node is dead and awaiting failover: the next leader
/// fails the node over by itself, within `failover-after` of taking the lead plus the
/// election (printed), and clients lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_failed_over_after_the_leader_is_killed() {
    let (mut group, load) = Group::under_load(4, 24, 4).await;
    group.kill_node("n2");
    let node_killed = Instant::now();
    let leader = group.kill_leader().await;
    group
        .wait_ring(Duration::from_secs(40), "n2 failed over", |ring| {
            ring.node("n2").is_none() && ring.failed.is_empty()
        })
        .await;
    let took = node_killed.elapsed();
    eprintln!(
        "n2 failed over and replaced {took:.2?} after it was killed, the ECS leader {} killed with it (failover-after 2s)",
        group.members[leader].name
    );
    // failover-after (2 s) + an election (about 1.5 s) + the rebuild, with room for this
    // machine's noise.
    assert!(took < Duration::from_secs(20), "{took:?}");
    let seeds: Vec<String> = group
        .nodes
        .iter()
        .filter(|(n, _, _)| n != "n2")
        .map(|(_, p, _)| p.addr.clone())
        .collect();
    load.stop_and_check(&group.certs, seeds).await;
}

/// The group's own membership: a fourth member, started with `--raft-id 4`, is added
/// (learner, then voter), then the leader itself is removed (a membership change with a
/// leader change); both times are printed, and the ring goes on changing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ecs_member_is_added_and_the_leader_removed() {
    let mut group = Group::start().await;
    let addr = group.spawn_node("n1").await;
    add_until_in_ring(&group, "n1", &addr).await;
    let fourth = group.new_member();
    group.spawn(fourth).await;
    let started = Instant::now();
    let reply = group
        .ask(AdminRequest::AddEcsMember {
            id: 4,
            name: group.members[fourth].name.clone(),
            addr: group.members[fourth].addr.to_string(),
        })
        .await;
    let added = started.elapsed();
    assert!(matches!(reply, AdminReply::Done(_)), "{reply:?}");
    let status = group.group().await;
    assert_eq!(status.members.len(), 4, "{status:?}");
    assert!(status.members.iter().all(|m| m.voter), "{status:?}");
    eprintln!("add-ecs-member (learner caught up, then voter): {added:.2?}");

    let leader = group.leader().await;
    let old_leader_id = leader as u64 + 1;
    let started = Instant::now();
    let reply = group
        .ask(AdminRequest::RemoveEcsMember { id: old_leader_id })
        .await;
    assert!(matches!(reply, AdminReply::Done(_)), "{reply:?}");
    let removed = started.elapsed();
    group.members[leader].process.take().expect("runs").kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = group.group().await;
        if status.leader != Some(old_leader_id) && status.members.len() == 3 {
            break status;
        }
        assert!(Instant::now() < deadline, "no new leader: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "remove-ecs-member of the leader: {removed:.2?} to commit, a new leader ({:?}) {:.2?} after the request",
        status.leader,
        started.elapsed()
    );
    let addr = group.spawn_node("n2").await;
    add_until_in_ring(&group, "n2", &addr).await;
    assert_eq!(group.wait_converged().await.nodes.len(), 2);
}
