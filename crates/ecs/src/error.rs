//! The ECS's error type.

/// Errors of the External Configuration Service.
#[derive(Debug, thiserror::Error)]
pub enum EcsError {
    /// The requested change is not valid for the current ring (duplicate or unknown node).
    /// Nothing was changed.
    #[error("{0}")]
    Ring(#[from] ringkv_wire::WireError),
    /// Removing the last node would lose its data. Nothing was changed.
    #[error("refusing to remove {0}: it is the last node and its data would have nowhere to go")]
    LastNode(String),
    /// The change would lose the data of `range`: no live node holds it to copy it from, or
    /// none would hold it afterwards. Nothing was changed.
    #[error("refusing the change: range {range} would lose its data: {why}; nothing was changed")]
    NoLiveCopy {
        /// The range.
        range: ringkv_wire::KeyRange,
        /// Why.
        why: String,
    },
    /// The change is not valid in the ring's current state (e.g. failing over a node with
    /// replication 1). Nothing was changed.
    #[error("refusing the change: {0}")]
    Refused(String),
    /// A step before the commit failed; the change was rolled back (lock released,
    /// partial copy removed where reachable) and the ring is unchanged.
    #[error("{step} failed: {reason}; change aborted and rolled back, ring unchanged at version {version}")]
    Aborted {
        /// The step that failed.
        step: String,
        /// Why.
        reason: String,
        /// The (unchanged) metadata version.
        version: u64,
    },
    /// The change could not be completed in time (a node it needs is unreachable); it stays
    /// in the intent log and the ECS keeps driving it in the background. A committed change
    /// is decided: the ring is at its new version.
    #[error("the change is {state}: {reason}; the ECS keeps retrying in the background")]
    Pending {
        /// Committed (and at which version), or being rolled back.
        state: String,
        /// The last failure.
        reason: String,
    },
    /// Reading or writing the ECS's state file failed.
    #[error("state file {path}: {source}")]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state file does not decode.
    #[error("state file {path} is corrupt: {reason}")]
    CorruptState {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// Certificates could not be loaded or the TLS configuration not built.
    #[error("TLS: {0}")]
    Tls(#[from] ringkv_certs::CertError),
    /// Binding the endpoint failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The replicated ECS's Raft member failed; [`crate::raft::RaftError`] says what state it
    /// left.
    #[error("Raft: {0}")]
    Raft(#[from] crate::raft::RaftError),
    /// The configuration does not make sense (e.g. an ECS group this member is not in).
    #[error("configuration: {0}")]
    Config(String),
}
