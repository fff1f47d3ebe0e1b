//! The gossip state machine: synchronous, no network, no clock of its own. Time comes in
//! as `now`, randomness as a caller's RNG, messages as values; the tokio driver
//! ([`super::driver`]) and the simulation (`sim`, tests only) move them.
//!
//! Invariants:
//! - The membership (who to gossip with, what a heartbeat index means) is always the one of
//!   the newest metadata given to [`GossipState::set_membership`]; it never goes back.
//! - Heartbeat counters only grow, except that a node's own counter in a digest it sent
//!   itself replaces a higher one (which a lying peer relayed); `heard_ms[i]` is when
//!   `counters[i]` last changed, so a peer's liveness is a function of `now - heard_ms[i]`
//!   alone.
//! - Every digest holds at most `max_heartbeats` other nodes' counters, and building one costs
//!   O(`max_heartbeats`), whatever the size of the ring.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, RngExt};
use ringkv_wire::{GossipDigest, Heartbeat, Liveness, PeerLiveness, RingMetadata, SignedMetadata};

use super::GossipConfig;

/// How far apart two nodes' wall clocks may be for their heartbeat counters to be believed
/// (a day; see [`GossipState::plausible`]).
pub const MAX_CLOCK_SKEW_MS: u64 = 24 * 3600 * 1000;

/// The membership a metadata version defines: its nodes, their indices by name, and the
/// metadata as the ECS signed it (sent to peers holding an older version). Built once per version
/// and shared.
#[derive(Debug)]
pub struct Membership {
    metadata: Arc<RingMetadata>,
    signed: Option<SignedMetadata>,
    by_name: HashMap<String, u32>,
    /// Where the nodes were in the membership of another version: `(that version, carry
    /// runs)`, so a state at that version carries its heartbeats over without comparing
    /// the rings again.
    carried: Option<(u64, Vec<Carry>)>,
}

/// A run of consecutive nodes of a new membership: `len` nodes that were at
/// `old..old + len` in the older one, or that are new to the ring (`old == NEW`). A join or
/// a leave is two or three runs, so carrying heartbeats over is a few block copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Carry {
    old: u32,
    len: u32,
}

/// In a [`Carry`]: the nodes were not in the older membership.
const NEW: u32 = u32::MAX;

/// The carry runs from `old` to `new`: one merge of the two lists, both sorted by name.
fn carry_runs(old: &RingMetadata, new: &RingMetadata) -> Vec<Carry> {
    let mut runs: Vec<Carry> = Vec::new();
    let mut j = 0;
    for node in &new.nodes {
        while j < old.nodes.len() && old.nodes[j].name < node.name {
            j += 1;
        }
        let from = match old.nodes.get(j) {
            Some(o) if o.name == node.name => j as u32,
            _ => NEW,
        };
        match runs.last_mut() {
            Some(run) if run.old == NEW && from == NEW => run.len += 1,
            Some(run) if run.old != NEW && from != NEW && run.old + run.len == from => run.len += 1,
            _ => runs.push(Carry { old: from, len: 1 }),
        }
    }
    runs
}

impl Membership {
    /// The membership of `metadata`, whose signed form (as the ECS made it) is `signed`
    /// (`None` only for the empty ring of a node that holds no metadata yet).
    pub fn new(metadata: Arc<RingMetadata>, signed: Option<SignedMetadata>) -> Self {
        let by_name = metadata
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i as u32))
            .collect();
        Self {
            metadata,
            signed,
            by_name,
            carried: None,
        }
    }

    /// Remembers where each node was in `previous`, for states moving from it to this one.
    pub fn succeeding(mut self, previous: &Membership) -> Self {
        self.carried = Some((
            previous.version(),
            carry_runs(&previous.metadata, &self.metadata),
        ));
        self
    }

    /// The metadata.
    pub fn metadata(&self) -> &Arc<RingMetadata> {
        &self.metadata
    }

    /// Its signed form.
    pub fn signed(&self) -> Option<&SignedMetadata> {
        self.signed.as_ref()
    }

    /// The metadata version.
    pub fn version(&self) -> u64 {
        self.metadata.version
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.metadata.nodes.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.metadata.nodes.is_empty()
    }

    /// Index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }
}

