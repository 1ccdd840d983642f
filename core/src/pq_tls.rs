//! Post-quantum TLS: the hybrid `X25519MLKEM768` key exchange ([draft-ietf-tls-ecdhe-mlkem])
//! on `ml-kem` and `x25519-dalek`, and the rustls [`CryptoProvider`] both qpq peers use.
//!
//! rustls's *ring* provider has only classical groups; rustls's own X25519MLKEM768 lives in its
//! aws-lc-rs provider, which would make the router binary about 30 % larger. [`crypto_provider`]
//! is ring's default provider with [`X25519MLKEM768`] added in front of X25519, P-256 and P-384.
//! A client lists its groups in preference order and a rustls server takes the first one it also
//! supports, so two qpq peers agree on the hybrid group while a classical-only peer still gets
//! X25519 or a NIST curve.
//!
//! The encoding (code point 0x11EC) puts the ML-KEM part first:
//!
//! | | bytes |
//! |---|---|
//! | client key share | ML-KEM-768 encapsulation key (1184) ‖ X25519 public key (32) |
//! | server key share | ML-KEM-768 ciphertext (1088) ‖ X25519 public key (32) |
//! | shared secret | ML-KEM-768 shared secret (32) ‖ X25519 shared secret (32) |
//!
//! The client also offers the X25519 half on its own as an `x25519` key share
//! ([`ActiveKeyExchange::hybrid_component`]), so a classical-only server completes without a
//! HelloRetryRequest and the client generates one X25519 key, not two.
//!
//! Randomness comes from the operating system (`rand::rngs::OsRng`); ML-KEM key generation and
//! encapsulation take it as explicit seeds (FIPS 203 `ML-KEM.KeyGen_internal` and
//! `ML-KEM.Encaps_internal`), which is also what lets the tests run known-answer vectors through
//! the same code.
//!
//! [draft-ietf-tls-ecdhe-mlkem]: https://datatracker.ietf.org/doc/draft-ietf-tls-ecdhe-mlkem/

use ml_kem::array::Array;
use ml_kem::{
    B32, Decapsulate, DecapsulationKey768, EncapsulationKey768, KeyExport, MlKem768, Seed,
};
use rand::RngCore;
use rand::rngs::OsRng;
use rustls::crypto::ring::kx_group;
use rustls::crypto::{
    ActiveKeyExchange, CompletedKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup,
};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// rustls's *ring* provider with [`KX_GROUPS`] as its key-exchange groups: the hybrid
/// `X25519MLKEM768` first (preferred), then X25519, P-256 and P-384.
///
/// Every TLS configuration qpq builds uses this provider explicitly (never a process default).
pub fn crypto_provider() -> CryptoProvider {
    CryptoProvider { kx_groups: KX_GROUPS.to_vec(), ..rustls::crypto::ring::default_provider() }
}

/// The key-exchange groups of [`crypto_provider`], most preferred first.
pub static KX_GROUPS: &[&dyn SupportedKxGroup] =
    &[X25519MLKEM768, kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];

/// The hybrid `X25519MLKEM768` key-exchange group (TLS 1.3 only).
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// See [`X25519MLKEM768`].
#[derive(Debug)]
struct X25519MlKem768;

impl SupportedKxGroup for X25519MlKem768 {
    /// Client side: a fresh ML-KEM-768 key pair and X25519 key.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut seed = Zeroizing::new([0u8; MLKEM_SEED_LEN]);
        let mut x25519 = Zeroizing::new([0u8; X25519_LEN]);
        fill_random(seed.as_mut_slice())?;
        fill_random(x25519.as_mut_slice())?;
        Ok(Box::new(ClientKeyExchange::new(&seed, &x25519)))
    }

    /// Server side: encapsulates to the client's ML-KEM key and answers its X25519 share.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let mut m = Zeroizing::new([0u8; MLKEM_RANDOMNESS_LEN]);
        let mut x25519 = Zeroizing::new([0u8; X25519_LEN]);
        fill_random(m.as_mut_slice())?;
        fill_random(x25519.as_mut_slice())?;
        server_complete(client_share, &m, &x25519)
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The client's half of a hybrid key exchange in progress.
struct ClientKeyExchange {
    /// Zeroized on drop (`ml-kem` feature `zeroize`).
    mlkem: DecapsulationKey768,
    /// Zeroized on drop (`x25519-dalek` feature `zeroize`).
    x25519: StaticSecret,
    /// Encapsulation key ‖ X25519 public key.
    share: Vec<u8>,
}

impl ClientKeyExchange {
    /// Derives the key pair from a 64-byte ML-KEM seed `d ‖ z` and a 32-byte X25519 secret.
    fn new(mlkem_seed: &[u8; MLKEM_SEED_LEN], x25519: &[u8; X25519_LEN]) -> Self {
        let mut seed = Seed::from(*mlkem_seed);
        let mlkem = DecapsulationKey768::from_seed(seed);
        seed.zeroize();
        Self::from_keys(mlkem, StaticSecret::from(*x25519))
    }

