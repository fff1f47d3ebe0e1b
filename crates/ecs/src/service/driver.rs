//! The change driver: performs the executor's actions (persist, commit, run a step against a
//! node, wait), resumes pending changes, and sends nodes requests stamped with the term they
//! were decided in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Semaphore;

use ringkv_transport::TransportError;
use ringkv_wire::{
    AdminReply, ChangeReport, MoveId, MoveReport, NodeEntry, Reply, ReplyBody, Request,
    RequestBody, RingMetadata,
};

use super::{fence, Ecs};
use crate::executor::{Action, Executor, Intent, Outcome, Phase, ABANDONED};
use crate::plan::{Plan, Step};
use crate::raft::{EcsCommand, RaftError};
use crate::state::IntentLog;
use crate::EcsError;

/// Most steps of a stage, or installs of a republish, under way at once.
const STEPS_AT_ONCE: usize = 64;

impl Ecs {
    /// The change in progress in the intent log, if any.
    pub fn pending_change(&self) -> Option<Intent> {
        self.log.lock().expect("log lock").pending.clone()
    }

    /// Drives the change left in the intent log (by a crash, or by steps that could not be
    /// completed yet) to its end, if there is one. Called with `change` held.
    pub(super) async fn finish_pending(&self, term: u64) -> Result<(), EcsError> {
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
        // A failover rolled back here (it was pending) pardons the nodes it would have
        // failed: certainly not committed, they may be leased again.
        let current = self.metadata();
        let failing: Vec<String> = exec
            .intent()
            .plan
            .metadata
            .failed
            .iter()
            .filter(|name| !current.is_failed(name))
            .cloned()
            .collect();
        match self.drive(term, exec, first).await {
            Err(EcsError::Aborted { .. }) => {
                self.pardon(&failing);
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Resumes the pending change, if any, unless a change is running (the background task
    /// of [`super::run`] calls this periodically).
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

    pub(super) async fn execute(&self, term: u64, plan: Plan) -> Result<AdminReply, EcsError> {
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
    pub(super) async fn drive(
        &self,
        term: u64,
        exec: Executor,
        first: Action,
    ) -> Result<AdminReply, EcsError> {
        let report = fresh_report(exec.intent(), "start");
        *self.progress.lock().expect("progress lock") = Some((report, Instant::now()));
        // Cleared however the drive ends (done, parked, deposed, or dropped).
        struct Over<'a>(&'a Ecs);
        impl Drop for Over<'_> {
            fn drop(&mut self) {
                *self.0.progress.lock().expect("progress lock") = None;
            }
        }
        let _over = Over(self);
        self.drive_actions(term, exec, first).await
    }

    /// The change under way, as far as it has come; a change left in the intent log that
    /// no drive runs right now (its retries are waiting in the background) is reported as
    /// pending. `None` when there is none.
    pub fn progress(&self) -> Option<ChangeReport> {
        let progress = self.progress.lock().expect("progress lock");
        if let Some((report, started)) = progress.as_ref() {
            return Some(ChangeReport {
                elapsed_ms: started.elapsed().as_millis() as u64,
                ..report.clone()
            });
        }
        drop(progress);
        let intent = self.pending_change()?;
        Some(fresh_report(
            &intent,
            "pending: the ECS goes on with it in the background",
        ))
    }

    /// Records the executor's next action in the progress report.
    fn note_action(&self, exec: &Executor, action: &Action) {
        let mut progress = self.progress.lock().expect("progress lock");
        let Some((report, _)) = progress.as_mut() else {
            return;
        };
        let (stage, stages) = exec.stage();
        report.stage = (stage + 1).min(stages) as u32;
        report.stages = stages as u32;
        report.phase = phase_name(exec.intent().phase).into();
        report.doing = match action {
            Action::Persist(_) => "persist the intent",
            Action::Commit(_) => "commit",
            Action::Run(steps) => steps.first().map_or("run", Step::kind),
            Action::Wait(_) => "wait to retry",
            Action::Finish(_) => "finish",
        }
        .into();
    }

    /// Records what a step moved in the progress report.
    fn note_step(&self, step: &Step, outcome: &Outcome) {
        let Outcome::Ok { stats, .. } = outcome else {
            return;
        };
        let mut progress = self.progress.lock().expect("progress lock");
        let Some((report, _)) = progress.as_mut() else {
            return;
        };
        if let Some(stats) = stats {
            report.entries += stats.entries;
            report.bytes += stats.bytes;
        }
        if matches!(step, Step::Transfer { .. }) {
            report.copies_sent += 1;
        }
    }

    /// [`Ecs::drive`]'s loop.
    async fn drive_actions(
        &self,
        term: u64,
        mut exec: Executor,
        first: Action,
    ) -> Result<AdminReply, EcsError> {
        let started = Instant::now();
        let plan = exec.intent().plan.clone();
        // Lock timing: from the first lock taken to the install at the last lock holder (its
        // lock ends when it adopts the new version).
        let holders: Vec<String> = plan.locks().iter().map(|(n, _)| n.name.clone()).collect();
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
            self.note_action(&exec, &action);
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
                    if matches!(outcome, Outcome::Ok { .. }) {
                        // A node the change adds serves only once leased, and a first lease
                        // takes two probes: lease it now, while the ring is installed, not
                        // a probe interval from now (clients would meet STOPPED meanwhile).
                        self.probe_now.notify_one();
                    }
                    if let Outcome::Unknown(reason) = &outcome {
                        tracing::warn!(change = intent.change, version = intent.plan.metadata.version, %reason, "the commit's outcome is unknown; proposing it again");
                        last_failure =
                            format!("commit version {}: {reason}", intent.plan.metadata.version);
                    }
                    outcome
                }
                Action::Run(steps) => {
                    // Before the commit one failure rolls the change back whatever the rest
                    // of the stage does: stop at the first, not after the slowest copy.
                    let stop_at_failure = exec.intent().phase == Phase::Forward;
                    let ran = self
                        .run_stage(term, steps, exec.move_id(), &plan, stop_at_failure)
                        .await;
                    let mut outcomes = Vec::with_capacity(ran.len());
                    for (step, (outcome, ended)) in steps.iter().zip(ran) {
                        let ok = matches!(outcome, Outcome::Ok { .. });
                        if let Outcome::Failed(reason) | Outcome::Unknown(reason) = &outcome {
                            last_failure = format!("{}: {reason}", step.describe());
                        }
                        match step {
                            Step::Lock { .. } if ok => {
                                locked_at = Some(locked_at.map_or(ended, |t: Instant| t.min(ended)))
                            }
                            Step::Install { node } if ok && holders.contains(&node.name) => {
                                let held = locked_at.map_or(Duration::ZERO, |t| ended - t);
                                locked_for = locked_for.max(held);
                            }
                            _ => {}
                        }
                        outcomes.push(outcome);
                    }
                    Outcome::Ran(outcomes)
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
                                moved: (!plan.copies.is_empty()).then(|| MoveReport {
                                    from: distinct(plan.copies.iter().map(|c| &c.from.name)),
                                    to: distinct(plan.copies.iter().map(|c| &c.to.name)),
                                    copies: plan.copies.len() as u32,
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
    pub(super) async fn persist_intent(&self, pending: Option<Intent>) -> Outcome {
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
    pub(super) async fn commit(&self, intent: &Intent) -> Outcome {
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
            self.set_ring(intent.plan.metadata.clone());
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
    pub(super) fn adopt_committed(&self, metadata: &RingMetadata) {
        if self.metadata().version >= metadata.version {
            return;
        }
        if let Err(e) = self.file.save(metadata) {
            tracing::error!(error = %e, "could not persist the committed ring; the intent log keeps it");
        }
        self.set_ring(metadata.clone());
    }

    /// Runs the steps of one stage of move `id` at once (with `stop_at_failure`, only until
    /// one of them fails), at most
    /// [`crate::config::EcsConfig::steps_per_node`] of them at any node and
    /// [`STEPS_AT_ONCE`] in all, and returns each one's outcome and when it ended, in the
    /// order of `steps`.
    async fn run_stage(
        &self,
        term: u64,
        steps: &[Step],
        id: MoveId,
        plan: &Plan,
        stop_at_failure: bool,
    ) -> Vec<(Outcome, Instant)> {
        let per_node = self.config.steps_per_node.max(1);
        let mut limits: HashMap<&str, Arc<Semaphore>> = HashMap::new();
        for node in steps.iter().flat_map(Step::nodes) {
            limits
                .entry(node.name.as_str())
                .or_insert_with(|| Arc::new(Semaphore::new(per_node)));
        }
        let limits = &limits;
        let started: Vec<_> = steps
            .iter()
            .enumerate()
            .map(|(i, step)| self.run_limited(term, i, step, id, plan, limits))
            .collect();
        let mut running = futures::stream::iter(started).buffer_unordered(STEPS_AT_ONCE);
        let mut ran: Vec<Option<(Outcome, Instant)>> = vec![None; steps.len()];
        while let Some((i, outcome, ended)) = running.next().await {
            let failed = !matches!(outcome, Outcome::Ok { .. });
            ran[i] = Some((outcome, ended));
            if failed && stop_at_failure {
                break;
            }
        }
        // Dropping the stream abandons the steps still running (their requests may go on at
        // their nodes until the rollback's aborts stop them) and never sends the others:
        // their outcome is unknown, which the rollback covers (it aborts at every lock holder
        // and receiver, and a node refuses a late request of an aborted move).
        drop(running);
        let now = Instant::now();
        ran.into_iter()
            .map(|r| r.unwrap_or_else(|| (Outcome::Unknown(ABANDONED.into()), now)))
            .collect()
    }

    /// Runs step `i` of a stage once it holds a permit of `limits` for each of its nodes
    /// (taken in name order, so two steps never wait for each other's).
    async fn run_limited(
        &self,
        term: u64,
        i: usize,
        step: &Step,
        id: MoveId,
        plan: &Plan,
        limits: &HashMap<&str, Arc<Semaphore>>,
    ) -> (usize, Outcome, Instant) {
        let mut names: Vec<&str> = step.nodes().iter().map(|n| n.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut permits = Vec::with_capacity(names.len());
        for name in names {
            let limit = limits[name].clone();
            permits.push(limit.acquire_owned().await.expect("never closed"));
        }
        if let Some(hook) = &self.config.before_step {
            (hook.0)(step);
        }
        let started = Instant::now();
        let outcome = self.run_step(term, step, id, plan).await;
        self.note_step(step, &outcome);
        let ok = matches!(outcome, Outcome::Ok { .. });
        tracing::info!(change = id.change, step = %step.describe(), elapsed = ?started.elapsed(), ok, "step");
        (i, outcome, Instant::now())
    }

    /// Runs one step of move `id` against its node.
    pub(super) async fn run_step(
        &self,
        term: u64,
        step: &Step,
        id: MoveId,
        plan: &Plan,
    ) -> Outcome {
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
    pub(super) async fn call(
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
    pub(super) fn stamp(&self, term: u64, body: RequestBody) -> Option<RequestBody> {
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

    /// Signs `metadata` and installs it at `nodes`, up to [`STEPS_AT_ONCE`] at a time (best
    /// effort: a node that fails or does not adopt it is logged). Concurrent, so that dead
    /// nodes cost one `node_timeout` together rather than one each while the caller (a
    /// republish) holds the change mutex.
    pub(super) async fn install_at<'a>(
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
        let nodes: Vec<&NodeEntry> = nodes.into_iter().collect();
        futures::stream::iter(nodes)
            .for_each_concurrent(STEPS_AT_ONCE, |node| {
                let body = RequestBody::InstallMetadata {
                    metadata: signed.clone(),
                };
                async move {
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
            })
            .await;
    }
}

/// The progress report of `intent` before any of it ran here, doing `doing`.
fn fresh_report(intent: &Intent, doing: &str) -> ChangeReport {
    ChangeReport {
        change: intent.change,
        version: intent.plan.metadata.version,
        phase: phase_name(intent.phase).into(),
        stage: 0,
        stages: 0,
        doing: doing.into(),
        copies: intent.plan.copies.len() as u32,
        copies_sent: 0,
        entries: 0,
        bytes: 0,
        elapsed_ms: 0,
    }
}

/// A phase as progress reports name it.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Forward => "forward",
        Phase::Committed => "committed",
        Phase::RollingBack => "rolling back",
    }
}

/// Each name once, in the order of its first appearance.
fn distinct<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    out
}
