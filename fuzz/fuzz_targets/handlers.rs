//! Drives every RPC handler with arbitrary bytes, through the dispatch code a QUIC stream uses
//! (`qpq_server_lite::fuzzing::handle_request`), against a real redb store in a temp dir.
//!
//! Input: `[flags u8][method u16 BE][payload ...]`. Flag bit 0 binds the connection to the
//! user `alice` (registered and logged in once through the real handlers at start-up, with the
//! Ed25519 key of seed `[0xA1; 32]`; `bob`'s seed is `[0xB0; 32]`), so the
//! handlers run beyond their authentication check; otherwise the connection is unauthenticated.
//! `bob` stays connected for the whole run and receives pushes.
//!
//! Checked for every input: no panic; an answer within 5 s; an Ok payload within `MAX_PAYLOAD`
//! that decodes as the method's response message; an error with a status from PROTOCOL.md §3
//! that fits the request (never Ok or Internal; UnknownMethod exactly for unknown ids;
//! BadRequest when the payload does not decode; BadRequest or Unauthorized for a method that
//! needs authentication on an unbound connection; `retry_after_ms` set exactly for
//! RateLimited and Unavailable); every push frame queued for alice or bob well-formed, with a
//! payload that decodes as its event's message.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qpq_proto::{MAX_PAYLOAD, Message, Status, frame, method, v1};
use qpq_server_lite::fuzzing::{Account, Connection, Harness};

struct State {
    rt: tokio::runtime::Runtime,
    harness: Harness,
    alice: Account,
    bob: tokio::sync::Mutex<Connection>,
    _dir: tempfile::TempDir,
}

static STATE: LazyLock<State> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // In $TMPDIR: the store fsyncs every commit, so a RAM disk (TMPDIR=/dev/shm) is faster.
    let dir = tempfile::tempdir().expect("temp dir");
    let (harness, alice, bob) = rt.block_on(async {
        let h = Harness::open(dir.path()).await.expect("store");
        // Real Ed25519 keys (from fixed seeds): the `upload-key-package` seed is a KeyPackage
        // alice's client made (`gen_corpus`), which the server verifies against her account.
        let alice = h.register("alice", "alice-pw", identity(0xA1)).await.expect("alice");
        let bob = h.register("bob", "bob-pw", identity(0xB0)).await.expect("bob");
        let conn = h.connection();
        conn.bind(bob.bound);
        (h, alice, conn)
    });
    State { rt, harness, alice, bob: tokio::sync::Mutex::new(bob), _dir: dir }
});

/// The identity key of the fuzz user whose secret seed is 32 bytes of `seed`.
fn identity(seed: u8) -> [u8; 32] {
    qpq_core::identity::Identity::from_seed(&[seed; 32]).public_key()
}

fuzz_target!(|data: &[u8]| {
    let [flags, m0, m1, payload @ ..] = data else { return };
    let method = u16::from_be_bytes([*m0, *m1]);
    let s = &*STATE;
    s.rt.block_on(async {
        // A DeleteAccount in an earlier input removed alice: bring the user back.
        s.harness.restore(&s.alice).await.expect("restore alice");
        let mut conn = s.harness.connection();
        let bound = flags & 1 == 1;
        if bound {
            conn.bind(s.alice.bound.clone());
        }
        let result = tokio::time::timeout(Duration::from_secs(5), conn.request(method, payload))
            .await
            .expect("a request took more than 5 s");
        check_response(method, payload, bound, &result);
        for f in conn.take_pushes() {
            check_push(&f);
        }
        drop(conn);
        let mut bob = s.bob.lock().await;
        let pushes = bob.take_pushes();
        for f in &pushes {
            check_push(f);
        }
        if !pushes.is_empty() {
            // Keep bob's default queue from filling up over a long run.
            let ack = v1::AckRequest { seq_up_to: u64::MAX, ..Default::default() };
            let _ = bob.request(method::ACK, &ack.encode_to_vec()).await;
        }
    });
});

