//! Membership changes as plans: pure, synchronous decisions (ARCHITECTURE.md §5). The ECS's
//! executor runs the steps against the nodes; everything about *which* steps, in *what*
//! order, and how to undo them is decided here and unit-tested without a network.
//!
//! One rule covers every change ([`change`]; [`join`], [`leave`], [`fail`] and
//! [`remove_failed`] build on it). The circle is cut into elementary arcs at the positions
//! of both rings, and each arc's *chain* (ARCHITECTURE.md §11) under the current metadata is
//! compared with its chain under the target:
//! - every node that newly enters an arc's chain gets a **copy** of it from the *old
//!   chain's tail* (the one copy known to hold every acknowledged write); adjacent arcs with
//!   the same source, receiver and head are copied as one range;
//! - a copy streams a snapshot with writes open, then (once every copy's snapshot is sent)
//!   what writes changed meanwhile in rounds (still open) until little is left, then
//!   **locks** and sends the rest: the lock
//!   covers only the last, small delta and the handover. Locked are each copy's range at its
//!   old head (which takes the writes) and at its source (which must hold the lock for the
//!   last round), and every arc whose tail or head changes at its old tail and old head (a
//!   locked tail stops serving reads, a locked head stops taking writes, until it adopts
//!   the target);
//! - after the [`Step::Commit`], the target metadata is **installed** at every live node
//!   whose chains change (the lock holders first), a joining node is started, and
//!   every live node that leaves an arc's chain **clears** it (a node leaving the ring too).
//!
//! With replication 1 a chain is just the owner, so a join or a leave is one copy from the
//! old owner to the new one, locked at the old owner: the classic move.
//!
//! Invariants every plan keeps (the executor, [`crate::executor`], runs the steps):
//! - The last delta is sent with the range write-locked at the old head (so no write enters
//!   the old chain any more) and at the source, and every batch is acknowledged (persisted
//!   by the receiver) before the new metadata is committed; the lock waits for writes in
//!   flight, so the snapshot plus the deltas hold every acknowledged write.
//! - [`Step::Commit`] (the ECS persisting its intent as committed, then the new metadata) is
//!   the point of no return: a failure before it is rolled back ([`Plan::rollback`], aborts
//!   delivered to every lock holder until they are), every step after it is retried until it
//!   succeeds.
//! - A lock is durable and is released only by its node adopting the new version (or by an
//!   abort before the commit): there is no unlock step, so a locked node never takes a write
//!   (or, as a locked tail, serves a read) for the range again once the change has
//!   committed. The lock holders are installed before the others; in between,
//!   clients back off and retry.
//! - Data is deleted only after the commit, and only at nodes that hold none of the arc
//!   under the target: every arc keeps at least the copies of its old chain until the
//!   change is decided, and those of its new chain afterwards.
//! - No step is sent to a node marked failed: it is in no chain, so it never is a source, a
//!   head, a tail, a receiver or a dropper.
//! - Only the nodes the change affects get the new metadata from the ECS. Gossip carries
//!   it to the others within a few intervals (ARCHITECTURE.md §6). That is safe before it
//!   arrives: a node whose chains do not change serves the same ranges in the same roles
//!   under both versions, and a client routed by the old version into a changed range
//!   reaches a node that already holds the new version (or is locked there) and is
//!   redirected or told to retry.

use std::collections::BTreeSet;

use ringkv_wire::{KeyRange, NodeEntry, Position, RingMetadata};
use serde::{Deserialize, Serialize};

use crate::EcsError;

/// One action of a plan, run against one node (or, for `Commit`, the ECS itself). Every
/// request a step sends names the change's [`ringkv_wire::MoveId`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// At the receiver: delete any stale copy of `range` (from an earlier, aborted move) and
    /// accept this move's batches from `from` from now on.
    Prepare {
        /// The receiver.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
        /// The copy's source: the only peer whose batches the receiver accepts.
        from: NodeEntry,
    },
    /// Delete `range` at `node`, which no longer replicates it.
    Clear {
        /// The node.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
    },
    /// Lock `range` at `node`, durably: as the range's head it refuses writes there, as its
    /// tail (with replication above 1) reads too.
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
    /// Give up the change at `node` (lock holder: release its locks and tracking;
    /// receiver: refuse further batches, delete the partial copy).
    Abort {
        /// The node.
        node: NodeEntry,
        /// The range.
        range: KeyRange,
    },
}

impl Step {
    /// Every node the step is sent to or names as a peer (none for the `Commit`).
    pub fn nodes(&self) -> Vec<&NodeEntry> {
        match self {
            Step::Prepare { node, from, .. } => vec![node, from],
            Step::Transfer { from, to, .. } | Step::TransferDelta { from, to, .. } => {
                vec![from, to]
            }
            Step::Clear { node, .. }
            | Step::Lock { node, .. }
            | Step::Abort { node, .. }
            | Step::Install { node }
            | Step::Start { node } => vec![node],
            Step::Commit => vec![],
        }
    }