    fn from_keys(mlkem: DecapsulationKey768, x25519: StaticSecret) -> Self {
        let mut share = Vec::with_capacity(CLIENT_SHARE_LEN);
        share.extend_from_slice(&mlkem.encapsulation_key().to_bytes());
        share.extend_from_slice(PublicKey::from(&x25519).as_bytes());
        Self { mlkem, x25519, share }
    }
}

impl ActiveKeyExchange for ClientKeyExchange {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != SERVER_SHARE_LEN {
            return Err(INVALID_KEY_SHARE);
        }
        let (ciphertext, x25519_peer) = server_share.split_at(MLKEM_CIPHERTEXT_LEN);
        let ciphertext =
            ml_kem::Ciphertext::<MlKem768>::try_from(ciphertext).map_err(|_| INVALID_KEY_SHARE)?;
        let x25519 = x25519_agree(&self.x25519, x25519_peer)?;
        // Decapsulation cannot fail: a forged ciphertext yields an unrelated key (implicit
        // rejection), and the handshake then fails at the server's Finished.
        let mut mlkem = self.mlkem.decapsulate(&ciphertext);
        let secret = combine(&mlkem, x25519.as_bytes());
        mlkem.zeroize();
        Ok(secret)
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, self.share.get(MLKEM_ENCAPSULATION_KEY_LEN..)?))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        let x25519 = x25519_agree(&self.x25519, server_share)?;
        Ok(SharedSecret::from(x25519.as_bytes().as_slice()))
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

/// The server's side with explicit randomness: the ML-KEM encapsulation seed `m` and an X25519
/// secret.
fn server_complete(
    client_share: &[u8],
    m: &[u8; MLKEM_RANDOMNESS_LEN],
    x25519: &[u8; X25519_LEN],
) -> Result<CompletedKeyExchange, Error> {
    if client_share.len() != CLIENT_SHARE_LEN {
        return Err(INVALID_KEY_SHARE);
    }
    let (encapsulation_key, x25519_peer) = client_share.split_at(MLKEM_ENCAPSULATION_KEY_LEN);
    let encapsulation_key = Array::try_from(encapsulation_key).map_err(|_| INVALID_KEY_SHARE)?;
    // FIPS 203 §7.2 input check (the modulus check); failing it is the peer's fault.
    let encapsulation_key =
        EncapsulationKey768::new(&encapsulation_key).map_err(|_| INVALID_KEY_SHARE)?;
    let x25519 = StaticSecret::from(*x25519);
    let x25519_shared = x25519_agree(&x25519, x25519_peer)?;

    let mut m = B32::from(*m);
    let (ciphertext, mut mlkem) = encapsulation_key.encapsulate_deterministic(&m);
    m.zeroize();
    let mut pub_key = Vec::with_capacity(SERVER_SHARE_LEN);
    pub_key.extend_from_slice(&ciphertext);
    pub_key.extend_from_slice(PublicKey::from(&x25519).as_bytes());
    let secret = combine(&mlkem, x25519_shared.as_bytes());
    mlkem.zeroize();
    Ok(CompletedKeyExchange { group: NamedGroup::X25519MLKEM768, pub_key, secret })
}

/// X25519 with a peer's 32-byte public key; an all-zero result (a low-order point, RFC 7748
/// §6.1) is refused, as rustls's own providers do.
fn x25519_agree(ours: &StaticSecret, peer: &[u8]) -> Result<x25519_dalek::SharedSecret, Error> {
    let peer: [u8; X25519_LEN] = peer.try_into().map_err(|_| INVALID_KEY_SHARE)?;
    let shared = ours.diffie_hellman(&PublicKey::from(peer));
    if shared.was_contributory() { Ok(shared) } else { Err(INVALID_KEY_SHARE) }
}

/// ML-KEM shared secret ‖ X25519 shared secret, in a buffer rustls zeroizes on drop.
fn combine(mlkem: &[u8], x25519: &[u8]) -> SharedSecret {
    let mut secret = Vec::with_capacity(SHARED_SECRET_LEN);
    secret.extend_from_slice(mlkem);
    secret.extend_from_slice(x25519);
    SharedSecret::from(secret)
}

fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    OsRng.try_fill_bytes(buf).map_err(|_| Error::FailedToGetRandomBytes)
}

const INVALID_KEY_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

const X25519_LEN: usize = 32;
const MLKEM_SEED_LEN: usize = 64;
const MLKEM_RANDOMNESS_LEN: usize = 32;
const MLKEM_ENCAPSULATION_KEY_LEN: usize = 1184;
const MLKEM_CIPHERTEXT_LEN: usize = 1088;
const MLKEM_SHARED_SECRET_LEN: usize = 32;
const CLIENT_SHARE_LEN: usize = MLKEM_ENCAPSULATION_KEY_LEN + X25519_LEN;
const SERVER_SHARE_LEN: usize = MLKEM_CIPHERTEXT_LEN + X25519_LEN;
const SHARED_SECRET_LEN: usize = MLKEM_SHARED_SECRET_LEN + X25519_LEN;

#[cfg(test)]
mod tests;
