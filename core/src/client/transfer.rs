//! File transfers, detached from the client: an upload or a download is a future of its own
//! (`'static`, `Send`), which a UI spawns so that nothing waits behind it. It runs on the
//! client's current connection (another stream of it) and, when that is lost, dials and
//! resumes a connection of its own with the same pinned certificate and session token.
//! Progress goes to a callback after every chunk. Offering the uploaded file is a message,
//! so it goes through the client ([`Client::offer_file`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qpq_proto::{method, v1};
use rand::RngCore;
use zeroize::Zeroizing;

use super::engine::{Client, RECONNECT_ATTEMPTS};
use super::error::ClientError;
use super::event::{Event, Transfer};
use super::files::{self, FileCryptoError};
use super::net::{Connection, NetError};
use super::session::Dial;
use super::state::random_id;
use crate::content::{Body, FileOffer};
use crate::identity::hex;
use crate::ids::GroupId;

/// Blob chunk size for uploads and downloads (well below the frame cap).
const CHUNK: usize = 1 << 20;

/// Called after every transferred chunk.
pub type TransferProgress = Box<dyn FnMut(Transfer) + Send>;

/// A transfer's own link to the server: the client's connection while it lasts, then
/// connections it dials and resumes itself.
struct Link {
    conn: Option<Arc<Connection>>,
    dial: Dial,
    token: Zeroizing<Vec<u8>>,
}

impl Link {
    /// Calls `method`; a lost connection is dialed again and the call repeated, up to
    /// [`RECONNECT_ATTEMPTS`] times in a row with a growing pause.
    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        method_id: u16,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let mut failures = 0;
        let mut delay = Duration::from_millis(200);
        loop {
            let r = match self.connection().await {
                Ok(conn) => conn.call(method_id, req, Duration::ZERO).await.map_err(Into::into),
                Err(e) => Err(e),
            };
            match r {
                Err(ClientError::Net(e)) if e.is_transient() && failures < RECONNECT_ATTEMPTS => {
                    failures += 1;
                    // A lost connection is dialed again; a busy server's live one is kept,
                    // and its retry hint respected.
                    if matches!(e, NetError::Connection(_) | NetError::Timeout) {
                        self.conn = None;
                    }
                    let hint = e.retry_after().unwrap_or_default().min(Duration::from_secs(30));
                    tokio::time::sleep(delay.max(hint)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(ClientError::Net(e)) if e.status() == Some(qpq_proto::Status::Unauthorized) => {
                    return Err(ClientError::NeedLogin);
                }
                other => return other,
            }
        }
    }

    async fn connection(&mut self) -> Result<Arc<Connection>, ClientError> {
        if let Some(c) = self.conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let conn = self.dial.connect().await?;
        let _: v1::ResumeResponse = conn
            .call(
                method::RESUME,
                &v1::ResumeRequest { session_token: self.token.to_vec() },
                Duration::ZERO,
            )
            .await
            .map_err(|e| match e.status() {
                Some(qpq_proto::Status::Unauthorized) => ClientError::NeedLogin,
                _ => e.into(),
            })?;
        let conn = Arc::new(conn);
        self.conn = Some(conn.clone());
        Ok(conn)
    }
}

impl Client {
    fn link(&self) -> Result<Link, ClientError> {
        Ok(Link {
            conn: self.session.shared(),
            dial: self.session.dial_params()?,
            token: self.state.store.token()?.ok_or(ClientError::NeedLogin)?,
        })
    }

    /// Encrypts a file and uploads it in chunks, as a future detached from the client
    /// (resuming after a dropped connection). Offer the result with [`Client::offer_file`].
    pub fn uploader(
        &self,
        path: &Path,
        progress: TransferProgress,
    ) -> Result<impl Future<Output = Result<FileOffer, ClientError>> + Send + 'static, ClientError>
    {
        let link = self.link()?;
        let path = path.to_path_buf();
        Ok(upload(link, path, progress))
    }

    /// Offers an uploaded file in a conversation (a message like any other).
    pub async fn offer_file(
        &mut self,
        conv: &GroupId,
        offer: &FileOffer,
    ) -> Result<(), ClientError> {
        // The upload may have outlived the client's connection: offline (or with automatic
        // reconnects off) the offer waits in the outbox like any message.
        let _ = self.ensure_connected().await;
        self.send(conv, Body::File(offer.clone())).await.map(drop)
    }

