//! Membership changes as plans: pure, synchronous decisions (ARCHITECTURE.md §5). The ECS's
//! executor runs the steps against the nodes; everything about *which* steps, in *what*
//! order, and how to undo them is decided here and unit-tested without a network.
//!
//! A move streams a snapshot of the range while writes go on (the sender remembers which
//! keys they touch), then write-locks the range and sends only those keys again: the lock
//! is held for the delta and the metadata handover, not for the bulk copy.
//!
//! A move streams a snapshot with writes open, then sends what writes changed meanwhile in
//! rounds (still open) until little is left, then write-locks the range and sends the rest:
//! the lock covers only the last, small delta and the handover.
//!
//! Invariants every plan keeps (the executor, [`crate::executor`], runs the steps):
//! - The last delta is sent with the range write-locked at the sender, and every batch is
//!   acknowledged (persisted by the receiver) before the new metadata is committed; the lock
//!   waits for writes in flight, so the snapshot plus the deltas hold every acknowledged
//!   write.
//! - [`Step::Commit`] (the ECS persisting its intent as committed, then the new metadata) is
//!   the point of no return: a failure before it is rolled back ([`Plan::rollback`], aborts
//!   delivered to both ends until they are), every step after it is retried until it
//!   succeeds.
//! - The sender's lock is durable and is released only by the sender adopting the new
//!   version (or by an abort before the commit): there is no unlock step, so the sender
//!   never accepts a write for the range again once the change has committed. The sender is
//!   installed before the receiver, so it also stops serving reads of the range before the
//!   receiver starts serving it; in between, clients back off and retry.
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
use serde::{Deserialize, Serialize};

use crate::EcsError;

/// One action of a plan, run against one node (or, for `Commit`, the ECS itself). Every
/// request a step sends names the change's [`ringkv_wire::MoveId`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// At the receiver: delete any stale copy of `range` (from an earlier, aborted move) and
    /// accept this move's batches from now on.
    Prepare {
        /// The receiver.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
    },
    /// Delete `range` at `node`, which no longer owns it (the sender, after the move).
    Clear {
        /// The node.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
    },
    /// Write-lock `range` at `node`, durably (writes answer `WriteLocked`, reads are served).
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
    /// Send `to` every key written since the previous round. Rounds with `last == false`
    /// run with writes open and are repeated by the executor while they still carry much;
    /// the `last` one needs the range locked.
    TransferDelta {
        /// Sender.
        from: NodeEntry,
        /// Receiver.
        to: NodeEntry,
        /// The range.
        range: KeyRange,
        /// Whether this is the locked, final round.
        last: bool,
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
    /// Give up the move at `node` (sender: release its lock and tracking; receiver: refuse
    /// further batches, delete the partial copy).
    Abort {
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
            Step::Prepare { node, range } => {
                format!("prepare {} to receive {range:?}", node.name)
            }
            Step::Clear { node, range } => format!("clear {range:?} at {}", node.name),
            Step::Lock { node, range } => format!("write-lock {range:?} at {}", node.name),
            Step::Transfer { from, to, range } => {
                format!("transfer {range:?} from {} to {}", from.name, to.name)
            }
            Step::TransferDelta {
                from,
                to,
                range,
                last,
            } => format!(
                "transfer the writes made meanwhile in {range:?} from {} to {}{}",
                from.name,
                to.name,
                if *last { " (locked)" } else { "" }
            ),
            Step::Commit => "persist the new metadata".to_string(),
            Step::Install { node } => format!("install the new metadata at {}", node.name),
            Step::Start { node } => format!("start {}", node.name),
            Step::Abort { node, range } => format!("abort the move of {range:?} at {}", node.name),
        }
    }
}

