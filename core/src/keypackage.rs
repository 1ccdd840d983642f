//! A small, feature-free reader for the MLS (RFC 9420) wire structures the server looks at:
//! a KeyPackage on upload ([`parse`], then [`KeyPackage::verify`]) and the clear header of a
//! queued message ([`is_handshake`]).
//!
//! The server cannot link openmls (it targets a router), yet it must refuse a KeyPackage that
//! is not well formed, not signed by its own leaf, or not bound to the account uploading it:
//! otherwise anyone could stock another user's packages, or packages nobody can use. This
//! module reads exactly the layouts of RFC 9420 (checked against openmls 0.9:
//! `key_packages/mod.rs`, `treesync/node/leaf_node.rs`, `ciphersuite/signature.rs`):
//!
//! ```text
//! MLSMessage  { u16 version = 1 (mls10); u16 wire_format = 5 (mls_key_package); KeyPackage }
//! KeyPackage  { u16 version; u16 cipher_suite; opaque init_key<V>; LeafNode leaf_node;
//!               Extension extensions<V>; opaque signature<V> }       signed: "KeyPackageTBS"
//! LeafNode    { opaque encryption_key<V>; opaque signature_key<V>; Credential credential;
//!               Capabilities capabilities; u8 leaf_node_source = 1 (key_package);
//!               u64 not_before; u64 not_after; Extension extensions<V>;
//!               opaque signature<V> }                                  signed: "LeafNodeTBS"
//! Credential  { u16 credential_type = 1 (basic); opaque identity<V> }
//! Capabilities{ u16 versions<V>; u16 cipher_suites<V>; u16 extensions<V>; u16 proposals<V>;
//!               u16 credentials<V> }
//! Extension   { u16 extension_type; opaque extension_data<V> }
//! ```
//!
//! `<V>` is the MLS variable-length vector: a QUIC-style varint byte length (1, 2 or 4 bytes,
//! top bits 00, 01, 10; 11 is invalid; the shortest form is required) and the bytes. The
//! signatures are `SignWithLabel`: Ed25519 over the TLS encoding of
//! `SignContent { opaque label<V> = "MLS 1.0 " + Label; opaque content<V> = TBS }`, where a
//! KeyPackage leaf's TBS is the LeafNode without its signature and the KeyPackage's TBS is the
//! KeyPackage without its signature. Only ciphersuites signing with Ed25519 are understood.
//!
//! Nothing here panics or allocates in proportion to its input beyond the two small
//! `SignContent` buffers; every length is checked against what remains of the input.

use crate::credential::{self, Binding, CredentialError};

/// Largest KeyPackage (as an `MLSMessage`) this reader accepts, bytes. An X-Wing KeyPackage
/// with a v1 credential is about 2.7 KB.
pub const MAX_KEY_PACKAGE_LEN: usize = 64 * 1024;
/// Largest HPKE public key accepted (init and encryption keys). X-Wing's is 1216 bytes; this
/// leaves room for any KEM MLS defines.
pub const MAX_HPKE_KEY_LEN: usize = 4096;
/// `ProtocolVersion::mls10`.
pub const MLS10: u16 = 1;
/// `WireFormat` values of an `MLSMessage`.
pub const WIRE_PUBLIC_MESSAGE: u16 = 1;
/// A `PrivateMessage`.
pub const WIRE_PRIVATE_MESSAGE: u16 = 2;
/// A `Welcome`.
pub const WIRE_WELCOME: u16 = 3;
/// A `KeyPackage`.
pub const WIRE_KEY_PACKAGE: u16 = 5;
/// `CredentialType::basic`.
pub const CREDENTIAL_BASIC: u16 = 1;
/// The `last_resort` KeyPackage extension (draft-ietf-mls-extensions; openmls
/// `ExtensionType::LastResort`).
pub const EXTENSION_LAST_RESORT: u16 = 0x000A;
/// MLS ciphersuites whose signature scheme is Ed25519: 0x0001, 0x0003 and openmls's X-Wing
/// suite 0x004F (MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519).
pub const ED25519_CIPHERSUITES: [u16; 3] = [0x0001, 0x0003, 0x004F];

