//! The ECS service: answers operators' [`AdminRequest`]s and runs membership plans against
//! the nodes.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use quinn::Endpoint;
use ringkv_certs::{Identity, PeerIdentity, Role};
use ringkv_transport::{RingSigner, ServeLimits, Service};
use ringkv_transport::{Transport, TransportError};
use ringkv_wire::{
    AdminReply, AdminRequest, GroupMember, GroupReport, KeyRange, Limits, Liveness, MoveId,
    MoveReport, NodeEntry, NodeReport, NodeStatus, Position, RangeReport, Reply, ReplyBody,
    Request, RequestBody, RingMetadata, WireError,
};

use crate::executor::{Action, Executor, Intent, Outcome, Phase};
use crate::leadership::LeadGate;
use crate::liveness::{Detector, FailoverDecision, Probes};
use crate::plan::{self, Plan, Step};
use crate::raft::{EcsCommand, EcsRaft, Member, RaftError};
use crate::state::{IntentFile, IntentLog, RingFile};
use crate::{EcsConfig, EcsError};

/// The External Configuration Service: a single process, or one member of a replicated
/// group (ARCHITECTURE.md §12).
///
/// Invariant: at most one membership change runs at a time (`change` is held for its whole
/// duration), and `metadata` only ever moves to a higher version, after it was persisted
/// (in a group: committed by a majority). In a group only the leader acts: it answers
/// operators, probes and leases nodes, fails them over and drives changes; the others
/// answer `NotLeader` and wait.
pub struct Ecs {
    config: EcsConfig,
    nodes: Transport,
    /// Signs every metadata version the ECS sends (ARCHITECTURE.md §4).
    signer: RingSigner,
    file: RingFile,
    metadata: RwLock<RingMetadata>,
    change: tokio::sync::Mutex<()>,
    intents: IntentFile,
    /// The intent log as persisted.
    log: std::sync::Mutex<IntentLog>,
    /// When each node last answered a liveness probe.
    probes: std::sync::Mutex<Probes>,
    /// Requests changes skipped for nodes that were silent, by node name, sent when the
    /// node answers again ([`Ecs::pay_owed`]).
    owed: std::sync::Mutex<std::collections::HashMap<String, Vec<RequestBody>>>,
    /// This member of a replicated ECS (`None`: a single ECS, whose state is in files).
    raft: Option<EcsRaft>,
    /// Whether, and in which term, this member leads and may act ([`LeadGate`]): the term
    /// was confirmed by a majority when it took the lead (its state was reloaded from the
    /// group's then), and is confirmed again every [`CONFIRM_EVERY`].
    gate: std::sync::Mutex<LeadGate>,
    /// A change whose driver ran out of its retry budget, exactly where it stopped (an
    /// unknown commit outcome still being resolved, a rollback, steps after the commit): the
    /// background task drives it on from there rather than from the intent log, which may
    /// not show an outcome that is still unknown.
    parked: std::sync::Mutex<Option<Executor>>,
}

/// How often a leader has its lead confirmed by a majority (a round of heartbeats).
const CONFIRM_EVERY: Duration = Duration::from_millis(150);
/// Bound on one confirmation.
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(400);

/// Binds the ECS endpoint and loads its persisted ring.
pub async fn bind(
    config: EcsConfig,
    identity: &Identity,
) -> Result<(Endpoint, Arc<Ecs>), EcsError> {
    ringkv_certs::install_crypto_provider();
    // Only an ecs-role certificate speaks for the ring: refuse to start with anything else.
    let signer = RingSigner::new(identity)?;
    // A stable stateless-reset key (kept in the state dir): operators' and tests'
    // connections to an ECS that restarted are reset at once instead of timing out.
    std::fs::create_dir_all(&config.state_dir)?;
    let secret = ringkv_transport::reset_secret(&config.state_dir)?;
    let mut server_config = ringkv_certs::server_config(identity)?;
    config.serve.apply(&mut server_config);
    let endpoint = ringkv_transport::bind_endpoint(config.listen, server_config, Some(&secret))?;
    let nodes = Transport::new(
        endpoint.clone(),
        ringkv_certs::client_config(identity)?,
        Limits::default(),
        config.node_timeout,
        config.node_timeout,
    );
    let file = RingFile::in_dir(&config.state_dir)?;
    let intents = IntentFile::in_dir(&config.state_dir);
    let raft = match config.group(&identity.name()?)? {
        Some(raft_config) => Some(EcsRaft::start(raft_config, identity, endpoint.clone()).await?),
        None => None,
    };
    let (mut metadata, log) = match &raft {
        // The group's state (a new leader reloads it again when it takes the lead).
        Some(raft) => {
            let state = raft.state();
            (state.ring.clone(), state.log.clone())
        }
        None => (file.load()?, intents.load()?),
    };
    if raft.is_none() {
        if let Some(intent) = &log.pending {
            tracing::warn!(change = intent.change, phase = ?intent.phase, version = intent.plan.metadata.version, "a change was in progress when the ECS stopped; it will be finished or rolled back");
            if intent.phase == Phase::Committed && intent.plan.metadata.version > metadata.version {
                // Committed, but the ring file was not written: the intent log is the record.
                metadata = intent.plan.metadata.clone();
                file.save(&metadata)?;
            }
        }
    }
    tracing::info!(
        version = metadata.version,
        nodes = metadata.nodes.len(),
        "ECS state loaded"
    );
    let act_for = raft.as_ref().map_or(Duration::MAX, EcsRaft::act_for);
    let ecs = Arc::new(Ecs {
        config,
        nodes,
        signer,
        file,
        metadata: RwLock::new(metadata),
        change: tokio::sync::Mutex::new(()),
        intents,
        log: std::sync::Mutex::new(log),
        probes: std::sync::Mutex::new(Probes::new()),
        owed: std::sync::Mutex::new(Default::default()),
        raft,
        gate: std::sync::Mutex::new(LeadGate::new(act_for)),
        parked: std::sync::Mutex::new(None),
    });
    Ok((endpoint, ecs))
}

/// How long the ECS waits before it tries again a failover that did not finish.
const FAILOVER_RETRY: Duration = Duration::from_secs(2);

/// How often the ECS looks for a pending change to drive on.
const RESUME_EVERY: Duration = Duration::from_secs(1);

