//! The replicated state machine's data and its one decision, as plain synchronous code: what
//! the ECS persists ([`EcsState`]), the commands that change it ([`EcsCommand`]), and
//! whether a command is applied ([`EcsState::apply`]). Every member runs the same decision on
//! the same commands in the same order, so all end in the same state; none of it touches Raft,
//! disks or the network, so it is unit-tested on its own.

use std::fmt;
use std::time::Duration;

use ringkv_wire::RingMetadata;
use serde::{Deserialize, Serialize};

use crate::state::IntentLog;

/// What the replicated ECS persists: the same two things the single ECS keeps in `ring.bin`
/// and `intent.bin` (ARCHITECTURE.md §5.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsState {
    /// The ring metadata. Version 0 (the default) means "no ring yet".
    pub ring: RingMetadata,
    /// The intent log: the change in progress, if any, and the next change number.
    pub log: IntentLog,
    /// The settings the lease bound depends on, fixed by the group's first leader (`None`
    /// until then). Every leader uses these, not its own configuration: a new leader waits
    /// `failover_after` before failing a node over, which outlasts the leases an earlier
    /// leader granted only if both use the same value (ARCHITECTURE.md §11).
    pub settings: Option<LeaseSettings>,
}

/// What the lease bound depends on, the same for every leader of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSettings {
    /// `failover_after` in milliseconds: a probe grants a lease of half of it, and a node is
    /// failed over only once it has been silent this long.
    pub failover_after_ms: u64,
}

impl LeaseSettings {
    /// The settings of `failover_after` (whole milliseconds).
    pub fn new(failover_after: Duration) -> Self {
        Self {
            failover_after_ms: u64::try_from(failover_after.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// `failover_after`.
    pub fn failover_after(&self) -> Duration {
        Duration::from_millis(self.failover_after_ms)
    }
}

/// [`EcsState`] as a group persisted it before it kept [`LeaseSettings`]: read once, when a
/// member of such a group starts or receives such a snapshot.
#[derive(Deserialize)]
struct StateWithoutSettings {
    ring: RingMetadata,
    log: IntentLog,
}

impl EcsState {
    /// Decodes a persisted state (postcard), also one persisted before the state kept
    /// [`LeaseSettings`] (its settings are `None`).
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|e| match postcard::from_bytes(bytes) {
            Ok(StateWithoutSettings { ring, log }) => Ok(Self {
                ring,
                log,
                settings: None,
            }),
            Err(_) => Err(e),
        })
    }
}

/// A change to [`EcsState`]: the application data of the Raft log.
///
/// Each is applied whole or not at all. [`EcsCommand::Save`] exists so that the commit point of
/// a membership change (the intent marked committed *and* the new ring) is one log entry, hence
/// atomic on every member, where the single ECS needs two file writes and a repair on restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EcsCommand {
    /// Replace the ring. Refused unless its version is greater than the current ring's.
    SetRing(RingMetadata),
    /// Replace the intent log.
    SetIntentLog(IntentLog),
    /// Replace whichever of the two is given, atomically: refused as a whole if the ring is.
    Save {
        /// The new ring, if it changes.
        ring: Option<RingMetadata>,
        /// The new intent log, if it changes.
        log: Option<IntentLog>,
    },
    /// Fix the group's [`LeaseSettings`]. Refused once they are fixed at another value: a
    /// value that changed under running leases could end one before the ECS acts on it.
    SetLeaseSettings(LeaseSettings),
}

/// The result of applying one log entry, returned to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EcsResponse {
    /// Applied (or an entry without a command: a leader's first entry, a membership change).
    Applied {
        /// The ring version after the entry.
        ring_version: u64,
    },
    /// Not applied: the state is unchanged. The entry stays in the log (it was committed);
    /// every member refuses it the same way.
    Refused(Refusal),
}

/// Why the state machine refused a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The ring's version is not greater than the current ring's: versions only ever grow
    /// (ARCHITECTURE.md §5.3, I7), so an old or repeated proposal cannot roll the ring back.
    StaleRing {
        /// The refused ring's version.
        proposed: u64,
        /// The current ring's version.
        current: u64,
    },
    /// The ring breaks an invariant of [`RingMetadata::validate`].
    InvalidRing(String),
    /// The group's lease settings are fixed already, at another value.
    SettingsFixed {
        /// The group's `failover_after`, in milliseconds.
        failover_after_ms: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::StaleRing { proposed, current } => write!(
                f,
                "ring version {proposed} is not newer than the current version {current}"
            ),
            Refusal::InvalidRing(why) => write!(f, "invalid ring: {why}"),
            Refusal::SettingsFixed { failover_after_ms } => write!(
                f,
                "the group's failover_after is fixed at {failover_after_ms} ms"
            ),
        }
    }
}

impl EcsState {
    /// Applies `command`: all of it, or (refused) none of it.
    pub fn apply(&mut self, command: EcsCommand) -> EcsResponse {
        let (ring, log) = match command {
            EcsCommand::SetLeaseSettings(settings) => return self.fix_settings(settings),
            EcsCommand::SetRing(ring) => (Some(ring), None),
            EcsCommand::SetIntentLog(log) => (None, Some(log)),
            EcsCommand::Save { ring, log } => (ring, log),
        };
        if let Some(ring) = &ring {
            if let Err(refusal) = self.check_ring(ring) {
                return EcsResponse::Refused(refusal);
            }
        }
        if let Some(ring) = ring {
            self.ring = ring;
        }
        if let Some(log) = log {
            self.log = log;
        }
        EcsResponse::Applied {
            ring_version: self.ring.version,
        }
    }

