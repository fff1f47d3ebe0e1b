//! The ECS service: answers operators' [`AdminRequest`]s and runs membership plans against
//! the nodes.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use quinn::Endpoint;
use ringkv_certs::{Identity, Role};
use ringkv_transport::Service;
use ringkv_transport::{Transport, TransportError};
use ringkv_wire::{
    AdminReply, AdminRequest, Limits, Liveness, MoveReport, NodeEntry, NodeReport, NodeStatus,
    Reply, ReplyBody, Request, RequestBody, RingMetadata, TransferStats, WireError,
};

use crate::plan::{self, Plan, Step};
use crate::state::RingFile;
use crate::{EcsConfig, EcsError};

/// The External Configuration Service.
///
/// Invariant: at most one membership change runs at a time (`change` is held for its whole
/// duration), and `metadata` only ever moves to a higher version, after it was persisted.
pub struct Ecs {
    config: EcsConfig,
    nodes: Transport,
    file: RingFile,
    metadata: RwLock<RingMetadata>,
    change: tokio::sync::Mutex<()>,
}

/// Binds the ECS endpoint and loads its persisted ring.
pub async fn bind(
    config: EcsConfig,
    identity: &Identity,
) -> Result<(Endpoint, Arc<Ecs>), EcsError> {
    ringkv_certs::install_crypto_provider();
    let endpoint = Endpoint::server(ringkv_certs::server_config(identity)?, config.listen)?;
    let nodes = Transport::new(
        endpoint.clone(),
        ringkv_certs::client_config(identity)?,
        Limits::default(),
        config.node_timeout,
        config.node_timeout,
    );
    let file = RingFile::in_dir(&config.state_dir)?;
    let metadata = file.load()?;
    tracing::info!(
        version = metadata.version,
        nodes = metadata.nodes.len(),
        "ECS state loaded"
    );
    let ecs = Arc::new(Ecs {
        config,
        nodes,
        file,
        metadata: RwLock::new(metadata),
        change: tokio::sync::Mutex::new(()),
    });
    Ok((endpoint, ecs))
}