/// What the initiator of an exchange does with the responder's reply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplyOutcome {
    /// Newer metadata the responder sent: decode, persist and install it, then
    /// [`GossipState::set_membership`].
    pub adopt: Option<SignedMetadata>,
    /// The responder is behind: send it this (`GossipPush`).
    pub push: Option<SignedMetadata>,
}

/// One node's gossip state: its heartbeat, what it knows of everybody else's, and its
/// membership.
#[derive(Debug)]
pub struct GossipState {
    name: String,
    config: GossipConfig,
    /// `now` values are kept as milliseconds since this instant.
    epoch: Instant,
    membership: Arc<Membership>,
    /// This node's index in the membership, `None` if it is not in the ring (then it
    /// answers gossip but does not start any).
    me: Option<u32>,
    /// This node's own counter.
    heartbeat: u64,
    /// Its first value, the base of the plausibility bound on counters heard
    /// ([`GossipState::plausible`]).
    first_heartbeat: u64,
    /// Highest counter seen per node index (0: none yet).
    counters: Vec<u64>,
    /// When each counter last grew, in ms since `epoch` (or when the node entered the
    /// membership: a grace period before it can be suspected).
    heard_ms: Vec<u64>,
    /// The most recent counter increases learned, as `(index, counter)`, a ring buffer of
    /// `max_heartbeats` entries (`news_next` is the oldest): a responder fills its digest
    /// with them. An entry whose counter is no longer the current one was superseded by a
    /// later entry for the same node and is skipped.
    news: Vec<(u32, u64)>,
    news_next: usize,
    /// Where the sweep through all counters continues (see [`Self::digest`]).
    cursor: usize,
}