    /// Fixes the lease settings, unless they are fixed at another value already.
    fn fix_settings(&mut self, settings: LeaseSettings) -> EcsResponse {
        match self.settings {
            Some(fixed) if fixed != settings => EcsResponse::Refused(Refusal::SettingsFixed {
                failover_after_ms: fixed.failover_after_ms,
            }),
            _ => {
                self.settings = Some(settings);
                EcsResponse::Applied {
                    ring_version: self.ring.version,
                }
            }
        }
    }

    /// Whether `ring` may replace the current ring: newer, and valid.
    fn check_ring(&self, ring: &RingMetadata) -> Result<(), Refusal> {
        if !ring.is_newer_than(&self.ring) {
            return Err(Refusal::StaleRing {
                proposed: ring.version,
                current: self.ring.version,
            });
        }
        ring.validate()
            .map_err(|e| Refusal::InvalidRing(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use ringkv_wire::NodeEntry;

    use super::*;

    fn ring(version: u64) -> RingMetadata {
        RingMetadata::new(version, vec![NodeEntry::new("a", "h:1")]).unwrap()
    }

    fn log(next_change: u64) -> IntentLog {
        IntentLog {
            next_change,
            pending: None,
        }
    }

    #[test]
    fn ring_versions_only_grow() {
        let mut state = EcsState::default();
        assert_eq!(
            state.apply(EcsCommand::SetRing(ring(2))),
            EcsResponse::Applied { ring_version: 2 }
        );
        for stale in [0, 1, 2] {
            assert_eq!(
                state.apply(EcsCommand::SetRing(ring(stale))),
                EcsResponse::Refused(Refusal::StaleRing {
                    proposed: stale,
                    current: 2
                })
            );
        }
        assert_eq!(state.ring, ring(2));
        assert_eq!(
            state.apply(EcsCommand::SetRing(ring(3))),
            EcsResponse::Applied { ring_version: 3 }
        );
    }

    #[test]
    fn an_invalid_ring_is_refused() {
        let mut state = EcsState::default();
        let mut bad = ring(1);
        bad.replication = 0;
        assert!(matches!(
            state.apply(EcsCommand::SetRing(bad)),
            EcsResponse::Refused(Refusal::InvalidRing(_))
        ));
        assert_eq!(state, EcsState::default());
    }

    #[test]
    fn lease_settings_are_fixed_once() {
        let mut state = EcsState::default();
        let three = LeaseSettings::new(Duration::from_secs(3));
        let one = LeaseSettings::new(Duration::from_secs(1));
        assert!(matches!(
            state.apply(EcsCommand::SetLeaseSettings(three)),
            EcsResponse::Applied { .. }
        ));
        // The same value again (a leader that proposed it twice) is no change.
        assert!(matches!(
            state.apply(EcsCommand::SetLeaseSettings(three)),
            EcsResponse::Applied { .. }
        ));
        assert_eq!(
            state.apply(EcsCommand::SetLeaseSettings(one)),
            EcsResponse::Refused(Refusal::SettingsFixed {
                failover_after_ms: 3000
            })
        );
        assert_eq!(state.settings, Some(three));
    }

    #[test]
    fn a_state_persisted_without_settings_is_read() {
        #[derive(Serialize)]
        struct Old<'a> {
            ring: &'a RingMetadata,
            log: &'a IntentLog,
        }
        let (ring, log) = (ring(4), log(7));
        let bytes = postcard::to_stdvec(&Old {
            ring: &ring,
            log: &log,
        })
        .unwrap();
        let state = EcsState::decode(&bytes).unwrap();
        assert_eq!((state.ring, state.log, state.settings), (ring, log, None));
        let new = EcsState {
            settings: Some(LeaseSettings::new(Duration::from_secs(2))),
            ..EcsState::default()
        };
        assert_eq!(
            EcsState::decode(&postcard::to_stdvec(&new).unwrap()).unwrap(),
            new
        );
        assert!(EcsState::decode(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn save_is_all_or_nothing() {
        let mut state = EcsState::default();
        state.apply(EcsCommand::Save {
            ring: Some(ring(5)),
            log: Some(log(3)),
        });
        assert_eq!((state.ring.version, state.log.next_change), (5, 3));
        // A stale ring refuses the log that came with it.
        let refused = state.apply(EcsCommand::Save {
            ring: Some(ring(4)),
            log: Some(log(9)),
        });
        assert!(matches!(refused, EcsResponse::Refused(_)));
        assert_eq!((state.ring.version, state.log.next_change), (5, 3));
        // The log alone needs no newer ring.
        state.apply(EcsCommand::Save {
            ring: None,
            log: Some(log(9)),
        });
        state.apply(EcsCommand::SetIntentLog(log(10)));
        assert_eq!((state.ring.version, state.log.next_change), (5, 10));
    }
}
