//! The consistent-hashing ring (ARCHITECTURE.md §2).
//!
//! Positions are SHA-1 digests read as 160-bit big-endian unsigned integers, so comparing the
//! 20-byte arrays lexicographically is comparing the integers. A node at position `p` with
//! predecessor at `q` owns the half-open range `(q, p]`, wrapping at 2^160; a lone node owns
//! the whole ring.
//!
//! Invariants of [`RingMetadata`]: `nodes` is sorted by position; no two nodes share a
//! name, an address or a position. Every position on the ring has exactly one owner while
//! the ring is non-empty.

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

/// The ring position of a node: `SHA-1("host:port")` of its advertised address.
pub fn node_position(addr: &str) -> Position {
    key_position(addr.as_bytes())
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
    /// `SHA-1(addr)`.
    pub position: Position,
}

impl NodeEntry {
    /// A node entry whose position is derived from its address.
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> Self {
        let addr = addr.into();
        Self {
            name: name.into(),
            position: node_position(&addr),
            addr,
        }
    }
}

/// Most nodes a ring may hold; bigger metadata is refused as invalid.
pub const MAX_RING_NODES: usize = 16_384;
/// Longest node name, in bytes.
pub const MAX_NODE_NAME: usize = 64;

/// A node name: 1..=[`MAX_NODE_NAME`] bytes of `[A-Za-z0-9._-]` (the certificate names the
/// cert tool issues).
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
            "bad node name {name:?}: expected 1..={MAX_NODE_NAME} bytes of [A-Za-z0-9._-]"
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

/// A range that changes owner, and between whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeMove {
    /// The positions that move.
    pub range: KeyRange,
    /// Current owner, which sends.
    pub from: NodeEntry,
    /// New owner, which receives.
    pub to: NodeEntry,
}

/// Most copies of a key a ring may ask for.
pub const MAX_REPLICATION: u8 = 7;

/// Versioned ring metadata. Everybody adopts metadata only if its version is higher than the
/// one held ([`RingMetadata::is_newer_than`]).
///
/// Replication (ARCHITECTURE.md §11): the range `(pred, n]` of node `n` is replicated on the
/// *window* of `n` and the next `replication - 1` nodes clockwise (all nodes if there are
/// fewer). Its **chain** is that window without the nodes marked `failed`, in ring order:
/// the first is the *head* (takes writes), the last the *tail* (serves reads). A failed node
/// keeps its ring position until the ECS has rebuilt its copies elsewhere and removes it, so
/// a failure shortens the chains it was in without moving any other range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMetadata {
    /// Assigned by the ECS, strictly increasing with every change. 0 means "no ring yet".
    pub version: u64,
    /// Nodes sorted by position.
    pub nodes: Vec<NodeEntry>,
    /// Copies of every key (1..=[`MAX_REPLICATION`]; 1: no replication).
    pub replication: u8,
    /// Names of ring nodes the ECS declared failed: in no chain, serving nothing.
    pub failed: Vec<String>,
}

impl Default for RingMetadata {
    fn default() -> Self {
        Self {
            version: 0,
            nodes: Vec::new(),
            replication: 1,
            failed: Vec::new(),
        }
    }
}

