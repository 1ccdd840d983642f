//! Blobs (methods 600-601): chunked, resumable, content-addressed uploads of encrypted files.

use qpq_proto::{MAX_PAYLOAD, Status, v1};

use super::{Conn, RpcError, RpcResult, key32, ok};
use crate::store::{BlobLimits, UploadOutcome, now_ms};

/// Largest chunk in one UploadBlob or DownloadBlob.
pub const MAX_CHUNK: usize = MAX_PAYLOAD as usize - 4096;
/// DownloadBlob chunk when the client asks for 0 bytes.
const DEFAULT_CHUNK: usize = 1 << 20;
/// Incomplete uploads are dropped after a day.
const INCOMPLETE_TTL_MS: u64 = 86_400_000;

pub(super) async fn upload(ctx: &Conn, req: v1::UploadBlobRequest) -> RpcResult {
    let me = ctx.principal()?;
    let blob_id = key32("blob_id", &req.blob_id)?;
    if req.total_size == 0 {
        return Err(RpcError::new(Status::BadRequest, "total_size must be positive"));
    }
    if req.chunk.len() > MAX_CHUNK {
        return Err(RpcError::new(
            Status::PayloadTooLarge,
            format!("chunks are at most {MAX_CHUNK} bytes"),
        ));
    }
    if req.media_type.len() > 128 {
        return Err(RpcError::new(Status::BadRequest, "media_type is longer than 128 bytes"));
    }
    let l = &ctx.shared.config.limits;
    let limits = BlobLimits {
        max_blob_bytes: l.max_blob_bytes,
        quota_bytes: l.blob_quota_bytes,
        ttl_ms: l.blob_ttl_secs.saturating_mul(1000),
        incomplete_ttl_ms: INCOMPLETE_TTL_MS,
        disk_bytes: super::delivery::disk_application_bytes(l.disk_budget_bytes),
    };
    let total = req.total_size;
    let outcome = ctx
        .shared
        .store
        .upload_blob_chunk(
            me.identity,
            blob_id,
            total,
            req.offset,
            req.chunk,
            req.media_type,
            limits,
            now_ms(),
        )
        .await?;
    match outcome {
        UploadOutcome::Progress { next_offset }
        | UploadOutcome::OffsetMismatch { expected: next_offset } => {
            ok(v1::UploadBlobResponse { next_offset, complete: false })
        }
        UploadOutcome::Complete => {
            ok(v1::UploadBlobResponse { next_offset: total, complete: true })
        }
        UploadOutcome::TooLarge => Err(RpcError::new(
            Status::PayloadTooLarge,
            format!("blobs are at most {} bytes", l.max_blob_bytes),
        )),
        UploadOutcome::QuotaExceeded => Err(RpcError::new(
            Status::PayloadTooLarge,
            format!("this upload would exceed your blob quota of {} bytes", l.blob_quota_bytes),
        )),
        UploadOutcome::SizeMismatch => Err(RpcError::new(
            Status::BadRequest,
            "chunk runs past total_size, or total_size changed",
        )),
        UploadOutcome::HashMismatch => Err(RpcError::new(
            Status::BadRequest,
            "content does not hash to blob_id; the upload was discarded",
        )),
        UploadOutcome::StorageFull => Err(RpcError::retry(
            Status::Unavailable,
            "the server's storage budget cannot take this blob now; try again later",
            std::time::Duration::from_secs(60),
        )),
        UploadOutcome::NotOwner => {
            Err(RpcError::new(Status::Conflict, "another user is uploading this blob"))
        }
    }
}

pub(super) async fn download(ctx: &Conn, req: v1::DownloadBlobRequest) -> RpcResult {
    let _me = ctx.principal()?;
    let blob_id = key32("blob_id", &req.blob_id)?;
    let len = match req.max_len as usize {
        0 => DEFAULT_CHUNK,
        n => n.min(MAX_CHUNK),
    };
    match ctx.shared.store.download_blob(blob_id, req.offset, len).await? {
        Some(c) => ok(v1::DownloadBlobResponse {
            chunk: c.chunk,
            total_size: c.total_size,
            media_type: c.media_type,
        }),
        None => Err(RpcError::new(Status::NotFound, "no complete blob with this id")),
    }
}
