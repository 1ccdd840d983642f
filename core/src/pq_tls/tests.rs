//! Round trips, malformed shares, interop with ring's X25519, and known answers.
//!
//! The known-answer tests run independently written vectors from `core/tests/vectors` (sources
//! in its README.md, sha256 checked by `tests/kat.rs`) through the same functions the TLS
//! handshake calls, with the randomness those vectors fix: NIST ACVP ML-KEM-768 keyGen and
//! encapDecap, Wycheproof ML-KEM-768 encaps and X25519, and the RFC 7748 §6.1 X25519 key pairs
//! for the X25519 half. Every test counts its cases, so a truncated or empty file fails instead
//! of passing.

use std::path::PathBuf;

use serde_json::Value;

use super::*;

#[test]
fn client_and_server_agree() {
    let client = X25519MLKEM768.start().unwrap();
    assert_eq!(client.group(), NamedGroup::X25519MLKEM768);
    assert_eq!(client.pub_key().len(), 1184 + 32);

    let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
    assert_eq!(server.group, NamedGroup::X25519MLKEM768);
    assert_eq!(server.pub_key.len(), 1088 + 32);

    let secret = client.complete(&server.pub_key).unwrap();
    assert_eq!(secret.secret_bytes().len(), 64);
    assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
}

#[test]
fn every_exchange_is_fresh() {
    let a = X25519MLKEM768.start().unwrap();
    let b = X25519MLKEM768.start().unwrap();
    assert_ne!(a.pub_key()[..1184], b.pub_key()[..1184]);
    assert_ne!(a.pub_key()[1184..], b.pub_key()[1184..]);
    let s1 = X25519MLKEM768.start_and_complete(a.pub_key()).unwrap();
    let s2 = X25519MLKEM768.start_and_complete(a.pub_key()).unwrap();
    assert_ne!(s1.pub_key[..1088], s2.pub_key[..1088]);
    assert_ne!(s1.pub_key[1088..], s2.pub_key[1088..]);
    assert_ne!(s1.secret.secret_bytes(), s2.secret.secret_bytes());
}

#[test]
fn provider_prefers_the_hybrid_group_and_keeps_the_classical_ones() {
    let names: Vec<_> = crypto_provider().kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(
        names,
        [
            NamedGroup::X25519MLKEM768,
            NamedGroup::X25519,
            NamedGroup::secp256r1,
            NamedGroup::secp384r1
        ]
    );
    assert!(X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_3));
    assert!(!X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_2));
    assert!(X25519MLKEM768.ffdhe_group().is_none());
    assert!(!X25519MLKEM768.fips());
}

/// The X25519 half offered on its own, completed by ring's X25519 (an independent
/// implementation) as a classical-only server would.
#[test]
fn hybrid_component_is_the_x25519_half_and_agrees_with_ring() {
    let client = X25519MLKEM768.start().unwrap();
    let (group, share) = client.hybrid_component().unwrap();
    assert_eq!(group, NamedGroup::X25519);
    assert_eq!(share, &client.pub_key()[1184..]);

    let ring = kx_group::X25519.start_and_complete(share).unwrap();
    let ours = client.complete_hybrid_component(&ring.pub_key).unwrap();
    assert_eq!(ours.secret_bytes(), ring.secret.secret_bytes());
}

/// Our server's X25519 half against a ring X25519 client key.
#[test]
fn server_x25519_half_agrees_with_ring() {
    let ring = kx_group::X25519.start().unwrap();
    let ml_kem_half = X25519MLKEM768.start().unwrap().pub_key()[..1184].to_vec();
    let server = X25519MLKEM768
        .start_and_complete(&[ml_kem_half, ring.pub_key().to_vec()].concat())
        .unwrap();
    let ring_secret = ring.complete(&server.pub_key[1088..]).unwrap();
    assert_eq!(&server.secret.secret_bytes()[32..], ring_secret.secret_bytes());
}

#[test]
fn malformed_client_shares_are_refused() {
    let good = X25519MLKEM768.start().unwrap().pub_key().to_vec();
    X25519MLKEM768.start_and_complete(&good).unwrap();

    for len in [0, 1, 32, 1184, 1215, 1217, 2 * 1216] {
        let share: Vec<u8> = good.iter().copied().cycle().take(len).collect();
        assert_eq!(server_error(&share), INVALID_KEY_SHARE, "length {len}");
    }
    // X25519 points of low order give an all-zero shared secret (RFC 7748 §6.1).
    for point in [[0u8; 32], one_u()] {
        let share = [&good[..1184], &point].concat();
        assert_eq!(server_error(&share), INVALID_KEY_SHARE);
    }
    // An encapsulation key with a coefficient >= q fails the FIPS 203 modulus check.
    let mut share = good.clone();
    share[..2].copy_from_slice(&[0xff, 0x0f]);
    assert_eq!(server_error(&share), INVALID_KEY_SHARE);
}

