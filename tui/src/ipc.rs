//! The local socket between `qpq` processes of one user: the process that owns an account
//! (`qpq daemon`, holding the vault's exclusive lock) serves it on a UNIX socket, and other
//! `qpq` processes of the same user attach to it.
//!
//! This module is the transport only, generic over the message types (anything serde can
//! carry): the framing, where the socket lives, and binding, accepting and connecting with the
//! permission checks below. It knows nothing of commands or events.
//!
//! # Frame layout
//!
//! Every message is one frame; a stream is a sequence of frames in each direction.
//!
//! ```text
//! offset  size  field
//! 0       4     magic    b"QPQS"
//! 4       2     version  u16 big-endian, IPC_VERSION
//! 6       4     len      u32 big-endian, at most MAX_FRAME
//! 10      len   payload  the message, serde_json
//! ```
//!
//! The reader checks magic, version and length before it allocates anything for the payload,
//! and grows the payload buffer only as bytes arrive (a header that claims 16 MiB followed by
//! nothing costs 64 KiB). A stream may end only at a frame boundary: [`read_frame`] returns
//! `Ok(None)` there and an error for an end inside a frame.
//!
//! # Security
//!
//! Only processes of the same user may talk over the socket. Each side checks:
//! - **Where it lives** ([`socket_path`]): `<home>/qpq.sock`, or, when that is too long for
//!   `sun_path`, `$XDG_RUNTIME_DIR` (the user's private runtime directory) or `/tmp/qpq-<uid>/`,
//!   a directory that must be a real directory, ours, and mode 0700.
//! - **The server** ([`bind`]) makes the socket file 0600 before it appears at its path: it
//!   binds in a fresh 0700 directory next to the target, chmods the socket and renames it into
//!   place. (Setting the umask instead would be process-wide and race with other threads.) It
//!   replaces a stale socket, never anything else. [`accept_checked`] asks the kernel for the
//!   peer's credentials (`SO_PEERCRED`) and refuses another uid.
//! - **The client** ([`connect`]) refuses a path that is a symlink or not a socket, a socket
//!   owned by another uid, or one open to group or others: a socket planted in a shared
//!   directory is not talked to. Once connected it also checks the uid of the process that
//!   listens (`SO_PEERCRED` on the client end gives the listener's credentials), which closes
//!   the window between the file check and the connection.

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"QPQS";

/// The frame format version this build speaks; a peer with another one is refused.
pub const IPC_VERSION: u16 = 1;

/// Length of a frame header: magic, version, payload length.
pub const HEADER_LEN: usize = 10;

/// The largest payload a frame may carry (16 MiB).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Why a frame could not be read or written, or a socket not set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// The peer does not speak this protocol (wrong magic).
    #[error("peer is not a qpq socket (bad frame magic)")]
    NotQpq,
    /// The peer speaks another version of the frame format.
    #[error("peer speaks local protocol version {theirs}, this qpq speaks {ours}")]
    Version {
        /// [`IPC_VERSION`].
        ours: u16,
        /// The version in the peer's frame.
        theirs: u16,
    },
    /// A frame (read or about to be written) is longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u64),
    /// The payload is not the JSON of the expected message type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The process at the other end runs as another user.
    #[error("peer runs as uid {theirs}, not as this user (uid {ours})")]
    PeerUid {
        /// Our effective uid.
        ours: u32,
        /// The peer's uid, as the kernel reports it.
        theirs: u32,
    },
    /// A path is unsafe to use: not a socket, or not private to this user.
    #[error("refusing {}: {reason}", path.display())]
    Refused {
        /// The refused path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The message does not serialize (a caller bug, e.g. a map with non-string keys).
    #[error("message does not serialize: {0}")]
    Serialize(String),
    /// An I/O error, including `UnexpectedEof` for a stream that ends inside a frame.
    #[error("local socket: {0}")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one frame.
///
/// Refuses a payload over [`MAX_FRAME`] with [`IpcError::TooLarge`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, IpcError> {
    let mut frame = Vec::with_capacity(HEADER_LEN + 128);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&IPC_VERSION.to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut frame, msg).map_err(|e| IpcError::Serialize(e.to_string()))?;
    let len = frame.len() - HEADER_LEN;
    let len32 = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_FRAME)
        .ok_or(IpcError::TooLarge(len as u64))?;
    frame[6..HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(frame)
}

