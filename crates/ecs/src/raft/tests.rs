//! Raft members over real QUIC with real mutual-TLS certificates and real fjall stores in
//! temporary directories, all in this process: elections, replication, restarts, membership
//! changes, refusals of other roles, a minority. (The store alone is tested in `store`.)
//!
//! The cluster tests take one lock, so they run one at a time: they measure election times,
//! and on a small machine two clusters electing at once would measure each other.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::Vote;
use ringkv_certs::{Identity, IssueOptions, PeerIdentity, Role};
use ringkv_transport::{ServeLimits, Service, Transport};
use ringkv_wire::{
    AdminReply, AdminRequest, Limits, NodeEntry, RaftRpc, RaftRpcKind, RingMetadata, WireError,
};
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::*;
use crate::state::IntentLog;

/// One cluster test at a time (module documentation).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on waiting for an election in these tests: many election timeouts.
const ELECTION_WAIT: Duration = Duration::from_secs(10);

/// A cluster CA with `ecs1`..`ecs4` (ecs role, valid for 127.0.0.1), `admin` and `n1` (node).
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn new() -> Self {
        ringkv_certs::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        ringkv_certs::init_ca(dir.path(), false).unwrap();
        let certs = Self { dir };
        for id in 1..=4 {
            certs.issue(Role::Ecs, &format!("ecs{id}"));
        }
        certs.issue(Role::Admin, "admin");
        certs.issue(Role::Node, "n1");
        certs
    }

    fn issue(&self, role: Role, name: &str) {
        let mut opts = IssueOptions::new(role, name);
        opts.sans = vec!["127.0.0.1".into()];
        ringkv_certs::issue(self.dir.path(), &opts).unwrap();
    }

    fn identity(&self, name: &str) -> Identity {
        Identity::from_dir(self.dir.path(), name).unwrap()
    }

    /// A client transport with the certificate `name`.
    fn client(&self, name: &str) -> Transport {
        Transport::bind_client(
            &self.identity(name),
            Limits::default(),
            Duration::from_secs(3),
            Duration::from_secs(5),
        )
        .unwrap()
    }
}

/// `n` free UDP ports on 127.0.0.1 (bound and released at once).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    sockets.iter().map(|s| s.local_addr().unwrap()).collect()
}

/// Serves the Raft member currently running behind an endpoint. A member restarted in this
/// process keeps its endpoint ([`TestMember::restart`]): binding its port again right away is
/// not reliable, because an endpoint that accepted a handshake its peer then aborted (a peer
/// stopping with a dial half way) keeps that connection, and its UDP socket, until the QUIC
/// idle timeout (30 s), even after it is closed. A real restart is a new process, whose old
/// socket the kernel frees at exit.
struct Switch {
    current: std::sync::RwLock<Arc<RaftServer>>,
}

impl Switch {
    fn current(&self) -> Arc<RaftServer> {
        self.current.read().unwrap().clone()
    }
}

impl Service for Switch {
    type Request = AdminRequest;
    type Reply = AdminReply;

    fn name(&self) -> &str {
        "ecs-raft"
    }

    fn max_frame(&self) -> usize {
        self.current().max_frame()
    }

    fn admits(&self, role: Role) -> bool {
        self.current().admits(role)
    }

    fn handle(
        &self,
        peer: &PeerIdentity,
        request: AdminRequest,
    ) -> impl std::future::Future<Output = AdminReply> + Send {
        let (server, peer) = (self.current(), peer.clone());
        async move { server.handle(&peer, request).await }
    }

    fn bad_frame(&self, error: WireError) -> AdminReply {
        self.current().bad_frame(error)
    }

    fn unencodable(&self, error: WireError) -> AdminReply {
        self.current().unencodable(error)
    }
}

/// One member: its endpoint serving its [`RaftServer`], and its [`EcsRaft`].
struct TestMember {
    id: MemberId,
    raft: EcsRaft,
    identity: Identity,
    endpoint: quinn::Endpoint,
    switch: Arc<Switch>,
    stop: oneshot::Sender<()>,
}

