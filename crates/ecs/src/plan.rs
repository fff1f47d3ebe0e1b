//! Membership changes as plans: pure, synchronous decisions (ARCHITECTURE.md §5). The ECS's
//! executor runs the steps against the nodes; everything about *which* steps, in *what*
//! order, and how to undo them is decided here and unit-tested without a network.
//!
//! A move streams a snapshot of the range while writes go on (the sender remembers which
//! keys they touch), then write-locks the range and sends only those keys again: the lock
//! is held for the delta and the metadata handover, not for the bulk copy.
//!
//! Invariants every plan keeps:
//! - The delta is sent with the range write-locked at the sender, and every batch is
//!   acknowledged (persisted by the receiver) before the new metadata is committed; the lock
//!   waits for writes in flight, so the snapshot plus the delta hold every acknowledged write.
//! - [`Step::Commit`] (the ECS persisting the new metadata) is the point of no return:
//!   a failure before it is rolled back ([`Plan::rollback`]), a failure after it is
//!   reported and the remaining steps still run.
//! - The sender adopts the new metadata before the receiver, so at no moment do both
//!   believe they own the range; in between, clients back off and retry.
//! - Data is deleted from the sender only after it holds the new metadata (nodes also
//!   refuse to delete a range they still own).
//! - Only the nodes the change affects get the new metadata from the ECS: the sender and
//!   the receiver of the move (the joining or the leaving node is one of them). Gossip
//!   carries it to the others within a few intervals (ARCHITECTURE.md §6). That is safe before it
//!   arrives: a join or a leave changes the owner of the moved range only, so every other
//!   node owns the same range under both versions. A client routed by either version to
//!   such a node is served there as before; a client routed by the old version into the
//!   moved range reaches the sender, which already holds the new version and answers
//!   `NotResponsible` with it; and an unaffected node that hands out its old metadata
//!   (`GetMetadata`, `NotResponsible`) only ever sends clients to the sender for that range.

use ringkv_wire::{KeyRange, NodeEntry, RangeMove, RingMetadata};

use crate::EcsError;

/// One action of a plan, run against one node (or, for `Commit`, the ECS itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Delete `range` at `node`, which does not own it: stale copies from an earlier,
    /// aborted move must not resurface.
    Clear {
        /// The node.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
    },
    /// Write-lock `range` at `node` (writes answer `WriteLocked`, reads are served).
    Lock {
        /// The node.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
    },
    /// Stream a snapshot of `range` from `from` to `to` (writes stay open; the sender
    /// tracks the keys they touch); done when `to` persisted every batch.
    Transfer {
        /// Sender.
        from: NodeEntry,
        /// Receiver.
        to: NodeEntry,
        /// The range.
        range: KeyRange,
    },
    /// With `range` locked, send `to` every key written since the snapshot.
    TransferDelta {
        /// Sender.
        from: NodeEntry,
        /// Receiver.
        to: NodeEntry,
        /// The range.
        range: KeyRange,
    },
    /// Persist the new metadata at the ECS: the change is now decided.
    Commit,
    /// Send the new metadata to `node`.
    Install {
        /// The node.
        node: NodeEntry,
    },
    /// Make `node` serve clients.
    Start {
        /// The node.
        node: NodeEntry,
    },
    /// Release the write lock on `range` at `node`.
    Unlock {
        /// The node.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
    },
}

impl Step {
    /// A one-line description for logs and operator messages.
    pub fn describe(&self) -> String {
        match self {
            Step::Clear { node, range } => format!("clear {range:?} at {}", node.name),
            Step::Lock { node, range } => format!("write-lock {range:?} at {}", node.name),
            Step::Transfer { from, to, range } => {
                format!("transfer {range:?} from {} to {}", from.name, to.name)
            }
            Step::TransferDelta { from, to, range } => format!(
                "transfer the writes made meanwhile in {range:?} from {} to {}",
                from.name, to.name
            ),
            Step::Commit => "persist the new metadata".to_string(),
            Step::Install { node } => format!("install the new metadata at {}", node.name),
            Step::Start { node } => format!("start {}", node.name),
            Step::Unlock { node, range } => format!("unlock {range:?} at {}", node.name),
        }
    }
}

