//! Known-answer tests of the cryptography qpq-core relies on, against independently written
//! vectors copied into `tests/vectors` (sources and snapshot commits in its README.md),
//! driven through the same entry points our code uses wherever those are reachable from outside:
//!
//! - X-Wing (our MLS ciphersuite's KEM) through `openmls_rust_crypto::RustCrypto` as
//!   `OpenMlsCrypto`, and through the `x-wing` crate underneath it for what the provider does not
//!   expose (raw seed key generation, derandomised encapsulation, raw decapsulation).
//! - ML-KEM-768 NIST ACVP vectors against the `ml-kem` in our graph (X-Wing's lattice half).
//! - Wycheproof ChaCha20-Poly1305 (the vault's AEAD), Ed25519 verification (our identities, through
//!   the provider's `verify_signature`) and HKDF-SHA256 (our MLS ciphersuite's KDF, through the
//!   provider).
//! - Argon2id with explicit parameters, as the vault's KDF and the OPAQUE KSF call it.
//! - OPAQUE-3DH ristretto255/SHA-512 (RFC 9807 App. C) end to end through opaque-ke's public API,
//!   and the RFC 9497 OPRF (mode 0) vectors through voprf.
//!
//! Every test counts the cases it ran and compares the count with the number the file holds, so
//! an empty or truncated file fails instead of passing silently; and every vector file must match
//! its sha256 in `tests/vectors/SHA256SUMS` (`vector_files_match_sha256sums`).
#![cfg(feature = "mls")]

#[path = "kat/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::path::Path;

use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, HashType, HpkeAeadType, HpkeCiphertext, HpkeConfig, HpkeKdfType,
    HpkeKemType, SignatureScheme,
};
use support::{
    Expect, HpkeSchedule, ScriptedRng, array_field, as_array, expect, hex_field, load,
    opt_hex_field, str_field, u64_field, vectors_dir, wide_scalar, wycheproof_tests,
};

/// The MLS ciphersuite qpq uses.
const OUR_CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519;

/// The HPKE KEM id that goes into HPKE's `suite_id` for our ciphersuite's KEM. openmls_traits
/// calls the KEM `XWingKemDraft6` (its own enum value 0x004D); openmls_rust_crypto maps that to
/// hpke-rs `XWingDraft06`, whose id is X-Wing's HPKE code point 0x647a (hpke-rs marks 0x004D
/// obsolete). Should the mapping ever move back to 0x004D, the HPKE checks below fail (checked by
/// mutation), and so would interop with other X-Wing HPKE implementations.
const XWING_HPKE_KEM_ID: u16 = 0x647a;
const HPKE_KDF_HKDF_SHA256: u16 = 0x0001;
const HPKE_AEAD_AES128GCM: u16 = 0x0001;

// ------------------------------------------------------------------------------------------------
// 0. The vector files themselves
// ------------------------------------------------------------------------------------------------

/// The files `tests/vectors/SHA256SUMS` lists: this file, the passive-client tests in
/// `mls_storage.rs` and the `pq_tls` unit tests read them all.
const VECTOR_FILES: usize = 14;

/// Every file in `tests/vectors` (but the README and SHA256SUMS itself) is listed in SHA256SUMS
/// (`sha256sum` format) and has that sha256, so a corrupted, truncated, missing or unlisted copy
/// fails here by name before any case count could hide it.
#[test]
fn vector_files_match_sha256sums() {
    use sha2::{Digest, Sha256};

    let dir = vectors_dir();
    let sums_path = dir.join("SHA256SUMS");
    let sums = std::fs::read_to_string(&sums_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", sums_path.display()));
    let (mut listed, mut wrong) = (BTreeSet::new(), Vec::new());
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (want, name) =
            line.split_once("  ").unwrap_or_else(|| panic!("SHA256SUMS: bad line {line:?}"));
        assert!(listed.insert(name.to_owned()), "SHA256SUMS lists {name} twice");
        let path = dir.join(name);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("cannot read test vectors {}: {e}", path.display()));
        let got = hex::encode(Sha256::digest(&bytes));
        if got != want {
            wrong.push(format!("{name}: sha256 {got}, SHA256SUMS says {want}"));
        }
    }
    let wrong = wrong.join("\n");
    assert!(wrong.is_empty(), "vector files differ from tests/vectors/SHA256SUMS:\n{wrong}");

    let mut present = BTreeSet::new();
    files_under(&dir, &dir, &mut present);
    present.remove("README.md");
    present.remove("SHA256SUMS");
    assert_eq!(present, listed, "tests/vectors holds exactly the files SHA256SUMS lists");
    assert_eq!(listed.len(), VECTOR_FILES);
}

/// The files under `dir`, as `/`-separated paths relative to `root`.
fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).unwrap();
            let parts: Vec<_> = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect();
            out.insert(parts.join("/"));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// 1. X-Wing
// ------------------------------------------------------------------------------------------------

/// SHAKE256(ikm, 32 bytes): the seed X-Wing's HPKE `DeriveKeyPair` generates from
/// (draft-connolly-cfrg-xwing-kem-08 §5.6; hpke-rs does the same for its `XWingDraft06`).
fn shake256_32(ikm: &[u8]) -> [u8; 32] {
    use shake::{ExtendableOutput, Update, XofReader};
    let mut h = shake::Shake256::default();
    h.update(ikm);
    let mut out = [0u8; 32];
    h.finalize_xof().read(&mut out);
    out
}

