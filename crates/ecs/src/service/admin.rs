//! Operators' requests: the admin API (`AdminRequest`), adding and removing nodes,
//! start/stop broadcasts and `status`.

use ringkv_wire::{
    AdminReply, AdminRequest, KeyRange, NodeEntry, NodeReport, NodeStatus, Position, RangeReport,
    ReplyBody, RequestBody, RingMetadata,
};

use super::{aggregate_liveness, Ecs};
use crate::client::already_done;
use crate::plan::{self};
use crate::raft::{EcsRaft, Member, RaftError};
use crate::EcsError;

/// Most ranges short of copies a `Status` reply lists.
pub const MAX_SHORT_RANGES: usize = 4096;

impl Ecs {
    /// Answers one operator request.
    pub async fn answer(&self, request: AdminRequest) -> AdminReply {
        if let AdminRequest::Group = request {
            return AdminReply::Group(self.group());
        }
        if self.stopping() && self.raft.is_none() {
            return AdminReply::Error(
                "the ECS is shutting down: it starts no change; try again once it is back".into(),
            );
        }
        // Everything this request sends nodes is stamped with the term it was decided in.
        // (A group member shutting down answers NotLeader: `ask` moves on to another.)
        let Some(term) = self.acting_term() else {
            return AdminReply::NotLeader {
                leader: self.leader_addr(),
            };
        };
        let result =
            match request {
                AdminRequest::Ring => return AdminReply::Ring((*self.metadata()).clone()),
                AdminRequest::Status => return self.status(term).await,
                AdminRequest::Progress => return AdminReply::Progress(self.progress()),
                AdminRequest::AddNode { name, addr, zone } => {
                    let node = NodeEntry::new(name, addr);
                    self.add_node(match zone {
                        Some(zone) => node.in_zone(zone),
                        None => node,
                    })
                    .await
                }
                AdminRequest::RemoveNode { name } => self.remove_node(&name).await,
                AdminRequest::Start => self.broadcast(term, RequestBody::Start).await,
                AdminRequest::Stop => self.broadcast(term, RequestBody::Stop).await,
                // A Raft message reaches this single ECS only from a misconfigured peer.
                AdminRequest::Raft(_) => return AdminReply::Error(
                    "this ECS is not a member of a replicated ECS group: it takes no Raft messages"
                        .into(),
                ),
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
    pub(super) fn group_member(&self) -> Result<&EcsRaft, EcsError> {
        self.raft.as_ref().ok_or_else(|| {
            EcsError::Config(
                "this ECS is a single process, not a group: start it with --peers to make one"
                    .into(),
            )
        })
    }

    /// Adds `node` to the ring, moving its range to it. Idempotent: a node already in the
    /// ring at that address (a request sent again) is answered `Done`, and nothing runs.
    pub async fn add_node(&self, node: NodeEntry) -> Result<AdminReply, EcsError> {
        let _change = self.change.lock().await;
        self.join(node).await
    }

    /// [`Ecs::add_node`] with `change` held.
    pub(super) async fn join(&self, node: NodeEntry) -> Result<AdminReply, EcsError> {
        // Before the wipe touches the joining node: a deposed leader must not.
        let term = self.confirm_lead().await?;
        self.finish_pending(term).await?;
        // A new ring gets the configured factor; a ring with nodes keeps its own.
        let current = self.metadata();
        // Sent again (the operator's tool lost the member that ran it, or a retry after a
        // timeout) while it ran or after it was done: done, not refused, not run twice.
        let request = AdminRequest::AddNode {
            name: node.name.clone(),
            addr: node.addr.clone(),
            zone: node.zone.clone(),
        };
        if already_done(&request, &current) {
            return Ok(AdminReply::Done(format!(
                "{} is already in the ring at {} (v{}): nothing to do",
                node.name, node.addr, current.version
            )));
        }
        let plan = plan::join_with_replication(&current, node.clone(), self.config.replication)?;
        self.wipe(term, &current, &node).await?;
        self.execute(term, plan).await
    }

    /// Deletes everything a joining node holds (a node that comes back after it was failed
    /// over or removed rejoins empty; its copies come from the ring). It is first given the
    /// current ring, in which it holds nothing, so that it may delete. Refused (and the join
    /// with it) if the node still holds a ring it belongs to, newer than the ECS's.
    pub(super) async fn wipe(
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

    /// Removes the node `name` from the ring. A live node's copies (or, without
    /// replication, its range) are moved first. With replication, a node that is marked
    /// failed, or that does not answer a probe now, is failed over instead: its copies are
    /// rebuilt from the surviving members of its chains. Idempotent: a node this ECS removed
    /// (one of the last [`super::REMEMBER_REMOVED`], while it runs) is answered `Done`.
    pub async fn remove_node(&self, name: &str) -> Result<AdminReply, EcsError> {
        let _change = self.change.lock().await;
        // Removed by the operator: not added again when it is back from a planned stop.
        self.planned.lock().expect("planned lock").remove(name);
        let term = self.confirm_lead().await?;
        self.finish_pending(term).await?;
        let metadata = self.metadata();
        // As for a join sent again ([`Ecs::add_node`]), for a node this ECS removed: one it
        // never had is still an error (a mistyped name).
        if already_done(&AdminRequest::RemoveNode { name: name.into() }, &metadata)
            && self.was_removed(name)
        {
            return Ok(AdminReply::Done(format!(
                "{name} was removed and is not in the ring (v{}): nothing to do",
                metadata.version
            )));
        }
        if metadata.replication > 1
            && metadata.node(name).is_some()
            && (metadata.is_failed(name) || self.silent_through_its_lease(term, name).await)
        {
            return self.fail_over(term, &[name.to_string()]).await;
        }
        let plan = plan::leave(&metadata, name)?;
        self.execute(term, plan).await
    }

    pub(super) async fn broadcast(
        &self,
        term: u64,
        body: RequestBody,
    ) -> Result<AdminReply, EcsError> {
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
    pub(super) async fn status(&self, term: u64) -> AdminReply {
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
        let shares = metadata.shares();
        for ((node, share), answer) in metadata.nodes.iter().zip(shares).zip(&answers) {
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
                share,
                status,
                error,
            });
        }
        if let Ok(_no_change) = self.change.try_lock() {
            if self.pending_change().is_none() && self.metadata().version == metadata.version {
                self.install_at(term, &metadata, behind).await;
            }
        }
        // Only the runs short of copies, and at most so many: a ring of tens of thousands
        // of partitions would not fit in a reply otherwise.
        let full = metadata.chain_len();
        let ranges = metadata
            .chains()
            .into_iter()
            .filter(|(_, chain)| chain.len() < full)
            .take(MAX_SHORT_RANGES)
            .map(|(range, chain)| RangeReport {
                range,
                missing: full.saturating_sub(chain.len()) as u8,
                chain: chain.into_iter().map(|n| n.name.clone()).collect(),
            })
            .collect();
        AdminReply::Status {
            metadata: (*metadata).clone(),
            nodes,
            ranges,
        }
    }
}
