//! The consistent-hashing ring (ARCHITECTURE.md §2).
//!
//! Positions are SHA-1 digests read as 160-bit big-endian unsigned integers, so comparing the
//! 20-byte arrays lexicographically is comparing the integers. A key's position is SHA-1 of
//! the key. The ring is cut into `P` equal partitions (`P` a power of two): partition `i`
//! holds the positions whose top `log2 P` bits are `i`, and the ECS assigns each partition a
//! chain of distinct nodes ([`crate::placement`]). Every position on the ring has exactly one
//! partition, and so one chain, while the ring is non-empty.
//!
//! Invariants of [`RingMetadata`]: `nodes` is sorted by name; no two nodes share a name or
//! an address; every chain holds `chain_len` distinct nodes of the ring.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::{codec, WireError};

/// A point on the 160-bit ring.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position(pub [u8; 20]);

impl Position {
    /// The lowest position, 0.
    pub const MIN: Position = Position([0; 20]);
    /// The highest position, 2^160 - 1.
    pub const MAX: Position = Position([0xff; 20]);

    /// `self + 1`, or `None` if `self` is [`Position::MAX`].
    pub fn successor(&self) -> Option<Position> {
        let mut out = self.0;
        for byte in out.iter_mut().rev() {
            let (v, carry) = byte.overflowing_add(1);
            *byte = v;
            if !carry {
                return Some(Position(out));
            }
        }
        None
    }

    /// Lower-case hex of all 20 bytes.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits are enough to tell positions apart in logs and test output.
        write!(f, "Position({}…)", &self.to_hex()[..8])
    }
}

/// The ring position of a key: `SHA-1(key)`.
pub fn key_position(key: &[u8]) -> Position {
    Position(Sha1::digest(key).into())
}

/// The storage key of a user key: `SHA-1(key) ++ key`, so that a hash range is one
/// contiguous range of storage keys.
pub fn storage_key(key: &[u8]) -> Vec<u8> {
    HashedKey::new(key).storage_key()
}

/// A user key with its ring position, hashed once: a request needs the position for the
/// ownership check, the write lock, and the storage key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashedKey<'a> {
    /// The user key.
    pub key: &'a [u8],
    /// `SHA-1(key)`.
    pub position: Position,
}

impl<'a> HashedKey<'a> {
    /// Hashes `key`.
    pub fn new(key: &'a [u8]) -> Self {
        Self {
            key,
            position: key_position(key),
        }
    }

    /// `position ++ key`.
    pub fn storage_key(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.key.len());
        out.extend_from_slice(&self.position.0);
        out.extend_from_slice(self.key);
        out
    }
}

/// A range of ring positions `(start, end]`, wrapping at 2^160. `start == end` is the whole
/// ring (the range of a lone node).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRange {
    /// Exclusive lower end (the predecessor's position).
    pub start: Position,
    /// Inclusive upper end (the owner's position).
    pub end: Position,
}

impl fmt::Debug for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "({}…, {}…]",
            &self.start.to_hex()[..8],
            &self.end.to_hex()[..8]
        )
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {}]", self.start, self.end)
    }
}

/// A contiguous span of storage keys: `from` inclusive (`None`: from the first key), `to`
/// exclusive (`None`: to the last key). Storage engines scan these directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSpan {
    /// Inclusive lower bound, a 20-byte hash prefix.
    pub from: Option<[u8; 20]>,
    /// Exclusive upper bound, a 20-byte hash prefix.
    pub to: Option<[u8; 20]>,
}

impl KeyRange {
    /// The range `(start, end]`.
    pub fn new(start: Position, end: Position) -> Self {
        Self { start, end }
    }

    /// Whether this range is the whole ring.
    pub fn is_full(&self) -> bool {
        self.start == self.end
    }

    /// Whether `pos` lies in `(start, end]` (with wrap-around).
    pub fn contains(&self, pos: &Position) -> bool {
        use std::cmp::Ordering::*;
        match self.start.cmp(&self.end) {
            Equal => true,
            Less => self.start < *pos && *pos <= self.end,
            Greater => *pos > self.start || *pos <= self.end,
        }
    }