/// The X-Wing public key of a 32-byte X-Wing private key, via the `x-wing` crate.
fn xwing_public(sk: [u8; 32]) -> Vec<u8> {
    use x_wing::{Decapsulator, KeyExport};
    x_wing::DecapsulationKey::from(sk).encapsulation_key().to_bytes().to_vec()
}

/// What the provider exposes is HPKE, not the raw KEM: `derive_hpke_keypair(ikm)` (which applies
/// X-Wing's DeriveKeyPair, i.e. SHAKE256(ikm) first, so a vector seed cannot be fed to it
/// directly), `hpke_seal`/`hpke_open` and `hpke_setup_{sender,receiver}_and_export` (which take a
/// raw private key and the KEM ciphertext but never hand out the KEM shared secret). So:
///
/// - through the provider: decapsulating the vector ciphertext with the vector private key
///   yields the vector shared secret, shown by opening an HPKE message and an exporter value that
///   were computed here from that shared secret with an independent RFC 9180 key schedule; a
///   ciphertext with one flipped bit no longer opens; the vector public key and private key form
///   a pair (seal to one, open with the other); and `derive_hpke_keypair` equals SHAKE256 +
///   the vector-checked key generation below;
/// - through the `x-wing` crate (what the provider calls underneath, hpke-rs-rust-crypto's
///   `pq_kem`): seed -> (sk, pk), derandomised encapsulation with `eseed` -> (ct, ss), and raw
///   decapsulation of ct -> ss.
#[test]
fn xwing_vectors_through_the_mls_provider_and_the_x_wing_crate() {
    use x_wing::{Decapsulate, Decapsulator, KeyExport};

    let file = load("xwing/xwing_test_vectors.json");
    let vectors = as_array(&file);
    let provider = RustCrypto::default();
    provider.supports(OUR_CIPHERSUITE).expect("the provider supports our ciphersuite");
    assert!(matches!(
        OUR_CIPHERSUITE.hpke_config(),
        HpkeConfig(HpkeKemType::XWingKemDraft6, HpkeKdfType::HkdfSha256, HpkeAeadType::AesGcm128)
    ));

    let info = b"qpq-lite KAT info";
    let aad = b"qpq-lite KAT aad";
    let mut ran = 0usize;
    for (i, v) in vectors.iter().enumerate() {
        let seed = hex_field(v, "seed");
        let sk = hex_field(v, "sk");
        let pk = hex_field(v, "pk");
        let eseed = hex_field(v, "eseed");
        let ct = hex_field(v, "ct");
        let ss = hex_field(v, "ss");
        assert_eq!(seed, sk, "vector {i}: an X-Wing private key is its 32-byte seed");
        let sk32: [u8; 32] = sk.as_slice().try_into().expect("32-byte X-Wing private key");

        // The x-wing crate: key generation, encapsulation, decapsulation.
        let dk = x_wing::DecapsulationKey::from(sk32);
        assert_eq!(dk.as_bytes().as_slice(), sk.as_slice(), "vector {i}: sk");
        let ek = dk.encapsulation_key();
        assert_eq!(ek.to_bytes().as_slice(), pk.as_slice(), "vector {i}: pk from seed");
        let randomness = ml_kem::array::Array::try_from(eseed.as_slice()).expect("64-byte eseed");
        let (ct_enc, ss_enc) = ek.encapsulate_deterministic(&randomness);
        assert_eq!(ct_enc.as_slice(), ct.as_slice(), "vector {i}: encapsulation ct");
        assert_eq!(ss_enc.as_slice(), ss.as_slice(), "vector {i}: encapsulation ss");
        let ct_arr = x_wing::Ciphertext::try_from(ct.as_slice()).expect("1120-byte ciphertext");
        assert_eq!(dk.decapsulate(&ct_arr).as_slice(), ss.as_slice(), "vector {i}: decaps ss");

        // The provider: decapsulate the vector ciphertext inside HPKE open / export.
        let schedule = HpkeSchedule::base(
            XWING_HPKE_KEM_ID,
            HPKE_KDF_HKDF_SHA256,
            HPKE_AEAD_AES128GCM,
            16,
            12,
            &ss,
            info,
        );
        let plaintext = format!("X-Wing vector {i}").into_bytes();
        let sealed = provider
            .aead_encrypt(AeadType::Aes128Gcm, &schedule.key, &plaintext, &schedule.base_nonce, aad)
            .expect("AES-128-GCM seal");
        let message =
            HpkeCiphertext { kem_output: ct.clone().into(), ciphertext: sealed.clone().into() };
        let opened = provider
            .hpke_open(OUR_CIPHERSUITE.hpke_config(), &message, &sk, info, aad)
            .unwrap_or_else(|e| panic!("vector {i}: provider could not open: {e:?}"));
        assert_eq!(opened, plaintext, "vector {i}: hpke_open");
        let exported = provider
            .hpke_setup_receiver_and_export(
                OUR_CIPHERSUITE.hpke_config(),
                &ct,
                &sk,
                info,
                b"exporter context",
                32,
            )
            .expect("receiver export");
        assert_eq!(
            &*exported,
            schedule.export(b"exporter context", 32).as_slice(),
            "vector {i}: export"
        );

        let mut tampered = ct.clone();
        tampered[0] ^= 0x01;
        let tampered = HpkeCiphertext { kem_output: tampered.into(), ciphertext: sealed.into() };
        assert!(
            provider.hpke_open(OUR_CIPHERSUITE.hpke_config(), &tampered, &sk, info, aad).is_err(),
            "vector {i}: a modified KEM ciphertext must not open"
        );

        // The provider: the vector pk and sk are a pair.
        let to_vector_pk = provider
            .hpke_seal(OUR_CIPHERSUITE.hpke_config(), &pk, info, aad, &plaintext)
            .expect("seal to the vector public key");
        let reopened = provider
            .hpke_open(OUR_CIPHERSUITE.hpke_config(), &to_vector_pk, &sk, info, aad)
            .expect("open with the vector private key");
        assert_eq!(reopened, plaintext, "vector {i}: seal to pk, open with sk");

        // The provider: DeriveKeyPair(ikm) = key generation from SHAKE256(ikm, 32).
        let derived = provider
            .derive_hpke_keypair(OUR_CIPHERSUITE.hpke_config(), &seed)
            .expect("derive_hpke_keypair");
        let expected_sk = shake256_32(&seed);
        assert_eq!(&*derived.private, expected_sk.as_slice(), "vector {i}: derived sk");
        assert_eq!(derived.public, xwing_public(expected_sk), "vector {i}: derived pk");

        ran += 1;
    }
    assert_eq!(ran, vectors.len());
    assert_eq!(ran, 3, "xwing_test_vectors.json holds 3 vectors");
}

