//! [`EcsRaft`]: one started Raft member of a replicated ECS, and its configuration.
//!
//! Starting and initialisation. Every founding member is started with the same founding
//! membership ([`RaftConfig::members`]) and initialises the group with it if its own store is
//! pristine; openraft documents that initialising several members with the same membership
//! is safe (they all write the same first entry), so no member has to be "the first". A
//! member that finds anything in its store (a vote, a log) has been initialised or has heard
//! from the group: it does not initialise again, so a restart never does. A member added
//! later is started with no founding membership and waits until the leader adds it
//! ([`EcsRaft::add_member`]).
//!
//! Leadership. A member knows it leads only until it hears of a higher term; a leader cut
//! off from the majority does not learn that it was replaced. Before acting as the leader
//! (publishing a ring, driving a change), call [`EcsRaft::ensure_leader`], which confirms the
//! leadership with a majority, and stamp what is published with the term it returns: nodes
//! can then refuse anything of an older term. A proposal cannot be committed by a deposed
//! leader at all: it fails with [`RaftError::ForwardToLeader`] or times out. Watch
//! [`EcsRaft::metrics`] to learn at once that this member stopped leading. A leader whose own
//! vote was committed resumes leadership in the same term after a restart (openraft 0.9),
//! which keeps "one leader per term" true: a term still names exactly one leader.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError,
    RaftError as OpenRaftError,
};
use openraft::raft::ClientWriteResponse;
use openraft::{ChangeMembers, RaftMetrics, ServerState, SnapshotPolicy};
use quinn::Endpoint;
use ringkv_certs::{Identity, Role};
use ringkv_transport::Transport;
use ringkv_wire::Limits;
use tokio::sync::watch;

use super::network::{Network, FRAME_OVERHEAD};
use super::store::{LogStore, StateMachine, Store, StoreClosed};
use super::{
    EcsCommand, EcsResponse, EcsState, Member, MemberId, Raft, RaftError, RaftService, TypeConfig,
};

/// Default interval between a leader's heartbeats: a tenth of a second, so a LAN member
/// learns of a new leader (or of the same one) several times per election timeout.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(100);
/// Default shortest election timeout: three heartbeats, so one or two lost heartbeats do not
/// start an election.
pub const DEFAULT_ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(300);
/// Default longest election timeout. openraft 0.9 draws each member's timeout once (per
/// process) uniformly between the two, so that members rarely stand together and split the
/// vote; a follower that knows a leader also waits out a leader lease of this long first. A
/// failover therefore takes about this plus the drawn timeout (about 1–1.3 s by default,
/// ARCHITECTURE.md §12).
pub const DEFAULT_ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(600);
/// Default bound on a proposal, a leadership check or a membership change step.
pub const DEFAULT_PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of applied entries between snapshots (the log is then cut, keeping as many
/// entries again for members a little behind).
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 1000;

/// Most entries in one append: an entry may carry a whole ring, and an append must fit a frame
/// (a larger one is split, [`super::network`]).
const MAX_ENTRIES_PER_APPEND: u64 = 64;
/// Size of a snapshot chunk: well inside a frame.
const SNAPSHOT_CHUNK: u64 = 1024 * 1024;
/// Bound on sending and installing one snapshot chunk.
const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(2);
/// Room an append needs around one entry's command (the vote, the log ids, the tags).
const APPEND_OVERHEAD: usize = 1024;
/// How long [`EcsRaft::shutdown`] waits for openraft's tasks and the requests under way to let
/// go of the store and the transport.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a member runs.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This member's id.
    pub id: MemberId,
    /// The founding membership, identical on every founding member (each initialises the
    /// group with it if its store is pristine). Empty on a member that is to be added later
    /// with [`EcsRaft::add_member`], and ignored once the store holds anything.
    pub members: BTreeMap<MemberId, Member>,
    /// The ECS state directory; the Raft store lives in its `raft` subdirectory.
    pub state_dir: PathBuf,
    /// Interval between the leader's heartbeats; also openraft's bound on one append.
    pub heartbeat: Duration,
    /// Shortest time without a heartbeat before a follower stands for election. Above the
    /// heartbeat (three times it by default); each timeout is drawn between this and
    /// `election_timeout_max`.
    pub election_timeout_min: Duration,
    /// Longest such time; also the leader lease a follower that knows a leader waits out
    /// first (openraft 0.9).
    pub election_timeout_max: Duration,
    /// Bound on [`EcsRaft::propose`], [`EcsRaft::ensure_leader`] and each step of a
    /// membership change.
    pub propose_timeout: Duration,
    /// Applied entries between snapshots.
    pub snapshot_every: u64,
}

