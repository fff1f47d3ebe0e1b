//! The error type of this crate.

use std::path::PathBuf;

/// Result alias used throughout this crate.
pub type Result<T> = std::result::Result<T, CertError>;

/// Everything that can go wrong creating, loading or using ringkv identities.
///
/// Unless a variant says otherwise, a failed operation wrote nothing new to disk.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading, writing or creating a file or directory failed. When this happens while
    /// writing, the files written before `path` are left in place.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Refused to overwrite existing certificate or key material; pass `force` to replace it.
    /// Nothing was written.
    #[error("{path} already exists (use --force to overwrite)")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },

    /// A leaf name is not a safe file stem: it must be 1..=64 characters of
    /// `[A-Za-z0-9._-]`, must not start with `.`, and must not be the reserved name `ca`.
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A subject alternative name is neither an IP address nor a valid DNS name.
    #[error("invalid subject alternative name {san:?}: expected a DNS name or an IP address")]
    InvalidSan {
        /// The rejected SAN.
        san: String,
    },

    /// The requested validity period is empty (`not_before` is not before `not_after`).
    #[error(
        "invalid validity period: not_before {not_before} is not before not_after {not_after}"
    )]
    InvalidValidity {
        /// Requested start of validity.
        not_before: time::OffsetDateTime,
        /// Requested end of validity.
        not_after: time::OffsetDateTime,
    },

    /// A role name (from the command line or from a `ringkv:role:*` SAN) is not one of
    /// `node`, `client`, `admin`.
    #[error("unknown role {value:?} (expected node, client, admin or ecs)")]
    UnknownRole {
        /// The unrecognised role text.
        value: String,
    },

    /// A certificate carries no `ringkv:role:*` URI SAN, so it grants no role.
    #[error("certificate carries no ringkv:role:* URI SAN")]
    NoRole,

    /// A certificate's subject has no common name, so it names no peer.
    #[error("certificate subject has no common name")]
    NoName,

    /// Ring metadata whose signature did not verify (see [`crate::MetadataVerifier`]).
    #[error("ring metadata signature refused: {0}")]
    BadSignature(String),

    /// A certificate carries more than one `ringkv:role:*` URI SAN; it is ambiguous and
    /// therefore rejected rather than granting either role.
    #[error("certificate carries more than one ringkv:role:* URI SAN")]
    MultipleRoles,

    /// A certificate could not be parsed as X.509 DER.
    #[error("malformed certificate: {source}")]
    BadCertificate {
        /// The parser's error.
        #[source]
        source: x509_parser::error::X509Error,
    },

    /// A PEM file could not be decoded, or holds no item of the expected kind.
    #[error("{path}: bad PEM ({reason})")]
    BadPem {
        /// The file involved.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// The CA key in a cert directory does not belong to the CA certificate next to it;
    /// issuing with it would produce certificates nobody can verify. Nothing was written.
    #[error("{key} does not match the certificate {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },

    /// An [`Identity`](crate::Identity) has an empty certificate chain.
    #[error("identity has no certificate")]
    EmptyChain,

    /// A QUIC connection has no peer certificate chain (e.g. the handshake has not finished),
    /// so no role can be derived from it.
    #[error("connection has no verified peer certificate")]
    NoPeerIdentity,

    /// Generating a key or signing a certificate failed (rcgen).
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),

    /// rustls rejected the material, e.g. a private key that does not match its certificate,
    /// or an unparseable trust anchor.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),

    /// Building the client-certificate verifier failed, e.g. no usable trust anchors.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),

    /// The rustls config cannot be used for QUIC (it lacks a TLS 1.3 initial cipher suite).
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}
