//! Blobs: metadata in redb, content in `<blob dir>/<hex id>` (`.part` while incomplete).
//!
//! A chunk is appended only at the offset the server expects, written and fsynced before the
//! metadata that counts it commits; a crash between the two leaves bytes past `received` that
//! the next chunk overwrites. The last chunk triggers a SHA-256 check against the blob id.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use redb::ReadableTable;
use sha2::{Digest, Sha256};

use super::records::{Blob, Usage};
use super::tables::*;
use super::{Store, StoreError, change_stored_bytes, stored_bytes, usage_of};

/// Result of one [`Store::upload_blob_chunk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Accepted; send the next chunk at `next_offset`.
    Progress {
        /// Where the next chunk starts.
        next_offset: u64,
    },
    /// The blob is complete and verified (possibly uploaded earlier by anyone).
    Complete,
    /// The chunk does not start where the server expects; resume at `expected`.
    OffsetMismatch {
        /// Bytes the server holds.
        expected: u64,
    },
    /// Larger than the per-blob limit.
    TooLarge,
    /// The uploader's blob quota would be exceeded.
    QuotaExceeded,
    /// The chunk runs past the declared total size, or the total differs from the first chunk's.
    SizeMismatch,
    /// The content's SHA-256 is not the blob id; the upload was discarded.
    HashMismatch,
    /// Another user is uploading a blob with this id.
    NotOwner,
    /// The server's disk budget cannot take a blob this large now.
    StorageFull,
}

/// A downloaded range.
#[derive(Debug)]
pub struct BlobChunk {
    /// The bytes at the requested offset.
    pub chunk: Vec<u8>,
    /// Size of the whole blob.
    pub total_size: u64,
    /// Media type given by the uploader.
    pub media_type: String,
}

/// Limits applied to uploads.
#[derive(Debug, Clone, Copy)]
pub struct BlobLimits {
    /// Largest blob.
    pub max_blob_bytes: u64,
    /// Blob bytes one user may hold.
    pub quota_bytes: u64,
    /// Lifetime of a complete blob, ms.
    pub ttl_ms: u64,
    /// Lifetime of an unfinished upload, ms.
    pub incomplete_ttl_ms: u64,
    /// Stored bytes (queues and blobs, server-wide) a new blob may bring the server to.
    pub disk_bytes: u64,
}

