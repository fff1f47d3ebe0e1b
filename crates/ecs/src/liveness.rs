//! Failure detection and automatic failover (ARCHITECTURE.md §7).
//!
//! Every [`EcsConfig::probe_interval`](crate::EcsConfig::probe_interval) the ECS sends each
//! live node of its ring a `Lease` (a probe that also lets the node serve for
//! [`EcsConfig::lease`](crate::EcsConfig::lease) from its arrival). [`Probes`] keeps, per
//! node, when its last answer arrived. With replication, a node that has not answered for
//! [`EcsConfig::failover_after`](crate::EcsConfig::failover_after) (twice the lease) is
//! failed over: a first change marks it failed (every chain it was in goes on without it,
//! nothing moves), a second rebuilds its copies on the nodes that take its place and
//! removes it from the ring.
//!
//! Fencing: the node's lease started when the probe reached it, before its answer reached
//! the ECS, so it has ended by `last answer + lease`; the ECS acts no earlier than
//! `last answer + failover_after = last answer + 2 × lease`. A node cut off from the ECS
//! has therefore stopped serving (reads included) for at least a lease when its chains are
//! re-formed without it, even if its clock ran at half the ECS's rate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// When each node last answered a probe.
#[derive(Debug)]
pub struct Probes {
    /// Answers by node name.
    last_answer: HashMap<String, Instant>,
    /// Nodes never heard from count from here (the ECS's start): a restarted ECS waits a
    /// whole `failover_after` before it fails anyone over.
    since: Instant,
}

impl Probes {
    /// No answers yet, counting from `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            last_answer: HashMap::new(),
            since: now,
        }
    }

    /// `name` answered a probe at `at`.
    pub fn answered(&mut self, name: &str, at: Instant) {
        let last = self
            .last_answer
            .entry(name.to_string())
            .or_insert(self.since);
        *last = (*last).max(at);
    }

    /// How long `name` has been silent at `now`.
    pub fn silent_for(&self, name: &str, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last_answer.get(name).unwrap_or(&self.since))
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
    fn silence_counts_from_the_last_answer_or_the_start() {
        let t0 = Instant::now();
        let mut p = Probes::new(t0);
        let s = Duration::from_secs(1);
        assert!(p.silent(["a"], s, t0 + s / 2).is_empty(), "grace after start");
        assert_eq!(p.silent(["a"], s, t0 + 2 * s), vec!["a".to_string()]);
        p.answered("a", t0 + 2 * s);
        assert!(p.silent(["a"], s, t0 + 2 * s + s / 2).is_empty());
        // An older answer arriving late does not turn the clock back.
        p.answered("a", t0);
        assert_eq!(p.silent_for("a", t0 + 3 * s), s);
        assert_eq!(p.silent(["a", "b"], s, t0 + 4 * s), vec!["a", "b"]);
    }
}