/// Serves the ECS until `shutdown`. On start it finishes (or rolls back) a change a crash
/// interrupted, then republishes its ring to every node (best effort), so nodes that missed a
/// version while it was down catch up; from then on it keeps driving any change whose steps
/// could not be completed in time (an unreachable node) until it is over.
pub async fn run(endpoint: Endpoint, ecs: Arc<Ecs>, shutdown: impl Future<Output = ()>) {
    let prober = tokio::spawn(ecs.clone().probe_loop());
    let failover = tokio::spawn(ecs.clone().failover_loop());
    let leader = tokio::spawn(ecs.clone().leadership_loop());
    let background = ecs.clone();
    let task = tokio::spawn(async move {
        if background.raft.is_none() {
            background.resume_pending().await;
            background.republish().await;
        }
        loop {
            tokio::time::sleep(RESUME_EVERY).await;
            background.resume_pending().await;
        }
    });
    ringkv_transport::serve(endpoint, ecs.clone(), shutdown).await;
    task.abort();
    prober.abort();
    failover.abort();
    leader.abort();
    if let Some(raft) = &ecs.raft {
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(error = %e, "the Raft member did not shut down cleanly");
        }
    }
}

impl Service for Ecs {
    type Request = AdminRequest;
    type Reply = AdminReply;

    fn name(&self) -> &str {
        "ecs"
    }

    fn max_frame(&self) -> usize {
        Limits::default().max_frame
    }

    fn serve_limits(&self) -> ServeLimits {
        self.config.serve
    }

    /// Administrators talk to the ECS, and in a group the other members (`ecs`
    /// certificates, Raft messages only); any other role is closed at connection time,
    /// before a frame of it is read (`handle` checks again).
    fn admits(&self, role: Role) -> bool {
        role == Role::Admin || (role == Role::Ecs && self.raft.is_some())
    }

    async fn handle(&self, peer: &PeerIdentity, request: AdminRequest) -> AdminReply {
        match (&self.raft, request) {
            // The Raft service checks the role (ecs only) and the member's name.
            (Some(raft), AdminRequest::Raft(rpc)) => raft.service().handle(peer, rpc).await,
            (_, request) if peer.role == Role::Admin => self.answer(request).await,
            _ => AdminReply::Error(format!(
                "a {} certificate may not administer the ECS; an admin certificate is needed",
                peer.role
            )),
        }
    }

    fn bad_frame(&self, error: WireError) -> AdminReply {
        AdminReply::Error(format!("bad request frame: {error}"))
    }

    fn unencodable(&self, error: WireError) -> AdminReply {
        AdminReply::Error(format!("reply too large: {error}"))
    }
}

impl Ecs {
    /// The ECS's current ring metadata.
    pub fn metadata(&self) -> RingMetadata {
        self.metadata.read().expect("metadata lock").clone()
    }

    /// Answers one operator request.
    pub async fn answer(&self, request: AdminRequest) -> AdminReply {
        if let AdminRequest::Group = request {
            return AdminReply::Group(self.group());
        }
        // Everything this request sends nodes is stamped with the term it was decided in.
        let Some(term) = self.acting_term() else {
            return AdminReply::NotLeader {
                leader: self.leader_addr(),
            };
        };
        let result = match request {
            AdminRequest::Ring => return AdminReply::Ring(self.metadata()),
            AdminRequest::Status => return self.status(term).await,
            AdminRequest::AddNode { name, addr } => self.add_node(NodeEntry::new(name, addr)).await,
            AdminRequest::RemoveNode { name } => self.remove_node(&name).await,
            AdminRequest::Start => self.broadcast(term, RequestBody::Start).await,
            AdminRequest::Stop => self.broadcast(term, RequestBody::Stop).await,
            // A Raft message reaches this single ECS only from a misconfigured peer.
            AdminRequest::Raft(_) => {
                return AdminReply::Error(
                    "this ECS is not a member of a replicated ECS group: it takes no Raft messages"
                        .into(),
                )
            }
            AdminRequest::Group => unreachable!("answered above"),
            AdminRequest::AddEcsMember { id, name, addr } => match self.group_member() {
                Ok(raft) => raft
                    .add_member(id, Member::new(addr, name))
                    .await
                    .map(|()| AdminReply::Done(format!("ECS member {id} added; it votes now")))
                    .map_err(EcsError::from),
                Err(e) => Err(e),
            },
            AdminRequest::RemoveEcsMember { id } => match self.group_member() {
                Ok(raft) => raft
                    .remove_member(id)
                    .await
                    .map(|()| AdminReply::Done(format!("ECS member {id} removed")))
                    .map_err(EcsError::from),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(reply) => reply,
            // Deposed while it worked: the new leader finishes or rolls back what it began.
            Err(EcsError::Raft(RaftError::ForwardToLeader { leader })) => AdminReply::NotLeader {
                leader: leader.map(|(_, member)| member.addr),
            },
            // Cut off from the majority: another member may lead by now.
            Err(EcsError::Raft(RaftError::NoQuorum(_))) => AdminReply::NotLeader { leader: None },
            Err(e) => AdminReply::Error(e.to_string()),
        }
    }

    /// This member's Raft handle, for changes of the group itself.
    fn group_member(&self) -> Result<&EcsRaft, EcsError> {
        self.raft.as_ref().ok_or_else(|| {
            EcsError::Config(
                "this ECS is a single process, not a group: start it with --peers to make one"
                    .into(),
            )
        })
    }

    /// The term this member may act in now, if it acts at all: a single ECS always acts
    /// (`Some(0)`); a group member while it leads (`Some(term)`: it took the lead in
    /// [`Ecs::leadership_loop`], has heard of no newer term since, and a majority confirmed
    /// its lead in a round that started less than the Raft timings' `act_for` ago,
    /// [`LeadGate`]). A leader cut off from the majority thus stops answering operators,
    /// leasing nodes and failing them over before the others can have elected a new leader.
    ///
    /// What is decided now is sent
    /// stamped with this term ([`Ecs::stamp`]), never with whatever the term is when it is
    /// sent.
    fn acting_term(&self) -> Option<u64> {
        if self.raft.is_none() {
            return Some(0);
        }
        if self.deposed() {
            return None;
        }
        let gate = self.gate.lock().expect("gate lock");
        gate.may_act(Instant::now()).then(|| gate.term())
    }

    /// Whether this group member has stopped leading (a newer term, or it never led). A
    /// running change stops only then: a confirmation that is merely late does not cut it
    /// short (its proposals need a majority anyway).
    fn deposed(&self) -> bool {
        match &self.raft {
            None => false,
            Some(raft) => self.leading_term() == 0 || !raft.is_leader(),
        }
    }

    /// Confirms with a majority, now, that this member leads (a group member; a single ECS
    /// always does): called before a change touches any node. The term to stamp what the
    /// change sends with (0 for a single ECS).
    async fn confirm_lead(&self) -> Result<u64, EcsError> {
        let Some(raft) = &self.raft else {
            return Ok(0);
        };
        // The gate counts from before the heartbeats go out ([`LeadGate`]).
        let round = Instant::now();
        let lead = tokio::time::timeout(CONFIRM_TIMEOUT, raft.ensure_leader())
            .await
            .map_err(|_| {
                RaftError::NoQuorum(format!("no majority within {CONFIRM_TIMEOUT:?}"))
            })??;
        if !self
            .gate
            .lock()
            .expect("gate lock")
            .confirmed(lead.term, round)
        {
            return Err(RaftError::ForwardToLeader { leader: None }.into());
        }
        Ok(lead.term)
    }

    /// The Raft term this member leads in (0: a single ECS, or not leading).
    pub fn leading_term(&self) -> u64 {
        self.gate.lock().expect("gate lock").term()
    }

    /// The address of the group's leader as this member knows it.
    fn leader_addr(&self) -> Option<String> {
        let raft = self.raft.as_ref()?;
        // A leader whose lead is not confirmed does not name itself.
        raft.leader()
            .filter(|(id, _)| *id != raft.id())
            .map(|(_, member)| member.addr)
    }

    /// The ECS group as this member sees it (`None` for a single ECS).
    pub fn group(&self) -> Option<GroupReport> {
        let status = self.raft.as_ref()?.status();
        Some(GroupReport {
            this: status.id,
            leader: status.leader.as_ref().map(|(id, _)| *id),
            term: status.term,
            applied: status.last_applied.unwrap_or(0),
            members: status
                .members
                .iter()
                .map(|(id, member)| GroupMember {
                    id: *id,
                    name: member.name.clone(),
                    addr: member.addr.clone(),
                    voter: status.voters.contains(id),
                })
                .collect(),
        })
    }

    /// Follows this member's leadership (a group member only): when it becomes the leader,
    /// it confirms the lead with a majority, reloads the ring and intent log from the
    /// group's state, forgets what it knew of the nodes' liveness (a node gets a whole
    /// `failover_after` under the new leader before it can be failed over, which also
    /// outlasts any lease the old leader granted), then resumes the change in flight and
    /// republishes the ring. When it stops leading, it stops acting at once ([`Ecs::acting_term`]).
    async fn leadership_loop(self: Arc<Self>) {
        let Some(raft) = self.raft.as_ref() else {
            return;
        };
        let mut metrics = raft.metrics();
        loop {
            let leader = raft.is_leader();
            let leading = self.leading_term();
            if leader && leading == 0 {
                self.take_lead(raft).await;
            } else if !leader && leading != 0 {
                self.gate.lock().expect("gate lock").depose();
                tracing::warn!(term = raft.term(), "no longer the ECS group's leader");
            } else if leader {
                // Leading: renew the majority's confirmation ([`Ecs::acting_term`]); a newer term
                // means this member is leading afresh and takes the lead again.
                match self.confirm_lead().await {
                    Ok(_) => {}
                    Err(EcsError::Raft(RaftError::ForwardToLeader { .. })) => {
                        self.gate.lock().expect("gate lock").depose();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "lead not confirmed by a majority");
                    }
                }
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(CONFIRM_EVERY) => {}
            }
        }
    }