const LABEL_PREFIX: &[u8] = b"MLS 1.0 ";
const LEAF_NODE_LABEL: &[u8] = b"LeafNodeTBS";
const KEY_PACKAGE_LABEL: &[u8] = b"KeyPackageTBS";
const LEAF_SOURCE_KEY_PACKAGE: u8 = 1;
/// `ContentType::proposal`.
pub const CONTENT_PROPOSAL: u8 = 2;
/// `ContentType::commit`.
pub const CONTENT_COMMIT: u8 = 3;

/// Why a KeyPackage was refused. The messages are meant for the uploader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyPackageError {
    /// Larger than [`MAX_KEY_PACKAGE_LEN`].
    #[error("KeyPackage is {len} bytes, more than {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not an `MLSMessage` (version mls10) carrying a KeyPackage (wire format 5).
    #[error("not an MLS 1.0 KeyPackage message (expected version 1, wire format 5)")]
    NotKeyPackage,
    /// The KeyPackage's own protocol version is not mls10.
    #[error("KeyPackage protocol version {0} is not MLS 1.0")]
    UnsupportedVersion(u16),
    /// A ciphersuite whose signature scheme this reader does not verify.
    #[error("KeyPackage ciphersuite 0x{0:04X} does not sign with Ed25519")]
    UnsupportedCiphersuite(u16),
    /// A credential type other than basic.
    #[error("KeyPackage credential type {0} is not basic (1)")]
    UnsupportedCredential(u16),
    /// The leaf node does not say it comes from a KeyPackage.
    #[error("KeyPackage leaf node source is {0}, not key_package (1)")]
    WrongLeafSource(u8),
    /// The structure does not parse: truncated, a bad vector length, trailing bytes, a field
    /// out of bounds.
    #[error("malformed KeyPackage: {0}")]
    Malformed(&'static str),
    /// The leaf node's signature does not verify with its own signature key.
    #[error("the leaf node signature does not verify")]
    BadLeafSignature,
    /// The KeyPackage signature does not verify with the leaf's signature key.
    #[error("the KeyPackage signature does not verify")]
    BadSignature,
    /// The credential does not bind the leaf's signature key to an account.
    #[error("credential: {0}")]
    Credential(CredentialError),
}

/// A structurally valid KeyPackage, borrowed from its bytes. Nothing is verified yet: call
/// [`KeyPackage::verify`].
#[derive(Debug, Clone)]
pub struct KeyPackage<'a> {
    /// The KeyPackage's ciphersuite.
    pub cipher_suite: u16,
    /// The HPKE init key.
    pub init_key: &'a [u8],
    /// The leaf's HPKE encryption key.
    pub encryption_key: &'a [u8],
    /// The leaf's signature key (Ed25519, 32 bytes).
    pub signature_key: &'a [u8],
    /// The basic credential's identity.
    pub identity: &'a [u8],
    /// Lifetime start, seconds since the epoch.
    pub not_before: u64,
    /// Lifetime end, seconds since the epoch.
    pub not_after: u64,
    /// Whether the KeyPackage carries the `last_resort` extension.
    pub last_resort: bool,
    leaf_tbs: &'a [u8],
    leaf_signature: &'a [u8],
    tbs: &'a [u8],
    signature: &'a [u8],
}

impl KeyPackage<'_> {
    /// Verifies the leaf node's and the KeyPackage's signatures with the leaf's signature key,
    /// then the credential ([`credential::verify`]); returns the account and device it binds.
    pub fn verify(&self) -> Result<Binding, KeyPackageError> {
        if !ED25519_CIPHERSUITES.contains(&self.cipher_suite) {
            return Err(KeyPackageError::UnsupportedCiphersuite(self.cipher_suite));
        }
        let key =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, self.signature_key);
        key.verify(&sign_content(LEAF_NODE_LABEL, self.leaf_tbs), self.leaf_signature)
            .map_err(|_| KeyPackageError::BadLeafSignature)?;
        key.verify(&sign_content(KEY_PACKAGE_LABEL, self.tbs), self.signature)
            .map_err(|_| KeyPackageError::BadSignature)?;
        credential::verify(self.identity, self.signature_key).map_err(KeyPackageError::Credential)
    }
}