impl RaftConfig {
    /// A configuration with the default timings ([`DEFAULT_HEARTBEAT`],
    /// [`DEFAULT_ELECTION_TIMEOUT_MIN`]..[`DEFAULT_ELECTION_TIMEOUT_MAX`],
    /// [`DEFAULT_PROPOSE_TIMEOUT`], [`DEFAULT_SNAPSHOT_EVERY`]).
    pub fn new(
        id: MemberId,
        members: BTreeMap<MemberId, Member>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            id,
            members,
            state_dir: state_dir.into(),
            heartbeat: DEFAULT_HEARTBEAT,
            election_timeout_min: DEFAULT_ELECTION_TIMEOUT_MIN,
            election_timeout_max: DEFAULT_ELECTION_TIMEOUT_MAX,
            propose_timeout: DEFAULT_PROPOSE_TIMEOUT,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
        }
    }

    /// openraft's configuration, validated.
    fn openraft_config(&self) -> Result<Arc<openraft::Config>, RaftError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = openraft::Config {
            cluster_name: "ringkv-ecs".into(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(SNAPSHOT_CHUNK_TIMEOUT),
            max_payload_entries: MAX_ENTRIES_PER_APPEND,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: self.snapshot_every,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK,
            ..Default::default()
        };
        config
            .validate()
            .map(Arc::new)
            .map_err(|e| RaftError::Config(e.to_string()))
    }
}

/// A committed and applied command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Its log index.
    pub index: u64,
    /// The term of the leader that committed it: every command committed by one leader has
    /// its term, and a later leader's commands have a higher one.
    pub term: u64,
    /// The ring version after it.
    pub ring_version: u64,
}

/// A leadership confirmed by a majority ([`EcsRaft::ensure_leader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderTerm {
    /// The term in which this member leads: the fencing token for what it publishes.
    pub term: u64,
    /// The log index the state seen after the check includes (at least every entry
    /// committed before the check began).
    pub read_index: Option<u64>,
}

/// A member's view of the group, from openraft's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    /// This member.
    pub id: MemberId,
    /// The current term.
    pub term: u64,
    /// Leader, follower, candidate, learner, or shut down.
    pub state: ServerState,
    /// The leader this member knows of.
    pub leader: Option<(MemberId, Member)>,
    /// Index of the last entry in this member's log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to this member's state (every applied entry was
    /// committed).
    pub last_applied: Option<u64>,
    /// The voting members (both halves of a joint configuration during a change).
    pub voters: BTreeSet<MemberId>,
    /// Members that receive the log but do not vote.
    pub learners: BTreeSet<MemberId>,
    /// How to reach every member.
    pub members: BTreeMap<MemberId, Member>,
    /// Whether a membership change is half way (joint configuration).
    pub joint: bool,
    /// On a leader, milliseconds since a majority last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
}

impl RaftStatus {
    /// The status in openraft's `metrics`.
    pub fn from_metrics(metrics: &RaftMetrics<MemberId, Member>) -> Self {
        let membership = metrics.membership_config.membership();
        let members: BTreeMap<MemberId, Member> = membership
            .nodes()
            .map(|(id, member)| (*id, member.clone()))
            .collect();
        let voters: BTreeSet<MemberId> = membership.voter_ids().collect();
        Self {
            id: metrics.id,
            term: metrics.current_term,
            state: metrics.state,
            leader: metrics
                .current_leader
                .and_then(|id| members.get(&id).map(|m| (id, m.clone()))),
            last_log_index: metrics.last_log_index,
            last_applied: metrics.last_applied.map(|l| l.index),
            learners: membership.learner_ids().collect(),
            voters,
            joint: membership.get_joint_config().len() > 1,
            millis_since_quorum_ack: metrics.millis_since_quorum_ack,
            members,
        }
    }
}

