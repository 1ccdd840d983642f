//! Device identity: an Ed25519 key pair, and the codes people compare to verify each other.

use ed25519_dalek::{Signer as _, SigningKey};
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use rand::RngCore;
use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

/// An Ed25519 identity. The secret key is zeroized on drop (ed25519-dalek's `SigningKey`).
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("public", &hex(&self.public_key())).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut_slice());
        Self::from_seed(&seed)
    }

    /// The identity with this 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(seed) }
    }

    /// The secret seed, for the encrypted store.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// An Ed25519 signature over `message`.
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// The public key: the identity key the server and peers know this device by.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
}

impl Signer for Identity {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Iterations of SHA-512 per fingerprint half, as in Signal's numeric fingerprints.
const FINGERPRINT_ITERATIONS: usize = 5200;
/// Version prefix of the fingerprint hash input.
const FINGERPRINT_VERSION: [u8; 2] = [0, 0];

/// The 60-digit safety number of two identities, in 12 groups of 5. Both sides compute the
/// same string whatever the argument order: each half is one identity's 30-digit fingerprint,
/// and the halves are sorted.
pub fn safety_number(a: &[u8; 32], b: &[u8; 32]) -> String {
    let (fa, fb) = (fingerprint_digits(a), fingerprint_digits(b));
    let (first, second) = if fa <= fb { (fa, fb) } else { (fb, fa) };
    let digits = format!("{first}{second}");
    digits
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// 30 decimal digits from an iterated hash of one identity key.
fn fingerprint_digits(key: &[u8; 32]) -> String {
    let mut h: Vec<u8> = [FINGERPRINT_VERSION.as_slice(), key.as_slice()].concat();
    for _ in 0..FINGERPRINT_ITERATIONS {
        let mut d = Sha512::new();
        d.update(&h);
        d.update(key);
        h = d.finalize().to_vec();
    }
    h[..30]
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use openmls_traits::signatures::Signer;

    use super::*;

    #[test]
    fn safety_numbers_are_symmetric_60_digits_and_key_dependent() {
        let (a, b, c) = (Identity::generate(), Identity::generate(), Identity::generate());
        let ab = safety_number(&a.public_key(), &b.public_key());
        assert_eq!(ab, safety_number(&b.public_key(), &a.public_key()));
        assert_eq!(ab.chars().filter(char::is_ascii_digit).count(), 60);
        assert_eq!(ab.split(' ').count(), 12);
        assert_ne!(ab, safety_number(&a.public_key(), &c.public_key()));
    }

    #[test]
    fn seed_round_trip_and_signatures_verify() {
        let a = Identity::generate();
        let b = Identity::from_seed(&a.seed());
        assert_eq!(a.public_key(), b.public_key());
        let sig = a.sign(b"hello").unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&a.public_key()).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
        vk.verify_strict(b"hello", &sig).unwrap();
    }

    #[test]
    fn known_answer_for_a_fixed_pair() {
        // Pinned so the algorithm cannot change silently: two sides on different versions
        // would show different numbers.
        let n = safety_number(&[1u8; 32], &[2u8; 32]);
        assert_eq!(n, safety_number(&[2u8; 32], &[1u8; 32]));
        assert_eq!(n.len(), 60 + 11);
        assert_eq!(n, "09660 03372 41519 75212 31969 66406 90065 10035 03980 63284 48565 52618");
    }
}