/// Parses a KeyPackage wrapped in an `MLSMessage`, as clients upload it and the server hands
/// it out. Refuses anything larger than [`MAX_KEY_PACKAGE_LEN`], a bare KeyPackage, trailing
/// bytes, non-minimal or invalid vector lengths, credentials other than basic and leaf nodes
/// not made for a KeyPackage.
pub fn parse(message: &[u8]) -> Result<KeyPackage<'_>, KeyPackageError> {
    if message.len() > MAX_KEY_PACKAGE_LEN {
        return Err(KeyPackageError::TooLarge { len: message.len(), max: MAX_KEY_PACKAGE_LEN });
    }
    let mut r = Reader::new(message);
    if r.u16()? != MLS10 || r.u16()? != WIRE_KEY_PACKAGE {
        return Err(KeyPackageError::NotKeyPackage);
    }
    let kp_start = r.pos;
    let version = r.u16()?;
    if version != MLS10 {
        return Err(KeyPackageError::UnsupportedVersion(version));
    }
    let cipher_suite = r.u16()?;
    let init_key = hpke_key(r.vector()?)?;

    // LeafNode
    let leaf_start = r.pos;
    let encryption_key = hpke_key(r.vector()?)?;
    let signature_key = r.vector()?;
    if signature_key.len() != 32 {
        return Err(KeyPackageError::Malformed("signature key is not 32 bytes (Ed25519)"));
    }
    let credential_type = r.u16()?;
    if credential_type != CREDENTIAL_BASIC {
        return Err(KeyPackageError::UnsupportedCredential(credential_type));
    }
    let identity = r.vector()?;
    for _ in 0..5 {
        // versions, cipher_suites, extensions, proposals, credentials: u16 each
        if r.vector()?.len() % 2 != 0 {
            return Err(KeyPackageError::Malformed("capability list of odd length"));
        }
    }
    let source = r.u8()?;
    if source != LEAF_SOURCE_KEY_PACKAGE {
        return Err(KeyPackageError::WrongLeafSource(source));
    }
    let not_before = r.u64()?;
    let not_after = r.u64()?;
    extensions(r.vector()?)?;
    let leaf_tbs = &message[leaf_start..r.pos];
    let leaf_signature = signature(r.vector()?)?;

    let kp_extensions = extensions(r.vector()?)?;
    let tbs = &message[kp_start..r.pos];
    let signature = signature(r.vector()?)?;
    if !r.rest().is_empty() {
        return Err(KeyPackageError::Malformed("trailing bytes after the KeyPackage"));
    }
    if init_key == encryption_key {
        return Err(KeyPackageError::Malformed("init key equals the leaf's encryption key"));
    }
    Ok(KeyPackage {
        cipher_suite,
        init_key,
        encryption_key,
        signature_key,
        identity,
        not_before,
        not_after,
        last_resort: kp_extensions.contains(&EXTENSION_LAST_RESORT),
        leaf_tbs,
        leaf_signature,
        tbs,
        signature,
    })
}

/// What a relay can read of an `MLSMessage` in the clear: a Welcome, or a public or private
/// message's group, epoch, content type and authenticated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClearHeader<'a> {
    /// A Welcome (nothing of it is in the clear).
    Welcome,
    /// A `PublicMessage` or `PrivateMessage`.
    Framed {
        /// The group id.
        group_id: &'a [u8],
        /// The epoch the message was made in.
        epoch: u64,
        /// `ContentType`: 1 application, 2 proposal, 3 commit.
        content_type: u8,
        /// The sender-chosen authenticated data (bound by the message's AEAD or signature).
        authenticated_data: &'a [u8],
    },
}

/// Reads the clear header of an `MLSMessage`; `None` for other wire formats and bytes that do
/// not parse. Nothing here is authenticated until the message is processed.
pub fn clear_header(message: &[u8]) -> Option<ClearHeader<'_>> {
    read_clear_header(message).ok().flatten()
}

