//! Membership changes as plans: pure, synchronous decisions (DESIGN §5). The ECS's
//! executor runs the steps against the nodes; everything about *which* steps, in *what*
//! order, and how to undo them is decided here and unit-tested without a network.
//!
//! Invariants every plan keeps:
//! - The range is write-locked at the sender before it is transferred, and the transfer is
//!   acknowledged (persisted by the receiver) before the new metadata is committed.
//! - [`Step::Commit`] (the ECS persisting the new metadata) is the point of no return:
//!   a failure before it is rolled back ([`Plan::rollback`]), a failure after it is
//!   reported and the remaining steps still run.
//! - The sender adopts the new metadata before the receiver, so at no moment do both
//!   believe they own the range; in between, clients back off and retry.
//! - Data is deleted from the sender only after it holds the new metadata (nodes also
//!   refuse to delete a range they still own).

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
    /// Stream `range` from `from` to `to`; done when `to` persisted every batch.
    Transfer {
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

/// Installs the new metadata at every node of `nodes` not already listed in `done`.
fn install_rest(steps: &mut Vec<Step>, nodes: &[NodeEntry], done: &[&NodeEntry]) {
    for node in nodes {
        if !done.iter().any(|d| d.name == node.name) {
            steps.push(Step::Install { node: node.clone() });
        }
    }
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
    let mut steps = vec![
        Step::Clear {
            node: mv.to.clone(),
            range: mv.range,
        },
        Step::Lock {
            node: mv.from.clone(),
            range: mv.range,
        },
        Step::Transfer {
            from: mv.from.clone(),
            to: mv.to.clone(),
            range: mv.range,
        },
        Step::Commit,
        Step::Install {
            node: mv.from.clone(),
        },
        Step::Install {
            node: mv.to.clone(),
        },
        Step::Start {
            node: mv.to.clone(),
        },
    ];
    install_rest(&mut steps, &metadata.nodes, &[&mv.from, &mv.to]);
    steps.extend([
        Step::Unlock {
            node: mv.from.clone(),
            range: mv.range,
        },
        Step::Clear {
            node: mv.from.clone(),
            range: mv.range,
        },
    ]);
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
    let mut steps = vec![
        Step::Clear {
            node: mv.to.clone(),
            range: mv.range,
        },
        Step::Lock {
            node: mv.from.clone(),
            range: mv.range,
        },
        Step::Transfer {
            from: mv.from.clone(),
            to: mv.to.clone(),
            range: mv.range,
        },
        Step::Commit,
        Step::Install {
            node: mv.from.clone(),
        },
        Step::Install {
            node: mv.to.clone(),
        },
    ];
    install_rest(&mut steps, &metadata.nodes, &[&mv.from, &mv.to]);
    steps.extend([
        Step::Unlock {
            node: mv.from.clone(),
            range: mv.range,
        },
        Step::Clear {
            node: mv.from.clone(),
            range: mv.range,
        },
    ]);
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
        let commit = plan.commit_index();
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
        assert!(lock < transfer && transfer < commit && commit < install_from);
        assert!(install_from < install_to && install_to < start && start < unlock);
        assert!(unlock < delete_at_sender);
        // Every node of the new ring gets the metadata exactly once.
        for node in &plan.metadata.nodes {
            let n = plan
                .steps
                .iter()
                .filter(|s| **s == Step::Install { node: node.clone() })
                .count();
            assert_eq!(n, 1, "{}", node.name);
        }
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
        let installs: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Install { node } => Some(node.name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(installs.len(), 3);
        assert_eq!(installs[0], leaving.name, "the sender adopts first");
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
