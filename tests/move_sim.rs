//! A deterministic simulation of range moves (no network, no clock): the ECS's real
//! [`Executor`] drives a join or a leave against simulated nodes whose move decisions are
//! made by the nodes' real [`MoveState`], while a client keeps writing into the moving range.
//! A fault is injected at every action of the change, one run per (change, fault, action):
//! a request lost, a request delayed until after the node's next request (a rollback's
//! abort), a request applied but its reply lost, the sender or the receiver crashing
//! (losing everything not persisted) and restarting a few actions later, the ECS crashing
//! and resuming from its intent log. After every event the client writes and reads every
//! key, and the simulation checks that at most one node would accept a write for each key
//! and that every read served returns the last acknowledged write; at the end, that every
//! acknowledged write is readable at its owner, no range is left locked, and a committed
//! joiner serves.

use std::collections::{BTreeMap, HashMap};

use std::time::Duration;

use ringkv_ecs::executor::{Action, Executor, Intent, Outcome, Phase};
use ringkv_ecs::plan::{self, Plan, Step};
use ringkv_ecs::raft::RaftError;
use ringkv_node::moves::{MoveState, Round};
use ringkv_wire::{
    key_position, HashedKey, KeyRange, MoveId, NodeEntry, RingMetadata, TransferStats,
};

/// A node: what survives a crash (ring, data, persisted locks) and what does not.
struct SimNode {
    entry: NodeEntry,
    up: bool,
    restart_at: Option<usize>,
    metadata: RingMetadata,
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    moves: MoveState,
    running: bool,
}

impl SimNode {
    fn new(entry: NodeEntry, metadata: RingMetadata) -> Self {
        let running = metadata.node(&entry.name).is_some();
        Self {
            entry,
            up: true,
            restart_at: None,
            metadata,
            data: BTreeMap::new(),
            moves: MoveState::default(),
            running,
        }
    }

    /// The ranges this node owns (heads; without replication, all it holds).
    fn own_ranges(&self) -> Vec<KeyRange> {
        self.metadata.held_by(&self.entry.name)
    }

    fn owns(&self, key: &[u8]) -> bool {
        self.own_ranges()
            .iter()
            .any(|r| r.contains(&HashedKey::new(key).position))
    }

    fn owns_any(&self, range: &KeyRange) -> bool {
        self.own_ranges().iter().any(|own| own.intersects(range))
    }

    /// Whether a client write of `key` would be accepted here now.
    fn accepts_write(&self, key: &[u8]) -> bool {
        self.up
            && self.running
            && self.owns(key)
            && !self.moves.is_locked(&HashedKey::new(key).position)
    }

    fn delete_range(&mut self, range: &KeyRange) {
        self.data
            .retain(|k, _| !range.contains(&HashedKey::new(k).position));
    }

    fn crash(&mut self, restart_at: usize) {
        self.up = false;
        self.restart_at = Some(restart_at);
        // A restart keeps the ring, the data and the persisted locks, nothing else (as
        // `Node::open`): it serves if the persisted ring holds it.
        self.moves = MoveState::restore(self.moves.persisted().to_vec(), self.metadata.version);
        self.running = self.metadata.node(&self.entry.name).is_some();
    }

    fn install(&mut self, metadata: &RingMetadata) {
        if metadata.version > self.metadata.version {
            self.metadata = metadata.clone();
            self.moves.adopt(metadata.version);
        }
    }
}

/// The faults, each injected at one action of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The request never reaches the node.
    RequestLost,
    /// The node applies the request, but the reply is lost.
    ReplyLost,
    /// The sender crashes just before the action and restarts 4 actions later.
    SenderCrash,
    /// The receiver likewise.
    ReceiverCrash,
    /// The ECS crashes right after performing the action and resumes from its intent log.
    EcsCrash,
    /// The ECS's durable write (a `Persist` or the `Commit`, a Raft proposal in a group)
    /// times out, and commits anyway: the outcome reported is the driver's for a timeout.
    ProposalUnknownCommitted,
    /// Likewise, and the proposal is lost.
    ProposalUnknownLost,
    /// The proposal times out and commits, then the ECS loses the lead: the next leader
    /// resumes from the group's intent log.
    ProposalUnknownCommittedThenNewLeader,
    /// Likewise, and the proposal is lost.
    ProposalUnknownLostThenNewLeader,
    /// The request is delayed (the node stopped with it in its socket buffer): the ECS times
    /// out, and the node runs it only after the next request it gets, an abort of the
    /// rollback.
    DelayedPastAbort,
}

