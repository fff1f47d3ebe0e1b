//! Failure detection and automatic failover (ARCHITECTURE.md §11).
//!
//! Every [`EcsConfig::probe_interval`](crate::EcsConfig::probe_interval) the ECS sends each
//! live node of its ring a `Lease`, from a task of its own that nothing else holds up (at
//! most one probe per node under way). The node answers with a stamp of its own clock, which
//! the next probe echoes; the node may then serve until that stamp plus
//! the lease, half of `failover_after` ([`Ecs::failover_after`](crate::Ecs::failover_after)).
//! [`Probes`] keeps, per node, when its last
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

//!
//! Decisions here, I/O in `service`: [`Probes::due`] says whom to probe now and with which
//! echo, [`Probes::answered`] takes an answer, [`Probes::decide`] says whom to fail over
//! ([`FailoverDecision`]), and [`Probes::condemn`] records that decision. A condemned node
//! is never probed (leased) again: the echo of an answer that arrived after its silence
//! began is never sent, so its lease, over when it was condemned, stays over across the
//! commit that fails it over, however late the answer that would have renewed it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The interval between two probes of a node in a ring of `live` live nodes: `configured`
/// (`--probe-interval`), stretched so that the leader sends at most `max_rate` probes per
/// second, but never past a quarter of `failover_after` (nor below `configured`): a lease
/// is half of `failover_after`, and counts from the stamp of the answer before the probe
/// that renews it, so a quarter leaves every lease two renewals. Past that bound the rate
/// grows with the ring: a larger ring needs a larger `failover_after` or budget.
pub fn probe_interval(
    configured: Duration,
    live: usize,
    max_rate: u32,
    failover_after: Duration,
) -> Duration {
    let cap = (failover_after / 4).max(configured);
    interval_within_budget(live, max_rate).clamp(configured, cap)
}

/// The shortest interval at which probing `live` nodes keeps to `max_rate` probes per
/// second.
fn interval_within_budget(live: usize, max_rate: u32) -> Duration {
    Duration::from_secs_f64(live as f64 / f64::from(max_rate.max(1)))
}

/// The shortest `failover_after` at which a ring of `live` live nodes is leased within
/// `max_rate` probes per second ([`probe_interval`] stretches to a quarter of it), or `None`
/// if `failover_after` already does. A leader past its budget still probes every node at the
/// quarter (a lease needs it), and says so with this figure.
pub fn failover_after_within_budget(
    live: usize,
    max_rate: u32,
    failover_after: Duration,
) -> Option<Duration> {
    let needed = interval_within_budget(live, max_rate) * 4;
    (needed > failover_after).then_some(needed)
}

/// When each node last answered a probe, its last stamp, and which probes are under way.
#[derive(Debug, Default)]
pub struct Probes {
    /// By node name: its last answer, or when it was first probed if it never answered (so
    /// a restarted ECS, or a node just added, gets a whole `failover_after` first).
    last_answer: HashMap<String, Instant>,
    /// By node name: the stamp of its last answer, echoed by the next probe.
    stamps: HashMap<String, u64>,
    /// Nodes with a probe under way (a slow or dead node gets one at a time).
    in_flight: HashSet<String>,
    /// Nodes a change that removes them from their chains was decided for: never leased
    /// again ([`Probes::condemn`]).
    condemned: HashSet<String>,
    /// Since when fewer than half the live nodes have been silent (`None`: not now). No
    /// node is failed over before the ECS has heard a majority for `failover_after`.
    healthy_since: Option<Instant>,
    /// Nodes that answered their last probe `Leaving`, and when: stopping on purpose, their
    /// lease given up before they answered ([`Probes::left`]).
    leaving: HashMap<String, Instant>,
}

