//! A deterministic simulation of gossip among thousands of nodes: one seeded RNG,
//! simulated time (rounds of `T`), an in-memory network that may drop messages, and no
//! sockets. Every message is still encoded and decoded with the real codec
//! ([`ringkv_wire::codec`]), inside the same `Request`/`Reply` frames a node sends.
//!
//! Two timings ([`Timing`]): `Phased`, where each node ticks at its own fixed phase within
//! the interval and an exchange completes at once (request, reply, push), as on a LAN where
//! a round trip is far shorter than `T`, so news can travel several hops within one
//! interval; and `Synchronous`, the textbook model, where metadata adopted during a round is
//! only passed on from the next one (as if every exchange took a whole interval). The
//! simulation counts intervals `T`, not latencies.
//!
//! Memory: the simulation holds every node's state in one process, so nodes that adopted
//! the same version share one [`Membership`] (interned by version, the bytes compared to
//! the first copy decoded): 10,000 private copies of a 10,000-node ring would not fit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use ringkv_wire::{
    codec, Liveness, NodeEntry, Reply, ReplyBody, Request, RequestBody, RingMetadata,
    SignedMetadata,
};
use serde::{de::DeserializeOwned, Serialize};

use super::{stand_in_membership, GossipConfig, GossipState, Membership};

/// When what a node learns during a round becomes visible to others (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// Nodes tick at fixed phases; an exchange completes before the next tick.
    Phased,
    /// Metadata adopted in a round is passed on from the next round.
    Synchronous,
}

/// The simulated cluster.
pub struct Sim {
    timing: Timing,
    /// The order nodes tick in within a round (their phases).
    order: Vec<usize>,
    /// Adoptions waiting for the end of the round (`Synchronous`).
    pending: Vec<(usize, SignedMetadata)>,
    config: GossipConfig,
    t0: Instant,
    round: u64,
    nodes: Vec<GossipState>,
    stopped: Vec<bool>,
    loss: f64,
    rng: SmallRng,
    memberships: HashMap<u64, Arc<Membership>>,
    max_frame: usize,
    /// Messages sent (including lost ones), and how many were lost.
    pub messages: u64,
    /// Messages lost.
    pub lost: u64,
    /// Largest frame carrying no metadata (the digest bound at work).
    pub max_digest_frame: usize,
    /// Frames that carried full metadata.
    pub metadata_transfers: u64,
}

/// Node `i` of a simulated ring: `n<i>`.
fn name(i: usize) -> String {
    format!("n{i}")
}

/// The simulation id of a node from its name (`n<i>`).
fn id_of(name: &str) -> usize {
    name[1..].parse().expect("simulated node name")
}