/// A membership change: the metadata it leads to and the steps that get there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Whether a failure of `step` during a rollback is accepted rather than retried: the
    /// receiver's abort (see [`Plan::rollback`]).
    pub fn best_effort(&self, step: &Step) -> bool {
        matches!((step, &self.moved), (Step::Abort { node, .. }, Some(mv)) if *node == mv.to)
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

    /// The steps that undo a failure before the commit: abort the move at the sender
    /// (releasing its durable lock, which nothing else would) and at the receiver (refusing
    /// late batches, deleting the partial copy). The executor delivers the sender's until it
    /// is acknowledged (a sender that is down keeps the range locked until it is back, and
    /// serves none of it meanwhile anyway); the receiver's is tried once
    /// ([`Plan::best_effort`]): a receiver that is down has lost its receiving state with its
    /// memory, and its partial copy is never served and is cleared by the next `Prepare`.
    pub fn rollback(&self) -> Vec<Step> {
        match &self.moved {
            Some(mv) => vec![
                Step::Abort {
                    node: mv.from.clone(),
                    range: mv.range,
                },
                Step::Abort {
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
        Step::Prepare {
            node: to.clone(),
            range,
        },
        Step::Transfer {
            from: from.clone(),
            to: to.clone(),
            range,
        },
        Step::TransferDelta {
            from: from.clone(),
            to: to.clone(),
            range,
            last: false,
        },
        Step::Lock {
            node: from.clone(),
            range,
        },
        Step::TransferDelta {
            from: from.clone(),
            to: to.clone(),
            range,
            last: true,
        },
        Step::Commit,
        Step::Install { node: from.clone() },
        Step::Install { node: to.clone() },
    ];
    if start_receiver {
        steps.push(Step::Start { node: to.clone() });
    }
    steps.push(Step::Clear {
        node: from.clone(),
        range,
    });
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
    fn join_orders_prepare_copy_lock_commit_install_start_delete() {
        let current = ring(3);
        let new = NodeEntry::new("new", "127.0.0.1:9999");
        let plan = join(&current, new.clone()).unwrap();
        let mv = plan.moved.clone().unwrap();
        assert_eq!(mv.to, new);
        assert_eq!(plan.metadata.version, 2);
        let lock = position_of(&plan, |s| matches!(s, Step::Lock { .. }));
        let transfer = position_of(&plan, |s| matches!(s, Step::Transfer { .. }));
        let open_delta = position_of(&plan, |s| {
            matches!(s, Step::TransferDelta { last: false, .. })
        });
        let delta = position_of(&plan, |s| {
            matches!(s, Step::TransferDelta { last: true, .. })
        });
        let commit = plan.commit_index();
        // Bulk copy and a delta round unlocked, then lock, then the last delta, then commit.
        assert!(transfer < open_delta && open_delta < lock && lock < delta && delta < commit);
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
        let delete_at_sender = position_of(
            &plan,
            |s| matches!(s, Step::Clear { node, .. } if *node == mv.from),
        );
        assert!(commit < install_from);
        assert!(install_from < install_to && install_to < start && start < delete_at_sender);
        assert!(
            !plan.steps.iter().any(|s| matches!(s, Step::Abort { .. })),
            "the sender's lock ends by its install, never by an unlock"
        );
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
        // The receiver is prepared (cleared) before anything is sent to it.
        assert_eq!(
            plan.steps[0],
            Step::Prepare {
                node: new.clone(),
                range: mv.range
            }
        );
        assert_eq!(
            plan.rollback(),
            vec![
                Step::Abort {
                    node: mv.from.clone(),
                    range: mv.range
                },
                Step::Abort {
                    node: new,
                    range: mv.range
                }
            ]
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

/// Stub until the generic planner lands.
pub fn fail(current: &RingMetadata, name: &str) -> Result<Plan, EcsError> {
    let metadata = current.with_failed(name)?;
    let mut steps = vec![Step::Commit];
    steps.extend(
        metadata
            .nodes
            .iter()
            .filter(|n| !metadata.is_failed(&n.name))
            .map(|n| Step::Install { node: n.clone() }),
    );
    Ok(Plan {
        metadata,
        moved: None,
        steps,
    })
}

/// Stub until the generic planner lands.
pub fn remove_failed(current: &RingMetadata, name: &str) -> Result<Plan, EcsError> {
    leave(current, name)
}
