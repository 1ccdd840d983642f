//! Queues, push, long poll, relay, TTL, KeyPackages, hybrid keys, users, blobs and account
//! deletion against the real binary.

use std::time::{Duration, Instant};

use qpq_proto::{Message, Status, method, v1};
use qpq_tests::{CallError, Client, KeyMaker, ServerProcess, identity, message_id};
use sha2::{Digest, Sha256};

struct User {
    c: Client,
    id: [u8; 32],
    token: Vec<u8>,
}

async fn user(server: &ServerProcess, name: &str) -> User {
    user_with(server, name, identity()).await
}

async fn user_with(server: &ServerProcess, name: &str, id: [u8; 32]) -> User {
    let c = server.client().await.unwrap();
    c.register(name, "pw", &id, "").await.unwrap();
    let token = c.login(name, "pw", &id).await.unwrap();
    User { c, id, token }
}

fn status<T: std::fmt::Debug>(r: Result<T, CallError>) -> Status {
    match r {
        Err(CallError::Status(s, _)) => s,
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fetch_ack_ordering_and_idempotency() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;

    let mut ids = Vec::new();
    for i in 0..5u8 {
        let mid = message_id();
        let r = alice.c.enqueue(&bob.id, &[i; 10], mid).await.unwrap();
        assert_eq!(r.seq, u64::from(i) + 1);
        assert!(!r.duplicate);
        ids.push(mid);
    }
    // Retrying with the same message id stores nothing new.
    let again = alice.c.enqueue(&bob.id, &[2; 10], ids[2]).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (3, true));

    let got = bob.c.fetch(0).await.unwrap();
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(got[4].data, vec![4; 10]);
    assert_eq!(got[0].message_id, ids[0].to_vec());
    // Fetch and Peek do not consume; a limit is honoured.
    assert_eq!(bob.c.fetch(2).await.unwrap().len(), 2);
    let peek: v1::PeekResponse = bob
        .c
        .call(method::PEEK, &v1::PeekRequest { limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(peek.payloads.len(), 5);

    assert_eq!(bob.c.ack(3).await.unwrap(), 3);
    assert_eq!(bob.c.fetch(0).await.unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(bob.c.ack(3).await.unwrap(), 0, "acking again removes nothing");
    // Even after the ack, the id is remembered: no resurrection by a retried send.
    assert!(alice.c.enqueue(&bob.id, &[0; 10], ids[0]).await.unwrap().duplicate);
    let r = alice.c.enqueue(&bob.id, b"next", message_id()).await.unwrap();
    assert_eq!(r.seq, 6, "seq never goes back");

    // Channels are separate queues.
    let chan = vec![9u8; 16];
    let r: v1::EnqueueResponse = alice
        .c
        .call(
            method::ENQUEUE,
            &v1::EnqueueRequest {
                recipient_key: bob.id.to_vec(),
                payload: b"c".to_vec(),
                channel_id: chan.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.seq, 1);
    let f: v1::FetchResponse = bob
        .c
        .call(method::FETCH, &v1::FetchRequest { channel_id: chan, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(f.payloads.len(), 1);

    // Validation.
    assert_eq!(status(alice.c.enqueue(&identity(), b"x", message_id()).await), Status::NotFound);
    assert_eq!(status(alice.c.enqueue(&bob.id, b"", message_id()).await), Status::BadRequest);
    let bad_mid = v1::EnqueueRequest {
        recipient_key: bob.id.to_vec(),
        payload: b"x".to_vec(),
        message_id: vec![1; 3],
        ..Default::default()
    };
    assert_eq!(
        status(alice.c.call::<_, v1::EnqueueResponse>(method::ENQUEUE, &bad_mid).await),
        Status::BadRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_fetch_wait_and_ephemeral_relay() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;

    // Push: bob is connected and authenticated.
    alice.c.enqueue(&bob.id, b"pushed", message_id()).await.unwrap();
    let push = bob.c.next_push(Duration::from_secs(5)).await.expect("a NewMessage push");
    assert_eq!(push.event, method::PUSH_NEW_MESSAGE);
    let nm = v1::NewMessage::decode(push.payload.as_slice()).unwrap();
    assert_eq!(nm.envelope.unwrap().data, b"pushed");
    bob.c.ack(1).await.unwrap();

    // FetchWait wakes up when a message arrives.
    let waiter = server.client().await.unwrap();
    waiter.resume(&bob.token).await.unwrap();
    let started = Instant::now();
    let wait = tokio::spawn(async move {
        let r: v1::FetchWaitResponse = waiter
            .call(
                method::FETCH_WAIT,
                &v1::FetchWaitRequest { timeout_ms: 10_000, ..Default::default() },
            )
            .await
            .unwrap();
        r
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice.c.enqueue(&bob.id, b"wake", message_id()).await.unwrap();
    let r = wait.await.unwrap();
    assert_eq!(r.payloads.len(), 1);
    assert_eq!(r.payloads[0].data, b"wake");
    assert!(started.elapsed() < Duration::from_secs(5), "woken, not timed out");
    bob.c.ack(r.payloads[0].seq).await.unwrap();

    // FetchWait with nothing queued returns empty after its timeout.
    let t = Instant::now();
    let r: v1::FetchWaitResponse = bob
        .c
        .call(method::FETCH_WAIT, &v1::FetchWaitRequest { timeout_ms: 300, ..Default::default() })
        .await
        .unwrap();
    assert!(r.payloads.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(250));

    // Ephemeral relay reaches the connected recipient and is never stored.
    while bob.c.next_push(Duration::from_millis(100)).await.is_some() {}
    let r: v1::RelayEphemeralResponse = alice
        .c
        .call(
            method::RELAY_EPHEMERAL,
            &v1::RelayEphemeralRequest {
                recipient_keys: vec![bob.id.to_vec()],
                payload: b"typing".to_vec(),
                channel_id: vec![],
            },
        )
        .await
        .unwrap();
    assert!(r.delivered >= 1);
    let push = bob.c.next_push(Duration::from_secs(5)).await.expect("a typing push");
    assert_eq!(push.event, method::PUSH_TYPING);
    let t = v1::TypingIndicator::decode(push.payload.as_slice()).unwrap();
    assert_eq!((t.sender_key, t.payload), (alice.id.to_vec(), b"typing".to_vec()));
    assert!(bob.c.fetch(0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_enqueue_fans_out_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;
    let carol = user(&server, "carol").await;
    bob.c.enqueue(&carol.id, b"earlier", message_id()).await.unwrap();
    let mid = message_id();
    let req = v1::BatchEnqueueRequest {
        recipient_keys: vec![bob.id.to_vec(), carol.id.to_vec(), identity().to_vec()],
        payload: b"group commit".to_vec(),
        message_id: mid.to_vec(),
        ..Default::default()
    };
    let r: v1::BatchEnqueueResponse = alice.c.call(method::BATCH_ENQUEUE, &req).await.unwrap();
    assert_eq!(r.seqs, vec![1, 2, 0], "unknown recipients get seq 0");
    let again: v1::BatchEnqueueResponse = alice.c.call(method::BATCH_ENQUEUE, &req).await.unwrap();
    assert_eq!(again.seqs, vec![1, 2, 0]);
    assert_eq!(again.duplicates, vec![true, true, false]);
    assert_eq!(bob.c.fetch(0).await.unwrap()[0].data, b"group commit");
    assert_eq!(carol.c.fetch(0).await.unwrap().len(), 2);
    let dup = v1::BatchEnqueueRequest {
        recipient_keys: vec![bob.id.to_vec(), bob.id.to_vec()],
        payload: b"x".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        status(alice.c.call::<_, v1::BatchEnqueueResponse>(method::BATCH_ENQUEUE, &dup).await),
        Status::BadRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_and_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start(dir.path(), &["--set", "limits.sweep_interval_secs=1"]).unwrap();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;
    let short = v1::EnqueueRequest {
        recipient_key: bob.id.to_vec(),
        payload: b"gone soon".to_vec(),
        ttl_secs: 1,
        message_id: message_id().to_vec(),
        ..Default::default()
    };
    let _: v1::EnqueueResponse = alice.c.call(method::ENQUEUE, &short).await.unwrap();
    alice.c.enqueue(&bob.id, b"stays", message_id()).await.unwrap();
    assert_eq!(bob.c.fetch(0).await.unwrap().len(), 2);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let left = bob.c.fetch(0).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].data, b"stays");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.stderr.lock().unwrap().contains("expired records removed") {
        assert!(
            Instant::now() < deadline,
            "the sweep did not run:\n{}",
            server.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_are_single_use_fifo_with_low_stock_push() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--set", "limits.key_package_low_water=2", "--set", "limits.max_key_packages=3"],
    )
    .unwrap();
    // KeyPackages made by alice's real MLS keys: the server verifies them against her account.
    let keys = KeyMaker::new();
    let alice = user_with(&server, "alice", keys.identity_key()).await;
    let bob = user(&server, "bob").await;
    let packages: Vec<Vec<u8>> = (0..5).map(|_| keys.key_package()).collect();
    for (stock, package) in (1..).zip(&packages[1..=3]) {
        let r: v1::UploadKeyPackageResponse = alice
            .c
            .call(
                method::UPLOAD_KEY_PACKAGE,
                &v1::UploadKeyPackageRequest {
                    identity_key: alice.id.to_vec(),
                    package: package.clone(),
                    last_resort: false,
                },
            )
            .await
            .unwrap();
        assert_eq!(r.fingerprint, Sha256::digest(package).to_vec());
        assert_eq!(r.stock, stock);
    }
    let full = alice
        .c
        .call::<_, v1::UploadKeyPackageResponse>(
            method::UPLOAD_KEY_PACKAGE,
            &v1::UploadKeyPackageRequest {
                identity_key: vec![],
                package: packages[4].clone(),
                last_resort: false,
            },
        )
        .await;
    assert_eq!(status(full), Status::Conflict);
    let wrong_suite = v1::UploadKeyPackageRequest {
        identity_key: vec![],
        package: vec![0, 1, 0, 1, 5, 5],
        last_resort: false,
    };
    assert_eq!(
        status(
            alice
                .c
                .call::<_, v1::UploadKeyPackageResponse>(method::UPLOAD_KEY_PACKAGE, &wrong_suite)
                .await
        ),
        Status::BadRequest
    );
    let not_mine = v1::UploadKeyPackageRequest {
        identity_key: bob.id.to_vec(),
        package: packages[0].clone(),
        last_resort: false,
    };
    assert_eq!(
        status(
            alice
                .c
                .call::<_, v1::UploadKeyPackageResponse>(method::UPLOAD_KEY_PACKAGE, &not_mine)
                .await
        ),
        Status::Forbidden
    );

    while alice.c.next_push(Duration::from_millis(50)).await.is_some() {}
    let fetch = v1::FetchKeyPackageRequest { identity_key: alice.id.to_vec() };
    for package in &packages[1..=3] {
        let r: v1::FetchKeyPackageResponse =
            bob.c.call(method::FETCH_KEY_PACKAGE, &fetch).await.unwrap();
        assert_eq!(&r.package, package, "oldest first, each once");
    }
    let r: v1::FetchKeyPackageResponse =
        bob.c.call(method::FETCH_KEY_PACKAGE, &fetch).await.unwrap();
    assert!(r.package.is_empty(), "exhausted is an empty package, not an error");
    let push = alice.c.next_push(Duration::from_secs(5)).await.expect("low-stock push");
    assert_eq!(push.event, method::PUSH_KEY_PACKAGES_LOW);
    let low = v1::KeyPackagesLow::decode(push.payload.as_slice()).unwrap();
    assert!(low.stock < 2);
    let s: v1::KeyPackageStockResponse =
        alice.c.call(method::KEY_PACKAGE_STOCK, &v1::KeyPackageStockRequest {}).await.unwrap();
    assert_eq!((s.stock, s.low_water), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_keys_and_user_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;
    let hk = vec![3u8; 1216];
    let _: v1::UploadHybridKeyResponse = alice
        .c
        .call(
            method::UPLOAD_HYBRID_KEY,
            &v1::UploadHybridKeyRequest {
                identity_key: alice.id.to_vec(),
                hybrid_public_key: hk.clone(),
            },
        )
        .await
        .unwrap();
    let short = v1::UploadHybridKeyRequest { identity_key: vec![], hybrid_public_key: vec![1; 32] };
    assert_eq!(
        status(
            alice.c.call::<_, v1::UploadHybridKeyResponse>(method::UPLOAD_HYBRID_KEY, &short).await
        ),
        Status::BadRequest
    );
    let r: v1::FetchHybridKeyResponse = bob
        .c
        .call(
            method::FETCH_HYBRID_KEY,
            &v1::FetchHybridKeyRequest { identity_key: alice.id.to_vec() },
        )
        .await
        .unwrap();
    assert_eq!(r.hybrid_public_key, hk);
    let r: v1::FetchHybridKeysResponse = bob
        .c
        .call(
            method::FETCH_HYBRID_KEYS,
            &v1::FetchHybridKeysRequest { identity_keys: vec![alice.id.to_vec(), bob.id.to_vec()] },
        )
        .await
        .unwrap();
    assert_eq!(r.keys, vec![hk, vec![]]);

    let r: v1::ResolveUserResponse = bob
        .c
        .call(method::RESOLVE_USER, &v1::ResolveUserRequest { username: "alice".into() })
        .await
        .unwrap();
    assert_eq!(r.identity_key, alice.id.to_vec());
    let r: v1::ResolveIdentityResponse = alice
        .c
        .call(
            method::RESOLVE_IDENTITY,
            &v1::ResolveIdentityRequest { identity_key: bob.id.to_vec() },
        )
        .await
        .unwrap();
    assert_eq!(r.username, "bob");
    assert_eq!(
        status(
            bob.c
                .call::<_, v1::ResolveUserResponse>(
                    method::RESOLVE_USER,
                    &v1::ResolveUserRequest { username: "zed".into() }
                )
                .await
        ),
        Status::NotFound
    );
}

async fn upload(
    c: &Client,
    id: &[u8; 32],
    total: u64,
    offset: u64,
    chunk: &[u8],
) -> Result<v1::UploadBlobResponse, CallError> {
    c.call(
        method::UPLOAD_BLOB,
        &v1::UploadBlobRequest {
            blob_id: id.to_vec(),
            total_size: total,
            offset,
            chunk: chunk.to_vec(),
            media_type: "application/octet-stream".into(),
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_upload_resumes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--set", "limits.max_blob_bytes=3000000", "--set", "limits.blob_quota_bytes=4000000"],
    )
    .unwrap();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;
    let content: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    let id: [u8; 32] = Sha256::digest(&content).into();
    let total = content.len() as u64;

    let r = upload(&alice.c, &id, total, 0, &content[..1_000_000]).await.unwrap();
    assert_eq!((r.next_offset, r.complete), (1_000_000, false));
    // The connection drops; a new one asks where to resume.
    alice.c.conn.close(0u32.into(), b"bye");
    let c = server.client().await.unwrap();
    c.resume(&alice.token).await.unwrap();
    let r = upload(&c, &id, total, 0, &[]).await.unwrap();
    assert_eq!(r.next_offset, 1_000_000);
    // A chunk at the wrong offset is answered with the right one.
    let r = upload(&c, &id, total, 5, &content[5..10]).await.unwrap();
    assert_eq!(r.next_offset, 1_000_000);
    let r = upload(&c, &id, total, 1_000_000, &content[1_000_000..2_000_000]).await.unwrap();
    assert_eq!(r.next_offset, 2_000_000);
    let r = upload(&c, &id, total, 2_000_000, &content[2_000_000..]).await.unwrap();
    assert!(r.complete);

    let mut got = Vec::new();
    while got.len() < content.len() {
        let r: v1::DownloadBlobResponse = bob
            .c
            .call(
                method::DOWNLOAD_BLOB,
                &v1::DownloadBlobRequest {
                    blob_id: id.to_vec(),
                    offset: got.len() as u64,
                    max_len: 700_000,
                },
            )
            .await
            .unwrap();
        assert_eq!(r.total_size, total);
        assert!(!r.chunk.is_empty());
        got.extend_from_slice(&r.chunk);
    }
    assert_eq!(got, content);

    // Content that does not hash to the id is discarded.
    let bad_id = [7u8; 32];
    let e = upload(&c, &bad_id, 3, 0, b"abc").await;
    assert_eq!(status(e), Status::BadRequest);
    let missing = bob
        .c
        .call::<_, v1::DownloadBlobResponse>(
            method::DOWNLOAD_BLOB,
            &v1::DownloadBlobRequest { blob_id: bad_id.to_vec(), offset: 0, max_len: 0 },
        )
        .await;
    assert_eq!(status(missing), Status::NotFound);
    // Size limit and quota.
    assert_eq!(status(upload(&c, &[8u8; 32], 3_000_001, 0, b"x").await), Status::PayloadTooLarge);
    assert_eq!(
        status(upload(&c, &[9u8; 32], 2_000_000, 0, b"x").await),
        Status::PayloadTooLarge,
        "2.5 MB held + 2 MB > 4 MB quota"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_account_purges_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let alice = user(&server, "alice").await;
    let bob_keys = KeyMaker::new();
    let bob = user_with(&server, "bob", bob_keys.identity_key()).await;
    alice.c.enqueue(&bob.id, b"for bob", message_id()).await.unwrap();
    for last_resort in [false, true] {
        let package = bob_keys.key_package();
        let req = v1::UploadKeyPackageRequest { identity_key: vec![], package, last_resort };
        let _: v1::UploadKeyPackageResponse =
            bob.c.call(method::UPLOAD_KEY_PACKAGE, &req).await.unwrap();
    }
    let other = server.client().await.unwrap();
    other.resume(&bob.token).await.unwrap();

    let r: v1::DeleteAccountResponse =
        bob.c.call(method::DELETE_ACCOUNT, &v1::DeleteAccountRequest {}).await.unwrap();
    assert!(r.success);
    assert_eq!(status(bob.c.fetch(0).await), Status::Unauthorized);
    assert_eq!(status(alice.c.enqueue(&bob.id, b"late", message_id()).await), Status::NotFound);
    let kp: v1::FetchKeyPackageResponse = alice
        .c
        .call(
            method::FETCH_KEY_PACKAGE,
            &v1::FetchKeyPackageRequest { identity_key: bob.id.to_vec() },
        )
        .await
        .unwrap();
    assert!(kp.package.is_empty());
    let c = server.client().await.unwrap();
    assert_eq!(status(c.resume(&bob.token).await), Status::Unauthorized);
    // The other connection of bob was closed by the server.
    tokio::time::timeout(Duration::from_secs(5), other.conn.closed()).await.expect("closed");
    // The name is free again, and the new bob starts with an empty queue.
    let bob2 = user(&server, "bob").await;
    assert!(bob2.c.fetch(0).await.unwrap().is_empty());
}

/// A long poll the client drops (a UI cancels its wait whenever the user acts) must not keep
/// its stream: the server allows 16 at once per connection, and 20 abandoned polls left to
/// their 20 s deadlines would make the next call wait for the oldest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_long_polls_free_their_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let bob = user(&server, "bob").await;
    let long = v1::FetchWaitRequest { timeout_ms: 20_000, ..Default::default() };
    for _ in 0..20 {
        let poll = bob.c.call::<_, v1::FetchWaitResponse>(method::FETCH_WAIT, &long);
        // Cancelled once it is surely waiting on the server.
        assert!(tokio::time::timeout(Duration::from_millis(100), poll).await.is_err());
    }
    let t = Instant::now();
    let _: v1::HealthResponse = bob.c.call(method::HEALTH, &v1::HealthRequest {}).await.unwrap();
    let took = t.elapsed();
    let log = server.stderr.lock().unwrap().clone();
    let gave_up = log.matches("gave up").count();
    assert!(
        took < Duration::from_secs(5),
        "the next call waited {took:?} for a free stream; server saw {gave_up} polls given up"
    );
}