/// Ring metadata of nodes `n0..n<n>` at `version`. Built directly (names sorted, partitions
/// dealt round-robin, no placement) because the ring is large and its addresses are
/// distinct.
pub fn ring(version: u64, ids: impl IntoIterator<Item = usize>) -> RingMetadata {
    let mut nodes: Vec<NodeEntry> = ids
        .into_iter()
        .map(|i| {
            NodeEntry::new(
                name(i),
                format!("10.{}.{}.{}:7000", i >> 16, (i >> 8) & 255, i & 255),
            )
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    // Gossip only needs the membership: partitions dealt round-robin (what the ECS's
    // placement would do for thousands of nodes is beside the point here, and slow to run
    // unoptimised).
    let partitions = ringkv_wire::placement::partitions_for(nodes.len());
    let chains = (0..partitions).map(|p| (p % nodes.len()) as u16).collect();
    RingMetadata {
        version,
        nodes,
        chains,
        ..RingMetadata::default()
    }
}

impl Sim {
    /// `n` nodes holding metadata version 1 (all of them), seeded with `seed`, losing each
    /// message with probability `loss`.
    pub fn new(n: usize, config: GossipConfig, seed: u64, loss: f64, timing: Timing) -> Self {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let membership = Arc::new(stand_in_membership(ring(1, 0..n)));
        let nodes = (0..n)
            .map(|i| GossipState::new(name(i), config.clone(), membership.clone(), 1, t0))
            .collect();
        Self {
            timing,
            order,
            pending: Vec::new(),
            config,
            t0,
            round: 0,
            nodes,
            stopped: vec![false; n],
            loss,
            rng,
            memberships: HashMap::from([(1, membership)]),
            max_frame: ringkv_wire::Limits::default().max_frame,
            messages: 0,
            lost: 0,
            max_digest_frame: 0,
            metadata_transfers: 0,
        }
    }

    /// The simulated time now.
    pub fn now(&self) -> Instant {
        self.t0 + self.config.interval * self.round as u32
    }

    /// Rounds run so far.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Stops node `i`: it no longer ticks nor answers (a crash, or SIGSTOP).
    pub fn stop(&mut self, i: usize) {
        self.stopped[i] = true;
    }

    /// Gives node `i` the metadata `metadata`, as the ECS does.
    pub fn seed(&mut self, i: usize, metadata: RingMetadata) {
        let version = metadata.version;
        let membership = stand_in_membership(metadata).succeeding(self.nodes[i].membership());
        let membership = Arc::new(membership);
        self.memberships.insert(version, membership.clone());
        let now = self.now();
        self.nodes[i].set_membership(membership, now);
    }

    /// Runs one round: every live node ticks, in a random order, and completes its
    /// exchanges.
    pub fn step(&mut self) {
        self.round += 1;
        let now = self.now();
        for k in 0..self.order.len() {
            let id = self.order[k];
            if self.stopped[id] {
                continue;
            }
            let outgoing = self.nodes[id].tick(now, &mut self.rng);
            // Indices refer to the membership at tick time: resolve them before an exchange
            // changes it.
            let nodes = &self.nodes[id].membership().metadata().nodes;
            let outgoing: Vec<_> = outgoing
                .into_iter()
                .map(|(peer, digest)| (id_of(&nodes[peer as usize].name), digest))
                .collect();
            for (peer, digest) in outgoing {
                self.exchange(id, peer, digest, now);
            }
        }
        for (id, metadata) in std::mem::take(&mut self.pending) {
            self.install(id, metadata, now);
        }
    }

    /// Runs rounds until `done` holds or `max` rounds passed; returns the rounds it took.
    pub fn run_until(&mut self, max: u64, mut done: impl FnMut(&Sim) -> bool) -> Option<u64> {
        let start = self.round;
        while !done(self) {
            if self.round - start >= max {
                return None;
            }
            self.step();
        }
        Some(self.round - start)
    }

    /// Whether every live node holds `version` (or newer).
    pub fn converged(&self, version: u64) -> bool {
        self.nodes
            .iter()
            .zip(&self.stopped)
            .all(|(n, stopped)| *stopped || n.version() >= version)
    }

    /// The longest silence any live node sees of another live node, in ms, with who sees
    /// whom. Checks every pair: O(N²).
    pub fn max_silence_among_live(&self) -> (u64, usize, usize) {
        let now = self.now();
        let mut worst = (0, 0, 0);
        for (y, state) in self.nodes.iter().enumerate() {
            if self.stopped[y] {
                continue;
            }
            for (i, entry) in state.membership().metadata().nodes.iter().enumerate() {
                let x = id_of(&entry.name);
                if x == y || self.stopped[x] {
                    continue;
                }
                let silent = state.silent_ms(i as u32, now);
                if silent > worst.0 {
                    worst = (silent, y, x);
                }
            }
        }
        worst
    }

    /// How many (observer, observed) pairs of live nodes have the observer see the
    /// observed as `liveness`. O(N²).
    pub fn live_pairs_seen(&self, liveness: Liveness) -> u64 {
        let now = self.now();
        let mut count = 0;
        for (y, state) in self.nodes.iter().enumerate() {
            if self.stopped[y] {
                continue;
            }
            for (i, entry) in state.membership().metadata().nodes.iter().enumerate() {
                let x = id_of(&entry.name);
                if x != y && !self.stopped[x] && state.liveness(i as u32, now) == liveness {
                    count += 1;
                }
            }
        }
        count
    }

    /// How many live nodes see node `x` as `liveness`.
    pub fn count_seeing(&self, x: usize, liveness: Liveness) -> usize {
        let now = self.now();
        let name = name(x);
        self.nodes
            .iter()
            .enumerate()
            .filter(|(y, _)| !self.stopped[*y] && *y != x)
            .filter(|(_, s)| {
                s.membership()
                    .index_of(&name)
                    .is_some_and(|i| s.liveness(i, now) == liveness)
            })
            .count()
    }

    /// Sends `msg` through the network: encoded and decoded with the real codec; `None`
    /// if it was lost.
    fn wire<T: Serialize + DeserializeOwned>(
        &mut self,
        msg: &T,
        carries_metadata: bool,
    ) -> Option<T> {
        let frame = codec::encode(msg, self.max_frame).expect("a gossip message fits a frame");
        self.messages += 1;
        if carries_metadata {
            self.metadata_transfers += 1;
        } else {
            self.max_digest_frame = self.max_digest_frame.max(frame.len());
        }
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            self.lost += 1;
            return None;
        }
        let (decoded, used) = codec::decode_frame::<T>(&frame, self.max_frame)
            .expect("a frame we encoded decodes")
            .expect("a whole frame");
        assert_eq!(used, frame.len());
        Some(decoded)
    }

    fn exchange(
        &mut self,
        from: usize,
        to: usize,
        digest: ringkv_wire::GossipDigest,
        now: Instant,
    ) {
        let version = self.nodes[from].version();
        let Some(request) = self.wire(
            &Request::new(version, RequestBody::Gossip { digest }),
            false,
        ) else {
            return;
        };
        let RequestBody::Gossip { digest } = request.body else {
            unreachable!("sent a gossip request")
        };
        if self.stopped[to] {
            return;
        }
        let (reply_digest, metadata) = self.nodes[to].on_digest(&digest, now);
        let with_metadata = metadata.is_some();
        let reply = Reply::new(
            self.nodes[to].version(),
            ReplyBody::Gossip {
                digest: reply_digest,
                metadata,
            },
        );
        let Some(reply) = self.wire(&reply, with_metadata) else {
            return;
        };
        let ReplyBody::Gossip { digest, metadata } = reply.body else {
            unreachable!("sent a gossip reply")
        };
        let outcome = self.nodes[from].on_reply(&digest, metadata, now);
        if let Some(metadata) = outcome.adopt {
            self.adopt(from, metadata, now);
        }
        if let Some(metadata) = outcome.push {
            let push = Request::new(version, RequestBody::GossipPush { metadata });
            if let Some(push) = self.wire(&push, true) {
                let RequestBody::GossipPush { metadata } = push.body else {
                    unreachable!("sent a push")
                };
                self.adopt(to, metadata, now);
            }
        }
    }

    /// What a node does with newer signed metadata: decode it (once per version for the
    /// whole simulation, see the module docs) and install it.
    fn adopt(&mut self, id: usize, metadata: SignedMetadata, now: Instant) {
        match self.timing {
            Timing::Phased => self.install(id, metadata, now),
            Timing::Synchronous => self.pending.push((id, metadata)),
        }
    }

    fn install(&mut self, id: usize, metadata: SignedMetadata, now: Instant) {
        if metadata.version <= self.nodes[id].version() {
            return;
        }
        let membership = match self.memberships.get(&metadata.version) {
            Some(m) => {
                assert!(
                    m.signed().map(|s| &s.ring) == Some(&metadata.ring),
                    "two different metadata with version {}",
                    metadata.version
                );
                m.clone()
            }
            None => {
                let decoded = metadata.open(|_, _| Ok(())).expect("peer metadata decodes");
                let m = Arc::new(Membership::new(Arc::new(decoded), Some(metadata)));
                self.memberships.insert(m.version(), m.clone());
                m
            }
        };
        self.nodes[id].set_membership(membership, now);
    }
}

/// The configuration of the convergence runs: the defaults with 8 heartbeats per digest.
/// Heartbeats take no part in spreading a version (the same seed spreads it in the same
/// rounds with any digest bound, see the tests), and 8 keep the 10,000-node runs short in
/// unoptimised builds.
pub fn spread_config() -> GossipConfig {
    GossipConfig {
        max_heartbeats: 8,
        ..GossipConfig::default()
    }
}

/// Rounds for a version seeded at one node of `n` to reach every node. The change is a
/// leave as the ECS makes it: the leaving node is dropped from the ring and stops, and the
/// new version is seeded at one node (the next by number).
pub fn rounds_to_converge(
    n: usize,
    config: GossipConfig,
    seed: u64,
    loss: f64,
    timing: Timing,
) -> (u64, Sim) {
    let mut sim = Sim::new(n, config, seed, loss, timing);
    let leaving = sim.rng.random_range(0..n);
    let seeded = (leaving + 1) % n;
    sim.seed(seeded, ring(2, (0..n).filter(|&i| i != leaving)));
    sim.stop(leaving);
    let rounds = sim
        .run_until(200, |s| s.converged(2))
        .unwrap_or_else(|| panic!("{n} nodes, loss {loss}: no convergence in 200 rounds"));
    (rounds, sim)
}

/// The asserted bound on the rounds for a version to reach all of `n` nodes, which grows
/// like log N: `log2 N + 4` intervals, half as much again with message loss. Push-pull with
/// fanout 3 multiplies the informed nodes by several per round and then finishes the last
/// ones doubly exponentially; the measured rounds (GOSSIP.md) sit well under the line.
pub fn round_bound(n: usize, loss: f64) -> u64 {
    let log2 = (n as f64).log2();
    let slack = if loss > 0.0 { 1.5 } else { 1.0 };
    (slack * (log2 + 4.0)).ceil() as u64
}

/// What [`detect_a_stopped_node`] measured.
#[derive(Debug)]
pub struct Detection {
    /// Rounds from the stop until every live node suspected the stopped one.
    pub suspected_by_all: u64,
    /// Rounds from the stop until every live node saw it dead.
    pub dead_to_all: u64,
    /// The longest silence any live node saw of another live node, over the whole run, in
    /// ms (sampled every `check_every` rounds).
    pub max_live_silence_ms: u64,
    /// (observer, observed) pairs of live nodes seen `Suspected` at a sample.
    pub false_suspicions: u64,
    /// (observer, observed) pairs of live nodes seen `Dead` at a sample.
    pub false_deaths: u64,
}

/// Runs `n` nodes for `warmup` rounds, stops one, and runs until every other node sees it
/// dead; samples every pair of live nodes every `check_every` rounds.
pub fn detect_a_stopped_node(
    n: usize,
    config: GossipConfig,
    seed: u64,
    loss: f64,
    warmup: u64,
    check_every: u64,
) -> Detection {
    let dead_rounds = (config.dead_after.as_millis() / config.interval.as_millis()) as u64;
    let mut sim = Sim::new(n, config, seed, loss, Timing::Phased);
    let (mut max_live_silence_ms, mut false_suspicions, mut false_deaths) = (0, 0, 0);
    let mut sample = |sim: &Sim| {
        if sim.round().is_multiple_of(check_every) {
            let (silence, _, _) = sim.max_silence_among_live();
            max_live_silence_ms = max_live_silence_ms.max(silence);
            false_suspicions += sim.live_pairs_seen(Liveness::Suspected);
            false_deaths += sim.live_pairs_seen(Liveness::Dead);
        }
    };
    for _ in 0..warmup {
        sim.step();
        sample(&sim);
    }
    let stopped = sim.rng.random_range(0..n);
    sim.stop(stopped);
    let live = n - 1;
    let start = sim.round();
    let mut suspected_by_all = None;
    while sim.count_seeing(stopped, Liveness::Dead) < live {
        assert!(
            sim.round() - start <= 4 * dead_rounds + 100,
            "{n} nodes: node {stopped} never dead to all"
        );
        sim.step();
        sample(&sim);
        if suspected_by_all.is_none()
            && sim.count_seeing(stopped, Liveness::Suspected)
                + sim.count_seeing(stopped, Liveness::Dead)
                == live
        {
            suspected_by_all = Some(sim.round() - start);
        }
    }
    Detection {
        suspected_by_all: suspected_by_all.expect("suspected before dead"),
        dead_to_all: sim.round() - start,
        max_live_silence_ms,
        false_suspicions,
        false_deaths,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints the convergence table of GOSSIP.md and asserts the log N bound for 10 to
    /// 10,000 nodes, without and with 10% message loss, in both timings (synchronous only
    /// at 10,000). `cargo test -p ringkv-node gossip::sim -- --nocapture` prints it.
    #[test]
    fn a_seeded_version_reaches_every_node_in_log_n_rounds() {
        println!(
            "{:>6} {:>5} {:>16} {:>10} {:>6} {:>13} {:>13}",
            "nodes", "loss", "synchronous", "phased", "bound", "metadata/node", "digest bytes"
        );
        for n in [10, 100, 1_000, 10_000] {
            for loss in [0.0, 0.1] {
                let seeds: &[u64] = if n >= 10_000 { &[1] } else { &[1, 2, 3] };
                let bound = round_bound(n, loss);
                let (mut sync, mut phased) = (Vec::new(), Vec::new());
                let (mut transfers, mut digest) = (0.0, 0);
                for &seed in seeds {
                    let (r, sim) =
                        rounds_to_converge(n, spread_config(), seed, loss, Timing::Synchronous);
                    sync.push(r);
                    transfers = sim.metadata_transfers as f64 / n as f64;
                    digest = sim.max_digest_frame;
                    // Phased spreads faster still; at 10,000 nodes it is left out to keep the
                    // unoptimised test run short.
                    if n < 10_000 {
                        let (r, _) =
                            rounds_to_converge(n, spread_config(), seed, loss, Timing::Phased);
                        phased.push(r);
                    }
                }
                println!(
                    "{n:>6} {:>4}% {:>16} {:>10} {bound:>6} {transfers:>13.2} {digest:>13}",
                    (loss * 100.0) as u32,
                    format!("{sync:?}"),
                    if phased.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{phased:?}")
                    },
                );
                for r in sync.iter().chain(&phased) {
                    assert!(
                        *r <= bound,
                        "{n} nodes, loss {loss}: {r} rounds > bound {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_digest_bound_does_not_change_how_a_version_spreads() {
        for loss in [0.0, 0.1] {
            let (small, _) = rounds_to_converge(300, spread_config(), 5, loss, Timing::Synchronous);
            let (full, _) =
                rounds_to_converge(300, GossipConfig::default(), 5, loss, Timing::Synchronous);
            assert_eq!(small, full);
        }
    }

    /// Failure detection with the default configuration: a stopped node is suspected by
    /// every other node within the suspect timeout plus the age of gossiped heartbeats
    /// (two seconds here), and dead to all within the dead timeout plus the same; no live
    /// node is ever declared dead, and without loss none is even suspected.
    fn failure_detection_with_defaults(n: usize, slack_rounds: u64) {
        let config = GossipConfig::default();
        let t = config.interval.as_millis() as u64;
        let suspect = config.suspect_after.as_millis() as u64 / t;
        let dead = config.dead_after.as_millis() as u64 / t;
        for loss in [0.0, 0.1] {
            let d = detect_a_stopped_node(n, config.clone(), 11, loss, 20, 2);
            println!("{n} nodes, loss {loss}: {d:?}");
            assert!(
                d.suspected_by_all <= suspect + slack_rounds,
                "{n} nodes, loss {loss}: suspected by all after {} rounds",
                d.suspected_by_all
            );
            assert!(d.dead_to_all <= dead + slack_rounds, "{d:?}");
            assert_eq!(d.false_deaths, 0, "{d:?}");
            // Sampled every 2 rounds: between samples a silence grows by at most 2 rounds.
            assert!(
                d.max_live_silence_ms + 2 * t < config.dead_after.as_millis() as u64,
                "{d:?}"
            );
            if loss == 0.0 && n <= config.max_heartbeats * 3 {
                assert_eq!(d.false_suspicions, 0, "{d:?}");
            }
        }
    }

    #[test]
    fn a_stopped_node_is_suspected_then_dead_and_no_live_node_dies() {
        failure_detection_with_defaults(200, 10);
    }

    /// The same at 1,000 nodes: about 20 s in a release build, too slow for a debug one
    /// (`cargo test --release -p ringkv-node gossip::sim -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn a_stopped_node_among_1000_is_suspected_then_dead_and_no_live_node_dies() {
        failure_detection_with_defaults(1_000, 20);
    }
}