#[test]
fn malformed_server_shares_are_refused() {
    let client = X25519MLKEM768.start().unwrap();
    let good = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap().pub_key;

    for len in [0, 1, 32, 1088, 1119, 1121, 1216] {
        let share: Vec<u8> = good.iter().copied().cycle().take(len).collect();
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.complete(&share).err(), Some(INVALID_KEY_SHARE), "length {len}");
    }
    for point in [[0u8; 32], one_u()] {
        let client = X25519MLKEM768.start().unwrap();
        let share = [&good[..1088], &point].concat();
        assert_eq!(client.complete(&share).err(), Some(INVALID_KEY_SHARE));
    }
    // The classical-only completion checks the same way.
    for share in [&[][..], &[9; 31], &[9; 33], &[0; 32], &one_u()] {
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.complete_hybrid_component(share).err(), Some(INVALID_KEY_SHARE));
    }
}

/// A forged ciphertext is not an error at this layer (ML-KEM's implicit rejection): the two
/// sides end up with different secrets, and TLS fails at Finished.
#[test]
fn forged_ciphertext_gives_a_different_secret() {
    let client = X25519MLKEM768.start().unwrap();
    let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
    let mut forged = server.pub_key.clone();
    forged[0] ^= 1;
    let secret = client.complete(&forged).unwrap();
    assert_ne!(secret.secret_bytes()[..32], server.secret.secret_bytes()[..32]);
    assert_eq!(secret.secret_bytes()[32..], server.secret.secret_bytes()[32..]);
}

// ------------------------------------------------------------------------------------------------
// Known answers
// ------------------------------------------------------------------------------------------------

/// NIST ACVP keyGen: the seed `d ‖ z` gives the client share's ML-KEM half; RFC 7748's Alice
/// key gives its X25519 half, after it.
#[test]
fn acvp_keygen_gives_our_client_share() {
    let file = load("mlkem/acvp_ML-KEM-768_keyGen.json");
    let mut cases = 0;
    for test in acvp_tests(&file, None) {
        let seed: [u8; 64] =
            [hex_field(test, "d"), hex_field(test, "z")].concat().try_into().unwrap();
        let client = ClientKeyExchange::new(&seed, &RFC7748_ALICE_PRIVATE);
        let expected = [hex_field(test, "ek"), RFC7748_ALICE_PUBLIC.to_vec()].concat();
        assert_eq!(client.pub_key(), expected, "tcId {}", test["tcId"]);
        cases += 1;
    }
    assert_eq!(cases, 25);
}

/// NIST ACVP encapsulation with RFC 7748's Alice (client) and Bob (server) X25519 keys: the
/// server share is `c ‖ Bob's public key`, the secret `k ‖ K`.
#[test]
fn acvp_encapsulation_gives_our_server_share_and_secret() {
    let file = load("mlkem/acvp_ML-KEM-768_encapDecap.json");
    let mut cases = 0;
    for test in acvp_tests(&file, Some("encapsulation")) {
        let client_share = [hex_field(test, "ek"), RFC7748_ALICE_PUBLIC.to_vec()].concat();
        let m: [u8; 32] = hex_field(test, "m").try_into().unwrap();
        let done = server_complete(&client_share, &m, &RFC7748_BOB_PRIVATE).unwrap();
        let tc = &test["tcId"];
        assert_eq!(done.pub_key, [hex_field(test, "c"), RFC7748_BOB_PUBLIC.to_vec()].concat());
        assert_eq!(
            done.secret.secret_bytes(),
            [hex_field(test, "k"), RFC7748_SHARED.to_vec()].concat(),
            "tcId {tc}"
        );
        cases += 1;
    }
    assert_eq!(cases, 25);
}

