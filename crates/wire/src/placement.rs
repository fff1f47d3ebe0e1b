//! Balanced placement: which nodes hold which partitions (ARCHITECTURE.md §2).
//!
//! The ring is cut into `P` equal partitions ([`RingMetadata::partition_count`], a power of
//! two) and the ECS gives every partition a chain of `min(R, nodes)` distinct nodes. This
//! module decides those chains, deterministically (same ring, same change, same result) and
//! with the least data moved:
//! - **Partition count.** `P` is at least [`PARTITIONS_PER_NODE`] per node
//!   ([`partitions_for`]), so every node can hold an even share to within one partition
//!   (10 % at worst). It only grows: a join that needs more partitions splits each one in
//!   two, which moves nothing (both halves keep the chain).
//! - **Roles.** A node's load is counted three ways: partitions it heads (writes enter
//!   there), partitions it is the tail of (reads are served there) and partitions it holds
//!   a copy of (storage and replication traffic). Placement evens out all three.
//! - **A join** takes, one partition at a time, a head place from the node with the most
//!   heads, then a tail place from the node with the most tails, then middle places from the
//!   nodes with the most copies, until the newcomer has its share (`P / nodes` heads and
//!   tails, `len·P / nodes` copies). Each place taken moves one partition copy, from a
//!   loaded node to the newcomer (Cassandra's token allocation aims at the same: a node takes
//!   load from the most loaded, not at random). Places next to ones it already took are
//!   preferred, so copies merge into fewer, longer ranges.
//! - **A leave** (or the removal of a failed node) gives each of the leaver's places to the
//!   node with the fewest places of that role that is not in the chain yet.
//! - While the ring has fewer nodes than the replication factor, every node is in every
//!   chain; a join appends the newcomer and a leave drops the leaver, and only the order
//!   changes.
//! - **Failure domains.** A node's [`NodeEntry::domain`] is its zone, or itself. While the
//!   live nodes span at least `len` domains, no chain holds two nodes of one domain; with
//!   fewer, chains still hold distinct nodes.
//! - After every change the order inside chains is evened out by swaps (a head with a
//!   middle or tail node of the same chain; a tail with a middle one), which moves no data.
//!
//! Failed nodes keep their places (they are in no live chain) until they are removed; they
//! receive a place only when no live node outside the chain is left to take it (then the
//! chain is short of a live copy, and the ECS's plan refuses a change that would leave a
//! range with none).

use std::collections::HashSet;

use crate::ring::{check_node_addr, check_node_name, NodeEntry, RingMetadata, MAX_RING_NODES};
use crate::WireError;

/// The least number of partitions per node [`partitions_for`] keeps: an even share is then
/// exact to within one partition in ten.
pub const PARTITIONS_PER_NODE: usize = 10;
/// The fewest partitions a ring has.
pub const MIN_PARTITIONS: usize = 16;
/// The most partitions a ring has (2^16): [`PARTITIONS_PER_NODE`] holds up to 6,553 nodes.
pub const MAX_PARTITIONS: usize = 1 << 16;

/// The partition count for a ring of `nodes` nodes: the least power of two of at least
/// [`PARTITIONS_PER_NODE`] per node, within [`MIN_PARTITIONS`]..=[`MAX_PARTITIONS`].
pub fn partitions_for(nodes: usize) -> usize {
    nodes
        .saturating_mul(PARTITIONS_PER_NODE)
        .next_power_of_two()
        .clamp(MIN_PARTITIONS, MAX_PARTITIONS)
}

/// The role of a place in a chain, for the counts placement evens out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Head,
    Tail,
    /// Any place: the count of copies a node holds.
    Copy,
}

/// A ring being re-placed: chains of indices into `nodes` (in any order until
/// [`Draft::finish`]), with each node's places and counts kept up to date.
struct Draft {
    nodes: Vec<NodeEntry>,
    live: Vec<bool>,
    /// Chain length.
    len: usize,
    /// Flattened chains: `len` node indices per partition.
    chains: Vec<usize>,
    /// Each node's places (indices into `chains`).
    places: Vec<Vec<usize>>,
    heads: Vec<usize>,
    tails: Vec<usize>,
}

impl Draft {
    fn of(ring: &RingMetadata) -> Self {
        let mut draft = Draft {
            nodes: ring.nodes.clone(),
            live: ring
                .nodes
                .iter()
                .map(|n| !ring.is_failed(&n.name))
                .collect(),
            len: ring.chain_len(),
            chains: ring.chains.iter().map(|&i| i as usize).collect(),
            places: Vec::new(),
            heads: Vec::new(),
            tails: Vec::new(),
        };
        draft.recount();
        draft
    }

    fn partitions(&self) -> usize {
        self.chains.len().checked_div(self.len).unwrap_or(0)
    }