/// What the failure detector decides at one moment ([`Probes::decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverDecision {
    /// No node has been silent past the bound.
    Nothing,
    /// Fail these nodes over, all in one change: each has been silent past the bound.
    FailOver(Vec<String>),
    /// Some nodes are past the bound, but half of the live nodes or more are silent (past
    /// the bound or not yet): the ECS is more likely cut off, or the whole cluster
    /// restarting, than that many nodes dead. Fail none over.
    HoldOff {
        /// Every live node that is silent now.
        silent: Vec<String>,
    },
    /// Some nodes are past the bound, but the ECS has heard a majority again for less than
    /// `failover_after` (after a hold-off, or since it started leading): the late ones get
    /// that long to answer (a whole-cluster restart brings nodes back over seconds).
    Settling {
        /// The nodes past the bound.
        silent: Vec<String>,
    },
}

/// The failure detector's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detector {
    /// A node silent this long is failed over (twice the lease).
    pub failover_after: Duration,
    /// A node silent this long counts as silent for the "half the nodes" guard: it missed
    /// two probes in a row.
    pub suspect_after: Duration,
}

impl Detector {
    /// How long after a node said it is stopping on purpose it may be failed over: half of
    /// `failover_after` ([`Probes::left`]).
    pub fn leave_after(&self) -> Duration {
        self.failover_after / 2
    }

    /// The detector of a probe interval and failover bound.
    pub fn new(probe_interval: Duration, failover_after: Duration) -> Self {
        Self {
            failover_after,
            suspect_after: (probe_interval * 2).min(failover_after),
        }
    }
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

    /// `name` answered a probe at `at`, with `stamp` (a node that was leaving is back).
    pub fn answered(&mut self, name: &str, at: Instant, stamp: u64) {
        let last = self.last_answer.entry(name.to_string()).or_insert(at);
        if at >= *last {
            *last = at;
            self.stamps.insert(name.to_string(), stamp);
            self.leaving.remove(name);
        }
    }

    /// `name` answered a probe `Leaving` at `at`: it stops on purpose and gave up its lease
    /// before it answered, so it serves nothing from then on, and may be failed over without
    /// waiting for its lease to run out. It counts as silent for the guard at once, and as
    /// past the bound half a `failover_after` later ([`Detector::leave_after`]): nodes of a
    /// planned full restart, stopped within that of each other, are all seen leaving before
    /// any is failed over, and the guard holds them all off.
    pub fn left(&mut self, name: &str, at: Instant) {
        self.leaving.entry(name.to_string()).or_insert(at);
    }

    /// Whether `name` is stopping on purpose ([`Probes::left`]).
    pub fn is_leaving(&self, name: &str) -> bool {
        self.leaving.contains_key(name)
    }

    /// The stamp the next probe of `name` echoes.
    pub fn echo(&self, name: &str) -> Option<u64> {
        self.stamps.get(name).copied()
    }

    /// After a probe of `name` that echoed `sent` was answered: the echo for a second probe
    /// to send at once (the probe stays under way), or `None` (the probe is over). Only a
    /// probe that echoed nothing is followed up: it granted no lease (the node's first
    /// answer to this ECS, e.g. under a leader that just took the lead), so the node would
    /// otherwise wait a whole probe interval for one, and a lease the previous leader
    /// granted may run out meanwhile. Only for a node `live` in the ring now (the answer may
    /// come after a change failed it over), never for a condemned node or one that is
    /// leaving.
    pub fn follow_up(&self, name: &str, sent: Option<u64>, live: bool) -> Option<u64> {
        if !live
            || sent.is_some()
            || self.condemned.contains(name)
            || self.leaving.contains_key(name)
        {
            return None;
        }
        self.echo(name)
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

    /// Stops tracking nodes not in `names` (they left the ring, or were failed over).
    pub fn retain<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let keep: HashSet<&str> = names.into_iter().collect();
        self.last_answer
            .retain(|name, _| keep.contains(name.as_str()));
        self.stamps.retain(|name, _| keep.contains(name.as_str()));
        self.condemned.retain(|name| keep.contains(name.as_str()));
        self.leaving.retain(|name, _| keep.contains(name.as_str()));
    }