/// Checks a frame header and returns the payload length (at most [`MAX_FRAME`]).
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<usize, IpcError> {
    let [m0, m1, m2, m3, v0, v1, l0, l1, l2, l3] = *h;
    if [m0, m1, m2, m3] != MAGIC {
        return Err(IpcError::NotQpq);
    }
    let theirs = u16::from_be_bytes([v0, v1]);
    if theirs != IPC_VERSION {
        return Err(IpcError::Version { ours: IPC_VERSION, theirs });
    }
    let len = u32::from_be_bytes([l0, l1, l2, l3]);
    match usize::try_from(len) {
        Ok(n) if n <= MAX_FRAME => Ok(n),
        _ => Err(IpcError::TooLarge(u64::from(len))),
    }
}

/// Decodes a frame's payload as a `T`.
pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, IpcError> {
    serde_json::from_slice(bytes).map_err(|e| IpcError::Malformed(e.to_string()))
}

/// Reads one frame and decodes its payload.
///
/// `Ok(None)` when the stream ends cleanly before a frame; an end inside a frame is an
/// [`IpcError::Io`] of kind `UnexpectedEof`. The header is checked before the payload is read.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, IpcError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(truncated("header")) };
        }
        filled += n;
    }
    let len = decode_header(&header)?;
    let mut payload = Vec::with_capacity(len.min(READ_CHUNK));
    (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if payload.len() != len {
        return Err(truncated("payload"));
    }
    decode_payload(&payload).map(Some)
}

/// Encodes `msg` as one frame, writes it and flushes.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), IpcError> {
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Where the socket for the account in `home` lives.
///
/// `<home>/qpq.sock` (with `home` canonicalised) when that is shorter than 100 bytes
/// (`sun_path` holds 108 including the NUL). Otherwise `$XDG_RUNTIME_DIR/qpq-<hash>.sock`, or,
/// without `XDG_RUNTIME_DIR`, `/tmp/qpq-<uid>/qpq-<hash>.sock`, where `<hash>` is 16 hex digits
/// of SHA-256 of the canonical home path. That `/tmp` directory is created mode 0700 if
/// missing, and refused ([`IpcError::Refused`]) if it is not a directory owned by us with mode
/// 0700. A home that does not exist yet is taken as its absolute path.
pub fn socket_path(home: &Path) -> Result<PathBuf, IpcError> {
    let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    socket_path_from(home, runtime_dir.as_deref(), Path::new("/tmp"), euid())
}