    /// What the step does, in a word or two (progress reports).
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Prepare { .. } => "prepare",
            Step::Clear { .. } => "clear",
            Step::Lock { .. } => "lock",
            Step::Transfer { .. } => "transfer",
            Step::TransferDelta { last: false, .. } => "delta round",
            Step::TransferDelta { last: true, .. } => "last delta round",
            Step::Commit => "commit",
            Step::Install { .. } => "install",
            Step::Start { .. } => "start",
            Step::Abort { .. } => "abort",
        }
    }

    /// A one-line description for logs and operator messages.
    pub fn describe(&self) -> String {
        match self {
            Step::Prepare { node, range, from } => {
                format!(
                    "prepare {} to receive {range:?} from {}",
                    node.name, from.name
                )
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

/// One copy of a plan: `range` streamed from `from` (the old chain's tail) to `to` (a node
/// that enters the range's chain), with the writes of `range` stopped at `head` (the old
/// chain's head) for the last round. With replication 1, `head == from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copy {
    /// The positions copied.
    pub range: KeyRange,
    /// The source: the tail of the range's old chain.
    pub from: NodeEntry,
    /// The receiver.
    pub to: NodeEntry,
    /// The head of the range's old chain, locked with the source.
    pub head: NodeEntry,
}

/// A membership change: the metadata it leads to and the steps that get there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The metadata after the change (version + 1).
    pub metadata: RingMetadata,
    /// The copies it makes, in ring order (empty when no data moves).
    pub copies: Vec<Copy>,
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

    /// Index of the stage of the [`Step::Commit`] (a stage of its own) in [`Plan::stages`].
    pub fn commit_stage(&self) -> usize {
        self.stages()
            .iter()
            .position(|stage| stage == &[Step::Commit])
            .expect("every plan commits, in a stage of its own")
    }

    /// The steps cut into stages, in order: every copy's `Prepare`; every `Transfer`; every
    /// open `TransferDelta`; every `Lock`; every last `TransferDelta`; the `Commit` alone; the
    /// installs at the lock holders (every copy's source and old head, every old head and tail
    /// whose role changes); the other installs; the `Start`; every `Clear`. A stage is a run
    /// of consecutive steps of one kind (so it is derived from the steps, and a plan persisted
    /// before stages existed runs in stages too). Within a stage the steps are independent
    /// (distinct copies, distinct nodes), so the ECS runs them at once, a bounded number per
    /// node ([`crate::config::EcsConfig::steps_per_node`]).
    pub fn stages(&self) -> Vec<Vec<Step>> {
        let holders: Vec<&str> = self.lock_holders();
        let kind = |step: &Step| -> (u8, bool) {
            match step {
                Step::Prepare { .. } => (0, false),
                Step::Transfer { .. } => (1, false),
                Step::TransferDelta { last, .. } => (2, *last),
                Step::Lock { .. } => (3, false),
                Step::Commit => (4, false),
                Step::Install { node } => (5, !holders.contains(&node.name.as_str())),
                Step::Start { .. } => (6, false),
                Step::Clear { .. } => (7, false),
                Step::Abort { .. } => (8, self.best_effort(step)),
            }
        };
        let mut stages: Vec<Vec<Step>> = Vec::new();
        for step in &self.steps {
            match stages.last_mut() {
                Some(stage) if kind(&stage[0]) == kind(step) && *step != Step::Commit => {
                    stage.push(step.clone())
                }
                _ => stages.push(vec![step.clone()]),
            }
        }
        stages
    }

    /// Names of the nodes that take a lock in the plan.
    fn lock_holders(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.locks().iter().map(|(n, _)| n.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The rollback ([`Plan::rollback`]) in stages: every lock holder's abort, then every
    /// receiver's.
    pub fn rollback_stages(&self) -> Vec<Vec<Step>> {
        let (holders, receivers): (Vec<Step>, Vec<Step>) = self
            .rollback()
            .into_iter()
            .partition(|step| !self.best_effort(step));
        [holders, receivers]
            .into_iter()
            .filter(|stage| !stage.is_empty())
            .collect()
    }

    /// The `(node, range)` of every [`Step::Lock`], in plan order.
    pub fn locks(&self) -> Vec<(&NodeEntry, KeyRange)> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Lock { node, range } => Some((node, *range)),
                _ => None,
            })
            .collect()
    }

    /// Whether a failure of `step` during a rollback is accepted rather than retried: an
    /// abort at a node for a range it did not lock (a receiver's, see [`Plan::rollback`]).
    pub fn best_effort(&self, step: &Step) -> bool {
        match step {
            Step::Abort { node, range } => {
                !self.locks().iter().any(|(n, r)| *n == node && r == range)
            }
            _ => false,
        }
    }

    /// Whether any step of the plan is sent to the node `name` or names it as a peer (a
    /// rollback's aborts go only to nodes of its steps).
    pub fn involves(&self, name: &str) -> bool {
        self.steps
            .iter()
            .flat_map(Step::nodes)
            .any(|n| n.name == name)
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

    /// The steps that undo a failure before the commit: an abort at every lock holder for
    /// each range it locks (releasing its durable lock, which nothing else would), then at
    /// every receiver for each range it receives (refusing late batches, deleting the
    /// partial copy). The executor delivers a lock holder's until it is acknowledged (a
    /// holder that is down keeps the range locked until it is back, and serves none of it
    /// meanwhile anyway); a receiver's is tried once ([`Plan::best_effort`]): a receiver that
    /// is down has lost its receiving state with its memory, and its partial copy is never
    /// served and is cleared by the next `Prepare`.
    pub fn rollback(&self) -> Vec<Step> {
        let mut steps: Vec<Step> = Vec::new();
        let aborts = self
            .locks()
            .into_iter()
            .chain(self.copies.iter().map(|c| (&c.to, c.range)));
        for (node, range) in aborts {
            let abort = Step::Abort {
                node: node.clone(),
                range,
            };
            if !steps.contains(&abort) {
                steps.push(abort);
            }
        }
        steps
    }
}

/// The elementary arcs of a change: the circle cut wherever a chain may change in either
/// ring ([`RingMetadata::boundaries`]), each arc `(b[k-1], b[k]]` in ring order (one
/// whole-ring arc if there is one cut in all).
fn elementary_arcs(current: &RingMetadata, target: &RingMetadata) -> Vec<KeyRange> {
    let cuts: BTreeSet<Position> = current
        .boundaries()
        .into_iter()
        .chain(target.boundaries())
        .collect();
    let cuts: Vec<Position> = cuts.into_iter().collect();
    (0..cuts.len())
        .map(|k| KeyRange::new(cuts[(k + cuts.len() - 1) % cuts.len()], cuts[k]))
        .collect()
}

/// The maximal runs of consecutive arcs (wrapping) for which `member` holds, each as one
/// range with the index of its first arc, in ring order. All arcs: the whole ring.
fn runs(arcs: &[KeyRange], member: impl Fn(usize) -> bool) -> Vec<(usize, KeyRange)> {
    let m = arcs.len();
    if m == 0 {
        return Vec::new();
    }
    if (0..m).all(&member) {
        let at = arcs[m - 1].end;
        return vec![(0, KeyRange::new(at, at))];
    }
    let mut out = Vec::new();
    for start in 0..m {
        if !member(start) || member((start + m - 1) % m) {
            continue;
        }
        let mut last = start;
        while member((last + 1) % m) {
            last = (last + 1) % m;
        }
        out.push((start, KeyRange::new(arcs[start].start, arcs[last].end)));
    }
    out
}

/// Names of the nodes of a chain.
fn names<'a>(chain: &[&'a NodeEntry]) -> Vec<&'a str> {
    chain.iter().map(|n| n.name.as_str()).collect()
}