    /// Whether the two ranges share at least one position. On a circle the overlap of two
    /// arcs, if any, ends where one of them ends, so it suffices to test both ends.
    pub fn intersects(&self, other: &KeyRange) -> bool {
        self.contains(&other.end) || other.contains(&self.end)
    }

    /// Whether the storage key (`hash ++ key`) falls in this range.
    pub fn contains_storage_key(&self, storage_key: &[u8]) -> bool {
        match storage_key.get(..20) {
            Some(prefix) => self.contains(&Position(prefix.try_into().expect("20 bytes"))),
            None => false,
        }
    }

    /// The one or two contiguous storage-key spans that hold exactly this range.
    pub fn storage_spans(&self) -> Vec<StorageSpan> {
        // Hash in (a, b] <=> storage key in [a+1, b+1) because every storage key is a
        // 20-byte hash followed by a non-empty user key.
        let upper = |end: &Position| end.successor().map(|p| p.0);
        if self.is_full() {
            return vec![StorageSpan {
                from: None,
                to: None,
            }];
        }
        if self.start < self.end {
            return vec![StorageSpan {
                from: self.start.successor().map(|p| p.0),
                to: upper(&self.end),
            }];
        }
        let mut spans = Vec::with_capacity(2);
        if let Some(from) = self.start.successor() {
            spans.push(StorageSpan {
                from: Some(from.0),
                to: None,
            });
        }
        spans.push(StorageSpan {
            from: None,
            to: upper(&self.end),
        });
        spans
    }
}

/// One storage node as the ring knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeEntry {
    /// The node's name (its certificate name), unique in the ring.
    pub name: String,
    /// The advertised `host:port` clients and peers dial.
    pub addr: String,
    /// The node's failure domain (a rack, a host, an availability zone), if the operator
    /// named one: no two copies of a partition are placed in one zone while the ring has
    /// enough zones ([`crate::placement`]). A node without a zone is a zone of its own.
    pub zone: Option<String>,
}

impl NodeEntry {
    /// A node entry without a zone.
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            addr: addr.into(),
            zone: None,
        }
    }

    /// The same node in failure domain `zone`.
    pub fn in_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// The failure domain placement keeps copies apart by: the zone, or the node's own
    /// name if it has none.
    pub fn domain(&self) -> &str {
        self.zone.as_deref().unwrap_or(&self.name)
    }
}

/// Most nodes a ring may hold; bigger metadata is refused as invalid.
pub const MAX_RING_NODES: usize = 16_384;
/// Longest node name (and zone name), in bytes.
pub const MAX_NODE_NAME: usize = 64;

/// A node name: 1..=[`MAX_NODE_NAME`] bytes of `[A-Za-z0-9._-]` (the certificate names the
/// cert tool issues). Zone names follow the same rule.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad name {name:?}: expected 1..={MAX_NODE_NAME} bytes of [A-Za-z0-9._-]"
        ))
    }
}

/// A node address: `host:port` with a non-empty host (a DNS name, an IPv4 address or a
/// bracketed IPv6 address) and a port in 1..=65535.
pub fn check_node_addr(addr: &str) -> Result<(), String> {
    let bad = || Err(format!("bad address {addr:?}: expected host:port"));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad();
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => bad(),
    }
}

/// Most copies of a key a ring may ask for.
pub const MAX_REPLICATION: u8 = 7;

/// One node's share of the ring under its live chains: how many partitions it heads (takes
/// their writes), is the tail of (serves their reads) and holds a copy of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeShare {
    /// Partitions whose chain it heads.
    pub heads: u32,
    /// Partitions whose chain it ends.
    pub tails: u32,
    /// Partitions it holds a copy of.
    pub copies: u32,
}