/// One started Raft member: the handle the ECS service uses.
pub struct EcsRaft {
    id: MemberId,
    raft: Raft,
    transport: Arc<Transport>,
    state: watch::Receiver<Arc<EcsState>>,
    propose_timeout: Duration,
    /// How long a confirmation of the lead lets the leader act ([`crate::leadership`]).
    act_for: Duration,
    store_closed: StoreClosed,
}

impl EcsRaft {
    /// Opens the member's store in `config.state_dir`, starts openraft, and initialises the
    /// group if this is a founding member with a pristine store (module documentation).
    /// `identity` must be an `ecs` certificate with the name the membership gives this member:
    /// the member sends its Raft messages with it through `endpoint`, which must also serve
    /// this member's [`EcsRaft::service`] (the ECS service, or a [`super::RaftServer`]) at the
    /// address the membership gives for it.
    pub async fn start(
        config: RaftConfig,
        identity: &Identity,
        endpoint: Endpoint,
    ) -> Result<Self, RaftError> {
        let role = identity.role()?;
        if role != Role::Ecs {
            return Err(RaftError::Config(format!(
                "a Raft member needs an ecs certificate, not a {role} one"
            )));
        }
        // Peers take this member's messages only from the certificate its membership names.
        let name = identity.name()?;
        if let Some(me) = config.members.get(&config.id) {
            if me.name != name {
                return Err(RaftError::Config(format!(
                    "member {} is {me} in the founding membership, but its certificate is {name}",
                    config.id
                )));
            }
        }
        let raft_config = config.openraft_config()?;
        let act_for = crate::leadership::act_for(config.heartbeat, config.election_timeout_max)
            .ok_or_else(|| {
                RaftError::Config("the heartbeat must be below the election timeout".into())
            })?;
        let store = Store::open(&config.state_dir)?;
        let store_closed = store.closed();
        let (state_machine, state) = StateMachine::open(store.clone())?;
        let transport = Arc::new(Transport::new(
            endpoint,
            ringkv_certs::client_config(identity)?,
            Limits::default(),
            config.election_timeout_max,
            config.propose_timeout,
        ));
        let raft = Raft::new(
            config.id,
            raft_config,
            Network::new(transport.clone()),
            LogStore::new(store),
            state_machine,
        )
        .await
        .map_err(|e| RaftError::Stopped(e.to_string()))?;
        let member = Self {
            id: config.id,
            raft,
            transport,
            state,
            propose_timeout: config.propose_timeout,
            act_for,
            store_closed,
        };
        member.initialize(&config.members).await?;
        Ok(member)
    }

