//! What a key holds, and how a write changes it (ARCHITECTURE.md §8 "Records", §11
//! "Versions and conditional writes").
//!
//! A key's stored value is a [`Record`]: the value, the key's **version** and its expiry.
//! The head of the key's chain decides every write: [`decide`] is a pure function of the
//! write asked for, the record the head holds and the head's [`Versions`] clock, with no
//! I/O, so that the data path (which calls it under the key's stripe) and the tests agree on
//! what happens.
//!
//! **Expiry** is decided by the head too, with its wall clock (ARCHITECTURE.md §11
//! "Expiry"): a write with a TTL expires at the head's clock reading plus the TTL, the head
//! treats a record its clock says is due as absent ([`decide`]), and removes it through the
//! chain like a delete (a sweep, [`sweep_check`]; or a tail that asks, [`Intent::Expire`]).
//! A tail serves a record with an expiry without asking only while its own clock is more
//! than the allowed clock offset before the expiry ([`check_read`]).
//!
//! Versions are hybrid-clock stamps: a write's version is above the key's version, at least
//! the head's wall clock in microseconds, and above anything the head handed out before. So a key's version only grows while the key exists, whichever head writes it
//! (a new head holds the record, and with it the version), and a key deleted and written
//! again gets a version above the old ones unless the new head's clock is behind the old
//! head's by more than the time between the two writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ringkv_wire::Expected;

use crate::NodeError;

/// Bytes a record adds to its value: expiry and version, 8 each, big-endian.
pub const RECORD_SUFFIX: usize = 16;

/// A key's stored value with its version and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The value.
    pub value: Vec<u8>,
    /// The key's version: assigned by the head of its chain, greater than every earlier
    /// version of the key while it exists.
    pub version: u64,
    /// When the value expires, in ms since the Unix epoch by the head's clock (`None`:
    /// never).
    pub expires_at: Option<u64>,
}

impl Record {
    /// The stored form: the value, then the expiry (0: never) and the version, 8 bytes each,
    /// big-endian. Appended to the value's own buffer: no copy of the value unless the
    /// buffer must grow.
    pub fn encode(self) -> Vec<u8> {
        let mut bytes = self.value;
        bytes.extend_from_slice(&self.expires_at.unwrap_or(0).to_be_bytes());
        bytes.extend_from_slice(&self.version.to_be_bytes());
        bytes
    }

    /// The record stored as `bytes` (see [`Record::encode`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, NodeError> {
        let (version, expires_at) = Self::meta(bytes)?;
        Ok(Self {
            value: bytes[..bytes.len() - RECORD_SUFFIX].to_vec(),
            version,
            expires_at,
        })
    }

    /// The version and expiry of the record stored as `bytes`, without copying its value.
    pub fn meta(bytes: &[u8]) -> Result<(u64, Option<u64>), NodeError> {
        let Some(at) = bytes.len().checked_sub(RECORD_SUFFIX) else {
            return Err(NodeError::CorruptRecord(bytes.len()));
        };
        let word =
            |from: usize| u64::from_be_bytes(bytes[from..from + 8].try_into().expect("8 bytes"));
        let expires_at = word(at);
        Ok((word(at + 8), (expires_at != 0).then_some(expires_at)))
    }
}

/// The head's source of versions: a hybrid clock, never below the wall clock (in µs since
/// the Unix epoch) nor below anything it handed out before.
#[derive(Debug, Default)]
pub struct Versions {
    last: AtomicU64,
}

impl Versions {
    /// A version for a write of a key whose current version is `current` (0: absent), at
    /// wall-clock time `now_us`: above both, and above every version handed out before.
    pub fn next(&self, current: u64, now_us: u64) -> u64 {
        let floor = current.max(now_us.saturating_sub(1));
        let previous = self
            .last
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(last.max(floor).saturating_add(1))
            })
            .expect("the update always succeeds");
        previous.max(floor).saturating_add(1)
    }
}

/// Microseconds since the Unix epoch by this host's clock (0 if it is set before 1970).
pub fn wall_clock_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Milliseconds since the Unix epoch at wall-clock time `now_us` (µs): the unit of expiry.
pub fn millis(now_us: u64) -> u64 {
    now_us / 1000
}

/// Whether a record expiring at `expires_at` (ms, `None`: never) is due at `now_ms`.
pub fn is_due(expires_at: Option<u64>, now_ms: u64) -> bool {
    expires_at.is_some_and(|at| at <= now_ms)
}