/// Versioned ring metadata. Everybody adopts metadata only if its version is higher than the
/// one held ([`RingMetadata::is_newer_than`]).
///
/// Placement (ARCHITECTURE.md §2): the ring is cut into `P` equal **partitions** (`P` a
/// power of two, [`RingMetadata::partition_count`]); partition `i` holds the key positions
/// whose top `log2 P` bits are `i`. The ECS assigns every partition a **chain** of
/// [`RingMetadata::chain_len`] distinct nodes ([`crate::placement`] decides which, keeping
/// every node's share even). Replication (ARCHITECTURE.md §11): a partition is held by its
/// chain's nodes; without the nodes marked `failed`, in order, the first is the *head*
/// (takes writes), the last the *tail* (serves reads). A failed node keeps its places until
/// the ECS has rebuilt its copies elsewhere and removes it, so a failure shortens the chains
/// it was in without moving anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMetadata {
    /// Assigned by the ECS, strictly increasing with every change. 0 means "no ring yet".
    pub version: u64,
    /// Nodes sorted by name.
    pub nodes: Vec<NodeEntry>,
    /// Copies of every key (1..=[`MAX_REPLICATION`]; 1: no replication).
    pub replication: u8,
    /// Names of ring nodes the ECS declared failed: in no chain, serving nothing.
    pub failed: Vec<String>,
    /// The chains of all partitions, flattened: partition `i`'s chain is the
    /// [`RingMetadata::chain_len`] indices into `nodes` at `i * chain_len..`. Empty for an
    /// empty ring.
    pub chains: Vec<u16>,
}

impl Default for RingMetadata {
    fn default() -> Self {
        Self {
            version: 0,
            nodes: Vec::new(),
            replication: 1,
            failed: Vec::new(),
            chains: Vec::new(),
        }
    }
}

/// The last position of partition `index` of `count` (a power of two): its top bits are
/// `index`, the rest ones.
fn partition_end(index: usize, count: usize) -> Position {
    let bits = count.trailing_zeros();
    let mut out = [0xffu8; 20];
    if bits > 0 {
        let top = (index as u32) << (32 - bits);
        let ones = u32::MAX >> bits;
        out[..4].copy_from_slice(&(top | ones).to_be_bytes());
    }
    Position(out)
}

impl RingMetadata {
    /// A ring of `nodes` with one copy of every key, placed as if they had joined one after
    /// the other in name order ([`crate::placement`]). Fails on duplicate names or
    /// addresses.
    pub fn new(version: u64, nodes: Vec<NodeEntry>) -> Result<Self, WireError> {
        let mut ring = crate::placement::build(nodes, 1)?;
        ring.version = version;
        Ok(ring)
    }

    /// The same nodes placed afresh with `replication` copies of every key (same version
    /// and failed nodes).
    pub fn with_replication(self, replication: u8) -> Result<Self, WireError> {
        let mut ring = crate::placement::build(self.nodes, replication)?;
        ring.version = self.version;
        ring.failed = self.failed;
        ring.validate()?;
        Ok(ring)
    }

    /// How many copies a full chain has: the replication factor, or the ring size if that
    /// is smaller.
    pub fn chain_len(&self) -> usize {
        (self.replication as usize).min(self.nodes.len())
    }

    /// How many partitions the ring is cut into (0 for an empty ring).
    pub fn partition_count(&self) -> usize {
        match self.chain_len() {
            0 => 0,
            len => self.chains.len() / len,
        }
    }