// ------------------------------------------------------------------------------------------------
// 2. ML-KEM-768 (NIST ACVP)
// ------------------------------------------------------------------------------------------------

#[allow(deprecated)] // ACVP gives dk in the expanded FIPS 203 encoding
fn mlkem_dk_from_expanded(dk: &[u8]) -> ml_kem::DecapsulationKey768 {
    use ml_kem::ExpandedKeyEncoding;
    let enc = ml_kem::array::Array::try_from(dk).expect("2400-byte expanded dk");
    ml_kem::DecapsulationKey768::from_expanded_bytes(&enc).expect("valid expanded dk")
}

#[allow(deprecated)]
fn mlkem_dk_to_expanded(dk: &ml_kem::DecapsulationKey768) -> Vec<u8> {
    use ml_kem::ExpandedKeyEncoding;
    dk.to_expanded_bytes().to_vec()
}

#[test]
fn mlkem768_acvp_keygen() {
    use ml_kem::KeyExport;

    let file = load("mlkem/acvp_ML-KEM-768_keyGen.json");
    assert_eq!(str_field(&file, "algorithm"), "ML-KEM");
    let mut ran = 0usize;
    for group in array_field(&file, "testGroups") {
        assert_eq!(str_field(group, "parameterSet"), "ML-KEM-768");
        for t in array_field(group, "tests") {
            let id = u64_field(t, "tcId");
            let seed = [hex_field(t, "d"), hex_field(t, "z")].concat();
            let seed = ml_kem::Seed::try_from(seed.as_slice()).expect("d || z is 64 bytes");
            let dk = ml_kem::DecapsulationKey768::from_seed(seed);
            assert_eq!(
                dk.encapsulation_key().to_bytes().as_slice(),
                hex_field(t, "ek"),
                "tcId {id}: ek"
            );
            assert_eq!(mlkem_dk_to_expanded(&dk), hex_field(t, "dk"), "tcId {id}: dk");
            ran += 1;
        }
    }
    assert_eq!(ran, 25, "the ML-KEM-768 keyGen group holds 25 tests");
}

#[test]
fn mlkem768_acvp_encapsulation_and_decapsulation() {
    use ml_kem::{Decapsulate, KeyExport};

    let file = load("mlkem/acvp_ML-KEM-768_encapDecap.json");
    assert_eq!(str_field(&file, "algorithm"), "ML-KEM");
    let (mut encaps, mut decaps) = (0usize, 0usize);
    for group in array_field(&file, "testGroups") {
        assert_eq!(str_field(group, "parameterSet"), "ML-KEM-768");
        match str_field(group, "function") {
            "encapsulation" => {
                for t in array_field(group, "tests") {
                    let id = u64_field(t, "tcId");
                    let ek_bytes = hex_field(t, "ek");
                    let ek_arr =
                        ml_kem::array::Array::try_from(ek_bytes.as_slice()).expect("1184-byte ek");
                    let ek = ml_kem::EncapsulationKey768::new(&ek_arr).expect("valid ek");
                    assert_eq!(ek.to_bytes().as_slice(), ek_bytes.as_slice());
                    let m = ml_kem::B32::try_from(hex_field(t, "m").as_slice()).expect("32-byte m");
                    let (c, k) = ek.encapsulate_deterministic(&m);
                    assert_eq!(c.as_slice(), hex_field(t, "c"), "tcId {id}: c");
                    assert_eq!(k.as_slice(), hex_field(t, "k"), "tcId {id}: k");
                    // The same case decapsulated with its dk.
                    let dk = mlkem_dk_from_expanded(&hex_field(t, "dk"));
                    assert_eq!(
                        dk.decapsulate(&c).as_slice(),
                        hex_field(t, "k"),
                        "tcId {id}: decaps"
                    );
                    encaps += 1;
                }
            }
            "decapsulation" => {
                let dk = mlkem_dk_from_expanded(&hex_field(group, "dk"));
                assert_eq!(dk.encapsulation_key().to_bytes().as_slice(), hex_field(group, "ek"));
                for t in array_field(group, "tests") {
                    let id = u64_field(t, "tcId");
                    let c = ml_kem::Ciphertext::<ml_kem::MlKem768>::try_from(
                        hex_field(t, "c").as_slice(),
                    )
                    .expect("1088-byte ciphertext");
                    // Includes implicit-rejection cases: k is then J(z || c), not an error.
                    assert_eq!(dk.decapsulate(&c).as_slice(), hex_field(t, "k"), "tcId {id}: k");
                    decaps += 1;
                }
            }
            other => panic!("unexpected ACVP function {other:?}"),
        }
    }
    assert_eq!(encaps, 25, "the ML-KEM-768 AFT encapsulation group holds 25 tests");
    assert_eq!(decaps, 10, "the ML-KEM-768 VAL decapsulation group holds 10 tests");
}

