//! Shared helpers for the known-answer tests: locating and reading the vector files, hex fields,
//! a scripted RNG for APIs that only take randomness through an `RngCore`, and the RFC 9180
//! HPKE key schedule written out independently of the provider under test.

use std::path::PathBuf;

use serde_json::Value;

/// `core/tests/vectors`: the copies of the vector files, with their sources in its README.md and
/// their sha256 in its SHA256SUMS (checked by `vector_files_match_sha256sums` in kat.rs).
pub fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Parses one vector file, with a message that names the path when it is missing.
pub fn load(rel: &str) -> Value {
    let path = vectors_dir().join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read test vectors {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// The string field `key` of `v`.
pub fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("missing string field {key:?} in {v}"))
}

/// The hex field `key` of `v`, decoded (upper- or lower-case).
pub fn hex_field(v: &Value, key: &str) -> Vec<u8> {
    let s = str_field(v, key);
    hex::decode(s).unwrap_or_else(|e| panic!("field {key:?} is not hex ({e}): {s}"))
}

/// The hex field `key` of `v` if present.
pub fn opt_hex_field(v: &Value, key: &str) -> Option<Vec<u8>> {
    v.get(key).map(|_| hex_field(v, key))
}

/// The unsigned integer field `key` of `v`.
pub fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("missing integer field {key:?} in {v}"))
}

/// The array field `key` of `v`.
pub fn array_field<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("missing array field {key:?}"))
}

/// The top-level array of a vector file.
pub fn as_array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).expect("vector file is not a JSON array")
}

/// Every test of a Wycheproof file as (group, test), after checking the declared schema.
pub fn wycheproof_tests<'a>(file: &'a Value, schema: &str) -> Vec<(&'a Value, &'a Value)> {
    assert_eq!(str_field(file, "schema"), schema, "unexpected Wycheproof schema");
    let mut out = Vec::new();
    for group in array_field(file, "testGroups") {
        for test in array_field(group, "tests") {
            out.push((group, test));
        }
    }
    out
}

/// Wycheproof's expected outcome of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Valid,
    Invalid,
}

/// The `result` of a Wycheproof test. None of the files used here has "acceptable" cases;
/// meeting one is a failure, so that a new upstream file forces a decision.
pub fn expect(test: &Value) -> Expect {
    match str_field(test, "result") {
        "valid" => Expect::Valid,
        "invalid" => Expect::Invalid,
        other => panic!("tcId {}: result {other:?} has no policy here", u64_field(test, "tcId")),
    }
}

/// An RNG that hands out a fixed script of bytes in order and panics when it runs dry, so that
/// a library's randomness can be pinned to a vector's values and every byte accounted for.
pub struct ScriptedRng {
    bytes: Vec<u8>,
    pos: usize,
}

impl ScriptedRng {
    /// The concatenation of `parts`.
    pub fn new(parts: &[&[u8]]) -> Self {
        Self { bytes: parts.concat(), pos: 0 }
    }

    /// Panics unless every scripted byte was consumed.
    pub fn assert_drained(&self, what: &str) {
        assert_eq!(
            self.pos,
            self.bytes.len(),
            "{what}: the library drew {} of {} scripted random bytes",
            self.pos,
            self.bytes.len()
        );
    }
}

impl rand::RngCore for ScriptedRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.pos + dest.len();
        assert!(
            end <= self.bytes.len(),
            "scripted RNG exhausted: asked for {} bytes at offset {} of {}",
            dest.len(),
            self.pos,
            self.bytes.len()
        );
        dest.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand::CryptoRng for ScriptedRng {}

/// The 64 bytes that make `curve25519_dalek::Scalar::random` (a wide reduction of 64 random
/// bytes) return the canonical little-endian scalar `s`: `s` followed by 32 zero bytes.
pub fn wide_scalar(s: &[u8]) -> Vec<u8> {
    assert_eq!(s.len(), 32, "scalar must be 32 bytes");
    let mut out = s.to_vec();
    out.extend_from_slice(&[0u8; 32]);
    out
}

/// RFC 9180 base-mode key schedule with HKDF-SHA256, written against `hkdf` 0.12 and `sha2`
/// 0.10 (not the `hkdf` 0.13 that the provider uses), for checking the provider's HPKE.
pub struct HpkeSchedule {
    pub key: Vec<u8>,
    pub base_nonce: Vec<u8>,
    pub exporter_secret: Vec<u8>,
    suite_id: Vec<u8>,
}

impl HpkeSchedule {
    /// `suite_id = "HPKE" || kem_id || kdf_id || aead_id`; `nk`/`nn` are the AEAD key and nonce
    /// lengths.
    pub fn base(
        kem_id: u16,
        kdf_id: u16,
        aead_id: u16,
        nk: usize,
        nn: usize,
        shared_secret: &[u8],
        info: &[u8],
    ) -> Self {
        let mut suite_id = b"HPKE".to_vec();
        suite_id.extend_from_slice(&kem_id.to_be_bytes());
        suite_id.extend_from_slice(&kdf_id.to_be_bytes());
        suite_id.extend_from_slice(&aead_id.to_be_bytes());

        let psk_id_hash = labeled_extract(&suite_id, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(&suite_id, b"", b"info_hash", info);
        let mut context = vec![0u8]; // mode_base
        context.extend_from_slice(&psk_id_hash);
        context.extend_from_slice(&info_hash);
        let secret = labeled_extract(&suite_id, shared_secret, b"secret", b"");
        Self {
            key: labeled_expand(&suite_id, &secret, b"key", &context, nk),
            base_nonce: labeled_expand(&suite_id, &secret, b"base_nonce", &context, nn),
            exporter_secret: labeled_expand(&suite_id, &secret, b"exp", &context, 32),
            suite_id,
        }
    }

    /// `Context.Export(exporter_context, len)`.
    pub fn export(&self, exporter_context: &[u8], len: usize) -> Vec<u8> {
        labeled_expand(&self.suite_id, &self.exporter_secret, b"sec", exporter_context, len)
    }
}

fn labeled_extract(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Vec<u8> {
    let labeled_ikm = [b"HPKE-v1".as_slice(), suite_id, label, ikm].concat();
    let (prk, _) = hkdf::Hkdf::<sha2::Sha256>::extract(Some(salt), &labeled_ikm);
    prk.to_vec()
}

fn labeled_expand(suite_id: &[u8], prk: &[u8], label: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let len16 = u16::try_from(len).expect("HPKE output length fits in two bytes");
    let labeled_info = [&len16.to_be_bytes()[..], b"HPKE-v1", suite_id, label, info].concat();
    let mut out = vec![0u8; len];
    hkdf::Hkdf::<sha2::Sha256>::from_prk(prk)
        .expect("PRK of hash length")
        .expand(&labeled_info, &mut out)
        .expect("HPKE expand length within HKDF bounds");
    out
}
