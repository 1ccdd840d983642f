//! Hostile peers against the real `qpq-server-lite` binary.
//!
//! Every case checks the documented reaction of the server (status byte, `Error` payload,
//! stream or connection refusal) and that a well-behaved pair of clients, the [`Bystander`],
//! registered, logged in and exchanging messages through Enqueue/Fetch/Ack, keeps being served
//! before, during and after the attack.
//!
//! `slow_readers_do_not_pin_server_memory` measures the server's RSS: responses a client never
//! reads are reset after the request timeout, and large ones share two slots per connection.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use qpq_proto::frame::{REQUEST_HEADER_LEN, RequestHeader, ResponseHeader};
use qpq_proto::{MAX_PAYLOAD, Message, Status, frame, method, v1};
use qpq_tests::{CallError, Client, TempServer, identity, message_id, read_response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Upper bound for any single step that should complete promptly.
const STEP: Duration = Duration::from_secs(10);

/// `STREAM_REFUSED` in `server-lite/src/server.rs`: the stop code of a refused request stream.
const STREAM_REFUSED: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Harness helpers (local to this file; tests/src/lib.rs is shared).
// ---------------------------------------------------------------------------------------------

/// Awaits `f`, failing the test if it takes longer than [`STEP`].
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {STEP:?}"),
    }
}

/// The status and `Error` of a failed call; panics on success or transport failure.
fn failure<T: std::fmt::Debug>(what: &str, r: Result<T, CallError>) -> (Status, v1::Error) {
    match r {
        Err(CallError::Status(s, e)) => {
            assert_eq!(e.code, u32::from(s.as_u8()), "{what}: Error.code must repeat the status");
            (s, e)
        }
        Err(CallError::Transport(t)) => {
            panic!("{what}: transport failure instead of a status: {t}")
        }
        Ok(v) => panic!("{what}: unexpectedly succeeded: {v:?}"),
    }
}

/// Checks a raw response frame: `want` status, an `Error` payload whose code repeats it.
fn expect_error(what: &str, header: &ResponseHeader, body: &[u8], want: Status) -> v1::Error {
    let err = v1::Error::decode(body)
        .unwrap_or_else(|e| panic!("{what}: non-Ok response without an Error payload: {e}"));
    assert_eq!(header.status, want, "{what}: status (error message: {:?})", err.message);
    assert_eq!(err.code, u32::from(want.as_u8()), "{what}: Error.code");
    assert_eq!(header.len as usize, body.len());
    err
}

/// Opens a bidirectional stream and writes `bytes` without finishing it.
async fn open_partial(client: &Client, bytes: &[u8]) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = bounded("open_bi", client.conn.open_bi()).await.unwrap();
    if !bytes.is_empty() {
        send.write_all(bytes).await.unwrap();
    }
    (send, recv)
}

/// The response a garbage frame must get, when it is determined by the frame alone.
fn expected_garbage_status(bytes: &[u8]) -> Option<Status> {
    if bytes.len() < REQUEST_HEADER_LEN {
        return Some(Status::BadRequest);
    }
    let Ok(h) = RequestHeader::decode(bytes) else {
        return Some(Status::PayloadTooLarge);
    };
    if h.len as usize > bytes.len() - REQUEST_HEADER_LEN {
        Some(Status::BadRequest)
    } else if method::name(h.method).is_none() {
        Some(Status::UnknownMethod)
    } else {
        // A known method with a random body: BadRequest, Unauthorized, even Ok for Health.
        None
    }
}

/// The request id the server echoes for `bytes`: header bytes 2..6, missing ones read as 0.
fn echoed_request_id(bytes: &[u8]) -> u32 {
    let mut id = [0u8; 4];
    for (to, from) in id.iter_mut().zip(bytes.iter().skip(2)) {
        *to = *from;
    }
    u32::from_be_bytes(id)
}

/// A well-behaved sender/recipient pair, both logged in on their own connections.
struct Bystander {
    sender: Client,
    recipient: Client,
    recipient_key: [u8; 32],
    sender_token: Vec<u8>,
    rounds: AtomicU64,
}

impl Bystander {
    async fn new(h: &TempServer) -> Self {
        let (sender, recipient) = (h.client().await, h.client().await);
        let (sender_key, recipient_key) = (identity(), identity());
        bounded("register", sender.register("bystander-s", "pw sender", &sender_key, ""))
            .await
            .unwrap();
        bounded("register", recipient.register("bystander-r", "pw recipient", &recipient_key, ""))
            .await
            .unwrap();
        let sender_token =
            bounded("login", sender.login("bystander-s", "pw sender", &sender_key)).await.unwrap();
        bounded("login", recipient.login("bystander-r", "pw recipient", &recipient_key))
            .await
            .unwrap();
        Self { sender, recipient, recipient_key, sender_token, rounds: AtomicU64::new(0) }
    }