// ------------------------------------------------------------------------------------------------
// 3. Wycheproof
// ------------------------------------------------------------------------------------------------

/// The vault seals with `ChaCha20Poly1305::new(Key::from_slice(..))` and
/// `encrypt/decrypt(Nonce::from_slice(nonce), Payload { msg, aad })`; the same calls here.
#[test]
fn wycheproof_chacha20_poly1305_as_the_vault_calls_it() {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

    let file = load("wycheproof/chacha20_poly1305_test.json");
    assert_eq!(str_field(&file, "algorithm"), "CHACHA20-POLY1305");
    let tests = wycheproof_tests(&file, "aead_test_schema_v1.json");
    let (mut valid, mut invalid, mut bad_nonce_size) = (0usize, 0usize, 0usize);
    for (_, t) in &tests {
        let id = u64_field(t, "tcId");
        let key = hex_field(t, "key");
        let iv = hex_field(t, "iv");
        let aad = hex_field(t, "aad");
        let msg = hex_field(t, "msg");
        let sealed = [hex_field(t, "ct"), hex_field(t, "tag")].concat();
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
        if iv.len() != 12 {
            // The vault's nonce type is exactly 12 bytes (its sealed format is nonce(12) || ct ||
            // tag), so a nonce of any other size cannot reach the cipher at all.
            assert_eq!(expect(t), Expect::Invalid, "tcId {id}: a {}-byte nonce", iv.len());
            assert!(Nonce::from_exact_iter(iv.iter().copied()).is_none());
            bad_nonce_size += 1;
            continue;
        }
        let nonce = Nonce::from_slice(&iv);
        let opened = cipher.decrypt(nonce, Payload { msg: &sealed, aad: &aad });
        match expect(t) {
            Expect::Valid => {
                let ct =
                    cipher.encrypt(nonce, Payload { msg: &msg, aad: &aad }).expect("encryption");
                assert_eq!(ct, sealed, "tcId {id}: ciphertext || tag");
                assert_eq!(opened.as_deref(), Ok(msg.as_slice()), "tcId {id}: decrypt");
                valid += 1;
            }
            Expect::Invalid => {
                assert!(opened.is_err(), "tcId {id}: must not decrypt");
                invalid += 1;
            }
        }
    }
    let ran = valid + invalid + bad_nonce_size;
    assert_eq!(ran as u64, u64_field(&file, "numberOfTests"));
    assert_eq!((valid, invalid, bad_nonce_size), (256, 60, 9));
}

/// Our identities are Ed25519 (via openmls_basic_credential), and openmls verifies every MLS
/// signature through the provider's `verify_signature`, which is ed25519-dalek's `verify_strict`.
#[test]
fn wycheproof_ed25519_through_the_provider() {
    assert_eq!(OUR_CIPHERSUITE.signature_algorithm(), SignatureScheme::ED25519);
    let provider = RustCrypto::default();

    let file = load("wycheproof/ed25519_test.json");
    assert_eq!(str_field(&file, "algorithm"), "EDDSA");
    let tests = wycheproof_tests(&file, "eddsa_verify_schema_v1.json");
    let (mut valid, mut invalid) = (0usize, 0usize);
    for (group, t) in &tests {
        let id = u64_field(t, "tcId");
        let public_key = group.get("publicKey").expect("group publicKey");
        assert_eq!(str_field(public_key, "curve"), "edwards25519");
        let pk = hex_field(public_key, "pk");
        let verdict = provider.verify_signature(
            SignatureScheme::ED25519,
            &hex_field(t, "msg"),
            &pk,
            &hex_field(t, "sig"),
        );
        match expect(t) {
            Expect::Valid => {
                assert!(verdict.is_ok(), "tcId {id} ({}): must verify", str_field(t, "comment"));
                valid += 1;
            }
            Expect::Invalid => {
                assert!(
                    verdict.is_err(),
                    "tcId {id} ({}): must be rejected",
                    str_field(t, "comment")
                );
                invalid += 1;
            }
        }
    }
    assert_eq!((valid + invalid) as u64, u64_field(&file, "numberOfTests"));
    assert_eq!((valid, invalid), (88, 63));
}

