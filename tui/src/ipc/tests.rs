use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::ReadBuf;
use tokio::time::timeout;

use super::*;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello { name: String },
    Data(Vec<u8>),
    Bye,
}

fn header(magic: &[u8; 4], version: u16, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..4].copy_from_slice(magic);
    h[4..6].copy_from_slice(&version.to_be_bytes());
    h[6..].copy_from_slice(&len.to_be_bytes());
    h
}

async fn read_bytes(bytes: &[u8]) -> Result<Option<Msg>, IpcError> {
    let mut r = bytes;
    read_frame(&mut r).await
}

fn is_eof(e: &IpcError) -> bool {
    matches!(e, IpcError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof)
}

/// A reader that fails the test if it is ever read: what follows a header that must be refused.
struct Unreadable;

impl AsyncRead for Unreadable {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        panic!("read past a header that should have been refused")
    }
}

#[test]
fn frame_layout() {
    let f = encode(&"hi").unwrap();
    assert_eq!(f, b"QPQS\x00\x01\x00\x00\x00\x04\"hi\"");
    assert_eq!(decode_header(f[..HEADER_LEN].try_into().unwrap()).unwrap(), 4);
}

#[tokio::test]
async fn enum_round_trips_over_a_socket_pair() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let sent = [Msg::Hello { name: "alice".into() }, Msg::Data(vec![0, 1, 255]), Msg::Bye];
    for m in &sent {
        write_frame(&mut a, m).await.unwrap();
    }
    drop(a);
    for m in &sent {
        assert_eq!(read_frame::<Msg, _>(&mut b).await.unwrap().as_ref(), Some(m));
    }
    assert!(read_frame::<Msg, _>(&mut b).await.unwrap().is_none());
}

#[tokio::test]
async fn clean_eof_is_none() {
    assert!(read_bytes(&[]).await.unwrap().is_none());
    // At a frame boundary, after a whole frame.
    let mut r = &encode(&Msg::Bye).unwrap()[..];
    assert_eq!(read_frame::<Msg, _>(&mut r).await.unwrap(), Some(Msg::Bye));
    assert!(read_frame::<Msg, _>(&mut r).await.unwrap().is_none());
}

#[tokio::test]
async fn truncated_header_and_payload_are_errors() {
    let f = encode(&Msg::Hello { name: "bob".into() }).unwrap();
    for cut in [1, 5, HEADER_LEN - 1, HEADER_LEN, f.len() - 1] {
        let e = read_bytes(&f[..cut]).await.unwrap_err();
        assert!(is_eof(&e), "cut at {cut}: {e:?}");
    }
}

#[tokio::test]
async fn oversized_length_is_refused_before_reading_the_payload() {
    let h = header(&MAGIC, IPC_VERSION, u32::MAX);
    let mut r = (&h[..]).chain(Unreadable);
    let e = read_frame::<Msg, _>(&mut r).await.unwrap_err();
    assert!(matches!(e, IpcError::TooLarge(0xffff_ffff)), "{e:?}");

    let over = u32::try_from(MAX_FRAME + 1).unwrap();
    assert!(matches!(decode_header(&header(&MAGIC, 1, over)), Err(IpcError::TooLarge(_))));
    assert_eq!(decode_header(&header(&MAGIC, 1, over - 1)).unwrap(), MAX_FRAME);
}

#[test]
fn encode_refuses_oversized_messages() {
    let big = "x".repeat(MAX_FRAME); // Two quotes more once JSON.
    let e = encode(&big).unwrap_err();
    assert!(matches!(e, IpcError::TooLarge(n) if n == MAX_FRAME as u64 + 2), "{e:?}");
    assert!(encode(&"x".repeat(MAX_FRAME - 2)).is_ok());
}

#[tokio::test]
async fn wrong_magic_and_version_are_refused() {
    let bad_magic = header(b"QPQs", IPC_VERSION, 0);
    let mut r = (&bad_magic[..]).chain(Unreadable);
    assert!(matches!(read_frame::<Msg, _>(&mut r).await, Err(IpcError::NotQpq)));
    let bad_version = header(&MAGIC, 2, 0);
    let mut r = (&bad_version[..]).chain(Unreadable);
    let e = read_frame::<Msg, _>(&mut r).await.unwrap_err();
    assert!(matches!(e, IpcError::Version { ours: 1, theirs: 2 }), "{e:?}");
}

#[tokio::test]
async fn garbage_payload_is_malformed() {
    for payload in [&b"{not json"[..], b"\"Hello\"", b"{\"Nope\":1}", b"\xff\xfe"] {
        let len = u32::try_from(payload.len()).unwrap();
        let frame = [&header(&MAGIC, IPC_VERSION, len)[..], payload].concat();
        let e = read_bytes(&frame).await.unwrap_err();
        assert!(matches!(e, IpcError::Malformed(_)), "{payload:?}: {e:?}");
    }
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qpq.sock");
    let first = bind(&path).unwrap();
    let second = bind(&path).unwrap();
    let meta = fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600);
    // No staging directory left behind.
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["qpq.sock"]);

    let mut client = connect(&path).await.unwrap().expect("served");
    let mut server =
        timeout(Duration::from_secs(5), accept_checked(&second)).await.unwrap().unwrap();
    assert!(timeout(Duration::from_millis(200), first.accept()).await.is_err());
    write_frame(&mut client, &Msg::Bye).await.unwrap();
    assert_eq!(read_frame::<Msg, _>(&mut server).await.unwrap(), Some(Msg::Bye));
}

