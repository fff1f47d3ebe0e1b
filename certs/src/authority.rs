//! Signing and verifying ring metadata: only the ECS speaks for the ring.
//!
//! The ECS signs every metadata version it issues with the key of its `ecs`-role certificate
//! ([`MetadataSigner`]); nodes and clients accept metadata — from the ECS, from gossip or
//! piggybacked on a `NotResponsible` reply — only once [`MetadataVerifier`] has checked that
//! the signer's certificate chains to the cluster CA (the same WebPKI path validation TLS
//! applies to a peer, validity period included), carries the `ecs` role, and that the
//! signature over the metadata verifies under that certificate's key. So holding a `node`,
//! `client` or `admin` certificate, or relaying metadata, gives no power over the ring.
//!
//! The signature scheme is one TLS 1.3 allows for the key's type (ECDSA P-256 with SHA-256
//! for the keys `ringkv-certs` makes), computed and checked with rustls' `ring` provider, the
//! one crypto provider of the workspace. What is signed (a domain-separated encoding of the
//! metadata) is the caller's business: this module signs and verifies bytes.

use std::sync::Arc;

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SigningKey;
use rustls::SignatureScheme;

use crate::{role_of_cert, CertError, Identity, Result, Role};

/// Signature schemes the signer may use, in order of preference: the TLS 1.3 schemes for the
/// key types rcgen and rustls support.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// A signature made by a [`MetadataSigner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The TLS `SignatureScheme` code of the algorithm.
    pub scheme: u16,
    /// The signature bytes.
    pub bytes: Vec<u8>,
}

