//! The server's KeyPackage reader (`qpq_core::keypackage`) against real KeyPackages: those a
//! qpq client makes (`Mls::key_package`, v1 credentials), legacy ones with a 32-byte
//! credential, the mlswg test vectors (an independent implementation's signatures), and
//! mutations of each: every byte flipped, each signature byte, swapped and forged credentials,
//! truncation, a trailing byte, non-minimal and huge vector lengths. Also the handshake label
//! (`is_handshake`) of real commits, proposals, Welcomes and application messages.
//!
//! Run with `cargo test -p qpq-core --features mls --test keypackage`.
#![cfg(feature = "mls")]

use std::sync::Arc;

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use qpq_core::credential::{self, CredentialError};
use qpq_core::identity::Identity;
use qpq_core::keypackage::{self, KeyPackageError, MAX_KEY_PACKAGE_LEN, is_handshake};
use qpq_core::mls::{CIPHERSUITE, Kind, Mls, QpqProvider};
use qpq_core::vault::{KdfParams, Vault};

const FAST: KdfParams = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };

struct Device {
    mls: Mls,
    key: [u8; 32],
    seed: [u8; 32],
    vault: Arc<Vault>,
    _dir: tempfile::TempDir,
}

fn device() -> Device {
    let dir = tempfile::tempdir().unwrap();
    let vault = Arc::new(Vault::create(&dir.path().join("v"), b"pw", FAST).unwrap());
    let identity = Identity::generate();
    let seed = *identity.seed();
    let key = identity.public_key();
    Device { mls: Mls::new(vault.clone(), identity), key, seed, vault, _dir: dir }
}

/// A KeyPackage with any credential, signed by `signer` (whose key is the leaf's), built with
/// openmls directly: what a modified client could upload.
fn custom(d: &Device, signer: &Identity, identity: Vec<u8>, last_resort: bool) -> Vec<u8> {
    let provider = QpqProvider::new(d.vault.clone());
    let cred = CredentialWithKey {
        credential: BasicCredential::new(identity).into(),
        signature_key: signer.public_key().to_vec().into(),
    };
    let mut builder = KeyPackage::builder();
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder.build(CIPHERSUITE, &provider, signer, cred).unwrap();
    MlsMessageOut::from(bundle.key_package().clone()).tls_serialize_detached().unwrap()
}

fn err(bytes: &[u8]) -> KeyPackageError {
    match keypackage::parse(bytes) {
        Ok(kp) => kp.verify().expect_err("a mutated KeyPackage verified"),
        Err(e) => e,
    }
}

/// The offsets of the leaf signature and of the KeyPackage signature (64 bytes each, after
/// the 2-byte length 0x4040), for a package whose KeyPackage extensions list is `ext_len` bytes.
fn signature_offsets(kp: &[u8], ext_len: usize) -> (usize, usize) {
    let sig = kp.len() - 64;
    assert_eq!(kp[sig - 2..sig], [0x40, 0x40]);
    let leaf = sig - 2 - (ext_len + 1) - 64;
    assert_eq!(kp[leaf - 2..leaf], [0x40, 0x40]);
    (leaf, sig)
}

#[test]
fn a_client_key_package_parses_verifies_and_binds_its_account() {
    let alice = device();
    let bytes = alice.mls.key_package().unwrap();
    let kp = keypackage::parse(&bytes).unwrap();
    assert_eq!(kp.cipher_suite, 0x004F);
    assert_eq!(kp.signature_key, alice.key);
    assert_eq!(kp.init_key.len(), 1216, "X-Wing public key");
    assert_eq!(kp.encryption_key.len(), 1216);
    assert!(kp.not_before < kp.not_after);
    assert!(!kp.last_resort);
    let binding = kp.verify().unwrap();
    assert_eq!(binding.account, alice.key);
    assert_eq!(binding.device, alice.key);
    // Each package is fresh, and each verifies.
    let other = alice.mls.key_package().unwrap();
    assert_ne!(other, bytes);
    assert_eq!(keypackage::parse(&other).unwrap().verify().unwrap().account, alice.key);
}

#[test]
fn legacy_and_last_resort_key_packages_pass() {
    let alice = device();
    let signer = Identity::from_seed(&alice.seed);
    let legacy = custom(&alice, &signer, alice.key.to_vec(), false);
    let kp = keypackage::parse(&legacy).unwrap();
    assert_eq!(kp.identity.len(), 32);
    assert_eq!(kp.verify().unwrap().account, alice.key);

    let last = custom(&alice, &signer, alice.key.to_vec(), true);
    let kp = keypackage::parse(&last).unwrap();
    assert!(kp.last_resort, "the last_resort extension is seen");
    assert_eq!(kp.verify().unwrap().account, alice.key);
}