/// Whether `payload` decodes as the request and `body` as the response of `method`, and
/// whether the method needs authentication; `None` for an unknown method.
fn shapes(method: u16, payload: &[u8], body: &[u8]) -> Option<(bool, bool, bool)> {
    macro_rules! table {
        ($($id:ident => $req:ident, $resp:ident, $auth:expr;)*) => {
            match method {
                $(method::$id => Some((
                    v1::$req::decode(payload).is_ok(),
                    v1::$resp::decode(body).is_ok(),
                    $auth,
                )),)*
                _ => None,
            }
        };
    }
    table! {
        OPAQUE_REGISTER_START => OpaqueRegisterStartRequest, OpaqueRegisterStartResponse, false;
        OPAQUE_REGISTER_FINISH => OpaqueRegisterFinishRequest, OpaqueRegisterFinishResponse, false;
        OPAQUE_LOGIN_START => OpaqueLoginStartRequest, OpaqueLoginStartResponse, false;
        OPAQUE_LOGIN_FINISH => OpaqueLoginFinishRequest, OpaqueLoginFinishResponse, false;
        RESUME => ResumeRequest, ResumeResponse, false;
        LOGOUT => LogoutRequest, LogoutResponse, true;
        ENQUEUE => EnqueueRequest, EnqueueResponse, true;
        FETCH => FetchRequest, FetchResponse, true;
        FETCH_WAIT => FetchWaitRequest, FetchWaitResponse, true;
        PEEK => PeekRequest, PeekResponse, true;
        ACK => AckRequest, AckResponse, true;
        BATCH_ENQUEUE => BatchEnqueueRequest, BatchEnqueueResponse, true;
        RELAY_EPHEMERAL => RelayEphemeralRequest, RelayEphemeralResponse, true;
        CLAIM_SLOT => ClaimSlotRequest, ClaimSlotResponse, true;
        FETCH_SLOT => FetchSlotRequest, FetchSlotResponse, true;
        UPLOAD_KEY_PACKAGE => UploadKeyPackageRequest, UploadKeyPackageResponse, true;
        FETCH_KEY_PACKAGE => FetchKeyPackageRequest, FetchKeyPackageResponse, true;
        UPLOAD_HYBRID_KEY => UploadHybridKeyRequest, UploadHybridKeyResponse, true;
        FETCH_HYBRID_KEY => FetchHybridKeyRequest, FetchHybridKeyResponse, true;
        FETCH_HYBRID_KEYS => FetchHybridKeysRequest, FetchHybridKeysResponse, true;
        KEY_PACKAGE_STOCK => KeyPackageStockRequest, KeyPackageStockResponse, true;
        RESOLVE_USER => ResolveUserRequest, ResolveUserResponse, true;
        RESOLVE_IDENTITY => ResolveIdentityRequest, ResolveIdentityResponse, true;
        UPLOAD_BLOB => UploadBlobRequest, UploadBlobResponse, true;
        DOWNLOAD_BLOB => DownloadBlobRequest, DownloadBlobResponse, true;
        REGISTER_DEVICE => RegisterDeviceRequest, RegisterDeviceResponse, true;
        LIST_DEVICES => ListDevicesRequest, ListDevicesResponse, true;
        REVOKE_DEVICE => RevokeDeviceRequest, RevokeDeviceResponse, true;
        HEALTH => HealthRequest, HealthResponse, false;
        DELETE_ACCOUNT => DeleteAccountRequest, DeleteAccountResponse, true;
    }
}

fn check_response(
    method: u16,
    payload: &[u8],
    bound: bool,
    result: &Result<Vec<u8>, qpq_server_lite::handler::RpcError>,
) {
    let body = result.as_deref().unwrap_or_default();
    let shape = shapes(method, payload, body);
    assert_eq!(shape.is_some(), method::name(method).is_some(), "method table out of date");
    match (result, shape) {
        (Ok(body), Some((request_ok, response_ok, _))) => {
            assert!(request_ok, "method {method}: Ok for a request that does not decode");
            assert!(response_ok, "method {method}: Ok payload is not the response message");
            assert!(body.len() <= MAX_PAYLOAD as usize, "method {method}: response too large");
        }
        (Ok(_), None) => panic!("unknown method {method} answered Ok"),
        (Err(e), shape) => {
            let s = e.status;
            assert!(!matches!(s, Status::Ok | Status::Internal), "method {method}: {e:?}");
            assert!(!e.message.is_empty(), "method {method}: error without a message");
            assert_eq!(
                e.retry_after_ms > 0,
                matches!(s, Status::RateLimited | Status::Unavailable),
                "method {method}: retry_after_ms must be set exactly for RateLimited and Unavailable: {e:?}",
            );
            match shape {
                None => assert_eq!(s, Status::UnknownMethod, "unknown method {method}: {e:?}"),
                Some((request_ok, _, needs_auth)) => {
                    assert_ne!(s, Status::UnknownMethod, "method {method}");
                    if !request_ok {
                        assert_eq!(s, Status::BadRequest, "method {method}: undecodable: {e:?}");
                    } else if needs_auth && !bound {
                        assert_eq!(s, Status::Unauthorized, "method {method}: unbound: {e:?}");
                    }
                }
            }
        }
    }
}

fn check_push(f: &[u8]) {
    let (head, payload) = frame::decode_push(f).expect("push frame decodes");
    assert_eq!(frame::encode_push(head.event, payload).expect("fits"), f, "push re-encodes");
    let ok = match head.event {
        method::PUSH_NEW_MESSAGE => v1::NewMessage::decode(payload).is_ok(),
        method::PUSH_TYPING => v1::TypingIndicator::decode(payload).is_ok(),
        method::PUSH_KEY_PACKAGES_LOW => v1::KeyPackagesLow::decode(payload).is_ok(),
        other => panic!("push with event {other}, which the server never sends"),
    };
    assert!(ok, "push {} payload does not decode", head.event);
}