    fn recount(&mut self) {
        let n = self.nodes.len();
        self.places = vec![Vec::new(); n];
        self.heads = vec![0; n];
        self.tails = vec![0; n];
        for (at, &node) in self.chains.iter().enumerate() {
            self.places[node].push(at);
            let slot = at % self.len;
            self.heads[node] += usize::from(slot == 0);
            self.tails[node] += usize::from(slot == self.len - 1);
        }
    }

    fn count(&self, role: Role, node: usize) -> usize {
        match role {
            Role::Head => self.heads[node],
            Role::Tail => self.tails[node],
            Role::Copy => self.places[node].len(),
        }
    }

    /// The role a slot counts for when a node is placed there (a middle slot counts only
    /// as a copy).
    fn role_of(&self, slot: usize) -> Role {
        if slot == 0 {
            Role::Head
        } else if slot == self.len - 1 {
            Role::Tail
        } else {
            Role::Copy
        }
    }

    fn chain(&self, p: usize) -> &[usize] {
        &self.chains[p * self.len..(p + 1) * self.len]
    }

    fn holds(&self, p: usize, node: usize) -> bool {
        self.chain(p).contains(&node)
    }

    /// Puts `node` at flat place `at`, in place of whoever was there.
    fn put(&mut self, at: usize, node: usize) {
        let old = self.chains[at];
        let slot = at % self.len;
        self.places[old].retain(|&a| a != at);
        self.heads[old] -= usize::from(slot == 0);
        self.tails[old] -= usize::from(slot == self.len - 1);
        self.chains[at] = node;
        self.places[node].push(at);
        self.heads[node] += usize::from(slot == 0);
        self.tails[node] += usize::from(slot == self.len - 1);
    }

    /// Exchanges the nodes at two places of one chain.
    fn swap(&mut self, a: usize, b: usize) {
        let (x, y) = (self.chains[a], self.chains[b]);
        self.put(a, y);
        // `put` took place `a` from `x`; give `x` place `b` (from `y`, which holds `a` now).
        self.put(b, x);
    }

    /// Whether the live nodes span enough failure domains for every chain to keep its
    /// copies in distinct ones.
    fn zones_suffice(&self) -> bool {
        let domains: HashSet<&str> = (0..self.nodes.len())
            .filter(|&i| self.live[i])
            .map(|i| self.nodes[i].domain())
            .collect();
        domains.len() >= self.len
    }

    /// Whether `node` may take place `at`: it is not in the chain, and (when `strict`) no
    /// other node of the chain shares its failure domain.
    fn may_take(&self, at: usize, node: usize, strict: bool) -> bool {
        let p = at / self.len;
        if self.holds(p, node) {
            return false;
        }
        !strict
            || self.chain(p).iter().enumerate().all(|(slot, &other)| {
                slot == at % self.len || self.nodes[other].domain() != self.nodes[node].domain()
            })
    }

    /// Splits every partition in two until there are `count` (both halves keep the chain).
    fn split_to(&mut self, count: usize) {
        while self.partitions() < count {
            let len = self.len;
            self.chains = self
                .chains
                .chunks(len)
                .flat_map(|chain| chain.iter().chain(chain.iter()).copied())
                .collect();
        }
        self.recount();
    }