fn read_clear_header(message: &[u8]) -> Result<Option<ClearHeader<'_>>, KeyPackageError> {
    let mut r = Reader::new(message);
    if r.u16()? != MLS10 {
        return Ok(None);
    }
    let (group_id, epoch, content_type, authenticated_data) = match r.u16()? {
        WIRE_WELCOME => return Ok(Some(ClearHeader::Welcome)),
        WIRE_PUBLIC_MESSAGE => {
            // FramedContent { group_id<V>, u64 epoch, Sender, authenticated_data<V>, u8 type }
            let group_id = r.vector()?;
            let epoch = r.u64()?;
            match r.u8()? {
                1 | 2 => {
                    r.u32()?; // member leaf index, or external sender index
                }
                3 | 4 => {}
                _ => return Ok(None),
            }
            let aad = r.vector()?;
            (group_id, epoch, r.u8()?, aad)
        }
        WIRE_PRIVATE_MESSAGE => {
            // PrivateMessage { group_id<V>, u64 epoch, u8 content_type, authenticated_data<V>,
            //                  encrypted_sender_data<V>, ciphertext<V> }
            let group_id = r.vector()?;
            let epoch = r.u64()?;
            let content_type = r.u8()?;
            (group_id, epoch, content_type, r.vector()?)
        }
        _ => return Ok(None),
    };
    Ok(Some(ClearHeader::Framed { group_id, epoch, content_type, authenticated_data }))
}

/// Whether an `MLSMessage` is a handshake message, judged by the header a relay can read in
/// the clear: a Welcome, or a public or private message whose content type is a proposal or
/// a commit. Anything else (application messages, other wire formats, bytes that do not parse)
/// is not. The label is not authenticated: a sender can put it on any payload, so whatever it
/// earns must be bounded per sender.
pub fn is_handshake(message: &[u8]) -> bool {
    match clear_header(message) {
        Some(ClearHeader::Welcome) => true,
        Some(ClearHeader::Framed { content_type, .. }) => {
            matches!(content_type, CONTENT_PROPOSAL | CONTENT_COMMIT)
        }
        None => false,
    }
}

/// Whether an `MLSMessage` is labelled a commit in its clear header (unauthenticated, like
/// [`is_handshake`]).
pub fn is_commit(message: &[u8]) -> bool {
    matches!(clear_header(message), Some(ClearHeader::Framed { content_type: CONTENT_COMMIT, .. }))
}