    /// One enqueue -> fetch -> ack round trip; panics (naming `when`) if it is not served.
    async fn served(&self, when: &str) {
        let n = self.rounds.fetch_add(1, Ordering::Relaxed);
        let payload = format!("bystander message {n}").into_bytes();
        let id = message_id();
        let sent = bounded(when, self.sender.enqueue(&self.recipient_key, &payload, id))
            .await
            .unwrap_or_else(|e| panic!("bystander enqueue {when}: {e}"));
        assert!(!sent.duplicate, "bystander enqueue {when}: fresh id reported duplicate");
        let envs = bounded(when, self.recipient.fetch(0))
            .await
            .unwrap_or_else(|e| panic!("bystander fetch {when}: {e}"));
        let env = envs
            .iter()
            .find(|e| e.message_id == id)
            .unwrap_or_else(|| panic!("bystander fetch {when}: message {n} missing: {envs:?}"));
        assert_eq!(env.data, payload, "bystander fetch {when}: payload");
        assert_eq!(env.seq, sent.seq, "bystander fetch {when}: seq");
        bounded(when, self.recipient.ack(sent.seq))
            .await
            .unwrap_or_else(|e| panic!("bystander ack {when}: {e}"));
    }

    /// Runs `attack` while doing `rounds` round trips next to it; returns the attack's output.
    async fn served_during<F: Future>(&self, what: &str, rounds: usize, attack: F) -> F::Output {
        let served = async {
            for i in 0..rounds {
                self.served(&format!("during {what} (round {i})")).await;
            }
        };
        let (out, ()) = tokio::join!(attack, served);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Garbage frames
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_get_error_responses_and_others_are_served() {
    let mut h = TempServer::start(&[]);
    let by = Bystander::new(&h).await;
    let attacker = h.client().await;
    by.served("before garbage").await;

    // A header announcing 100 bytes followed by only 40, then FIN: BadRequest.
    let mut truncated =
        RequestHeader { method: method::ENQUEUE, request_id: 0xDEAD_BEEF, len: 100 }
            .encode()
            .to_vec();
    truncated.extend_from_slice(&[0x5a; 40]);
    let (header, body) = bounded("truncated payload", attacker.raw(&truncated)).await.unwrap();
    let err = expect_error("truncated payload", &header, &body, Status::BadRequest);
    assert_eq!(header.request_id, 0xDEAD_BEEF, "the request id is echoed");
    assert!(err.message.contains("truncated"), "{err:?}");

    // Half a header, then FIN: BadRequest, with the request id made of the bytes that arrived
    // (missing ones read as 0).
    let half = [0x00, 0xc8, 0x12, 0x34, 0x56];
    let (header, body) = bounded("truncated header", attacker.raw(&half)).await.unwrap();
    expect_error("truncated header", &header, &body, Status::BadRequest);
    assert_eq!(header.request_id, 0x1234_5600);

    // An empty stream: BadRequest.
    let (header, body) = bounded("empty stream", attacker.raw(&[])).await.unwrap();
    expect_error("empty stream", &header, &body, Status::BadRequest);

    // A stream reset by the client mid-request gets no answer, and harms nobody.
    let (mut send, mut recv) = open_partial(&attacker, &truncated[..20]).await;
    send.reset(quinn::VarInt::from_u32(42)).unwrap();
    let answer = bounded("reset stream", read_response(&mut recv)).await;
    assert!(answer.is_err(), "a reset request is not answered: {answer:?}");

    // Seeded random garbage, three shapes: anything, a plausible header with a random body of a
    // random length, and fragments shorter than a header.
    let mut rng = StdRng::seed_from_u64(0x0bad_f00d);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let attack = async {
        for round in 0..90 {
            let bytes: Vec<u8> = match round % 3 {
                0 => {
                    let n = rng.gen_range(0..300);
                    (0..n).map(|_| rng.r#gen()).collect()
                }
                1 => {
                    let announced = rng.gen_range(0..300u32);
                    let sent = rng.gen_range(0..300usize);
                    let mut b = RequestHeader {
                        method: rng.r#gen(),
                        request_id: rng.r#gen(),
                        len: announced,
                    }
                    .encode()
                    .to_vec();
                    b.extend((0..sent).map(|_| rng.r#gen::<u8>()));
                    b
                }
                _ => {
                    let n = rng.gen_range(1..REQUEST_HEADER_LEN);
                    (0..n).map(|_| rng.r#gen()).collect()
                }
            };
            let what = format!("garbage round {round} ({} bytes)", bytes.len());
            let (header, body) = bounded(&what, attacker.raw(&bytes))
                .await
                .unwrap_or_else(|e| panic!("{what}: no response frame: {e:#}"));
            assert_eq!(header.request_id, echoed_request_id(&bytes), "{what}: request id");
            if let Some(want) = expected_garbage_status(&bytes) {
                expect_error(&what, &header, &body, want);
            }
            *seen.entry(header.status.to_string()).or_default() += 1;
        }
    };
    by.served_during("garbage", 5, attack).await;
    for s in ["BadRequest", "PayloadTooLarge", "UnknownMethod"] {
        assert!(seen.contains_key(s), "the seeded garbage exercises {s}: {seen:?}");
    }

    // The attacker's connection itself survives its garbage.
    let health: v1::HealthResponse =
        bounded("health", attacker.call(method::HEALTH, &v1::HealthRequest {})).await.unwrap();
    assert_eq!(health.status, "ok", "{health:?}");
    by.served("after garbage").await;
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Oversized length header
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_is_refused_before_the_payload_is_read() {
    // The default request timeout is 10 s: an answer well before that proves the server did not
    // wait for (or read) the 4 MiB + 1 payload.
    let mut h = TempServer::start(&[]);
    let by = Bystander::new(&h).await;
    let attacker = h.client().await;
    let too_big = MAX_PAYLOAD + 1;

    let attack = async {
        // Header only, stream left open: the answer must not depend on any payload byte.
        let t0 = Instant::now();
        let head = RequestHeader { method: method::ENQUEUE, request_id: 77, len: too_big }.encode();
        let (send, mut recv) = open_partial(&attacker, &head).await;
        let (header, body) = bounded("oversized header", read_response(&mut recv)).await.unwrap();
        let err = expect_error("oversized header", &header, &body, Status::PayloadTooLarge);
        assert_eq!(header.request_id, 77);
        assert!(err.message.contains(&too_big.to_string()), "{err:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "answered in {:?}", t0.elapsed());
        let stopped = bounded("stop_sending", send.stopped()).await.unwrap();
        assert_eq!(
            stopped,
            Some(quinn::VarInt::from_u32(STREAM_REFUSED)),
            "request stream stopped"
        );

        // Header followed by the whole payload: the server refuses to take it (the write fails
        // with STOP_SENDING long before 4 MiB fit in the 1 MiB stream window).
        let head = RequestHeader { method: method::ENQUEUE, request_id: 78, len: too_big }.encode();
        let (mut send, mut recv) = open_partial(&attacker, &head).await;
        let payload = vec![0xAB; too_big as usize];
        let writer = tokio::spawn(async move {
            let r = send.write_all(&payload).await;
            drop(send);
            r
        });
        let (header, body) = bounded("oversized frame", read_response(&mut recv)).await.unwrap();
        expect_error("oversized frame", &header, &body, Status::PayloadTooLarge);
        assert_eq!(header.request_id, 78);
        let write = bounded("payload write", writer).await.unwrap();
        assert_eq!(
            write.map_err(|e| e.to_string()),
            Err(quinn::WriteError::Stopped(quinn::VarInt::from_u32(STREAM_REFUSED)).to_string()),
            "the payload write is refused"
        );

        // The largest legal length is not refused for its size (a truncated payload instead).
        let head =
            RequestHeader { method: method::ENQUEUE, request_id: 79, len: MAX_PAYLOAD }.encode();
        let (header, body) = bounded("max header", attacker.raw(&head)).await.unwrap();
        expect_error("max header", &header, &body, Status::BadRequest);
    };
    by.served_during("oversized frames", 3, attack).await;
    by.served("after oversized frames").await;
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Unknown method ids
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_ids_get_unknown_method() {
    let mut h = TempServer::start(&[]);
    let by = Bystander::new(&h).await;
    // Unauthenticated and authenticated callers get the same answer.
    let stranger = h.client().await;
    let ids: &[u16] = &[0, 1, 99, 106, 209, 999, 1000, 1004, 4242, u16::MAX];
    for &id in ids {
        assert!(method::name(id).is_none(), "{id} must be unassigned for this test");
        for (who, client) in [("stranger", &stranger), ("logged-in", &by.sender)] {
            for body in [&[][..], &[0x0a, 0x02, 0x01, 0x02][..]] {
                let what = format!("{who} method {id} body {body:?}");
                let bytes = frame::encode_request(id, u32::from(id) + 7, body).unwrap();
                let (header, resp) = bounded(&what, client.raw(&bytes)).await.unwrap();
                assert_eq!(header.status.as_u8(), 11, "{what}: status byte");
                let err = expect_error(&what, &header, &resp, Status::UnknownMethod);
                assert_eq!(header.request_id, u32::from(id) + 7, "{what}: request id");
                assert!(err.message.contains(&id.to_string()), "{what}: {err:?}");
            }
        }
        by.served(&format!("after unknown method {id}")).await;
    }
    // The connections stay usable.
    let _: v1::HealthResponse =
        bounded("health", stranger.call(method::HEALTH, &v1::HealthRequest {})).await.unwrap();
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Authentication and ownership
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_calls_are_unauthorized() {
    let mut h = TempServer::start(&[]);
    let by = Bystander::new(&h).await;
    let anon = h.client().await;
    // A real, valid KeyPackage: refused all the same without a login.
    let kp = qpq_tests::KeyMaker::new().key_package();

    let attack = async {
        let r = anon.enqueue(&by.recipient_key, b"spam", message_id()).await;
        let (s, _) = failure("anonymous enqueue", r);
        assert_eq!(s, Status::Unauthorized);

        let r = anon.fetch(0).await;
        assert_eq!(failure("anonymous fetch", r).0, Status::Unauthorized);
        let r = anon
            .call::<_, v1::FetchResponse>(
                method::FETCH,
                &v1::FetchRequest {
                    recipient_key: by.recipient_key.to_vec(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure("anonymous fetch of a victim", r).0, Status::Unauthorized);

        let r = anon.ack(u64::MAX).await;
        assert_eq!(failure("anonymous ack", r).0, Status::Unauthorized);
        let r = anon
            .call::<_, v1::AckResponse>(
                method::ACK,
                &v1::AckRequest {
                    recipient_key: by.recipient_key.to_vec(),
                    seq_up_to: u64::MAX,
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure("anonymous ack of a victim", r).0, Status::Unauthorized);

        let r = anon
            .call::<_, v1::UploadKeyPackageResponse>(
                method::UPLOAD_KEY_PACKAGE,
                &v1::UploadKeyPackageRequest {
                    identity_key: Vec::new(),
                    package: kp.clone(),
                    last_resort: false,
                },
            )
            .await;
        assert_eq!(failure("anonymous key package upload", r).0, Status::Unauthorized);

        // Other authenticated methods, for good measure.
        let r = anon.call::<_, v1::PeekResponse>(method::PEEK, &v1::PeekRequest::default()).await;
        assert_eq!(failure("anonymous peek", r).0, Status::Unauthorized);
        let r = anon
            .call::<_, v1::FetchWaitResponse>(
                method::FETCH_WAIT,
                &v1::FetchWaitRequest { timeout_ms: 5_000, ..Default::default() },
            )
            .await;
        assert_eq!(failure("anonymous fetch wait", r).0, Status::Unauthorized);
        let r = anon.call::<_, v1::LogoutResponse>(method::LOGOUT, &v1::LogoutRequest {}).await;
        assert_eq!(failure("anonymous logout", r).0, Status::Unauthorized);

        // A made-up session token does not authenticate either.
        let r = anon.resume(&[0x42; 32]).await;
        assert_eq!(failure("forged resume", r).0, Status::Unauthorized);
        let r = anon.enqueue(&by.recipient_key, b"spam", message_id()).await;
        assert_eq!(failure("enqueue after forged resume", r).0, Status::Unauthorized);
    };
    bounded("unauthenticated calls", by.served_during("unauthenticated calls", 3, attack)).await;

    // After Logout, a connection is unauthenticated again.
    let quitter = h.client().await;
    let key = identity();
    quitter.register("quitter", "pw quitter", &key, "").await.unwrap();
    quitter.login("quitter", "pw quitter", &key).await.unwrap();
    assert!(quitter.fetch(0).await.unwrap().is_empty());
    let _: v1::LogoutResponse =
        bounded("logout", quitter.call(method::LOGOUT, &v1::LogoutRequest {})).await.unwrap();
    let r = quitter.fetch(0).await;
    assert_eq!(failure("fetch after logout", r).0, Status::Unauthorized);
    let r = quitter.enqueue(&by.recipient_key, b"late", message_id()).await;
    assert_eq!(failure("enqueue after logout", r).0, Status::Unauthorized);

    // Nothing reached the victim's queue.
    by.served("after unauthenticated calls").await;
    assert!(by.recipient.fetch(0).await.unwrap().is_empty(), "no spam was stored");
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_or_acking_another_users_queue_is_forbidden() {
    let mut h = TempServer::start(&[]);
    let by = Bystander::new(&h).await;
    let mallory = h.client().await;
    let mallory_key = identity();
    mallory.register("mallory", "pw mallory", &mallory_key, "").await.unwrap();
    mallory.login("mallory", "pw mallory", &mallory_key).await.unwrap();

    // A message waits in the victim's queue.
    let secret_id = message_id();
    let secret = bounded("enqueue", by.sender.enqueue(&by.recipient_key, b"secret", secret_id))
        .await
        .unwrap();
    let victim = by.recipient_key.to_vec();
    let channel = [9u8; 16].to_vec();

    for ch in [Vec::new(), channel] {
        let what = |m: &str| format!("mallory {m} on channel {ch:?}");
        let r = mallory
            .call::<_, v1::FetchResponse>(
                method::FETCH,
                &v1::FetchRequest {
                    recipient_key: victim.clone(),
                    channel_id: ch.clone(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure(&what("fetch"), r).0, Status::Forbidden);
        let r = mallory
            .call::<_, v1::PeekResponse>(
                method::PEEK,
                &v1::PeekRequest {
                    recipient_key: victim.clone(),
                    channel_id: ch.clone(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure(&what("peek"), r).0, Status::Forbidden);
        let r = mallory
            .call::<_, v1::FetchWaitResponse>(
                method::FETCH_WAIT,
                &v1::FetchWaitRequest {
                    recipient_key: victim.clone(),
                    channel_id: ch.clone(),
                    timeout_ms: 5_000,
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure(&what("fetch wait"), r).0, Status::Forbidden);
        let r = mallory
            .call::<_, v1::AckResponse>(
                method::ACK,
                &v1::AckRequest {
                    recipient_key: victim.clone(),
                    channel_id: ch.clone(),
                    seq_up_to: u64::MAX,
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure(&what("ack"), r).0, Status::Forbidden);
    }
    // Her own queue (explicitly named) is fine, and empty.
    let own: v1::FetchResponse = mallory
        .call(
            method::FETCH,
            &v1::FetchRequest { recipient_key: mallory_key.to_vec(), ..Default::default() },
        )
        .await
        .unwrap();
    assert!(own.payloads.is_empty(), "{own:?}");

    // The victim's message is still there, untouched.
    let envs = by.recipient.fetch(0).await.unwrap();
    assert_eq!(envs.len(), 1, "{envs:?}");
    assert_eq!((envs[0].seq, envs[0].message_id.as_slice()), (secret.seq, &secret_id[..]));
    assert_eq!(envs[0].data, b"secret");
    by.served("after forbidden calls").await;
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Malformed protobuf bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_bodies_are_bad_requests() {
    let mut h = TempServer::start(&[]);
    let by = Bystander::new(&h).await;
    let anon = h.client().await;
    // (method, body, what is wrong with it)
    let cases: &[(u16, &[u8], &str)] = &[
        (method::ENQUEUE, &[0x0a, 0x20, 1, 2, 3], "length-delimited field runs past the end"),
        (method::ENQUEUE, &[0x08, 0x01], "varint wire type for a bytes field"),
        (
            method::ENQUEUE,
            &[0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            "varint longer than 10 bytes",
        ),
        (method::FETCH, &[0x18], "truncated varint"),
        (method::FETCH, &[0x00, 0x00], "field number 0"),
        (method::ACK, &[0x0b], "unterminated group"),
        (method::ACK, &[0x1d, 1, 2], "truncated fixed32"),
        (method::UPLOAD_KEY_PACKAGE, &[0x12, 0x05, 1], "truncated package"),
        (method::OPAQUE_LOGIN_START, &[0x0a, 0x02, 0xc3, 0x28], "username is not UTF-8"),
        (method::OPAQUE_REGISTER_START, &[0x0a, 0x01, 0xff], "username is not UTF-8"),
        (method::RESUME, &[0x0a, 0x80], "truncated length"),
        (method::HEALTH, &[0x07], "reserved wire type 7"),
    ];
    let attack = async {
        for (i, (m, body, why)) in cases.iter().enumerate() {
            for (who, client) in [("logged-in", &by.sender), ("anonymous", &anon)] {
                let what = format!("{who} {}: {why}", method::name(*m).unwrap());
                let request_id = 1000 + i as u32;
                let bytes = frame::encode_request(*m, request_id, body).unwrap();
                let (header, resp) = bounded(&what, client.raw(&bytes)).await.unwrap();
                expect_error(&what, &header, &resp, Status::BadRequest);
                assert_eq!(header.request_id, request_id, "{what}");
            }
        }
        // Well-formed protobuf that fails validation is a BadRequest too.
        let r = by.sender.enqueue(&[0u8; 32], b"", message_id()).await;
        assert_eq!(failure("empty payload", r).0, Status::BadRequest);
        let r = by
            .sender
            .call::<_, v1::EnqueueResponse>(
                method::ENQUEUE,
                &v1::EnqueueRequest {
                    recipient_key: vec![1; 5],
                    payload: b"x".to_vec(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure("5-byte recipient key", r).0, Status::BadRequest);
        let r = by
            .sender
            .call::<_, v1::EnqueueResponse>(
                method::ENQUEUE,
                &v1::EnqueueRequest {
                    recipient_key: by.recipient_key.to_vec(),
                    payload: b"x".to_vec(),
                    message_id: vec![1; 3],
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(failure("3-byte message id", r).0, Status::BadRequest);
        let r = by
            .recipient
            .call::<_, v1::FetchResponse>(
                method::FETCH,
                &v1::FetchRequest { channel_id: vec![1; 7], ..Default::default() },
            )
            .await;
        assert_eq!(failure("7-byte channel id", r).0, Status::BadRequest);
    };
    by.served_during("malformed bodies", 3, attack).await;
    // None of the bad calls stored anything.
    by.served("after malformed bodies").await;
    assert!(by.recipient.fetch(0).await.unwrap().is_empty());
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Stream floods
// ---------------------------------------------------------------------------------------------

/// Opens `n` bidirectional streams on `client` concurrently, each writing `prefix` (possibly
/// nothing) and then holding the stream open. Returns the count of opened streams, and the
/// tasks (which keep the streams alive and, with a prefix, read the answer).
fn flood(
    client: &Arc<Client>,
    n: usize,
    prefix: &'static [u8],
) -> (Arc<AtomicUsize>, Vec<tokio::task::JoinHandle<Option<Status>>>) {
    let opened = Arc::new(AtomicUsize::new(0));
    let tasks = (0..n)
        .map(|_| {
            let (client, opened) = (client.clone(), opened.clone());
            tokio::spawn(async move {
                let Ok((mut send, mut recv)) = client.conn.open_bi().await else { return None };
                opened.fetch_add(1, Ordering::SeqCst);
                if prefix.is_empty() {
                    // Never send anything; hold the stream until the task is aborted.
                    std::future::pending::<()>().await;
                }
                send.write_all(prefix).await.ok()?;
                let (header, _) = read_response(&mut recv).await.ok()?;
                Some(header.status)
            })
        })
        .collect();
    (opened, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_stream_flood_blocks_beyond_the_limit_and_others_are_served() {
    let mut h = TempServer::start(&["--set", "limits.max_streams_per_connection=16"]);
    let by = Bystander::new(&h).await;
    // A fresh connection: quinn announces returned stream credit only in batches (an eighth of
    // the limit), so after earlier RPCs fewer than 16 new streams could open at once.
    let flooder = Arc::new(h.client().await);

    let (opened, tasks) = flood(&flooder, 200, b"");
    let attack = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        opened.load(Ordering::SeqCst)
    };
    let during = by.served_during("a silent stream flood", 3, attack).await;
    assert_eq!(during, 16, "streams beyond max_streams_per_connection must block");
    // Still blocked a little later, and nothing finished.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(opened.load(Ordering::SeqCst), 16);
    assert!(tasks.iter().all(|t| !t.is_finished()));
    by.served("after a silent stream flood").await;

    // Another connection from the same address has its own stream budget.
    let second = h.client().await;
    let _: v1::HealthResponse =
        bounded("health", second.call(method::HEALTH, &v1::HealthRequest {})).await.unwrap();
    for t in &tasks {
        t.abort();
    }
    flooder.conn.close(quinn::VarInt::from_u32(0), b"done");
    by.served("after the flooder left").await;
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_flood_times_out_and_frees_stream_slots() {
    let mut h = TempServer::start(&[
        "--set",
        "limits.max_streams_per_connection=16",
        "--set",
        "limits.request_timeout_secs=3",
    ]);
    let by = Bystander::new(&h).await;
    let flooder = Arc::new(h.client().await);

    // Each stream sends two bytes of a header and stalls: the server holds 16 of them.
    let t0 = Instant::now();
    let (opened, tasks) = flood(&flooder, 200, &[0x00, 0xc8]);
    let attack = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        opened.load(Ordering::SeqCst)
    };
    let during = by.served_during("a stalled stream flood", 3, attack).await;
    assert_eq!(during, 16, "streams beyond max_streams_per_connection must block");

    // After the request timeout the first 16 are answered DeadlineExceeded, which frees their
    // slots for the next blocked ones.
    let deadline = Instant::now() + STEP;
    while opened.load(Ordering::SeqCst) <= 16 {
        assert!(Instant::now() < deadline, "no stream slot was freed by the request timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t0.elapsed() >= Duration::from_millis(2900), "slots freed before the timeout");
    let mut answered = 0;
    for t in &tasks {
        if t.is_finished() {
            answered += 1;
        }
    }
    assert!(answered >= 1, "some stalled requests were answered");
    let mut statuses = Vec::new();
    for t in tasks {
        if t.is_finished() {
            statuses.push(t.await.unwrap());
        } else {
            t.abort();
        }
    }
    assert!(
        statuses.iter().all(|s| *s == Some(Status::DeadlineExceeded)),
        "stalled requests get DeadlineExceeded: {statuses:?}"
    );
    by.served("after a stalled stream flood").await;
    flooder.conn.close(quinn::VarInt::from_u32(0), b"done");
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Login brute force
// ---------------------------------------------------------------------------------------------

/// An OpaqueLoginStart for `username` with `password` (the server cannot tell a wrong one).
async fn login_start(
    client: &Client,
    username: &str,
    password: &str,
) -> Result<Vec<u8>, CallError> {
    let start = qpq_core::opaque::login_start(password.as_bytes()).unwrap();
    let resp: v1::OpaqueLoginStartResponse = client
        .call(
            method::OPAQUE_LOGIN_START,
            &v1::OpaqueLoginStartRequest { username: username.into(), request: start.request },
        )
        .await?;
    Ok(resp.response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_brute_force_is_rate_limited_per_user() {
    let mut h = TempServer::start(&[
        "--set",
        "limits.auth_per_user_burst=3",
        "--set",
        "limits.auth_per_user_per_min=1",
        // Keep the per-address limit out of the way: this case is about the per-user one.
        "--set",
        "limits.auth_per_ip_burst=1000",
        "--set",
        "limits.auth_per_ip_per_min=1000",
    ]);
    let by = Bystander::new(&h).await;
    let victim_key = identity();
    let setup = h.client().await;
    setup.register("victim", "correct horse", &victim_key, "").await.unwrap();

    let attacker = h.client().await;
    let attack = async {
        let mut limited = Vec::new();
        for attempt in 0..12 {
            // Rotate connections now and then: the limit is per user, not per connection.
            let fresh;
            let client = if attempt % 4 == 3 {
                fresh = h.client().await;
                &fresh
            } else {
                &attacker
            };
            let r =
                bounded("login start", login_start(client, "victim", &format!("guess {attempt}")))
                    .await;
            if attempt < 3 {
                let response = r.unwrap_or_else(|e| panic!("attempt {attempt} within burst: {e}"));
                assert!(!response.is_empty());
            } else {
                let (s, e) = failure(&format!("attempt {attempt}"), r);
                assert_eq!(s, Status::RateLimited, "attempt {attempt}: {e:?}");
                limited.push(e);
            }
        }
        limited
    };
    let limited = by.served_during("a login brute force", 4, attack).await;
    for e in &limited {
        assert!(e.retry_after_ms > 0, "RateLimited carries retry_after_ms: {e:?}");
        assert!(e.retry_after_ms <= 60_000, "one attempt a minute: {e:?}");
    }

    // The right password is throttled too (the limit is on the name, before any check) ...
    let r = login_start(&setup, "victim", "correct horse").await;
    assert_eq!(failure("victim's own login", r).0, Status::RateLimited);
    // ... and so is a name nobody has, so the limit reveals nothing about who exists.
    for attempt in 0..5 {
        let r = login_start(&attacker, "nobody-here", "x").await;
        if attempt < 3 {
            r.unwrap();
        } else {
            assert_eq!(failure("unknown user", r).0, Status::RateLimited);
        }
    }
    // Other users log in as usual.
    let other = h.client().await;
    let other_key = identity();
    other.register("other", "pw other", &other_key, "").await.unwrap();
    bounded("other login", other.login("other", "pw other", &other_key)).await.unwrap();
    by.served("after a login brute force").await;
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Connection limit per address
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_ip_limit_are_refused() {
    let mut h = TempServer::start(&["--set", "limits.max_connections_per_ip=2"]);
    // The bystander's two connections use up the allowance of 127.0.0.1.
    let mut by = Bystander::new(&h).await;
    by.served("at the connection limit").await;

    for attempt in 0..3 {
        let third =
            tokio::time::timeout(STEP, Client::connect(h.server.addr, &h.server.fingerprint))
                .await
                .unwrap_or_else(|_| panic!("attempt {attempt}: refusal took longer than {STEP:?}"));
        let err = match third {
            Ok(_) => panic!("attempt {attempt}: a third connection from 127.0.0.1 was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("refused"), "attempt {attempt}: {err}");
        // The first two keep working.
        by.served(&format!("after refused connection {attempt}")).await;
    }

    // Closing one frees its place: a new connection (resuming the sender's session) fits, and
    // the one after it is refused again.
    by.sender.conn.close(quinn::VarInt::from_u32(0), b"bye");
    let deadline = Instant::now() + STEP;
    let sender = loop {
        match Client::connect(h.server.addr, &h.server.fingerprint).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "closed connection's place not freed: {e:#}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    bounded("resume", sender.resume(&by.sender_token)).await.unwrap();
    by.sender = sender;
    by.served("with a replacement connection").await;
    let again = bounded("connect", Client::connect(h.server.addr, &h.server.fingerprint)).await;
    assert!(again.is_err(), "the limit holds again after the replacement");
    by.served("after the limit was enforced again").await;
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Slow senders
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_get_deadline_exceeded_and_others_are_served() {
    let mut h = TempServer::start(&["--set", "limits.request_timeout_secs=1"]);
    let by = Bystander::new(&h).await;
    let slow = h.client().await;

    let attack = async {
        let t0 = Instant::now();
        // Half a header, then silence.
        let half = RequestHeader { method: method::ENQUEUE, request_id: 5, len: 10 }.encode();
        let (send_a, mut recv_a) = open_partial(&slow, &half[..5]).await;
        // A whole header and half the payload, then silence.
        let body = v1::EnqueueRequest {
            recipient_key: by.recipient_key.to_vec(),
            payload: b"never completed".to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut frame_b = frame::encode_request(method::ENQUEUE, 6, &body).unwrap();
        frame_b.truncate(REQUEST_HEADER_LEN + body.len() / 2);
        let (send_b, mut recv_b) = open_partial(&slow, &frame_b).await;

        let (header, resp) = bounded("half header", read_response(&mut recv_a)).await.unwrap();
        let elapsed = t0.elapsed();
        let err = expect_error("half header", &header, &resp, Status::DeadlineExceeded);
        assert!(err.message.contains("header"), "{err:?}");
        assert!(elapsed >= Duration::from_millis(900), "timed out early: {elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "timed out late: {elapsed:?}");

        let (header, resp) = bounded("half payload", read_response(&mut recv_b)).await.unwrap();
        let err = expect_error("half payload", &header, &resp, Status::DeadlineExceeded);
        assert_eq!(header.request_id, 6);
        assert!(err.message.contains("payload"), "{err:?}");

        // The server stops reading the abandoned requests.
        for send in [send_a, send_b] {
            let stopped = bounded("stop_sending", send.stopped()).await.unwrap();
            assert_eq!(stopped, Some(quinn::VarInt::from_u32(STREAM_REFUSED)));
        }
    };
    by.served_during("slow senders", 4, attack).await;

    // The slow client's connection is still usable for complete requests.
    let _: v1::HealthResponse =
        bounded("health", slow.call(method::HEALTH, &v1::HealthRequest {})).await.unwrap();
    by.served("after slow senders").await;
    // The half-sent enqueue never reached the queue.
    assert!(by.recipient.fetch(0).await.unwrap().is_empty());
    h.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Slow readers
// ---------------------------------------------------------------------------------------------

/// Resident memory of the server process serving `data_dir`, in KiB (found through /proc by its
/// `--data-dir` argument, which is a unique temporary directory).
#[cfg(target_os = "linux")]
fn server_rss_kib(data_dir: &std::path::Path) -> u64 {
    let want = data_dir.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_server = args.first().is_some_and(|a| a.ends_with(b"qpq-server-lite"));
        if is_server && args.contains(&want) {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no qpq-server-lite process for {}", data_dir.display());
}

/// A client that asks for large responses and never reads them must not pin server memory
/// without bound: the limits are meant for a router ("Defaults suit a router with 128 MB of
/// RAM", server-lite/src/config.rs). Here one address, well inside its default connection allowance, leaves 36 Fetch
/// responses of ~4 MB unread and keeps its connections alive.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_do_not_pin_server_memory() {
    const CONNS: usize = 3;
    const STREAMS: u32 = 12;
    let mut h = TempServer::start(&["--set", "limits.request_timeout_secs=2"]);
    let by = Bystander::new(&h).await;
    let attacker = h.client().await;
    let key = identity();
    attacker.register("slowpoke", "pw slowpoke", &key, "").await.unwrap();
    let token = attacker.login("slowpoke", "pw slowpoke", &key).await.unwrap();
    // ~4 MB in the attacker's own queue: every Fetch answers with all of it.
    for _ in 0..4 {
        bounded("enqueue", attacker.enqueue(&key, &vec![7u8; 1_000_000], message_id()))
            .await
            .unwrap();
    }
    assert_eq!(bounded("fetch", attacker.fetch(10)).await.unwrap().len(), 4);
    let data_dir = h.server.data_dir.clone();
    let baseline = server_rss_kib(&data_dir);

    let mut conns = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..CONNS {
        let c = h.client().await;
        bounded("resume", c.resume(&token)).await.unwrap();
        for i in 0..STREAMS {
            let req = v1::FetchRequest { limit: 10, ..Default::default() }.encode_to_vec();
            let bytes = frame::encode_request(method::FETCH, i, &req).unwrap();
            let (mut send, recv) = bounded("open_bi", c.conn.open_bi()).await.unwrap();
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            // Never read `recv`.
            streams.push((send, recv));
        }
        conns.push(c);
    }
    by.served_during("slow readers", 3, tokio::time::sleep(Duration::from_secs(1))).await;
    // Well past the request timeout: a server that bounds unread responses has let go by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pinned = server_rss_kib(&data_dir).saturating_sub(baseline);
    by.served("after slow readers").await;
    for c in &conns {
        c.conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    h.assert_alive();
    assert!(
        pinned < 64 * 1024,
        "{CONNS} connections with {STREAMS} unread Fetch responses each pin {} MiB of server \
         memory (baseline {} MiB)",
        pinned / 1024,
        baseline / 1024
    );
}
