//! What a key holds, and how a write changes it (ARCHITECTURE.md §8 "Records", §11
//! "Versions and conditional writes").
//!
//! A key's stored value is a [`Record`]: the value, the key's **version** and its expiry.
//! The head of the key's chain decides every write: [`decide`] is a pure function of the
//! write asked for, the record the head holds and the head's [`Versions`] clock, with no
//! I/O, so that the data path (which calls it under the key's stripe) and the tests agree on
//! what happens.
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

/// The write a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// `Put` (`expected: None`) or `PutIf`.
    Put {
        /// The value.
        value: Vec<u8>,
        /// The condition, if any.
        expected: Option<Expected>,
    },
    /// `Delete` (`version: None`) or `DeleteIf`.
    Delete {
        /// The version the key must have, if any.
        version: Option<u64>,
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
    /// `Deleted` (`true`) or `NotFound`.
    Delete {
        /// Whether the key existed.
        existed: bool,
    },
    /// `Applied { version }`.
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

/// Decides a write of a key whose current version is `current` (`None`: absent), taking its
/// version from `versions` at wall-clock time `now_us`.
///
/// A plain delete of an absent key writes nothing (there is nothing to remove, and nothing
/// for the chain to learn); every other unconditional write is written. A conditional write
/// is written exactly when its condition holds against `current`.
pub fn decide(intent: Intent, current: Option<u64>, versions: &Versions, now_us: u64) -> Decision {
    match intent {
        Intent::Put { value, expected } => {
            let holds = match expected {
                None => true,
                Some(Expected::Absent) => current.is_none(),
                Some(Expected::Version(v)) => current == Some(v),
            };
            if !holds {
                return Decision::Refuse(Outcome::Conflict { current });
            }
            let version = versions.next(current.unwrap_or(0), now_us);
            let reply = match expected {
                None => Outcome::Put {
                    created: current.is_none(),
                },
                Some(_) => Outcome::Applied { version },
            };
            Decision::Write {
                record: Some(Record {
                    value,
                    version,
                    expires_at: None,
                }),
                reply,
            }
        }
        Intent::Delete { version: None } => match current {
            None => Decision::Refuse(Outcome::Delete { existed: false }),
            Some(_) => Decision::Write {
                record: None,
                reply: Outcome::Delete { existed: true },
            },
        },
        Intent::Delete {
            version: Some(expected),
        } => match current {
            Some(v) if v == expected => Decision::Write {
                record: None,
                reply: Outcome::Applied { version: v },
            },
            _ => Decision::Refuse(Outcome::Conflict { current }),
        },
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
        }
    }

    #[test]
    fn conditions_hold_exactly_when_they_should() {
        let v = Versions::default();
        let written = |d: &Decision| matches!(d, Decision::Write { .. });
        assert!(written(&decide(put(b"a", None), None, &v, 1)));
        assert!(written(&decide(put(b"a", None), Some(9), &v, 1)));
        assert!(written(&decide(
            put(b"a", Some(Expected::Absent)),
            None,
            &v,
            1
        )));
        assert_eq!(
            decide(put(b"a", Some(Expected::Absent)), Some(9), &v, 1),
            Decision::Refuse(Outcome::Conflict { current: Some(9) })
        );
        assert!(written(&decide(
            put(b"a", Some(Expected::Version(9))),
            Some(9),
            &v,
            1
        )));
        assert_eq!(
            decide(put(b"a", Some(Expected::Version(9))), Some(8), &v, 1),
            Decision::Refuse(Outcome::Conflict { current: Some(8) })
        );
        assert_eq!(
            decide(put(b"a", Some(Expected::Version(9))), None, &v, 1),
            Decision::Refuse(Outcome::Conflict { current: None })
        );
        assert_eq!(
            decide(Intent::Delete { version: Some(9) }, Some(9), &v, 1),
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

    proptest! {
        /// Whatever the clock does, a key's successive writes get increasing versions, and
        /// an applied conditional put reports the version it wrote.
        #[test]
        fn a_keys_versions_only_grow(clock in proptest::collection::vec(0u64..2_000, 1..64)) {
            let versions = Versions::default();
            let mut current: Option<u64> = None;
            for now in clock {
                let expected = current.map(Expected::Version).unwrap_or(Expected::Absent);
                match decide(put(b"x", Some(expected)), current, &versions, now) {
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