    /// Takes the lead (see [`Ecs::leadership_loop`]).
    async fn take_lead(self: &Arc<Self>, raft: &EcsRaft) {
        // The gate counts from before the heartbeats go out, not from when the change
        // mutex below is had ([`LeadGate`]).
        let round = Instant::now();
        let term = match raft.ensure_leader().await {
            Ok(lead) => lead.term,
            Err(e) => {
                tracing::warn!(error = %e, "leadership not confirmed; not acting yet");
                return;
            }
        };
        let _no_change = self.change.lock().await;
        let state = raft.state();
        *self.metadata.write().expect("metadata lock") = state.ring.clone();
        *self.log.lock().expect("log lock") = state.log.clone();
        *self.probes.lock().expect("probes lock") = Probes::new();
        self.owed.lock().expect("owed lock").clear();
        // The group's intent log is the record now: whatever this member parked under an
        // earlier lead is resumed from there.
        *self.parked.lock().expect("parked lock") = None;
        self.gate.lock().expect("gate lock").take(term, round);
        tracing::warn!(
            term,
            version = state.ring.version,
            pending = state.log.pending.is_some(),
            "leading the ECS group"
        );
        let ecs = self.clone();
        tokio::spawn(async move {
            ecs.resume_pending().await;
            ecs.republish().await;
        });
    }

    /// Adds `node` to the ring, moving its range to it.
    pub async fn add_node(&self, node: NodeEntry) -> Result<AdminReply, EcsError> {
        let _change = self.change.lock().await;
        // Before the wipe touches the joining node: a deposed leader must not.
        let term = self.confirm_lead().await?;
        self.finish_pending(term).await?;
        // A new ring gets the configured factor; a ring with nodes keeps its own.
        let current = self.metadata();
        let plan = plan::join_with_replication(&current, node.clone(), self.config.replication)?;
        self.wipe(term, &current, &node).await?;
        self.execute(term, plan).await
    }

    /// Deletes everything a joining node holds (a node that comes back after it was failed
    /// over or removed rejoins empty; its copies come from the ring). It is first given the
    /// current ring, in which it holds nothing, so that it may delete. Refused (and the join
    /// with it) if the node still holds a ring it belongs to, newer than the ECS's.
    async fn wipe(
        &self,
        term: u64,
        current: &RingMetadata,
        node: &NodeEntry,
    ) -> Result<(), EcsError> {
        if !current.nodes.is_empty() {
            self.install_at(term, current, [node]).await;
        }
        let everything = KeyRange::new(Position::MAX, Position::MAX);
        let wiped = self
            .call(
                term,
                node,
                RequestBody::DeleteRange { range: everything },
                self.config.node_timeout,
            )
            .await;
        // Reported like a change that failed at its first step (nothing changed).
        let aborted = |reason: String| EcsError::Aborted {
            step: format!("wipe {} before it joins", node.name),
            reason,
            version: current.version,
        };
        match wiped.map(|r| r.body) {
            Ok(ReplyBody::Count(n)) => {
                if n > 0 {
                    tracing::warn!(node = %node.name, keys = n, "joining node held data; wiped it");
                }
                Ok(())
            }
            Ok(other) => Err(aborted(format!("{} answered {other:?}", node.name))),
            Err(e) => Err(aborted(e.to_string())),
        }
    }

