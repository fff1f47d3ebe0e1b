//! A node's part in range moves, as one synchronous state machine (ARCHITECTURE.md §5).
//!
//! Every request of a move names its [`MoveId`]: a per-attempt `change` number and the
//! metadata version the move commits. The node keeps:
//! - as a **sender**, the write locks of moves it is handing a range over for. A lock is
//!   durable ([`MoveState::persisted`] is stored before `LockRange` is acknowledged, and
//!   restored by [`MoveState::restore`]), and it is released in exactly two ways: the node
//!   adopts the move's target version (the range is no longer its own, so it could not accept
//!   writes there anyway), or `AbortMove` for the same id arrives while the node is still
//!   below the target version. There is no other unlock.
//! - as a sender, the **tracking** of the keys written into a moving range since the current
//!   round of the copy began (volatile: a restarted sender has lost it, so the next delta
//!   round fails and the change rolls back). Bounded by [`MAX_TRACKED_KEYS`]: past it the set
//!   is dropped and the next round sends the whole range again.
//! - as a **receiver**, the moves it was prepared for; batches of any other move (one that
//!   was aborted, or an older attempt) are refused (volatile: a restarted receiver refuses
//!   further batches and the change rolls back).
//! - the moves it was told to **abort** (the last [`REMEMBERED_ABORTS`]): a `LockRange`,
//!   `TransferRange` or `PrepareReceive` of one of them that arrives after its abort (the
//!   request was delayed, e.g. the node was stopped with it in its socket buffer, while the
//!   ECS timed out and rolled back) is refused, so it cannot take a lock nothing would
//!   release. Volatile, and that is enough: a request is carried by a stream of this process,
//!   so one that arrives after a restart was sent after it.
//!
//! The tokio side ([`crate::Node`]) runs every transition under its write gate, so none of
//! them races a write in flight; this type only decides.

use std::collections::{HashSet, VecDeque};

use ringkv_wire::{HashedKey, KeyRange, MoveId, Position};
use serde::{Deserialize, Serialize};

/// Most keys tracked per moving range; beyond it the next round resends the whole range.
pub const MAX_TRACKED_KEYS: usize = 200_000;

/// How many aborted moves a node remembers to refuse their late requests.
pub const REMEMBERED_ABORTS: usize = 64;

/// A durable write lock of a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendLock {
    /// The move.
    pub id: MoveId,
    /// The range being handed over.
    pub range: KeyRange,
}

/// What the next round of a copy sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// The keys written since the previous round began (their current values are sent).
    Keys(HashSet<Vec<u8>>),
    /// Too many keys were written to track them: send the whole range again.
    Rescan,
}

/// Why a move transition was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    /// The node already holds the move's target version: the move is done here.
    #[error("move {change} is already committed here (metadata v{version} >= v{target})")]
    Committed {
        /// The move's change number.
        change: u64,
        /// Its target version.
        target: u64,
        /// The node's version.
        version: u64,
    },
    /// The last round of a move needs its range locked by the move.
    #[error("the last round of move {0} needs its range write-locked by it")]
    NotLocked(u64),
    /// No copy of this move is being tracked here (never started, or lost in a restart).
    #[error("no copy of move {0} is being tracked here (not started, or lost in a restart)")]
    NotTracking(u64),
    /// The move was aborted here before this request of it arrived (it was delayed): it
    /// must not start again.
    #[error("move {0} was aborted here before this request arrived")]
    Aborted(u64),
}

/// Tracking of one copy of a moving range (one per receiver: a change may copy one range
/// from this node to two receivers, and each copy has its own rounds).
#[derive(Debug)]
struct Tracking {
    id: MoveId,
    range: KeyRange,
    to: String,
    keys: HashSet<Vec<u8>>,
    overflowed: bool,
}

/// A node's move state. See the module docs.
#[derive(Debug, Default)]
pub struct MoveState {
    locks: Vec<SendLock>,
    tracking: Vec<Tracking>,
    receiving: Vec<Receiving>,
    /// The last moves aborted here, oldest first.
    aborted: VecDeque<MoveId>,
}

