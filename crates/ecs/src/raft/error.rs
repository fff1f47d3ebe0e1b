//! The error type of the replicated ECS's Raft layer.

use std::path::PathBuf;
use std::time::Duration;

use super::{Member, MemberId, Refusal};

/// Errors of a Raft member ([`super::EcsRaft`]). Each variant says what state it left.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// This member is not the leader: nothing was proposed or changed. Send the request to
    /// `leader` (id and how to reach it) if it is known. With none known, an election is
    /// under way or this member is cut off from a majority: retry shortly.
    #[error("{}", forward_text(.leader))]
    ForwardToLeader {
        /// The leader as this member knows it.
        leader: Option<(MemberId, Member)>,
    },
    /// The state machine refused the command (it was committed, and every member refused it
    /// the same way): the state is unchanged.
    #[error("refused by the state machine: {0}")]
    Refused(Refusal),
    /// The command was not committed and applied within the proposal timeout (no majority
    /// reachable, or the leader changed meanwhile): its outcome is **unknown**. It may still
    /// commit later, so read the state (or propose something that tells, such as a ring of
    /// the next version) before assuming either way.
    #[error("not committed within {0:?}: the outcome is unknown, the command may still commit")]
    Timeout(Duration),
    /// A majority did not confirm this member's leadership ([`super::EcsRaft::ensure_leader`]):
    /// it may have been deposed and must not act as the leader. Nothing was changed.
    #[error("leadership not confirmed by a majority: {0}")]
    NoQuorum(String),
    /// The command's encoding is larger than one Raft message can carry: nothing was proposed.
    #[error("the command takes {bytes} bytes, more than the {max} one Raft message can carry")]
    TooLarge {
        /// The command's encoded size.
        bytes: usize,
        /// The largest command that fits.
        max: usize,
    },
    /// openraft refused a membership change (another one in progress, a voter that is not a
    /// learner first, an empty membership): the membership is unchanged.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// The member has stopped: it was shut down, or a storage failure stopped it (the log
    /// says which). It does nothing more; start it again from its state directory.
    #[error("the Raft member has stopped: {0}")]
    Stopped(String),
    /// The durable store could not be opened or its content does not decode. Nothing was
    /// started.
    #[error("Raft store {path}: {reason}")]
    Store {
        /// The store's directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The configuration is not usable (e.g. an election timeout not above the heartbeat).
    /// Nothing was started.
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    /// The member's certificates could not be loaded or the TLS configuration not built.
    /// Nothing was started.
    #[error("TLS: {0}")]
    Tls(#[from] ringkv_certs::CertError),
    /// Binding the member's endpoint failed. Nothing was started.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn forward_text(leader: &Option<(MemberId, Member)>) -> String {
    match leader {
        Some((id, member)) => format!("not the Raft leader; the leader is member {id} ({member})"),
        None => "not the Raft leader, and no leader is known (an election may be under way)".into(),
    }
}