/// NIST ACVP decapsulation (valid and modified ciphertexts, implicit rejection) through our
/// client's `complete`.
#[test]
#[allow(deprecated)] // the ACVP decapsulation groups give the expanded key form
fn acvp_decapsulation_through_our_client() {
    use ml_kem::ExpandedKeyEncoding;
    let file = load("mlkem/acvp_ML-KEM-768_encapDecap.json");
    let mut cases = 0;
    for group in groups(&file).filter(|g| g["function"] == "decapsulation") {
        let dk = hex_field(group, "dk");
        for test in group["tests"].as_array().unwrap() {
            let mlkem =
                DecapsulationKey768::from_expanded_bytes(&Array::try_from(&dk[..]).unwrap())
                    .unwrap();
            let client = Box::new(ClientKeyExchange::from_keys(
                mlkem,
                StaticSecret::from(RFC7748_ALICE_PRIVATE),
            ));
            let server_share = [hex_field(test, "c"), RFC7748_BOB_PUBLIC.to_vec()].concat();
            let secret = client.complete(&server_share).unwrap();
            assert_eq!(
                secret.secret_bytes(),
                [hex_field(test, "k"), RFC7748_SHARED.to_vec()].concat(),
                "tcId {}",
                test["tcId"]
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 10);
}

/// Wycheproof ML-KEM-768 encapsulation through our server: valid keys give `c` and `K`; keys
/// that fail the FIPS 203 modulus check, or have the wrong length, are refused.
#[test]
fn wycheproof_mlkem_encaps_through_our_server() {
    let file = load("wycheproof/mlkem_768_encaps_test.json");
    let (mut valid, mut invalid) = (0, 0);
    for test in groups(&file).flat_map(|g| g["tests"].as_array().unwrap()) {
        let client_share = [hex_field(test, "ek"), RFC7748_ALICE_PUBLIC.to_vec()].concat();
        let m: [u8; 32] = hex_field(test, "m").try_into().unwrap();
        let result = server_complete(&client_share, &m, &RFC7748_BOB_PRIVATE);
        let tc = &test["tcId"];
        match test["result"].as_str().unwrap() {
            "valid" => {
                let done = result.unwrap_or_else(|e| panic!("tcId {tc}: {e}"));
                assert_eq!(done.pub_key[..1088], hex_field(test, "c"), "tcId {tc}");
                assert_eq!(done.secret.secret_bytes()[..32], hex_field(test, "K"), "tcId {tc}");
                valid += 1;
            }
            "invalid" => {
                assert_eq!(result.err(), Some(INVALID_KEY_SHARE), "tcId {tc}");
                invalid += 1;
            }
            other => panic!("tcId {tc}: unexpected result {other}"),
        }
    }
    assert_eq!((valid, invalid), (133, 132));
}

/// Wycheproof X25519 through both X25519 paths (the hybrid's server half and the client's
/// classical-only completion): the shared secret matches, except that an all-zero one (low-order
/// public keys, which Wycheproof lets implementations accept) is refused.
#[test]
fn wycheproof_x25519_through_both_halves() {
    let file = load("wycheproof/x25519_test.json");
    let ml_kem_half = X25519MLKEM768.start().unwrap().pub_key()[..1184].to_vec();
    let (mut agreed, mut refused) = (0, 0);
    for test in groups(&file).flat_map(|g| g["tests"].as_array().unwrap()) {
        let tc = &test["tcId"];
        assert_ne!(test["result"], "invalid", "tcId {tc}: no invalid cases expected");
        let private: [u8; 32] = hex_field(test, "private").try_into().unwrap();
        let public = hex_field(test, "public");
        let shared = hex_field(test, "shared");

        let server = server_complete(&[&ml_kem_half[..], &public].concat(), &[7; 32], &private);
        let client = Box::new(ClientKeyExchange::new(&[7; 64], &private));
        let component = client.complete_hybrid_component(&public);
        if shared == [0; 32] {
            assert_eq!(server.err(), Some(INVALID_KEY_SHARE), "tcId {tc}");
            assert_eq!(component.err(), Some(INVALID_KEY_SHARE), "tcId {tc}");
            refused += 1;
        } else {
            let server = server.unwrap_or_else(|e| panic!("tcId {tc}: {e}"));
            assert_eq!(server.secret.secret_bytes()[32..], shared, "tcId {tc}");
            assert_eq!(component.unwrap().secret_bytes(), shared, "tcId {tc}");
            agreed += 1;
        }
    }
    assert_eq!(agreed + refused, 518);
    assert!(refused >= 31, "Wycheproof has 31 low-order cases, saw {refused}");
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// RFC 7748 §6.1.
const RFC7748_ALICE_PRIVATE: [u8; 32] =
    hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
const RFC7748_ALICE_PUBLIC: [u8; 32] =
    hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
const RFC7748_BOB_PRIVATE: [u8; 32] =
    hex32("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
const RFC7748_BOB_PUBLIC: [u8; 32] =
    hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
const RFC7748_SHARED: [u8; 32] =
    hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");

/// The point u = 1, of order 4.
fn one_u() -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 1;
    p
}

fn server_error(client_share: &[u8]) -> Error {
    match X25519MLKEM768.start_and_complete(client_share) {
        Ok(_) => panic!("a {}-byte client share was accepted", client_share.len()),
        Err(e) => e,
    }
}

const fn hex32(s: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not lower-case hex"),
        }
    }
    let s = s.as_bytes();
    assert!(s.len() == 64);
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(s[2 * i]) << 4) | nibble(s[2 * i + 1]);
        i += 1;
    }
    out
}

/// A file of `core/tests/vectors`, as `tests/kat.rs` finds it.
fn load(rel: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read test vectors {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn groups(file: &Value) -> impl Iterator<Item = &Value> {
    file["testGroups"].as_array().expect("testGroups").iter()
}

/// The tests of ACVP groups whose `function` is `function` (any when `None`).
fn acvp_tests<'a>(file: &'a Value, function: Option<&'a str>) -> impl Iterator<Item = &'a Value> {
    groups(file)
        .filter(move |g| function.is_none_or(|f| g["function"] == f))
        .flat_map(|g| g["tests"].as_array().expect("tests"))
}

fn hex_field(v: &Value, key: &str) -> Vec<u8> {
    let s = v[key].as_str().unwrap_or_else(|| panic!("missing hex field {key:?}"));
    hex::decode(s).unwrap_or_else(|e| panic!("{key:?} is not hex: {e}"))
}