impl RingMetadata {
    /// Builds metadata, sorting the nodes by position. Fails on duplicate names, addresses
    /// or positions.
    pub fn new(version: u64, mut nodes: Vec<NodeEntry>) -> Result<Self, WireError> {
        nodes.sort_by_key(|n| n.position);
        for pair in nodes.windows(2) {
            if pair[0].position == pair[1].position {
                return Err(WireError::DuplicateNode(pair[1].addr.clone()));
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            if nodes[..i]
                .iter()
                .any(|m| m.name == n.name || m.addr == n.addr)
            {
                return Err(WireError::DuplicateNode(n.name.clone()));
            }
        }
        let metadata = Self {
            version,
            nodes,
            ..Self::default()
        };
        metadata.validate()?;
        Ok(metadata)
    }

    /// The same ring with `replication` copies of every key.
    pub fn with_replication(mut self, replication: u8) -> Result<Self, WireError> {
        self.replication = replication;
        self.validate()?;
        Ok(self)
    }

    /// Checks every structural invariant a peer could get wrong: at most
    /// [`MAX_RING_NODES`] nodes, strictly sorted by position, unique names and addresses,
    /// names of 1..=[`MAX_NODE_NAME`] bytes of `[A-Za-z0-9._-]`, addresses of the form
    /// `host:port`, and each position equal to SHA-1 of its address. Linear in the ring size
    /// (plus hashing), so it is cheap enough to run on everything that comes off the wire.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |why: String| Err(WireError::InvalidRing(why));
        if !(1..=MAX_REPLICATION).contains(&self.replication) {
            return bad(format!(
                "replication factor {} outside 1..={MAX_REPLICATION}",
                self.replication
            ));
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
        if self.nodes.len() > MAX_RING_NODES {
            return bad(format!(
                "{} nodes, more than the maximum of {MAX_RING_NODES}",
                self.nodes.len()
            ));
        }
        let mut names = std::collections::HashSet::with_capacity(self.nodes.len());
        let mut addrs = std::collections::HashSet::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            if let Err(why) = check_node_name(&n.name) {
                return bad(why);
            }
            if let Err(why) = check_node_addr(&n.addr) {
                return bad(format!("node {}: {why}", n.name));
            }
            if n.position != node_position(&n.addr) {
                return bad(format!(
                    "node {}: position is not SHA-1 of its address {}",
                    n.name, n.addr
                ));
            }
            if i > 0 && self.nodes[i - 1].position >= n.position {
                return bad("nodes are not strictly sorted by position".into());
            }
            if !names.insert(n.name.as_str()) {
                return bad(format!("node name {} appears twice", n.name));
            }
            if !addrs.insert(n.addr.as_str()) {
                return bad(format!("address {} appears twice", n.addr));
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

    /// Index of the node responsible for `pos`: the first node at or after it, wrapping.
    fn owner_index(&self, pos: &Position) -> Option<usize> {
        if self.nodes.is_empty() {
            return None;
        }
        let idx = self.nodes.partition_point(|n| n.position < *pos);
        Some(if idx == self.nodes.len() { 0 } else { idx })
    }

    /// The node responsible for ring position `pos`, or `None` on an empty ring.
    pub fn responsible_for(&self, pos: &Position) -> Option<&NodeEntry> {
        self.owner_index(pos).map(|i| &self.nodes[i])
    }

    /// The node responsible for `key`.
    pub fn responsible_for_key(&self, key: &[u8]) -> Option<&NodeEntry> {
        self.responsible_for(&key_position(key))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn range_at(&self, idx: usize) -> KeyRange {
        let pred = if idx == 0 {
            self.nodes.len() - 1
        } else {
            idx - 1
        };
        KeyRange::new(self.nodes[pred].position, self.nodes[idx].position)
    }

    /// The range `(predecessor, self]` owned by the node called `name`.
    pub fn range_of(&self, name: &str) -> Option<KeyRange> {
        self.index_of(name).map(|i| self.range_at(i))
    }

    /// Every node with the range it owns, in ring order.
    pub fn ranges(&self) -> Vec<(&NodeEntry, KeyRange)> {
        (0..self.nodes.len())
            .map(|i| (&self.nodes[i], self.range_at(i)))
            .collect()
    }

    /// The metadata after `node` joins, with version `self.version + 1`.
    pub fn with_node(&self, node: NodeEntry) -> Result<RingMetadata, WireError> {
        let mut nodes = self.nodes.clone();
        nodes.push(node);
        let mut next = RingMetadata::new(self.version + 1, nodes)?;
        next.replication = self.replication;
        next.failed = self.failed.clone();
        next.validate()?;
        Ok(next)
    }

    /// The metadata after the node `name` leaves, with version `self.version + 1`.
    pub fn without_node(&self, name: &str) -> Result<RingMetadata, WireError> {
        let idx = self
            .index_of(name)
            .ok_or_else(|| WireError::UnknownNode(name.to_string()))?;
        let mut nodes = self.nodes.clone();
        nodes.remove(idx);
        Ok(RingMetadata {
            version: self.version + 1,
            nodes,
            replication: self.replication,
            failed: self.failed.iter().filter(|f| *f != name).cloned().collect(),
        })
    }

    /// The metadata after the node `name` is declared failed (version + 1): it leaves every
    /// chain but keeps its position.
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

    /// The names of the ring's nodes that are not marked failed, in ring order.
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

    /// The chain of the ring range ending at node index `owner`: the window of `replication`
    /// nodes from `owner` clockwise, without the failed ones.
    fn chain_at(&self, owner: usize) -> Vec<&NodeEntry> {
        let n = self.nodes.len();
        let window = (self.replication as usize).clamp(1, n.max(1)).min(n);
        (0..window)
            .map(|k| &self.nodes[(owner + k) % n])
            .filter(|node| !self.is_failed(&node.name))
            .collect()
    }

    /// The chain of the range holding `pos`: head first, tail last. Empty on an empty ring
    /// or when every node of the window failed.
    pub fn chain(&self, pos: &Position) -> Vec<&NodeEntry> {
        match self.owner_index(pos) {
            Some(i) => self.chain_at(i),
            None => Vec::new(),
        }
    }

    /// The chain of the range holding `key`.
    pub fn chain_for_key(&self, key: &[u8]) -> Vec<&NodeEntry> {
        self.chain(&key_position(key))
    }

    /// The window of the range holding `pos`, in ring order (failed nodes included); no
    /// allocation.
    fn window(&self, pos: &Position) -> impl DoubleEndedIterator<Item = &NodeEntry> {
        let n = self.nodes.len();
        let owner = self.owner_index(pos).unwrap_or(0);
        let window = (self.replication as usize).max(1).min(n);
        (0..window).map(move |k| &self.nodes[(owner + k) % n])
    }

    /// The node that takes writes of `pos` (its chain's head). Allocates nothing (it is on
    /// every request's path).
    pub fn head(&self, pos: &Position) -> Option<&NodeEntry> {
        self.window(pos).find(|n| !self.is_failed(&n.name))
    }

    /// The node that serves reads of `pos` (its chain's tail). Allocates nothing.
    pub fn tail(&self, pos: &Position) -> Option<&NodeEntry> {
        self.window(pos).rev().find(|n| !self.is_failed(&n.name))
    }

    /// Every ring range with its chain, in ring order.
    pub fn chains(&self) -> Vec<(KeyRange, Vec<&NodeEntry>)> {
        (0..self.nodes.len())
            .map(|i| (self.range_at(i), self.chain_at(i)))
            .collect()
    }

    /// The ring ranges whose chain holds the node `name` (the data it must hold), with its
    /// index in each chain.
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

    /// How many copies a full chain has: the replication factor, or the ring size if that
    /// is smaller.
    pub fn full_chain(&self) -> usize {
        (self.replication as usize).min(self.nodes.len())
    }

    /// The range that moves when `node` joins: `(predecessor, node]`, from the current owner
    /// of `node`'s position to `node`. `None` when the ring is empty (nothing to move).
    pub fn join_move(&self, node: &NodeEntry) -> Result<Option<RangeMove>, WireError> {
        let after = self.with_node(node.clone())?;
        let Some(from) = self.responsible_for(&node.position) else {
            return Ok(None);
        };
        let range = after.range_of(&node.name).expect("node was just added");
        Ok(Some(RangeMove {
            range,
            from: from.clone(),
            to: node.clone(),
        }))
    }

    /// The range that moves when `name` leaves: its whole range, to its successor. `None`
    /// when it is the last node (there is nobody to take the data).
    pub fn leave_move(&self, name: &str) -> Result<Option<RangeMove>, WireError> {
        let idx = self
            .index_of(name)
            .ok_or_else(|| WireError::UnknownNode(name.to_string()))?;
        if self.nodes.len() == 1 {
            return Ok(None);
        }
        let succ = (idx + 1) % self.nodes.len();
        Ok(Some(RangeMove {
            range: self.range_at(idx),
            from: self.nodes[idx].clone(),
            to: self.nodes[succ].clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring_of(addrs: &[String]) -> RingMetadata {
        let nodes = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| NodeEntry::new(format!("n{i}"), a.clone()))
            .collect();
        RingMetadata::new(1, nodes).unwrap()
    }

    #[test]
    fn validate_refuses_every_broken_invariant() {
        let good = ring_of(&["h:1".into(), "h:2".into(), "h:3".into()]);
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
        m.nodes[1].position = Position([0xff; 20]);
        refused(&m, "position not SHA-1 of the address");
        for addr in ["", "h", "h:", ":1", "h:0", "h:65536", "h x:1", "h:port"] {
            let mut m = good.clone();
            m.nodes[0] = NodeEntry::new("n0", addr);
            m.nodes.sort_by_key(|n| n.position);
            refused(&m, addr);
        }
        for name in ["", "a b", "n\n", &"x".repeat(MAX_NODE_NAME + 1)] {
            let mut m = good.clone();
            m.nodes[0].name = name.to_string();
            refused(&m, name);
        }
        let mut nodes: Vec<NodeEntry> = (0..=MAX_RING_NODES)
            .map(|i| NodeEntry::new(format!("n{i}"), format!("10.0.{}.{}:1", i >> 8, i & 255)))
            .collect();
        nodes.sort_by_key(|n| n.position);
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
    fn lone_node_owns_everything() {
        let ring = ring_of(&["127.0.0.1:1".into()]);
        let r = ring.range_of("n0").unwrap();
        assert!(r.is_full());
        assert!(r.contains(&Position::MIN) && r.contains(&Position::MAX));
        assert_eq!(r.storage_spans().len(), 1);
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

    fn arb_addrs() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::hash_set(1u16..u16::MAX, 1..12)
            .prop_map(|ports| ports.into_iter().map(|p| format!("10.0.0.1:{p}")).collect())
    }

    proptest! {
        #[test]
        fn head_and_tail_are_the_ends_of_the_chain(addrs in arb_addrs(), p in arb_position(), r in 1u8..5, failed in 0usize..3) {
            let mut ring = ring_of(&addrs).with_replication(r).unwrap();
            let failed: Vec<String> = ring.nodes.iter().take(failed).map(|n| n.name.clone()).collect();
            ring.failed = failed;
            let chain = ring.chain(&p);
            prop_assert_eq!(ring.head(&p), chain.first().copied());
            prop_assert_eq!(ring.tail(&p), chain.last().copied());
            prop_assert!(chain.len() <= r as usize);
            prop_assert!(chain.iter().all(|n| !ring.is_failed(&n.name)));
        }

        #[test]
        fn every_point_has_exactly_one_owner(addrs in arb_addrs(), p in arb_position()) {
            let ring = ring_of(&addrs);
            let owners: Vec<_> = ring.ranges().into_iter().filter(|(_, r)| r.contains(&p)).collect();
            prop_assert_eq!(owners.len(), 1);
            prop_assert_eq!(owners[0].0, ring.responsible_for(&p).unwrap());
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

        #[test]
        fn join_moves_exactly_the_new_range(addrs in arb_addrs(), port in 1u16..u16::MAX, p in arb_position()) {
            let ring = ring_of(&addrs);
            let new = NodeEntry::new("new", format!("10.0.0.2:{port}"));
            let after = ring.with_node(new.clone()).unwrap();
            let mv = ring.join_move(&new).unwrap().unwrap();
            prop_assert_eq!(after.version, ring.version + 1);
            let before_owner = ring.responsible_for(&p).unwrap();
            let after_owner = after.responsible_for(&p).unwrap();
            if mv.range.contains(&p) {
                prop_assert_eq!(before_owner, &mv.from);
                prop_assert_eq!(after_owner, &new);
            } else {
                prop_assert_eq!(before_owner, after_owner);
            }
        }

        #[test]
        fn leave_moves_exactly_the_leaving_range(addrs in arb_addrs(), which in any::<prop::sample::Index>(), p in arb_position()) {
            prop_assume!(addrs.len() >= 2);
            let ring = ring_of(&addrs);
            let leaving = ring.nodes[which.index(ring.nodes.len())].clone();
            let after = ring.without_node(&leaving.name).unwrap();
            let mv = ring.leave_move(&leaving.name).unwrap().unwrap();
            prop_assert_eq!(&mv.from, &leaving);
            let before_owner = ring.responsible_for(&p).unwrap();
            let after_owner = after.responsible_for(&p).unwrap();
            if mv.range.contains(&p) {
                prop_assert_eq!(before_owner, &leaving);
                prop_assert_eq!(after_owner, &mv.to);
            } else {
                prop_assert_eq!(before_owner, after_owner);
            }
        }
    }
}
