//! Ring metadata as it travels and is stored: encoded once, signed by the ECS.
//!
//! [`SignedMetadata`] is the only form in which ring metadata crosses the network (install,
//! gossip, `NotResponsible`, `GetMetadata`) or sits in a node's store. It carries the encoded
//! [`RingMetadata`] (a frame, see [`RingMetadata::to_frame`]), its version readable without
//! decoding, and the ECS's signature over `SIGNED_DOMAIN ‖ frame` together with the signer's
//! certificate chain. The only way to get a [`RingMetadata`] out of it is
//! [`SignedMetadata::open`], which first has the caller's verifier check the signature and then
//! decodes and validates the frame: metadata nobody verified is never routed with.
//!
//! This crate does no cryptography: the verifier and the signer are the caller's
//! (`ringkv_transport::RingAuthority` wires them to `ringkv_certs`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ring::RingMetadata;
use crate::WireError;

/// What precedes the encoded metadata in the signed message, so that a signature over ring
/// metadata can never be taken for a signature over anything else the key signs (and the
/// other way round).
pub const SIGNED_DOMAIN: &[u8] = b"ringkv ring metadata v1\0";

/// Most bytes signed metadata may take encoded ([`SignedMetadata::encoded_len`]): what a
/// default frame holds besides its [`crate::limits::FRAME_OVERHEAD`], so that every message
/// carrying one (an install, fenced or not, a gossip push, a `GetMetadata` or
/// `NotResponsible` reply) fits a frame. Checked by [`SignedMetadata::sign`] and first thing
/// in [`SignedMetadata::open`]: metadata padded past it (say, with junk in the signer's
/// chain) would make every reply that hands it on too large to send.
pub const MAX_SIGNED_METADATA: usize =
    crate::limits::DEFAULT_MAX_KEY + crate::limits::DEFAULT_MAX_VALUE;

/// The ECS's signature over one encoded metadata version.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MetadataSignature {
    /// The TLS `SignatureScheme` code of the algorithm.
    pub scheme: u16,
    /// The signature bytes.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// The signer's certificate chain (DER), leaf first; at most
    /// [`crate::MAX_SIGNER_CHAIN`] certificates.
    #[serde(deserialize_with = "crate::bounded::signer_chain")]
    pub signer: Vec<serde_bytes::ByteBuf>,
}

/// Ring metadata in its encoded, signed form. Cloning shares the bytes: a node hands the same
/// signed metadata to every peer that needs it, byte for byte as the ECS made it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMetadata {
    /// The version of the metadata inside (checked against it by [`SignedMetadata::open`]).
    pub version: u64,
    /// The encoded [`RingMetadata`].
    #[serde(with = "shared_bytes")]
    pub ring: Arc<Vec<u8>>,
    /// The ECS's signature over [`SIGNED_DOMAIN`] followed by `ring`.
    pub signature: Arc<MetadataSignature>,
}

impl SignedMetadata {
    /// At least the bytes this takes in a frame (ring, signature, signer chain), plus room
    /// for their lengths and tags.
    pub fn encoded_len_bound(&self) -> usize {
        let signer: usize = self.signature.signer.iter().map(|c| c.len() + 10).sum();
        self.ring.len() + self.signature.signature.len() + signer + 64
    }
}

/// Serde for `Arc<Vec<u8>>` as a byte string (as `serde_bytes` does for `Vec<u8>`).
mod shared_bytes {
    use std::sync::Arc;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Arc<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(bytes.as_slice(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<u8>>, D::Error> {
        serde_bytes::deserialize::<Vec<u8>, D>(d).map(Arc::new)
    }
}

impl std::fmt::Debug for SignedMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SignedMetadata(v{}, {} bytes, {} signature bytes)",
            self.version,
            self.ring.len(),
            self.signature.signature.len()
        )
    }
}

/// The message a signature covers: [`SIGNED_DOMAIN`] followed by the encoded metadata.
pub fn signed_message(ring: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNED_DOMAIN.len() + ring.len());
    message.extend_from_slice(SIGNED_DOMAIN);
    message.extend_from_slice(ring);
    message
}

impl SignedMetadata {
    /// Encodes `metadata` and signs it with `sign`, which is given the message to sign
    /// ([`signed_message`]).
    pub fn sign(
        metadata: &RingMetadata,
        sign: impl FnOnce(&[u8]) -> Result<MetadataSignature, String>,
    ) -> Result<Self, WireError> {
        metadata.validate()?;
        let ring = metadata.to_frame()?;
        let signature = sign(&signed_message(&ring)).map_err(WireError::Unauthenticated)?;
        let signed = Self {
            version: metadata.version,
            ring: Arc::new(ring),
            signature: Arc::new(signature),
        };
        signed.check_size()?;
        Ok(signed)
    }

