//! Placement: the balance table (printed), minimal movement, distinct nodes and zones, and
//! the size of the metadata.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::ring::{key_position, Position};

fn node(i: usize) -> NodeEntry {
    NodeEntry::new(
        format!("n{i:04}"),
        format!("10.0.{}.{}:7000", i >> 8, i & 255),
    )
}

/// max/mean of each live node's count of partitions it heads, is the tail of, and holds a
/// copy of.
fn spread(ring: &RingMetadata) -> [f64; 3] {
    let live = ring.live_names();
    let mut counts = vec![[0usize; 3]; ring.nodes.len()];
    for p in 0..ring.partition_count() {
        let chain: Vec<usize> = ring
            .assigned(p)
            .map(|n| ring.nodes.iter().position(|m| m == n).unwrap())
            .collect();
        counts[chain[0]][0] += 1;
        counts[*chain.last().unwrap()][1] += 1;
        for &i in &chain {
            counts[i][2] += 1;
        }
    }
    let mut out = [0.0; 3];
    for (role, slot) in out.iter_mut().enumerate() {
        let of_live: Vec<usize> = (0..ring.nodes.len())
            .filter(|&i| live.contains(&ring.nodes[i].name.as_str()))
            .map(|i| counts[i][role])
            .collect();
        let mean = of_live.iter().sum::<usize>() as f64 / of_live.len() as f64;
        *slot = *of_live.iter().max().unwrap() as f64 / mean;
    }
    out
}

/// The same figures for one ring position per node (SHA-1 of its address), the placement
/// before partitions: a node owns the arc up to its position, and holds copies of its own
/// arc and its `r - 1` predecessors'.
fn one_position_spread(n: usize, r: usize) -> [f64; 2] {
    let top = |p: &Position| u64::from_be_bytes(p.0[..8].try_into().unwrap()) as f64;
    let mut points: Vec<f64> = (0..n)
        .map(|i| top(&key_position(node(i).addr.as_bytes())))
        .collect();
    points.sort_by(f64::total_cmp);
    let full = 2f64.powi(64);
    let arcs: Vec<f64> = (0..n)
        .map(|i| {
            (points[i]
                - if i == 0 {
                    points[n - 1] - full
                } else {
                    points[i - 1]
                })
                / full
        })
        .collect();
    let copies: Vec<f64> = (0..n)
        .map(|i| (0..r.min(n)).map(|k| arcs[(i + n - k) % n]).sum())
        .collect();
    let ratio = |v: &[f64]| {
        v.iter().cloned().fold(0.0, f64::max) / (v.iter().sum::<f64>() / v.len() as f64)
    };
    [ratio(&arcs), ratio(&copies)]
}

/// A small deterministic generator (xorshift), so the leave sequence is the same in every
/// run.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The target: for 3..=100 nodes, max/mean ≤ 1.10 for heads, tails and copies after
/// a sequence of joins, ≤ 1.15 after random leaves and failures, at R = 1 and R = 3. The
/// table is printed beside one position per node (`cargo test -p ringkv-wire balance --
/// --nocapture`).
#[test]
fn balance_after_joins_and_after_leaves_and_failures() {
    println!("| nodes | R | heads | tails | copies | one position: owner | one position: copies |");
    println!("|---|---|---|---|---|---|---|");
    let shown = [3, 4, 5, 6, 8, 10, 16, 20, 32, 50, 64, 100];
    for r in [1u8, 3] {
        let mut ring = RingMetadata {
            replication: r,
            ..RingMetadata::default()
        };
        for n in 1..=100 {
            ring = join(&ring, node(n)).unwrap();
            if n < 3 {
                continue;
            }
            let [heads, tails, copies] = spread(&ring);
            if shown.contains(&n) {
                let [owner, old_copies] = one_position_spread(n, r as usize);
                println!(
                    "| {n} | {r} | {heads:.3} | {tails:.3} | {copies:.3} | {owner:.2} | {old_copies:.2} |"
                );
            }
            for (what, v) in [("heads", heads), ("tails", tails), ("copies", copies)] {
                assert!(
                    v <= 1.10,
                    "{n} nodes, R = {r}: {what} max/mean {v:.3} after joins"
                );
            }
        }
        // Leaves and failures (a failed node marked, then removed), in a seeded order.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ r as u64);
        let mut worst = [0.0f64; 3];
        while ring.nodes.len() > 3 {
            let victim = ring.nodes[rng.below(ring.nodes.len())].name.clone();
            if rng.below(2) == 0 && r > 1 {
                ring = ring.with_failed(&victim).unwrap();
            }
            ring = leave(&ring, &victim).unwrap();
            let now = spread(&ring);
            for (w, v) in worst.iter_mut().zip(now) {
                *w = w.max(v);
            }
            for (what, v) in ["heads", "tails", "copies"].iter().zip(now) {
                assert!(
                    v <= 1.15,
                    "{} nodes, R = {r}: {what} max/mean {v:.3} after leaves",
                    ring.nodes.len()
                );
            }
        }
        println!(
            "R = {r}, 100 → 3 nodes by leaves and failures: worst heads {:.3}, tails {:.3}, copies {:.3}",
            worst[0], worst[1], worst[2]
        );
    }
}

