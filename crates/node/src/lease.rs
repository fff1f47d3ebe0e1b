//! The node's lease from the ECS (ARCHITECTURE.md §11, "Leases" and "Clock model"), as a
//! synchronous state machine: time comes in as [`Clocks`] readings, nothing here reads a
//! clock, so the simulation (`tests/cluster_sim.rs`) drives the same code with paused and
//! drifting clocks.
//!
//! The protocol: every probe of the ECS carries `Lease { millis, echo }`; the node answers
//! `Leased { stamp }` with a new [`Lease::stamp`]; the ECS echoes the stamp of the last
//! answer it *received* in its next probe; the node may then serve until `echo + millis`.
//! The echo is a moment before an answer the ECS received, so the lease has ended by
//! `last answer + millis` however late the probe carrying it arrives.
//!
//! **Clock model.** The lease is measured on a *lease clock* made of the node's two clocks:
//! at every reading it advances by the larger of what the monotonic clock and the wall clock
//! advanced since the previous reading, and never goes back.
//! - the monotonic clock (`CLOCK_MONOTONIC`): never steps, keeps running while the process
//!   is stopped (SIGSTOP, a long scheduling delay), but may stop while the whole machine is
//!   paused (a VM paused or suspended: the guest's monotonic time does not see it);
//! - the wall clock (`CLOCK_REALTIME`): corrected from outside (NTP, the hypervisor's clock
//!   sync) after such a pause, so it jumps forward by the pause, and the lease clock with it.
//!   A forward step for any other reason only ends the lease early (the node answers
//!   `Stopped` until the next probe, a quarter of a second later); a backward step counts as
//!   nothing, and the monotonic clock goes on advancing the lease clock.
//!
//! Both clocks are assumed to run at least half as fast as real time between such events
//! (the ECS waits twice the lease before it fails a node over, ARCHITECTURE.md §11). Not
//! covered, as no local means can tell: a pause that stops both clocks and is never
//! corrected from outside, or whose correction a step of the wall clock back cancels within
//! one reading (the node reads its clocks at every request, every probe and every gossip
//! tick, 200 ms).
//!
//! Stamps are remembered (the last [`REMEMBERED_STAMPS`]) with the lease clock's reading
//! taken with them: an echo that is not one of them (a stamp of an earlier process of this
//! node, one evicted long ago, or a forgery) grants nothing.

use std::collections::VecDeque;
use std::time::Duration;

/// How many recent stamps a node remembers. The ECS has at most one probe of a node under
/// way and echoes the stamp of the last answer it received, so the echo is almost always
/// the newest stamp; the rest cover probes of a deposed leader still in flight.
pub const REMEMBERED_STAMPS: usize = 16;

/// Readings of the node's two clocks at one moment, each since an origin fixed for the
/// process (the wall clock: since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clocks {
    /// The monotonic clock.
    pub mono: Duration,
    /// The wall clock.
    pub wall: Duration,
}

/// A node's lease: granted by the ECS's probes, checked before serving.
///
/// Invariant: the lease never extends past `echo + millis` of the lease clock, where `echo`
/// is a stamp this process issued and remembers, and the lease clock advances at least as
/// fast as each of the node's clocks.
#[derive(Debug, Default, Clone)]
pub struct Lease {
    /// Recent stamps (monotonic microseconds) with the lease clock's reading at each,
    /// oldest first.
    stamps: VecDeque<(u64, Duration)>,
    /// The end of the lease on the lease clock (`None`: never granted).
    until: Option<Duration>,
    /// The lease clock, and the clock readings it last advanced from.
    clock: Duration,
    last: Option<Clocks>,
    /// Given up for good ([`Lease::retire`]): no probe grants it again.
    retired: bool,
    /// The length of the last grant.
    granted: Option<Duration>,
}

