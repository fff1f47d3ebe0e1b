//! Liveness and failover: the probe loop (leases), the failover loop, and failing nodes over
//! (decisions in [`crate::liveness`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_wire::{AdminReply, NodeEntry, Reply, ReplyBody, RequestBody};

use super::{Ecs, FAILOVER_RETRY};
use crate::liveness::{Detector, FailoverDecision};
use crate::plan;
use crate::EcsError;

impl Ecs {
    /// The `failover_after` this ECS acts on: a group's, fixed by its first leader in the
    /// replicated state and taken by every leader whatever its own configuration says (the
    /// lease bound across a leader change needs one value, ARCHITECTURE.md §11; a member
    /// acts only once the group has one, `Ecs::take_lead`); a single ECS's own.
    pub fn failover_after(&self) -> Duration {
        self.raft
            .as_ref()
            .and_then(|raft| raft.state().settings)
            .map_or(self.config.failover_after, |s| s.failover_after())
    }

    /// The interval between two probes of a node now: `--probe-interval`, stretched in a
    /// large ring to keep to `--max-probe-rate` ([`crate::liveness::probe_interval`]), as the
    /// probe loop last set it (once a round: it counts the ring's live nodes).
    pub(super) fn probe_interval(&self) -> Duration {
        Duration::from_micros(
            self.probe_every_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Sets [`Ecs::probe_interval`] for a ring of `live` live nodes, and returns it.
    fn set_probe_interval(&self, live: usize) -> Duration {
        let interval = crate::liveness::probe_interval(
            self.config.probe_interval,
            live,
            self.config.max_probe_rate,
            self.failover_after(),
        );
        let micros = interval.as_micros().min(u64::MAX as u128) as u64;
        let before = self
            .probe_every_us
            .swap(micros, std::sync::atomic::Ordering::Relaxed);
        if before != micros && interval != self.config.probe_interval {
            match crate::liveness::failover_after_within_budget(
                live,
                self.config.max_probe_rate,
                self.failover_after(),
            ) {
                None => tracing::info!(
                    live,
                    ?interval,
                    max_probe_rate = self.config.max_probe_rate,
                    "probe interval stretched to keep to the probe budget"
                ),
                Some(needed) => tracing::warn!(
                    live,
                    ?interval,
                    probes_per_sec = (live as f64 / interval.as_secs_f64()).round(),
                    max_probe_rate = self.config.max_probe_rate,
                    failover_after_needed = ?needed,
                    "the ring has outgrown the probe budget: every lease still needs a probe every quarter of failover_after; a group started with a failover_after of at least failover_after_needed (or a larger --max-probe-rate) keeps to it"
                ),
            }
        }
        interval
    }

    /// How long a probe (dial included) may take: two probe intervals, at least 200 ms.
    fn probe_timeout(&self) -> Duration {
        self.probe_interval().max(Duration::from_millis(100)) * 2
    }

    /// The lease each probe grants: half of [`Ecs::failover_after`], so that a node cut off
    /// from the ECS has stopped serving for at least as long again when the ECS replaces it
    /// (covering clocks that run at up to twice each other's rate).
    pub(super) fn lease(&self) -> Duration {
        self.failover_after() / 2
    }

    /// The detector of the failover policy, with [`Ecs::failover_after`].
    fn detector(&self) -> Detector {
        Detector::new(self.probe_interval(), self.failover_after())
    }

    /// Whether `node` has answered no probe for `failover_after` in a replicated ring: it is
    /// (about to be) failed over, so a step a change still has to send it (an install, start
    /// or clear after the commit; an abort of a rollback) is skipped, so that a dead node
    /// cannot wedge the change that would fail it over, and owed to it instead: sent if it
    /// answers again ([`Ecs::pay_owed`]).
    pub(super) fn given_up(&self, node: &NodeEntry) -> bool {
        let probes = self.probes.lock().expect("probes lock");
        self.metadata().replication > 1
            && (probes.is_leaving(&node.name)
                || probes.silent_for(&node.name, Instant::now()) > self.failover_after())
    }

    /// For `remove-node`: whether `name` is dead rather than live. If it answers a probe now
    /// it is live. If not, it is dead only once it has been silent for `failover_after`
    /// (its lease is surely over then); this waits for that, unless it answers meanwhile.
    /// A dead node is condemned in the same step ([`crate::liveness::Probes::condemn`]): never
    /// leased again.
    pub(super) async fn silent_through_its_lease(&self, term: u64, name: &str) -> bool {
        if self.probe_now(term, name).await {
            return false;
        }
        let deadline = Instant::now() + self.failover_after() * 2;
        loop {
            if self.probes.lock().expect("probes lock").condemn(
                name,
                self.failover_after(),
                Instant::now(),
            ) {
                return true;
            }
            if Instant::now() >= deadline || self.probe_now(term, name).await {
                return false;
            }
            tokio::time::sleep(self.probe_interval()).await;
        }
    }

    /// Fails the nodes `names` over (called with `change` held, each condemned or already
    /// failed): marks them failed in one change (those not failed yet), then rebuilds their
    /// copies elsewhere and removes them from the ring, one after the other. If the first
    /// change is rolled back (certainly not committed), they are pardoned: leased again if
    /// they answer.
    pub(super) async fn fail_over(
        &self,
        term: u64,
        names: &[String],
    ) -> Result<AdminReply, EcsError> {
        let started = Instant::now();
        let metadata = self.metadata();
        let unmarked: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|name| !metadata.is_failed(name))
            .collect();
        if !unmarked.is_empty() {
            // Pardoned only when the change certainly did not commit: refused by the planner,
            // or rolled back. Pending or deposed, it may still commit.
            let marked = match plan::fail_all(&metadata, &unmarked) {
                Ok(plan) => self.execute(term, plan).await,
                Err(e) => {
                    self.pardon(&unmarked);
                    return Err(e);
                }
            };
            if let Err(e) = marked {
                if matches!(e, EcsError::Aborted { .. }) {
                    self.pardon(&unmarked);
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

    /// Adds again (called with `change` held) the nodes that were failed over because they
    /// stopped on purpose ([`Ecs::planned`](super::Ecs)) and answer now: each is wiped and
    /// joins as `add-node` would have it. One still in the ring is forgotten (it came back
    /// before it was failed over, or is still being removed: then it waits).
    pub(super) async fn rejoin_planned(&self, term: u64) -> Result<(), EcsError> {
        let planned: Vec<NodeEntry> = self
            .planned
            .lock()
            .expect("planned lock")
            .values()
            .cloned()
            .collect();
        for node in planned {
            let name = node.name.clone();
            let metadata = self.metadata();
            if metadata.node(&name).is_some() {
                let leaving = {
                    let probes = self.probes.lock().expect("probes lock");
                    probes.is_leaving(&name) || probes.is_condemned(&name)
                };
                if !leaving && !metadata.is_failed(&name) {
                    // Back before it was failed over (a full restart held off): it stays.
                    self.planned.lock().expect("planned lock").remove(&name);
                }
                continue; // else: not failed over yet, or its removal has not finished
            }
            // As it was added: its address and its zone.
            let timeout = self.probe_timeout();
            if let Err(e) = self.call(term, &node, RequestBody::Status, timeout).await {
                tracing::debug!(node = %name, error = %e, "node that stopped on purpose not back yet");
                continue;
            }
            tracing::info!(node = %name, "node back from a planned stop: adding it again");
            self.join(node).await?;
            self.planned.lock().expect("planned lock").remove(&name);
            tracing::info!(node = %name, version = self.metadata().version, "node back from a planned stop added again");
        }
        Ok(())
    }

    /// The nodes `names` may be leased again: the change that would have failed them over
    /// certainly did not commit.
    pub(super) fn pardon(&self, names: &[impl AsRef<str>]) {
        let mut probes = self.probes.lock().expect("probes lock");
        names.iter().for_each(|name| probes.pardon(name.as_ref()));
    }

    /// One liveness probe of `name` outside the probe loop, echoing its last stamp, unless
    /// it is condemned: whether it answered in time.
    pub(super) async fn probe_now(&self, term: u64, name: &str) -> bool {
        let echo = {
            let probes = self.probes.lock().expect("probes lock");
            if probes.is_condemned(name) {
                return false;
            }
            probes.echo(name)
        };
        let Some(node) = self.metadata().node(name).cloned() else {
            return false;
        };
        self.probe(term, &node, echo).await
    }

    /// One liveness probe of `name` (a lease renewal, echoing `echo`, the stamp chosen when
    /// the probe was decided): whether it answered in time.
    pub(super) async fn probe(&self, term: u64, node: &NodeEntry, echo: Option<u64>) -> bool {
        let name = node.name.as_str();
        let lease = self.lease();
        let body = RequestBody::Lease {
            millis: lease.as_millis().min(u32::MAX as u128) as u32,
            echo,
        };
        // Dialing included: a dead node's probe ends within this, and the next one waits
        // for it (one per node under way), so it never holds up anyone else's.
        let timeout = self.probe_timeout();
        match tokio::time::timeout(timeout, self.call(term, node, body, timeout)).await {
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
            Ok(Ok(Reply {
                body: ReplyBody::Leaving,
                ..
            })) => {
                let first = {
                    let mut probes = self.probes.lock().expect("probes lock");
                    let first = !probes.is_leaving(name);
                    probes.left(name, Instant::now());
                    first
                };
                if first && self.metadata().replication > 1 {
                    tracing::warn!(node = %name, "node stopping on purpose: taking it out of its chains in half a failover_after; it is added again when it is back");
                    self.planned
                        .lock()
                        .expect("planned lock")
                        .insert(name.to_string(), node.clone());
                }
                false
            }
            _ => false,
        }
    }

    /// The probe loop ([`crate::liveness`]): every [`Ecs::probe_interval`], probes (and leases)
    /// every live node of the ring, each in a task of its own, at most one per node under
    /// way; a node that answers gets the steps a change had to skip while it was silent.
    /// Nothing else runs in this loop, so a failover or a long change never delays a lease.
    pub(super) async fn probe_loop(self: Arc<Self>) {
        // The interval is read afresh every round: it stretches as the ring grows.
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                // A new lead: lease the nodes at once, not at the next tick.
                () = self.probe_now.notified() => {}
            }
            let metadata = self.metadata();
            let live = metadata.live_names();
            next = tokio::time::Instant::now() + self.set_probe_interval(live.len());
            let Some(term) = self.acting_term() else {
                continue;
            };
            let detector = self.detector();
            let due = {
                let mut probes = self.probes.lock().expect("probes lock");
                let now = Instant::now();
                probes.retain(live.iter().copied());
                // The guard's view is kept up to date here, every tick, whatever holds up
                // the failover loop (a long change holds the change mutex).
                probes.observe(&live, detector, now);
                probes.due(live.iter().copied(), now)
            };
            self.owed
                .lock()
                .expect("owed lock")
                .retain(|name, _| metadata.node(name).is_some());
            // Nothing per probe walks the ring (three scans per probe before: 2–6 % of a
            // probe's cost at 1,000–4,000 nodes, ARCHITECTURE.md §11).
            let entries: HashMap<&str, &NodeEntry> = metadata
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n))
                .collect();
            let version = metadata.version;
            for (name, mut echo) in due {
                let Some(node) = entries.get(name.as_str()).map(|n| (*n).clone()) else {
                    continue;
                };
                let ecs = self.clone();
                tokio::spawn(async move {
                    let answered = loop {
                        let answered = ecs.probe(term, &node, echo).await;
                        // Live at this round's ring (`due` holds live nodes only), unless
                        // the ring changed since.
                        let live = {
                            let ring = ecs.metadata();
                            ring.version == version
                                || (ring.node(&name).is_some() && !ring.is_failed(&name))
                        };
                        let mut probes = ecs.probes.lock().expect("probes lock");
                        match probes.follow_up(&name, echo, live).filter(|_| answered) {
                            Some(stamp) => echo = Some(stamp),
                            None => {
                                probes.done(&name);
                                break answered;
                            }
                        }
                    };
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
    pub(super) async fn pay_owed(&self, term: u64, node: &NodeEntry) {
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
        if self.acting_term() != Some(term) {
            return; // deposed since the probe was decided
        }
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
    /// silent for `failover_after`, all in one change ([`crate::liveness::Probes::decide`]:
    /// none while half the nodes or more are silent), condemning them first so that none is
    /// leased again; and finishes the removal of failed nodes whose rebuild did not complete.
    /// An attempt that did not finish is tried again after [`FAILOVER_RETRY`].
    pub(super) async fn failover_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            // That may have taken long: decide only if this member still leads in `term`.
            if self.acting_term() != Some(term) {
                continue;
            }
            let metadata = self.metadata();
            let live = metadata.live_names();
            let detector = self.detector();
            let todo: Vec<String> = {
                let mut probes = self.probes.lock().expect("probes lock");
                let now = Instant::now();
                match probes.decide(&live, detector, now) {
                    FailoverDecision::FailOver(silent) => {
                        for name in &silent {
                            probes.condemn(name, detector.failover_after, now);
                        }
                        tracing::warn!(nodes = ?silent, "failing over silent nodes");
                    }
                    FailoverDecision::HoldOff { silent }
                        if silent.iter().all(|name| probes.is_leaving(name)) =>
                    {
                        tracing::warn!(
                            ?silent,
                            "half the nodes or more are stopping on purpose (a planned restart?); failing none over"
                        );
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
                if let Err(e) = self.rejoin_planned(term).await {
                    tracing::warn!(error = %e, "a node back from a planned stop not added again yet; retrying in {FAILOVER_RETRY:?}");
                    retry_at = Some(Instant::now() + FAILOVER_RETRY);
                }
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
}