/// The version and expiry of a key's record, as the head holds it.
pub type Meta = (u64, Option<u64>);

/// The write a client (or the expiry) asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// `Put` (`expected: None`, `ttl_ms: None`), `PutIf` or `PutTtl`.
    Put {
        /// The value.
        value: Vec<u8>,
        /// The condition, if any.
        expected: Option<Expected>,
        /// Time to live in ms from the head's clock reading (`None`: never expires).
        ttl_ms: Option<u64>,
    },
    /// `Delete` (`version: None`) or `DeleteIf`.
    Delete {
        /// The version the key must have, if any.
        version: Option<u64>,
    },
    /// Remove the key's record of `version` if the head's clock says it is due (a sweep,
    /// or a tail about to serve it near its expiry: `Expire`).
    Expire {
        /// The version the tail (or the sweep) found.
        version: u64,
    },
}

/// What the head does with a write ([`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store this record (`None`: delete the key) down the chain, then answer `reply`.
    Write {
        /// The key's new record, or `None` to delete it.
        record: Option<Record>,
        /// The answer once every member has it.
        reply: Outcome,
    },
    /// Write nothing and answer `reply` (a condition that does not hold, or a delete of a
    /// key that does not exist).
    Refuse(Outcome),
}

/// The answer to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `PutOk { created }`.
    Put {
        /// Whether the key was new.
        created: bool,
    },
    /// `Deleted` (`true`) or `NotFound`. For an `Expire`, `true`: the record expired and is
    /// removed.
    Delete {
        /// Whether the key existed.
        existed: bool,
    },
    /// `Applied { version }`. For an `Expire`: the record is not due, and this is its
    /// version (the same the tail asked about).
    Applied {
        /// The key's new version (a put) or the version it had (a delete).
        version: u64,
    },
    /// `Conflict { current }`.
    Conflict {
        /// The key's current version.
        current: Option<u64>,
    },
}

/// Decides a write of a key whose current record has version and expiry `current`
/// (`None`: absent), taking its version from `versions` at wall-clock time `now_us`.
///
/// A record the clock says is due is absent for every condition (and reported so), and
/// whatever the head answers about it, it removes it: a head that reported the key absent
/// must not leave the record for a later head, whose clock may be behind, to serve again. A
/// plain delete of an absent key writes nothing (there is nothing to remove, and nothing for
/// the chain to learn); every other unconditional write is written. A conditional write is
/// written exactly when its condition holds against the live record. An `Expire` removes the
/// record only if it is the version asked about and due (or another version, due too).
pub fn decide(intent: Intent, current: Option<Meta>, versions: &Versions, now_us: u64) -> Decision {
    let due = current.is_some_and(|(_, expires_at)| is_due(expires_at, millis(now_us)));
    match decide_live(intent, current, versions, now_us) {
        Decision::Refuse(reply) if due => Decision::Write {
            record: None,
            reply,
        },
        decision => decision,
    }
}

/// [`decide`] before a due record's removal is added to a refusal.
fn decide_live(
    intent: Intent,
    current: Option<Meta>,
    versions: &Versions,
    now_us: u64,
) -> Decision {
    let now_ms = millis(now_us);
    let live = current
        .filter(|&(_, expires_at)| !is_due(expires_at, now_ms))
        .map(|(version, _)| version);
    match intent {
        Intent::Put {
            value,
            expected,
            ttl_ms,
        } => {
            let holds = match expected {
                None => true,
                Some(Expected::Absent) => live.is_none(),
                Some(Expected::Version(v)) => live == Some(v),
            };
            if !holds {
                return Decision::Refuse(Outcome::Conflict { current: live });
            }
            // Above the expired record's version too: a key's version only grows while the
            // head holds it.
            let version = versions.next(current.map_or(0, |(v, _)| v), now_us);
            let reply = match expected {
                None => Outcome::Put {
                    created: live.is_none(),
                },
                Some(_) => Outcome::Applied { version },
            };
            Decision::Write {
                record: Some(Record {
                    value,
                    version,
                    // At least 1: 0 is "never" in the stored form.
                    expires_at: ttl_ms.map(|ttl| now_ms.saturating_add(ttl).max(1)),
                }),
                reply,
            }
        }
        // (Expired but still stored: removed by `decide`, reported as the absent key it is.)
        Intent::Delete { version: None } => match live {
            Some(_) => Decision::Write {
                record: None,
                reply: Outcome::Delete { existed: true },
            },
            None => Decision::Refuse(Outcome::Delete { existed: false }),
        },
        Intent::Delete {
            version: Some(expected),
        } => match live {
            Some(v) if v == expected => Decision::Write {
                record: None,
                reply: Outcome::Applied { version: v },
            },
            _ => Decision::Refuse(Outcome::Conflict { current: live }),
        },
        Intent::Expire { version } => match current {
            Some((v, expires_at)) if v == version && is_due(expires_at, now_ms) => {
                Decision::Write {
                    record: None,
                    reply: Outcome::Delete { existed: true },
                }
            }
            Some((v, _)) if v == version => Decision::Refuse(Outcome::Applied { version }),
            _ => Decision::Refuse(Outcome::Conflict { current: live }),
        },
    }
}