/// Binds the listening socket at `path` (from [`socket_path`]), mode 0600.
///
/// Only for the process that holds the account's exclusive vault lock: a socket already at
/// `path` is then a leftover of a dead server, and is replaced. Anything at `path` that is not
/// a socket is refused. The socket is bound in a fresh 0700 directory next to `path`, made
/// 0600 there, and renamed onto `path`: it is never reachable with looser permissions, and the
/// rename replaces a stale socket atomically.
///
/// # Panics
///
/// Outside a tokio runtime with I/O enabled (as `tokio::net::UnixListener::bind`).
pub fn bind(path: &Path) -> Result<UnixListener, IpcError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => return Err(refused(path, "it exists and is not a socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let staging = Staging::create(parent)?;
    let tmp = staging.0.join("s");
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    fs::set_permissions(&tmp, Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path)?;
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// Accepts one connection and checks that the peer runs as our uid.
///
/// [`IpcError::PeerUid`] for another user: the stream is dropped and the caller goes on
/// accepting. Other errors come from `accept` itself.
pub async fn accept_checked(l: &UnixListener) -> Result<UnixStream, IpcError> {
    let (stream, _) = l.accept().await?;
    check_peer(&stream)?;
    Ok(stream)
}

/// Connects to the server at `path`; `Ok(None)` when nothing serves there (no socket, or a
/// stale one nobody listens on).
///
/// Refuses ([`IpcError::Refused`]) a path that is not a socket (symlinks included), a socket
/// owned by another user, or one group or others may use; then [`IpcError::PeerUid`] if the
/// listening process runs as another user.
pub async fn connect(path: &Path) -> Result<Option<UnixStream>, IpcError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() {
        return Err(refused(path, "not a socket"));
    }
    if meta.uid() != euid() {
        return Err(refused(path, "socket owned by another user"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refused(path, "socket accessible to group or others"));
    }
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    check_peer(&stream)?;
    Ok(Some(stream))
}

/// [`socket_path`] with the environment passed in: `runtime_dir` is `$XDG_RUNTIME_DIR`, `tmp`
/// the directory for the per-user fallback (`/tmp`), `uid` our effective uid.
fn socket_path_from(
    home: &Path,
    runtime_dir: Option<&Path>,
    tmp: &Path,
    uid: u32,
) -> Result<PathBuf, IpcError> {
    let home = match fs::canonicalize(home) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::path::absolute(home)?,
        Err(e) => return Err(e.into()),
    };
    let direct = home.join(SOCKET_NAME);
    if direct.as_os_str().len() < MAX_SOCKET_PATH {
        return Ok(direct);
    }
    let name = format!("qpq-{}.sock", home_hash(&home));
    // The XDG base directory spec: a relative value is invalid and must be ignored.
    if let Some(dir) = runtime_dir.filter(|d| d.is_absolute()) {
        return Ok(dir.join(name));
    }
    let dir = tmp.join(format!("qpq-{uid}"));
    private_dir(&dir, uid)?;
    Ok(dir.join(name))
}

/// 16 hex digits (64 bits) of SHA-256 of the path's bytes: stable across builds and Rust
/// versions, unlike `std`'s `DefaultHasher`.
fn home_hash(home: &Path) -> String {
    let digest = Sha256::digest(home.as_os_str().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Creates `dir` mode 0700 if missing; refuses it unless it is a directory (not a symlink)
/// owned by `uid` with mode 0700.
fn private_dir(dir: &Path, uid: u32) -> Result<(), IpcError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        // The umask may have taken bits off; the check below still applies.
        Ok(()) => fs::set_permissions(dir, Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(refused(dir, "not a directory"));
    }
    if meta.uid() != uid {
        return Err(refused(dir, "directory owned by another user"));
    }
    if meta.mode() & 0o777 != 0o700 {
        return Err(refused(dir, "directory mode is not 0700"));
    }
    Ok(())
}

/// Refuses a peer whose uid is not ours.
fn check_peer(stream: &UnixStream) -> Result<(), IpcError> {
    let ours = euid();
    let theirs = stream.peer_cred()?.uid();
    if theirs != ours {
        return Err(IpcError::PeerUid { ours, theirs });
    }
    Ok(())
}

/// Our effective uid.
fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn refused(path: &Path, reason: &'static str) -> IpcError {
    IpcError::Refused { path: path.to_path_buf(), reason }
}

fn truncated(part: &str) -> IpcError {
    IpcError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("stream ended inside a frame {part}"),
    ))
}

/// A private (0700) directory [`bind`] creates the socket in; removed with whatever is left in
/// it when dropped (after the rename: nothing).
struct Staging(PathBuf);

impl Staging {
    fn create(parent: &Path) -> io::Result<Self> {
        let pid = std::process::id();
        let mut last = None;
        // A name left by a dead process with our pid is skipped, not reused.
        for n in 0..STAGING_TRIES {
            let dir = parent.join(format!(".qpq-bind.{pid}.{n}"));
            match DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no staging directory")))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The socket's file name in the account's home.
const SOCKET_NAME: &str = "qpq.sock";

/// Socket paths must be shorter than this many bytes (`sun_path` is 108 bytes with the NUL;
/// the rest is margin).
const MAX_SOCKET_PATH: usize = 100;

/// The payload buffer starts at most this large and grows with the bytes that arrive.
const READ_CHUNK: usize = 64 * 1024;

/// How many staging directory names [`bind`] tries.
const STAGING_TRIES: u32 = 64;

#[cfg(test)]
mod tests;
