//! The qpq credential: what the identity of an MLS leaf's `BasicCredential` holds, binding the
//! leaf's signature key (a device key) to an account identity key.
//!
//! - **v1, linked device** (`identity` = 132 bytes): `"qpq1" ‖ account key (32) ‖ device key
//!   (32) ‖ Ed25519 signature by the account key (64)` over `"qpq device binding v1" ‖ account
//!   key ‖ device key`. The leaf's signature key must be the device key.
//! - **v1, the account's own device** (`identity` = 36 bytes): `"qpq1" ‖ account key`; the
//!   device key is the account key, which must be the leaf's signature key, so the leaf's own
//!   signatures prove the binding. For now every account has just this one device. (The first
//!   builds of v0.2 wrote this case in the 132-byte form with a self-signature; it is still
//!   accepted.) Every member's credential sits in every group's ratchet tree, so the short
//!   form keeps a 1,000-member Welcome ~100 KB smaller.
//!
//! Admin lists, safety numbers and trust on first use refer to the account key.
//! - **legacy** (`identity` = 32 bytes, written by v0.1): the account key, which must equal the
//!   leaf's signature key.
//!
//! Anything else is refused. Without the binding check, a KeyPackage could name one account
//! in its credential and be signed by another's key: the substitution a dishonest server or
//! member would use. The check needs no feature: the server runs it on every KeyPackage upload.

/// Tag at the start of a v1 credential.
pub const V1_TAG: &[u8; 4] = b"qpq1";
/// Length of a v1 credential for a linked device.
pub const V1_LEN: usize = 4 + 32 + 32 + 64;
/// Length of a v1 credential for the account's own device (its key is the account key).
pub const V1_OWN_LEN: usize = 4 + 32;
/// What the account key signs, before the two keys.
pub const BINDING_LABEL: &[u8] = b"qpq device binding v1";

/// An account and the device key it vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The account identity key.
    pub account: [u8; 32],
    /// The device's signature key (the MLS leaf's signature key).
    pub device: [u8; 32],
}

/// A credential that does not bind its leaf to an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// Neither a v1 nor a legacy credential.
    #[error("not a qpq credential")]
    Malformed,
    /// The credential names another key than the one that signs the leaf.
    #[error("the credential names another key than the one that signs")]
    KeyMismatch,
    /// The account's signature over the device key does not verify.
    #[error("the account's signature on the device key is invalid")]
    BadSignature,
}

/// The bytes the account key signs to vouch for `device`.
pub fn binding_message(account: &[u8; 32], device: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BINDING_LABEL.len() + 64);
    m.extend_from_slice(BINDING_LABEL);
    m.extend_from_slice(account);
    m.extend_from_slice(device);
    m
}

/// A v1 credential from its parts (`signature` over [`binding_message`]).
pub fn encode_v1(account: &[u8; 32], device: &[u8; 32], signature: &[u8; 64]) -> Vec<u8> {
    let mut c = Vec::with_capacity(V1_LEN);
    c.extend_from_slice(V1_TAG);
    c.extend_from_slice(account);
    c.extend_from_slice(device);
    c.extend_from_slice(signature);
    c
}

/// A v1 credential for the account's own device, whose key is the account key.
pub fn encode_v1_own(account: &[u8; 32]) -> Vec<u8> {
    [V1_TAG.as_slice(), account].concat()
}

/// The account and device a credential names, without checking the signature: for leaves
/// that were verified with [`verify`] when they entered the group.
pub fn parse(identity: &[u8]) -> Result<Binding, CredentialError> {
    match identity.len() {
        32 => {
            let key: [u8; 32] = identity.try_into().map_err(|_| CredentialError::Malformed)?;
            Ok(Binding { account: key, device: key })
        }
        V1_OWN_LEN if identity.starts_with(V1_TAG) => {
            let key: [u8; 32] = identity[4..].try_into().map_err(|_| CredentialError::Malformed)?;
            Ok(Binding { account: key, device: key })
        }
        V1_LEN if identity.starts_with(V1_TAG) => {
            let account = identity[4..36].try_into().map_err(|_| CredentialError::Malformed)?;
            let device = identity[36..68].try_into().map_err(|_| CredentialError::Malformed)?;
            Ok(Binding { account, device })
        }
        _ => Err(CredentialError::Malformed),
    }
}