    /// Downloads, verifies and decrypts a file offer into `dir`, as a future detached from
    /// the client; it returns the file's path.
    ///
    /// The ciphertext goes to a hidden part file named after the blob first. A download that
    /// was cut off (connection lost, program stopped) resumes from what its part file holds;
    /// if the whole then fails the blob's hash, the part is discarded and the download starts
    /// over once.
    pub fn downloader(
        &self,
        offer: &FileOffer,
        dir: &Path,
        progress: TransferProgress,
    ) -> Result<impl Future<Output = Result<PathBuf, ClientError>> + Send + 'static, ClientError>
    {
        let link = self.link()?;
        Ok(download(link, offer.clone(), dir.to_path_buf(), progress))
    }

    /// Uploads a file and offers it in the conversation, in turn ([`Client::uploader`] and
    /// [`Client::offer_file`]). Progress goes to the progress hook and the event stream.
    pub async fn send_file(
        &mut self,
        conv: &GroupId,
        path: &Path,
    ) -> Result<FileOffer, ClientError> {
        let offer = self.uploader(path, self.reporter())?.await?;
        self.offer_file(conv, &offer).await?;
        Ok(offer)
    }

    /// Downloads a file offer into `dir` ([`Client::downloader`]), progress to the progress
    /// hook and the event stream.
    pub async fn download(
        &mut self,
        offer: &FileOffer,
        dir: &Path,
    ) -> Result<PathBuf, ClientError> {
        self.downloader(offer, dir, self.reporter())?.await
    }

    /// Progress to the progress hook (called synchronously after each chunk) and to the event
    /// stream.
    fn reporter(&self) -> TransferProgress {
        let (events, hook) = (self.event_sender(), self.progress.clone());
        Box::new(move |t: Transfer| {
            if let Ok(mut h) = hook.lock()
                && let Some(h) = h.as_mut()
            {
                h(t.done, t.total);
            }
            let _ = events.send(Event::Transfer(t));
        })
    }
}

fn report(progress: &mut TransferProgress, t: Transfer) {
    progress(t);
}

async fn upload(
    mut link: Link,
    path: PathBuf,
    mut progress: TransferProgress,
) -> Result<FileOffer, ClientError> {
    let name =
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let sealed_path = std::env::temp_dir().join(format!("qpq-upload-{}", hex(&random_id())));
    // Removed however this ends (an error, a panic, the future dropped midway).
    let _sealed_file = RemoveOnDrop(sealed_path.clone());
    // Sealing reads and writes the whole file: off the async threads.
    let (source, target) = (path.clone(), sealed_path.clone());
    let sealed = tokio::task::spawn_blocking(move || -> Result<_, ClientError> {
        let input = std::io::BufReader::new(std::fs::File::open(&source)?);
        let output = std::io::BufWriter::new(std::fs::File::create(&target)?);
        Ok(files::seal(&key, input, output)?)
    })
    .await
    .map_err(|_| ClientError::Internal("the sealing task failed"))?;
    let sealed = sealed?;
    let uploaded = upload_blob(
        &mut link,
        &sealed_path,
        &sealed.blob_id,
        sealed.sealed_size,
        &name,
        &mut progress,
    )
    .await;
    uploaded?;
    Ok(FileOffer {
        blob_id: sealed.blob_id,
        size: sealed.plain_size,
        ciphertext_size: sealed.sealed_size,
        name,
        media_type: media_type(&path),
        key,
        sha256: sealed.plain_sha256,
    })
}

async fn upload_blob(
    link: &mut Link,
    path: &Path,
    blob_id: &[u8; 32],
    total: u64,
    name: &str,
    progress: &mut TransferProgress,
) -> Result<(), ClientError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let mut offset = 0u64;
    // Rounds in a row that moved nothing forward (a failed chunk, or an answer that does not
    // advance): the upload gives up after as many as a call's reconnect attempts.
    let mut stalled = 0;
    loop {
        if stalled > RECONNECT_ATTEMPTS {
            return Err(ClientError::UploadStalled);
        }
        file.seek(SeekFrom::Start(offset))?;
        let mut chunk = vec![0u8; CHUNK.min(total.saturating_sub(offset) as usize)];
        file.read_exact(&mut chunk)?;
        let req = v1::UploadBlobRequest {
            blob_id: blob_id.to_vec(),
            total_size: total,
            offset,
            chunk,
            media_type: "application/octet-stream".into(),
        };
        let r: v1::UploadBlobResponse = match link.call(method::UPLOAD_BLOB, &req).await {
            Ok(r) => r,
            // The server may hold more or less than we sent before the connection went: ask
            // where to resume (an empty chunk at offset 0 answers with the server's offset).
            Err(ClientError::Net(e)) if e.is_transient() => {
                let probe = v1::UploadBlobRequest {
                    blob_id: blob_id.to_vec(),
                    total_size: total,
                    offset: 0,
                    chunk: Vec::new(),
                    media_type: String::new(),
                };
                link.call(method::UPLOAD_BLOB, &probe).await?
            }
            Err(e) => return Err(e),
        };
        if r.complete {
            report(progress, Transfer { name: name.into(), done: total, total, upload: true });
            return Ok(());
        }
        if r.next_offset > total {
            return Err(ClientError::PeerInvalid("the server asked for bytes past the end"));
        }
        if r.next_offset > offset {
            stalled = 0;
        } else {
            stalled += 1;
        }
        offset = r.next_offset;
        report(progress, Transfer { name: name.into(), done: offset, total, upload: true });
    }
}