impl TestMember {
    async fn start(certs: &Certs, id: MemberId, addr: SocketAddr, config: RaftConfig) -> Self {
        let identity = certs.identity(&format!("ecs{id}"));
        let endpoint =
            server::bind(addr, &identity, &config.state_dir, ServeLimits::default()).unwrap();
        let raft = EcsRaft::start(config, &identity, endpoint.clone())
            .await
            .unwrap();
        let switch = Arc::new(Switch {
            current: std::sync::RwLock::new(Arc::new(RaftServer::new(
                raft.service(),
                ServeLimits::default(),
            ))),
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(ringkv_transport::serve(
            endpoint.clone(),
            switch.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            id,
            raft,
            identity,
            endpoint,
            switch,
            stop,
        }
    }

    /// Stops the Raft member and starts it again from its state directory, on its endpoint.
    async fn restart(&mut self, config: RaftConfig) {
        self.raft.shutdown().await.unwrap();
        self.raft = EcsRaft::start(config, &self.identity, self.endpoint.clone())
            .await
            .unwrap();
        *self.switch.current.write().unwrap() =
            Arc::new(RaftServer::new(self.raft.service(), ServeLimits::default()));
    }

    /// Stops Raft first (as a crash would: no more heartbeats or votes), then closes the
    /// endpoint. The server's task finishes on its own: its graceful drain waits (up to 2 s)
    /// for connections to drain, and handshakes that a peer aborted (a dial to a member that
    /// was not listening yet, or had just stopped) stay until the QUIC idle timeout.
    async fn stop(self) {
        self.raft.shutdown().await.unwrap();
        self.endpoint.close(0u32.into(), b"member stopped");
        let _ = self.stop.send(());
    }

    fn status(&self) -> RaftStatus {
        self.raft.status()
    }
}

/// A group of members, each with a state directory in `dirs`.
struct Cluster {
    certs: Certs,
    dirs: TempDir,
    members: BTreeMap<MemberId, Member>,
    running: BTreeMap<MemberId, TestMember>,
    addrs: BTreeMap<MemberId, SocketAddr>,
}

impl Cluster {
    /// `n` founding members, started.
    async fn start(n: u64) -> Self {
        Self::start_with(n, |_| {}).await
    }

    async fn start_with(n: u64, tune: impl Fn(&mut RaftConfig)) -> Self {
        let certs = Certs::new();
        let dirs = tempfile::tempdir().unwrap();
        // Room for a fourth member, added later.
        let addrs: BTreeMap<MemberId, SocketAddr> = (1..=4).zip(free_addrs(4)).collect();
        let members: BTreeMap<MemberId, Member> = (1..=n)
            .map(|id| (id, Member::new(addrs[&id].to_string(), format!("ecs{id}"))))
            .collect();
        let mut cluster = Self {
            certs,
            dirs,
            members,
            running: BTreeMap::new(),
            addrs,
        };
        for id in 1..=n {
            cluster.start_member(id, &tune).await;
        }
        cluster
    }

    fn dir(&self, id: MemberId) -> PathBuf {
        self.dirs.path().join(format!("ecs{id}"))
    }

    /// Member `id`'s configuration: the founding membership if it is a founding member.
    fn config(&self, id: MemberId, tune: impl Fn(&mut RaftConfig)) -> RaftConfig {
        let founding = if self.members.contains_key(&id) {
            self.members.clone()
        } else {
            BTreeMap::new()
        };
        let mut config = RaftConfig::new(id, founding, self.dir(id));
        config.propose_timeout = Duration::from_secs(2);
        tune(&mut config);
        config
    }

    /// Starts member `id` from its state directory.
    async fn start_member(&mut self, id: MemberId, tune: impl Fn(&mut RaftConfig)) {
        let config = self.config(id, tune);
        let member = TestMember::start(&self.certs, id, self.addrs[&id], config).await;
        self.running.insert(id, member);
    }

    /// Stops member `id` and starts it again from its state directory.
    async fn restart_member(&mut self, id: MemberId) {
        let config = self.config(id, |_| {});
        self.running.get_mut(&id).unwrap().restart(config).await;
    }

    async fn stop_member(&mut self, id: MemberId) {
        if let Some(member) = self.running.remove(&id) {
            member.stop().await;
        }
    }

    fn member(&self, id: MemberId) -> &TestMember {
        &self.running[&id]
    }

    /// Waits until every running member knows the same leader, and exactly one running
    /// member is the leader; that leader.
    async fn leader(&self) -> MemberId {
        let deadline = Instant::now() + ELECTION_WAIT;
        loop {
            let statuses: Vec<RaftStatus> = self.running.values().map(|m| m.status()).collect();
            let leaders: Vec<MemberId> = statuses
                .iter()
                .filter(|s| s.state == ServerState::Leader)
                .map(|s| s.id)
                .collect();
            if let [leader] = leaders[..] {
                if statuses
                    .iter()
                    .all(|s| s.leader.as_ref().map(|(id, _)| *id) == Some(leader))
                {
                    return leader;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no single leader known to all after {ELECTION_WAIT:?}: {statuses:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A running member other than `not`.
    fn follower(&self, not: MemberId) -> MemberId {
        *self.running.keys().find(|id| **id != not).unwrap()
    }

    /// Waits until every running member applied a state satisfying `check`.
    async fn all_applied(&self, check: impl Fn(&EcsState) -> bool) {
        for member in self.running.values() {
            let mut states = member.raft.subscribe();
            tokio::time::timeout(Duration::from_secs(5), states.wait_for(|s| check(s)))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "member {} did not apply the expected state: {:?}",
                        member.id,
                        member.raft.state()
                    )
                })
                .unwrap();
        }
    }

    async fn stop(mut self) {
        for id in self.running.keys().copied().collect::<Vec<_>>() {
            self.stop_member(id).await;
        }
    }
}

/// A valid ring of `version` with one node.
pub(crate) fn ring(version: u64) -> RingMetadata {
    RingMetadata::new(version, vec![NodeEntry::new("n1", "127.0.0.1:7001")]).unwrap()
}

/// An intent log with no change pending.
pub(crate) fn intent_log(next_change: u64) -> IntentLog {
    IntentLog {
        next_change,
        pending: None,
    }
}

#[tokio::test]
async fn three_members_elect_one_leader_and_apply_the_leaders_commands() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    eprintln!(
        "first election: leader {leader} after {:?}",
        started.elapsed()
    );
    let follower = cluster.follower(leader);

    // A follower refuses, naming the leader and its address.
    match cluster
        .member(follower)
        .raft
        .propose(EcsCommand::SetRing(ring(1)))
        .await
    {
        Err(RaftError::ForwardToLeader {
            leader: Some((id, member)),
        }) => {
            assert_eq!(id, leader);
            assert_eq!(member.addr, cluster.addrs[&leader].to_string());
            assert_eq!(member.name, format!("ecs{leader}"));
        }
        other => panic!("a follower's proposal: {other:?}"),
    }

    // The leader's commands are applied everywhere, in order.
    let raft = &cluster.member(leader).raft;
    let first = raft.propose(EcsCommand::SetRing(ring(1))).await.unwrap();
    assert_eq!(first.ring_version, 1);
    assert_eq!(first.term, raft.term());
    let second = raft
        .propose(EcsCommand::SetIntentLog(intent_log(7)))
        .await
        .unwrap();
    assert!(second.index > first.index);
    let expected = EcsState {
        ring: ring(1),
        log: intent_log(7),
        settings: None,
    };
    cluster.all_applied(|s| *s == expected).await;
    for member in cluster.running.values() {
        assert_eq!(*member.raft.state(), expected, "member {}", member.id);
        let status = member.status();
        assert_eq!(status.voters.len(), 3);
        assert_eq!(status.leader.map(|(id, _)| id), Some(leader));
    }
    let leaders = cluster
        .running
        .values()
        .filter(|m| m.raft.is_leader())
        .count();
    assert_eq!(leaders, 1, "exactly one leader");
    cluster.stop().await;
}

#[tokio::test]
async fn the_others_elect_a_new_leader_when_the_leader_stops() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await;
    let old = cluster.leader().await;
    let old_term = cluster.member(old).raft.term();
    cluster
        .member(old)
        .raft
        .propose(EcsCommand::SetRing(ring(1)))
        .await
        .unwrap();
    cluster.all_applied(|s| s.ring.version == 1).await;

    // Measured from the moment the leader starts stopping (its heartbeats end at once) to a
    // new leader known to both others, while the old one finishes closing its endpoint.
    let stopping = cluster.running.remove(&old).unwrap();
    let stopped = Instant::now();
    let (_, (new, elected)) = tokio::join!(stopping.stop(), async {
        let new = cluster.leader().await;
        (new, stopped.elapsed())
    });
    eprintln!("election after the leader stopped: {elected:?} (leader {old} -> {new})");
    assert_ne!(new, old);
    let raft = &cluster.member(new).raft;
    assert!(raft.term() > old_term);

    // New commands commit under the new term; versions only grow.
    let applied = raft.propose(EcsCommand::SetRing(ring(2))).await.unwrap();
    assert_eq!(applied.ring_version, 2);
    assert_eq!(applied.term, raft.term());
    for stale in [1, 2] {
        match raft.propose(EcsCommand::SetRing(ring(stale))).await {
            Err(RaftError::Refused(Refusal::StaleRing { proposed, current })) => {
                assert_eq!((proposed, current), (stale, 2));
            }
            other => panic!("a ring of version {stale} after 2: {other:?}"),
        }
    }
    // A refused `Save` leaves the log alone too.
    assert!(matches!(
        raft.propose(EcsCommand::Save {
            ring: Some(ring(1)),
            log: Some(intent_log(99)),
        })
        .await,
        Err(RaftError::Refused(_))
    ));
    cluster
        .all_applied(|s| s.ring == ring(2) && s.log == IntentLog::default())
        .await;
    // The leader confirms its leadership with the remaining majority, in its term.
    let confirmed = raft.ensure_leader().await.unwrap();
    assert_eq!(confirmed.term, raft.term());
    cluster.stop().await;
}

#[tokio::test]
async fn state_term_and_log_survive_a_restart_of_every_member() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let raft = &cluster.member(leader).raft;
    raft.propose(EcsCommand::Save {
        ring: Some(ring(3)),
        log: Some(intent_log(4)),
    })
    .await
    .unwrap();
    let expected = EcsState {
        ring: ring(3),
        log: intent_log(4),
        settings: None,
    };
    cluster.all_applied(|s| *s == expected).await;
    let before: BTreeMap<MemberId, RaftStatus> = cluster
        .running
        .iter()
        .map(|(id, m)| (*id, m.status()))
        .collect();
    // Stopped one after the other, then started again with the same founding membership:
    // nothing is initialised again.
    for member in cluster.running.values() {
        member.raft.shutdown().await.unwrap();
    }
    for id in 1..=3 {
        cluster.restart_member(id).await;
        let member = cluster.member(id);
        let status = member.status();
        assert_eq!(*member.raft.state(), expected, "member {id} state at start");
        assert!(status.term >= before[&id].term, "member {id}: term kept");
        assert_eq!(
            status.last_log_index, before[&id].last_log_index,
            "member {id}: log kept, no new initial entry"
        );
        assert_eq!(status.voters, before[&id].voters);
    }
    let leader = cluster.leader().await;
    let raft = &cluster.member(leader).raft;
    // openraft 0.9 lets a leader whose own vote was committed resume in its term after a
    // restart; anyone else needs a new term. Either way, one leader per term.
    let old_leader = before
        .values()
        .find_map(|s| s.leader.as_ref().map(|(id, _)| *id))
        .unwrap();
    let old_term = before[&leader].term;
    eprintln!(
        "after restart: leader {leader} in term {} (before: leader {old_leader} in term {old_term})",
        raft.term()
    );
    assert!(
        raft.term() > old_term || (raft.term() == old_term && leader == old_leader),
        "a new term after restart, unless the same leader resumed its own"
    );
    let applied = raft.propose(EcsCommand::SetRing(ring(4))).await.unwrap();
    assert!(applied.index > before[&leader].last_log_index.unwrap());
    assert!(matches!(
        raft.propose(EcsCommand::SetRing(ring(3))).await,
        Err(RaftError::Refused(Refusal::StaleRing { .. }))
    ));
    cluster
        .all_applied(|s| s.ring == ring(4) && s.log == intent_log(4))
        .await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_member_is_added_as_learner_then_voter_and_another_removed() {
    let _serial = SERIAL.lock().await;
    // Snapshots every few entries, so the new member catches up from a snapshot.
    let tune = |config: &mut RaftConfig| config.snapshot_every = 3;
    let mut cluster = Cluster::start_with(3, tune).await;
    let leader = cluster.leader().await;
    for version in 1..=8 {
        cluster
            .member(leader)
            .raft
            .propose(EcsCommand::SetRing(ring(version)))
            .await
            .unwrap();
    }
    cluster.all_applied(|s| s.ring.version == 8).await;

    cluster.start_member(4, tune).await;
    let fourth = Member::new(cluster.addrs[&4].to_string(), "ecs4");
    let started = Instant::now();
    cluster
        .member(leader)
        .raft
        .add_member(4, fourth.clone())
        .await
        .unwrap();
    eprintln!(
        "membership change: member 4 added as learner, then voter, in {:?}",
        started.elapsed()
    );
    let status = cluster.member(leader).status();
    assert_eq!(status.voters, [1, 2, 3, 4].into());
    assert_eq!(status.members[&4], fourth);
    assert!(!status.joint);
    // The new member holds the state (from the snapshot) and applies what follows.
    cluster
        .member(leader)
        .raft
        .propose(EcsCommand::SetRing(ring(9)))
        .await
        .unwrap();
    cluster.all_applied(|s| s.ring.version == 9).await;
    assert!(cluster.member(4).status().voters.contains(&4));
    // It caught up from a snapshot: the log it would have needed was already purged.
    let fourth_metrics = cluster.member(4).raft.metrics().borrow().clone();
    assert!(fourth_metrics.snapshot.is_some(), "{fourth_metrics:?}");
    assert!(cluster
        .member(leader)
        .raft
        .metrics()
        .borrow()
        .purged
        .is_some());

    let removed = cluster.follower(leader);
    let started = Instant::now();
    cluster
        .member(leader)
        .raft
        .remove_member(removed)
        .await
        .unwrap();
    eprintln!(
        "membership change: member {removed} removed in {:?}",
        started.elapsed()
    );
    let status = cluster.member(leader).status();
    assert_eq!(status.voters.len(), 3);
    assert!(!status.members.contains_key(&removed));
    cluster.stop_member(removed).await;
    // Three voters left: one may stop and the others still commit.
    cluster
        .member(leader)
        .raft
        .propose(EcsCommand::SetRing(ring(10)))
        .await
        .unwrap();
    cluster.all_applied(|s| s.ring.version == 10).await;
    cluster.stop().await;
}

/// `message` as the Raft RPC `kind` the network sends.
fn raft_rpc(kind: RaftRpcKind, message: &impl serde::Serialize) -> AdminRequest {
    AdminRequest::Raft(RaftRpc {
        kind,
        payload: postcard::to_stdvec(message).unwrap(),
    })
}

/// A vote request as member `candidate` would send it, in `term`.
fn vote_rpc(candidate: MemberId, term: u64) -> AdminRequest {
    let vote = openraft::raft::VoteRequest::new(Vote::new(term, candidate), None);
    raft_rpc(RaftRpcKind::Vote, &vote)
}

#[tokio::test]
async fn raft_messages_are_taken_only_from_ecs_certificates() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(1).await;
    let leader = cluster.leader().await;
    let term = cluster.member(leader).raft.term();
    let addr = cluster.addrs[&leader].to_string();
    let timeout = Duration::from_secs(5);
    // A vote in a much higher term would depose the leader, were it taken.
    let request = vote_rpc(2, term + 100);

    // An operator: admitted to the endpoint, refused per message.
    let admin = cluster.certs.client("admin");
    match admin.call::<_, AdminReply>(&addr, &request, timeout).await {
        Ok(AdminReply::Error(m)) => assert!(m.contains("only from ecs certificates"), "{m}"),
        other => panic!("an admin's Raft message: {other:?}"),
    }
    // A node: not even connected.
    let node = cluster.certs.client("n1");
    let refused = node
        .call::<_, AdminReply>(&addr, &request, timeout)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("does not admit node certificates"),
        "{refused}"
    );
    // Neither reached Raft.
    assert_eq!(cluster.member(leader).raft.term(), term);
    assert!(cluster.member(leader).raft.is_leader());

    // The handler refuses every role but ecs by itself, too.
    let service = cluster.member(leader).raft.service();
    for role in [Role::Client, Role::Node, Role::Admin] {
        let peer = PeerIdentity {
            role,
            name: "x".into(),
        };
        let AdminRequest::Raft(rpc) = vote_rpc(2, term + 100) else {
            unreachable!()
        };
        assert!(matches!(
            service.handle(&peer, rpc).await,
            AdminReply::Error(_)
        ));
    }

    // An ecs certificate may not speak for another member...
    let ecs2 = cluster.certs.client("ecs2");
    match ecs2
        .call::<_, AdminReply>(&addr, &vote_rpc(leader, term + 100), timeout)
        .await
    {
        Ok(AdminReply::Error(m)) => assert!(m.contains("must come from certificate ecs1"), "{m}"),
        other => panic!("ecs2 speaking for member 1: {other:?}"),
    }
    // ...nor send an operator request to the Raft endpoint, nor garbage.
    match ecs2
        .call::<_, AdminReply>(&addr, &AdminRequest::Ring, timeout)
        .await
    {
        Ok(AdminReply::Error(m)) => assert!(m.contains("serves only Raft messages"), "{m}"),
        other => panic!("an operator request from ecs2: {other:?}"),
    }
    let garbage = AdminRequest::Raft(RaftRpc {
        kind: RaftRpcKind::AppendEntries,
        payload: vec![0xff; 16],
    });
    match ecs2.call::<_, AdminReply>(&addr, &garbage, timeout).await {
        Ok(AdminReply::Error(m)) => assert!(m.contains("malformed"), "{m}"),
        other => panic!("a malformed append: {other:?}"),
    }
    // Nor, naming no member of this one-member group, send anything in its own name.
    match ecs2
        .call::<_, AdminReply>(&addr, &vote_rpc(2, 0), timeout)
        .await
    {
        Ok(AdminReply::Error(m)) => assert!(m.contains("not in the membership"), "{m}"),
        other => panic!("a vote from ecs2, no member: {other:?}"),
    }
    assert_eq!(cluster.member(leader).raft.term(), term);
    admin.close().await;
    node.close().await;
    ecs2.close().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_minority_cannot_commit() {
    let _serial = SERIAL.lock().await;
    let propose_timeout = Duration::from_secs(1);
    let mut cluster =
        Cluster::start_with(3, |config| config.propose_timeout = propose_timeout).await;
    let leader = cluster.leader().await;
    cluster
        .member(leader)
        .raft
        .propose(EcsCommand::SetRing(ring(1)))
        .await
        .unwrap();
    cluster.all_applied(|s| s.ring.version == 1).await;
    // Keep the leader, stop the two others: it still believes it leads, but cannot commit.
    for id in [1, 2, 3].into_iter().filter(|id| *id != leader) {
        cluster.stop_member(id).await;
    }
    let raft = &cluster.member(leader).raft;
    let started = Instant::now();
    let result = raft.propose(EcsCommand::SetRing(ring(2))).await;
    let took = started.elapsed();
    eprintln!("a proposal to a minority: {result:?} after {took:?}");
    assert!(
        matches!(
            result,
            Err(RaftError::Timeout(_)) | Err(RaftError::ForwardToLeader { .. })
        ),
        "{result:?}"
    );
    assert!(
        took < propose_timeout + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(raft.state().ring.version, 1, "nothing applied");
    // Nor can it confirm its leadership.
    assert!(raft.ensure_leader().await.is_err());
    cluster.stop().await;
}

#[tokio::test]
async fn a_member_starts_only_with_its_own_ecs_certificate() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addrs(1)[0];
    let members = BTreeMap::from([(1, Member::new(addr.to_string(), "ecs1"))]);
    let endpoint = server::bind(
        addr,
        &certs.identity("ecs1"),
        dir.path(),
        ServeLimits::default(),
    )
    .unwrap();
    for (name, why) in [
        ("admin", "needs an ecs certificate"),
        ("ecs2", "its certificate is ecs2"),
    ] {
        let config = RaftConfig::new(1, members.clone(), dir.path());
        match EcsRaft::start(config, &certs.identity(name), endpoint.clone()).await {
            Err(RaftError::Config(m)) => assert!(m.contains(why), "{name}: {m}"),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: started"),
        }
    }
    endpoint.close(0u32.into(), b"done");
}

/// An append as a leader `leader` would send it in `term`: no entries, nothing committed.
fn append_rpc(leader: MemberId, term: u64) -> AdminRequest {
    let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    raft_rpc(RaftRpcKind::AppendEntries, &append)
}

/// A vote request from `candidate` in `term` whose log looks longer than anyone's, so only
/// the sender check and the term bound can turn it down before Raft would grant it.
fn long_log_vote_rpc(candidate: MemberId, term: u64) -> AdminRequest {
    let last = openraft::LogId::new(openraft::CommittedLeaderId::new(term, candidate), u64::MAX);
    let vote = openraft::raft::VoteRequest::new(Vote::new(term, candidate), Some(last));
    raft_rpc(RaftRpcKind::Vote, &vote)
}

/// Issue #21: an `ecs` certificate issued by the cluster CA but naming no member (a spare, or
/// a removed member's) sends votes and appends in terms 2^62 and `u64::MAX` to every member
/// of a running group, in its own name and in a member's. Each is refused before it reaches
/// Raft, so no term moves (were one taken, the group's and every fenced node's term would
/// jump, and at `u64::MAX` openraft's `term + 1` overflows at the next election, on every
/// member, again after a restart). A member's own certificate is refused such terms too (the
/// bound on how far ahead a term may be), and a member waiting to be added takes no vote.
/// The group still commits afterwards.
#[tokio::test]
async fn a_non_member_ecs_certificate_and_absurd_terms_cannot_move_the_groups_term() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await;
    cluster.certs.issue(Role::Ecs, "spare");
    let leader = cluster.leader().await;
    cluster
        .member(leader)
        .raft
        .propose(EcsCommand::SetRing(ring(1)))
        .await
        .unwrap();
    cluster.all_applied(|s| s.ring.version == 1).await;
    let before: BTreeMap<MemberId, u64> = cluster
        .running
        .iter()
        .map(|(id, m)| (*id, m.raft.term()))
        .collect();
    let timeout = Duration::from_secs(5);
    let spare = cluster.certs.client("spare");
    let ecs2 = cluster.certs.client("ecs2");
    // Every message that was not refused, with where it went and the reply.
    let mut taken = Vec::new();
    // A modest term first (taken, it would depose the leader), then absurd ones.
    let modest = before.values().max().unwrap() + 5;
    for term in [modest, 1u64 << 62, u64::MAX] {
        for id in 1..=3 {
            let addr = cluster.addrs[&id].to_string();
            let hostile = [
                ("spare as 9", &spare, vote_rpc(9, term)),
                ("spare as 9", &spare, long_log_vote_rpc(9, term)),
                ("spare as 9", &spare, append_rpc(9, term)),
                ("spare as leader", &spare, append_rpc(leader, term)),
                ("ecs2 as 2", &ecs2, long_log_vote_rpc(2, term)),
                ("ecs2 as 2", &ecs2, append_rpc(2, term)),
            ];
            // A member's certificate may move the term within the bound: it is trusted.
            let hostile = hostile
                .into_iter()
                .filter(|(who, _, _)| term != modest || who.starts_with("spare"));
            for (who, transport, request) in hostile {
                match transport
                    .call::<_, AdminReply>(&addr, &request, timeout)
                    .await
                {
                    Ok(AdminReply::Error(m)) => eprintln!("refused ({who}, term {term}): {m}"),
                    other => taken.push(format!("{who}, term {term}, to {id}: {other:?}")),
                }
            }
        }
    }
    // A member waiting to be added (empty membership) takes no vote, from anyone.
    cluster.start_member(4, |_| {}).await;
    let addr4 = cluster.addrs[&4].to_string();
    for (who, transport, request) in [
        ("spare as 9", &spare, long_log_vote_rpc(9, 5)),
        ("ecs2 as 2", &ecs2, long_log_vote_rpc(2, 5)),
    ] {
        match transport
            .call::<_, AdminReply>(&addr4, &request, timeout)
            .await
        {
            Ok(AdminReply::Error(m)) => eprintln!("refused by the new member ({who}): {m}"),
            other => taken.push(format!("{who}, to new member 4: {other:?}")),
        }
    }
    // Several election timeouts: a member that took a term would have stood by now (and
    // with `u64::MAX`, panicked).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: BTreeMap<MemberId, (u64, ServerState)> = cluster
        .running
        .iter()
        .map(|(id, m)| (*id, (m.raft.term(), m.status().state)))
        .collect();
    assert!(
        taken.is_empty(),
        "hostile messages taken: {taken:#?}; terms now {after:?}"
    );
    for id in 1..=3 {
        let (term, state) = after[&id];
        assert_ne!(state, ServerState::Shutdown, "member {id} stopped");
        // Unchanged unless this loaded machine held a real election meanwhile; never near
        // the hostile terms.
        assert!(
            term < before[&id] + 10,
            "member {id}: term {term}, before {}",
            before[&id]
        );
    }
    assert_eq!(after[&4].0, 0, "the new member's term");
    cluster.stop_member(4).await;
    let leader = cluster.leader().await;
    let applied = cluster
        .member(leader)
        .raft
        .propose(EcsCommand::SetRing(ring(2)))
        .await
        .unwrap();
    assert_eq!(applied.ring_version, 2);
    for id in 1..=3 {
        let mut states = cluster.member(id).raft.subscribe();
        tokio::time::timeout(
            Duration::from_secs(5),
            states.wait_for(|s| s.ring.version == 2),
        )
        .await
        .unwrap()
        .unwrap();
    }
    spare.close().await;
    ecs2.close().await;
    cluster.stop().await;
}

/// The decision alone ([`server::admit`]): who may send what, at which term.
#[test]
fn admit_takes_members_in_their_own_name_within_the_term_bound() {
    use std::collections::BTreeSet;

    use openraft::Membership;

    let ecs = |name: &str| PeerIdentity {
        role: Role::Ecs,
        name: name.into(),
    };
    let members = BTreeMap::from([
        (1, Member::new("h:1", "ecs1")),
        (2, Member::new("h:2", "ecs2")),
        (4, Member::new("h:4", "ecs4")),
    ]);
    // Voters 1 and 2, learner 4.
    let known = Membership::new(vec![BTreeSet::from([1, 2])], members);
    let pristine = Membership::<MemberId, Member>::default();
    let (vote, append) = (RaftRpcKind::Vote, RaftRpcKind::AppendEntries);
    let at = |term, id| Vote::new(term, id);
    let current = 7;

    assert_eq!(
        server::admit(&ecs("ecs1"), vote, &at(8, 1), &known, current),
        Ok(())
    );
    assert_eq!(
        server::admit(&ecs("ecs4"), append, &at(8, 4), &known, current),
        Ok(())
    );
    assert!(matches!(
        server::admit(&ecs("ecs2"), vote, &at(8, 1), &known, current),
        Err(RpcRefusal::NotTheSender { id: 1, .. })
    ));
    // A spare (or removed) certificate, in its own name or a member's.
    for id in [3, 9, 1] {
        assert!(server::admit(&ecs("spare"), append, &at(8, id), &known, current).is_err());
    }
    assert!(matches!(
        server::admit(&ecs("ecs1"), vote, &at(8, 3), &known, current),
        Err(RpcRefusal::NotAMember { id: Some(3), .. })
    ));
    // Other roles.
    let admin = PeerIdentity {
        role: Role::Admin,
        name: "ecs1".into(),
    };
    assert!(matches!(
        server::admit(&admin, vote, &at(8, 1), &known, current),
        Err(RpcRefusal::NotEcs { .. })
    ));
    // The term bound, from a member too.
    let highest = current + MAX_TERM_LEAP;
    assert_eq!(
        server::admit(&ecs("ecs1"), append, &at(highest, 1), &known, current),
        Ok(())
    );
    for term in [highest + 1, 1 << 62, u64::MAX] {
        assert!(matches!(
            server::admit(&ecs("ecs1"), append, &at(term, 1), &known, current),
            Err(RpcRefusal::TermTooFar { .. })
        ));
    }
    assert!(matches!(
        server::admit(&ecs("ecs1"), vote, &at(MAX_TERM + 1, 1), &known, MAX_TERM),
        Err(RpcRefusal::TermTooFar { .. })
    ));
    // A member waiting to be added takes appends and snapshots from any ecs certificate
    // (it cannot tell the leader yet), but no vote.
    assert_eq!(
        server::admit(&ecs("spare"), append, &at(8, 9), &pristine, 0),
        Ok(())
    );
    assert_eq!(
        server::admit(
            &ecs("ecs1"),
            RaftRpcKind::InstallSnapshot,
            &at(8, 1),
            &pristine,
            0
        ),
        Ok(())
    );
    assert!(matches!(
        server::admit(&ecs("ecs1"), vote, &at(8, 1), &pristine, 0),
        Err(RpcRefusal::NoMembershipYet { .. })
    ));
    assert!(matches!(
        server::admit(&ecs("ecs1"), append, &at(1 << 62, 1), &pristine, 0),
        Err(RpcRefusal::TermTooFar { .. })
    ));
}