impl Lease {
    /// No lease granted, no stamp issued.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new stamp for an answer to a probe, taken at `now` (before the answer is sent).
    pub fn stamp(&mut self, now: Clocks) -> u64 {
        let clock = self.advance(now);
        let stamp = now.mono.as_micros() as u64;
        if self.stamps.back().is_none_or(|(last, _)| *last < stamp) {
            if self.stamps.len() == REMEMBERED_STAMPS {
                self.stamps.pop_front();
            }
            self.stamps.push_back((stamp, clock));
        }
        stamp
    }

    /// The lease clock at `now`, without moving it.
    fn clock_at(&self, now: Clocks) -> Duration {
        match self.last {
            None => self.clock,
            Some(last) => {
                let mono = now.mono.saturating_sub(last.mono);
                let wall = now.wall.saturating_sub(last.wall);
                self.clock + mono.max(wall)
            }
        }
    }

    /// Moves the lease clock to `now` and reads it.
    fn advance(&mut self, now: Clocks) -> Duration {
        self.clock = self.clock_at(now);
        self.last = Some(now);
        self.clock
    }

    /// A probe granted `millis` from `echo`: the lease is extended to `echo + millis` of the
    /// lease clock (never shortened). An echo this process does not remember grants nothing.
    /// Returns whether the lease was extended.
    pub fn grant(&mut self, echo: Option<u64>, millis: u32) -> bool {
        let Some(echo) = echo.filter(|_| !self.retired) else {
            return false;
        };
        let Some(&(_, clock)) = self.stamps.iter().find(|(stamp, _)| *stamp == echo) else {
            return false;
        };
        self.granted = Some(Duration::from_millis(millis.into()));
        let until = clock + Duration::from_millis(millis.into());
        match &mut self.until {
            Some(held) if *held >= until => false,
            held => {
                *held = Some(until);
                true
            }
        }
    }

    /// Whether the lease holds at `now` (the lease clock before its end), moving the lease
    /// clock to `now`.
    pub fn holds(&mut self, now: Clocks) -> bool {
        self.advance(now);
        self.peek(now)
    }

    /// Whether the lease holds at `now` without moving the lease clock (for observers that
    /// are not the node: the simulation's checker).
    pub fn peek(&self, now: Clocks) -> bool {
        self.until.is_some_and(|until| self.clock_at(now) < until)
    }

    /// Whether a lease that does not hold at `now` may still be renewed before the ECS can
    /// have failed this node over: it was granted, not given up, and has been over for less
    /// than one more lease length. The ECS fails a node over only after hearing nothing
    /// from it for twice the lease (`failover_after`), counted from an answer no earlier
    /// than the stamp the lease counts from; a lapse shorter than that is an ECS leader
    /// that took over (its first grant needs two probes) or a late probe, and a chain write
    /// the node is carrying may wait for the renewal rather than give up. Past it, waiting
    /// is pointless: the node is surely failed over or about to be. Does not move the lease
    /// clock.
    pub fn may_return(&self, now: Clocks) -> bool {
        match (self.until, self.granted) {
            (Some(until), Some(length)) if !self.retired => self.clock_at(now) < until + length,
            _ => false,
        }
    }

    /// Gives the lease up for good (a node stopping on purpose, before it tells the ECS so):
    /// it holds no more, and no probe grants it again.
    pub fn retire(&mut self) {
        self.retired = true;
        self.until = None;
    }

    /// Whether the lease was given up ([`Lease::retire`]).
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// The end of the lease on the lease clock, if one was granted.
    pub fn until(&self) -> Option<Duration> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(mono_ms: u64, wall_ms: i64) -> Clocks {
        Clocks {
            mono: Duration::from_millis(mono_ms),
            wall: Duration::from_millis((1_000_000 + wall_ms) as u64),
        }
    }

    #[test]
    fn a_retired_lease_holds_no_more_and_is_never_granted_again() {
        let mut lease = Lease::new();
        let stamp = lease.stamp(at(0, 0));
        assert!(lease.grant(Some(stamp), 1000));
        assert!(lease.holds(at(100, 100)));
        let later = lease.stamp(at(100, 100));
        lease.retire();
        assert!(!lease.holds(at(101, 101)));
        assert!(
            !lease.grant(Some(later), 1000),
            "a probe after the retirement"
        );
        assert!(!lease.holds(at(102, 102)));
        assert!(lease.is_retired());
    }

