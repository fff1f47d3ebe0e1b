//! The transport's error type.

use ringkv_wire::WireError;

/// Errors of reaching a peer and exchanging one request with it. The variants say how far
/// the request got: before [`TransportError::Stream`] nothing was sent; after it, the request
/// may or may not have been applied (exactly like a lost reply).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The request could not be encoded (over the frame limit); nothing was sent.
    #[error("cannot encode request: {0}")]
    Encode(#[source] WireError),
    /// Loading certificates or building the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(#[from] ringkv_certs::CertError),
    /// Binding the local UDP socket failed.
    #[error("cannot bind local endpoint: {0}")]
    Bind(#[source] std::io::Error),
    /// A peer address did not resolve or parse; nothing was sent.
    #[error("bad address {addr}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// Establishing the QUIC connection (including the mutual TLS handshake) failed or timed
    /// out; nothing was sent.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The connection or stream broke, or no reply came in time; the request may or may not
    /// have been applied. The connection was closed and forgotten, so the next request dials
    /// afresh.
    #[error("request to {addr} failed: {reason}")]
    Stream {
        /// The peer.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The peer closed the connection without taking the request (it shut down, answering
    /// every request it had taken first, or closed the connection as idle): nothing was
    /// applied, and the request may be sent again.
    #[error("{addr} did not take the request: {reason}")]
    NotTaken {
        /// The peer.
        addr: String,
        /// Why.
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
}

impl TransportError {
    /// Whether the error comes from reaching a peer (worth trying another node, or the same
    /// one again later).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. }
                | TransportError::NotTaken { .. }
                | TransportError::Stream { .. }
                | TransportError::Address { .. }
        )
    }
}