/// core/src calls no HKDF itself, but HKDF-SHA256 is our MLS ciphersuite's KDF, which openmls
/// runs through the provider's `hkdf_extract`/`hkdf_expand` for the whole key schedule; the
/// vectors go through exactly those two calls.
#[test]
fn wycheproof_hkdf_sha256_through_the_provider() {
    assert_eq!(OUR_CIPHERSUITE.hash_algorithm(), HashType::Sha2_256);
    let provider = RustCrypto::default();

    let file = load("wycheproof/hkdf_sha256_test.json");
    assert_eq!(str_field(&file, "algorithm"), "HKDF-SHA-256");
    let tests = wycheproof_tests(&file, "hkdf_test_schema_v1.json");
    let (mut valid, mut invalid) = (0usize, 0usize);
    for (_, t) in &tests {
        let id = u64_field(t, "tcId");
        let size = usize::try_from(u64_field(t, "size")).expect("size fits usize");
        let prk = provider
            .hkdf_extract(HashType::Sha2_256, &hex_field(t, "salt"), &hex_field(t, "ikm"))
            .expect("extract never fails");
        let okm =
            provider.hkdf_expand(HashType::Sha2_256, prk.as_slice(), &hex_field(t, "info"), size);
        match expect(t) {
            Expect::Valid => {
                let okm = okm.unwrap_or_else(|e| panic!("tcId {id}: expand failed: {e:?}"));
                assert_eq!(okm.as_slice(), hex_field(t, "okm"), "tcId {id}: okm");
                valid += 1;
            }
            Expect::Invalid => {
                assert!(okm.is_err(), "tcId {id}: {size} bytes must be refused");
                invalid += 1;
            }
        }
    }
    assert_eq!((valid + invalid) as u64, u64_field(&file, "numberOfTests"));
    assert_eq!((valid, invalid), (83, 3));
}

// ------------------------------------------------------------------------------------------------
// 4. Argon2id
// ------------------------------------------------------------------------------------------------

/// One Argon2id tag, computed the way vault.rs `derive` does it (`Params::new(m, t, p,
/// Some(len))`, `Argon2::new(Argon2id, V0x13, ..)`, `hash_password_into`), plus the optional
/// secret and associated data that only RFC 9106's vector uses.
fn argon2id_tag(
    password: &[u8],
    salt: &[u8],
    secret: &[u8],
    ad: &[u8],
    (m, t, p, len): (u32, u32, u32, usize),
) -> Vec<u8> {
    use argon2::{Algorithm, Argon2, AssociatedData, Params, ParamsBuilder, Version};

    let params = if ad.is_empty() {
        Params::new(m, t, p, Some(len)).expect("valid parameters")
    } else {
        ParamsBuilder::new()
            .m_cost(m)
            .t_cost(t)
            .p_cost(p)
            .output_len(len)
            .data(AssociatedData::new(ad).expect("associated data length"))
            .build()
            .expect("valid parameters")
    };
    let argon = if secret.is_empty() {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    } else {
        Argon2::new_with_secret(secret, Algorithm::Argon2id, Version::V0x13, params)
            .expect("secret length")
    };
    let mut out = vec![0u8; len];
    argon.hash_password_into(password, salt, &mut out).expect("argon2id");
    out
}

fn u32_field(v: &serde_json::Value, key: &str) -> u32 {
    u32::try_from(u64_field(v, key)).expect("fits u32")
}

/// Every Argon2id tag in the file. Skipped: the Argon2i and Argon2d tags (we instantiate only
/// Argon2id) and the PHC-string encode/verify cases (we never produce or parse PHC strings: the
/// vault keeps its parameters in its own header, and OPAQUE's KSF output never leaves memory).
#[test]
fn argon2id_known_answers() {
    let file = load("argon2/argon2_kat.json");
    let (mut ran, mut skipped) = (0usize, 0usize);

    for v in array_field(&file, "rfc9106") {
        if str_field(v, "type") != "argon2id" {
            skipped += 1;
            continue;
        }
        assert_eq!(u64_field(v, "version"), 0x13);
        let len = usize::try_from(u64_field(v, "tag_length")).expect("fits usize");
        let tag = argon2id_tag(
            &hex_field(v, "password_hex"),
            &hex_field(v, "salt_hex"),
            &hex_field(v, "secret_hex"),
            &hex_field(v, "associated_data_hex"),
            (
                u32_field(v, "memory_kib"),
                u32_field(v, "iterations"),
                u32_field(v, "parallelism"),
                len,
            ),
        );
        assert_eq!(tag, hex_field(v, "tag_hex"), "{}", str_field(v, "source"));
        ran += 1;
    }

    for v in array_field(&file, "phc_test_c") {
        let large =
            v.get("large_memory").and_then(serde_json::Value::as_bool).expect("large_memory");
        if str_field(v, "type") != "argon2id" {
            skipped += 1;
            continue;
        }
        assert!(!large, "every Argon2id case of the file fits in 256 MiB");
        assert_eq!(u64_field(v, "version"), 0x13);
        let len = usize::try_from(u64_field(v, "tag_length")).expect("fits usize");
        let params = (
            u32_field(v, "memory_kib"),
            u32_field(v, "iterations"),
            u32_field(v, "parallelism"),
            len,
        );
        let tag = argon2id_tag(
            str_field(v, "password_utf8").as_bytes(),
            str_field(v, "salt_utf8").as_bytes(),
            b"",
            b"",
            params,
        );
        assert_eq!(tag, hex_field(v, "tag_hex"), "{} {params:?}", str_field(v, "phc_string"));
        ran += 1;
    }

    let verify_negative = array_field(&file, "verify_negative").len();
    assert_eq!(ran, 9, "1 RFC 9106 + 8 test.c Argon2id tags");
    assert_eq!(skipped, 2 + 9, "RFC 9106 argon2d/argon2i, test.c argon2i");
    assert_eq!(verify_negative, 4, "PHC-string negatives, not run");
}

