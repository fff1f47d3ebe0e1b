//! A serving endpoint whose stateless-reset key survives restarts.
//!
//! QUIC lets an endpoint that receives a packet of a connection it does not know answer with
//! a *stateless reset*: a packet ending in a 16-byte token that only the endpoint which issued
//! the connection ID can compute (RFC 9000 §10.3). The peer closes the connection at once
//! (`ConnectionError::Reset`) instead of waiting for its request timeout or its idle timeout.
//! quinn computes the token as `HMAC(reset_key, connection ID)`, and `Endpoint::server` draws a
//! random `reset_key` per process, so a restarted process cannot produce the tokens of its
//! previous life: it silently drops the old connections' packets and its peers wait.
//!
//! [`bind_endpoint`] derives both per-process keys quinn needs from one secret that survives
//! restarts ([`reset_secret`], the file `reset.key` of a node's data directory):
//! - the **reset key** (`HMAC-SHA256`), so the tokens are the ones the previous process issued;
//! - the key of quinn's `HashedConnectionIdGenerator`. quinn answers an unknown short-header
//!   packet with a reset only if its destination connection ID *validates* under the local
//!   generator (a cheap filter against junk); with a random key per process, the previous
//!   process's IDs do not validate and are dropped without a reset.
//!
//! Both come from the secret by HKDF-SHA256 with distinct labels, so the secret itself is
//! used for nothing else and either key can change purpose without touching the other.
//! The secret is 32 random bytes rather than something derived from the node's certificate
//! key: certificates are renewed and may be shared by tooling; the reset key must not be known
//! to anyone who could forge resets, and must stay the same exactly as long as the node's
//! data does (a node whose data directory is wiped is a new node).
//!
//! quinn sends a reset only for a datagram longer than 16 + 5 + 1 bytes (it pads its reset to
//! at most one byte less than the packet that caused it, against amplification and reset
//! loops), and at most one every 20 ms per endpoint (`EndpointConfig::min_reset_interval`).
//! Every 1-RTT packet of an established connection carrying a request or a keep-alive is
//! longer than that; a peer whose packet found the rate limit spent retransmits it and gets
//! its reset a little later.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use quinn::{Endpoint, EndpointConfig, ServerConfig};
use quinn_proto::HashedConnectionIdGenerator;
use ring::{hkdf, hmac};

/// The file of a node's data directory holding its reset secret.
pub const RESET_SECRET_FILE: &str = "reset.key";

/// Length of the reset secret.
pub const RESET_SECRET_LEN: usize = 32;

/// HKDF salt (a fixed, public domain separator) and the labels of the two derived keys.
const HKDF_SALT: &[u8] = b"ringkv stateless reset v1";
const RESET_KEY_LABEL: &[u8] = b"quic stateless reset key";
const CID_KEY_LABEL: &[u8] = b"quic connection id key";

/// Binds a serving (and dialing) QUIC endpoint on `listen`, like `Endpoint::server`, but with
/// its stateless-reset key and connection-ID key derived from `reset_secret` when given, so a
/// restart of the same node (same secret) resets its peers' connections to the previous
/// process at their first packet. `None` draws random keys, exactly as `Endpoint::server`.
///
/// Must be called within a tokio runtime.
pub fn bind_endpoint(
    listen: SocketAddr,
    server_config: ServerConfig,
    reset_secret: Option<&[u8; RESET_SECRET_LEN]>,
) -> io::Result<Endpoint> {
    let config = match reset_secret {
        Some(secret) => endpoint_config(secret),
        None => EndpointConfig::default(),
    };
    // What `Endpoint::server` does, with our endpoint configuration.
    let socket = std::net::UdpSocket::bind(listen)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime found"))?;
    Endpoint::new(config, Some(server_config), socket, runtime)
}

