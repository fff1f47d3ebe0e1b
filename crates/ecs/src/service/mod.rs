//! The ECS service: answers operators' [`AdminRequest`]s and runs membership plans against
//! the nodes. Decisions live in the pure modules (`executor`, `plan`, `liveness`,
//! `leadership`); this module performs them.
//!
//! # Layout
//! - this file: [`Ecs`], [`bind`], [`run`], the transport's `Service` for it;
//! - `admin`: operators' requests (add and remove nodes, start/stop, status);
//! - `leadership`: taking, confirming and losing the lead of an ECS group;
//! - `liveness`: probes (leases) and failover;
//! - `driver`: the change driver (the executor's actions, resuming, sending to nodes).

mod admin;
mod driver;
mod leadership;
mod liveness;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use quinn::Endpoint;
use ringkv_certs::{Identity, PeerIdentity, Role};
use ringkv_transport::Transport;
use ringkv_transport::{RingSigner, ServeLimits, Service};
use ringkv_wire::{
    AdminReply, AdminRequest, Limits, Liveness, NodeEntry, NodeStatus, RequestBody, RingMetadata,
    WireError,
};

use crate::executor::{Executor, Phase};
use crate::leadership::LeadGate;
use crate::liveness::Probes;
use crate::raft::EcsRaft;
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
    /// The ring, shared: a probe or a request reads it without copying it (a copy per probe
    /// cost O(nodes), so the probe loop O(nodes²): 232 µs of ECS CPU per probe at 1,000 nodes,
    /// `ringkv-bench lease-scale`).
    metadata: RwLock<Arc<RingMetadata>>,
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
    /// The change being driven, as far as it has come, and when it began (`Progress`).
    progress: std::sync::Mutex<Option<(ringkv_wire::ChangeReport, std::time::Instant)>>,
    /// Set when the ECS begins to shut down ([`run`]): it acts no more.
    stopping: std::sync::atomic::AtomicBool,
    /// The names of the last [`REMEMBER_REMOVED`] nodes that left the ring while this
    /// process ran: `remove-node` of one of them is done, not an error ([`Ecs::was_removed`]).
    removed: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// Nodes that stopped on purpose (they answered a probe `Leaving`) and were failed over
    /// for it, by name, as the ring had them (address and zone): added again when they answer
    /// once more ([`Ecs::rejoin_planned`]). Kept by the leader that saw them leave, in memory.
    planned: std::sync::Mutex<std::collections::HashMap<String, NodeEntry>>,
    /// Wakes the probe loop before its next tick (a member that takes the lead leases the
    /// nodes at once).
    probe_now: tokio::sync::Notify,
    /// [`Ecs::probe_interval`] in microseconds, set by the probe loop every round.
    probe_every_us: std::sync::atomic::AtomicU64,
}

/// How many removed nodes' names an ECS remembers (a `remove-node` of one is done, not an
/// error).
pub const REMEMBER_REMOVED: usize = 256;

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
    let probe_every_us = config.probe_interval.as_micros().min(u64::MAX as u128) as u64;
    let ecs = Arc::new(Ecs {
        config,
        nodes,
        signer,
        file,
        metadata: RwLock::new(Arc::new(metadata)),
        change: tokio::sync::Mutex::new(()),
        intents,
        log: std::sync::Mutex::new(log),
        probes: std::sync::Mutex::new(Probes::new()),
        owed: std::sync::Mutex::new(Default::default()),
        raft,
        gate: std::sync::Mutex::new(LeadGate::new(act_for)),
        parked: std::sync::Mutex::new(None),
        progress: std::sync::Mutex::new(None),
        stopping: std::sync::atomic::AtomicBool::new(false),
        removed: std::sync::Mutex::new(Default::default()),
        planned: std::sync::Mutex::new(Default::default()),
        probe_now: tokio::sync::Notify::new(),
        probe_every_us: std::sync::atomic::AtomicU64::new(probe_every_us),
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
    let stopping = ecs.clone();
    let shutdown = async move {
        shutdown.await;
        // From now on it starts nothing: no change, no failover, no lease; what runs is cut
        // off when the tasks are aborted below (a change is resumed from its intent log).
        stopping
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("ECS stopping: it starts no change and leases nothing from now on");
    };
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

impl Ecs {
    /// Makes `ring` the ECS's ring (committed, or the group's state a new leader reloads),
    /// remembering the nodes it no longer has.
    pub(super) fn set_ring(&self, ring: RingMetadata) {
        let mut current = self.metadata.write().expect("metadata lock");
        let mut removed = self.removed.lock().expect("removed lock");
        for gone in current
            .nodes
            .iter()
            .filter(|n| ring.node(&n.name).is_none())
        {
            removed.retain(|name| name != &gone.name);
            if removed.len() == REMEMBER_REMOVED {
                removed.pop_front();
            }
            removed.push_back(gone.name.clone());
        }
        // One that joins again is no longer removed.
        removed.retain(|name| ring.node(name).is_none());
        *current = Arc::new(ring);
    }

    /// Whether the node `name` left the ring while this ECS ran (one of the last
    /// [`REMEMBER_REMOVED`]): a `remove-node` of it sent again is done.
    pub(super) fn was_removed(&self, name: &str) -> bool {
        self.removed
            .lock()
            .expect("removed lock")
            .iter()
            .any(|n| n == name)
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
    /// Whether the ECS has begun to shut down: it then starts no change, fails no node over
    /// and leases none.
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The ECS's current ring metadata.
    pub fn metadata(&self) -> Arc<RingMetadata> {
        self.metadata.read().expect("metadata lock").clone()
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
