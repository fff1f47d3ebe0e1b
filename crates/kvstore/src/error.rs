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
    /// Binding the local UDP socket failed.
    #[error("cannot bind local endpoint: {0}")]
    Bind(#[source] std::io::Error),
    /// A peer address did not resolve or parse.
    #[error("bad address {addr}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// Establishing the QUIC connection (including the mutual TLS handshake) failed or timed
    /// out.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The connection broke or the request timed out in flight; the request may or may not
    /// have been applied.
    #[error("request to {addr} failed: {reason}")]
    Transport {
        /// The peer.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The peer sent a frame that does not decode or is over the size limit.
    #[error("protocol error from {addr}: {source}")]
    Protocol {
        /// The peer.
        addr: String,
        /// The decoding error.
        #[source]
        source: WireError,
    },
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
            TransportError::Encode(e) => KvError::Invalid(e),
            TransportError::Tls(e) => KvError::Tls(e),
            TransportError::Bind(e) => KvError::Bind(e),
            TransportError::Address { addr, reason } => KvError::Address { addr, reason },
            TransportError::Connect { addr, reason } => KvError::Connect { addr, reason },
            TransportError::Stream { addr, reason } => KvError::Transport { addr, reason },
            TransportError::Protocol { addr, source } => KvError::Protocol { addr, source },
        }
    }
}

impl KvError {
    /// Whether the error comes from reaching a peer (worth trying another node).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            KvError::Connect { .. } | KvError::Transport { .. } | KvError::Address { .. }
        )
    }
}