/// A membership change: the metadata it leads to and the steps that get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The metadata after the change (version + 1).
    pub metadata: RingMetadata,
    /// The range that moves, if any.
    pub moved: Option<RangeMove>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Index of the [`Step::Commit`] step.
    pub fn commit_index(&self) -> usize {
        self.steps
            .iter()
            .position(|s| *s == Step::Commit)
            .expect("every plan commits")
    }

    /// Names of the nodes the plan sends the new metadata to, in order.
    pub fn installed_at(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Install { node } => Some(node.name.clone()),
                _ => None,
            })
            .collect()
    }

    /// The steps that undo a failure before the commit: release the lock and remove any
    /// partial copy at the receiver. Best effort: the nodes they target may be down, which
    /// is harmless (a restarted node holds no lock; a partial copy is never served, and the
    /// next move to that node clears it first).
    pub fn rollback(&self) -> Vec<Step> {
        match &self.moved {
            Some(mv) => vec![
                Step::Unlock {
                    node: mv.from.clone(),
                    range: mv.range,
                },
                Step::Clear {
                    node: mv.to.clone(),
                    range: mv.range,
                },
            ],
            None => vec![],
        }
    }
}

/// The steps that move `mv.range` from `mv.from` to `mv.to` and seed the new metadata at
/// both (gossip takes it to the other nodes); `start_receiver` for a joining node, which
/// must also start serving.
fn move_steps(mv: &RangeMove, start_receiver: bool) -> Vec<Step> {
    let (from, to, range) = (&mv.from, &mv.to, mv.range);
    let mut steps = vec![
        Step::Clear {
            node: to.clone(),
            range,
        },
        Step::Transfer {
            from: from.clone(),
            to: to.clone(),
            range,
        },
        Step::Lock {
            node: from.clone(),
            range,
        },
        Step::TransferDelta {
            from: from.clone(),
            to: to.clone(),
            range,
        },
        Step::Commit,
        Step::Install { node: from.clone() },
        Step::Install { node: to.clone() },
    ];
    if start_receiver {
        steps.push(Step::Start { node: to.clone() });
    }
    steps.extend([
        Step::Unlock {
            node: from.clone(),
            range,
        },
        Step::Clear {
            node: from.clone(),
            range,
        },
    ]);
    steps
}

/// The plan for `node` joining the ring `current`.
pub fn join(current: &RingMetadata, node: NodeEntry) -> Result<Plan, EcsError> {
    let metadata = current.with_node(node.clone())?;
    let Some(mv) = current.join_move(&node)? else {
        // The first node: nothing to move.
        return Ok(Plan {
            metadata,
            moved: None,
            steps: vec![
                Step::Commit,
                Step::Install { node: node.clone() },
                Step::Start { node },
            ],
        });
    };
    let steps = move_steps(&mv, true);
    Ok(Plan {
        metadata,
        moved: Some(mv),
        steps,
    })
}