/// The chain of every partition as a set of names.
fn members(ring: &RingMetadata) -> Vec<BTreeSet<String>> {
    (0..ring.partition_count())
        .map(|p| ring.assigned(p).map(|n| n.name.clone()).collect())
        .collect()
}

/// `ring`'s chains as sets, for `count` partitions (splitting a smaller ring's).
fn members_at(ring: &RingMetadata, count: usize) -> Vec<BTreeSet<String>> {
    let own = members(ring);
    let factor = count / own.len();
    (0..count).map(|p| own[p / factor].clone()).collect()
}

#[test]
fn the_first_node_holds_every_partition_and_the_last_leaves_an_empty_ring() {
    let ring = join(&RingMetadata::default(), node(1)).unwrap();
    assert_eq!(ring.version, 1);
    assert_eq!(ring.partition_count(), MIN_PARTITIONS);
    assert!(members(&ring).iter().all(|m| m.len() == 1));
    let empty = leave(&ring, "n0001").unwrap();
    assert_eq!(empty.version, 2);
    assert!(empty.nodes.is_empty() && empty.chains.is_empty());
    assert_eq!(empty.validate(), Ok(()));
    assert!(matches!(
        leave(&ring, "nobody"),
        Err(WireError::UnknownNode(_))
    ));
    assert!(matches!(
        join(&ring, NodeEntry::new("n0001", "10.9.9.9:1")),
        Err(WireError::DuplicateNode(_))
    ));
    assert!(matches!(
        join(&ring, NodeEntry::new("other", node(1).addr)),
        Err(WireError::DuplicateNode(_))
    ));
    assert!(matches!(
        join(&ring, NodeEntry::new("bad name", "10.9.9.9:1")),
        Err(WireError::InvalidRing(_))
    ));
}

/// Nine nodes in three zones at R = 3: every chain holds one node of each zone, and stays
/// so when a zone's node leaves.
#[test]
fn chains_span_the_zones() {
    let zoned = |i: usize| node(i).in_zone(["a", "b", "c"][i % 3]);
    let mut ring = RingMetadata {
        replication: 3,
        ..RingMetadata::default()
    };
    for i in 0..9 {
        ring = join(&ring, zoned(i)).unwrap();
    }
    let zones_of = |ring: &RingMetadata, p: usize| -> BTreeSet<String> {
        ring.assigned(p).map(|n| n.domain().to_string()).collect()
    };
    for p in 0..ring.partition_count() {
        assert_eq!(zones_of(&ring, p).len(), 3, "partition {p}");
    }
    let ring = leave(&ring, "n0004").unwrap();
    for p in 0..ring.partition_count() {
        assert_eq!(zones_of(&ring, p).len(), 3, "partition {p} after a leave");
    }
    let [heads, tails, copies] = spread(&ring);
    println!("8 nodes in 3 zones: heads {heads:.3}, tails {tails:.3}, copies {copies:.3}");
}

