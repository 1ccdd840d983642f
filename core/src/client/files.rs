//! File encryption for transfers: ChaCha20-Poly1305 in 64 KiB segments (a STREAM-style
//! construction: the nonce is the segment counter plus a last-segment flag, so segments cannot
//! be reordered, dropped or truncated undetected). A fresh key per file travels inside the
//! MLS-encrypted file offer.

use std::io::{Read, Write};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
/// Authentication tag per segment.
const TAG: usize = 16;

/// A failed file encryption or decryption.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileCryptoError {
    /// Reading or writing a file failed.
    #[error("file I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A segment failed authentication: the download is corrupt or was tampered with.
    #[error("file content failed authentication")]
    Tampered,
    /// The decrypted file does not have the hash its offer promised.
    #[error("decrypted file does not match the offered SHA-256")]
    HashMismatch,
}

/// What encryption produced.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// SHA-256 of the plaintext.
    pub plain_sha256: [u8; 32],
    /// Plaintext size.
    pub plain_size: u64,
    /// SHA-256 of the ciphertext: the blob id.
    pub blob_id: [u8; 32],
    /// Ciphertext size.
    pub sealed_size: u64,
}

/// Ciphertext size for a plaintext of `len` bytes.
pub fn sealed_len(len: u64) -> u64 {
    let segments = if len == 0 { 1 } else { len.div_ceil(SEGMENT as u64) };
    len + segments * TAG as u64
}

fn nonce(counter: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Encrypts `input` into `output` under `key`.
pub fn seal(
    key: &[u8; 32],
    mut input: impl Read,
    mut output: impl Write,
) -> Result<Sealed, FileCryptoError> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let (mut plain_hash, mut sealed_hash) = (Sha256::new(), Sha256::new());
    let (mut plain_size, mut sealed_size) = (0u64, 0u64);
    let mut current = read_segment(&mut input)?;
    let mut counter = 0u64;
    loop {
        let next = if current.len() == SEGMENT { read_segment(&mut input)? } else { Vec::new() };
        let last = next.is_empty();
        plain_hash.update(&current);
        plain_size += current.len() as u64;
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce(counter, last)), current.as_slice())
            .map_err(|_| FileCryptoError::Tampered)?;
        sealed_hash.update(&ct);
        sealed_size += ct.len() as u64;
        output.write_all(&ct)?;
        if last {
            break;
        }
        current = next;
        counter += 1;
    }
    output.flush()?;
    Ok(Sealed {
        plain_sha256: plain_hash.finalize().into(),
        plain_size,
        blob_id: sealed_hash.finalize().into(),
        sealed_size,
    })
}

/// Decrypts `input` into `output`, checking every segment and the plaintext hash.
pub fn open(
    key: &[u8; 32],
    expected_sha256: &[u8; 32],
    mut input: impl Read,
    mut output: impl Write,
) -> Result<u64, FileCryptoError> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut current = read_exact_or_less(&mut input, SEGMENT + TAG)?;
    let mut counter = 0u64;
    loop {
        let next = if current.len() == SEGMENT + TAG {
            read_exact_or_less(&mut input, SEGMENT + TAG)?
        } else {
            Vec::new()
        };
        let last = next.is_empty();
        let pt = cipher
            .decrypt(Nonce::from_slice(&nonce(counter, last)), current.as_slice())
            .map_err(|_| FileCryptoError::Tampered)?;
        hash.update(&pt);
        size += pt.len() as u64;
        output.write_all(&pt)?;
        if last {
            break;
        }
        current = next;
        counter += 1;
    }
    output.flush()?;
    if <[u8; 32]>::from(hash.finalize()) != *expected_sha256 {
        return Err(FileCryptoError::HashMismatch);
    }
    Ok(size)
}

fn read_segment(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    read_exact_or_less(r, SEGMENT)
}

fn read_exact_or_less(r: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        match r.read(&mut buf[filled..])? {
            0 => break,
            k => filled += k,
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_at_segment_boundaries_and_tamper_detection() {
        for len in [0usize, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let key = [9u8; 32];
            let mut ct = Vec::new();
            let s = seal(&key, data.as_slice(), &mut ct).unwrap();
            assert_eq!(ct.len() as u64, sealed_len(len as u64), "len {len}");
            assert_eq!(s.sealed_size, ct.len() as u64);
            assert_eq!(s.blob_id, <[u8; 32]>::from(Sha256::digest(&ct)));
            let mut out = Vec::new();
            open(&key, &s.plain_sha256, ct.as_slice(), &mut out).unwrap();
            assert_eq!(out, data);
            if len > SEGMENT {
                // Dropping the last segment is detected (the new last one lacks the flag).
                let truncated = &ct[..SEGMENT + TAG];
                assert!(open(&key, &s.plain_sha256, truncated, &mut Vec::new()).is_err());
            }
            let mut bad = ct.clone();
            bad[0] ^= 1;
            assert!(matches!(
                open(&key, &s.plain_sha256, bad.as_slice(), &mut Vec::new()),
                Err(FileCryptoError::Tampered)
            ));
            assert!(matches!(
                open(&[8u8; 32], &s.plain_sha256, ct.as_slice(), &mut Vec::new()),
                Err(FileCryptoError::Tampered)
            ));
        }
    }
}