/// A move this node was prepared to receive: batches of `id` from `from`, for keys of `range`.
#[derive(Debug)]
struct Receiving {
    id: MoveId,
    range: KeyRange,
    from: String,
}

/// Why a `PutBatch` was refused ([`MoveState::check_batch`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchRefused {
    /// The node is not receiving this move.
    #[error("not receiving move {0} (never prepared, aborted, superseded or done)")]
    NotReceiving(u64),
    /// The caller is not the sender the ECS announced.
    #[error("move {change} is sent by {expected:?}, not {caller:?}")]
    WrongSender {
        /// The move's change.
        change: u64,
        /// The announced sender.
        expected: String,
        /// The caller's certificate name.
        caller: String,
    },
    /// A key of the batch is outside the announced range.
    #[error("key outside the range of move {0}")]
    OutOfRange(u64),
}

impl MoveState {
    /// The state of a node (re)starting at metadata `version` with the locks it persisted:
    /// locks of moves it has since adopted are dropped.
    pub fn restore(locks: Vec<SendLock>, version: u64) -> Self {
        let mut state = Self {
            locks,
            ..Self::default()
        };
        state.adopt(version);
        state
    }

    /// What must be persisted (after every transition that returns `true`).
    pub fn persisted(&self) -> &[SendLock] {
        &self.locks
    }

    /// The locked ranges.
    pub fn locked_ranges(&self) -> Vec<KeyRange> {
        self.locks.iter().map(|l| l.range).collect()
    }

    /// Whether a write at `pos` must answer `WriteLocked`.
    pub fn is_locked(&self, pos: &Position) -> bool {
        self.locks.iter().any(|l| l.range.contains(pos))
    }

    /// Whether `range` is locked by move `id`.
    pub fn holds_lock(&self, id: MoveId, range: &KeyRange) -> bool {
        self.locks.iter().any(|l| l.id == id && l.range == *range)
    }

    /// `LockRange`: locks `range` for move `id`. Returns whether the persisted state changed.
    pub fn lock(&mut self, id: MoveId, range: KeyRange, version: u64) -> Result<bool, MoveError> {
        committed(id, version)?;
        self.not_aborted(id)?;
        if self.holds_lock(id, &range) {
            return Ok(false);
        }
        self.locks.push(SendLock { id, range });
        Ok(true)
    }

    /// `AbortMove`: as a sender, releases the lock and the tracking of move `id`; as a
    /// receiver, stops accepting its batches. Refused once the node holds the target
    /// version. Returns `(unlocked, was_receiving)`: whether the persisted state changed,
    /// and whether the node was receiving the move (its partial copy must then be deleted).
    pub fn abort(&mut self, id: MoveId, version: u64) -> Result<(bool, bool), MoveError> {
        committed(id, version)?;
        if !self.aborted.contains(&id) {
            if self.aborted.len() == REMEMBERED_ABORTS {
                self.aborted.pop_front();
            }
            self.aborted.push_back(id);
        }
        let before = self.locks.len();
        self.locks.retain(|l| l.id != id);
        self.tracking.retain(|t| t.id != id);
        let receiving = self.receiving.len();
        self.receiving.retain(|r| r.id != id);
        Ok((
            self.locks.len() != before,
            self.receiving.len() != receiving,
        ))
    }

    /// The node adopted metadata `version`: every move it commits is over here. Returns
    /// whether the persisted state changed.
    pub fn adopt(&mut self, version: u64) -> bool {
        let before = self.locks.len();
        self.locks.retain(|l| l.id.target_version > version);
        self.tracking.retain(|t| t.id.target_version > version);
        self.receiving.retain(|r| r.id.target_version > version);
        self.locks.len() != before
    }

    /// `TransferRange`: from now on, remembers the keys written into `range` for the copy to
    /// the node `to` (replacing any earlier tracking of the same copy).
    pub fn start_tracking(
        &mut self,
        id: MoveId,
        range: KeyRange,
        to: &str,
        version: u64,
    ) -> Result<(), MoveError> {
        committed(id, version)?;
        self.not_aborted(id)?;
        self.tracking.retain(|t| !(t.range == range && t.to == to));
        self.tracking.push(Tracking {
            id,
            range,
            to: to.to_owned(),
            keys: HashSet::new(),
            overflowed: false,
        });
        Ok(())
    }