/// What the node serving a read does with the record it holds ([`check_read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadCheck {
    /// Serve it.
    Serve,
    /// Let the head decide (`Intent::Expire`, under the key's stripe) before answering: at a
    /// node that is not the head, the record is within the allowed clock offset of its
    /// expiry, or past it, by this node's clock; at the head (which decides itself, and
    /// removes what it reports absent), the record is due.
    AskHead,
}

/// Whether a node serving a read of a record expiring at `expires_at` may serve it at
/// wall-clock time `now_ms`: the head decides expiry with its clock (`is_head`: this node
/// is the head), so a node that is not asks it whenever the clocks, offset by up to
/// `max_offset_ms`, might disagree.
pub fn check_read(
    expires_at: Option<u64>,
    now_ms: u64,
    is_head: bool,
    max_offset_ms: u64,
) -> ReadCheck {
    match expires_at {
        None => ReadCheck::Serve,
        Some(at) if is_head && at > now_ms => ReadCheck::Serve,
        Some(_) if is_head => ReadCheck::AskHead,
        Some(at) if at > now_ms.saturating_add(max_offset_ms) => ReadCheck::Serve,
        Some(_) => ReadCheck::AskHead,
    }
}

/// What the expiry sweep does with one entry of the expiry index (due at `indexed`, ms by
/// which the sweep ran up to `now_ms`), given the key's record now (`current`) and whether
/// this node heads the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// The record is gone or expires at another time (rewritten, deleted, moved away): the
    /// entry is stale; remove it.
    Stale,
    /// Expire the record of this version ([`Intent::Expire`], decided again under the
    /// key's stripe).
    Expire {
        /// The record's version.
        version: u64,
    },
    /// Not this node's to expire (it does not head the key) or not due: leave the entry.
    Leave,
}

