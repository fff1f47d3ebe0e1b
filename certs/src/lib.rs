//! Identity and TLS for ringkv: the certificate tool and the one TLS loader.
//!
//! Every ringkv endpoint (node, ECS, client) speaks QUIC with mutual TLS. Trust is rooted in a
//! single cluster CA; every peer presents a leaf certificate signed by it. The *role* of a peer
//! (`node`, `client`, `admin`, `ecs`) is carried inside its certificate as a URI SAN
//! (`ringkv:role:<role>`), so a peer cannot claim a role in a message: it is read from the
//! verified certificate with [`peer_role`].
//!
//! Invariants:
//! - One crypto provider: rustls' `ring` provider. Every config built here passes it explicitly,
//!   so nothing depends on a process-wide default (see [`install_crypto_provider`] for code
//!   that does).
//! - Both sides always authenticate: servers require a client certificate chained to the
//!   cluster CA; clients verify the server's name (DNS or IP SAN) against the CA as usual.
//! - Private keys are written with mode 0600, and existing material is never overwritten
//!   unless the caller asks for it (`force`). Nothing is written through a symlink: with
//!   `force`, a symlink at a target path is replaced, never its target.
//!
//! # Layout
//! - `role`: the [`Role`] enum and its SAN URI encoding.
//! - `error`: [`CertError`], the one error type of this crate.
//! - `files`: the cert directory layout ([`CertPaths`], [`ca_paths`], [`leaf_paths`]) and the
//!   careful file writing (mode 0600, no silent overwrite, never through a symlink).
//! - `issue`: creating the cluster CA ([`init_ca`]) and leaf certificates ([`issue`],
//!   [`IssueOptions`]) with rcgen.
//! - `identity`: loading PEM material into an [`Identity`]; reading roles out of
//!   certificates ([`role_of_cert`]).
//! - `authority`: signing ring metadata as the ECS ([`MetadataSigner`]) and checking such
//!   signatures ([`MetadataVerifier`]).
//! - `tls`: building quinn/rustls configs ([`server_config`], [`client_config`],
//!   [`transport_config`]) and reading the role of a connected peer ([`peer_role`]).
//!
//! The `ringkv-certs` command line (`init`, `issue`) lives with the binaries (the umbrella
//! package's `src/cli/certs.rs`).
#![warn(missing_docs)]

mod authority;
mod error;
mod files;
mod identity;
mod issue;
mod role;
mod tls;

pub use authority::{MetadataSigner, MetadataVerifier, Signature};
pub use error::{CertError, Result};
pub use files::{ca_paths, leaf_paths, CertPaths};
pub use identity::{name_of_cert, role_of_cert, Identity};
pub use issue::{init_ca, issue, IssueOptions};
pub use role::Role;
pub use tls::{
    base_transport_config, client_config, install_crypto_provider, peer_identity, peer_role,
    server_config, transport_config, PeerIdentity,
};

/// The ALPN protocol identifier every ringkv QUIC endpoint offers and requires.
pub const ALPN: &[u8] = b"ringkv/1";

/// Re-exported so dependents name the same DER types this crate returns.
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};