#[test]
fn every_flipped_byte_is_refused() {
    let alice = device();
    let bytes = alice.mls.key_package().unwrap();
    let (leaf_sig, sig) = signature_offsets(&bytes, 0);
    for i in 0..bytes.len() {
        let mut m = bytes.clone();
        m[i] ^= 0x01;
        let e = err(&m);
        if (leaf_sig..leaf_sig + 64).contains(&i) {
            assert_eq!(e, KeyPackageError::BadLeafSignature, "leaf signature byte {i}");
        } else if (sig..sig + 64).contains(&i) {
            assert_eq!(e, KeyPackageError::BadSignature, "KeyPackage signature byte {i}");
        }
    }
    // A flip inside the KeyPackage fields outside the leaf breaks only the outer signature.
    let mut m = bytes.clone();
    m[12] ^= 0x80; // inside the init key
    assert_eq!(err(&m), KeyPackageError::BadSignature);
    // Inside the leaf (its encryption key), the leaf signature fails first.
    let mut m = bytes.clone();
    m[4 + 4 + 2 + 1216 + 2 + 5] ^= 0x80;
    assert_eq!(err(&m), KeyPackageError::BadLeafSignature);
}

#[test]
fn swapped_and_forged_credentials_are_refused() {
    let (alice, bob, mallory) = (device(), device(), device());
    let alice_kp = alice.mls.key_package().unwrap();
    let bob_kp = bob.mls.key_package().unwrap();
    let cred_len = credential::V1_LEN;
    let find = |kp: &[u8], key: &[u8; 32]| {
        kp.windows(cred_len).position(|w| w.starts_with(credential::V1_TAG) && &w[4..36] == key)
    };
    // bob's credential pasted into alice's package (same length): the leaf signature covers it.
    let (a, b) = (find(&alice_kp, &alice.key).unwrap(), find(&bob_kp, &bob.key).unwrap());
    let mut swapped = alice_kp.clone();
    swapped[a..a + cred_len].copy_from_slice(&bob_kp[b..b + cred_len]);
    assert_eq!(err(&swapped), KeyPackageError::BadLeafSignature);

    // mallory signs a package whose credential names alice's account: her own signatures are
    // fine, the binding is not.
    let signer = Identity::from_seed(&mallory.seed);
    let forged =
        custom(&mallory, &signer, credential::encode_v1(&alice.key, &mallory.key, &[7; 64]), false);
    assert_eq!(err(&forged), KeyPackageError::Credential(CredentialError::BadSignature));
    let claimed =
        custom(&mallory, &signer, credential::encode_v1(&alice.key, &alice.key, &[0; 64]), false);
    assert_eq!(err(&claimed), KeyPackageError::Credential(CredentialError::KeyMismatch));
    let legacy = custom(&mallory, &signer, alice.key.to_vec(), false);
    assert_eq!(err(&legacy), KeyPackageError::Credential(CredentialError::KeyMismatch));
    let junk = custom(&mallory, &signer, b"mallory".to_vec(), false);
    assert_eq!(err(&junk), KeyPackageError::Credential(CredentialError::Malformed));
    // A valid package of bob's stays bob's: the uploader check is the server's (account).
    assert_eq!(keypackage::parse(&bob_kp).unwrap().verify().unwrap().account, bob.key);
}