async fn download(
    mut link: Link,
    offer: FileOffer,
    dir: PathBuf,
    mut progress: TransferProgress,
) -> Result<PathBuf, ClientError> {
    std::fs::create_dir_all(&dir)?;
    // Named after the blob, not the offered name: unique, and never too long.
    let part = dir.join(format!(".{}.qpq-part", hex(&offer.blob_id)));
    let (mut intact, resumed_from) =
        fetch_blob(&mut link, &offer, &part, true, &mut progress).await?;
    if !intact && resumed_from > 0 {
        std::fs::remove_file(&part)?;
        (intact, _) = fetch_blob(&mut link, &offer, &part, false, &mut progress).await?;
    }
    if !intact {
        let _ = std::fs::remove_file(&part);
        return Err(FileCryptoError::Tampered.into());
    }
    // Decrypted into a file of our own, synced, and only then given its name: a crash never
    // leaves a truncated file under the offered name, and nothing existing is touched.
    let out = dir.join(format!(".{}.qpq-out", hex(&offer.blob_id)));
    let (part2, out2, dir2, key, sha, name) =
        (part.clone(), out.clone(), dir.clone(), offer.key, offer.sha256, offer.name.clone());
    let result = tokio::task::spawn_blocking(move || -> Result<PathBuf, ClientError> {
        let input = std::io::BufReader::new(std::fs::File::open(&part2)?);
        let file = std::fs::File::create(&out2)?;
        let mut output = std::io::BufWriter::new(file);
        files::open(&key, &sha, input, &mut output)?;
        let file = output.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(files::place(&out2, &dir2, &name)?)
    })
    .await
    .map_err(|_| ClientError::Internal("the decrypting task failed"))?;
    // The part goes once it is decrypted, or if it cannot be (the offer is bad); after a
    // local failure (disk full, no permission) it stays, so the next try needs no download.
    let bad_offer = matches!(
        result,
        Err(ClientError::File(FileCryptoError::Tampered | FileCryptoError::HashMismatch))
    );
    if result.is_ok() || bad_offer {
        let _ = std::fs::remove_file(&part);
    }
    if result.is_err() {
        let _ = std::fs::remove_file(&out);
    }
    result
}

/// Completes `part` with the offer's ciphertext, from what it already holds if `resume`
/// (otherwise from zero), and syncs it. Returns whether the whole matches the blob id (its
/// SHA-256) and the offset it resumed from.
async fn fetch_blob(
    link: &mut Link,
    offer: &FileOffer,
    part: &Path,
    resume: bool,
    progress: &mut TransferProgress,
) -> Result<(bool, u64), ClientError> {
    use sha2::Digest;
    use std::io::{Read, Seek, Write};
    let mut out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)?;
    let mut hash = sha2::Sha256::new();
    let mut offset = out.metadata()?.len();
    if !resume || offset > offer.ciphertext_size {
        out.set_len(0)?;
        offset = 0;
    }
    let mut held = std::io::BufReader::new(&out).take(offset);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = held.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    out.seek(std::io::SeekFrom::Start(offset))?;
    let resumed_from = offset;
    while offset < offer.ciphertext_size {
        let req = v1::DownloadBlobRequest {
            blob_id: offer.blob_id.to_vec(),
            offset,
            max_len: CHUNK as u32,
        };
        let r: v1::DownloadBlobResponse = link.call(method::DOWNLOAD_BLOB, &req).await?;
        if r.chunk.is_empty() {
            return Err(ClientError::PeerInvalid("the server returned an empty chunk"));
        }
        if r.chunk.len() > CHUNK || offset + r.chunk.len() as u64 > offer.ciphertext_size {
            return Err(ClientError::PeerInvalid("the server returned more than was asked"));
        }
        hash.update(&r.chunk);
        out.write_all(&r.chunk)?;
        offset += r.chunk.len() as u64;
        report(
            progress,
            Transfer {
                name: offer.name.clone(),
                done: offset,
                total: offer.ciphertext_size,
                upload: false,
            },
        );
    }
    out.sync_all()?;
    Ok((<[u8; 32]>::from(hash.finalize()) == offer.blob_id, resumed_from))
}

/// A file removed when this goes out of scope.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn media_type(path: &Path) -> String {
    let ext =
        path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "md" | "log" => "text/plain",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
    .to_string()
}