/// Binds the tag check above to the production OPAQUE KSF: `qpq_core::opaque::ksf()` must be
/// Argon2id v0x13 at `KSF_MEMORY_KIB`/`KSF_ITERATIONS`/1 lane, applied as opaque-ke applies any
/// Argon2 KSF (a 16-byte zero salt, output as long as the input).
#[test]
fn argon2_opaque_ksf_is_the_tested_argon2id() {
    use opaque_ke::generic_array::{GenericArray, typenum::U64};
    use opaque_ke::ksf::Ksf;
    use qpq_core::opaque::{KSF_ITERATIONS, KSF_MEMORY_KIB, ksf};

    let input = GenericArray::<u8, U64>::clone_from_slice(&[0x5c; 64]);
    let through_ksf = ksf().expect("ksf").hash(input).expect("hash");
    let direct =
        argon2id_tag(&[0x5c; 64], &[0u8; 16], b"", b"", (KSF_MEMORY_KIB, KSF_ITERATIONS, 1, 64));
    assert_eq!(through_ksf.as_slice(), direct.as_slice());
}

// ------------------------------------------------------------------------------------------------
// 5. OPAQUE and its OPRF
// ------------------------------------------------------------------------------------------------

/// Our OPAQUE suite with the KSF replaced by the identity, as the RFC 9807 vectors use it
/// (`KSF = Identity`); the Argon2id KSF is covered by the tests above.
struct KatSuite;

impl opaque_ke::CipherSuite for KatSuite {
    type OprfCs = opaque_ke::Ristretto255;
    type KeyExchange = opaque_ke::TripleDh<opaque_ke::Ristretto255, sha2::Sha512>;
    type Ksf = opaque_ke::ksf::Identity;
}

fn same_type<T>(_: PhantomData<T>, _: PhantomData<T>) {}

/// Fails to compile if the production suite's OPRF or key exchange differ from [`KatSuite`]'s.
fn kat_suite_matches_production() {
    use opaque_ke::CipherSuite;
    type Prod = qpq_core::opaque::Suite;
    same_type(
        PhantomData::<<Prod as CipherSuite>::OprfCs>,
        PhantomData::<<KatSuite as CipherSuite>::OprfCs>,
    );
    same_type(
        PhantomData::<<Prod as CipherSuite>::KeyExchange>,
        PhantomData::<<KatSuite as CipherSuite>::KeyExchange>,
    );
}

fn opaque_server_keypair(
    inputs: &serde_json::Value,
) -> opaque_ke::keypair::KeyPair<opaque_ke::Ristretto255> {
    use opaque_ke::keypair::{KeyPair, PrivateKey, PublicKey};
    let sk = PrivateKey::<opaque_ke::Ristretto255>::deserialize(&hex_field(
        inputs,
        "server_private_key",
    ))
    .expect("server private key");
    let pk =
        PublicKey::deserialize(&hex_field(inputs, "server_public_key")).expect("server public key");
    assert_eq!(sk.public_key().serialize(), pk.serialize(), "server key pair");
    KeyPair::new(sk, pk)
}