    /// The probes to send at `now` to the live nodes `live`: each node that is not condemned
    /// and has no probe under way, with the echo to send it (read now, in the same step that
    /// marks the probe under way). Starts counting silence for nodes probed the first time.
    pub fn due<'a>(
        &mut self,
        live: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Vec<(String, Option<u64>)> {
        let mut due = Vec::new();
        for name in live {
            if self.condemned.contains(name) {
                continue;
            }
            self.probing(name, now);
            if self.start(name) {
                due.push((name.to_string(), self.echo(name)));
            }
        }
        due
    }

    /// Looks at the live nodes `live` at `now` for the guard (called every probe tick, and by
    /// [`Probes::decide`]): the nodes silent now (condemned ones included), and whether half
    /// of them or more are, which restarts the wait for a majority heard for
    /// `failover_after`.
    pub fn observe(&mut self, live: &[&str], detector: Detector, now: Instant) -> Vec<String> {
        let silent: Vec<String> = live
            .iter()
            .filter(|name| {
                self.condemned.contains(**name)
                    || self.leaving.contains_key(**name)
                    || self.silent_for(name, now) > detector.suspect_after
            })
            .map(|name| name.to_string())
            .collect();
        if !silent.is_empty() && silent.len() * 2 >= live.len() {
            self.healthy_since = None;
        } else {
            self.healthy_since.get_or_insert(now);
        }
        silent
    }

    /// The failover decision at `now` for the ring's live (not failed) nodes `live`. See
    /// [`FailoverDecision`]. Condemned nodes count as silent.
    pub fn decide(&mut self, live: &[&str], detector: Detector, now: Instant) -> FailoverDecision {
        let silent = self.observe(live, detector, now);
        let past: Vec<String> = live
            .iter()
            .filter(|name| {
                self.silent_for(name, now) > detector.failover_after
                    || self.leaving.get(**name).is_some_and(|at| {
                        now.saturating_duration_since(*at) >= detector.leave_after()
                    })
            })
            .map(|name| name.to_string())
            .collect();
        if !silent.is_empty() && silent.len() * 2 >= live.len() {
            return if past.is_empty() {
                FailoverDecision::Nothing
            } else {
                FailoverDecision::HoldOff { silent }
            };
        }
        let healthy_since = self.healthy_since.unwrap_or(now);
        if past.is_empty() {
            FailoverDecision::Nothing
        } else if now.saturating_duration_since(healthy_since) < detector.failover_after {
            FailoverDecision::Settling { silent: past }
        } else {
            FailoverDecision::FailOver(past)
        }
    }

    /// A change that removes `name` from its chains was decided: it is never probed, so
    /// never leased, again (see the module docs). Whether it was silent past `bound` at
    /// `now` (its lease over); a node that is not is not condemned.
    pub fn condemn(&mut self, name: &str, bound: Duration, now: Instant) -> bool {
        if !self.leaving.contains_key(name) && self.silent_for(name, now) <= bound {
            return false;
        }
        self.condemned.insert(name.to_string());
        true
    }

    /// The change that would have removed `name` was rolled back (certainly not committed):
    /// it may be leased again if it answers.
    pub fn pardon(&mut self, name: &str) {
        self.condemned.remove(name);
    }

    /// Whether `name` is condemned.
    pub fn is_condemned(&self, name: &str) -> bool {
        self.condemned.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condemned_node_is_never_leased_again_even_if_it_answers() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut p = Probes::new();
        assert_eq!(p.due(["a"], t0), vec![("a".to_string(), None)]);
        p.answered("a", t0, 7);
        p.done("a");
        assert_eq!(p.due(["a"], t0), vec![("a".to_string(), Some(7))]);
        assert!(!p.condemn("a", 3 * s, t0 + 2 * s), "not silent long enough");
        assert!(p.condemn("a", 3 * s, t0 + 4 * s));
        // The answer to the probe under way arrives late: recorded, never echoed.
        p.answered("a", t0 + 4 * s, 9);
        p.done("a");
        assert!(p.due(["a"], t0 + 5 * s).is_empty());
        p.pardon("a");
        assert_eq!(p.due(["a"], t0 + 5 * s), vec![("a".to_string(), Some(9))]);
    }