    fn live_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.live[i])
    }

    /// Where `node` would best take one of `donor`'s places of `role`: a place it may take,
    /// preferring one whose neighbouring partition would then have the same chain (the two
    /// copies merge into one range), then one next to a partition `node` already holds.
    fn place_to_take(&self, donor: usize, node: usize, role: Role, strict: bool) -> Option<usize> {
        let count = self.partitions();
        let mut best: Option<(u8, usize)> = None;
        for &at in &self.places[donor] {
            let slot = at % self.len;
            let fits = match role {
                Role::Head => slot == 0,
                Role::Tail => slot == self.len - 1,
                Role::Copy => slot != 0 && slot != self.len - 1,
            };
            if !fits || !self.may_take(at, node, strict) {
                continue;
            }
            let p = at / self.len;
            let mut score = 0;
            for q in [(p + count - 1) % count, (p + 1) % count] {
                if q == p {
                    continue;
                }
                let same_after = self
                    .chain(q)
                    .iter()
                    .zip(self.chain(p))
                    .enumerate()
                    .all(|(k, (&a, &b))| a == if k == slot { node } else { b });
                score = score.max(if same_after {
                    2
                } else {
                    u8::from(self.holds(q, node))
                });
            }
            if best.is_none_or(|(s, a)| (score, std::cmp::Reverse(at)) > (s, std::cmp::Reverse(a)))
            {
                best = Some((score, at));
            }
        }
        best.map(|(_, at)| at)
    }

    /// The newcomer `node` takes places of `role` from the most loaded nodes until it holds
    /// `target` of that role (counting copies for [`Role::Copy`], where only middle places
    /// are taken).
    fn take(&mut self, node: usize, role: Role, target: usize) {
        let strict = self.zones_suffice();
        while self.count(role, node) < target {
            let mut donors: Vec<usize> = self.live_nodes().filter(|&d| d != node).collect();
            donors.sort_by_key(|&d| (std::cmp::Reverse(self.count(role, d)), d));
            let donor = donors
                .into_iter()
                .take_while(|&d| self.count(role, d) > self.count(role, node) + 1)
                .find_map(|d| self.place_to_take(d, node, role, strict));
            match donor {
                Some(at) => self.put(at, node),
                None => return,
            }
        }
    }

    /// The live node that best takes the place `at` the node `leaving` gives up: not in the
    /// chain, fewest places of the slot's role, then fewest copies, then first by index.
    /// Failed nodes only when no live node can take it.
    fn receiver_for(&self, at: usize, leaving: usize) -> Option<usize> {
        let role = self.role_of(at % self.len);
        let strict = self.zones_suffice();
        let pick = |live: bool, strict: bool| {
            (0..self.nodes.len())
                .filter(|&r| r != leaving && self.live[r] == live && self.may_take(at, r, strict))
                .min_by_key(|&r| (self.count(role, r), self.places[r].len(), r))
        };
        pick(true, strict)
            .or_else(|| pick(true, false))
            .or_else(|| pick(false, false))
    }

    /// While the live nodes span enough failure domains, moves every copy that shares a
    /// domain with an earlier one of its chain to the least loaded node of a domain the
    /// chain lacks (after a join brought the domains a ring lacked, or a leave of the only
    /// node of a domain that could take a place).
    fn spread_domains(&mut self) {
        if !self.zones_suffice() {
            return;
        }
        for at in 0..self.chains.len() {
            let (p, slot) = (at / self.len, at % self.len);
            let domain = self.nodes[self.chains[at]].domain();
            let shared = self.chain(p)[..slot]
                .iter()
                .any(|&other| self.nodes[other].domain() == domain);
            if !shared {
                continue;
            }
            let role = self.role_of(slot);
            let receiver = self
                .live_nodes()
                .filter(|&r| self.may_take(at, r, true))
                .min_by_key(|&r| (self.count(role, r), self.places[r].len(), r));
            if let Some(r) = receiver {
                self.put(at, r);
            }
        }
    }

    /// Evens out heads, then tails, by swapping places inside chains (no data moves): while
    /// some live node has at least two more of the role than another that shares one of its
    /// chains, the two swap there.
    fn balance_order(&mut self) {
        // Tails first: a swap of a tail with a middle node keeps the heads, and it brings a
        // newcomer appended at the tail of every chain into the middle, from where the
        // heads' swaps (with a middle node, keeping the tails) can reach it. With two
        // copies a head swaps with the tail, which evens out both.
        if self.len >= 3 {
            let middle: Vec<usize> = (1..self.len - 1).collect();
            self.balance_role(Role::Tail, self.len - 1, &middle);
            self.balance_role(Role::Head, 0, &middle);
        } else if self.len == 2 {
            self.balance_role(Role::Head, 0, &[1]);
        }
    }

    fn balance_role(&mut self, role: Role, role_slot: usize, swap_slots: &[usize]) {
        for _ in 0..self.chains.len() {
            let mut loaded: Vec<usize> = self.live_nodes().collect();
            loaded.sort_by_key(|&n| (std::cmp::Reverse(self.count(role, n)), n));
            let swap = loaded.iter().find_map(|&a| {
                let mut best: Option<(usize, usize, usize)> = None;
                for &at in &self.places[a] {
                    if at % self.len != role_slot {
                        continue;
                    }
                    let base = at - role_slot;
                    for &slot in swap_slots {
                        let b = self.chains[base + slot];
                        let fewer = self.count(role, b) + 2 <= self.count(role, a);
                        if self.live[b]
                            && fewer
                            && best.is_none_or(|(c, _, _)| self.count(role, b) < c)
                        {
                            best = Some((self.count(role, b), at, base + slot));
                        }
                    }
                }
                best.map(|(_, at, other)| (at, other))
            });
            match swap {
                Some((at, other)) => self.swap(at, other),
                None => return,
            }
        }
    }

    /// The ring this draft describes: nodes sorted by name, indices renumbered.
    fn finish(
        self,
        version: u64,
        replication: u8,
        failed: Vec<String>,
    ) -> Result<RingMetadata, WireError> {
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.sort_by(|&a, &b| self.nodes[a].name.cmp(&self.nodes[b].name));
        let mut renumber = vec![0u16; self.nodes.len()];
        for (new, &old) in order.iter().enumerate() {
            renumber[old] = new as u16;
        }
        let ring = RingMetadata {
            version,
            nodes: order.iter().map(|&i| self.nodes[i].clone()).collect(),
            replication,
            failed,
            chains: self.chains.iter().map(|&i| renumber[i]).collect(),
        };
        ring.validate()?;
        Ok(ring)
    }
}