/// A registered user: registration then login, every message compared with the vector as bytes
/// and every message parsed from those bytes before the next step (as client and server do).
///
/// opaque-ke draws all its randomness from the RNG it is handed, in a fixed order, so a scripted
/// RNG pins it to the vector's values: the OPRF blind (64 bytes, wide-reduced: blind || 0^32),
/// the envelope nonce, the key-share seeds (DeriveDiffieHellmanKeyPair input) and nonces, and the
/// masking nonce. Two draws are not in the vectors: `ServerSetup`'s dummy public key and the
/// dummy record's masking key that `ServerLogin::start` always computes (anti-enumeration) but
/// discards for a real record.
fn opaque_real_user(v: &serde_json::Value) {
    use opaque_ke::{
        ClientLogin, ClientLoginFinishParameters, ClientRegistration,
        ClientRegistrationFinishParameters, CredentialFinalization, CredentialRequest,
        CredentialResponse, Identifiers, RegistrationRequest, RegistrationResponse,
        RegistrationUpload, ServerLogin, ServerLoginParameters, ServerRegistration, ServerSetup,
    };

    let inputs = v.get("inputs").expect("inputs");
    let outputs = v.get("outputs").expect("outputs");
    let context = hex_field(v.get("config").expect("config"), "Context");
    let password = hex_field(inputs, "password");
    let credential_id = hex_field(inputs, "credential_identifier");
    let client_identity = opt_hex_field(inputs, "client_identity");
    let server_identity = opt_hex_field(inputs, "server_identity");
    let ids =
        Identifiers { client: client_identity.as_deref(), server: server_identity.as_deref() };

    let mut rng = ScriptedRng::new(&[&hex_field(inputs, "oprf_seed"), &wide_scalar(&[1u8; 32])]);
    let setup = ServerSetup::<KatSuite>::new_with_key_pair(&mut rng, opaque_server_keypair(inputs));
    rng.assert_drained("ServerSetup");

    // Registration.
    let mut rng = ScriptedRng::new(&[&wide_scalar(&hex_field(inputs, "blind_registration"))]);
    let reg =
        ClientRegistration::<KatSuite>::start(&mut rng, &password).expect("registration start");
    rng.assert_drained("ClientRegistration::start");
    let request = reg.message.serialize().to_vec();
    assert_eq!(request, hex_field(outputs, "registration_request"), "registration_request");

    let request = RegistrationRequest::<KatSuite>::deserialize(&request).expect("parse request");
    let response = ServerRegistration::<KatSuite>::start(&setup, request, &credential_id)
        .expect("server registration start")
        .message
        .serialize()
        .to_vec();
    assert_eq!(response, hex_field(outputs, "registration_response"), "registration_response");

    let response =
        RegistrationResponse::<KatSuite>::deserialize(&response).expect("parse response");
    let mut rng = ScriptedRng::new(&[&hex_field(inputs, "envelope_nonce")]);
    let finish = reg
        .state
        .finish(&mut rng, &password, response, ClientRegistrationFinishParameters::new(ids, None))
        .expect("registration finish");
    rng.assert_drained("ClientRegistration::finish");
    let upload = finish.message.serialize().to_vec();
    assert_eq!(upload, hex_field(outputs, "registration_upload"), "registration_upload");
    assert_eq!(
        finish.export_key.as_slice(),
        hex_field(outputs, "export_key"),
        "export_key (registration)"
    );
    let record = ServerRegistration::<KatSuite>::finish(
        RegistrationUpload::<KatSuite>::deserialize(&upload).expect("parse upload"),
    );

    // Login.
    let mut rng = ScriptedRng::new(&[
        &wide_scalar(&hex_field(inputs, "blind_login")),
        &hex_field(inputs, "client_keyshare_seed"),
        &hex_field(inputs, "client_nonce"),
    ]);
    let login = ClientLogin::<KatSuite>::start(&mut rng, &password).expect("login start");
    rng.assert_drained("ClientLogin::start");
    let ke1 = login.message.serialize().to_vec();
    assert_eq!(ke1, hex_field(outputs, "KE1"), "KE1");

    let server_params = ServerLoginParameters { context: Some(&context), identifiers: ids };
    let mut rng = ScriptedRng::new(&[
        &[0xa5; 64], // the dummy record's masking key, unused for a registered user
        &hex_field(inputs, "masking_nonce"),
        &hex_field(inputs, "server_keyshare_seed"),
        &hex_field(inputs, "server_nonce"),
    ]);
    let server_login = ServerLogin::start(
        &mut rng,
        &setup,
        Some(record),
        CredentialRequest::<KatSuite>::deserialize(&ke1).expect("parse KE1"),
        &credential_id,
        server_params.clone(),
    )
    .expect("server login start");
    rng.assert_drained("ServerLogin::start");
    let ke2 = server_login.message.serialize().to_vec();
    assert_eq!(ke2, hex_field(outputs, "KE2"), "KE2");

    let mut rng = ScriptedRng::new(&[]);
    let client_finish = login
        .state
        .finish(
            &mut rng,
            &password,
            CredentialResponse::<KatSuite>::deserialize(&ke2).expect("parse KE2"),
            ClientLoginFinishParameters::new(Some(&context), ids, None),
        )
        .expect("client login finish");
    let ke3 = client_finish.message.serialize().to_vec();
    assert_eq!(ke3, hex_field(outputs, "KE3"), "KE3");
    assert_eq!(
        client_finish.session_key.as_slice(),
        hex_field(outputs, "session_key"),
        "client session_key"
    );
    assert_eq!(
        client_finish.export_key.as_slice(),
        hex_field(outputs, "export_key"),
        "export_key (login)"
    );

    let server_finish = server_login
        .state
        .finish(
            CredentialFinalization::<KatSuite>::deserialize(&ke3).expect("parse KE3"),
            server_params,
        )
        .expect("server login finish");
    assert_eq!(
        server_finish.session_key.as_slice(),
        hex_field(outputs, "session_key"),
        "server session_key"
    );
}

/// An unknown user: the KE2 the server sends from its fake record. opaque-ke takes the fake
/// record's client public key from `ServerSetup` (drawn when the setup is created) and its
/// masking key from the RNG at login, so the vector's fake client private key and masking key are
/// scripted there.
fn opaque_fake_user(v: &serde_json::Value) {
    use opaque_ke::keypair::PrivateKey;
    use opaque_ke::{
        CredentialRequest, Identifiers, ServerLogin, ServerLoginParameters, ServerSetup,
    };

    let inputs = v.get("inputs").expect("inputs");
    let outputs = v.get("outputs").expect("outputs");
    let context = hex_field(v.get("config").expect("config"), "Context");
    let client_identity = hex_field(inputs, "client_identity");
    let server_identity = hex_field(inputs, "server_identity");
    let ids = Identifiers { client: Some(&client_identity), server: Some(&server_identity) };

    let fake_sk = hex_field(inputs, "client_private_key");
    let fake_pk = PrivateKey::<opaque_ke::Ristretto255>::deserialize(&fake_sk)
        .expect("fake client private key")
        .public_key()
        .serialize();
    assert_eq!(fake_pk.as_slice(), hex_field(inputs, "client_public_key"), "fake client key pair");

    let mut rng = ScriptedRng::new(&[&hex_field(inputs, "oprf_seed"), &wide_scalar(&fake_sk)]);
    let setup = ServerSetup::<KatSuite>::new_with_key_pair(&mut rng, opaque_server_keypair(inputs));
    rng.assert_drained("ServerSetup");

    let mut rng = ScriptedRng::new(&[
        &hex_field(inputs, "masking_key"),
        &hex_field(inputs, "masking_nonce"),
        &hex_field(inputs, "server_keyshare_seed"),
        &hex_field(inputs, "server_nonce"),
    ]);
    let server_login = ServerLogin::start(
        &mut rng,
        &setup,
        None,
        CredentialRequest::<KatSuite>::deserialize(&hex_field(inputs, "KE1")).expect("parse KE1"),
        &hex_field(inputs, "credential_identifier"),
        ServerLoginParameters { context: Some(&context), identifiers: ids },
    )
    .expect("server login start for an unknown user");
    rng.assert_drained("ServerLogin::start (fake record)");
    assert_eq!(server_login.message.serialize().to_vec(), hex_field(outputs, "KE2"), "fake KE2");
}