/// The ECS's signing key, from an identity whose certificate carries the `ecs` role.
pub struct MetadataSigner {
    key: Arc<dyn SigningKey>,
    scheme: SignatureScheme,
    chain: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for MetadataSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataSigner")
            .field("scheme", &self.scheme)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl MetadataSigner {
    /// The signer of `id`. Fails unless `id`'s certificate carries the `ecs` role: operators'
    /// `admin` certificates administer through the ECS, they do not speak for it.
    pub fn new(id: &Identity) -> Result<Self> {
        let role = id.role()?;
        if role != Role::Ecs {
            return Err(CertError::BadSignature(format!(
                "ring metadata is signed with an ecs certificate, not a {role} certificate"
            )));
        }
        let key = rustls::crypto::ring::sign::any_supported_type(&id.key)?;
        let scheme = key
            .choose_scheme(SCHEMES)
            .ok_or_else(|| {
                CertError::BadSignature(format!(
                    "no TLS 1.3 signature scheme for a {:?} key",
                    key.algorithm()
                ))
            })?
            .scheme();
        // The leaf alone: the cluster CA signs every leaf directly (ARCHITECTURE.md §4), and
        // verifiers refuse anything more.
        let leaf = id.chain.first().ok_or(CertError::EmptyChain)?;
        Ok(Self {
            key,
            scheme,
            chain: vec![leaf.clone()],
        })
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Signature> {
        let signer = self
            .key
            .choose_scheme(&[self.scheme])
            .expect("the scheme chosen at construction");
        Ok(Signature {
            scheme: u16::from(self.scheme),
            bytes: signer.sign(message)?,
        })
    }

    /// The signer's certificate chain, which travels with each signature: its leaf alone.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

/// Checks signatures of ring metadata against the cluster CA.
pub struct MetadataVerifier {
    chains: Arc<dyn ClientCertVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for MetadataVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataVerifier").finish_non_exhaustive()
    }
}

impl MetadataVerifier {
    /// A verifier trusting the CA certificates `ca` (an [`Identity`]'s `ca`).
    pub fn new(ca: &[CertificateDer<'static>]) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let chains =
            WebPkiClientVerifier::builder_with_provider(crate::tls::root_store(ca)?, provider)
                .build()?;
        Ok(Self { chains, algorithms })
    }

    /// `Ok` if `signature` (scheme `scheme`) over `message` was made by the key of `chain[0]`,
    /// and `chain` is that leaf alone, valid, unexpired, signed by the CA and carrying the
    /// `ecs` role. The cluster CA signs every leaf directly (ARCHITECTURE.md §4), so a chain
    /// with anything after the leaf is refused: path validation would never look at it, and
    /// it would travel and be stored with the metadata unparsed. Every refusal is
    /// [`CertError::BadSignature`] with the reason.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        scheme: u16,
        message: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        let refuse = |why: String| CertError::BadSignature(why);
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| refuse("no signer certificate".into()))?;
        if !intermediates.is_empty() {
            return Err(refuse(format!(
                "{} certificates after the signer's leaf; the cluster CA signs leaves directly",
                intermediates.len()
            )));
        }
        let role = role_of_cert(leaf).map_err(|e| refuse(format!("signer certificate: {e}")))?;
        if role != Role::Ecs {
            return Err(refuse(format!(
                "signed by a {role} certificate; only the ecs role signs ring metadata"
            )));
        }
        self.chains
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| refuse(format!("signer certificate not trusted: {e}")))?;
        let scheme = SignatureScheme::from(scheme);
        let algorithms = self
            .algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme && SCHEMES.contains(s))
            .map(|(_, algs)| *algs)
            .ok_or_else(|| refuse(format!("unsupported signature scheme {scheme:?}")))?;
        let leaf = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| refuse(format!("signer certificate: {e}")))?;
        if algorithms
            .iter()
            .any(|alg| leaf.verify_signature(*alg, message, signature).is_ok())
        {
            Ok(())
        } else {
            Err(refuse("signature does not verify".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{init_ca, issue, IssueOptions};

    fn identity(dir: &std::path::Path, role: Role, name: &str) -> Identity {
        issue(dir, &IssueOptions::new(role, name)).unwrap();
        Identity::from_dir(dir, name).unwrap()
    }

    #[test]
    fn only_an_ecs_certificate_of_the_cluster_signs() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        let ecs = identity(dir.path(), Role::Ecs, "ecs");
        let signer = MetadataSigner::new(&ecs).unwrap();
        let verifier = MetadataVerifier::new(&ecs.ca).unwrap();
        let sig = signer.sign(b"ring v7").unwrap();
        assert_eq!(
            sig.scheme,
            u16::from(SignatureScheme::ECDSA_NISTP256_SHA256)
        );
        verifier
            .verify(signer.chain(), sig.scheme, b"ring v7", &sig.bytes)
            .unwrap();

        let refused =
            |chain: &[CertificateDer<'_>], scheme: u16, msg: &[u8], bytes: &[u8]| match verifier
                .verify(chain, scheme, msg, bytes)
            {
                Err(CertError::BadSignature(why)) => why,
                other => panic!("expected a refusal, got {other:?}"),
            };
        // Other message, damaged signature, other scheme, no chain.
        assert!(refused(signer.chain(), sig.scheme, b"ring v8", &sig.bytes).contains("verify"));
        let mut bad = sig.bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(refused(signer.chain(), sig.scheme, b"ring v7", &bad).contains("verify"));
        let ed = u16::from(SignatureScheme::ED25519);
        assert!(refused(signer.chain(), ed, b"ring v7", &sig.bytes).contains("verify"));
        assert!(refused(&[], sig.scheme, b"ring v7", &sig.bytes).contains("no signer"));
        // The leaf alone: anything after it (junk, or even the CA itself) is refused.
        assert_eq!(signer.chain().len(), 1);
        for extra in [CertificateDer::from(vec![0x30; 16]), ecs.ca[0].clone()] {
            let padded = [signer.chain()[0].clone(), extra];
            assert!(refused(&padded, sig.scheme, b"ring v7", &sig.bytes).contains("after the"));
        }

        // A node or admin certificate can neither make a signer nor pass as one.
        for role in [Role::Node, Role::Admin, Role::Client] {
            let other = identity(dir.path(), role, role.as_str());
            assert!(MetadataSigner::new(&other).is_err());
            let key = rustls::crypto::ring::sign::any_supported_type(&other.key).unwrap();
            let forged = key
                .choose_scheme(SCHEMES)
                .unwrap()
                .sign(b"ring v7")
                .unwrap();
            assert!(refused(&other.chain, sig.scheme, b"ring v7", &forged).contains("only the ecs"));
        }

        // An ecs certificate of another cluster's CA is not trusted.
        let foreign = tempfile::tempdir().unwrap();
        init_ca(foreign.path(), false).unwrap();
        let theirs = MetadataSigner::new(&identity(foreign.path(), Role::Ecs, "ecs")).unwrap();
        let sig = theirs.sign(b"ring v7").unwrap();
        assert!(refused(theirs.chain(), sig.scheme, b"ring v7", &sig.bytes).contains("trusted"));
    }
}