const FAULTS: [Fault; 10] = [
    Fault::RequestLost,
    Fault::ReplyLost,
    Fault::SenderCrash,
    Fault::ReceiverCrash,
    Fault::EcsCrash,
    Fault::ProposalUnknownCommitted,
    Fault::ProposalUnknownLost,
    Fault::ProposalUnknownCommittedThenNewLeader,
    Fault::ProposalUnknownLostThenNewLeader,
    Fault::DelayedPastAbort,
];

impl Fault {
    /// For a fault on the ECS's durable write: whether the write lands.
    fn proposal_lands(self) -> Option<bool> {
        match self {
            Fault::ProposalUnknownCommitted | Fault::ProposalUnknownCommittedThenNewLeader => {
                Some(true)
            }
            Fault::ProposalUnknownLost | Fault::ProposalUnknownLostThenNewLeader => Some(false),
            _ => None,
        }
    }

    /// Whether the ECS loses the lead (or crashes) right after the action.
    fn ecs_replaced(self) -> bool {
        matches!(
            self,
            Fault::EcsCrash
                | Fault::ProposalUnknownCommittedThenNewLeader
                | Fault::ProposalUnknownLostThenNewLeader
        )
    }
}

/// What the ECS's driver reports to the executor for a proposal that timed out.
fn timed_out() -> Outcome {
    Outcome::of_proposal(&Err::<(), _>(RaftError::Timeout(Duration::from_secs(5))))
}

struct Sim {
    nodes: Vec<SimNode>,
    ecs_ring: RingMetadata,
    /// The ECS's intent log (what its last Persist/Commit wrote).
    intent_log: Option<Intent>,
    /// The clients' cached rings: client 0 learns a new ring only from `NotResponsible`,
    /// client 1 always routes with the newest ring any node holds (as a client that just
    /// heard of it elsewhere would).
    client_rings: [RingMetadata; 2],
    /// The last acknowledged value of every key.
    acked: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys the client writes (half of them in the moving range).
    keys: Vec<Vec<u8>>,
    writes: u64,
    events: usize,
    trace: Vec<String>,
}

impl Sim {
    fn node(&mut self, name: &str) -> &mut SimNode {
        self.nodes
            .iter_mut()
            .find(|n| n.entry.name == name)
            .unwrap()
    }

    fn by_name(&self, name: &str) -> &SimNode {
        self.nodes.iter().find(|n| n.entry.name == name).unwrap()
    }

