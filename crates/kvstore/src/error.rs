//! The client's error type.

use std::time::Duration;

use ringkv_transport::TransportError;
use ringkv_wire::{ErrorKind, WireError};

/// Errors of the client library. None of them leaves the store in a partial state: a write
/// that returns an error may or may not have been applied (exactly like a lost reply), but
/// a write that returns `Ok` is durable.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The request was refused locally before anything was sent (empty or oversized key,
    /// oversized value).
    #[error("invalid request: {0}")]
    Invalid(#[from] WireError),
    /// Loading certificates or building the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(#[from] ringkv_certs::CertError),
    /// Reaching a node failed (binding, resolving, connecting, or the exchange itself: see
    /// [`TransportError`], which says whether the request may have been applied).
    #[error(transparent)]
    Transport(TransportError),
    /// The node refused the request with an error reply; nothing was applied.
    #[error("server error ({kind:?}): {message}")]
    Server {
        /// The kind of failure.
        kind: ErrorKind,
        /// The node's explanation.
        message: String,
    },
    /// No seed or ring node answered, so there is no metadata to route with.
    #[error("no node reachable (tried {tried:?}): {last}")]
    NoNodeReachable {
        /// Addresses tried.
        tried: Vec<String>,
        /// The last error.
        last: String,
    },
    /// The cluster has no ring yet (no node has been added by the ECS).
    #[error("the cluster has no ring metadata yet (no node is serving)")]
    NoRing,
    /// Retries (write lock, stopped node, unreachable node, stale metadata) did not succeed
    /// before the deadline.
    #[error("gave up after {elapsed:?} and {attempts} attempts; last: {last}")]
    Timeout {
        /// Time spent.
        elapsed: Duration,
        /// Attempts made.
        attempts: u32,
        /// The last reason to retry.
        last: String,
    },
    /// The node answered something that does not fit the request.
    #[error("unexpected reply to {request}: {reply}")]
    UnexpectedReply {
        /// The request name.
        request: &'static str,
        /// The reply, debug-formatted.
        reply: String,
    },
    /// The store was disconnected.
    #[error("the store is disconnected")]
    Disconnected,
}

impl From<TransportError> for KvError {
    fn from(e: TransportError) -> Self {
        match e {
            // Over the frame limit: refused before anything was sent, like an oversized value.
            TransportError::Encode(e) => KvError::Invalid(e),
            e => KvError::Transport(e),
        }
    }
}

impl KvError {
    /// Whether the error comes from reaching a peer (worth trying another node).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, KvError::Transport(e) if e.is_unreachable())
    }
}
