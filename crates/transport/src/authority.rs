//! The ring authority: who may say what the ring is (ARCHITECTURE.md §4).
//!
//! Only the ECS issues ring metadata. It signs every version with the key of its `ecs`-role
//! certificate ([`RingSigner`]); every node and client opens metadata — whether it came from
//! the ECS, from gossip, from a `NotResponsible` reply, `GetMetadata` or its own store — only
//! through [`RingAuthority::open`], which verifies the signature against the cluster CA
//! (`ringkv_certs::MetadataVerifier`) before decoding and validating the ring
//! (`ringkv_wire::SignedMetadata::open`). Refusals are logged and counted.

use std::sync::atomic::{AtomicU64, Ordering};

use ringkv_certs::{CertError, CertificateDer, Identity, MetadataSigner, MetadataVerifier};
use ringkv_wire::{MetadataSignature, RingMetadata, SignedMetadata, WireError};

/// Verifies ring metadata signatures against the cluster CA, counting refusals.
#[derive(Debug)]
pub struct RingAuthority {
    verifier: MetadataVerifier,
    refused: AtomicU64,
}

impl RingAuthority {
    /// An authority trusting the CA of `identity` (every ringkv identity carries its
    /// cluster's CA).
    pub fn new(identity: &Identity) -> Result<Self, CertError> {
        Ok(Self {
            verifier: MetadataVerifier::new(&identity.ca)?,
            refused: AtomicU64::new(0),
        })
    }

    /// The metadata inside `signed`, if the ECS signed it and it is a valid ring. A refusal
    /// is counted ([`RingAuthority::refused`]) and logged with `source`.
    pub fn open(&self, signed: &SignedMetadata, source: &str) -> Result<RingMetadata, WireError> {
        let opened = signed.open(|signature, message| {
            let chain: Vec<CertificateDer<'_>> = signature
                .signer
                .iter()
                .map(|der| CertificateDer::from(der.as_slice()))
                .collect();
            self.verifier
                .verify(&chain, signature.scheme, message, &signature.signature)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = &opened {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(version = signed.version, source, error = %e, "refused ring metadata");
        }
        opened
    }

    /// How many metadata versions were refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The ECS's signer of ring metadata.
#[derive(Debug)]
pub struct RingSigner {
    signer: MetadataSigner,
}

impl RingSigner {
    /// The signer of `identity`, which must carry the `ecs` role.
    pub fn new(identity: &Identity) -> Result<Self, CertError> {
        Ok(Self {
            signer: MetadataSigner::new(identity)?,
        })
    }

    /// `metadata` validated, encoded and signed.
    pub fn sign(&self, metadata: &RingMetadata) -> Result<SignedMetadata, WireError> {
        SignedMetadata::sign(metadata, |message| {
            let signature = self.signer.sign(message).map_err(|e| e.to_string())?;
            Ok(MetadataSignature {
                scheme: signature.scheme,
                signature: signature.bytes,
                signer: self
                    .signer
                    .chain()
                    .iter()
                    .map(|der| serde_bytes::ByteBuf::from(der.to_vec()))
                    .collect(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ringkv_certs::{init_ca, issue, IssueOptions, Role};
    use ringkv_wire::NodeEntry;

    use super::*;

    #[test]
    fn only_what_the_ecs_signed_opens() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        for (role, name) in [(Role::Ecs, "ecs"), (Role::Node, "n1")] {
            issue(dir.path(), &IssueOptions::new(role, name)).unwrap();
        }
        let ecs = Identity::from_dir(dir.path(), "ecs").unwrap();
        let node = Identity::from_dir(dir.path(), "n1").unwrap();
        let authority = RingAuthority::new(&node).unwrap();
        let md = RingMetadata::new(3, vec![NodeEntry::new("n1", "127.0.0.1:1")]).unwrap();

        let signed = RingSigner::new(&ecs).unwrap().sign(&md).unwrap();
        assert_eq!(authority.open(&signed, "test").unwrap(), md);
        assert_eq!(authority.refused(), 0);

        // A node certificate cannot sign; a signature copied onto other bytes does not open.
        assert!(RingSigner::new(&node).is_err());
        let mut other = md.clone();
        other.version = u64::MAX;
        let mut forged = signed.clone();
        forged.version = u64::MAX;
        forged.ring = Arc::new(other.to_frame().unwrap());
        assert!(matches!(
            authority.open(&forged, "test"),
            Err(WireError::Unauthenticated(_))
        ));
        let unsigned = SignedMetadata {
            signature: Arc::default(),
            ..signed.clone()
        };
        assert!(matches!(
            authority.open(&unsigned, "test"),
            Err(WireError::Unauthenticated(_))
        ));
        assert_eq!(authority.refused(), 2);
    }
}
