//! quinn/rustls configuration: the one TLS loader of the workspace.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::{name_of_cert, role_of_cert, CertError, Identity, Result, Role, ALPN};

/// Keep-alive interval: well under the idle timeout, so idle peer connections stay open.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection with no traffic (keep-alives included) for this long is dead.
const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Concurrent bidirectional streams per connection: one stream per request, many in flight.
const MAX_BIDI_STREAMS: u32 = 4096;
/// Per-stream receive window: range transfer batches stream at full speed.
const STREAM_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-connection receive and send windows.
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// Installs rustls' `ring` provider as the process default. Idempotent: does nothing if a
/// provider is already installed. Configs built by this crate do not need it (they pass the
/// provider explicitly); it is for code that calls rustls/quinn defaults directly.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings shared by every ringkv endpoint: keep-alive 5 s, idle timeout
/// 30 s, 4096 concurrent bidirectional streams, 16 MiB stream and 64 MiB connection
/// windows for bulk transfer.
pub fn transport_config() -> Arc<TransportConfig> {
    Arc::new(base_transport_config())
}

/// The settings of [`transport_config`], to be adjusted further: a server narrows the
/// stream count and windows it grants before it knows its peer's role
/// (`ringkv_transport::ServeLimits`).
pub fn base_transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW));
    config
}

pub(crate) fn root_store(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Server config: TLS 1.3 + ALPN [`ALPN`], presenting `id.chain`, and requiring every client
/// to present a certificate chaining to `id.ca` (no anonymous clients). The client's role is
/// then available through [`peer_role`].
pub fn server_config(id: &Identity) -> Result<quinn::ServerConfig> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(&id.ca)?, provider.clone())
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// Client config: TLS 1.3 + ALPN [`ALPN`], trusting only `id.ca`, presenting `id.chain` as
/// client certificate. The server name given to `connect` is verified against the server
/// certificate's DNS/IP SANs as usual.
pub fn client_config(id: &Identity) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(&id.ca)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// The role of the peer of an established connection, read from its verified leaf
/// certificate. Both sides of a ringkv connection present certificates, so this works on
/// servers (client's role) and clients (server's role) alike.
pub fn peer_role(conn: &quinn::Connection) -> Result<Role> {
    role_of_cert(&peer_leaf(conn)?)
}

/// Who the peer of an established connection is, from its verified leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Its role.
    pub role: Role,
    /// Its certificate's name (subject common name); for a node, its name in the ring.
    pub name: String,
}

/// The role and name of the peer of an established connection ([`peer_role`],
/// [`name_of_cert`]).
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity> {
    let leaf = peer_leaf(conn)?;
    Ok(PeerIdentity {
        role: role_of_cert(&leaf)?,
        name: name_of_cert(&leaf)?,
    })
}

fn peer_leaf(conn: &quinn::Connection) -> Result<CertificateDer<'static>> {
    let identity = conn.peer_identity().ok_or(CertError::NoPeerIdentity)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| CertError::NoPeerIdentity)?;
    chain.first().cloned().ok_or(CertError::NoPeerIdentity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }

    #[test]
    fn transport_config_carries_the_documented_settings() {
        // TransportConfig has no getters; its Debug output names every field.
        let debug = format!("{:?}", transport_config());
        for (field, value) in [
            ("max_concurrent_bidi_streams", MAX_BIDI_STREAMS.to_string()),
            ("stream_receive_window", STREAM_RECEIVE_WINDOW.to_string()),
            ("receive_window", CONNECTION_WINDOW.to_string()),
            ("send_window", CONNECTION_WINDOW.to_string()),
            ("keep_alive_interval", format!("Some({KEEP_ALIVE:?})")),
            ("max_idle_timeout", IDLE_TIMEOUT_MS.to_string()),
        ] {
            let at = debug
                .find(&format!(" {field}: "))
                .unwrap_or_else(|| panic!("{field} missing from {debug}"));
            let shown = &debug[at..debug[at..].find(',').map_or(debug.len(), |e| at + e)];
            assert!(
                shown.contains(&value),
                "{field}: expected {value}, got {shown}"
            );
        }
    }
}
