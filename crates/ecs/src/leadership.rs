//! The leader's "may I act" gate (ARCHITECTURE.md §12), as a synchronous state machine:
//! time comes in as `Instant`s, the tokio code in `service` runs the confirmation rounds.
//!
//! A member acts (answers operators, leases and fails over nodes, starts changes) only while
//! it leads in a term a majority confirmed, and only for [`LeadGate::act_for`] after the
//! **start** of the round of heartbeats that confirmed it. A follower that heard that round
//! waits `election_timeout_max` after hearing it before it votes for anyone else, and it
//! heard it after the round started; so with `act_for < election_timeout_max` no other
//! member can have been elected while this one acts. `act_for` is derived from the Raft
//! configuration ([`act_for`]), never set apart from it: `election_timeout_max` less one
//! heartbeat, which also absorbs clocks that run up to `election_timeout_max / act_for`
//! times each other's rate (1.2 with the defaults).

use std::time::{Duration, Instant};

/// How long a confirmation lets a leader act, from the Raft timings: the longest election
/// timeout less one heartbeat. `None` if that leaves nothing (a heartbeat not below the
/// longest election timeout: refused by the configuration already).
pub fn act_for(heartbeat: Duration, election_timeout_max: Duration) -> Option<Duration> {
    election_timeout_max
        .checked_sub(heartbeat)
        .filter(|d| !d.is_zero())
}

/// Whether, and in which term, this member may act.
///
/// Invariant: `may_act(now)` only if a majority confirmed `term` in a round that started
/// less than `act_for` before `now`, and the member has not learnt of its deposition since.
#[derive(Debug, Clone)]
pub struct LeadGate {
    act_for: Duration,
    /// The term this member leads in (0: it does not lead).
    term: u64,
    /// The start of the latest round of heartbeats a majority confirmed for `term`.
    confirmed: Option<Instant>,
}

impl LeadGate {
    /// A gate that lets a confirmation count for `act_for`; not leading.
    pub fn new(act_for: Duration) -> Self {
        Self {
            act_for,
            term: 0,
            confirmed: None,
        }
    }

    /// How long a confirmation counts.
    pub fn act_for(&self) -> Duration {
        self.act_for
    }

    /// The member took the lead in `term`, confirmed by a round that started at `round`.
    pub fn take(&mut self, term: u64, round: Instant) {
        self.term = term;
        self.confirmed = Some(round);
    }

    /// A round that started at `round` confirmed the lead in `term`. A confirmation of
    /// another term than the one this member took the lead in does not count (it leads
    /// afresh, and must take the lead again: `false`); an earlier round's confirmation
    /// arriving late never moves the gate back.
    pub fn confirmed(&mut self, term: u64, round: Instant) -> bool {
        if term != self.term || self.term == 0 {
            return false;
        }
        if self.confirmed.is_none_or(|at| at < round) {
            self.confirmed = Some(round);
        }
        true
    }

    /// The member learnt it does not lead (a newer term, or Raft says so).
    pub fn depose(&mut self) {
        self.term = 0;
        self.confirmed = None;
    }

    /// The term this member leads in (0: none).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether the member may act at `now`.
    pub fn may_act(&self, now: Instant) -> bool {
        self.term != 0
            && self
                .confirmed
                .is_some_and(|at| now.saturating_duration_since(at) < self.act_for)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::RaftConfig;

    #[test]
    fn act_for_is_below_the_followers_lease_by_construction() {
        let config = RaftConfig::new(1, Default::default(), "/nonexistent");
        let act = act_for(config.heartbeat, config.election_timeout_max).unwrap();
        assert!(act < config.election_timeout_max);
        assert!(act >= config.election_timeout_min, "{act:?}");
        assert_eq!(
            act_for(Duration::from_millis(600), Duration::from_millis(600)),
            None
        );
    }

    #[test]
    fn the_gate_counts_from_the_start_of_the_round() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut gate = LeadGate::new(ms(500));
        assert!(!gate.may_act(t0));
        // A round started at t0 and took 300 ms: the gate closes at t0 + 500, not t0 + 800.
        gate.take(4, t0);
        assert!(gate.may_act(t0 + ms(300)));
        assert!(!gate.may_act(t0 + ms(500)));
        // Renewed by a later round; a late answer to an earlier one does not move it back.
        assert!(gate.confirmed(4, t0 + ms(400)));
        assert!(gate.confirmed(4, t0 + ms(100)));
        assert!(gate.may_act(t0 + ms(899)) && !gate.may_act(t0 + ms(900)));
        // Another term must be taken afresh.
        assert!(!gate.confirmed(5, t0 + ms(950)));
        assert!(!gate.may_act(t0 + ms(950)));
        gate.depose();
        assert!(!gate.confirmed(4, t0 + ms(1000)) && gate.term() == 0);
        assert!(!gate.may_act(t0 + ms(1000)));
    }
}