/// The plan for the node `name` leaving the ring `current`.
pub fn leave(current: &RingMetadata, name: &str) -> Result<Plan, EcsError> {
    let metadata = current.without_node(name)?;
    let Some(mv) = current.leave_move(name)? else {
        return Err(EcsError::LastNode(name.to_string()));
    };
    let steps = move_steps(&mv, false);
    Ok(Plan {
        metadata,
        moved: Some(mv),
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> RingMetadata {
        let nodes = (0..n)
            .map(|i| NodeEntry::new(format!("n{i}"), format!("127.0.0.1:{}", 7000 + i)))
            .collect();
        RingMetadata::new(1, nodes).unwrap()
    }

    fn position_of(plan: &Plan, pred: impl Fn(&Step) -> bool) -> usize {
        plan.steps.iter().position(pred).expect("step present")
    }

    #[test]
    fn first_join_just_commits_installs_and_starts() {
        let plan = join(&RingMetadata::default(), NodeEntry::new("a", "h:1")).unwrap();
        assert_eq!(plan.metadata.version, 1);
        assert_eq!(plan.moved, None);
        assert_eq!(plan.steps.len(), 3);
        assert!(plan.rollback().is_empty());
    }

    #[test]
    fn join_orders_lock_transfer_commit_install_unlock_delete() {
        let current = ring(3);
        let new = NodeEntry::new("new", "127.0.0.1:9999");
        let plan = join(&current, new.clone()).unwrap();
        let mv = plan.moved.clone().unwrap();
        assert_eq!(mv.to, new);
        assert_eq!(plan.metadata.version, 2);
        let lock = position_of(&plan, |s| matches!(s, Step::Lock { .. }));
        let transfer = position_of(&plan, |s| matches!(s, Step::Transfer { .. }));
        let delta = position_of(&plan, |s| matches!(s, Step::TransferDelta { .. }));
        let commit = plan.commit_index();
        // Bulk copy unlocked, then lock, then the delta, then the commit.
        assert!(transfer < lock && lock < delta && delta < commit);
        let install_from = position_of(&plan, |s| {
            *s == Step::Install {
                node: mv.from.clone(),
            }
        });
        let install_to = position_of(&plan, |s| {
            *s == Step::Install {
                node: mv.to.clone(),
            }
        });
        let start = position_of(&plan, |s| matches!(s, Step::Start { .. }));
        let unlock = position_of(&plan, |s| matches!(s, Step::Unlock { .. }));
        let delete_at_sender = position_of(
            &plan,
            |s| matches!(s, Step::Clear { node, .. } if *node == mv.from),
        );
        assert!(commit < install_from);
        assert!(install_from < install_to && install_to < start && start < unlock);
        assert!(unlock < delete_at_sender);
        // The ECS seeds the new metadata at the sender and the receiver only; gossip
        // carries it to the rest.
        let installs: Vec<&NodeEntry> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Install { node } => Some(node),
                _ => None,
            })
            .collect();
        assert_eq!(installs, vec![&mv.from, &mv.to]);
        // The receiver is cleared before anything is sent to it.
        assert_eq!(
            plan.steps[0],
            Step::Clear {
                node: new,
                range: mv.range
            }
        );
        assert_eq!(
            plan.rollback()[0],
            Step::Unlock {
                node: mv.from.clone(),
                range: mv.range
            }
        );
    }

    #[test]
    fn leave_moves_to_successor_and_installs_at_leaver_too() {
        let current = ring(3);
        let leaving = current.nodes[1].clone();
        let plan = leave(&current, &leaving.name).unwrap();
        let mv = plan.moved.clone().unwrap();
        assert_eq!(mv.from, leaving);
        assert_eq!(mv.to, current.nodes[2]);
        assert!(plan.metadata.node(&leaving.name).is_none());
        let installs = plan.installed_at();
        assert_eq!(
            installs,
            vec![leaving.name.clone(), mv.to.name.clone()],
            "the sender adopts first; the unaffected node is left to gossip"
        );
        assert!(plan.commit_index() > position_of(&plan, |s| matches!(s, Step::Transfer { .. })));
    }

    #[test]
    fn refusals() {
        assert!(matches!(leave(&ring(1), "n0"), Err(EcsError::LastNode(_))));
        assert!(leave(&ring(2), "nope").is_err());
        assert!(join(&ring(2), NodeEntry::new("n0", "elsewhere:1")).is_err());
        assert!(join(&ring(2), NodeEntry::new("x", "127.0.0.1:7000")).is_err());
    }
}