    /// Initialises the group with `members` if this member is one of them and its store is
    /// pristine.
    async fn initialize(&self, members: &BTreeMap<MemberId, Member>) -> Result<(), RaftError> {
        if !members.contains_key(&self.id) {
            tracing::info!(
                member = self.id,
                "not a founding member: waiting to be added"
            );
            return Ok(());
        }
        let stopped = |e: &dyn std::fmt::Display| RaftError::Stopped(e.to_string());
        if self.raft.is_initialized().await.map_err(|e| stopped(&e))? {
            tracing::info!(member = self.id, "Raft store holds state: not initialising");
            return Ok(());
        }
        match self.raft.initialize(members.clone()).await {
            Ok(()) => {
                tracing::info!(member = self.id, members = ?members.keys(), "initialised the Raft group");
                Ok(())
            }
            // Another founding member's messages got here first: initialised meanwhile.
            Err(OpenRaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(OpenRaftError::APIError(e @ InitializeError::NotInMembers(_))) => {
                Err(RaftError::Config(e.to_string()))
            }
            Err(OpenRaftError::Fatal(e)) => Err(stopped(&e)),
        }
    }

    /// This member's id.
    pub fn id(&self) -> MemberId {
        self.id
    }

    /// The answers to other members' Raft messages, for the service that owns the endpoint.
    pub fn service(&self) -> RaftService {
        RaftService::new(self.raft.clone())
    }

    /// openraft's handle, for what this one does not offer (e.g. `trigger().snapshot()`).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Proposes `command` (leader only) and waits, up to the proposal timeout, until a
    /// majority stored it and this member applied it.
    ///
    /// Errors: [`RaftError::ForwardToLeader`] on any member but the leader (nothing
    /// proposed); [`RaftError::Refused`] if the state machine refused it (state unchanged);
    /// [`RaftError::Timeout`] if it did not commit in time (outcome unknown);
    /// [`RaftError::TooLarge`] if it cannot fit one Raft message.
    pub async fn propose(&self, command: EcsCommand) -> Result<Applied, RaftError> {
        let bytes = postcard::to_stdvec(&command).map_or(usize::MAX, |b| b.len());
        let max = max_command_bytes();
        if bytes > max {
            return Err(RaftError::TooLarge { bytes, max });
        }
        let response: ClientWriteResponse<TypeConfig> = self
            .bounded(self.raft.client_write(command))
            .await?
            .map_err(|e| self.write_error(e))?;
        match response.data {
            EcsResponse::Applied { ring_version } => Ok(Applied {
                index: response.log_id.index,
                term: response.log_id.leader_id.term,
                ring_version,
            }),
            EcsResponse::Refused(refusal) => Err(RaftError::Refused(refusal)),
        }
    }

    /// The state as this member last applied it. On a follower it may lag the leader's by
    /// the entries not yet applied here.
    pub fn state(&self) -> Arc<EcsState> {
        self.state.borrow().clone()
    }

    /// A receiver of every state this member applies (for `changed()` / `wait_for`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<EcsState>> {
        self.state.clone()
    }

    /// The leader this member knows of, and how to reach it.
    pub fn leader(&self) -> Option<(MemberId, Member)> {
        self.status().leader
    }

    /// How long a confirmation of the lead ([`EcsRaft::ensure_leader`]) lets the leader act,
    /// counted from the start of the round: derived from the Raft timings
    /// ([`crate::leadership::act_for`]).
    pub fn act_for(&self) -> Duration {
        self.act_for
    }

    /// Whether this member believes it leads. Only a belief: see [`EcsRaft::ensure_leader`].
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The current term (on the leader, the term it leads in).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// This member's view of the group now.
    pub fn status(&self) -> RaftStatus {
        RaftStatus::from_metrics(&self.raft.metrics().borrow())
    }

    /// openraft's metrics, updated on every change of term, leader, log or membership
    /// ([`RaftStatus::from_metrics`] reads them): to notice at once that this member lost
    /// the leadership, for instance.
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics<MemberId, Member>> {
        self.raft.metrics()
    }

    /// Waits up to `timeout` until this member knows a leader; the leader, if so.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<(MemberId, Member)> {
        let mut metrics = self.raft.metrics();
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(leader) = RaftStatus::from_metrics(&metrics.borrow_and_update()).leader
                {
                    return Some(leader);
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        found.ok().flatten()
    }

