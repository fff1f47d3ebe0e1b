//! The node's error type.

/// Errors of the storage node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The storage engine failed. The operation that hit it had no effect (its write
    /// transaction was not committed).
    #[error("storage: {0}")]
    Storage(#[from] fjall::Error),
    /// The write batch this write was part of failed to commit; none of the batch was
    /// written (the message is the engine's error).
    #[error("write failed: {0}")]
    WriteFailed(String),
    /// The storage writer thread is gone (the store was closed); nothing was written.
    #[error("storage is closed")]
    StoreClosed,
    /// Persisted metadata could not be decoded.
    #[error("persisted metadata is corrupt: {0}")]
    CorruptMetadata(#[from] ringkv_wire::WireError),
    /// A stored record is shorter than its version and expiry (the data directory is
    /// damaged).
    #[error("a stored record is corrupt: {0} bytes, shorter than its 16-byte version and expiry")]
    CorruptRecord(usize),
    /// Certificates could not be loaded or the TLS configuration not built.
    #[error("TLS: {0}")]
    Tls(#[from] ringkv_certs::CertError),
    /// Binding the QUIC endpoint or another I/O operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The configuration is inconsistent (explained in the message).
    #[error("configuration: {0}")]
    Config(String),
}