/// See [`Sweep`].
pub fn sweep_check(indexed: u64, current: Option<Meta>, is_head: bool, now_ms: u64) -> Sweep {
    match current {
        Some((version, Some(at))) if at == indexed => {
            if is_head && at <= now_ms {
                Sweep::Expire { version }
            } else {
                Sweep::Leave
            }
        }
        _ => Sweep::Stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_record_round_trips_and_its_meta_reads_without_the_value() {
        let record = Record {
            value: b"hello".to_vec(),
            version: 1_700_000_000_000_001,
            expires_at: Some(42),
        };
        let bytes = record.clone().encode();
        assert_eq!(bytes.len(), 5 + RECORD_SUFFIX);
        assert_eq!(Record::decode(&bytes).unwrap(), record);
        assert_eq!(
            Record::meta(&bytes).unwrap(),
            (1_700_000_000_000_001, Some(42))
        );
        let never = Record {
            value: vec![],
            version: 7,
            expires_at: None,
        };
        assert_eq!(Record::decode(&never.clone().encode()).unwrap(), never);
        assert!(matches!(
            Record::decode(&[0; 15]),
            Err(NodeError::CorruptRecord(15))
        ));
    }

    #[test]
    fn versions_grow_past_the_key_the_clock_and_each_other() {
        let versions = Versions::default();
        assert_eq!(versions.next(0, 1000), 1000);
        // The same microsecond again: still above the last one handed out.
        assert_eq!(versions.next(0, 1000), 1001);
        // A key ahead of the clock (written by a head whose clock is ahead).
        assert_eq!(versions.next(5000, 1000), 5001);
        // The clock went back: never below what was handed out.
        assert_eq!(versions.next(0, 10), 5002);
        assert_eq!(versions.next(u64::MAX, 0), u64::MAX, "saturates");
    }

    fn put(value: &[u8], expected: Option<Expected>) -> Intent {
        Intent::Put {
            value: value.to_vec(),
            expected,
            ttl_ms: None,
        }
    }

    /// A record of version `version` that never expires.
    fn at(version: u64) -> Option<Meta> {
        Some((version, None))
    }

    #[test]
    fn conditions_hold_exactly_when_they_should() {
        let v = Versions::default();
        let written = |d: &Decision| matches!(d, Decision::Write { .. });
        assert!(written(&decide(put(b"a", None), None, &v, 1)));
        assert!(written(&decide(put(b"a", None), at(9), &v, 1)));
        assert!(written(&decide(
            put(b"a", Some(Expected::Absent)),
            None,
            &v,
            1
        )));
        assert_eq!(
            decide(put(b"a", Some(Expected::Absent)), at(9), &v, 1),
            Decision::Refuse(Outcome::Conflict { current: Some(9) })
        );
        assert!(written(&decide(
            put(b"a", Some(Expected::Version(9))),
            at(9),
            &v,
            1
        )));
        assert_eq!(
            decide(put(b"a", Some(Expected::Version(9))), at(8), &v, 1),
            Decision::Refuse(Outcome::Conflict { current: Some(8) })
        );
        assert_eq!(
            decide(put(b"a", Some(Expected::Version(9))), None, &v, 1),
            Decision::Refuse(Outcome::Conflict { current: None })
        );
        assert_eq!(
            decide(Intent::Delete { version: Some(9) }, at(9), &v, 1),
            Decision::Write {
                record: None,
                reply: Outcome::Applied { version: 9 }
            }
        );
        assert_eq!(
            decide(Intent::Delete { version: Some(9) }, None, &v, 1),
            Decision::Refuse(Outcome::Conflict { current: None })
        );
        assert_eq!(
            decide(Intent::Delete { version: None }, None, &v, 1),
            Decision::Refuse(Outcome::Delete { existed: false })
        );
    }

    #[test]
    fn a_due_record_is_absent_to_every_write_and_expires_only_at_its_version() {
        let v = Versions::default();
        // Expires at 5 ms; the clock reads 5 ms (5,000 µs): due.
        let due = Some((7, Some(5)));
        let now = 5_000;
        match decide(put(b"a", Some(Expected::Absent)), due, &v, now) {
            Decision::Write {
                record: Some(record),
                reply: Outcome::Applied { version },
            } => {
                assert!(version > 7, "above the expired version");
                assert_eq!(record.expires_at, None, "a put without a TTL never expires");
            }
            other => panic!("put_if_absent over an expired key: {other:?}"),
        }
        // Refusals over a due record remove it all the same.
        let removed = |reply| Decision::Write {
            record: None,
            reply,
        };
        assert_eq!(
            decide(put(b"a", Some(Expected::Version(7))), due, &v, now),
            removed(Outcome::Conflict { current: None })
        );
        assert_eq!(
            decide(Intent::Delete { version: None }, due, &v, now),
            removed(Outcome::Delete { existed: false }),
            "removed, reported absent"
        );
        assert_eq!(
            decide(Intent::Delete { version: Some(7) }, due, &v, now),
            removed(Outcome::Conflict { current: None })
        );
        assert_eq!(
            decide(Intent::Expire { version: 6 }, due, &v, now),
            removed(Outcome::Conflict { current: None }),
            "another version, due too"
        );
        assert_eq!(
            decide(Intent::Expire { version: 7 }, due, &v, now),
            Decision::Write {
                record: None,
                reply: Outcome::Delete { existed: true }
            }
        );
        // A millisecond earlier it is alive, and stays.
        assert_eq!(
            decide(Intent::Expire { version: 7 }, due, &v, 4_999),
            Decision::Refuse(Outcome::Applied { version: 7 })
        );
        assert_eq!(
            decide(Intent::Expire { version: 6 }, due, &v, 4_999),
            Decision::Refuse(Outcome::Conflict { current: Some(7) }),
            "another version: nothing removed"
        );
        assert_eq!(
            decide(Intent::Expire { version: 7 }, None, &v, now),
            Decision::Refuse(Outcome::Conflict { current: None })
        );
        // A TTL counts from the head's clock, in ms.
        let ttl = Intent::Put {
            value: b"a".to_vec(),
            expected: None,
            ttl_ms: Some(1_500),
        };
        match decide(ttl, None, &v, 2_000_999) {
            Decision::Write {
                record: Some(record),
                reply: Outcome::Put { created: true },
            } => assert_eq!(record.expires_at, Some(2_000 + 1_500)),
            other => panic!("put with a TTL: {other:?}"),
        }
    }

    #[test]
    fn the_sweep_expires_only_its_own_due_records_and_drops_stale_entries() {
        assert_eq!(
            sweep_check(5, Some((3, Some(5))), true, 5),
            Sweep::Expire { version: 3 }
        );
        assert_eq!(sweep_check(5, Some((3, Some(5))), false, 9), Sweep::Leave);
        assert_eq!(sweep_check(5, Some((3, Some(5))), true, 4), Sweep::Leave);
        assert_eq!(
            sweep_check(5, Some((3, Some(6))), true, 9),
            Sweep::Stale,
            "rewritten"
        );
        assert_eq!(
            sweep_check(5, Some((3, None)), true, 9),
            Sweep::Stale,
            "made permanent"
        );
        assert_eq!(
            sweep_check(5, None, true, 9),
            Sweep::Stale,
            "deleted or moved away"
        );
    }

    proptest! {
        /// The clock rule: the head's clock decides expiry. Whatever the clocks read, within
        /// the allowed offset of each other, a node that is not the head serves a record
        /// without asking only while the head's clock says it is alive.
        #[test]
        fn a_tail_never_serves_what_the_heads_clock_expired(
            real in 0u64..1_000_000,
            head_skew in -500i64..=500,
            tail_skew in -500i64..=500,
            expires_at in 0u64..1_002_000,
            max_offset in 0u64..2_000,
        ) {
            prop_assume!(head_skew.abs_diff(tail_skew) <= max_offset);
            let clock = |skew: i64| real.saturating_add_signed(skew + 1_000);
            let (head, tail) = (clock(head_skew), clock(tail_skew));
            if check_read(Some(expires_at), tail, false, max_offset) == ReadCheck::Serve {
                prop_assert!(!is_due(Some(expires_at), head));
            }
            // At the head, its own clock: decided (removed) exactly when due.
            let at_head = check_read(Some(expires_at), head, true, max_offset);
            prop_assert_eq!(at_head == ReadCheck::AskHead, is_due(Some(expires_at), head));
            prop_assert_eq!(check_read(None, tail, false, max_offset), ReadCheck::Serve);
        }

        /// Whatever is asked of a key whose record is due, the head removes or replaces the
        /// record: it never answers from a due record and leaves it stored.
        #[test]
        fn a_due_record_never_outlives_a_decision(
            kind in 0u8..6,
            version in 1u64..4,
            asked in 1u64..4,
            expires_at in 1u64..1_000,
            late in 0u64..1_000,
        ) {
            let intent = match kind {
                0 => put(b"x", None),
                1 => put(b"x", Some(Expected::Absent)),
                2 => put(b"x", Some(Expected::Version(asked))),
                3 => Intent::Delete { version: None },
                4 => Intent::Delete { version: Some(asked) },
                _ => Intent::Expire { version: asked },
            };
            let now_us = (expires_at + late) * 1000;
            let decision = decide(intent, Some((version, Some(expires_at))), &Versions::default(), now_us);
            prop_assert!(matches!(decision, Decision::Write { .. }), "{:?}", decision);
        }

        /// Whatever the clock does, a key's successive writes get increasing versions, and
        /// an applied conditional put reports the version it wrote.
        #[test]
        fn a_keys_versions_only_grow(clock in proptest::collection::vec(0u64..2_000, 1..64)) {
            let versions = Versions::default();
            let mut current: Option<u64> = None;
            for now in clock {
                let expected = current.map(Expected::Version).unwrap_or(Expected::Absent);
                match decide(put(b"x", Some(expected)), current.map(|v| (v, None)), &versions, now) {
                    Decision::Write { record: Some(record), reply: Outcome::Applied { version } } => {
                        prop_assert_eq!(record.version, version);
                        prop_assert!(current.is_none_or(|c| version > c));
                        current = Some(version);
                    }
                    other => prop_assert!(false, "the condition held: {:?}", other),
                }
            }
        }
    }
}