/// Checks a credential's `identity` against the `signature_key` of the leaf that carries it,
/// and returns the account and device it binds.
pub fn verify(identity: &[u8], signature_key: &[u8]) -> Result<Binding, CredentialError> {
    let binding = parse(identity)?;
    if signature_key != binding.device {
        return Err(CredentialError::KeyMismatch);
    }
    // When the device key is the account key itself (an account's first device), the leaf's
    // own signatures, which MLS verifies wherever a leaf enters a group, are made with the
    // account key: they prove the binding, and the self-signature adds nothing.
    if identity.len() == V1_LEN && binding.account != binding.device {
        let key =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, binding.account);
        key.verify(&binding_message(&binding.account, &binding.device), &identity[68..])
            .map_err(|_| CredentialError::BadSignature)?;
    }
    Ok(binding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn public(k: &Ed25519KeyPair) -> [u8; 32] {
        k.public_key().as_ref().try_into().unwrap()
    }

    fn v1(account: &Ed25519KeyPair, device: [u8; 32]) -> Vec<u8> {
        let sig = account.sign(&binding_message(&public(account), &device));
        encode_v1(&public(account), &device, sig.as_ref().try_into().unwrap())
    }

    #[test]
    fn v1_binds_a_device_to_its_account() {
        let (alice, phone) = (key(1), key(2));
        let cred = v1(&alice, public(&phone));
        let b = verify(&cred, &public(&phone)).unwrap();
        assert_eq!(b, Binding { account: public(&alice), device: public(&phone) });
        // The first device: the account key is the device key.
        let own = v1(&alice, public(&alice));
        assert_eq!(verify(&own, &public(&alice)).unwrap().account, public(&alice));
        // There the leaf's signatures (by the same key) carry the proof, not this field.
        let unsigned = encode_v1(&public(&alice), &public(&alice), &[0; 64]);
        assert_eq!(verify(&unsigned, &public(&alice)).unwrap().account, public(&alice));
        // ... which the short form says without the field.
        let short = encode_v1_own(&public(&alice));
        assert_eq!(short.len(), V1_OWN_LEN);
        assert_eq!(verify(&short, &public(&alice)).unwrap().account, public(&alice));
        let bob = key(2);
        assert_eq!(verify(&short, &public(&bob)), Err(CredentialError::KeyMismatch));
    }

    #[test]
    fn substitutions_are_refused() {
        let (alice, bob, mallory) = (key(1), key(2), key(3));
        // mallory's leaf wearing alice's credential.
        let cred = v1(&alice, public(&alice));
        assert_eq!(verify(&cred, &public(&mallory)), Err(CredentialError::KeyMismatch));
        // mallory claims alice's account for her own device, without alice's signature.
        let mut forged = encode_v1(&public(&alice), &public(&mallory), &[0; 64]);
        assert_eq!(verify(&forged, &public(&mallory)), Err(CredentialError::BadSignature));
        // ... or with her own signature in place of alice's.
        let sig = mallory.sign(&binding_message(&public(&alice), &public(&mallory)));
        forged[68..].copy_from_slice(sig.as_ref());
        assert_eq!(verify(&forged, &public(&mallory)), Err(CredentialError::BadSignature));
        // A binding for bob's device is not one for mallory's.
        let bobs = v1(&bob, public(&bob));
        let mut moved = bobs.clone();
        moved[36..68].copy_from_slice(&public(&mallory));
        assert_eq!(verify(&moved, &public(&mallory)), Err(CredentialError::BadSignature));
        // Legacy: the key must be the signing key.
        assert_eq!(verify(&public(&bob), &public(&mallory)), Err(CredentialError::KeyMismatch));
        assert_eq!(verify(&public(&bob), &public(&bob)).unwrap().account, public(&bob));
        // Other shapes.
        for bad in [&b""[..], &[0u8; 31], &[0u8; 33], &[0u8; V1_LEN]] {
            assert_eq!(verify(bad, &public(&bob)), Err(CredentialError::Malformed));
        }
    }
}
