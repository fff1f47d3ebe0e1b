//! Loading an identity from PEM files, and reading roles out of certificates.

use std::fmt;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

use crate::files;
use crate::{CertError, Result, Role};

/// A loaded identity: the trust anchors (the cluster CA), our certificate chain and our key.
///
/// Invariant once loaded: `ca` and `chain` are non-empty; `chain[0]` is our leaf.
pub struct Identity {
    /// Trust anchors: the cluster CA certificate(s). Peers must chain to one of them.
    pub ca: Vec<CertificateDer<'static>>,
    /// Our certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key (the one matching `chain[0]`).
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads trust anchors from `ca`, our chain from `cert` and our key from `key` (all PEM).
    ///
    /// Fails with [`CertError::BadPem`] if a file does not decode or holds no item of the
    /// expected kind. Whether the key matches the certificate is checked by rustls when a
    /// config is built ([`server_config`](crate::server_config),
    /// [`client_config`](crate::client_config)).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let ca_certs = load_certs(ca)?;
        let chain = load_certs(cert)?;
        let key_pem = files::read(key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::BadPem {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Identity {
            ca: ca_certs,
            chain,
            key,
        })
    }

    /// Loads `ca.pem`, `<name>.pem` and `<name>.key` from a cert directory.
    pub fn from_dir(dir: &Path, name: &str) -> Result<Self> {
        files::validate_name(name)?;
        let ca = files::ca_paths(dir);
        let leaf = files::leaf_paths(dir, name);
        Identity::load(&ca.cert, &leaf.cert, &leaf.key)
    }

    /// The role carried by our own leaf certificate.
    pub fn role(&self) -> Result<Role> {
        role_of_cert(self.chain.first().ok_or(CertError::EmptyChain)?)
    }

    /// The name our own leaf certificate was issued to ([`name_of_cert`]).
    pub fn name(&self) -> Result<String> {
        name_of_cert(self.chain.first().ok_or(CertError::EmptyChain)?)
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    // Never print key material, not even its length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The role carried by `cert`: exactly one `ringkv:role:*` URI SAN.
///
/// Errors: [`CertError::BadCertificate`] if it does not parse, [`CertError::NoRole`] if it has
/// no role SAN, [`CertError::MultipleRoles`] if it has several, [`CertError::UnknownRole`] if
/// the role SAN names no known role. This does not verify the certificate; apply it only to
/// certificates that TLS has verified (e.g. via [`peer_role`](crate::peer_role)).
pub fn role_of_cert(cert: &CertificateDer<'_>) -> Result<Role> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(x509_error)?;
    let san = x509
        .subject_alternative_name()
        .map_err(|source| CertError::BadCertificate { source })?;
    let mut found = None;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        if let Some(role) = Role::from_san_uri(uri) {
            if found.is_some() {
                return Err(CertError::MultipleRoles);
            }
            found = Some(role?);
        }
    }
    found.ok_or(CertError::NoRole)
}

/// The name of `cert`: its subject's common name, which `ringkv-certs issue` sets to the
/// certificate's name (for a node, its name in the ring). Like [`role_of_cert`], apply it only
/// to certificates TLS has verified.
///
/// Errors: [`CertError::BadCertificate`] if it does not parse, [`CertError::NoName`] if the
/// subject has no UTF-8 common name.
pub fn name_of_cert(cert: &CertificateDer<'_>) -> Result<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(x509_error)?;
    let name = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(CertError::NoName)?;
    Ok(name.to_owned())
}

/// Decodes every `CERTIFICATE` item of a PEM buffer read from `path`; at least one.
pub(crate) fn parse_pem_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::BadPem {
            path: path.to_owned(),
            reason: "no CERTIFICATE found".into(),
        });
    }
    Ok(certs)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    parse_pem_certs(path, &files::read(path)?)
}

/// Flattens x509-parser's nom error into [`CertError::BadCertificate`].
pub(crate) fn x509_error(err: x509_parser::nom::Err<x509_parser::error::X509Error>) -> CertError {
    let source = match err {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => x509_parser::error::X509Error::InvalidCertificate,
    };
    CertError::BadCertificate { source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn self_signed_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn role_from_single_uri() {
        for role in Role::ALL {
            let cert = self_signed_with_uris(&["https://example.com/x", &role.san_uri()]);
            assert_eq!(role_of_cert(&cert).unwrap(), role);
        }
    }

    #[test]
    fn no_role() {
        let cert = self_signed_with_uris(&["https://example.com/x"]);
        assert!(matches!(role_of_cert(&cert), Err(CertError::NoRole)));
        let key = KeyPair::generate().unwrap();
        let bare = CertificateParams::default().self_signed(&key).unwrap();
        assert!(matches!(role_of_cert(bare.der()), Err(CertError::NoRole)));
    }

    #[test]
    fn multiple_roles_rejected() {
        let cert = self_signed_with_uris(&[&Role::Client.san_uri(), &Role::Admin.san_uri()]);
        assert!(matches!(role_of_cert(&cert), Err(CertError::MultipleRoles)));
        // Even the same role twice is ambiguous material: reject.
        let cert = self_signed_with_uris(&[&Role::Node.san_uri(), &Role::Node.san_uri()]);
        assert!(matches!(role_of_cert(&cert), Err(CertError::MultipleRoles)));
    }

    #[test]
    fn unknown_role_rejected() {
        let cert = self_signed_with_uris(&["ringkv:role:root"]);
        assert!(matches!(
            role_of_cert(&cert),
            Err(CertError::UnknownRole { value }) if value == "root"
        ));
    }

    #[test]
    fn garbage_is_bad_certificate() {
        let cert = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02]);
        assert!(matches!(
            role_of_cert(&cert),
            Err(CertError::BadCertificate { .. })
        ));
    }

    #[test]
    fn pem_without_certificates_is_bad_pem() {
        let err = parse_pem_certs(Path::new("x.pem"), b"hello").unwrap_err();
        assert!(matches!(err, CertError::BadPem { .. }), "{err}");
    }
}