    #[test]
    fn the_probe_interval_stretches_to_the_rate_budget_up_to_a_quarter_of_failover_after() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        // 1,000 nodes at 250 ms: 4,000 probes/s, within 6,000.
        assert_eq!(probe_interval(ms(250), 1_000, 6_000, s(3)), ms(250));
        // 3,000 nodes: 500 ms keeps to 6,000 probes/s.
        assert_eq!(probe_interval(ms(250), 3_000, 6_000, s(3)), ms(500));
        // 10,000 nodes: 1.67 s would, but a lease of 1.5 s needs a probe every 750 ms
        // (13,333 probes/s); with failover_after 8 s, 1.67 s is allowed.
        assert_eq!(probe_interval(ms(250), 10_000, 6_000, s(3)), ms(750));
        let stretched = probe_interval(ms(250), 10_000, 6_000, s(8));
        assert!(
            stretched > ms(1666) && stretched < ms(1667),
            "{stretched:?}"
        );
        // Never below the configured interval, whatever the cap.
        assert_eq!(probe_interval(ms(250), 10_000, 6_000, ms(800)), ms(250));
    }

    #[test]
    fn a_ring_past_the_budget_is_told_the_failover_after_that_fits_it() {
        let s = Duration::from_secs;
        // 4,500 nodes fit 6,000 probes/s at 750 ms (failover_after 3 s); 10,000 need 6.67 s.
        assert_eq!(failover_after_within_budget(4_500, 6_000, s(3)), None);
        let needed = failover_after_within_budget(10_000, 6_000, s(3)).unwrap();
        assert!(needed > Duration::from_millis(6666) && needed < Duration::from_millis(6667));
        assert_eq!(failover_after_within_budget(10_000, 6_000, s(7)), None);
        // And at that failover_after the interval keeps to the budget.
        let interval = probe_interval(Duration::from_millis(250), 10_000, 6_000, needed);
        assert!(10_000.0 / interval.as_secs_f64() <= 6_000.5);
    }

    #[test]
    fn only_a_first_answer_of_a_live_node_is_followed_up_at_once() {
        let t0 = Instant::now();
        let mut p = Probes::new();
        assert_eq!(
            p.due(["a", "b", "c"], t0),
            vec![
                ("a".to_string(), None),
                ("b".to_string(), None),
                ("c".to_string(), None)
            ]
        );
        for (name, stamp) in [("a", 1), ("b", 2), ("c", 3)] {
            p.answered(name, t0, stamp);
        }
        // The probe echoed nothing and granted nothing: a second one at once, echoing the
        // answer's stamp.
        assert_eq!(p.follow_up("a", None, true), Some(1));
        // That second probe granted a lease: its answer waits for the next tick.
        p.answered("a", t0, 4);
        assert_eq!(p.follow_up("a", Some(1), true), None);
        // Not for a node the ring no longer has live, nor one condemned or leaving.
        assert_eq!(p.follow_up("b", None, false), None);
        assert!(p.condemn("c", Duration::ZERO, t0 + Duration::from_millis(1)));
        assert_eq!(p.follow_up("c", None, true), None);
        p.left("b", t0);
        assert_eq!(p.follow_up("b", None, true), None);
    }

    #[test]
    fn the_guard_counts_every_silent_node_not_only_those_past_the_bound() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let detector = Detector::new(ms(250), ms(3000));
        let mut p = Probes::new();
        let live = ["a", "b", "c"];
        p.due(live, t0);
        for n in live {
            p.answered(n, t0, 1);
        }
        // All three stopped within 0.2 s of each other: when the first is past the bound,
        // the others are 0.1-0.2 s short of it.
        assert_eq!(p.decide(&live, detector, t0), FailoverDecision::Nothing);
        let now = t0 + ms(3001);
        assert_eq!(
            p.decide(&live, detector, now),
            FailoverDecision::HoldOff {
                silent: vec!["a".into(), "b".into(), "c".into()]
            }
        );
        // They restart: b and c answer first. a, back too but not heard yet, gets a whole
        // `failover_after` from then before it is failed over.
        p.answered("b", now, 2);
        p.answered("c", now, 2);
        assert_eq!(
            p.decide(&live, detector, now),
            FailoverDecision::Settling {
                silent: vec!["a".into()]
            }
        );
        let later = now + ms(3000);
        p.answered("b", later, 3);
        p.answered("c", later, 3);
        // One of three dead: failed over once the majority was heard long enough.
        assert_eq!(
            p.decide(&live, detector, later),
            FailoverDecision::FailOver(vec!["a".into()])
        );
        // Two of five dead at once: both in one decision.
        let live = ["a", "b", "c", "d", "e"];
        let mut p = Probes::new();
        p.due(live, t0);
        for n in live {
            p.answered(n, t0, 1);
        }
        assert_eq!(p.decide(&live, detector, t0), FailoverDecision::Nothing);
        for n in ["c", "d", "e"] {
            p.answered(n, t0 + ms(3300), 3);
        }
        p.answered("b", t0 + ms(200), 2);
        assert_eq!(
            p.decide(&live, detector, t0 + ms(2000)),
            FailoverDecision::Nothing
        );
        assert_eq!(
            p.decide(&live, detector, t0 + ms(3300)),
            FailoverDecision::FailOver(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn silence_counts_from_the_last_answer_or_the_first_probe() {
        let t0 = Instant::now();
        let mut p = Probes::new();
        let s = Duration::from_secs(1);
        assert!(
            p.silent_for("a", t0 + 2 * s) <= s,
            "never probed: not silent"
        );
        p.probing("a", t0);
        assert!(
            p.silent_for("a", t0 + s / 2) <= s,
            "grace after the first probe"
        );
        assert!(p.silent_for("a", t0 + 2 * s) > s);
        p.answered("a", t0 + 2 * s, 7);
        assert_eq!(p.echo("a"), Some(7));
        p.probing("a", t0 + 3 * s);
        assert!(p.silent_for("a", t0 + 2 * s + s / 2) <= s);
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
        assert!(p.silent_for("a", t0 + 4 * s) > s && p.silent_for("b", t0 + 4 * s) > s);
        p.retain(["b"]);
        assert_eq!(p.silent_for("a", t0 + 9 * s), Duration::ZERO);
    }

    #[test]
    fn a_node_leaving_on_purpose_is_failed_over_at_once_unless_half_leave() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let detector = Detector::new(s / 4, 3 * s);
        let live = ["a", "b", "c", "d", "e"];
        let mut p = Probes::new();
        let answer_all = |p: &mut Probes, at: Instant| {
            for name in live {
                p.due([name], at);
                p.answered(name, at, 1);
                p.done(name);
            }
        };
        // Healthy for long enough that nothing is settling.
        answer_all(&mut p, t0);
        p.observe(&live, detector, t0);
        answer_all(&mut p, t0 + 4 * s);
        let left = t0 + 4 * s + s / 10;
        p.left("b", left);
        assert!(p.is_leaving("b"));
        for name in ["a", "c", "d", "e"] {
            p.answered(name, left + s, 2);
        }
        assert_eq!(
            p.decide(&live, detector, left + s),
            FailoverDecision::Nothing,
            "others of a planned restart may still be stopping"
        );
        let now = left + detector.leave_after();
        for name in ["a", "c", "d", "e"] {
            p.answered(name, now, 3);
        }
        assert_eq!(
            p.decide(&live, detector, now),
            FailoverDecision::FailOver(vec!["b".into()]),
            "without waiting out failover_after"
        );
        assert!(
            p.condemn("b", detector.failover_after, now),
            "its lease is given up"
        );
        // A restarted process answering before any decision is no longer leaving.
        let mut q = Probes::new();
        answer_all(&mut q, t0);
        q.observe(&live, detector, t0);
        q.left("c", t0 + s / 2);
        q.answered("c", t0 + s, 2);
        assert!(!q.is_leaving("c"));
        assert!(!q.condemn("c", detector.failover_after, t0 + s));
        // Three of five stopping on purpose (a planned full restart): none is failed over.
        for name in ["a", "c", "d"] {
            p.left(name, now);
        }
        assert!(matches!(
            p.decide(&live, detector, now),
            FailoverDecision::HoldOff { .. }
        ));
    }
}