/// The endpoint configuration whose reset key and connection-ID key come from `secret`.
fn endpoint_config(secret: &[u8; RESET_SECRET_LEN]) -> EndpointConfig {
    let keys = DerivedKeys::new(secret);
    let mut config = EndpointConfig::new(Arc::new(keys.reset_key));
    let cid_key = keys.cid_key;
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

/// The two keys derived from a reset secret.
struct DerivedKeys {
    reset_key: hmac::Key,
    cid_key: u64,
}

impl DerivedKeys {
    fn new(secret: &[u8; RESET_SECRET_LEN]) -> Self {
        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
        let reset_key = hmac::Key::from(
            prk.expand(&[RESET_KEY_LABEL], hmac::HMAC_SHA256)
                .expect("HKDF output of one hash length"),
        );
        let mut cid_key = [0u8; 8];
        prk.expand(&[CID_KEY_LABEL], Len(cid_key.len()))
            .and_then(|okm| okm.fill(&mut cid_key))
            .expect("HKDF output of 8 bytes");
        Self {
            reset_key,
            cid_key: u64::from_le_bytes(cid_key),
        }
    }
}

/// Loads the reset secret from `dir/reset.key`, creating it (32 random bytes, mode 0600) if
/// it does not exist yet. `dir` must exist.
///
/// The file is created atomically: written to a temporary file in `dir`, fsynced, then
/// linked to its final name (which fails if another process created it meanwhile; that one's
/// secret is then used), and the directory is fsynced, so a crash leaves either no file or a
/// complete one. A file of the wrong length is an error, never silently replaced: replacing
/// it would only make the node's previous connections unresettable, and the operator should
/// know the file was damaged (deleting it is safe).
pub fn reset_secret(dir: &Path) -> io::Result<[u8; RESET_SECRET_LEN]> {
    let path = dir.join(RESET_SECRET_FILE);
    match read_secret(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let mut secret = [0u8; RESET_SECRET_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| io::Error::other("no system randomness for the reset secret"))?;
    let tmp = dir.join(format!(".{RESET_SECRET_FILE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp); // a leftover of a crashed start with the same pid
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&secret)?;
        file.sync_all()?;
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(Some(secret)),
            // Another process won the race: use its secret.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            // A file system without hard links: a rename is atomic too.
            Err(_) => std::fs::rename(&tmp, &path).map(|()| Some(secret)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    let secret = match written? {
        Some(secret) => secret,
        None => return read_secret(&path),
    };
    File::open(dir)?.sync_all()?;
    tracing::info!(path = %path.display(), "created the stateless-reset secret");
    Ok(secret)
}

fn read_secret(path: &Path) -> io::Result<[u8; RESET_SECRET_LEN]> {
    let mut file = File::open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the stateless-reset secret is readable by others; it should be mode 0600");
    }
    let mut secret = [0u8; RESET_SECRET_LEN];
    let mut rest = Vec::new();
    file.read_exact(&mut secret)
        .and_then(|()| file.read_to_end(&mut rest))
        .map_err(|e| bad_length(path, e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad_length(path, "longer than 32 bytes".into()));
    }
    Ok(secret)
}

fn bad_length(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is not a {RESET_SECRET_LEN}-byte reset secret ({why}); delete it to create a new one",
            path.display()
        ),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use quinn_proto::{ConnectionIdGenerator, HashedConnectionIdGenerator};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("ringkv-transport-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn secret_is_created_once_with_mode_0600_and_then_reused() {
        let dir = TempDir::new("secret");
        let first = reset_secret(&dir.0).unwrap();
        let path = dir.0.join(RESET_SECRET_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(reset_secret(&dir.0).unwrap(), first);
        assert_eq!(std::fs::read(&path).unwrap(), first);
        // Nothing else is left in the directory.
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
        // Another directory, another secret.
        let other = TempDir::new("secret");
        assert_ne!(reset_secret(&other.0).unwrap(), first);
    }

    #[test]
    fn damaged_secret_is_refused_not_replaced() {
        let dir = TempDir::new("damaged");
        let path = dir.0.join(RESET_SECRET_FILE);
        for bad in [&b"short"[..], &[7u8; 33][..], &[][..]] {
            std::fs::write(&path, bad).unwrap();
            let e = reset_secret(&dir.0).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), bad);
        }
    }

    #[test]
    fn keys_are_a_function_of_the_secret() {
        let a = DerivedKeys::new(&[1; 32]);
        let b = DerivedKeys::new(&[1; 32]);
        let c = DerivedKeys::new(&[2; 32]);
        let tag = |k: &DerivedKeys| hmac::sign(&k.reset_key, b"cid").as_ref().to_vec();
        assert_eq!(tag(&a), tag(&b));
        assert_ne!(tag(&a), tag(&c));
        assert_eq!(a.cid_key, b.cid_key);
        assert_ne!(a.cid_key, c.cid_key);
        // A connection ID issued by one process validates in the next one (the condition for
        // quinn to answer it with a reset at all), and not under another secret.
        let cid = HashedConnectionIdGenerator::from_key(a.cid_key).generate_cid();
        assert!(HashedConnectionIdGenerator::from_key(b.cid_key)
            .validate(&cid)
            .is_ok());
        assert!(HashedConnectionIdGenerator::from_key(c.cid_key)
            .validate(&cid)
            .is_err());
    }
}