/// The plan that takes the ring from `current` to `target` (`current.version + 1`), with
/// `joining` the node that joins, if one does (it is started once installed). See the
/// module docs for the rule. Refused, with nothing changed, if an arc some node must
/// receive has no live copy in `current`, or an arc with a live copy has none in `target`
/// (its data would be lost).
pub fn change(
    current: &RingMetadata,
    target: RingMetadata,
    joining: Option<&NodeEntry>,
) -> Result<Plan, EcsError> {
    target.validate()?;
    if target.version != current.version + 1 {
        return Err(EcsError::Refused(format!(
            "target version {} does not follow the current version {}",
            target.version, current.version
        )));
    }
    if let Some(node) = joining {
        if target.node(&node.name) != Some(node) || current.node(&node.name).is_some() {
            return Err(EcsError::Refused(format!(
                "{} is not a node that joins with this change",
                node.name
            )));
        }
    }
    let arcs = elementary_arcs(current, &target);
    let old: Vec<Vec<&NodeEntry>> = arcs.iter().map(|a| current.chain(&a.end)).collect();
    let new: Vec<Vec<&NodeEntry>> = arcs.iter().map(|a| target.chain(&a.end)).collect();
    let alive = |n: &NodeEntry| !current.is_failed(&n.name);

    // What each arc needs: (source, receiver, head) copies; nodes that drop it.
    let mut copy_keys: Vec<(&NodeEntry, &NodeEntry, &NodeEntry)> = Vec::new();
    let mut copies_at: Vec<Vec<(&NodeEntry, &NodeEntry, &NodeEntry)>> = vec![vec![]; arcs.len()];
    let mut droppers: Vec<Vec<&NodeEntry>> = vec![vec![]; arcs.len()];
    for (k, arc) in arcs.iter().enumerate() {
        let (old_names, new_names) = (names(&old[k]), names(&new[k]));
        let receivers: Vec<&NodeEntry> = new[k]
            .iter()
            .copied()
            .filter(|n| !old_names.contains(&n.name.as_str()))
            .collect();
        droppers[k] = old[k]
            .iter()
            .copied()
            .filter(|n| !new_names.contains(&n.name.as_str()) && alive(n))
            .collect();
        if current.nodes.is_empty() {
            continue; // the first node: there is no data yet
        }
        let (Some(head), Some(tail)) = (old[k].first(), old[k].last()) else {
            if !receivers.is_empty() {
                return Err(EcsError::NoLiveCopy {
                    range: *arc,
                    why: format!("no live node holds it to copy it to {}", receivers[0].name),
                });
            }
            continue;
        };
        if new[k].is_empty() {
            return Err(EcsError::NoLiveCopy {
                range: *arc,
                why: format!(
                    "no live node would hold it after the change (it is on {})",
                    old_names.join(", ")
                ),
            });
        }
        for to in receivers {
            let key = (*tail, to, *head);
            if !copy_keys.contains(&key) {
                copy_keys.push(key);
            }
            copies_at[k].push(key);
        }
    }

    // Copies: each (source, receiver, head) merged over adjacent arcs, in ring order.
    let mut copies: Vec<(usize, Copy)> = Vec::new();
    for key in &copy_keys {
        for (start, range) in runs(&arcs, |k| copies_at[k].contains(key)) {
            let (from, to, head) = *key;
            copies.push((
                start,
                Copy {
                    range,
                    from: from.clone(),
                    to: to.clone(),
                    head: head.clone(),
                },
            ));
        }
    }
    copies.sort_by(|(a, x), (b, y)| (a, &x.to.name).cmp(&(b, &y.to.name)));
    let copies: Vec<Copy> = copies.into_iter().map(|(_, c)| c).collect();

    // Locks: each copy's range at its head and source; then every arc whose tail or head
    // changes at its old tail and old head, unless already locked there, merged per node.
    let mut locks: Vec<(NodeEntry, KeyRange)> = Vec::new();
    for c in &copies {
        for node in [&c.head, &c.from] {
            if !locks.contains(&(node.clone(), c.range)) {
                locks.push((node.clone(), c.range));
            }
        }
    }
    let mut handover: Vec<&NodeEntry> = Vec::new();
    let mut handover_at: Vec<Vec<&NodeEntry>> = vec![vec![]; arcs.len()];
    for k in 0..arcs.len() {
        let (Some(old_head), Some(old_tail)) = (old[k].first(), old[k].last()) else {
            continue;
        };
        let new_head = new[k].first().map(|n| n.name.as_str());
        let new_tail = new[k].last().map(|n| n.name.as_str());
        for (node, changes) in [
            (*old_tail, new_tail != Some(old_tail.name.as_str())),
            (*old_head, new_head != Some(old_head.name.as_str())),
        ] {
            let covered = locks
                .iter()
                .any(|(n, r)| n == node && r.contains(&arcs[k].end));
            if changes && !covered && !handover_at[k].contains(&node) {
                handover_at[k].push(node);
                if !handover.contains(&node) {
                    handover.push(node);
                }
            }
        }
    }
    handover.sort_by(|a, b| a.name.cmp(&b.name));
    for node in handover {
        for (_, range) in runs(&arcs, |k| handover_at[k].contains(&node)) {
            locks.push((node.clone(), range));
        }
    }

    // Installs: every live node whose chains change (old chains first), in ring order; the
    // lock holders are moved ahead of the others below.
    let mut affected: Vec<&NodeEntry> = Vec::new();
    let mut in_old: Vec<&NodeEntry> = Vec::new();
    for k in 0..arcs.len() {
        if names(&old[k]) == names(&new[k]) {
            continue;
        }
        for n in &old[k] {
            if !in_old.contains(n) {
                in_old.push(n);
            }
        }
        for n in old[k].iter().chain(&new[k]) {
            if !affected.contains(n) {
                affected.push(n);
            }
        }
    }
    if let Some(node) = joining {
        if !affected.contains(&node) {
            affected.push(node);
        }
    }
    // With replication every live node of the new ring gets it from the ECS, not only the
    // affected ones: a version that changes no chain (removing a failed node whose chains
    // were already re-formed) would otherwise reach nobody, and chain writes waiting for a
    // new version see it at once. Without replication gossip carries it (as before).
    if current.replication > 1 || target.replication > 1 {
        for n in &target.nodes {
            if !affected.contains(&n) {
                affected.push(n);
            }
        }
    }
    let ring_index =
        |ring: &RingMetadata, n: &NodeEntry| ring.nodes.iter().position(|m| m.name == n.name);
    let mut first: Vec<&NodeEntry> = in_old.clone();
    first.sort_by_key(|n| ring_index(current, n));
    let mut rest: Vec<&NodeEntry> = affected
        .into_iter()
        .filter(|n| !in_old.contains(n))
        .collect();
    rest.sort_by_key(|n| (ring_index(&target, n), ring_index(current, n)));
    let installable = |n: &&NodeEntry| {
        alive(n) && (current.node(&n.name).is_some() || target.node(&n.name).is_some())
    };
    let installs: Vec<&NodeEntry> = first.into_iter().chain(rest).filter(installable).collect();
    // The lock holders adopt the target before any other node (a stage of their own).
    let (holding, others): (Vec<&NodeEntry>, Vec<&NodeEntry>) = installs
        .into_iter()
        .partition(|n| locks.iter().any(|(holder, _)| holder.name == n.name));

    // Clears: every live node that leaves an arc's chain, merged per node, in ring order.
    let mut clears: Vec<Step> = Vec::new();
    for node in &current.nodes {
        for (_, range) in runs(&arcs, |k| droppers[k].contains(&node)) {
            clears.push(Step::Clear {
                node: node.clone(),
                range,
            });
        }
    }

    let mut steps = Vec::new();
    for c in &copies {
        steps.push(Step::Prepare {
            node: c.to.clone(),
            range: c.range,
            from: c.from.clone(),
        });
    }
    // Every bulk copy first, then every copy's open rounds: so what a copy's last (locked)
    // round carries was written during the open rounds, not during the other copies' bulk
    // transfers.
    for c in &copies {
        steps.push(Step::Transfer {
            from: c.from.clone(),
            to: c.to.clone(),
            range: c.range,
        });
    }
    for c in &copies {
        steps.push(Step::TransferDelta {
            from: c.from.clone(),
            to: c.to.clone(),
            range: c.range,
            last: false,
        });
    }
    for (node, range) in locks {
        steps.push(Step::Lock { node, range });
    }
    for c in &copies {
        steps.push(Step::TransferDelta {
            from: c.from.clone(),
            to: c.to.clone(),
            range: c.range,
            last: true,
        });
    }
    steps.push(Step::Commit);
    for node in holding.into_iter().chain(others) {
        steps.push(Step::Install { node: node.clone() });
    }
    if let Some(node) = joining {
        steps.push(Step::Start { node: node.clone() });
    }
    steps.extend(clears);
    Ok(Plan {
        metadata: target,
        copies,
        steps,
    })
}