    /// An upper bound of this metadata's encoded length: every byte string's and every
    /// integer's length, with the longest length prefix (a `u64` varint) for each.
    pub fn encoded_len(&self) -> usize {
        const VARINT: usize = 10;
        let signature = &self.signature;
        let chain: usize = signature.signer.iter().map(|c| VARINT + c.len()).sum();
        VARINT // version
            + VARINT + self.ring.len()
            + VARINT // scheme
            + VARINT + signature.signature.len()
            + VARINT + chain
    }

    /// [`WireError::MetadataTooLarge`] if [`SignedMetadata::encoded_len`] exceeds
    /// [`MAX_SIGNED_METADATA`].
    fn check_size(&self) -> Result<(), WireError> {
        let len = self.encoded_len();
        if len > MAX_SIGNED_METADATA {
            return Err(WireError::MetadataTooLarge {
                len,
                max: MAX_SIGNED_METADATA,
            });
        }
        Ok(())
    }

    /// The metadata inside, once it was found no larger than [`MAX_SIGNED_METADATA`],
    /// `verify` accepted the signature (it is given the signature and the signed message) and
    /// the frame decoded and validated ([`RingMetadata::from_frame`]) with the announced
    /// version. Refusals: [`WireError::MetadataTooLarge`] for the size,
    /// [`WireError::Unauthenticated`] for the signature, the decoder's errors otherwise.
    pub fn open(
        &self,
        verify: impl FnOnce(&MetadataSignature, &[u8]) -> Result<(), String>,
    ) -> Result<RingMetadata, WireError> {
        self.check_size()?;
        verify(&self.signature, &signed_message(&self.ring)).map_err(WireError::Unauthenticated)?;
        let metadata = RingMetadata::from_frame(&self.ring)?;
        if metadata.version != self.version {
            return Err(WireError::Malformed(format!(
                "signed metadata announced version {} but holds version {}",
                self.version, metadata.version
            )));
        }
        Ok(metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeEntry;

    /// A stand-in "signature": the message itself (this crate does no cryptography; the real
    /// signer and verifier are tested in ringkv-certs and ringkv-transport).
    fn sign(message: &[u8]) -> Result<MetadataSignature, String> {
        Ok(MetadataSignature {
            scheme: 1,
            signature: message.to_vec(),
            signer: Vec::new(),
        })
    }

    fn verify(sig: &MetadataSignature, message: &[u8]) -> Result<(), String> {
        if sig.signature == message {
            Ok(())
        } else {
            Err("signature does not verify".into())
        }
    }

    #[test]
    fn open_checks_the_signature_then_what_it_holds() {
        let md = RingMetadata::new(
            4,
            vec![NodeEntry::new("a", "h:1"), NodeEntry::new("b", "h:2")],
        )
        .unwrap();
        let signed = SignedMetadata::sign(&md, sign).unwrap();
        assert_eq!(signed.version, 4);
        assert!(signed.signature.signature.starts_with(SIGNED_DOMAIN));
        assert_eq!(signed.open(verify).unwrap(), md);

        // Any change to the signed bytes is caught by the verifier, before decoding.
        let mut forged = signed.clone();
        let mut ring = (*forged.ring).clone();
        *ring.last_mut().unwrap() ^= 1;
        forged.ring = Arc::new(ring);
        assert!(matches!(
            forged.open(verify),
            Err(WireError::Unauthenticated(_))
        ));

        // A version that lies about the contents is refused even if signed.
        let mut lying = signed.clone();
        lying.version = 5;
        assert!(matches!(lying.open(verify), Err(WireError::Malformed(_))));

        // Invalid rings are never signed.
        let mut unsorted = md.clone();
        unsorted.nodes.reverse();
        assert!(matches!(
            SignedMetadata::sign(&unsorted, sign),
            Err(WireError::InvalidRing(_))
        ));
        // Metadata too large for the frames that carry it is neither signed nor opened.
        let padding = |message: &[u8]| {
            let mut signature = sign(message)?;
            signature.signer = vec![serde_bytes::ByteBuf::from(vec![0; MAX_SIGNED_METADATA])];
            Ok(signature)
        };
        assert!(matches!(
            SignedMetadata::sign(&md, padding),
            Err(WireError::MetadataTooLarge { .. })
        ));
        let mut padded = signed.clone();
        let mut signature = MetadataSignature::clone(&padded.signature);
        signature.signer = vec![serde_bytes::ByteBuf::from(vec![0; MAX_SIGNED_METADATA])];
        padded.signature = Arc::new(signature);
        assert!(matches!(
            padded.open(verify),
            Err(WireError::MetadataTooLarge { len, max }) if len > max
        ));
        // A refusing signer is an error, not an unsigned result.
        assert!(matches!(
            SignedMetadata::sign(&md, |_| Err("no key".into())),
            Err(WireError::Unauthenticated(_))
        ));
    }
}