impl GossipState {
    /// The state of node `name` at `now`, with `membership` and its own counter starting at
    /// `first_heartbeat` (see [`super::first_heartbeat`]).
    pub fn new(
        name: impl Into<String>,
        config: GossipConfig,
        membership: Arc<Membership>,
        first_heartbeat: u64,
        now: Instant,
    ) -> Self {
        let name = name.into();
        let n = membership.len();
        Self {
            me: membership.index_of(&name),
            name,
            config,
            epoch: now,
            counters: vec![0; n],
            heard_ms: vec![0; n],
            membership,
            heartbeat: first_heartbeat,
            first_heartbeat,
            news: Vec::new(),
            news_next: 0,
            cursor: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    /// The current membership.
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    /// The metadata version the state holds.
    pub fn version(&self) -> u64 {
        self.membership.version()
    }

    /// This node's own heartbeat counter.
    pub fn heartbeat(&self) -> u64 {
        self.heartbeat
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Adopts the membership of newer metadata (an older or equal version is ignored).
    /// Heartbeats are carried over by node (matched by name, both lists being sorted by
    /// it); a node new to the ring gets a grace period from `now`.
    pub fn set_membership(&mut self, membership: Arc<Membership>, now: Instant) {
        if membership.version() <= self.version() {
            return;
        }
        let now_ms = self.ms(now);
        let computed;
        let runs = match &membership.carried {
            Some((from, runs)) if *from == self.version() => runs,
            _ => {
                computed = carry_runs(&self.membership.metadata, &membership.metadata);
                &computed
            }
        };
        let n = membership.len();
        let mut counters = Vec::with_capacity(n);
        let mut heard_ms = Vec::with_capacity(n);
        for run in runs {
            if run.old == NEW {
                counters.resize(counters.len() + run.len as usize, 0);
                heard_ms.resize(heard_ms.len() + run.len as usize, now_ms);
            } else {
                let old = run.old as usize..(run.old + run.len) as usize;
                counters.extend_from_slice(&self.counters[old.clone()]);
                heard_ms.extend_from_slice(&self.heard_ms[old]);
            }
        }
        self.counters = counters;
        self.heard_ms = heard_ms;
        self.me = membership.index_of(&self.name);
        self.membership = membership;
        self.news.clear();
        self.news_next = 0;
        self.cursor = 0;
    }

    /// One gossip round at `now`: advances this node's heartbeat and returns the peers to
    /// exchange with (indices into the current membership: resolve them before anything
    /// can change it) and the digest to send each. Nothing if this node is not in its ring.
    ///
    /// Peers: `fanout` distinct random nodes not considered dead (dead ones only if too few
    /// others are found), plus one random node if it is dead, so that a node that comes back
    /// is found again without every node wasting its fanout on the dead.
    pub fn tick(&mut self, now: Instant, rng: &mut impl Rng) -> Vec<(u32, GossipDigest)> {
        let Some(me) = self.me else {
            return Vec::new();
        };
        self.heartbeat = self.heartbeat.saturating_add(1);
        let n = self.membership.len() as u32;
        if n < 2 {
            return Vec::new();
        }
        let now_ms = self.ms(now);
        let want = self.config.fanout.min(n as usize - 1);
        let mut peers: Vec<u32> = Vec::with_capacity(want + 1);
        // Bounded tries: with many dead nodes, settle for dead ones rather than loop.
        let mut tries = 0;
        while peers.len() < want && tries < 8 * want + 8 {
            tries += 1;
            let i = rng.random_range(0..n);
            if i == me || peers.contains(&i) {
                continue;
            }
            if self.liveness_at(i, now_ms) == Liveness::Dead && tries <= 4 * want + 4 {
                continue;
            }
            peers.push(i);
        }
        let probe = rng.random_range(0..n);
        if probe != me
            && !peers.contains(&probe)
            && self.liveness_at(probe, now_ms) == Liveness::Dead
        {
            peers.push(probe);
        }
        peers
            .into_iter()
            .map(|p| (p, self.digest()))
            .collect::<Vec<_>>()
    }

    /// The initiator's digest: its version and heartbeat, plus the next `max_heartbeats`
    /// counters of its sweep through the ring. The sweep reaches each counter again only
    /// after a full turn, so these are the ones this node refreshed longest ago: questions,
    /// which the responder answers where it knows a higher counter ([`Self::on_digest`]).
    pub fn digest(&mut self) -> GossipDigest {
        let max = self.config.max_heartbeats;
        let n = self.counters.len();
        let mut heartbeats = Vec::with_capacity(max.min(n));
        // At most one turn: small rings are sent whole. A counter still 0 (never heard of)
        // is asked about like any other.
        for _ in 0..n {
            if heartbeats.len() >= max {
                break;
            }
            let i = self.cursor;
            self.cursor = if i + 1 >= n { 0 } else { i + 1 };
            let counter = self.counters[i];
            if Some(i as u32) != self.me {
                heartbeats.push(Heartbeat {
                    node: i as u32,
                    counter,
                });
            }
        }
        self.digest_of(heartbeats)
    }

    /// The responder's digest: first the answers, a higher counter for each of the caller's
    /// heartbeats this node knows one of; then news, the counters it most recently saw
    /// advance; at most `max_heartbeats` in all.
    fn answer(&self, caller: &GossipDigest) -> GossipDigest {
        let max = self.config.max_heartbeats;
        let mut heartbeats = Vec::with_capacity(max.min(self.counters.len()));
        if caller.metadata_version == self.version() {
            for hb in &caller.heartbeats {
                if heartbeats.len() >= max {
                    break;
                }
                let mine = self.counters.get(hb.node as usize).copied().unwrap_or(0);
                if mine > hb.counter && Some(hb.node) != self.me {
                    heartbeats.push(Heartbeat {
                        node: hb.node,
                        counter: mine,
                    });
                }
            }
        }
        // The news ring, newest first.
        let len = self.news.len();
        for k in 0..len {
            if heartbeats.len() >= max {
                break;
            }
            let (i, counter) = self.news[(self.news_next + len - 1 - k) % len];
            if self.counters[i as usize] == counter {
                heartbeats.push(Heartbeat { node: i, counter });
            }
        }
        self.digest_of(heartbeats)
    }

    fn digest_of(&self, heartbeats: Vec<Heartbeat>) -> GossipDigest {
        GossipDigest {
            from: self.name.clone(),
            metadata_version: self.version(),
            heartbeat: self.heartbeat,
            heartbeats,
        }
    }

    /// The responder's side: merges the caller's digest and answers with this node's
    /// digest (answers to the caller's counters, then news), plus its metadata if the
    /// caller's is older.
    pub fn on_digest(
        &mut self,
        digest: &GossipDigest,
        now: Instant,
    ) -> (GossipDigest, Option<SignedMetadata>) {
        self.merge(digest, now);
        let metadata = (digest.metadata_version < self.version())
            .then(|| self.membership.signed.clone())
            .flatten();
        (self.answer(digest), metadata)
    }

    /// The initiator's side: merges the responder's digest; says what to adopt and what to
    /// push.
    pub fn on_reply(
        &mut self,
        digest: &GossipDigest,
        metadata: Option<SignedMetadata>,
        now: Instant,
    ) -> ReplyOutcome {
        self.merge(digest, now);
        ReplyOutcome {
            adopt: metadata.filter(|m| m.version > self.version()),
            push: (digest.metadata_version < self.version())
                .then(|| self.membership.signed.clone())
                .flatten(),
        }
    }

    /// Merges a peer's digest: its own heartbeat (by name, whatever its version), and the
    /// heartbeats it relays if it holds this node's metadata version.
    pub fn merge(&mut self, digest: &GossipDigest, now: Instant) {
        let now_ms = self.ms(now);
        if let Some(i) = self.membership.index_of(&digest.from) {
            self.heard_from_itself(i, digest.heartbeat, now_ms);
        }
        if digest.metadata_version == self.version() {
            let n = self.counters.len() as u32;
            for hb in &digest.heartbeats {
                if hb.node < n {
                    self.heard(hb.node, hb.counter, now_ms);
                }
            }
        }
    }

    /// Whether a heartbeat counter could be real at `now_ms`: counters start at their
    /// node's wall-clock start time in milliseconds and grow by one per interval, so no
    /// honest counter is far above our own start time plus twice our uptime (start time and
    /// beats since) plus [`MAX_CLOCK_SKEW_MS`]. A counter above that (a peer lying, e.g.
    /// `u64::MAX` to wrap or freeze a node's counter) is ignored.
    fn plausible(&self, counter: u64, now_ms: u64) -> bool {
        counter
            <= self
                .first_heartbeat
                .saturating_add(now_ms.saturating_mul(2))
                .saturating_add(MAX_CLOCK_SKEW_MS)
    }

    /// Node `i`'s own counter, from a digest it sent itself (the caller checked that `from`
    /// is the sender's certificate name, or the ring name at the address it dialed): it is
    /// authoritative, even below the counter stored, so that a counter some peer relayed
    /// falsely high cannot hide the node's real beats beyond its next direct exchange.
    fn heard_from_itself(&mut self, i: u32, counter: u64, now_ms: u64) {
        let idx = i as usize;
        if Some(i) != self.me && counter < self.counters[idx] {
            tracing::warn!(node = %self.name, peer = i, counter, relayed = self.counters[idx], "a relayed counter was above the node's own; taking its own");
            self.counters[idx] = counter;
            self.heard_ms[idx] = now_ms;
            return;
        }
        self.heard(i, counter, now_ms);
    }

    fn heard(&mut self, i: u32, counter: u64, now_ms: u64) {
        if !self.plausible(counter, now_ms) {
            tracing::warn!(node = %self.name, peer = i, counter, "ignored an implausible heartbeat counter");
            return;
        }
        if Some(i) == self.me {
            // Somebody saw a counter of ours at least this high (we restarted with a
            // slow clock): move past it, so that our next beats count as news.
            if counter >= self.heartbeat {
                self.heartbeat = counter.saturating_add(1);
            }
            return;
        }
        let idx = i as usize;
        if counter <= self.counters[idx] {
            return;
        }
        self.counters[idx] = counter;
        self.heard_ms[idx] = now_ms;
        let cap = self.config.max_heartbeats.max(1);
        if self.news.len() < cap {
            self.news.push((i, counter));
        } else {
            self.news[self.news_next] = (i, counter);
            self.news_next = (self.news_next + 1) % cap;
        }
    }

    fn liveness_at(&self, i: u32, now_ms: u64) -> Liveness {
        if Some(i) == self.me {
            return Liveness::Alive;
        }
        let silent = now_ms.saturating_sub(self.heard_ms[i as usize]);
        if silent >= self.config.dead_after.as_millis() as u64 {
            Liveness::Dead
        } else if silent >= self.config.suspect_after.as_millis() as u64 {
            Liveness::Suspected
        } else {
            Liveness::Alive
        }
    }

    /// How alive the node at index `i` seems at `now` (this node itself: alive).
    pub fn liveness(&self, i: u32, now: Instant) -> Liveness {
        self.liveness_at(i, self.ms(now))
    }

    /// Milliseconds since the counter of node `i` last grew (or since its grace period
    /// began).
    pub fn silent_ms(&self, i: u32, now: Instant) -> u64 {
        self.ms(now).saturating_sub(self.heard_ms[i as usize])
    }

    /// The highest heartbeat counter seen from node `i`.
    pub fn counter(&self, i: u32) -> u64 {
        if Some(i) == self.me {
            self.heartbeat
        } else {
            self.counters[i as usize]
        }
    }

    /// This node's view of every other node of its ring.
    pub fn peers(&self, now: Instant) -> Vec<PeerLiveness> {
        let now_ms = self.ms(now);
        self.membership
            .metadata
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i as u32) != self.me)
            .map(|(i, node)| PeerLiveness {
                name: node.name.clone(),
                liveness: self.liveness_at(i as u32, now_ms),
                heartbeat: self.counters[i],
                silent_ms: now_ms.saturating_sub(self.heard_ms[i]),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use ringkv_wire::NodeEntry;

    use super::*;
    use crate::gossip::stand_in_membership;

    fn config() -> GossipConfig {
        GossipConfig {
            interval: Duration::from_millis(100),
            fanout: 2,
            suspect_after: Duration::from_millis(1000),
            dead_after: Duration::from_millis(3000),
            max_heartbeats: 4,
        }
    }

    fn membership(version: u64, names: &[&str]) -> Arc<Membership> {
        let nodes = names
            .iter()
            .map(|n| NodeEntry::new(*n, format!("{n}:1")))
            .collect();
        let md = RingMetadata::new(version, nodes).unwrap();
        Arc::new(stand_in_membership(md))
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_falsely_relayed_counter_neither_wraps_nor_freezes_a_node() {
        let t0 = Instant::now();
        let names = ["a", "b", "c"];
        let mut a = GossipState::new("a", config(), membership(1, &names), 100, t0);
        let v = a.membership().index_of("c").unwrap();
        let me = a.membership().index_of("a").unwrap();
        // b relays absurd counters for c and for a itself: ignored.
        let lie = |heartbeats| GossipDigest {
            from: "b".into(),
            metadata_version: 1,
            heartbeat: 1,
            heartbeats,
        };
        a.merge(
            &lie(vec![Heartbeat {
                node: v,
                counter: u64::MAX,
            }]),
            t0,
        );
        a.merge(
            &lie(vec![Heartbeat {
                node: me,
                counter: u64::MAX,
            }]),
            t0,
        );
        assert_eq!(a.counter(v), 0);
        assert!(
            a.digest().heartbeat < u64::MAX / 2,
            "our own counter did not jump"
        );
        // A plausible but false relay for c, then c's real (lower) beats, directly: c's own
        // word wins, and c stays alive as long as it beats.
        a.merge(
            &lie(vec![Heartbeat {
                node: v,
                counter: 1_000_000,
            }]),
            t0,
        );
        assert_eq!(a.counter(v), 1_000_000);
        for t in 1..=10u64 {
            let from_c = GossipDigest {
                from: "c".into(),
                metadata_version: 1,
                heartbeat: 300 + t,
                heartbeats: vec![],
            };
            a.merge(&from_c, ms(t0, t * 1000));
            assert_eq!(a.counter(v), 300 + t);
            assert_eq!(a.liveness(v, ms(t0, t * 1000 + 500)), Liveness::Alive);
        }
    }

    #[test]
    fn push_pull_moves_metadata_only_towards_the_older_side() {
        let t0 = Instant::now();
        let names = ["a", "b", "c"];
        let mut a = GossipState::new("a", config(), membership(1, &names), 100, t0);
        let mut b = GossipState::new("b", config(), membership(1, &names), 200, t0);
        let v2 = membership(2, &["a", "b", "c", "d"]);
        a.set_membership(v2.clone(), t0);

        // A is newer: B answers without metadata, A pushes.
        let syn = a.digest();
        let (ack, md) = b.on_digest(&syn, t0);
        assert_eq!(md, None);
        let out = a.on_reply(&ack, md, t0);
        assert_eq!(out.adopt, None);
        assert_eq!(out.push.as_ref().map(|m| m.version), Some(2));

        // B initiates while older: A answers with its metadata, nothing to push.
        let syn = b.digest();
        let (ack, md) = a.on_digest(&syn, t0);
        assert_eq!(md.as_ref().map(|m| m.version), Some(2));
        let out = b.on_reply(&ack, md, t0);
        assert_eq!(out.adopt.as_ref().map(|m| m.version), Some(2));
        assert_eq!(out.push, None);
        let decoded = out.adopt.unwrap().open(|_, _| Ok(())).unwrap();
        b.set_membership(Arc::new(stand_in_membership(decoded)), t0);
        assert_eq!(b.version(), 2);
        // An older membership never replaces a newer one.
        b.set_membership(membership(1, &names), t0);
        assert_eq!(b.version(), 2);
    }

    #[test]
    fn silence_makes_a_peer_suspected_then_dead_and_a_beat_revives_it() {
        let t0 = Instant::now();
        let m = membership(1, &["a", "b"]);
        let mut a = GossipState::new("a", config(), m.clone(), 1, t0);
        let mut b = GossipState::new("b", config(), m.clone(), 1, t0);
        let ib = m.index_of("b").unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        // Grace period: a peer never heard from is alive at first.
        assert_eq!(a.liveness(ib, t0), Liveness::Alive);
        for (_, d) in b.tick(ms(t0, 100), &mut rng) {
            a.merge(&d, ms(t0, 100));
        }
        assert_eq!(a.liveness(ib, ms(t0, 1099)), Liveness::Alive);
        assert_eq!(a.liveness(ib, ms(t0, 1100)), Liveness::Suspected);
        assert_eq!(a.liveness(ib, ms(t0, 3100)), Liveness::Dead);
        // The same counter again is no sign of life.
        let stale = b.digest();
        a.merge(&stale, ms(t0, 3200));
        assert_eq!(a.liveness(ib, ms(t0, 3200)), Liveness::Dead);
        b.tick(ms(t0, 3300), &mut rng);
        a.merge(&b.digest(), ms(t0, 3300));
        assert_eq!(a.liveness(ib, ms(t0, 3300)), Liveness::Alive);
        assert_eq!(a.peers(ms(t0, 3300))[0].silent_ms, 0);
    }

    #[test]
    fn heartbeats_are_relayed_and_bounded() {
        let t0 = Instant::now();
        let names: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let m = membership(1, &names);
        let mut relay = GossipState::new("n0", config(), m.clone(), 1, t0);
        for (i, name) in names.iter().enumerate().skip(1) {
            relay.merge(
                &GossipDigest {
                    from: name.to_string(),
                    metadata_version: 1,
                    heartbeat: 10 + i as u64,
                    heartbeats: vec![],
                },
                t0,
            );
        }
        let d = relay.digest();
        assert_eq!(d.heartbeats.len(), 4, "bounded by max_heartbeats");
        let mut other = GossipState::new("n1", config(), m.clone(), 1, t0);
        other.merge(&d, ms(t0, 50));
        // A relayed counter of another node is adopted (one of the receiver itself is not).
        let receiver = m.index_of("n1").unwrap();
        let relayed = *d.heartbeats.iter().find(|h| h.node != receiver).unwrap();
        assert_eq!(other.counter(relayed.node), relayed.counter);
        // A digest of another version relays nothing (its indices mean other nodes).
        let mut d2 = relay.digest();
        d2.metadata_version = 7;
        let before: Vec<u64> = (0..20).map(|i| other.counter(i)).collect();
        other.merge(&d2, ms(t0, 60));
        let sender = m.index_of("n0").unwrap();
        for i in 0..20u32 {
            if i != sender {
                assert_eq!(other.counter(i), before[i as usize]);
            }
        }
    }

    #[test]
    fn membership_change_keeps_counters_by_node_and_gives_newcomers_grace() {
        let t0 = Instant::now();
        let mut a = GossipState::new("a", config(), membership(1, &["a", "b", "c"]), 1, t0);
        a.merge(
            &GossipDigest {
                from: "b".into(),
                metadata_version: 1,
                heartbeat: 42,
                heartbeats: vec![],
            },
            t0,
        );
        let v2 = membership(2, &["a", "b", "c", "d"]);
        a.set_membership(v2.clone(), ms(t0, 2500));
        assert_eq!(a.counter(v2.index_of("b").unwrap()), 42);
        assert_eq!(
            a.liveness(v2.index_of("b").unwrap(), ms(t0, 2500)),
            Liveness::Suspected
        );
        assert_eq!(
            a.liveness(v2.index_of("d").unwrap(), ms(t0, 2500)),
            Liveness::Alive
        );
        // Removed from the ring: the node stops gossiping but still answers.
        a.set_membership(membership(3, &["b", "c", "d"]), ms(t0, 2600));
        let mut rng = SmallRng::seed_from_u64(3);
        assert!(a.tick(ms(t0, 2700), &mut rng).is_empty());
    }

    #[test]
    fn carry_runs_describe_joins_and_leaves_in_a_few_runs() {
        let names: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let v1 = membership(1, &names);
        let v2 = membership(2, &names[1..]);
        let runs = carry_runs(v1.metadata(), v2.metadata());
        assert!(runs.len() <= 2, "{runs:?}");
        assert_eq!(runs.iter().map(|r| r.len).sum::<u32>(), 49);
        let mut joined = names.clone();
        joined.push("new");
        let v3 = membership(3, &joined);
        let runs = carry_runs(v1.metadata(), v3.metadata());
        assert!(runs.len() <= 3, "{runs:?}");
        assert_eq!(runs.iter().filter(|r| r.old == NEW).count(), 1);
        // Carried through a precomputed map or a computed one, the result is the same.
        let t0 = Instant::now();
        let mut a = GossipState::new("n0", config(), v1.clone(), 1, t0);
        let mut b = GossipState::new("n0", config(), v1.clone(), 1, t0);
        for (i, name) in names.iter().enumerate().skip(1) {
            let d = GossipDigest {
                from: name.to_string(),
                metadata_version: 1,
                heartbeat: 100 + i as u64,
                heartbeats: vec![],
            };
            a.merge(&d, t0);
            b.merge(&d, t0);
        }
        let md = v3.metadata().as_ref().clone();
        a.set_membership(
            Arc::new(stand_in_membership(md.clone()).succeeding(&v1)),
            t0,
        );
        b.set_membership(Arc::new(stand_in_membership(md)), t0);
        assert_eq!(a.counters, b.counters);
        for (i, name) in names.iter().enumerate().skip(1) {
            assert_eq!(a.counter(v3.index_of(name).unwrap()), 100 + i as u64);
        }
    }

    #[test]
    fn a_node_moves_its_counter_past_one_seen_by_others() {
        let t0 = Instant::now();
        let m = membership(1, &["a", "b"]);
        let mut a = GossipState::new("a", config(), m.clone(), 5, t0);
        let mut d = a.digest();
        d.from = "b".into();
        d.heartbeats = vec![Heartbeat {
            node: m.index_of("a").unwrap(),
            counter: 900,
        }];
        a.merge(&d, t0);
        assert_eq!(a.heartbeat(), 901);
    }

    #[test]
    fn peers_avoid_the_dead_but_probe_them() {
        let t0 = Instant::now();
        let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let m = membership(1, &names);
        let mut a = GossipState::new("n0", config(), m.clone(), 1, t0);
        let alive = m.index_of("n1").unwrap();
        let mut rng = SmallRng::seed_from_u64(9);
        let (mut probes, mut chosen) = (0, 0);
        for round in 0..200u64 {
            let now = ms(t0, 5000 + round * 100);
            a.merge(
                &GossipDigest {
                    from: "n1".into(),
                    metadata_version: 1,
                    heartbeat: round + 1,
                    heartbeats: vec![],
                },
                now,
            );
            let peers = a.tick(now, &mut rng);
            // The fanout goes to the one live peer when found, then (too few live ones)
            // to dead ones.
            chosen += peers.iter().filter(|(p, _)| *p == alive).count();
            probes += peers.len();
        }
        assert!(probes >= 400, "{probes}");
        assert!(
            chosen >= 140,
            "the live peer was chosen in only {chosen} of 200 rounds"
        );
    }
}