/// The ring `current` with `node` added (version + 1), keeping its replication factor and
/// failed nodes; an empty ring gets `replication`.
fn with_joined(
    current: &RingMetadata,
    node: NodeEntry,
    replication: u8,
) -> Result<RingMetadata, EcsError> {
    let mut target = current.with_node(node)?;
    target.replication = if current.nodes.is_empty() {
        replication
    } else {
        current.replication
    };
    target.failed = current.failed.clone();
    target.validate()?;
    Ok(target)
}

/// The plan for `node` joining the ring `current`, keeping its replication factor (1 for
/// [`RingMetadata::default`]; to start a ring with another, see [`join_with_replication`]).
pub fn join(current: &RingMetadata, node: NodeEntry) -> Result<Plan, EcsError> {
    join_with_replication(current, node, current.replication)
}

/// The plan for `node` joining the ring `current`: if `current` is empty, the new ring
/// keeps `replication` copies of every key; a ring that has nodes keeps its own factor.
pub fn join_with_replication(
    current: &RingMetadata,
    node: NodeEntry,
    replication: u8,
) -> Result<Plan, EcsError> {
    let target = with_joined(current, node.clone(), replication)?;
    change(current, target, Some(&node))
}

/// The plan for the node `name` leaving the ring `current`: its copies are rebuilt on the
/// nodes that take its places in its chains ([`ringkv_wire::placement::leave`]; with
/// replication 1 its partitions move to them). Refused for the last node.
pub fn leave(current: &RingMetadata, name: &str) -> Result<Plan, EcsError> {
    let target = current.without_node(name)?;
    if target.nodes.is_empty() {
        return Err(EcsError::LastNode(name.to_string()));
    }
    change(current, target, None)
}

/// The plan for declaring the node `name` failed: it leaves every chain at once (keeping
/// its places in the assignment until it is removed), no data moves, and every other live node of the ring gets the new
/// metadata. Refused with replication 1 (there is no other copy to serve from), and for an
/// unknown or already failed node.
pub fn fail(current: &RingMetadata, name: &str) -> Result<Plan, EcsError> {
    fail_all(current, &[name])
}

/// The plan for declaring the nodes `names` failed, all in one version (several nodes died
/// together: a rebuild must not be planned onto one of them), as [`fail`] does for one.
/// Refused if it would leave a range with no live copy.
pub fn fail_all(current: &RingMetadata, names: &[&str]) -> Result<Plan, EcsError> {
    if current.replication <= 1 {
        return Err(EcsError::Refused(format!(
            "cannot fail over {}: with replication 1 no other node holds its data",
            names.join(", ")
        )));
    }
    let mut target = current.clone();
    for name in names {
        if target.is_failed(name) {
            return Err(EcsError::Refused(format!("{name} is already failed")));
        }
        target = target.with_failed(name)?;
    }
    target.version = current.version + 1;
    // Never the last live copy of a range: a chain left empty could not be rebuilt, and
    // its data (still on the node, if it is only cut off) would be stranded.
    if let Some((range, _)) = target.chains().into_iter().find(|(_, c)| c.is_empty()) {
        return Err(EcsError::NoLiveCopy {
            range,
            why: format!(
                "{} hold its last live copy; failing them over would lose it",
                names.join(", ")
            ),
        });
    }
    let mut steps = vec![Step::Commit];
    steps.extend(
        target
            .nodes
            .iter()
            .filter(|n| !target.is_failed(&n.name))
            .map(|n| Step::Install { node: n.clone() }),
    );
    Ok(Plan {
        metadata: target,
        copies: Vec::new(),
        steps,
    })
}