    /// Records a write of `key` (called by every write before it commits).
    pub fn track(&mut self, key: &HashedKey<'_>) {
        for t in &mut self.tracking {
            if t.overflowed || !t.range.contains(&key.position) {
                continue;
            }
            if t.keys.len() >= MAX_TRACKED_KEYS && !t.keys.contains(key.key) {
                t.overflowed = true;
                t.keys = HashSet::new();
            } else {
                t.keys.insert(key.key.to_vec());
            }
        }
    }

    /// `TransferDelta`: what this round of the copy to `to` sends, starting its next round's
    /// tracking. The last
    /// round needs `range` locked by the move (so its set is final) and ends the tracking.
    pub fn next_round(
        &mut self,
        id: MoveId,
        range: &KeyRange,
        to: &str,
        last: bool,
    ) -> Result<Round, MoveError> {
        if last && !self.holds_lock(id, range) {
            return Err(MoveError::NotLocked(id.change));
        }
        let idx = self
            .tracking
            .iter()
            .position(|t| t.id == id && t.range == *range && t.to == to)
            .ok_or(MoveError::NotTracking(id.change))?;
        let t = &mut self.tracking[idx];
        let round = if t.overflowed {
            Round::Rescan
        } else {
            Round::Keys(std::mem::take(&mut t.keys))
        };
        t.overflowed = false;
        if last {
            self.tracking.swap_remove(idx);
        }
        Ok(round)
    }

    /// `PrepareReceive`: batches of move `id` are accepted from now on.
    pub fn prepare_receive(
        &mut self,
        id: MoveId,
        range: KeyRange,
        from: &str,
        version: u64,
    ) -> Result<(), MoveError> {
        committed(id, version)?;
        self.not_aborted(id)?;
        self.receiving.retain(|r| r.range != range);
        self.receiving.push(Receiving {
            id,
            range,
            from: from.to_owned(),
        });
        Ok(())
    }

    /// Whether a `PutBatch` of move `id` with keys at `positions`, sent by the peer whose
    /// certificate is called `caller`, is accepted: only within a move the ECS announced to
    /// this node, from the sender it named, for keys of the range it named.
    pub fn check_batch<'a>(
        &self,
        id: MoveId,
        caller: &str,
        mut positions: impl Iterator<Item = &'a Position>,
    ) -> Result<(), BatchRefused> {
        // One change may copy several ranges here, from several senders: the batch must
        // fit one of them entirely.
        let mut of_move = self.receiving.iter().filter(|r| r.id == id).peekable();
        let first = of_move
            .peek()
            .map(|r| r.from.clone())
            .ok_or(BatchRefused::NotReceiving(id.change))?;
        let from_caller: Vec<&Receiving> = of_move.filter(|r| r.from == caller).collect();
        if from_caller.is_empty() {
            return Err(BatchRefused::WrongSender {
                change: id.change,
                expected: first,
                caller: caller.to_owned(),
            });
        }
        let positions: Vec<&Position> = positions.by_ref().collect();
        if from_caller
            .iter()
            .any(|r| positions.iter().all(|p| r.range.contains(p)))
        {
            Ok(())
        } else {
            Err(BatchRefused::OutOfRange(id.change))
        }
    }
}

impl MoveState {
    /// `Err(Aborted)` if move `id` was aborted here.
    fn not_aborted(&self, id: MoveId) -> Result<(), MoveError> {
        if self.aborted.contains(&id) {
            return Err(MoveError::Aborted(id.change));
        }
        Ok(())
    }
}

