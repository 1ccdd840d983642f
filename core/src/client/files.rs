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

/// The longest file name [`safe_file_name`] returns, in bytes (file systems allow 255).
const MAX_NAME: usize = 200;

/// A name a peer offered, made safe to create in a download directory: only its last path
/// component; separators, control and bidi-override characters replaced by `_`; no leading
/// dot (no hidden files, no `.bashrc`, no `..`); never empty; at most 200 bytes.
pub fn safe_file_name(offered: &str) -> String {
    let last = offered.rsplit(['/', '\\']).next().unwrap_or("");
    let mut name: String = last
        .chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi || c == '/' || c == '\\' { '_' } else { c }
        })
        .collect();
    let trimmed = name.trim_start_matches(['.', ' ']).trim_end_matches([' ', '.']);
    name = if trimmed.is_empty() { "download".to_string() } else { trimmed.to_string() };
    if name.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

/// Gives the finished file `from` its name in `dir`: the safe form of `offered`, or if that
/// exists `stem (1).ext`, `stem (2).ext`, ... An existing file is never replaced (the name is
/// taken with a hard link, which fails rather than overwrite); `from` is removed afterwards.
pub fn place(
    from: &std::path::Path,
    dir: &std::path::Path,
    offered: &str,
) -> std::io::Result<std::path::PathBuf> {
    let name = safe_file_name(offered);
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name.as_str(), ""),
    };
    for n in 0..1000u32 {
        let candidate =
            if n == 0 { dir.join(&name) } else { dir.join(format!("{stem} ({n}){ext}")) };
        match std::fs::hard_link(from, &candidate) {
            Ok(()) => {
                std::fs::remove_file(from)?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free name for the download"))
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
    fn offered_names_are_made_safe() {
        assert_eq!(safe_file_name("notes.pdf"), "notes.pdf");
        assert_eq!(safe_file_name(".bashrc"), "bashrc");
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_file_name(".."), "download");
        assert_eq!(safe_file_name(""), "download");
        assert_eq!(safe_file_name("a\nb\x1b[31m.txt"), "a_b_[31m.txt");
        assert_eq!(safe_file_name("invoice\u{202E}fdp.exe"), "invoice_fdp.exe");
        let long = "é".repeat(300);
        let safe = safe_file_name(&long);
        assert!(safe.len() <= MAX_NAME && safe.chars().all(|c| c == 'é'));
    }

    #[test]
    fn placing_a_file_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.pdf"), b"mine").unwrap();
        std::fs::write(dir.path().join("bashrc"), b"mine too").unwrap();
        let mut placed = Vec::new();
        for (offered, body) in [("notes.pdf", "one"), ("notes.pdf", "two"), (".bashrc", "three")] {
            let tmp = dir.path().join(".tmp");
            std::fs::write(&tmp, body).unwrap();
            placed.push(place(&tmp, dir.path(), offered).unwrap());
            assert!(!tmp.exists());
        }
        let names: Vec<String> =
            placed.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["notes (1).pdf", "notes (2).pdf", "bashrc (1)"]);
        assert_eq!(std::fs::read(dir.path().join("notes.pdf")).unwrap(), b"mine");
        assert_eq!(std::fs::read(dir.path().join("bashrc")).unwrap(), b"mine too");
        assert_eq!(std::fs::read(&placed[1]).unwrap(), b"two");
    }

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