/// The file's ristretto255 + SHA-512 + 3DH entries (2 registered users, 1 unknown user). Not run:
/// the curve25519 and P-256 key-exchange entries (6), which are not our suite (and opaque-ke's
/// `curve25519` feature is not even compiled in).
#[test]
fn opaque_rfc9807_ristretto255_sha512() {
    kat_suite_matches_production();
    let file = load("opaque/opaque_vectors.json");
    let (mut real, mut fake, mut skipped) = (0usize, 0usize, 0usize);
    for v in as_array(&file) {
        let config = v.get("config").expect("config");
        if str_field(config, "Group") != "ristretto255" {
            skipped += 1;
            continue;
        }
        assert_eq!(str_field(config, "OPRF"), "ristretto255-SHA512");
        assert_eq!(str_field(config, "Hash"), "SHA512");
        assert_eq!(str_field(config, "Name"), "3DH");
        assert_eq!(str_field(config, "KSF"), "Identity");
        assert_eq!(hex_field(config, "Context"), b"OPAQUE-POC");
        match str_field(config, "Fake") {
            "False" => {
                opaque_real_user(v);
                real += 1;
            }
            "True" => {
                opaque_fake_user(v);
                fake += 1;
            }
            other => panic!("unexpected Fake value {other:?}"),
        }
    }
    assert_eq!((real, fake, skipped), (2, 1, 6));
}

/// RFC 9497 OPRF (mode 0, the only mode OPAQUE uses) for ristretto255-SHA512, through voprf, the
/// OPRF opaque-ke calls: key derivation from seed, blind (both the deterministic entry point and
/// the RNG path opaque-ke takes), blind evaluation, finalize, and server-side evaluation. Not run:
/// VOPRF/POPRF modes (not used by OPAQUE) and the other groups (not our suite).
#[test]
fn oprf_rfc9497_ristretto255_sha512_mode0() {
    use voprf::{Group, OprfClient, OprfServer, Ristretto255};

    let file = load("opaque/oprf_rfc9497_vectors.json");
    let (mut ran, mut skipped) = (0usize, 0usize);
    for suite in as_array(&file) {
        let vectors = array_field(suite, "vectors");
        if str_field(suite, "identifier") != "ristretto255-SHA512" || u64_field(suite, "mode") != 0
        {
            skipped += vectors.len();
            continue;
        }
        let server = OprfServer::<Ristretto255>::new_from_seed(
            &hex_field(suite, "seed"),
            &hex_field(suite, "keyInfo"),
        )
        .expect("DeriveKeyPair");
        assert_eq!(server.serialize().as_slice(), hex_field(suite, "skSm"), "skSm");

        for t in vectors {
            assert_eq!(u64_field(t, "Batch"), 1);
            let input = hex_field(t, "Input");
            let blind_bytes = hex_field(t, "Blind");
            let blind = Ristretto255::deserialize_scalar(&blind_bytes).expect("blind scalar");
            let blinded = OprfClient::<Ristretto255>::deterministic_blind_unchecked(&input, blind)
                .expect("blind");
            assert_eq!(
                blinded.message.serialize().as_slice(),
                hex_field(t, "BlindedElement"),
                "BlindedElement"
            );

            let mut rng = ScriptedRng::new(&[&wide_scalar(&blind_bytes)]);
            let via_rng =
                OprfClient::<Ristretto255>::blind(&input, &mut rng).expect("blind from rng");
            rng.assert_drained("OprfClient::blind");
            assert_eq!(via_rng.message.serialize(), blinded.message.serialize(), "blind via RNG");

            let evaluation = server.blind_evaluate(&blinded.message);
            assert_eq!(
                evaluation.serialize().as_slice(),
                hex_field(t, "EvaluationElement"),
                "EvaluationElement"
            );
            let output = blinded.state.finalize(&input, &evaluation).expect("finalize");
            assert_eq!(output.as_slice(), hex_field(t, "Output"), "Output (client)");
            let direct = server.evaluate(&input).expect("server evaluate");
            assert_eq!(direct.as_slice(), hex_field(t, "Output"), "Output (server)");
            ran += 1;
        }
    }
    assert_eq!((ran, skipped), (2, 38));
}