/// The plan for removing the failed node `name` from the ring: every range it was in the
/// chain of (before it failed) is copied, from a live copy, to the node that enters the
/// chain in its place. Nothing is sent to `name`. Refused if `name` is not failed.
pub fn remove_failed(current: &RingMetadata, name: &str) -> Result<Plan, EcsError> {
    if current.node(name).is_some() && !current.is_failed(name) {
        return Err(EcsError::Refused(format!(
            "{name} is not failed; remove it with a leave"
        )));
    }
    change(current, current.without_node(name)?, None)
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
        assert!(plan.copies.is_empty());
        assert_eq!(plan.steps.len(), 3);
        assert!(plan.rollback().is_empty());
    }

    #[test]
    fn join_orders_prepare_copy_lock_commit_install_start_delete() {
        let current = ring(3);
        let new = NodeEntry::new("new", "127.0.0.1:9999");
        let plan = join(&current, new.clone()).unwrap();
        check_plan(&current, &plan);
        assert_eq!(plan.metadata.version, 2);
        // The newcomer takes its share from every other node (balanced placement), each
        // copy from the partition's owner, which is also its head without replication.
        let senders: BTreeSet<&str> = plan.copies.iter().map(|c| c.from.name.as_str()).collect();
        assert_eq!(senders.len(), 3, "{:#?}", plan.copies);
        for c in &plan.copies {
            assert_eq!(c.head, c.from);
            assert_eq!(c.to, new);
        }
        let first = |pred: &dyn Fn(&Step) -> bool| position_of(&plan, pred);
        let last = |pred: &dyn Fn(&Step) -> bool| plan.steps.iter().rposition(pred).unwrap();
        let is_lock = |s: &Step| matches!(s, Step::Lock { .. });
        let is_transfer = |s: &Step| matches!(s, Step::Transfer { .. });
        let is_open_delta = |s: &Step| matches!(s, Step::TransferDelta { last: false, .. });
        let is_delta = |s: &Step| matches!(s, Step::TransferDelta { last: true, .. });
        let is_install = |s: &Step| matches!(s, Step::Install { .. });
        let is_clear = |s: &Step| matches!(s, Step::Clear { .. });
        let commit = plan.commit_index();
        // Bulk copies and a delta round unlocked, then locks, then the last deltas, then
        // the commit, the installs, the start and the clears.
        assert!(last(&is_transfer) < first(&is_lock));
        assert!(last(&is_open_delta) < first(&is_lock));
        assert!(last(&is_lock) < first(&is_delta) && last(&is_delta) < commit);
        let start = position_of(&plan, |s| matches!(s, Step::Start { .. }));
        assert!(commit < first(&is_install) && last(&is_install) < start);
        assert!(start < first(&is_clear));
        assert!(
            !plan.steps.iter().any(|s| matches!(s, Step::Abort { .. })),
            "a sender's lock ends by its install, never by an unlock"
        );
        // The senders adopt first, then the receiver.
        let installs = plan.installed_at();
        assert_eq!(installs.last().map(String::as_str), Some("new"));
        assert_eq!(installs.len(), 4);
        // Receivers are prepared (cleared) before anything is sent to them.
        assert!(matches!(plan.steps[0], Step::Prepare { .. }));
        let rollback = plan.rollback();
        for c in &plan.copies {
            for node in [&c.from, &c.to] {
                assert!(rollback.contains(&Step::Abort {
                    node: node.clone(),
                    range: c.range
                }));
            }
        }
    }

    #[test]
    fn leave_spreads_the_leavers_partitions_and_installs_at_leaver_first() {
        let current = ring(4);
        let leaving = current.nodes[1].clone();
        let plan = leave(&current, &leaving.name).unwrap();
        check_plan(&current, &plan);
        let receivers: BTreeSet<&str> = plan.copies.iter().map(|c| c.to.name.as_str()).collect();
        assert!(receivers.len() >= 2, "{:#?}", plan.copies);
        for c in &plan.copies {
            assert_eq!(c.head, c.from);
            assert_eq!(c.from, leaving);
        }
        assert!(plan.metadata.node(&leaving.name).is_none());
        assert_eq!(
            plan.installed_at().first(),
            Some(&leaving.name),
            "the sender adopts first"
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

    // ---- Replication: the generic rule, checked by simulating where data is held. ----

    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Zones: joins (in a zone of their own or an existing one) and leaves of rings whose
    /// nodes span two to four zones keep every rule. Some of them copy one range from one
    /// sender to two receivers (the sender tracks each copy's rounds apart,
    /// `ringkv_node::moves`).
    #[test]
    fn changes_in_zoned_rings_keep_every_rule() {
        let copied_twice = |plan: &Plan| {
            plan.copies.iter().enumerate().any(|(i, a)| {
                plan.copies[i + 1..]
                    .iter()
                    .any(|b| a.from == b.from && a.range == b.range)
            })
        };
        let (mut checked, mut twice) = (0, 0);
        for zones in 2..=4usize {
            let mut current = RingMetadata::default();
            for i in 0..9usize {
                let node = NodeEntry::new(format!("z{i}"), format!("127.0.0.1:{}", 7200 + i))
                    .in_zone(format!("zone-{}", i % zones));
                let plan = join_with_replication(&current, node, 3).unwrap();
                if !current.nodes.is_empty() {
                    check_plan(&current, &plan);
                    checked += 1;
                    twice += copied_twice(&plan) as usize;
                }
                current = plan.metadata;
                if current.nodes.len() >= 3 {
                    for leaver in &current.nodes {
                        let plan = leave(&current, &leaver.name).unwrap();
                        check_plan(&current, &plan);
                        checked += 1;
                        twice += copied_twice(&plan) as usize;
                    }
                }
            }
            let stranger = NodeEntry::new("zz", "127.0.0.1:7299").in_zone("zone-new");
            let plan = join(&current, stranger).unwrap();
            check_plan(&current, &plan);
            twice += copied_twice(&plan) as usize;
        }
        assert!(checked > 50 && twice > 0, "{checked} plans, {twice}");
        println!("{checked} plans checked, {twice} copy one range from one sender twice");
    }

    fn ring_r(n: usize, replication: u8) -> RingMetadata {
        ring(n).with_replication(replication).unwrap()
    }

    /// Which phase a step belongs to; plan steps must come in this order.
    fn phase(step: &Step) -> u8 {
        match step {
            Step::Prepare { .. } => 0,
            Step::Transfer { .. } | Step::TransferDelta { last: false, .. } => 1,
            Step::Lock { .. } => 2,
            Step::TransferDelta { last: true, .. } => 3,
            Step::Commit => 4,
            Step::Install { .. } => 5,
            Step::Start { .. } => 6,
            Step::Clear { .. } => 7,
            Step::Abort { .. } => 8,
        }
    }

    fn chain_names(ring: &RingMetadata, pos: &Position) -> BTreeSet<String> {
        ring.chain(pos).iter().map(|n| n.name.clone()).collect()
    }

    /// Runs `plan` from `current` on a model of which node holds which elementary arc
    /// (`Transfer`: the receiver now holds the range; `Clear`: the node drops it), and
    /// checks every rule of the module docs. Returns the copies per arc.
    fn check_plan(current: &RingMetadata, plan: &Plan) {
        let target = &plan.metadata;
        assert_eq!(target.version, current.version + 1);
        let arcs = elementary_arcs(current, target);
        let failed: BTreeSet<&str> = current.failed.iter().map(|s| s.as_str()).collect();
        let mut holds: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for (k, arc) in arcs.iter().enumerate() {
            for n in current.chain(&arc.end) {
                holds.entry(n.name.clone()).or_default().insert(k);
            }
        }
        let holders = |holds: &BTreeMap<String, BTreeSet<usize>>, k: usize| -> BTreeSet<String> {
            holds
                .iter()
                .filter(|(_, arcs)| arcs.contains(&k))
                .map(|(n, _)| n.clone())
                .collect()
        };
        // Phases in order; nothing is sent to a failed node.
        for pair in plan.steps.windows(2) {
            assert!(phase(&pair[0]) <= phase(&pair[1]), "{plan:#?}");
        }
        // Stages: the steps in order, one kind per stage, the commit alone; the installs of
        // every copy's source and old head (the lock holders) in the first install stage, a
        // joining node's in the last.
        assert_eq!(plan.stages().concat(), plan.steps);
        assert_eq!(plan.rollback_stages().concat(), plan.rollback());
        for stage in plan.stages() {
            let kind = |s: &Step| (std::mem::discriminant(s), phase(s));
            assert!(
                stage.iter().all(|s| kind(s) == kind(&stage[0])),
                "{stage:#?}"
            );
            assert!(stage.len() == 1 || stage[0] != Step::Commit);
        }
        let install_stages: Vec<Vec<String>> = plan
            .stages()
            .iter()
            .filter(|stage| matches!(stage[0], Step::Install { .. }))
            .map(|stage| {
                stage
                    .iter()
                    .flat_map(Step::nodes)
                    .map(|n| n.name.clone())
                    .collect()
            })
            .collect();
        if let Some(first) = install_stages.first() {
            for (node, _) in plan.locks() {
                if !failed.contains(node.name.as_str()) {
                    assert!(first.contains(&node.name), "{} not in {first:?}", node.name);
                }
            }
            for c in &plan.copies {
                if current.node(&c.to.name).is_none() {
                    assert!(install_stages.last().unwrap().contains(&c.to.name));
                    assert!(install_stages.len() == 1 || !first.contains(&c.to.name));
                }
            }
        }
        for step in plan.steps.iter().chain(&plan.rollback()) {
            for n in step.nodes() {
                assert!(
                    !failed.contains(n.name.as_str()),
                    "{step:?} at a failed node"
                );
            }
        }
        // Every copy covers whole arcs whose old chain ends at its source and starts at its
        // head, and whose new chain (only) holds its receiver.
        for c in &plan.copies {
            let mut covered = 0;
            for arc in arcs.iter().filter(|a| c.range.contains(&a.end)) {
                covered += 1;
                let old = current.chain(&arc.end);
                assert_eq!(old.last().copied(), Some(&c.from), "source is the old tail");
                assert_eq!(old.first().copied(), Some(&c.head), "head is the old head");
                assert!(!old.contains(&&c.to));
                assert!(target.chain(&arc.end).contains(&&c.to));
            }
            assert!(covered > 0);
            // Locked at its head and its source before its last round.
            let last = position_of(plan, |s| {
                *s == Step::TransferDelta {
                    from: c.from.clone(),
                    to: c.to.clone(),
                    range: c.range,
                    last: true,
                }
            });
            for n in [&c.head, &c.from] {
                let lock = position_of(plan, |s| {
                    *s == Step::Lock {
                        node: n.clone(),
                        range: c.range,
                    }
                });
                assert!(lock < last);
            }
        }
        // Arcs whose tail or head changes are locked at the old one (unless it is being
        // failed).
        for arc in &arcs {
            let (old, new) = (current.chain(&arc.end), target.chain(&arc.end));
            for (was, is) in [(old.first(), new.first()), (old.last(), new.last())] {
                if let Some(was) = was {
                    // A node being failed is dead: nothing can lock it.
                    if Some(was) != is && !target.is_failed(&was.name) {
                        assert!(
                            plan.locks()
                                .iter()
                                .any(|(n, r)| n == was && r.contains(&arc.end)),
                            "{arc:?} is handed over by {} unlocked",
                            was.name
                        );
                    }
                }
            }
        }
        // Simulate.
        let mut committed = false;
        for step in &plan.steps {
            match step {
                Step::Transfer { from, to, range } => {
                    for (k, arc) in arcs.iter().enumerate() {
                        if range.contains(&arc.end) {
                            assert!(
                                holds.get(&from.name).is_some_and(|h| h.contains(&k)),
                                "{} sends {arc:?} it does not hold",
                                from.name
                            );
                            holds.entry(to.name.clone()).or_default().insert(k);
                        }
                    }
                }
                Step::Clear { node, range } => {
                    assert!(committed, "a clear before the commit");
                    for (k, arc) in arcs.iter().enumerate() {
                        if range.contains(&arc.end) {
                            holds.entry(node.name.clone()).or_default().remove(&k);
                        }
                    }
                }
                Step::Commit => committed = true,
                _ => {}
            }
            for (k, arc) in arcs.iter().enumerate() {
                let must = if committed {
                    chain_names(target, &arc.end)
                } else {
                    chain_names(current, &arc.end)
                };
                let held = holders(&holds, k);
                assert!(
                    must.is_subset(&held),
                    "after {step:?}: {arc:?} held by {held:?}, needs {must:?}"
                );
            }
        }
        // Everybody ends holding exactly what the target says (but a node failed by this
        // change: it is dead, nothing can clear it, and what it holds is never served).
        let mut everyone: BTreeSet<String> = holds.keys().cloned().collect();
        everyone.extend(target.nodes.iter().map(|n| n.name.clone()));
        for name in everyone.into_iter().filter(|n| !target.is_failed(n)) {
            let want: BTreeSet<usize> = (0..arcs.len())
                .filter(|k| {
                    target
                        .replicated_by(&name)
                        .iter()
                        .any(|(r, _)| r.contains(&arcs[*k].end))
                })
                .collect();
            let held = holds.get(&name).cloned().unwrap_or_default();
            assert_eq!(held, want, "{name} holds {held:?}, target says {want:?}");
        }
        // Rollback: every lock holder's range (retried), then every receiver's (best effort).
        let rollback = plan.rollback();
        let locks = plan.locks();
        for (i, (node, range)) in locks.iter().enumerate() {
            assert_eq!(
                rollback[i],
                Step::Abort {
                    node: (*node).clone(),
                    range: *range
                }
            );
            assert!(!plan.best_effort(&rollback[i]));
        }
        for c in &plan.copies {
            let abort = Step::Abort {
                node: c.to.clone(),
                range: c.range,
            };
            assert!(rollback[locks.len()..].contains(&abort) || rollback.contains(&abort));
        }
        for step in &rollback[locks.len()..] {
            assert!(plan.best_effort(step));
        }
        assert!(
            plan.installed_at()
                .iter()
                .all(|n| !failed.contains(n.as_str())),
            "installs at failed nodes"
        );
    }

    /// The nodes that newly hold each elementary arc of the change from `current` to
    /// `plan`'s target, with the copies that cover it.
    fn entering<'a>(
        current: &'a RingMetadata,
        plan: &'a Plan,
    ) -> Vec<(KeyRange, Vec<&'a NodeEntry>, Vec<&'a Copy>)> {
        elementary_arcs(current, &plan.metadata)
            .into_iter()
            .map(|arc| {
                let old = current.chain(&arc.end);
                let new: Vec<&NodeEntry> = plan
                    .metadata
                    .chain(&arc.end)
                    .into_iter()
                    .filter(|n| !old.contains(n))
                    .collect();
                let copies = plan
                    .copies
                    .iter()
                    .filter(|c| c.range.contains(&arc.end))
                    .collect();
                (arc, new, copies)
            })
            .collect()
    }

    #[test]
    fn replicated_join_copies_the_newcomers_share_from_the_old_tails() {
        let current = ring_r(5, 3);
        let new = NodeEntry::new("new", "127.0.0.1:9999");
        let plan = join(&current, new.clone()).unwrap();
        check_plan(&current, &plan);
        assert_eq!(plan.metadata.replication, 3);
        // Its share (3 copies in 6 nodes: half the partitions) comes from several tails.
        let share =
            plan.metadata.shares()[plan.metadata.nodes.iter().position(|n| *n == new).unwrap()];
        assert_eq!(share.copies as usize, plan.metadata.partition_count() / 2);
        let sources: BTreeSet<&str> = plan.copies.iter().map(|c| c.from.name.as_str()).collect();
        assert!(sources.len() >= 3, "{sources:?}");
        for (arc, entering, copies) in entering(&current, &plan) {
            assert!(entering.iter().all(|n| **n == new), "{arc:?}: {entering:?}");
            assert_eq!(copies.len(), entering.len(), "{arc:?}");
            for c in copies {
                assert_eq!(current.tail(&arc.end), Some(&c.from));
                assert_eq!(current.head(&arc.end), Some(&c.head));
            }
        }
        let last_install = plan
            .steps
            .iter()
            .rposition(|s| matches!(s, Step::Install { .. }))
            .unwrap();
        let start = position_of(&plan, |s| *s == Step::Start { node: new.clone() });
        let first_clear = position_of(&plan, |s| matches!(s, Step::Clear { .. }));
        assert!(last_install < start && start < first_clear);
        assert_eq!(plan.installed_at().last().map(String::as_str), Some("new"));
    }

    #[test]
    fn replicated_leave_rebuilds_each_arc_once_at_its_replacement() {
        let current = ring_r(5, 3);
        for leaving in current.nodes.clone() {
            let plan = leave(&current, &leaving.name).unwrap();
            check_plan(&current, &plan);
            let mut receivers = BTreeSet::new();
            for (arc, entering, copies) in entering(&current, &plan) {
                let held = current.chain(&arc.end).contains(&&leaving);
                assert_eq!(entering.len(), usize::from(held), "{arc:?}");
                assert_eq!(copies.len(), entering.len(), "{arc:?}: {copies:#?}");
                if let (Some(to), Some(c)) = (entering.first(), copies.first()) {
                    assert_eq!(&c.to, *to);
                    receivers.insert(c.to.name.clone());
                    if c.from == leaving {
                        assert_eq!(
                            current.tail(&arc.end),
                            Some(&leaving),
                            "only the old tail sends"
                        );
                    }
                }
            }
            assert!(
                receivers.len() >= 2,
                "{} rebuilt on {receivers:?}",
                leaving.name
            );
        }
    }

    #[test]
    fn fail_moves_nothing_and_remove_failed_rebuilds_from_live_copies() {
        let current = ring_r(4, 3);
        let dead = current.nodes[1].clone();
        let failed = fail(&current, &dead.name).unwrap();
        check_plan(&current, &failed);
        assert!(failed.copies.is_empty());
        assert_eq!(failed.steps[0], Step::Commit);
        assert_eq!(failed.installed_at().len(), 3);
        assert!(!failed.installed_at().contains(&dead.name));
        assert!(failed.rollback().is_empty());
        assert!(failed.metadata.is_failed(&dead.name));

        let ring = failed.metadata.clone();
        let plan = remove_failed(&ring, &dead.name).unwrap();
        check_plan(&ring, &plan);
        assert!(plan.metadata.node(&dead.name).is_none());
        assert!(!plan.copies.is_empty());
        for (arc, entering, copies) in entering(&ring, &plan) {
            let held = current.chain(&arc.end).contains(&&dead);
            assert_eq!(entering.len(), usize::from(held), "{arc:?}");
            assert_eq!(copies.len(), entering.len(), "{arc:?}");
            assert!(copies.iter().all(|c| c.from != dead));
        }
        let sources: BTreeSet<&str> = plan.copies.iter().map(|c| c.from.name.as_str()).collect();
        assert!(sources.len() >= 2, "rebuilt from {sources:?} only");
        for step in plan.steps.iter().chain(&plan.rollback()) {
            assert!(!step.nodes().contains(&&dead), "{step:?}");
        }
        // Removing it with a leave gives the same plan.
        assert_eq!(leave(&ring, &dead.name).unwrap(), plan);
    }

    #[test]
    fn replication_refusals() {
        let r1 = ring(3);
        assert!(matches!(fail(&r1, "n0"), Err(EcsError::Refused(_))));
        let r3 = ring_r(3, 3);
        assert!(matches!(fail(&r3, "nope"), Err(EcsError::Ring(_))));
        let failed = fail(&r3, "n0").unwrap().metadata;
        assert!(matches!(fail(&failed, "n0"), Err(EcsError::Refused(_))));
        assert!(matches!(
            remove_failed(&r3, "n0"),
            Err(EcsError::Refused(_))
        ));
        assert!(matches!(
            change(&r3, r3.clone(), None),
            Err(EcsError::Refused(_))
        ));
        // Both other copies failed: the last live one may not leave.
        let r2 = ring_r(3, 2);
        let (a, b, c) = (&r2.nodes[0].name, &r2.nodes[1].name, &r2.nodes[2].name);
        let r2 = fail(&r2, b).unwrap().metadata;
        // Failing over the last live copy of a range is refused...
        assert!(matches!(fail(&r2, c), Err(EcsError::NoLiveCopy { .. })));
        // ...and a ring where it happened anyway (both marked failed) refuses the leave.
        let r2 = r2.with_failed(c).unwrap();
        match leave(&r2, a) {
            Err(e @ EcsError::NoLiveCopy { .. }) => {
                assert!(e.to_string().contains("would lose its data"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            leave(&ring_r(1, 3), "n0"),
            Err(EcsError::LastNode(_))
        ));
    }

    #[test]
    fn the_first_join_sets_the_replication_factor_and_later_joins_keep_it() {
        let a = NodeEntry::new("a", "h:1");
        let plan = join_with_replication(&RingMetadata::default(), a.clone(), 3).unwrap();
        assert_eq!(plan.metadata.replication, 3);
        assert_eq!(
            plan.steps,
            vec![
                Step::Commit,
                Step::Install { node: a.clone() },
                Step::Start { node: a.clone() }
            ]
        );
        let b = NodeEntry::new("b", "h:2");
        let plan = join_with_replication(&plan.metadata, b.clone(), 1).unwrap();
        assert_eq!(plan.metadata.replication, 3);
        // Two nodes, three copies wanted: b gets all of the ring from a.
        assert_eq!(plan.copies.len(), 1);
        assert!(plan.copies[0].range.is_full());
        assert_eq!((&plan.copies[0].from, &plan.copies[0].to), (&a, &b));
        // A failed node stays failed when another joins.
        let three = join(&plan.metadata, NodeEntry::new("c", "h:3")).unwrap();
        check_plan(&plan.metadata, &three);
        let failed = fail(&three.metadata, "a").unwrap().metadata;
        let four = join(&failed, NodeEntry::new("d", "h:4")).unwrap();
        check_plan(&failed, &four);
        assert_eq!(four.metadata.failed, vec!["a".to_string()]);
    }

    fn arb_ring() -> impl Strategy<Value = RingMetadata> {
        (
            proptest::collection::hash_set(1u16..u16::MAX, 2..9),
            1u8..=4,
        )
            .prop_map(|(ports, replication)| {
                let nodes = ports
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| NodeEntry::new(format!("n{i}"), format!("10.0.0.1:{p}")))
                    .collect();
                RingMetadata::new(1, nodes)
                    .unwrap()
                    .with_replication(replication)
                    .unwrap()
            })
    }

    proptest! {
        #[test]
        fn replication_one_plans_move_each_arc_from_its_owner_to_its_new_owner(
            ring in arb_ring(),
            port in 1u16..u16::MAX,
            which in any::<prop::sample::Index>(),
        ) {
            let ring = ring.with_replication(1).unwrap();
            let new = NodeEntry::new("new", format!("10.0.0.2:{port}"));
            let leaving = ring.nodes[which.index(ring.nodes.len())].name.clone();
            for plan in [join(&ring, new.clone()).unwrap(), leave(&ring, &leaving).unwrap()] {
                check_plan(&ring, &plan);
                for (arc, entering, copies) in entering(&ring, &plan) {
                    let (old, new) = (ring.head(&arc.end), plan.metadata.head(&arc.end));
                    if old == new {
                        prop_assert!(copies.is_empty());
                        continue;
                    }
                    prop_assert_eq!(entering.len(), 1);
                    prop_assert_eq!(copies.len(), 1);
                    prop_assert_eq!(Some(&copies[0].from), old);
                    prop_assert_eq!(Some(&copies[0].to), new);
                    prop_assert_eq!(&copies[0].head, &copies[0].from);
                }
            }
        }

        #[test]
        fn every_change_ends_with_each_node_holding_its_target_ranges(
            ring in arb_ring(),
            op in 0u8..3,
            which in any::<prop::sample::Index>(),
            prefail in proptest::option::of(any::<prop::sample::Index>()),
            port in 1u16..u16::MAX,
        ) {
            // Optionally one node already failed (with replication above 1).
            let ring = match prefail {
                Some(i) if ring.replication > 1 => {
                    let name = ring.nodes[i.index(ring.nodes.len())].name.clone();
                    let plan = fail(&ring, &name).unwrap();
                    check_plan(&ring, &plan);
                    plan.metadata
                }
                _ => ring,
            };
            let name = ring.nodes[which.index(ring.nodes.len())].name.clone();
            match op {
                0 => {
                    let new = NodeEntry::new("new", format!("10.0.0.2:{port}"));
                    match join(&ring, new) {
                        Ok(plan) => check_plan(&ring, &plan),
                        // Only when a range has no live copy at all.
                        Err(EcsError::NoLiveCopy { range, .. }) => {
                            prop_assert!(ring.chain(&range.end).is_empty())
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                1 => match leave(&ring, &name) {
                    Ok(plan) => check_plan(&ring, &plan),
                    Err(EcsError::NoLiveCopy { range, .. }) => {
                        let after = ring.without_node(&name).unwrap();
                        prop_assert!(
                            ring.chain(&range.end).is_empty() || after.chain(&range.end).is_empty()
                        );
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                },
                _ => {
                    let empties = ring.with_failed(&name).is_ok_and(|after| {
                        after.chains().iter().any(|(_, chain)| chain.is_empty())
                    });
                    if ring.replication == 1 || ring.is_failed(&name) || empties {
                        prop_assert!(fail(&ring, &name).is_err());
                    } else {
                        let failed = fail(&ring, &name).unwrap();
                        check_plan(&ring, &failed);
                        prop_assert!(failed.copies.is_empty());
                        let ring = failed.metadata;
                        match remove_failed(&ring, &name) {
                            Ok(plan) => {
                                check_plan(&ring, &plan);
                                for step in &plan.steps {
                                    prop_assert!(step.nodes().iter().all(|n| n.name != name));
                                }
                            }
                            Err(EcsError::NoLiveCopy { range, .. }) => {
                                let after = ring.without_node(&name).unwrap();
                                prop_assert!(
                                    ring.chain(&range.end).is_empty()
                                        || after.chain(&range.end).is_empty()
                                );
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                }
            }
        }
    }
}