impl Store {
    /// Stores one chunk of a blob upload.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_blob_chunk(
        &self,
        owner: [u8; 32],
        blob_id: [u8; 32],
        total_size: u64,
        offset: u64,
        chunk: Vec<u8>,
        media_type: String,
        limits: BlobLimits,
        now_ms: u64,
    ) -> Result<UploadOutcome, StoreError> {
        let _serial = self.blob_lock().lock().await;
        let meta = {
            let t = self.read()?.open_table(BLOBS)?;
            t.get(blob_id.as_slice())?.map(|v| Blob::decode(v.value())).transpose()?
        };
        let meta = match meta {
            Some(m) if m.complete => return Ok(UploadOutcome::Complete),
            Some(m) if m.owner != owner => return Ok(UploadOutcome::NotOwner),
            Some(m) if m.total_size != total_size => return Ok(UploadOutcome::SizeMismatch),
            Some(m) => m,
            None => {
                if total_size > limits.max_blob_bytes {
                    return Ok(UploadOutcome::TooLarge);
                }
                let expires = now_ms.saturating_add(limits.incomplete_ttl_ms);
                let m = Blob {
                    owner,
                    total_size,
                    received: 0,
                    complete: false,
                    created_ms: now_ms,
                    expires_ms: expires,
                    media_type,
                };
                let created = m.clone();
                let refused = self
                    .write(move |txn| {
                        let mut usage = txn.open_table(USAGE)?;
                        let u = usage_of(&usage, &owner)?;
                        if u.blob_bytes + total_size > limits.quota_bytes {
                            return Ok(Some(UploadOutcome::QuotaExceeded));
                        }
                        let stored = stored_bytes(&txn.open_table(META)?)?;
                        if stored.saturating_add(total_size) > limits.disk_bytes {
                            return Ok(Some(UploadOutcome::StorageFull));
                        }
                        let mut blobs = txn.open_table(BLOBS)?;
                        if blobs.get(blob_id.as_slice())?.is_some() {
                            return Ok(None); // raced with ourselves; the next check sorts it out
                        }
                        let u = Usage { blob_bytes: u.blob_bytes + total_size, ..u };
                        usage.insert(owner.as_slice(), u.encode().as_slice())?;
                        blobs.insert(blob_id.as_slice(), created.encode().as_slice())?;
                        txn.open_table(EXPIRY)?
                            .insert((expires, blob_ref(&blob_id).as_slice()), ())?;
                        drop((usage, blobs));
                        change_stored_bytes(txn, total_size, 0)?;
                        Ok(None)
                    })
                    .await?;
                if let Some(refused) = refused {
                    return Ok(refused);
                }
                m
            }
        };
        if offset != meta.received {
            return Ok(UploadOutcome::OffsetMismatch { expected: meta.received });
        }
        let end = offset.saturating_add(chunk.len() as u64);
        if end > total_size {
            return Ok(UploadOutcome::SizeMismatch);
        }
        if chunk.is_empty() && end < total_size {
            return Ok(UploadOutcome::Progress { next_offset: meta.received });
        }
        let part = self.blob_path(&blob_id, true);
        let done = end == total_size;
        let verified = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .read(true)
                .truncate(false)
                .open(&part)?;
            f.set_len(offset)?;
            f.seek(SeekFrom::Start(offset))?;
            f.write_all(&chunk)?;
            f.sync_data()?;
            if !done {
                return Ok(true);
            }
            f.seek(SeekFrom::Start(0))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(h.finalize().as_slice() == blob_id.as_slice())
        })
        .await
        .map_err(|_| StoreError::Corrupt("blob writer task"))??;
        if done && !verified {
            self.discard_blob(blob_id, owner, total_size, meta.expires_ms).await?;
            return Ok(UploadOutcome::HashMismatch);
        }
        if done {
            std::fs::rename(self.blob_path(&blob_id, true), self.blob_path(&blob_id, false))?;
            // Make the rename durable before the metadata says "complete".
            if let Ok(dir) = std::fs::File::open(self.blob_dir()) {
                let _ = dir.sync_all();
            }
        }
        let old_expiry = meta.expires_ms;
        let new_expiry =
            if done { meta.created_ms.saturating_add(limits.ttl_ms) } else { old_expiry };
        let created_ms = meta.created_ms;
        let updated = Blob { received: end, complete: done, expires_ms: new_expiry, ..meta };
        let still_there = self
            .write(move |txn| {
                let mut blobs = txn.open_table(BLOBS)?;
                // The sweep may have expired this upload while the chunk was being written.
                let current =
                    blobs.get(blob_id.as_slice())?.map(|v| Blob::decode(v.value())).transpose()?;
                if current.is_none_or(|c| c.created_ms != created_ms) {
                    return Ok(false);
                }
                blobs.insert(blob_id.as_slice(), updated.encode().as_slice())?;
                if done {
                    let mut exp = txn.open_table(EXPIRY)?;
                    exp.remove((old_expiry, blob_ref(&blob_id).as_slice()))?;
                    exp.insert((new_expiry, blob_ref(&blob_id).as_slice()), ())?;
                }
                Ok(true)
            })
            .await?;
        if !still_there {
            self.remove_blob_files(&blob_id);
            return Ok(UploadOutcome::OffsetMismatch { expected: 0 });
        }
        Ok(if done {
            UploadOutcome::Complete
        } else {
            UploadOutcome::Progress { next_offset: end }
        })
    }

    /// Reads up to `max_len` bytes of a complete blob from `offset`; `None` if there is no
    /// complete blob with this id.
    pub async fn download_blob(
        &self,
        blob_id: [u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobChunk>, StoreError> {
        let meta = {
            let t = self.read()?.open_table(BLOBS)?;
            t.get(blob_id.as_slice())?.map(|v| Blob::decode(v.value())).transpose()?
        };
        let Some(meta) = meta.filter(|m| m.complete) else { return Ok(None) };
        let path = self.blob_path(&blob_id, false);
        let total = meta.total_size;
        let chunk = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let len = total.saturating_sub(offset).min(max_len as u64) as usize;
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(offset.min(total)))?;
            let mut buf = vec![0u8; len];
            f.read_exact(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(|_| StoreError::Corrupt("blob reader task"))??;
        Ok(Some(BlobChunk { chunk, total_size: total, media_type: meta.media_type }))
    }

    /// Deletes a blob's metadata, its quota charge and its file.
    async fn discard_blob(
        &self,
        blob_id: [u8; 32],
        owner: [u8; 32],
        size: u64,
        expires_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(move |txn| {
            remove_blob_in(txn, &blob_id, &owner, size)?;
            txn.open_table(EXPIRY)?.remove((expires_ms, blob_ref(&blob_id).as_slice()))?;
            Ok(())
        })
        .await?;
        self.remove_blob_files(&blob_id);
        Ok(())
    }

    /// Removes both possible files of a blob; missing files are fine.
    pub(crate) fn remove_blob_files(&self, blob_id: &[u8]) {
        let Ok(id) = <[u8; 32]>::try_from(blob_id) else { return };
        let _ = std::fs::remove_file(self.blob_path(&id, true));
        let _ = std::fs::remove_file(self.blob_path(&id, false));
    }

    fn blob_path(&self, blob_id: &[u8; 32], partial: bool) -> PathBuf {
        let mut name = hex(blob_id);
        if partial {
            name.push_str(".part");
        }
        self.blob_dir().join(name)
    }
}

/// Drops a blob's metadata and returns its bytes to the owner's quota (expiry entries are the
/// caller's business).
pub(super) fn remove_blob_in(
    txn: &redb::WriteTransaction,
    blob_id: &[u8],
    owner: &[u8; 32],
    size: u64,
) -> Result<(), StoreError> {
    txn.open_table(BLOBS)?.remove(blob_id)?;
    let mut usage = txn.open_table(USAGE)?;
    let u = usage_of(&usage, owner)?;
    let u = Usage { blob_bytes: u.blob_bytes.saturating_sub(size), ..u };
    usage.insert(owner.as_slice(), u.encode().as_slice())?;
    drop(usage);
    change_stored_bytes(txn, 0, size)
}

pub(super) fn blob_ref(blob_id: &[u8]) -> Vec<u8> {
    let mut r = vec![EXPIRE_BLOB];
    r.extend_from_slice(blob_id);
    r
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}