    /// Checks every structural invariant a peer could get wrong: at most
    /// [`MAX_RING_NODES`] nodes sorted by name, unique names and addresses, names and zones
    /// of 1..=[`MAX_NODE_NAME`] bytes of `[A-Za-z0-9._-]`, addresses of the form
    /// `host:port`, a power-of-two partition count of at most
    /// [`crate::placement::MAX_PARTITIONS`], and every chain made of `chain_len` distinct
    /// nodes of the ring. Linear in the metadata size, so it is cheap enough to run on
    /// everything that comes off the wire.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |why: String| Err(WireError::InvalidRing(why));
        if !(1..=MAX_REPLICATION).contains(&self.replication) {
            return bad(format!(
                "replication factor {} outside 1..={MAX_REPLICATION}",
                self.replication
            ));
        }
        if self.nodes.len() > MAX_RING_NODES {
            return bad(format!(
                "{} nodes, more than the maximum of {MAX_RING_NODES}",
                self.nodes.len()
            ));
        }
        let mut addrs = std::collections::HashSet::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            if let Err(why) = check_node_name(&n.name) {
                return bad(why);
            }
            if let Some(Err(why)) = n.zone.as_deref().map(check_node_name) {
                return bad(format!("node {}: zone: {why}", n.name));
            }
            if let Err(why) = check_node_addr(&n.addr) {
                return bad(format!("node {}: {why}", n.name));
            }
            if i > 0 && self.nodes[i - 1].name >= n.name {
                return bad("nodes are not strictly sorted by name".into());
            }
            if !addrs.insert(n.addr.as_str()) {
                return bad(format!("address {} appears twice", n.addr));
            }
        }
        if self.failed.len() > self.nodes.len() {
            return bad("more failed nodes than nodes".into());
        }
        for (i, name) in self.failed.iter().enumerate() {
            if self.node(name).is_none() {
                return bad(format!("failed node {name} is not in the ring"));
            }
            if self.failed[..i].contains(name) {
                return bad(format!("failed node {name} appears twice"));
            }
        }
        let len = self.chain_len();
        if len == 0 {
            return match self.chains.is_empty() {
                true => Ok(()),
                false => bad("chains in a ring without nodes".into()),
            };
        }
        let count = self.chains.len() / len;
        if !self.chains.len().is_multiple_of(len)
            || !count.is_power_of_two()
            || count > crate::placement::MAX_PARTITIONS
        {
            return bad(format!(
                "{} chain entries are not a power-of-two number (at most {}) of chains of {len}",
                self.chains.len(),
                crate::placement::MAX_PARTITIONS
            ));
        }
        for (p, chain) in self.chains.chunks(len).enumerate() {
            for (k, &i) in chain.iter().enumerate() {
                if i as usize >= self.nodes.len() {
                    return bad(format!("partition {p}: node index {i} out of range"));
                }
                if chain[..k].contains(&i) {
                    return bad(format!(
                        "partition {p}: node {} holds two copies",
                        self.nodes[i as usize].name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The one encoding of ring metadata outside a message (the ECS's ring file, and what
    /// [`crate::SignedMetadata`] signs): a codec frame.
    pub fn to_frame(&self) -> Result<Vec<u8>, WireError> {
        codec::encode(self, usize::MAX >> 1)
    }

    /// The one decoding of [`RingMetadata::to_frame`]: exactly one frame, no trailing
    /// bytes, and [`RingMetadata::validate`]d.
    pub fn from_frame(bytes: &[u8]) -> Result<Self, WireError> {
        let metadata: RingMetadata = match codec::decode_frame(bytes, usize::MAX >> 1)? {
            Some((metadata, used)) if used == bytes.len() => metadata,
            _ => {
                return Err(WireError::Malformed(
                    "truncated or trailing bytes in encoded ring metadata".into(),
                ))
            }
        };
        metadata.validate()?;
        Ok(metadata)
    }

    /// Whether `self` should replace `other` (strictly higher version).
    pub fn is_newer_than(&self, other: &RingMetadata) -> bool {
        self.version > other.version
    }

    /// The partition holding `pos`: its top `log2 P` bits. `None` on an empty ring.
    pub fn partition_of(&self, pos: &Position) -> Option<usize> {
        let count = self.partition_count();
        if count == 0 {
            return None;
        }
        let bits = count.trailing_zeros();
        let top = u32::from_be_bytes(pos.0[..4].try_into().expect("4 bytes"));
        Some(if bits == 0 {
            0
        } else {
            (top >> (32 - bits)) as usize
        })
    }

    /// The positions of partition `index`: `(end of index - 1, end of index]`.
    pub fn partition_range(&self, index: usize) -> KeyRange {
        let count = self.partition_count().max(1);
        KeyRange::new(
            partition_end((index + count - 1) % count, count),
            partition_end(index, count),
        )
    }

    /// The node indices of partition `index`'s chain, failed nodes included.
    fn raw_chain(&self, index: usize) -> &[u16] {
        let len = self.chain_len();
        &self.chains[index * len..(index + 1) * len]
    }

    /// The nodes of partition `index`'s chain, failed nodes included, in chain order.
    pub fn assigned(&self, index: usize) -> impl DoubleEndedIterator<Item = &NodeEntry> {
        self.raw_chain(index)
            .iter()
            .map(|&i| &self.nodes[i as usize])
    }

    /// The live chain of partition `index`: its assigned nodes without the failed ones.
    fn live_chain(&self, index: usize) -> Vec<&NodeEntry> {
        self.assigned(index)
            .filter(|n| !self.is_failed(&n.name))
            .collect()
    }

    /// The maximal runs of consecutive partitions (wrapping) with the same assigned chain,
    /// each as `(range, first partition)`, in ring order from the first run starting at or
    /// after partition 0. One run covering the whole ring if every chain is the same.
    fn runs(&self) -> Vec<(KeyRange, usize)> {
        let count = self.partition_count();
        if count == 0 {
            return Vec::new();
        }
        let same = |a: usize, b: usize| self.raw_chain(a) == self.raw_chain(b);
        let Some(first) = (0..count).find(|&p| !same(p, (p + count - 1) % count)) else {
            return vec![(KeyRange::new(Position::MAX, Position::MAX), 0)];
        };
        let mut out = Vec::new();
        let mut start = first;
        loop {
            let mut last = start;
            while same(last, (last + 1) % count) {
                last = (last + 1) % count;
            }
            let range = KeyRange::new(
                self.partition_range(start).start,
                self.partition_range(last).end,
            );
            out.push((range, start));
            start = (last + 1) % count;
            if start == first {
                break;
            }
        }
        out.sort_by_key(|(_, p)| *p);
        out
    }

    /// The ranges of [`RingMetadata::chains`], without the chains.
    pub fn run_ranges(&self) -> Vec<KeyRange> {
        self.runs().into_iter().map(|(r, _)| r).collect()
    }

    /// Where the runs of equal chains end, in ring order: every position where the chain
    /// may change (the cut points a membership change is planned on).
    pub fn boundaries(&self) -> Vec<Position> {
        self.runs().into_iter().map(|(r, _)| r.end).collect()
    }

    /// The run of partitions with `pos`'s chain that holds `pos` (the whole ring if every
    /// chain is the same). `None` on an empty ring.
    pub fn run_at(&self, pos: &Position) -> Option<KeyRange> {
        self.runs()
            .into_iter()
            .map(|(range, _)| range)
            .find(|range| range.contains(pos))
    }

    /// The head of the chain of `pos` (the node that takes its writes), or `None` on an
    /// empty ring or when every node of the chain failed. Same as [`RingMetadata::head`].
    pub fn responsible_for(&self, pos: &Position) -> Option<&NodeEntry> {
        self.head(pos)
    }

    /// The head of the chain of `key`.
    pub fn responsible_for_key(&self, key: &[u8]) -> Option<&NodeEntry> {
        self.responsible_for(&key_position(key))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.index_of(name).map(|i| &self.nodes[i])
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes
            .binary_search_by(|n| n.name.as_str().cmp(name))
            .ok()
    }

    /// The metadata after `node` joins, with version `self.version + 1`: it takes an even
    /// share of the partitions from the most loaded nodes ([`crate::placement::join`]).
    pub fn with_node(&self, node: NodeEntry) -> Result<RingMetadata, WireError> {
        crate::placement::join(self, node)
    }

    /// The metadata after the node `name` leaves, with version `self.version + 1`: its
    /// places go to the least loaded nodes ([`crate::placement::leave`]).
    pub fn without_node(&self, name: &str) -> Result<RingMetadata, WireError> {
        crate::placement::leave(self, name)
    }

    /// The metadata after the node `name` is declared failed (version + 1): it leaves every
    /// chain but keeps its places.
    pub fn with_failed(&self, name: &str) -> Result<RingMetadata, WireError> {
        if self.node(name).is_none() {
            return Err(WireError::UnknownNode(name.to_string()));
        }
        let mut next = self.clone();
        next.version += 1;
        if !next.is_failed(name) {
            next.failed.push(name.to_string());
        }
        Ok(next)
    }

    /// The names of the ring's nodes that are not marked failed, in name order.
    pub fn live_names(&self) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|n| !self.is_failed(&n.name))
            .map(|n| n.name.as_str())
            .collect()
    }

    /// Whether the node `name` is marked failed.
    pub fn is_failed(&self, name: &str) -> bool {
        self.failed.iter().any(|f| f == name)
    }

    /// The chain of the partition holding `pos`: head first, tail last. Empty on an empty
    /// ring or when every node of the chain failed.
    pub fn chain(&self, pos: &Position) -> Vec<&NodeEntry> {
        match self.partition_of(pos) {
            Some(p) => self.live_chain(p),
            None => Vec::new(),
        }
    }

    /// The chain of the partition holding `key`.
    pub fn chain_for_key(&self, key: &[u8]) -> Vec<&NodeEntry> {
        self.chain(&key_position(key))
    }

    /// The node that takes writes of `pos` (its chain's head). Allocates nothing (it is on
    /// every request's path).
    pub fn head(&self, pos: &Position) -> Option<&NodeEntry> {
        let p = self.partition_of(pos)?;
        self.assigned(p).find(|n| !self.is_failed(&n.name))
    }

    /// The node that serves reads of `pos` (its chain's tail). Allocates nothing.
    pub fn tail(&self, pos: &Position) -> Option<&NodeEntry> {
        let p = self.partition_of(pos)?;
        self.assigned(p).rev().find(|n| !self.is_failed(&n.name))
    }

    /// Every run of partitions with one chain, with that chain (failed nodes left out), in
    /// ring order.
    pub fn chains(&self) -> Vec<(KeyRange, Vec<&NodeEntry>)> {
        self.runs()
            .into_iter()
            .map(|(range, p)| (range, self.live_chain(p)))
            .collect()
    }

    /// The runs of partitions whose chain holds the node `name` (the data it must hold),
    /// with its index in each chain.
    pub fn replicated_by(&self, name: &str) -> Vec<(KeyRange, usize)> {
        self.chains()
            .into_iter()
            .filter_map(|(range, chain)| {
                chain
                    .iter()
                    .position(|n| n.name == name)
                    .map(|i| (range, i))
            })
            .collect()
    }

    /// Every node's share (in the order of `nodes`); all zero for a failed node.
    pub fn shares(&self) -> Vec<NodeShare> {
        let mut out = vec![NodeShare::default(); self.nodes.len()];
        let live: Vec<bool> = self
            .nodes
            .iter()
            .map(|n| !self.is_failed(&n.name))
            .collect();
        let len = self.chain_len();
        for chain in self.chains.chunks(len.max(1)) {
            let mut members = chain.iter().map(|&i| i as usize).filter(|&i| live[i]);
            let Some(head) = members.next() else {
                continue;
            };
            out[head].heads += 1;
            out[head].copies += 1;
            let mut tail = head;
            for i in members {
                out[i].copies += 1;
                tail = i;
            }
            out[tail].tails += 1;
        }
        out
    }

    /// The ranges the node `name` holds a copy of, adjacent ones merged, in ring order.
    pub fn held_by(&self, name: &str) -> Vec<KeyRange> {
        let mut out: Vec<KeyRange> = Vec::new();
        for (range, _) in self.replicated_by(name) {
            match out.last_mut() {
                Some(last) if last.end == range.start && !range.is_full() => last.end = range.end,
                _ => out.push(range),
            }
        }
        // The last range may continue into the first across the top of the ring.
        if out.len() > 1 && out[out.len() - 1].end == out[0].start {
            let last = out.pop().expect("two ranges");
            out[0].start = last.start;
            if out[0].start == out[0].end {
                out[0] = KeyRange::new(Position::MAX, Position::MAX);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring_of(n: usize) -> RingMetadata {
        let nodes = (0..n)
            .map(|i| NodeEntry::new(format!("n{i}"), format!("10.0.0.1:{}", 7000 + i)))
            .collect();
        RingMetadata::new(1, nodes).unwrap()
    }

    #[test]
    fn validate_refuses_every_broken_invariant() {
        let good = ring_of(3).with_replication(2).unwrap();
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(
            RingMetadata::default().validate(),
            Ok(()),
            "no ring yet is valid"
        );
        let refused = |m: &RingMetadata, why: &str| {
            let e = m.validate().expect_err(why);
            assert!(matches!(e, WireError::InvalidRing(_)), "{why}: {e}");
            assert_eq!(e.kind(), crate::ErrorKind::Malformed);
        };
        let mut m = good.clone();
        m.nodes.swap(0, 1);
        refused(&m, "unsorted");
        let mut m = good.clone();
        m.nodes[1].name = m.nodes[0].name.clone();
        refused(&m, "duplicate name");
        let mut m = good.clone();
        m.nodes[1].addr = m.nodes[0].addr.clone();
        refused(&m, "duplicate address");
        for addr in ["", "h", "h:", ":1", "h:0", "h:65536", "h x:1", "h:port"] {
            let mut m = good.clone();
            m.nodes[0].addr = addr.to_string();
            refused(&m, addr);
        }
        for name in ["", "a b", "n\n", &"x".repeat(MAX_NODE_NAME + 1)] {
            let mut m = good.clone();
            m.nodes[0].name = name.to_string();
            refused(&m, name);
            let mut m = good.clone();
            m.nodes[0].zone = Some(name.to_string());
            refused(&m, "bad zone");
        }
        let mut m = good.clone();
        m.chains[1] = m.chains[0];
        refused(&m, "two copies on one node");
        let mut m = good.clone();
        m.chains[0] = 3;
        refused(&m, "index out of range");
        let mut m = good.clone();
        m.chains.truncate(m.chains.len() - 2);
        refused(&m, "partition count not a power of two");
        let mut m = good.clone();
        m.chains.pop();
        refused(&m, "chains not a multiple of the chain length");
        let mut m = good.clone();
        m.failed = vec!["nobody".into()];
        refused(&m, "unknown failed node");
        let mut m = good.clone();
        m.replication = 0;
        refused(&m, "replication 0");
        let nodes: Vec<NodeEntry> = (0..=MAX_RING_NODES)
            .map(|i| NodeEntry::new(format!("n{i:05}"), format!("10.0.{}.{}:1", i >> 8, i & 255)))
            .collect();
        refused(
            &RingMetadata {
                version: 1,
                nodes,
                ..RingMetadata::default()
            },
            "too many nodes",
        );
        // The one frame decoding validates too.
        let mut m = good.clone();
        m.nodes.swap(0, 1);
        let frame = m.to_frame().unwrap();
        assert!(matches!(
            RingMetadata::from_frame(&frame),
            Err(WireError::InvalidRing(_))
        ));
        let frame = good.to_frame().unwrap();
        assert_eq!(RingMetadata::from_frame(&frame).unwrap(), good);
        assert!(RingMetadata::from_frame(&frame[..frame.len() - 1]).is_err());
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(RingMetadata::from_frame(&trailing).is_err());
    }

    #[test]
    fn ipv6_and_dns_addresses_are_valid() {
        assert_eq!(check_node_addr("[::1]:7001"), Ok(()));
        assert_eq!(check_node_addr("node-1.example.com:7001"), Ok(()));
        assert_eq!(check_node_addr("10.0.0.1:7001"), Ok(()));
    }

    fn pos(b: u8) -> Position {
        let mut p = [0u8; 20];
        p[0] = b;
        Position(p)
    }

    #[test]
    fn successor_carries_and_overflows() {
        let mut p = [0u8; 20];
        p[19] = 0xff;
        let mut want = [0u8; 20];
        want[18] = 1;
        assert_eq!(Position(p).successor(), Some(Position(want)));
        assert_eq!(Position::MAX.successor(), None);
    }

    #[test]
    fn lone_node_holds_everything() {
        let ring = ring_of(1);
        let held = ring.held_by("n0");
        assert_eq!(held.len(), 1);
        assert!(held[0].is_full());
        assert!(held[0].contains(&Position::MIN) && held[0].contains(&Position::MAX));
        assert_eq!(held[0].storage_spans().len(), 1);
        assert_eq!(ring.chains().len(), 1);
        assert_eq!(ring.boundaries(), vec![Position::MAX]);
    }

    #[test]
    fn partitions_are_equal_slices_of_the_top_bits() {
        let ring = ring_of(2);
        let count = ring.partition_count();
        assert_eq!(count, crate::placement::partitions_for(2));
        let last = |i: usize| ring.partition_range(i);
        assert_eq!(
            last(0).start,
            Position::MAX,
            "partition 0 starts after the top"
        );
        assert_eq!(last(count - 1).end, Position::MAX);
        for i in 0..count {
            let r = last(i);
            assert_eq!(ring.partition_of(&r.end), Some(i));
            assert_eq!(
                ring.partition_of(&r.start.successor().unwrap_or(Position::MIN)),
                Some(i)
            );
            assert_eq!(last((i + 1) % count).start, r.end);
        }
    }

    #[test]
    fn wrapping_range() {
        let r = KeyRange::new(pos(200), pos(10));
        assert!(r.contains(&pos(250)));
        assert!(r.contains(&Position::MIN));
        assert!(r.contains(&pos(10)));
        assert!(!r.contains(&pos(200)));
        assert!(!r.contains(&pos(100)));
        assert_eq!(r.storage_spans().len(), 2);
    }

    #[test]
    fn duplicates_refused() {
        let a = NodeEntry::new("a", "h:1");
        assert!(RingMetadata::new(1, vec![a.clone(), NodeEntry::new("a", "h:2")]).is_err());
        assert!(RingMetadata::new(1, vec![a.clone(), NodeEntry::new("b", "h:1")]).is_err());
    }

    #[test]
    fn storage_key_layout() {
        let k = storage_key(b"hello");
        assert_eq!(&k[..20], &key_position(b"hello").0);
        assert_eq!(&k[20..], b"hello");
    }

    /// A storage key in a span, for checking spans against `contains`.
    fn in_spans(spans: &[StorageSpan], skey: &[u8]) -> bool {
        spans
            .iter()
            .any(|s| s.from.is_none_or(|f| skey >= &f[..]) && s.to.is_none_or(|t| skey < &t[..]))
    }

    fn arb_position() -> impl Strategy<Value = Position> {
        prop_oneof![
            any::<[u8; 20]>().prop_map(Position),
            Just(Position::MIN),
            Just(Position::MAX),
            (any::<u8>()).prop_map(pos),
        ]
    }

    proptest! {
        #[test]
        fn head_and_tail_are_the_ends_of_the_chain(n in 1usize..12, p in arb_position(), r in 1u8..5, failed in 0usize..3) {
            let mut ring = ring_of(n).with_replication(r).unwrap();
            let failed: Vec<String> = ring.nodes.iter().take(failed).map(|n| n.name.clone()).collect();
            ring.failed = failed;
            let chain = ring.chain(&p);
            prop_assert_eq!(ring.head(&p), chain.first().copied());
            prop_assert_eq!(ring.tail(&p), chain.last().copied());
            prop_assert!(chain.len() <= r as usize);
            prop_assert!(chain.iter().all(|n| !ring.is_failed(&n.name)));
        }

        #[test]
        fn runs_cover_the_ring_once_and_agree_with_chain(n in 1usize..12, r in 1u8..4, p in arb_position()) {
            let ring = ring_of(n).with_replication(r).unwrap();
            let holding: Vec<_> = ring.chains().into_iter().filter(|(range, _)| range.contains(&p)).collect();
            prop_assert_eq!(holding.len(), 1);
            prop_assert_eq!(&holding[0].1, &ring.chain(&p));
            prop_assert_eq!(ring.run_at(&p), Some(holding[0].0));
            // A node holds `p` exactly when one of its held ranges contains it.
            for node in &ring.nodes {
                let held = ring.held_by(&node.name).iter().any(|h| h.contains(&p));
                prop_assert_eq!(held, ring.chain(&p).contains(&node));
            }
        }

        #[test]
        fn spans_match_contains(start in arb_position(), end in arb_position(), p in arb_position(), key in proptest::collection::vec(any::<u8>(), 1..8)) {
            let r = KeyRange::new(start, end);
            let mut skey = p.0.to_vec();
            skey.extend_from_slice(&key);
            prop_assert_eq!(in_spans(&r.storage_spans(), &skey), r.contains(&p));
            prop_assert_eq!(r.contains_storage_key(&skey), r.contains(&p));
        }

        #[test]
        fn intersects_matches_a_shared_point(a in arb_position(), b in arb_position(), c in arb_position(), d in arb_position(), p in arb_position()) {
            let (x, y) = (KeyRange::new(a, b), KeyRange::new(c, d));
            prop_assert_eq!(x.intersects(&y), y.intersects(&x));
            // A shared point implies intersection.
            if x.contains(&p) && y.contains(&p) {
                prop_assert!(x.intersects(&y));
            }
        }
    }
}