/// Serves the ECS until `shutdown`. On start it republishes its ring to every node (best
/// effort), so nodes that missed a version while it was down catch up.
pub async fn run(endpoint: Endpoint, ecs: Arc<Ecs>, shutdown: impl Future<Output = ()>) {
    let republish = ecs.clone();
    tokio::spawn(async move {
        republish.republish().await;
    });
    ringkv_transport::serve(endpoint, ecs, shutdown).await;
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

    async fn handle(&self, role: Role, request: AdminRequest) -> AdminReply {
        if role != Role::Admin {
            return AdminReply::Error(format!(
                "a {role} certificate may not talk to the ECS; an admin certificate is needed"
            ));
        }
        self.answer(request).await
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
        let result = match request {
            AdminRequest::Ring => return AdminReply::Ring(self.metadata()),
            AdminRequest::Status => return self.status().await,
            AdminRequest::AddNode { name, addr } => self.add_node(NodeEntry::new(name, addr)).await,
            AdminRequest::RemoveNode { name } => self.remove_node(&name).await,
            AdminRequest::Start => self.broadcast(RequestBody::Start).await,
            AdminRequest::Stop => self.broadcast(RequestBody::Stop).await,
        };
        result.unwrap_or_else(|e| AdminReply::Error(e.to_string()))
    }

    /// Adds `node` to the ring, moving its range to it.
    pub async fn add_node(&self, node: NodeEntry) -> Result<AdminReply, EcsError> {
        let _change = self.change.lock().await;
        let plan = plan::join(&self.metadata(), node)?;
        self.execute(plan).await
    }

    /// Removes the node `name` from the ring, moving its range to its successor.
    pub async fn remove_node(&self, name: &str) -> Result<AdminReply, EcsError> {
        let _change = self.change.lock().await;
        let plan = plan::leave(&self.metadata(), name)?;
        self.execute(plan).await
    }

    async fn execute(&self, plan: Plan) -> Result<AdminReply, EcsError> {
        let started = Instant::now();
        let version = self.metadata().version;
        tracing::info!(
            version = plan.metadata.version,
            steps = plan.steps.len(),
            "membership change starting"
        );
        let commit = plan.commit_index();
        let mut moved = TransferStats::default();
        let mut locked_at = None;
        let mut locked_for = Duration::ZERO;
        for (i, step) in plan.steps.iter().enumerate() {
            let step_started = Instant::now();
            let result = self.run_step(step, &plan).await;
            tracing::info!(step = %step.describe(), elapsed = ?step_started.elapsed(), ok = result.is_ok(), "step");
            match result {
                Ok(stats) => {
                    match step {
                        Step::Lock { .. } => locked_at = Some(Instant::now()),
                        Step::Unlock { .. } => {
                            locked_for = locked_at.map_or(Duration::ZERO, |t| t.elapsed())
                        }
                        _ => {}
                    }
                    if let Some(s) = stats {
                        moved.entries += s.entries;
                        moved.bytes += s.bytes;
                    }
                }
                Err(reason) if i < commit => {
                    tracing::warn!(step = %step.describe(), %reason, "step failed before commit; rolling back");
                    for undo in plan.rollback() {
                        if let Err(e) = self.run_step(&undo, &plan).await {
                            tracing::warn!(step = %undo.describe(), error = %e, "rollback step failed (harmless, see Plan::rollback)");
                        }
                    }
                    return Err(EcsError::Aborted {
                        step: step.describe(),
                        reason,
                        version,
                    });
                }
                Err(reason) => {
                    // Past the commit the change stands; nodes that missed it catch up by
                    // gossip, or on the next republish (ECS start, `status`).
                    tracing::warn!(step = %step.describe(), %reason, "step failed after commit; continuing");
                }
            }
        }
        tracing::info!(version = plan.metadata.version, elapsed = ?started.elapsed(), "membership change done");
        Ok(AdminReply::Changed {
            metadata: plan.metadata.clone(),
            moved: plan.moved.as_ref().map(|mv| MoveReport {
                from: mv.from.name.clone(),
                to: mv.to.name.clone(),
                range: mv.range,
                entries: moved.entries,
                bytes: moved.bytes,
                locked_ms: locked_for.as_millis() as u64,
                total_ms: started.elapsed().as_millis() as u64,
            }),
        })
    }

    /// Runs one step; `Ok(Some(stats))` for a transfer.
    async fn run_step(&self, step: &Step, plan: &Plan) -> Result<Option<TransferStats>, String> {
        let (node, body, timeout) = match step {
            Step::Commit => {
                self.file.save(&plan.metadata).map_err(|e| e.to_string())?;
                *self.metadata.write().expect("metadata lock") = plan.metadata.clone();
                return Ok(None);
            }
            Step::Clear { node, range } => (
                node,
                RequestBody::DeleteRange { range: *range },
                self.config.node_timeout,
            ),
            Step::Lock { node, range } => (
                node,
                RequestBody::LockRange { range: *range },
                self.config.node_timeout,
            ),
            Step::Unlock { node, range } => (
                node,
                RequestBody::UnlockRange { range: *range },
                self.config.node_timeout,
            ),
            Step::Transfer { from, to, range } => (
                from,
                RequestBody::TransferRange {
                    range: *range,
                    to: to.clone(),
                },
                self.config.transfer_timeout,
            ),
            Step::TransferDelta { from, to, range } => (
                from,
                RequestBody::TransferDelta {
                    range: *range,
                    to: to.clone(),
                },
                self.config.transfer_timeout,
            ),
            Step::Install { node } => (
                node,
                RequestBody::InstallMetadata {
                    metadata: plan.metadata.clone(),
                },
                self.config.node_timeout,
            ),
            Step::Start { node } => (node, RequestBody::Start, self.config.node_timeout),
        };
        match self.call(node, body, timeout).await {
            Ok(ReplyBody::Ok | ReplyBody::Count(_)) => Ok(None),
            Ok(ReplyBody::Transferred(stats)) => Ok(Some(stats)),
            Ok(other) => Err(format!("{} answered {other:?}", node.name)),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn call(
        &self,
        node: &NodeEntry,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ReplyBody, TransportError> {
        let request = Request::new(self.metadata().version, body);
        let reply: Reply = self.nodes.call(&node.addr, &request, timeout).await?;
        Ok(reply.body)
    }

    /// Sends the current metadata to every node of the ring (best effort).
    pub async fn republish(&self) {
        let metadata = self.metadata();
        for node in &metadata.nodes {
            let body = RequestBody::InstallMetadata {
                metadata: metadata.clone(),
            };
            if let Err(e) = self.call(node, body, self.config.node_timeout).await {
                tracing::warn!(node = %node.name, error = %e, "could not republish metadata");
            }
        }
    }

    async fn broadcast(&self, body: RequestBody) -> Result<AdminReply, EcsError> {
        let metadata = self.metadata();
        let mut failed = Vec::new();
        for node in &metadata.nodes {
            match self
                .call(node, body.clone(), self.config.node_timeout)
                .await
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
    /// node that gossip has not reached, e.g. one cut off from its peers).
    async fn status(&self) -> AdminReply {
        let metadata = self.metadata();
        let timeout = self.config.status_timeout;
        let asks = metadata.nodes.iter().map(|node| async move {
            let asked =
                tokio::time::timeout(timeout, self.call(node, RequestBody::Status, timeout)).await;
            match asked {
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
        for node in behind {
            let body = RequestBody::InstallMetadata {
                metadata: metadata.clone(),
            };
            let _ = self.call(node, body, self.config.node_timeout).await;
        }
        AdminReply::Status { metadata, nodes }
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