    /// Whether `node` has answered no probe for `failover_after` in a replicated ring: it is
    /// (about to be) failed over, so a step a change still has to send it (an install, start
    /// or clear after the commit; an abort of a rollback) is skipped, so that a dead node
    /// cannot wedge the change that would fail it over, and owed to it instead: sent if it
    /// answers again ([`Ecs::pay_owed`]).
    fn given_up(&self, node: &NodeEntry) -> bool {
        self.metadata().replication > 1
            && self
                .probes
                .lock()
                .expect("probes lock")
                .silent_for(&node.name, Instant::now())
                > self.config.failover_after
    }

    /// Removes the node `name` from the ring. A live node's copies (or, without
    /// replication, its range) are moved first. With replication, a node that is marked
    /// failed, or that does not answer a probe now, is failed over instead: its copies are
    /// rebuilt from the surviving members of its chains.
    pub async fn remove_node(&self, name: &str) -> Result<AdminReply, EcsError> {
        let _change = self.change.lock().await;
        let term = self.confirm_lead().await?;
        self.finish_pending(term).await?;
        let metadata = self.metadata();
        if metadata.replication > 1
            && metadata.node(name).is_some()
            && (metadata.is_failed(name) || self.silent_through_its_lease(term, name).await)
        {
            return self.fail_over(term, &[name.to_string()]).await;
        }
        let plan = plan::leave(&metadata, name)?;
        self.execute(term, plan).await
    }

    /// For `remove-node`: whether `name` is dead rather than live. If it answers a probe now
    /// it is live. If not, it is dead only once it has been silent for `failover_after`
    /// (its lease is surely over then); this waits for that, unless it answers meanwhile.
    /// A dead node is condemned in the same step ([`Probes::condemn`]): never leased again.
    async fn silent_through_its_lease(&self, term: u64, name: &str) -> bool {
        if self.probe_now(term, name).await {
            return false;
        }
        let deadline = Instant::now() + self.config.failover_after * 2;
        loop {
            if self.probes.lock().expect("probes lock").condemn(
                name,
                self.config.failover_after,
                Instant::now(),
            ) {
                return true;
            }
            if Instant::now() >= deadline || self.probe_now(term, name).await {
                return false;
            }
            tokio::time::sleep(self.config.probe_interval).await;
        }
    }