#[test]
fn truncation_trailing_bytes_and_framing_are_refused() {
    let alice = device();
    let bytes = alice.mls.key_package().unwrap();
    for len in 0..bytes.len() {
        assert!(
            matches!(
                keypackage::parse(&bytes[..len]),
                Err(KeyPackageError::Malformed(_) | KeyPackageError::NotKeyPackage)
            ),
            "prefix of {len} bytes"
        );
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(
        keypackage::parse(&trailing).unwrap_err(),
        KeyPackageError::Malformed("trailing bytes after the KeyPackage")
    );
    // A bare KeyPackage (no MLSMessage header), or another wire format.
    assert_eq!(keypackage::parse(&bytes[4..]).unwrap_err(), KeyPackageError::NotKeyPackage);
    let mut welcome = bytes.clone();
    welcome[3] = 3;
    assert_eq!(keypackage::parse(&welcome).unwrap_err(), KeyPackageError::NotKeyPackage);
    let mut version = bytes.clone();
    version[5] = 2;
    assert_eq!(keypackage::parse(&version).unwrap_err(), KeyPackageError::UnsupportedVersion(2));
    // Another ciphersuite: parsed, but not one this reader can verify (and the signature
    // would not match anyway).
    let mut suite = bytes.clone();
    suite[7] = 0x02;
    assert_eq!(err(&suite), KeyPackageError::UnsupportedCiphersuite(0x0002));
    // Oversized input is refused before it is read.
    let mut huge = bytes.clone();
    huge.resize(MAX_KEY_PACKAGE_LEN + 1, 0);
    assert!(matches!(keypackage::parse(&huge), Err(KeyPackageError::TooLarge { .. })));
}

#[test]
fn non_minimal_and_huge_vector_lengths_are_refused() {
    let alice = device();
    let bytes = alice.mls.key_package().unwrap();
    // The init key's length (1216) is at offset 8 in its 2-byte form 0x44C0.
    assert_eq!(&bytes[8..10], &[0x44, 0xC0]);
    let mut long_form = bytes[..8].to_vec();
    long_form.extend_from_slice(&[0x80, 0x00, 0x04, 0xC0]);
    long_form.extend_from_slice(&bytes[10..]);
    assert_eq!(
        keypackage::parse(&long_form).unwrap_err(),
        KeyPackageError::Malformed("vector length not minimally encoded")
    );
    // The signature key's length (32) written in the 2-byte form.
    let at = 10 + 1216 + 2 + 1216;
    assert_eq!(bytes[at], 32);
    let mut two = bytes[..at].to_vec();
    two.extend_from_slice(&[0x40, 32]);
    two.extend_from_slice(&bytes[at + 1..]);
    assert_eq!(
        keypackage::parse(&two).unwrap_err(),
        KeyPackageError::Malformed("vector length not minimally encoded")
    );
    // A length announcing a gigabyte, and the invalid 11 prefix.
    for prefix in [[0xBF, 0xFF, 0xFF, 0xFF], [0xC0, 0x00, 0x04, 0xC0]] {
        let mut m = bytes[..8].to_vec();
        m.extend_from_slice(&prefix);
        m.extend_from_slice(&bytes[10..]);
        assert!(matches!(keypackage::parse(&m), Err(KeyPackageError::Malformed(_))), "{prefix:?}");
    }
}

#[test]
fn mlswg_vectors_have_valid_signatures_but_no_qpq_credential() {
    // Key packages made by another implementation (suite 1, Ed25519, credential "Arnold"):
    // both signatures verify with our SignContent encoding; the credential is not a qpq one.
    let text = include_str!("vectors/mls/passive-client-welcome.suite1.json");
    let cases: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
    assert_eq!(cases.len(), 8);
    for case in &cases {
        let bytes = hex::decode(case["key_package"].as_str().unwrap()).unwrap();
        let kp = keypackage::parse(&bytes).unwrap();
        assert_eq!(kp.cipher_suite, 1);
        assert_eq!(kp.identity, b"Arnold");
        assert_eq!(
            kp.verify().unwrap_err(),
            KeyPackageError::Credential(CredentialError::Malformed)
        );
        let mut m = bytes.clone();
        let last = m.len() - 1;
        m[last] ^= 1;
        assert_eq!(err(&m), KeyPackageError::BadSignature);
    }
}

#[test]
fn handshake_messages_are_labelled_by_their_clear_header() {
    let (alice, bob, carol) = (device(), device(), device());
    let group = alice.mls.create(Kind::Group).unwrap();
    let out = alice.mls.add(&group, &[bob.mls.key_package().unwrap()], &[bob.key]).unwrap();
    alice.mls.confirm(&group).unwrap();
    let welcome = out.welcome.clone().unwrap();
    assert!(is_handshake(&welcome), "Welcome");
    bob.mls.process(&welcome).unwrap();

    let add = alice.mls.add(&group, &[carol.mls.key_package().unwrap()], &[carol.key]).unwrap();
    assert!(is_handshake(&add.commit), "commit");
    alice.mls.confirm(&group).unwrap();
    bob.mls.process(&add.commit).unwrap();
    carol.mls.process(add.welcome.as_ref().unwrap()).unwrap();

    let (application, _) = alice.mls.encrypt(&group, b"hello").unwrap();
    assert!(!is_handshake(&application), "application message");
    assert!(bob.mls.process(&application).is_ok());

    let update = alice.mls.self_update(&group).unwrap();
    assert!(is_handshake(&update.commit), "self-update commit");
    alice.mls.abandon(&group).unwrap();

    let (proposal, _) = carol.mls.leave(&group).unwrap();
    assert!(is_handshake(&proposal), "leave proposal");

    assert!(!is_handshake(&alice.mls.key_package().unwrap()), "a KeyPackage is not");
}