    /// Confirms with a majority that this member still leads (openraft's
    /// `ensure_linearizable`: a round of heartbeats, then waiting until the state includes
    /// every entry committed before), and returns the term it leads in. A deposed leader gets
    /// [`RaftError::ForwardToLeader`] or [`RaftError::NoQuorum`], and must not act.
    pub async fn ensure_leader(&self) -> Result<LeaderTerm, RaftError> {
        let before = self.raft.metrics().borrow().vote;
        let checked = self.bounded(self.raft.ensure_linearizable()).await?;
        let read = match checked {
            Ok(read) => read,
            Err(OpenRaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                return Err(self.forward(f))
            }
            Err(OpenRaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                return Err(RaftError::NoQuorum(q.to_string()))
            }
            Err(OpenRaftError::Fatal(e)) => return Err(RaftError::Stopped(e.to_string())),
        };
        // The confirmation holds for the vote it ran under: the same before and after, and
        // this member's own, committed by a majority.
        let after = self.raft.metrics().borrow().vote;
        if before != after
            || !after.is_committed()
            || after.leader_id().voted_for() != Some(self.id)
        {
            return Err(RaftError::ForwardToLeader {
                leader: self.leader(),
            });
        }
        Ok(LeaderTerm {
            term: after.leader_id().term,
            read_index: read.map(|l| l.index),
        })
    }

    /// Adds a member (leader only): first as a learner, waiting until it has caught up with
    /// the log, then as a voter (a joint-consensus change). Each step is bounded by the
    /// proposal timeout; after a timeout the member may be a learner already, and calling
    /// this again finishes the job.
    pub async fn add_member(&self, id: MemberId, member: Member) -> Result<(), RaftError> {
        self.bounded(self.raft.add_learner(id, member, true))
            .await?
            .map_err(|e| self.write_error(e))?;
        let voters = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        self.bounded(self.raft.change_membership(voters, false))
            .await?
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Removes a member (leader only), voter or learner. Removing the leader itself is
    /// allowed: it steps down once the change is committed, and the others elect a new one.
    pub async fn remove_member(&self, id: MemberId) -> Result<(), RaftError> {
        let ids = BTreeSet::from([id]);
        let change = if self.status().voters.contains(&id) {
            ChangeMembers::RemoveVoters(ids)
        } else {
            ChangeMembers::RemoveNodes(ids)
        };
        self.bounded(self.raft.change_membership(change, false))
            .await?
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Stops the member: openraft's tasks end, the requests under way end, its connections
    /// close, and its store is closed when this returns (so the state directory can be opened
    /// again). The endpoint belongs to the caller and stays open.
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| RaftError::Stopped(e.to_string()))?;
        // Requests openraft gave up on may still be under way (network module documentation);
        // they end within their own bounds.
        let deadline = tokio::time::Instant::now() + STORE_CLOSE_TIMEOUT;
        while Arc::strong_count(&self.transport) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.transport.close().await;
        if !self.store_closed.wait(STORE_CLOSE_TIMEOUT).await {
            tracing::warn!(
                member = self.id,
                "the Raft store is still open after shutdown"
            );
        }
        Ok(())
    }

    /// `future`, bounded by the proposal timeout.
    async fn bounded<T>(&self, future: impl Future<Output = T>) -> Result<T, RaftError> {
        tokio::time::timeout(self.propose_timeout, future)
            .await
            .map_err(|_| RaftError::Timeout(self.propose_timeout))
    }

    /// Our error for a failed write (proposal or membership change).
    fn write_error(
        &self,
        e: OpenRaftError<MemberId, ClientWriteError<MemberId, Member>>,
    ) -> RaftError {
        match e {
            OpenRaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.forward(f),
            OpenRaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                RaftError::Membership(e.to_string())
            }
            OpenRaftError::Fatal(e) => RaftError::Stopped(e.to_string()),
        }
    }

    /// [`RaftError::ForwardToLeader`] naming the leader openraft named, looked up in the
    /// membership if openraft gave only its id.
    fn forward(&self, f: ForwardToLeader<MemberId, Member>) -> RaftError {
        let known = self.status().members;
        let leader = f.leader_id.and_then(|id| {
            f.leader_node
                .or_else(|| known.get(&id).cloned())
                .map(|member| (id, member))
        });
        RaftError::ForwardToLeader { leader }
    }
}

/// The largest command [`EcsRaft::propose`] takes: one that fits, with its log entry, in one
/// append message.
pub fn max_command_bytes() -> usize {
    Limits::default().max_frame - FRAME_OVERHEAD - APPEND_OVERHEAD
}