    /// Fails the nodes `names` over (called with `change` held, each condemned or already
    /// failed): marks them failed in one change (those not failed yet), then rebuilds their
    /// copies elsewhere and removes them from the ring, one after the other. If the first
    /// change is rolled back (certainly not committed), they are pardoned: leased again if
    /// they answer.
    async fn fail_over(&self, term: u64, names: &[String]) -> Result<AdminReply, EcsError> {
        let started = Instant::now();
        let metadata = self.metadata();
        let unmarked: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|name| !metadata.is_failed(name))
            .collect();
        if !unmarked.is_empty() {
            let marked = match plan::fail_all(&metadata, &unmarked) {
                Ok(plan) => self.execute(term, plan).await,
                Err(e) => Err(e),
            };
            if let Err(e) = marked {
                if !matches!(e, EcsError::Pending { .. }) {
                    let mut probes = self.probes.lock().expect("probes lock");
                    unmarked.iter().for_each(|name| probes.pardon(name));
                }
                return Err(e);
            }
            tracing::warn!(nodes = ?unmarked, elapsed = ?started.elapsed(), version = self.metadata().version, "nodes marked failed: their chains go on without them");
        }
        let mut reply = None;
        for name in names {
            reply = Some(
                self.execute(term, plan::remove_failed(&self.metadata(), name)?)
                    .await?,
            );
            tracing::warn!(node = %name, elapsed = ?started.elapsed(), version = self.metadata().version, "failed node replaced and removed");
        }
        reply.ok_or_else(|| EcsError::Refused("no node to fail over".into()))
    }

    /// One liveness probe of `name` outside the probe loop, echoing its last stamp, unless
    /// it is condemned: whether it answered in time.
    async fn probe_now(&self, term: u64, name: &str) -> bool {
        let echo = {
            let probes = self.probes.lock().expect("probes lock");
            if probes.is_condemned(name) {
                return false;
            }
            probes.echo(name)
        };
        self.probe(term, name, echo).await
    }

    /// One liveness probe of `name` (a lease renewal, echoing `echo`, the stamp chosen when
    /// the probe was decided): whether it answered in time.
    async fn probe(&self, term: u64, name: &str, echo: Option<u64>) -> bool {
        let Some(node) = self.metadata().node(name).cloned() else {
            return false;
        };
        let lease = self.config.lease();
        let body = RequestBody::Lease {
            millis: lease.as_millis().min(u32::MAX as u128) as u32,
            echo,
        };
        // Dialing included: a dead node's probe ends within this, and the next one waits
        // for it (one per node under way), so it never holds up anyone else's.
        let timeout = self.config.probe_interval.max(Duration::from_millis(100)) * 2;
        match tokio::time::timeout(timeout, self.call(term, &node, body, timeout)).await {
            Ok(Ok(Reply {
                body: ReplyBody::Leased { stamp },
                ..
            })) => {
                self.probes
                    .lock()
                    .expect("probes lock")
                    .answered(name, Instant::now(), stamp);
                true
            }
            _ => false,
        }
    }

    /// The probe loop ([`crate::liveness`]): every `probe_interval`, probes (and leases)
    /// every live node of the ring, each in a task of its own, at most one per node under
    /// way; a node that answers gets the steps a change had to skip while it was silent.
    /// Nothing else runs in this loop, so a failover or a long change never delays a lease.
    async fn probe_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(term) = self.acting_term() else {
                continue;
            };
            let metadata = self.metadata();
            let live: Vec<&str> = metadata
                .nodes
                .iter()
                .filter(|n| !metadata.is_failed(&n.name))
                .map(|n| n.name.as_str())
                .collect();
            let due = {
                let mut probes = self.probes.lock().expect("probes lock");
                probes.retain(live.iter().copied());
                probes.due(live.iter().copied(), Instant::now())
            };
            self.owed
                .lock()
                .expect("owed lock")
                .retain(|name, _| metadata.node(name).is_some());
            for (name, echo) in due {
                let Some(node) = metadata.node(&name).cloned() else {
                    continue;
                };
                let ecs = self.clone();
                tokio::spawn(async move {
                    let answered = ecs.probe(term, &name, echo).await;
                    ecs.probes.lock().expect("probes lock").done(&name);
                    if answered {
                        ecs.pay_owed(term, &node).await;
                    }
                });
            }
        }
    }

    /// Sends `node` the steps changes skipped while it was silent (an install, a start, a
    /// clear, an abort), between changes only: first the current ring (so that it judges
    /// the rest by it: it refuses to delete a range it holds), then each step. A step the
    /// node answered, in any way, is done.
    async fn pay_owed(&self, term: u64, node: &NodeEntry) {
        if !self
            .owed
            .lock()
            .expect("owed lock")
            .contains_key(&node.name)
        {
            return;
        }
        let Ok(_no_change) = self.change.try_lock() else {
            return; // at a later answer
        };
        let metadata = self.metadata();
        self.install_at(term, &metadata, [node]).await;
        let owed = self
            .owed
            .lock()
            .expect("owed lock")
            .remove(&node.name)
            .unwrap_or_default();
        let mut unpaid = Vec::new();
        for body in owed {
            let name = body.name();
            match self
                .call(term, node, body.clone(), self.config.node_timeout)
                .await
            {
                Ok(reply) => {
                    tracing::info!(node = %node.name, step = name, reply = ?reply.body, "sent a step skipped while the node was silent")
                }
                Err(_) => unpaid.push(body),
            }
        }
        if !unpaid.is_empty() {
            self.owed
                .lock()
                .expect("owed lock")
                .entry(node.name.clone())
                .or_default()
                .extend(unpaid);
        }
    }

    /// The failover loop ([`crate::liveness`]): with replication, fails over the nodes
    /// silent for `failover_after`, all in one change ([`Probes::decide`]: none while half the
    /// nodes or more are silent), condemning them first so that none is leased again; and
    /// finishes the removal of failed nodes whose rebuild did not complete. An attempt that
    /// did not finish is tried again after [`FAILOVER_RETRY`].
    async fn failover_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let detector = Detector::new(self.config.probe_interval, self.config.failover_after);
        let mut retry_at: Option<Instant> = None;
        loop {
            tick.tick().await;
            let metadata = self.metadata();
            if metadata.replication <= 1 || retry_at.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            let Some(term) = self.acting_term() else {
                continue;
            };
            let Ok(_change) = self.change.try_lock() else {
                continue; // a change is running; look again at the next tick
            };
            if let Err(e) = self.finish_pending(term).await {
                tracing::warn!(error = %e, "pending change still not finished");
                continue;
            }
            let metadata = self.metadata();
            let live: Vec<&str> = metadata
                .nodes
                .iter()
                .filter(|n| !metadata.is_failed(&n.name))
                .map(|n| n.name.as_str())
                .collect();
            let todo: Vec<String> = {
                let mut probes = self.probes.lock().expect("probes lock");
                let now = Instant::now();
                match probes.decide(&live, detector, now) {
                    FailoverDecision::FailOver(silent) => {
                        for name in &silent {
                            probes.condemn(name, self.config.failover_after, now);
                        }
                        tracing::warn!(nodes = ?silent, "failing over silent nodes");
                    }
                    FailoverDecision::HoldOff { silent } => {
                        // Half the ring or more silent at once is more likely the ECS cut
                        // off, or the cluster restarting, than the nodes dead: failing them
                        // over could leave no copy of some range.
                        tracing::error!(
                            ?silent,
                            "half the nodes or more answer no probe; failing none over (is the ECS cut off?)"
                        );
                    }
                    FailoverDecision::Settling { silent } => {
                        tracing::info!(
                            ?silent,
                            "silent nodes get a whole failover_after after the majority answers again"
                        );
                    }
                    FailoverDecision::Nothing => {}
                }
                // Condemned ones (decided now or by an attempt that did not finish), then
                // those marked failed whose removal did not finish.
                live.iter()
                    .filter(|name| probes.is_condemned(name))
                    .map(|name| name.to_string())
                    .chain(metadata.failed.iter().cloned())
                    .collect()
            };
            if todo.is_empty() {
                continue;
            }
            match self.fail_over(term, &todo).await {
                Ok(_) => retry_at = None,
                Err(e) => {
                    tracing::warn!(nodes = ?todo, error = %e, "failover not finished; retrying in {FAILOVER_RETRY:?}");
                    retry_at = Some(Instant::now() + FAILOVER_RETRY);
                }
            }
        }
    }

    /// The change in progress in the intent log, if any.
    pub fn pending_change(&self) -> Option<Intent> {
        self.log.lock().expect("log lock").pending.clone()
    }

    /// Drives the change left in the intent log (by a crash, or by steps that could not be
    /// completed yet) to its end, if there is one. Called with `change` held.
    async fn finish_pending(&self, term: u64) -> Result<(), EcsError> {
        let parked = self.parked.lock().expect("parked lock").take();
        let (exec, first) = if let Some(mut exec) = parked {
            // Goes on where the driver stopped waiting (the backoff is over).
            tracing::info!(change = exec.move_id().change, phase = ?exec.intent().phase, "driving on a change that ran out of its retry budget");
            let first = exec.next(Outcome::ok());
            (exec, first)
        } else {
            let Some(intent) = self.pending_change() else {
                return Ok(());
            };
            tracing::info!(change = intent.change, phase = ?intent.phase, version = intent.plan.metadata.version, "resuming a change from the intent log");
            Executor::resume(intent)
        };
        match self.drive(term, exec, first).await {
            Ok(_) | Err(EcsError::Aborted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Resumes the pending change, if any, unless a change is running (the background task
    /// of [`run`] calls this periodically).
    pub async fn resume_pending(&self) {
        let parked = self.parked.lock().expect("parked lock").is_some();
        if self.pending_change().is_none() && !parked {
            return;
        }
        let Some(term) = self.acting_term() else {
            return;
        };
        let Ok(_change) = self.change.try_lock() else {
            return;
        };
        match self.finish_pending(term).await {
            Ok(()) => tracing::info!("pending change finished"),
            Err(e) => tracing::warn!(error = %e, "pending change still not finished"),
        }
    }

    async fn execute(&self, term: u64, plan: Plan) -> Result<AdminReply, EcsError> {
        let change = {
            let mut log = self.log.lock().expect("log lock");
            let change = log.next_change.max(1);
            log.next_change = change + 1;
            change
        };
        tracing::info!(
            change,
            version = plan.metadata.version,
            steps = plan.steps.len(),
            "membership change starting"
        );
        let (exec, first) = Executor::new(plan, change);
        self.drive(term, exec, first).await
    }

    /// Performs the executor's actions until the change is over, or until its retries have
    /// taken longer than `config.retry_budget` (then the change stays in the intent log and
    /// the background task goes on with it). Everything it sends nodes is stamped with
    /// `term`, the term the change was decided in (0 for a single ECS); it stops the moment
    /// the member no longer leads in it.
    async fn drive(
        &self,
        term: u64,
        mut exec: Executor,
        first: Action,
    ) -> Result<AdminReply, EcsError> {
        let started = Instant::now();
        let plan = exec.intent().plan.clone();
        // Lock timing is measured at the first copy's head (the old owner with replication 1).
        let sender = plan.copies.first().map(|c| c.head.name.clone());
        let (mut locked_at, mut locked_for) = (None, Duration::ZERO);
        let mut retrying = Duration::ZERO;
        let mut last_failure = String::new();
        let mut action = first;
        loop {
            if self.deposed() || self.leading_term() != term {
                // Deposed: the new leader resumes the change from the group's intent log.
                return Err(EcsError::Raft(RaftError::ForwardToLeader {
                    leader: self.raft.as_ref().and_then(|raft| raft.leader()),
                }));
            }
            let outcome = match &action {
                Action::Persist(intent) => {
                    let outcome = self.persist_intent(Some(intent.clone())).await;
                    if let Outcome::Failed(reason) | Outcome::Unknown(reason) = &outcome {
                        last_failure = format!("persist the intent log: {reason}");
                    }
                    outcome
                }
                Action::Commit(intent) => {
                    let outcome = self.commit(intent).await;
                    if let Outcome::Unknown(reason) = &outcome {
                        tracing::warn!(change = intent.change, version = intent.plan.metadata.version, %reason, "the commit's outcome is unknown; proposing it again");
                        last_failure =
                            format!("commit version {}: {reason}", intent.plan.metadata.version);
                    }
                    outcome
                }
                Action::Run(step) => {
                    if let Some(hook) = &self.config.before_step {
                        (hook.0)(step);
                    }
                    let step_started = Instant::now();
                    let outcome = self.run_step(term, step, exec.move_id(), &plan).await;
                    let ok = matches!(outcome, Outcome::Ok { .. });
                    tracing::info!(change = exec.move_id().change, step = %step.describe(), elapsed = ?step_started.elapsed(), ok, "step");
                    if let Outcome::Failed(reason) | Outcome::Unknown(reason) = &outcome {
                        last_failure = format!("{}: {reason}", step.describe());
                    }
                    match step {
                        Step::Lock { .. } if ok => locked_at = Some(Instant::now()),
                        Step::Install { node } if ok && Some(&node.name) == sender.as_ref() => {
                            locked_for = locked_at.map_or(Duration::ZERO, |t| t.elapsed())
                        }
                        _ => {}
                    }
                    outcome
                }
                Action::Wait(delay) => {
                    if retrying + *delay > self.config.retry_budget {
                        let state = if exec.committed() {
                            format!(
                                "committed at version {}, but not finished",
                                plan.metadata.version
                            )
                        } else if exec.resolving_commit() {
                            format!(
                                "not known to have committed version {} yet (the commit is proposed again until its outcome is known)",
                                plan.metadata.version
                            )
                        } else if exec.intent().phase == Phase::RollingBack {
                            "being rolled back".to_string()
                        } else {
                            "waiting for its intent to be persisted".to_string()
                        };
                        // The background task goes on from exactly here: an unknown outcome
                        // stays unknown until it is resolved, never restarted as a rollback.
                        *self.parked.lock().expect("parked lock") = Some(exec);
                        return Err(EcsError::Pending {
                            state,
                            reason: last_failure,
                        });
                    }
                    tokio::time::sleep(*delay).await;
                    retrying += *delay;
                    Outcome::ok()
                }
                Action::Finish(result) => {
                    if let Outcome::Failed(e) = self.persist_intent(None).await {
                        tracing::error!(error = %e, "could not clear the intent log");
                    }
                    return match result {
                        Ok(moved) => {
                            tracing::info!(version = plan.metadata.version, elapsed = ?started.elapsed(), "membership change done");
                            Ok(AdminReply::Changed {
                                metadata: plan.metadata.clone(),
                                // The first copy, with what all the copies moved.
                                moved: plan.copies.first().map(|c| MoveReport {
                                    from: c.from.name.clone(),
                                    to: c.to.name.clone(),
                                    range: c.range,
                                    entries: moved.entries,
                                    bytes: moved.bytes,
                                    locked_ms: locked_for.as_millis() as u64,
                                    total_ms: started.elapsed().as_millis() as u64,
                                }),
                            })
                        }
                        Err((step, reason)) => {
                            tracing::warn!(%step, %reason, "membership change rolled back");
                            Err(EcsError::Aborted {
                                step: step.clone(),
                                reason: reason.clone(),
                                // Rolled back: the ring is the one before the change.
                                version: self.metadata().version,
                            })
                        }
                    };
                }
            };
            action = exec.next(outcome);
        }
    }

    /// Replaces the intent log's pending change, durably (in a group: committed by a
    /// majority).
    async fn persist_intent(&self, pending: Option<Intent>) -> Outcome {
        let mut log = self.log.lock().expect("log lock").clone();
        log.pending = pending;
        let outcome = match &self.raft {
            None => match self.intents.save(&log) {
                Ok(()) => Outcome::ok(),
                Err(e) => Outcome::Failed(e.to_string()),
            },
            Some(raft) => {
                Outcome::of_proposal(&raft.propose(EcsCommand::SetIntentLog(log.clone())).await)
            }
        };
        if let Outcome::Ok { .. } = outcome {
            *self.log.lock().expect("log lock") = log;
        }
        outcome
    }

    /// The commit point: the committed intent is persisted, then the ring (in a group: both
    /// in one command, committed by a majority).
    async fn commit(&self, intent: &Intent) -> Outcome {
        let Some(raft) = &self.raft else {
            if let Outcome::Failed(e) = self.persist_intent(Some(intent.clone())).await {
                return Outcome::Failed(e);
            }
            self.adopt_committed(&intent.plan.metadata);
            return Outcome::ok();
        };
        let mut log = self.log.lock().expect("log lock").clone();
        log.pending = Some(intent.clone());
        let adopt = |log: IntentLog| {
            *self.log.lock().expect("log lock") = log;
            *self.metadata.write().expect("metadata lock") = intent.plan.metadata.clone();
            Outcome::ok()
        };
        // An earlier attempt whose outcome was unknown may have committed it.
        if raft.state().ring == intent.plan.metadata {
            return adopt(raft.state().log.clone());
        }
        let save = EcsCommand::Save {
            ring: Some(intent.plan.metadata.clone()),
            log: Some(log.clone()),
        };
        let proposed = raft.propose(save).await;
        match &proposed {
            Ok(_) => adopt(log),
            // Refused because an earlier attempt committed it meanwhile: committed.
            Err(RaftError::Refused(_)) if raft.state().ring == intent.plan.metadata => {
                adopt(raft.state().log.clone())
            }
            Err(_) => Outcome::of_proposal(&proposed),
        }
    }

    /// Makes committed metadata the ECS's ring (a failed ring write is logged: the intent
    /// log holds the committed ring, and a restart adopts it from there).
    fn adopt_committed(&self, metadata: &RingMetadata) {
        if self.metadata().version >= metadata.version {
            return;
        }
        if let Err(e) = self.file.save(metadata) {
            tracing::error!(error = %e, "could not persist the committed ring; the intent log keeps it");
        }
        *self.metadata.write().expect("metadata lock") = metadata.clone();
    }

    /// Runs one step of move `id` against its node.
    async fn run_step(&self, term: u64, step: &Step, id: MoveId, plan: &Plan) -> Outcome {
        if let Step::Install { node }
        | Step::Start { node }
        | Step::Clear { node, .. }
        | Step::Abort { node, .. } = step
        {
            if self.given_up(node) {
                tracing::warn!(node = %node.name, step = %step.describe(), "skipped: the node is silent and will be failed over; owed to it if it answers again");
                let owed = match step {
                    Step::Install { .. } => None, // paying starts with the current ring
                    Step::Start { .. } => Some(RequestBody::Start),
                    Step::Clear { range, .. } => Some(RequestBody::DeleteRange { range: *range }),
                    Step::Abort { range, .. } => Some(RequestBody::AbortMove { id, range: *range }),
                    _ => None,
                };
                self.owed
                    .lock()
                    .expect("owed lock")
                    .entry(node.name.clone())
                    .or_default()
                    .extend(owed);
                return Outcome::Ok {
                    stats: None,
                    node_version: plan.metadata.version,
                };
            }
        }
        let (node, body, timeout) = match step {
            Step::Commit => unreachable!("the commit is an action of its own"),
            Step::Prepare { node, range, from } => (
                node,
                RequestBody::PrepareReceive {
                    id,
                    range: *range,
                    // The copy's source: the only peer whose batches the receiver accepts.
                    from: from.name.clone(),
                },
                self.config.node_timeout,
            ),
            Step::Clear { node, range } => (
                node,
                RequestBody::DeleteRange { range: *range },
                self.config.node_timeout,
            ),
            Step::Lock { node, range } => (
                node,
                RequestBody::LockRange { id, range: *range },
                self.config.node_timeout,
            ),
            Step::Abort { node, range } => (
                node,
                RequestBody::AbortMove { id, range: *range },
                self.config.node_timeout,
            ),
            Step::Transfer { from, to, range } => (
                from,
                RequestBody::TransferRange {
                    id,
                    range: *range,
                    to: to.clone(),
                },
                self.config.transfer_timeout,
            ),
            Step::TransferDelta {
                from,
                to,
                range,
                last,
            } => (
                from,
                RequestBody::TransferDelta {
                    id,
                    range: *range,
                    to: to.clone(),
                    last: *last,
                },
                self.config.transfer_timeout,
            ),
            Step::Install { node } => match self.signer.sign(&plan.metadata) {
                Ok(metadata) => (
                    node,
                    RequestBody::InstallMetadata { metadata },
                    self.config.node_timeout,
                ),
                Err(e) => return Outcome::Failed(e.to_string()),
            },
            Step::Start { node } => (node, RequestBody::Start, self.config.node_timeout),
        };
        match self.call(term, node, body, timeout).await {
            Ok(reply) => match reply.body {
                // An install is checked by the executor: the reply's version must be at
                // least the plan's (adopted now or before).
                ReplyBody::Ok | ReplyBody::Count(_) | ReplyBody::Installed { .. } => Outcome::Ok {
                    stats: None,
                    node_version: reply.metadata_version,
                },
                ReplyBody::Transferred(stats) => Outcome::Ok {
                    stats: Some(stats),
                    node_version: reply.metadata_version,
                },
                other => Outcome::Failed(format!("{} answered {other:?}", node.name)),
            },
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Sends `body` to `node`, stamped with `term` ([`Ecs::stamp`]).
    async fn call(
        &self,
        term: u64,
        node: &NodeEntry,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        let Some(body) = self.stamp(term, body) else {
            return Err(TransportError::NotTaken {
                addr: node.addr.clone(),
                reason: "this ECS member does not lead: it sends nodes nothing".into(),
            });
        };
        let request = Request::new(self.metadata().version, body);
        self.nodes.call(&node.addr, &request, timeout).await
    }

    /// In a group, `body` stamped with `term`, the term this member led in when the request
    /// was decided (not the term when it is sent): a node that has seen a newer leader's term
    /// refuses it (`StaleTerm`), so a deposed leader that has not noticed yet can no longer
    /// lock, transfer, install, lease or start anything (ARCHITECTURE.md §12). `None` for
    /// term 0 in a group: a group member never sends a request unfenced (a node that never
    /// saw a term would take it). A single ECS sends requests unstamped.
    fn stamp(&self, term: u64, body: RequestBody) -> Option<RequestBody> {
        fence(self.raft.is_some(), term, body)
    }

    /// Sends the current metadata to every node of the ring (best effort), unless a change
    /// is running or pending (it installs its version in its own order).
    pub async fn republish(&self) {
        let Ok(_no_change) = self.change.try_lock() else {
            return;
        };
        let Some(term) = self.acting_term() else {
            return;
        };
        if self.pending_change().is_some() {
            return;
        }
        let metadata = self.metadata();
        self.install_at(term, &metadata, metadata.nodes.iter())
            .await;
    }

    /// Signs `metadata` and installs it at `nodes`, one after the other (best effort: a node
    /// that fails or does not adopt it is logged).
    async fn install_at<'a>(
        &self,
        term: u64,
        metadata: &RingMetadata,
        nodes: impl IntoIterator<Item = &'a NodeEntry>,
    ) {
        let signed = match self.signer.sign(metadata) {
            Ok(signed) => signed,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign the ring to republish it");
                return;
            }
        };
        for node in nodes {
            let body = RequestBody::InstallMetadata {
                metadata: signed.clone(),
            };
            match self.call(term, node, body, self.config.node_timeout).await {
                Ok(reply) if reply.metadata_version >= metadata.version => {}
                Ok(reply) => {
                    tracing::warn!(node = %node.name, reply = ?reply.body, "node did not adopt the republished metadata")
                }
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "could not republish metadata")
                }
            }
        }
    }

    async fn broadcast(&self, term: u64, body: RequestBody) -> Result<AdminReply, EcsError> {
        let metadata = self.metadata();
        let mut failed = Vec::new();
        for node in &metadata.nodes {
            match self
                .call(term, node, body.clone(), self.config.node_timeout)
                .await
                .map(|r| r.body)
            {
                Ok(ReplyBody::Ok) => {}
                Ok(other) => failed.push(format!("{}: {other:?}", node.name)),
                Err(e) => failed.push(format!("{}: {e}", node.name)),
            }
        }
        Ok(if failed.is_empty() {
            AdminReply::Done(format!(
                "{} sent to {} nodes",
                body.name(),
                metadata.nodes.len()
            ))
        } else {
            AdminReply::Error(format!("{} failed at: {}", body.name(), failed.join("; ")))
        })
    }

    /// The ring plus each node's own report, asked of every node at once (each within
    /// `status_timeout`). A node that answers is alive; for one that does not, the report
    /// says what the answering nodes' gossip sees of it ([`aggregate_liveness`]). Nodes
    /// found behind the ECS's version get the current metadata again (anti-entropy for a
    /// node that gossip has not reached, e.g. one cut off from its peers), but only while no
    /// change is running or pending: a change installs its version in its own order (the
    /// sender before the receiver).
    async fn status(&self, term: u64) -> AdminReply {
        let metadata = self.metadata();
        let timeout = self.config.status_timeout;
        let asks = metadata.nodes.iter().map(|node| async move {
            let asked =
                tokio::time::timeout(timeout, self.call(term, node, RequestBody::Status, timeout))
                    .await;
            match asked.map(|r| r.map(|reply| reply.body)) {
                Ok(Ok(ReplyBody::Status(s))) => Ok(*s),
                Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        let answers = futures::future::join_all(asks).await;
        let answered: Vec<&NodeStatus> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
        let mut nodes = Vec::new();
        let mut behind = Vec::new();
        for ((node, range), answer) in metadata.ranges().into_iter().zip(&answers) {
            let (status, error) = match answer {
                Ok(s) => (Some(s.clone()), None),
                Err(e) => (None, Some(e.clone())),
            };
            if status
                .as_ref()
                .is_some_and(|s| s.metadata_version < metadata.version)
            {
                behind.push(node);
            }
            nodes.push(NodeReport {
                liveness: aggregate_liveness(&node.name, status.is_some(), &answered),
                name: node.name.clone(),
                addr: node.addr.clone(),
                range: Some(range),
                status,
                error,
            });
        }
        if let Ok(_no_change) = self.change.try_lock() {
            if self.pending_change().is_none() && self.metadata().version == metadata.version {
                self.install_at(term, &metadata, behind).await;
            }
        }
        let full = metadata.full_chain();
        let ranges = metadata
            .chains()
            .into_iter()
            .map(|(range, chain)| RangeReport {
                range,
                missing: full.saturating_sub(chain.len()) as u8,
                chain: chain.into_iter().map(|n| n.name.clone()).collect(),
            })
            .collect();
        AdminReply::Status {
            metadata,
            nodes,
            ranges,
        }
    }
}

/// `body` as a member of a replicated ECS (`group`) or a single ECS sends it when it decided
/// it in `term`: a single ECS unstamped; a group member in `Fenced { term }`, and never with
/// term 0 (`None`: it does not lead, and sends nothing).
pub fn fence(group: bool, term: u64, body: RequestBody) -> Option<RequestBody> {
    match (group, term) {
        (false, _) => Some(body),
        (true, 0) => None,
        (true, term) => Some(RequestBody::Fenced {
            term,
            body: Box::new(body),
        }),
    }
}

/// The liveness `status` reports for the node `name`: `Alive` if it answered the ECS
/// itself; otherwise the most alive view any answering node's gossip has of it (one node
/// that still hears its heartbeat advancing is proof enough that it ran recently), or
/// `None` if no answering node knows it.
pub fn aggregate_liveness(
    name: &str,
    answered_itself: bool,
    answered: &[&NodeStatus],
) -> Option<Liveness> {
    if answered_itself {
        return Some(Liveness::Alive);
    }
    answered
        .iter()
        .filter_map(|s| s.peers.iter().find(|p| p.name == name))
        .map(|p| p.liveness)
        .min()
}

#[cfg(test)]
mod tests {
    use ringkv_wire::PeerLiveness;

    use super::*;

    fn status_seeing(views: &[(&str, Liveness)]) -> NodeStatus {
        NodeStatus {
            name: "x".into(),
            addr: "h:1".into(),
            running: true,
            metadata_version: 1,
            keys: 0,
            writes: 0,
            write_commits: 0,
            hop_batches: 0,
            hop_writes: 0,
            metadata_refused: 0,
            ecs_term: 0,
            locked: vec![],
            peers: views
                .iter()
                .map(|(name, liveness)| PeerLiveness {
                    name: name.to_string(),
                    liveness: *liveness,
                    heartbeat: 1,
                    silent_ms: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_group_member_never_sends_unfenced() {
        let body = || RequestBody::Stop;
        assert_eq!(fence(false, 0, body()), Some(body()), "a single ECS");
        assert_eq!(fence(true, 0, body()), None, "a member that does not lead");
        assert_eq!(
            fence(true, 7, body()),
            Some(RequestBody::Fenced {
                term: 7,
                body: Box::new(body())
            })
        );
    }

    #[test]
    fn liveness_is_the_direct_answer_else_the_most_alive_gossip_view() {
        let a = status_seeing(&[("n3", Liveness::Dead), ("n4", Liveness::Dead)]);
        let b = status_seeing(&[("n3", Liveness::Suspected), ("n4", Liveness::Dead)]);
        let views = [&a, &b];
        assert_eq!(
            aggregate_liveness("n3", true, &views),
            Some(Liveness::Alive)
        );
        assert_eq!(
            aggregate_liveness("n3", false, &views),
            Some(Liveness::Suspected)
        );
        assert_eq!(
            aggregate_liveness("n4", false, &views),
            Some(Liveness::Dead)
        );
        assert_eq!(aggregate_liveness("n5", false, &views), None);
        assert_eq!(aggregate_liveness("n3", false, &[]), None);
    }
}