/// `ring` with `node` joined (version + 1): see the module docs. Refused for a node whose
/// name or address is already in the ring, or that is not a valid entry.
pub fn join(ring: &RingMetadata, node: NodeEntry) -> Result<RingMetadata, WireError> {
    ring.validate()?;
    let invalid = |why: String| WireError::InvalidRing(why);
    check_node_name(&node.name).map_err(invalid)?;
    check_node_addr(&node.addr).map_err(invalid)?;
    if let Some(zone) = &node.zone {
        check_node_name(zone).map_err(invalid)?;
    }
    if ring
        .nodes
        .iter()
        .any(|n| n.name == node.name || n.addr == node.addr)
    {
        return Err(WireError::DuplicateNode(node.name));
    }
    if ring.nodes.len() >= MAX_RING_NODES {
        return Err(invalid(format!(
            "the ring already has {MAX_RING_NODES} nodes"
        )));
    }
    let mut draft = Draft::of(ring);
    let newcomer = draft.nodes.len();
    draft.nodes.push(node);
    draft.live.push(true);
    let count = partitions_for(draft.nodes.len()).max(draft.partitions());
    let len = (ring.replication as usize).min(draft.nodes.len());
    if draft.len == 0 {
        draft.len = 1;
        draft.chains = vec![newcomer; count];
        draft.recount();
    } else {
        draft.split_to(count);
        if len > draft.len {
            // Every node is in every chain: the newcomer joins each one (at the tail; the
            // order is evened out below).
            draft.chains = draft
                .chains
                .chunks(draft.len)
                .flat_map(|chain| chain.iter().copied().chain([newcomer]))
                .collect();
            draft.len = len;
            draft.recount();
        } else {
            let live = draft.live_nodes().count();
            let share = draft.partitions() / live;
            draft.take(newcomer, Role::Head, share);
            if len >= 2 {
                draft.take(newcomer, Role::Tail, share);
            }
            if len >= 3 {
                draft.take(newcomer, Role::Copy, len * draft.partitions() / live);
            }
        }
    }
    draft.spread_domains();
    draft.balance_order();
    draft.finish(ring.version + 1, ring.replication, ring.failed.clone())
}

/// `ring` without the node `name` (version + 1): its places go to the nodes with the fewest
/// (see the module docs). The last node leaving leaves an empty ring.
pub fn leave(ring: &RingMetadata, name: &str) -> Result<RingMetadata, WireError> {
    ring.validate()?;
    let leaving = ring
        .nodes
        .iter()
        .position(|n| n.name == name)
        .ok_or_else(|| WireError::UnknownNode(name.to_string()))?;
    let failed: Vec<String> = ring.failed.iter().filter(|f| *f != name).cloned().collect();
    if ring.nodes.len() == 1 {
        return Ok(RingMetadata {
            version: ring.version + 1,
            replication: ring.replication,
            ..RingMetadata::default()
        });
    }
    let mut draft = Draft::of(ring);
    draft.live[leaving] = false;
    let len = (ring.replication as usize).min(ring.nodes.len() - 1);
    if len < draft.len {
        // Every node is in every chain: the leaver's place simply goes.
        draft.chains = draft
            .chains
            .chunks(draft.len)
            .flat_map(|chain| chain.iter().copied().filter(|&n| n != leaving))
            .collect();
        draft.len = len;
        draft.recount();
    } else {
        for at in draft.places[leaving].clone() {
            let receiver = draft
                .receiver_for(at, leaving)
                .expect("a ring of more than len nodes has a node outside every chain");
            draft.put(at, receiver);
        }
    }
    // Drop the leaver: renumber the indices above it.
    draft.nodes.remove(leaving);
    draft.live.remove(leaving);
    for i in &mut draft.chains {
        if *i > leaving {
            *i -= 1;
        }
    }
    draft.recount();
    draft.spread_domains();
    draft.balance_order();
    draft.finish(ring.version + 1, ring.replication, failed)
}

/// A ring of `nodes` with `replication` copies, placed as if they had joined one after the
/// other in name order (version = number of nodes). Refused for duplicate names or
/// addresses.
pub fn build(mut nodes: Vec<NodeEntry>, replication: u8) -> Result<RingMetadata, WireError> {
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ring = RingMetadata {
        replication,
        ..RingMetadata::default()
    };
    ring.validate()?;
    for node in nodes {
        ring = join(&ring, node)?;
    }
    Ok(ring)
}

#[cfg(test)]
mod tests;