/// 100 and 1,000 nodes at R = 3: the encoded metadata (what is signed, gossiped and handed
/// out in `NotResponsible`) stays far under 1 MB.
#[test]
fn metadata_stays_compact() {
    let mut ring = RingMetadata {
        replication: 3,
        ..RingMetadata::default()
    };
    for n in 1..=1000 {
        ring = join(&ring, node(n)).unwrap();
        if n == 100 || n == 1000 {
            let bytes = ring.to_frame().unwrap().len();
            println!(
                "{n} nodes, R = 3, {} partitions: {bytes} bytes encoded",
                ring.partition_count()
            );
            assert!(bytes <= 1 << 20, "{n} nodes: {bytes} bytes");
        }
    }
}

/// Whether no chain holds two nodes of one zone.
fn zones_apart(ring: &RingMetadata) -> bool {
    (0..ring.partition_count()).all(|p| {
        let zones: BTreeSet<&str> = ring.assigned(p).map(|n| n.domain()).collect();
        zones.len() == ring.chain_len()
    })
}

#[derive(Debug, Clone)]
enum Op {
    Join(u8),
    Leave(usize),
    /// Marked failed, then removed.
    Fail(usize),
    /// Marked failed and kept: later joins and leaves run with it in chains.
    MarkFailed(usize),
}

fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            3 => (0u8..4).prop_map(Op::Join),
            1 => any::<usize>().prop_map(Op::Leave),
            1 => any::<usize>().prop_map(Op::Fail),
            1 => any::<usize>().prop_map(Op::MarkFailed),
        ],
        1..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Through any sequence of joins (in up to four zones), leaves and failures: every
    /// chain holds `min(R, nodes)` distinct nodes, in distinct zones whenever the live
    /// nodes span enough; a join moves copies only to the newcomer and a leave only the
    /// leaver's (one receiver per place).
    #[test]
    fn chains_are_distinct_and_changes_move_the_least(r in 1u8..5, ops in arb_ops()) {
        let mut ring = RingMetadata { replication: r, ..RingMetadata::default() };
        let mut next = 0usize;
        for op in ops {
            let mut before = ring.clone();
            match op {
                Op::Join(zone) => {
                    next += 1;
                    let mut n = node(next);
                    if zone > 0 {
                        n = n.in_zone(format!("z{zone}"));
                    }
                    ring = join(&ring, n.clone()).unwrap();
                    // Unless the chains shared zones before (the join may bring the zones to
                    // spread them), only the newcomer receives copies.
                    if !before.nodes.is_empty() && zones_apart(&before) {
                        let count = ring.partition_count();
                        for (old, new) in members_at(&before, count).iter().zip(members(&ring)) {
                            let added: Vec<_> = new.difference(old).collect();
                            prop_assert!(added.is_empty() || added == vec![&n.name],
                                "a join added {:?}", added);
                        }
                    }
                }
                Op::Leave(i) | Op::Fail(i) if !ring.nodes.is_empty() => {
                    let name = ring.nodes[i % ring.nodes.len()].name.clone();
                    if matches!(op, Op::Fail(_)) {
                        ring = ring.with_failed(&name).unwrap();
                    }
                    let marked = ring.clone();
                    before.version = marked.version;
                    ring = leave(&marked, &name).unwrap();
                    if ring.nodes.is_empty() {
                        continue;
                    }
                    for (old, new) in members(&marked).iter().zip(members(&ring)) {
                        prop_assert!(!new.contains(&name));
                        let added = new.difference(old).count();
                        if zones_apart(&marked) {
                            prop_assert!(added <= usize::from(old.contains(&name)), "a leave moved more than the leaver's place");
                        }
                    }
                }
                Op::MarkFailed(i) if !ring.nodes.is_empty() => {
                    let name = ring.nodes[i % ring.nodes.len()].name.clone();
                    ring = ring.with_failed(&name).unwrap();
                    prop_assert_eq!(ring.validate(), Ok(()));
                    continue;
                }
                _ => continue,
            }
            prop_assert_eq!(ring.validate(), Ok(()));
            prop_assert_eq!(ring.version, before.version + 1);
            let len = ring.chain_len();
            for p in 0..ring.partition_count() {
                prop_assert_eq!(ring.assigned(p).count(), len);
            }
            let domains: BTreeSet<&str> = ring.nodes.iter().map(|n| n.domain()).collect();
            if ring.failed.is_empty() && domains.len() >= len {
                prop_assert!(zones_apart(&ring), "a chain shares a zone");
            }
        }
    }
}
