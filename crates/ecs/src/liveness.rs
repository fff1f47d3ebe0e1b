//! Failure detection and automatic failover (ARCHITECTURE.md §11).
//!
//! Every [`EcsConfig::probe_interval`](crate::EcsConfig::probe_interval) the ECS sends each
//! live node of its ring a `Lease`, from a task of its own that nothing else holds up (at
//! most one probe per node under way). The node answers with a stamp of its own clock, which
//! the next probe echoes; the node may then serve until that stamp plus
//! [`EcsConfig::lease`](crate::EcsConfig::lease). [`Probes`] keeps, per node, when its last
//! answer arrived and its stamp. With replication, a node that has not answered for
//! [`EcsConfig::failover_after`](crate::EcsConfig::failover_after) (twice the lease) is
//! failed over by another task: a first change marks it failed (every chain it was in goes
//! on without it, nothing moves), a second rebuilds its copies on the nodes that take its
//! place and removes it from the ring.
//!
//! Fencing: a lease counts from a stamp the node took before sending an answer the ECS
//! received, so it has ended by `last answer + lease` however late any probe is delivered;
//! the ECS acts no earlier than `last answer + failover_after = last answer + 2 × lease`. A
//! node cut off from the ECS has therefore stopped serving (reads included) for a whole lease
//! when its chains are re-formed without it if the clocks run at the same rate, and has
//! stopped by then if its clock runs up to twice slower.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// When each node last answered a probe, its last stamp, and which probes are under way.
#[derive(Debug, Default)]
pub struct Probes {
    /// By node name: its last answer, or when it was first probed if it never answered (so
    /// a restarted ECS, or a node just added, gets a whole `failover_after` first).
    last_answer: HashMap<String, Instant>,
    /// By node name: the stamp of its last answer, echoed by the next probe.
    stamps: HashMap<String, u64>,
    /// Nodes with a probe under way (a slow or dead node gets one at a time).
    in_flight: std::collections::HashSet<String>,
}

impl Probes {
    /// No node probed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `name` is being probed from `now` on (no effect if it already is).
    pub fn probing(&mut self, name: &str, now: Instant) {
        self.last_answer.entry(name.to_string()).or_insert(now);
    }

    /// `name` answered a probe at `at`, with `stamp`.
    pub fn answered(&mut self, name: &str, at: Instant, stamp: u64) {
        let last = self.last_answer.entry(name.to_string()).or_insert(at);
        if at >= *last {
            *last = at;
            self.stamps.insert(name.to_string(), stamp);
        }
    }

    /// The stamp the next probe of `name` echoes.
    pub fn echo(&self, name: &str) -> Option<u64> {
        self.stamps.get(name).copied()
    }

    /// Marks a probe of `name` under way; `false` if one already is.
    pub fn start(&mut self, name: &str) -> bool {
        self.in_flight.insert(name.to_string())
    }

    /// The probe of `name` is over.
    pub fn done(&mut self, name: &str) {
        self.in_flight.remove(name);
    }

    /// How long `name` has been silent at `now` (zero if it is not being probed).
    pub fn silent_for(&self, name: &str, now: Instant) -> Duration {
        self.last_answer
            .get(name)
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(*last))
    }

    /// Stops tracking nodes not in `names` (they left the ring).
    pub fn retain<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let keep: std::collections::HashSet<&str> = names.into_iter().collect();
        self.last_answer
            .retain(|name, _| keep.contains(name.as_str()));
        self.stamps.retain(|name, _| keep.contains(name.as_str()));
    }

    /// Of `names`, those silent for longer than `limit` at `now`.
    pub fn silent<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        limit: Duration,
        now: Instant,
    ) -> Vec<String> {
        names
            .into_iter()
            .filter(|name| self.silent_for(name, now) > limit)
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_from_the_last_answer_or_the_first_probe() {
        let t0 = Instant::now();
        let mut p = Probes::new();
        let s = Duration::from_secs(1);
        assert!(
            p.silent(["a"], s, t0 + 2 * s).is_empty(),
            "never probed: not silent"
        );
        p.probing("a", t0);
        assert!(
            p.silent(["a"], s, t0 + s / 2).is_empty(),
            "grace after the first probe"
        );
        assert_eq!(p.silent(["a"], s, t0 + 2 * s), vec!["a".to_string()]);
        p.answered("a", t0 + 2 * s, 7);
        assert_eq!(p.echo("a"), Some(7));
        p.probing("a", t0 + 3 * s);
        assert!(p.silent(["a"], s, t0 + 2 * s + s / 2).is_empty());
        // An older answer arriving late does not turn the clock back.
        p.answered("a", t0, 3);
        assert_eq!(
            p.echo("a"),
            Some(7),
            "an older answer does not replace the stamp"
        );
        assert!(p.start("a") && !p.start("a"), "one probe at a time");
        p.done("a");
        assert!(p.start("a"));
        assert_eq!(p.silent_for("a", t0 + 3 * s), s);
        p.probing("b", t0);
        assert_eq!(p.silent(["a", "b"], s, t0 + 4 * s), vec!["a", "b"]);
        p.retain(["b"]);
        assert_eq!(p.silent_for("a", t0 + 9 * s), Duration::ZERO);
    }
}