fn committed(id: MoveId, version: u64) -> Result<(), MoveError> {
    if version >= id.target_version {
        return Err(MoveError::Committed {
            change: id.change,
            target: id.target_version,
            version,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(change: u64, target: u64) -> MoveId {
        MoveId {
            change,
            target_version: target,
        }
    }

    #[test]
    fn a_request_delayed_past_its_abort_starts_nothing() {
        let mut m = MoveState::default();
        let (a, range) = (id(7, 5), half());
        // The abort arrived first (nothing to release yet) ...
        assert_eq!(m.abort(a, 4).unwrap(), (false, false));
        // ... then the delayed lock, tracking and preparation of the same move.
        assert!(matches!(m.lock(a, range, 4), Err(MoveError::Aborted(7))));
        assert!(matches!(
            m.start_tracking(a, range, "r", 4),
            Err(MoveError::Aborted(7))
        ));
        assert!(matches!(
            m.prepare_receive(a, range, "n1", 4),
            Err(MoveError::Aborted(7))
        ));
        assert!(m.locked_ranges().is_empty());
        // The next attempt (another change number) goes on.
        assert!(m.lock(id(8, 5), range, 4).unwrap());
        // Only the last REMEMBERED_ABORTS are remembered.
        for c in 100..100 + REMEMBERED_ABORTS as u64 {
            m.abort(id(c, 5), 4).unwrap();
        }
        assert!(m.lock(a, range, 4).is_ok());
    }

    fn half() -> KeyRange {
        let mut mid = [0xffu8; 20];
        mid[0] = 0x7f;
        KeyRange::new(Position::MAX, Position(mid))
    }

    fn key_in(range: &KeyRange, inside: bool) -> Vec<u8> {
        (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| range.contains(&HashedKey::new(k).position) == inside)
            .unwrap()
    }

    #[test]
    fn a_lock_ends_only_by_adopting_the_target_or_by_its_own_abort() {
        let mut m = MoveState::default();
        let (a, b) = (id(1, 5), id(2, 5));
        assert_eq!(m.lock(a, half(), 4), Ok(true));
        assert_eq!(m.lock(a, half(), 4), Ok(false), "idempotent");
        let inside = key_in(&half(), true);
        assert!(m.is_locked(&HashedKey::new(&inside).position));
        assert!(!m.is_locked(&HashedKey::new(&key_in(&half(), false)).position));
        // Another move's abort does not release it.
        assert_eq!(m.abort(b, 4), Ok((false, false)));
        assert!(m.holds_lock(a, &half()));
        // A restart keeps it.
        let mut m = MoveState::restore(m.persisted().to_vec(), 4);
        assert!(m.holds_lock(a, &half()));
        // Adopting an older version does not; the target does.
        assert!(!m.adopt(4));
        assert!(m.adopt(5));
        assert!(m.locked_ranges().is_empty());
        // Past the target, neither lock nor abort applies.
        assert!(matches!(
            m.lock(a, half(), 5),
            Err(MoveError::Committed { .. })
        ));
        assert!(matches!(m.abort(a, 6), Err(MoveError::Committed { .. })));
        // A restart at the target drops the persisted lock too.
        let mut m2 = MoveState::default();
        m2.lock(a, half(), 4).unwrap();
        assert!(MoveState::restore(m2.persisted().to_vec(), 5)
            .locked_ranges()
            .is_empty());
        // Abort with the right id releases it below the target.
        assert_eq!(m2.abort(a, 4), Ok((true, false)));
        assert!(m2.locked_ranges().is_empty());
    }

    #[test]
    fn rounds_hand_out_the_keys_written_since_the_last_round() {
        let mut m = MoveState::default();
        let a = id(1, 5);
        assert_eq!(
            m.next_round(a, &half(), "r", false),
            Err(MoveError::NotTracking(1))
        );
        m.start_tracking(a, half(), "r", 4).unwrap();
        let (k1, k2, out) = (
            key_in(&half(), true),
            b"zz-other".to_vec(),
            key_in(&half(), false),
        );
        m.track(&HashedKey::new(&k1));
        m.track(&HashedKey::new(&out));
        let Round::Keys(first) = m.next_round(a, &half(), "r", false).unwrap() else {
            panic!("keys expected")
        };
        assert_eq!(first, HashSet::from([k1.clone()]));
        m.track(&HashedKey::new(&k1));
        if half().contains(&HashedKey::new(&k2).position) {
            m.track(&HashedKey::new(&k2));
        }
        assert_eq!(
            m.next_round(a, &half(), "r", true),
            Err(MoveError::NotLocked(1)),
            "the last round needs the lock"
        );
        m.lock(a, half(), 4).unwrap();
        let Round::Keys(second) = m.next_round(a, &half(), "r", true).unwrap() else {
            panic!("keys expected")
        };
        assert!(second.contains(&k1));
        assert_eq!(
            m.next_round(a, &half(), "r", true),
            Err(MoveError::NotTracking(1)),
            "ended"
        );
    }

    /// A change may copy one range from this node to two receivers (zones make it so): each
    /// copy has its own rounds. (Tracking was once kept per range: the second copy's
    /// `TransferRange` replaced the first's tracking, and the first receiver's rounds missed
    /// what was written before it, or handed the second's keys to it.)
    #[test]
    fn two_copies_of_one_range_keep_their_own_rounds() {
        let mut m = MoveState::default();
        let a = id(1, 5);
        let (k1, k2) = (key_in(&half(), true), {
            let mut k = key_in(&half(), true);
            while k == key_in(&half(), true) || !half().contains(&HashedKey::new(&k).position) {
                k.push(b'x');
            }
            k
        });
        m.start_tracking(a, half(), "r1", 4).unwrap();
        m.track(&HashedKey::new(&k1)); // written during the first copy's snapshot only
        m.start_tracking(a, half(), "r2", 4).unwrap();
        m.track(&HashedKey::new(&k2));
        let round = |m: &mut MoveState, to| match m.next_round(a, &half(), to, false).unwrap() {
            Round::Keys(keys) => keys,
            Round::Rescan => panic!("keys expected"),
        };
        assert_eq!(round(&mut m, "r1"), HashSet::from([k1.clone(), k2.clone()]));
        assert_eq!(round(&mut m, "r2"), HashSet::from([k2.clone()]));
        assert_eq!(
            m.next_round(a, &half(), "r3", false),
            Err(MoveError::NotTracking(1))
        );
    }

    #[test]
    fn too_many_keys_fall_back_to_a_rescan_and_free_the_memory() {
        let mut m = MoveState::default();
        let a = id(1, 5);
        let all = KeyRange::new(Position::MAX, Position::MAX);
        m.start_tracking(a, all, "r", 4).unwrap();
        for i in 0..=MAX_TRACKED_KEYS {
            m.track(&HashedKey::new(format!("k{i}").as_bytes()));
        }
        assert_eq!(m.tracking[0].keys.len(), 0, "dropped on overflow");
        assert_eq!(m.next_round(a, &all, "r", false), Ok(Round::Rescan));
        m.track(&HashedKey::new(b"after"));
        m.lock(a, all, 4).unwrap();
        assert_eq!(
            m.next_round(a, &all, "r", true),
            Ok(Round::Keys(HashSet::from([b"after".to_vec()])))
        );
    }

    #[test]
    fn a_receiver_takes_batches_of_the_prepared_move_only() {
        let mut m = MoveState::default();
        let (old, new) = (id(1, 5), id(2, 5));
        let inside = half().end;
        let accepts = |m: &MoveState, id| m.check_batch(id, "s", [&inside].into_iter()).is_ok();
        assert!(!accepts(&m, old));
        m.prepare_receive(old, half(), "s", 4).unwrap();
        assert!(accepts(&m, old));
        assert_eq!(m.abort(old, 4), Ok((false, true)));
        assert!(!accepts(&m, old), "aborted");
        m.prepare_receive(new, half(), "s", 4).unwrap();
        assert!(accepts(&m, new) && !accepts(&m, old), "superseded");

        // Only from the announced sender, only keys of the announced range.
        assert_eq!(
            m.check_batch(new, "mallory", [&inside].into_iter()),
            Err(BatchRefused::WrongSender {
                change: 2,
                expected: "s".into(),
                caller: "mallory".into()
            })
        );
        let outside = half().start;
        assert!(!half().contains(&outside));
        assert_eq!(
            m.check_batch(new, "s", [&inside, &outside].into_iter()),
            Err(BatchRefused::OutOfRange(2))
        );

        m.adopt(5);
        assert!(!accepts(&m, new), "done");
    }
}