    /// One event happened: restart due nodes, let the client write, check single ownership.
    fn tick(&mut self) {
        self.events += 1;
        let now = self.events;
        for n in &mut self.nodes {
            if n.restart_at.is_some_and(|t| t <= now) {
                n.up = true;
                n.restart_at = None;
            }
        }
        let newest = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| &n.metadata)
            .max_by_key(|m| m.version)
            .cloned();
        if let Some(newest) = newest.filter(|m| m.version > self.client_rings[1].version) {
            self.client_rings[1] = newest;
        }
        // Reads first: a read must see the writes of the previous events.
        for client in [0, 1] {
            self.client_reads(client);
            self.client_writes(client);
        }
        for key in &self.keys {
            let accepting: Vec<&str> = self
                .nodes
                .iter()
                .filter(|n| n.accepts_write(key))
                .map(|n| n.entry.name.as_str())
                .collect();
            assert!(
                accepting.len() <= 1,
                "two nodes accept writes for {:?}: {accepting:?}\n{}",
                String::from_utf8_lossy(key),
                self.trace.join("\n")
            );
        }
    }

    /// The node client `client` reaches for `key`: routed by its cached ring, following one
    /// `NotResponsible` (adopting the newer ring it carries). `None` if that node is down,
    /// stopped or not (yet) responsible.
    fn route(&mut self, client: usize, key: &[u8]) -> Option<String> {
        for _ in 0..2 {
            let owner = self.client_rings[client]
                .responsible_for_key(key)?
                .name
                .clone();
            let node = self.by_name(&owner);
            if !node.up || !node.running {
                return None;
            }
            if node.owns(key) {
                return Some(owner);
            }
            let theirs = node.metadata.clone();
            if theirs.version <= self.client_rings[client].version {
                return None;
            }
            self.client_rings[client] = theirs;
        }
        None
    }

    /// The client writes every key once; a write that meets a lock, a stopped or a down
    /// node is not acknowledged (and, the simulation being synchronous, not applied).
    fn client_writes(&mut self, client: usize) {
        for i in 0..self.keys.len() {
            let key = self.keys[i].clone();
            self.writes += 1;
            let value = format!("w{}", self.writes).into_bytes();
            let Some(owner) = self.route(client, &key) else {
                continue;
            };
            let node = self.node(&owner);
            if node.moves.is_locked(&HashedKey::new(&key).position) {
                continue;
            }
            node.moves.track(&HashedKey::new(&key));
            node.data.insert(key.clone(), value.clone());
            self.acked.insert(key, value);
        }
    }

    /// The client reads every key; a node that serves the read must return the last
    /// acknowledged write (the simulation is sequential, so that is what linearizability
    /// means here): a lost write, or a stale read at a node that has given the range up,
    /// fails here.
    fn client_reads(&mut self, client: usize) {
        for i in 0..self.keys.len() {
            let key = self.keys[i].clone();
            let Some(owner) = self.route(client, &key) else {
                continue;
            };
            let got = self.by_name(&owner).data.get(&key).cloned();
            assert_eq!(
                got.as_ref(),
                self.acked.get(&key),
                "read of {:?} at {owner} is not the last acknowledged write\n{}",
                String::from_utf8_lossy(&key),
                self.trace.join("\n")
            );
        }
    }

    /// Before `action` (a single step for a stage's): injects a crash `fault`, traces, and
    /// checks that what the nodes are told follows what the intent log holds: a lock only
    /// once `lock_sent` is durable, a rollback's abort only once `RollingBack` is (a member
    /// that takes over acts on the durable phase).
    fn before(&mut self, action: &Action, fault: Option<Fault>, mv: &plan::Copy) {
        match fault {
            Some(Fault::SenderCrash) => {
                let t = self.events + 4;
                self.node(&mv.from.name).crash(t);
            }
            Some(Fault::ReceiverCrash) => {
                let t = self.events + 4;
                self.node(&mv.to.name).crash(t);
            }
            _ => {}
        }
        self.trace.push(format!("{action:?} (fault {fault:?})"));
        match action {
            Action::Run(steps) if matches!(steps[..], [Step::Lock { .. }]) => assert!(
                self.intent_log.as_ref().is_some_and(|i| i.lock_sent),
                "{fault:?}: a lock sent before lock_sent was persisted\n{}",
                self.trace.join("\n")
            ),
            Action::Run(steps) if matches!(steps[..], [Step::Abort { .. }]) => assert!(
                self.intent_log
                    .as_ref()
                    .is_some_and(|i| i.phase == Phase::RollingBack),
                "{fault:?}: an abort sent before the rollback was persisted\n{}",
                self.trace.join("\n")
            ),
            _ => {}
        }
    }

    /// Performs `step` of move `id` at its node, as the node's handler does.
    fn perform(&mut self, step: &Step, id: MoveId, plan: &Plan) -> Outcome {
        let target = target(step).to_string();
        if !self.by_name(&target).up {
            return Outcome::Failed(format!("{target} is down"));
        }
        let refused = |e: &dyn std::fmt::Display| Outcome::Failed(e.to_string());
        let ok = |node: &SimNode, stats: Option<TransferStats>| Outcome::Ok {
            stats,
            node_version: node.metadata.version,
        };
        match step {
            Step::Prepare { node, range, from } => {
                let n = self.node(&node.name);
                if n.owns_any(range) {
                    return Outcome::Failed("owns the range".into());
                }
                n.delete_range(range);
                let version = n.metadata.version;
                match n.moves.prepare_receive(id, *range, &from.name, version) {
                    Ok(()) => ok(n, None),
                    Err(e) => refused(&e),
                }
            }
            Step::Clear { node, range } => {
                let n = self.node(&node.name);
                if n.owns_any(range) {
                    return Outcome::Failed("owns the range".into());
                }
                n.delete_range(range);
                ok(n, None)
            }
            Step::Lock { node, range } => {
                let n = self.node(&node.name);
                let version = n.metadata.version;
                match n.moves.lock(id, *range, version) {
                    Ok(_) => ok(n, None),
                    Err(e) => refused(&e),
                }
            }
            Step::Abort { node, range } => {
                let n = self.node(&node.name);
                let version = n.metadata.version;
                match n.moves.abort(id, version) {
                    Ok(_) => {
                        if !n.owns_any(range) {
                            n.delete_range(range);
                        }
                        ok(n, None)
                    }
                    Err(e) => refused(&e),
                }
            }
            Step::Transfer { from, to, range } => {
                let n = self.node(&from.name);
                let version = n.metadata.version;
                if let Err(e) = n.moves.start_tracking(id, *range, &to.name, version) {
                    return refused(&e);
                }
                let entries: Vec<(Vec<u8>, Vec<u8>)> = n
                    .data
                    .iter()
                    .filter(|(k, _)| range.contains(&HashedKey::new(k).position))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                self.send(
                    id,
                    &from.name,
                    &to.name,
                    entries.into_iter().map(|(k, v)| (k, Some(v))).collect(),
                )
            }
            Step::TransferDelta {
                from,
                to,
                range,
                last,
            } => {
                let n = self.node(&from.name);
                let keys: Vec<Vec<u8>> = match n.moves.next_round(id, range, &to.name, *last) {
                    Err(e) => return refused(&e),
                    Ok(Round::Keys(keys)) => keys.into_iter().collect(),
                    Ok(Round::Rescan) => n
                        .data
                        .keys()
                        .filter(|k| range.contains(&HashedKey::new(k).position))
                        .cloned()
                        .collect(),
                };
                let entries = keys
                    .into_iter()
                    .map(|k| {
                        let v = n.data.get(&k).cloned();
                        (k, v)
                    })
                    .collect();
                self.send(id, &from.name, &to.name, entries)
            }
            Step::Install { node } => {
                let n = self.node(&node.name);
                n.install(&plan.metadata);
                ok(n, None)
            }
            Step::Start { node } => {
                let n = self.node(&node.name);
                n.running = true;
                ok(n, None)
            }
            Step::Commit => unreachable!(),
        }
    }

    /// Sends batches of move `id` from `from` to `to` (each acknowledged once applied).
    fn send(
        &mut self,
        id: MoveId,
        from: &str,
        to: &str,
        entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Outcome {
        let receiver = self.node(to);
        if !receiver.up {
            return Outcome::Failed(format!("{to} is down"));
        }
        let positions: Vec<_> = entries.iter().map(|(k, _)| key_position(k)).collect();
        if receiver
            .moves
            .check_batch(id, from, positions.iter())
            .is_err()
        {
            return Outcome::Failed(format!("{to} refused the batch"));
        }
        let n = entries.len() as u64;
        for (k, v) in entries {
            match v {
                Some(v) => receiver.data.insert(k, v),
                None => receiver.data.remove(&k),
            };
        }
        let version = self.by_name(from).metadata.version;
        Outcome::Ok {
            stats: Some(TransferStats {
                entries: n,
                bytes: 0,
            }),
            node_version: version,
        }
    }
}