/// The TLS encoding of `SignContent { label<V> = "MLS 1.0 " + label, content<V> }`.
fn sign_content(label: &[u8], content: &[u8]) -> Vec<u8> {
    let full = LABEL_PREFIX.len() + label.len();
    let mut out = Vec::with_capacity(full + content.len() + 8);
    put_varint(&mut out, full);
    out.extend_from_slice(LABEL_PREFIX);
    out.extend_from_slice(label);
    put_varint(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// Appends an MLS vector length (the shortest of the 1-, 2- and 4-byte forms). Lengths here
/// are below [`MAX_KEY_PACKAGE_LEN`], far from the 4-byte form's limit of 2^30 - 1.
fn put_varint(out: &mut Vec<u8>, len: usize) {
    if len < 1 << 6 {
        out.push(len as u8);
    } else if len < 1 << 14 {
        out.extend_from_slice(&((len as u16) | 0x4000).to_be_bytes());
    } else {
        out.extend_from_slice(&((len as u32 & 0x3fff_ffff) | 0x8000_0000).to_be_bytes());
    }
}

fn hpke_key(key: &[u8]) -> Result<&[u8], KeyPackageError> {
    match key.len() {
        0 => Err(KeyPackageError::Malformed("empty HPKE public key")),
        n if n > MAX_HPKE_KEY_LEN => Err(KeyPackageError::Malformed("HPKE public key too long")),
        _ => Ok(key),
    }
}

fn signature(sig: &[u8]) -> Result<&[u8], KeyPackageError> {
    if sig.len() == 64 {
        Ok(sig)
    } else {
        Err(KeyPackageError::Malformed("signature is not 64 bytes (Ed25519)"))
    }
}

/// Parses an `Extension extensions<V>` list; returns the extension types, or an error if an
/// entry is truncated.
fn extensions(list: &[u8]) -> Result<Vec<u16>, KeyPackageError> {
    let mut r = Reader::new(list);
    let mut types = Vec::new();
    while !r.rest().is_empty() {
        types.push(r.u16()?);
        r.vector()?;
    }
    Ok(types)
}

/// A cursor over TLS-encoded bytes; every read checks what remains.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyPackageError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else { return Err(KeyPackageError::Malformed("truncated")) };
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], KeyPackageError> {
        self.take(N)?.try_into().map_err(|_| KeyPackageError::Malformed("truncated"))
    }

    fn u8(&mut self) -> Result<u8, KeyPackageError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, KeyPackageError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, KeyPackageError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, KeyPackageError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// An MLS variable-length vector (RFC 9420 §2.1.2).
    fn vector(&mut self) -> Result<&'a [u8], KeyPackageError> {
        let first = self.u8()?;
        let len = match first >> 6 {
            0 => usize::from(first & 0x3f),
            1 => {
                let len = usize::from(u16::from_be_bytes([first & 0x3f, self.u8()?]));
                if len < 1 << 6 {
                    return Err(KeyPackageError::Malformed("vector length not minimally encoded"));
                }
                len
            }
            2 => {
                let [a, b, c] = self.array::<3>()?;
                let len = u32::from_be_bytes([first & 0x3f, a, b, c]) as usize;
                if len < 1 << 14 {
                    return Err(KeyPackageError::Malformed("vector length not minimally encoded"));
                }
                len
            }
            _ => return Err(KeyPackageError::Malformed("invalid vector length prefix (11)")),
        };
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_lengths_are_minimal_and_bounded() {
        assert_eq!(Reader::new(&[0x03, 1, 2, 3]).vector().unwrap(), &[1, 2, 3]);
        assert_eq!(
            Reader::new(&[0x40, 0x40]).vector().unwrap_err(),
            KeyPackageError::Malformed("truncated")
        );
        let long = [&[0x40, 0x40][..], &[7; 64]].concat();
        assert_eq!(Reader::new(&long).vector().unwrap().len(), 64);
        for bad in [&[0x40, 0x05, 1, 2, 3, 4, 5][..], &[0x80, 0, 0, 3, 1, 2, 3]] {
            assert!(
                matches!(Reader::new(bad).vector(), Err(KeyPackageError::Malformed(m)) if m.contains("minimal"))
            );
        }
        assert!(
            matches!(Reader::new(&[0xC0, 0, 0, 0, 0, 0, 0, 1]).vector(), Err(KeyPackageError::Malformed(m)) if m.contains("11"))
        );
        // A huge announced length is a truncation, not an allocation.
        assert_eq!(
            Reader::new(&[0xBF, 0xFF, 0xFF, 0xFF, 1]).vector().unwrap_err(),
            KeyPackageError::Malformed("truncated")
        );
        for len in [0usize, 63, 64, 16383, 16384, 70000] {
            let mut out = Vec::new();
            put_varint(&mut out, len);
            out.resize(out.len() + len, 9);
            assert_eq!(Reader::new(&out).vector().unwrap().len(), len);
        }
    }

    #[test]
    fn handshake_labels() {
        assert!(is_handshake(&[0, 1, 0, 3]));
        // private message: group id "g", epoch 7, content type
        let private =
            |t: u8| [&[0, 1, 0, 2, 1, b'g'][..], &7u64.to_be_bytes(), &[t, 0, 0, 0]].concat();
        assert!(is_handshake(&private(3)));
        assert!(is_handshake(&private(2)));
        assert!(!is_handshake(&private(1)));
        // public message from member 4, no authenticated data
        let public = |t: u8| {
            [&[0, 1, 0, 1, 1, b'g'][..], &7u64.to_be_bytes(), &[1, 0, 0, 0, 4, 0, t]].concat()
        };
        assert!(is_handshake(&public(3)));
        assert!(!is_handshake(&public(1)));
        for other in [&[][..], &[0, 1], &[0, 2, 0, 3], &[0, 1, 0, 5, 0, 1], &[0, 1, 0, 2, 1]] {
            assert!(!is_handshake(other), "{other:?}");
        }
    }
}