    #[test]
    fn a_lapsed_lease_may_return_for_one_more_lease_length_unless_retired() {
        let mut lease = Lease::new();
        assert!(!lease.may_return(at(0, 0)), "never granted");
        let stamp = lease.stamp(at(0, 0));
        assert!(lease.grant(Some(stamp), 1000));
        assert!(!lease.holds(at(1000, 1000)));
        assert!(lease.may_return(at(1000, 1000)));
        assert!(lease.may_return(at(1999, 1999)));
        assert!(
            !lease.may_return(at(2000, 2000)),
            "the ECS may fail it over now"
        );
        // A wall clock that jumped forward (a paused machine) ends the wait with the lease.
        assert!(!lease.may_return(at(1500, 3000)));
        let mut retired = Lease::new();
        let stamp = retired.stamp(at(0, 0));
        assert!(retired.grant(Some(stamp), 1000));
        retired.retire();
        assert!(
            !retired.may_return(at(1200, 1200)),
            "a node stopping on purpose"
        );
    }

    #[test]
    fn a_lease_runs_from_the_echoed_stamp() {
        let mut lease = Lease::new();
        assert!(!lease.holds(at(0, 0)), "nothing before a grant");
        let s = lease.stamp(at(100, 100));
        assert!(!lease.grant(None, 1500));
        assert!(lease.grant(Some(s), 1500));
        assert!(lease.holds(at(150, 150)));
        // A later stamp extends it; a grant from an older one does not shorten it.
        let s2 = lease.stamp(at(200, 200));
        assert!(lease.grant(Some(s2), 1500));
        assert!(!lease.grant(Some(s), 1500));
        assert_eq!(lease.until(), Some(Duration::from_millis(1700)));
        assert!(lease.holds(at(1699, 1699)));
        assert!(!lease.holds(at(1700, 1700)), "ends at echo + millis");
    }

    #[test]
    fn an_echo_the_node_never_issued_grants_nothing() {
        let mut lease = Lease::new();
        let s = lease.stamp(at(100, 100));
        assert!(!lease.grant(Some(s + 1), 1500), "not a stamp of ours");
        assert!(
            !lease.grant(Some(50), 1500),
            "an earlier process's stamp, below ours"
        );
        for i in 0..REMEMBERED_STAMPS as u64 {
            lease.stamp(at(200 + i, 200 + i as i64));
        }
        assert!(!lease.grant(Some(s), 1500), "evicted long ago");
        assert!(!lease.holds(at(150, 150)));
    }

    #[test]
    fn a_paused_monotonic_clock_is_caught_by_the_wall_clock() {
        let mut lease = Lease::new();
        let s = lease.stamp(at(100, 100));
        lease.grant(Some(s), 1500);
        // The machine was paused for 10 s: the monotonic clock did not see it, the wall
        // clock was corrected on resume.
        assert!(!lease.holds(at(300, 10_300)));
        // A wall clock stepped back afterwards does not revive it.
        assert!(!lease.holds(at(300, 0)));
        // A step back alone counts as nothing: the monotonic clock still bounds the lease.
        let mut lease = Lease::new();
        let s = lease.stamp(at(100, 100));
        lease.grant(Some(s), 1500);
        assert!(lease.holds(at(300, -5_000)));
        assert!(!lease.holds(at(1600, -5_000)));
        // A step back, then a pause whose correction the step's deficit would have hidden
        // from a reading of the highest wall time seen: the lease clock still jumps.
        let mut lease = Lease::new();
        let s = lease.stamp(at(100, 100));
        lease.grant(Some(s), 1500);
        assert!(lease.holds(at(200, -4_800)), "stepped back 4.9 s");
        assert!(lease.holds(at(400, -4_600)));
        // Paused 3.5 s: the monotonic clock stood still, the wall clock was corrected.
        assert!(!lease.holds(at(400, -1_100)));
    }
}