/// The node a step is sent to.
fn target(step: &Step) -> &str {
    match step {
        Step::Prepare { node, .. }
        | Step::Clear { node, .. }
        | Step::Lock { node, .. }
        | Step::Abort { node, .. }
        | Step::Install { node }
        | Step::Start { node } => &node.name,
        Step::Transfer { from, .. } | Step::TransferDelta { from, .. } => &from.name,
        Step::Commit => unreachable!("the commit is the ECS's own"),
    }
}

/// The change to simulate.
#[derive(Debug, Clone, Copy)]
enum Change {
    Join,
    Leave,
}

fn entry(name: &str, port: u16) -> NodeEntry {
    NodeEntry::new(name, format!("127.0.0.1:{port}"))
}

/// Runs `change` with `fault` injected at action number `at` (no fault if past the end).
/// Returns the number of actions the executor asked for.
fn run(change: Change, fault: Option<(Fault, usize)>) -> usize {
    let (a, b, c) = (entry("a", 7001), entry("b", 7002), entry("c", 7003));
    let (ring, joiner_or_leaver) = match change {
        Change::Join => (
            RingMetadata::new(1, vec![a.clone(), b.clone()]).unwrap(),
            c.clone(),
        ),
        Change::Leave => (
            RingMetadata::new(1, vec![a.clone(), b.clone(), c.clone()]).unwrap(),
            b.clone(),
        ),
    };
    let plan = match change {
        Change::Join => plan::join(&ring, joiner_or_leaver.clone()).unwrap(),
        Change::Leave => plan::leave(&ring, &joiner_or_leaver.name).unwrap(),
    };
    // Balanced placement: a join takes from both old nodes, a leave gives to both others,
    // so every change here is several copies between different pairs.
    let pairs: std::collections::HashSet<(&str, &str)> = plan
        .copies
        .iter()
        .map(|c| (c.from.name.as_str(), c.to.name.as_str()))
        .collect();
    assert!(pairs.len() >= 2, "{change:?}: {:#?}", plan.copies);
    let mv = plan.copies[0].clone();
    let mut nodes: Vec<SimNode> = [a, b, c]
        .into_iter()
        .map(|e| SimNode::new(e, ring.clone()))
        .collect();
    if matches!(change, Change::Join) {
        // The joiner is up but not in the ring.
        nodes[2].running = false;
    }
    // Keys: some in the moving range, some elsewhere.
    let mut keys = Vec::new();
    let (mut inside, mut outside) = (0, 0);
    for i in 0u32.. {
        let k = format!("key-{i}").into_bytes();
        if mv.range.contains(&HashedKey::new(&k).position) {
            if inside < 6 {
                inside += 1;
                keys.push(k);
            }
        } else if outside < 3 {
            outside += 1;
            keys.push(k);
        }
        if inside == 6 && outside == 3 {
            break;
        }
    }
    let mut sim = Sim {
        nodes,
        ecs_ring: ring.clone(),
        intent_log: None,
        client_rings: [ring.clone(), ring],
        acked: HashMap::new(),
        keys,
        writes: 0,
        events: 0,
        trace: Vec::new(),
    };
    sim.tick(); // initial writes

    let (mut exec, mut action) = Executor::new(plan.clone(), 1);
    let mut count = 0;
    let mut delayed: Option<Step> = None;
    let result = loop {
        count += 1;
        assert!(count < 10_000, "runaway\n{}", sim.trace.join("\n"));
        let fault_at = |count: usize| fault.filter(|(_, at)| *at == count).map(|(f, _)| f);
        let mut injected = fault_at(count);
        let outcome = match &action {
            Action::Persist(intent) | Action::Commit(intent) => {
                sim.before(&action, injected, &mv);
                let lands = injected.and_then(Fault::proposal_lands);
                if lands != Some(false) {
                    sim.intent_log = Some(intent.clone());
                    if matches!(action, Action::Commit(_)) {
                        sim.ecs_ring = intent.plan.metadata.clone();
                    }
                }
                sim.tick();
                lands.map_or_else(Outcome::ok, |_| timed_out())
            }
            // A stage's steps run one after another here (any order is one the ECS may take
            // with them at once), each a point a fault may hit.
            Action::Run(steps) => {
                let mut outcomes = Vec::new();
                for (j, step) in steps.iter().enumerate() {
                    if j > 0 {
                        count += 1;
                        injected = fault_at(count);
                    }
                    let one = Action::Run(vec![step.clone()]);
                    sim.before(&one, injected, &mv);
                    outcomes.push(match injected {
                        Some(Fault::DelayedPastAbort) => {
                            delayed = Some(step.clone());
                            Outcome::Failed("no reply within 5s".into())
                        }
                        Some(Fault::RequestLost) => Outcome::Failed("request lost".into()),
                        Some(Fault::ReplyLost) => {
                            let _ = sim.perform(step, exec.move_id(), &plan);
                            Outcome::Failed("reply lost".into())
                        }
                        _ => {
                            let outcome = sim.perform(step, exec.move_id(), &plan);
                            // The delayed request runs at its node right after the node's
                            // next one.
                            if let Some(late) = delayed.take_if(|late| target(late) == target(step))
                            {
                                sim.trace.push(format!("  delayed {late:?} runs now"));
                                let _ = sim.perform(&late, exec.move_id(), &plan);
                            }
                            outcome
                        }
                    });
                    sim.tick();
                    if injected.is_some_and(Fault::ecs_replaced) {
                        break; // the ECS is gone: the rest of the stage is never sent
                    }
                }
                Outcome::Ran(outcomes)
            }
            Action::Wait(_) => {
                sim.before(&action, injected, &mv);
                sim.tick();
                Outcome::ok()
            }
            Action::Finish(result) => {
                sim.intent_log = None;
                break result.clone();
            }
        };
        if injected.is_some_and(Fault::ecs_replaced) {
            // The ECS dies (or loses the lead) after performing the action; it (or the next
            // leader) resumes from the intent log.
            sim.trace.push("ECS crash or new leader".into());
            match sim.intent_log.clone() {
                Some(intent) => {
                    let (resumed, first) = Executor::resume(intent);
                    exec = resumed;
                    action = first;
                    continue;
                }
                None => break Err(("ecs crash".into(), "before the first persist".into())),
            }
        }
        action = exec.next(outcome);
    };
    // Let everything come back up, and gossip the ECS's ring to every node.
    for _ in 0..8 {
        sim.tick();
    }
    let ecs_ring = sim.ecs_ring.clone();
    for n in &mut sim.nodes {
        n.install(&ecs_ring);
    }
    let committed = ecs_ring.version == plan.metadata.version;
    assert_eq!(
        committed,
        result.is_ok(),
        "{change:?} {fault:?}: result {result:?} but ring v{}\n{}",
        ecs_ring.version,
        sim.trace.join("\n")
    );
    // Nothing locked, every acknowledged write at its owner, the owner serving.
    for n in &sim.nodes {
        assert!(
            n.moves.locked_ranges().is_empty(),
            "{change:?} {fault:?}: {} still locked\n{}",
            n.entry.name,
            sim.trace.join("\n")
        );
    }
    for (key, value) in &sim.acked {
        let owner = ecs_ring.responsible_for_key(key).unwrap().name.clone();
        let node = sim.by_name(&owner);
        assert!(node.running, "{change:?} {fault:?}: {owner} not serving");
        assert_eq!(
            node.data.get(key),
            Some(value),
            "{change:?} {fault:?}: acknowledged write of {:?} lost at {owner}\n{}",
            String::from_utf8_lossy(key),
            sim.trace.join("\n")
        );
    }
    // And the client can write every key again.
    let before = sim.acked.clone();
    sim.tick();
    for key in &sim.keys {
        assert_ne!(
            before.get(key),
            sim.acked.get(key),
            "{change:?} {fault:?}: {:?} not writable after the change",
            String::from_utf8_lossy(key)
        );
    }
    count
}

#[test]
fn every_fault_at_every_action_of_a_join_and_a_leave() {
    let mut runs = 0;
    for change in [Change::Join, Change::Leave] {
        let actions = run(change, None);
        for fault in FAULTS {
            for at in 1..=actions + 2 {
                run(change, Some((fault, at)));
                runs += 1;
            }
        }
        println!("{change:?}: {actions} actions in a clean run");
    }
    println!("{runs} faulty runs checked");
    assert!(runs > 100);
}