#[tokio::test]
async fn bind_refuses_to_replace_a_non_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qpq.sock");
    fs::write(&path, b"precious").unwrap();
    assert!(matches!(bind(&path), Err(IpcError::Refused { .. })));
    assert_eq!(fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn connect_finds_nothing_to_attach_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qpq.sock");
    assert!(connect(&path).await.unwrap().is_none());
    // A stale socket: the file is there, nobody listens.
    drop(bind(&path).unwrap());
    assert!(path.exists());
    assert!(connect(&path).await.unwrap().is_none());
}

#[tokio::test]
async fn connect_refuses_unsafe_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qpq.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    fs::set_permissions(&path, Permissions::from_mode(0o660)).unwrap();
    let e = connect(&path).await.unwrap_err();
    assert!(matches!(e, IpcError::Refused { reason, .. } if reason.contains("group")), "{e:?}");
    fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
    assert!(connect(&path).await.unwrap().is_some());

    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    fs::set_permissions(&file, Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(connect(&file).await, Err(IpcError::Refused { .. })));
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(matches!(connect(&link).await, Err(IpcError::Refused { .. })));
}

#[test]
fn short_home_keeps_the_socket_inside() {
    let home = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = socket_path_from(home.path(), None, tmp.path(), euid()).unwrap();
    assert_eq!(p, fs::canonicalize(home.path()).unwrap().join("qpq.sock"));
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn long_home_goes_to_the_runtime_dir() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("h".repeat(100));
    fs::create_dir(&home).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let run = Path::new("/run/user/4242");
    let p = socket_path_from(&home, Some(run), tmp.path(), euid()).unwrap();
    let name = format!("qpq-{}.sock", home_hash(&fs::canonicalize(&home).unwrap()));
    assert_eq!(p, run.join(name));
    assert!(p.as_os_str().len() < MAX_SOCKET_PATH);
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    // Another home, another socket.
    let other = base.path().join("i".repeat(100));
    fs::create_dir(&other).unwrap();
    assert_ne!(socket_path_from(&other, Some(run), tmp.path(), euid()).unwrap(), p);
}

#[test]
fn hashed_name_is_stable() {
    // SHA-256 of the path's bytes, first 8 bytes: `printf %s <path> | sha256sum | cut -c1-16`.
    let home = format!("/nonexistent-qpq-ipc-test/{}", "h".repeat(100));
    let tmp = tempfile::tempdir().unwrap();
    let p = socket_path_from(Path::new(&home), Some(Path::new("/run/user/1")), tmp.path(), 1);
    assert_eq!(p.unwrap(), Path::new("/run/user/1/qpq-af13ff5c15ab9e73.sock"));
}

#[test]
fn long_home_without_runtime_dir_uses_a_private_tmp_dir() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("h".repeat(100));
    let tmp = tempfile::tempdir().unwrap();
    let uid = euid();
    // A relative XDG_RUNTIME_DIR is ignored (XDG base directory spec).
    for run in [None, Some(Path::new("run/user"))] {
        let p = socket_path_from(&home, run, tmp.path(), uid).unwrap();
        let dir = tmp.path().join(format!("qpq-{uid}"));
        assert_eq!(p, dir.join(format!("qpq-{}.sock", home_hash(&home))));
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }
}

#[test]
fn tmp_fallback_refuses_a_dir_that_is_not_private() {
    let home = format!("/nonexistent-qpq-ipc-test/{}", "h".repeat(100));
    let home = Path::new(&home);
    let tmp = tempfile::tempdir().unwrap();
    let uid = euid();
    let dir = tmp.path().join(format!("qpq-{uid}"));
    let refused = |uid| {
        matches!(socket_path_from(home, None, tmp.path(), uid), Err(IpcError::Refused { .. }))
    };

    DirBuilder::new().mode(0o755).create(&dir).unwrap();
    fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
    assert!(refused(uid), "mode 0755");
    fs::set_permissions(&dir, Permissions::from_mode(0o700)).unwrap();
    assert!(!refused(uid));
    // Someone else's directory (our uid passed as another's: we cannot chown without root).
    let other = uid.wrapping_add(1);
    fs::rename(&dir, tmp.path().join(format!("qpq-{other}"))).unwrap();
    assert!(refused(other), "owned by another uid");

    let target = tmp.path().join("elsewhere");
    DirBuilder::new().mode(0o700).create(&target).unwrap();
    std::os::unix::fs::symlink(&target, &dir).unwrap();
    assert!(refused(uid), "symlink");
    fs::remove_file(&dir).unwrap();
    fs::write(&dir, b"").unwrap();
    fs::set_permissions(&dir, Permissions::from_mode(0o700)).unwrap();
    assert!(refused(uid), "regular file");
}
