//! Trust against a hostile server's users (issue 12, the server half), through the real binary:
//!
//! - KeyPackages: one of bob's, fetched and uploaded by mallory, is refused; so are forged ones
//!   (a credential naming bob on mallory's key, a flipped signature byte, junk), while mallory's
//!   own is accepted.
//! - Queues: one sender flooding an offline victim is stopped at its share with a clear
//!   refusal; four filling the queue leave the handshake reserve, so a commit and a Welcome
//!   from other members still reach the victim, who stays in the group; the sender of an
//!   application message the full queue refused hears who did not get it.
//! - KeyPackage exhaustion (someone fetches all of bob's) is answered by bob's last-resort
//!   package, so a DM to bob still works; bob then replaces it. Low-stock pushes make a client
//!   top up at most once a minute, never past its target.
//! - KeyPackage fetches are rate-limited per requester and per target.
//! - The disk budget: application messages stop at 90 %, handshakes at 100 %, blobs too.

use std::path::Path;
use std::sync::Arc;

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use qpq_core::client::{Client, Event, RegisterOptions};
use qpq_core::identity::Identity;
use qpq_core::ids::GroupId;
use qpq_core::mls::{CIPHERSUITE, Mls, QpqProvider};
use qpq_core::vault::{KdfParams, Vault};
use qpq_proto::{Status, method, v1};
use qpq_tests::{CallError, TempServer, identity, message_id};

const FAST: KdfParams = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };

async fn account(h: &TempServer, dir: &Path, name: &str) -> Client {
    Client::register(RegisterOptions {
        store: dir.join(name).join("account.qpq"),
        passphrase: format!("{name} passphrase"),
        server: h.server.addr,
        pin: Some(h.server.fingerprint.clone()),
        username: name.into(),
        password: format!("{name} password"),
        invite: String::new(),
        kdf: FAST,
    })
    .await
    .unwrap()
}

/// A raw protocol client registered and logged in as `name` with identity key `id`.
async fn raw(h: &TempServer, name: &str, id: &[u8; 32]) -> qpq_tests::Client {
    let c = h.client().await;
    c.register(name, "pw", id, "").await.unwrap();
    c.login(name, "pw", id).await.unwrap();
    c
}

fn refusal<T: std::fmt::Debug>(what: &str, r: Result<T, CallError>) -> (Status, v1::Error) {
    match r {
        Err(CallError::Status(s, e)) => (s, e),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

async fn upload(
    c: &qpq_tests::Client,
    package: Vec<u8>,
    last_resort: bool,
) -> Result<v1::UploadKeyPackageResponse, CallError> {
    let req = v1::UploadKeyPackageRequest { identity_key: Vec::new(), package, last_resort };
    c.call(method::UPLOAD_KEY_PACKAGE, &req).await
}

async fn fetch_kp(
    c: &qpq_tests::Client,
    of: &[u8; 32],
) -> Result<v1::FetchKeyPackageResponse, CallError> {
    c.call(method::FETCH_KEY_PACKAGE, &v1::FetchKeyPackageRequest { identity_key: of.to_vec() })
        .await
}

/// Drains `events` and returns the reasons of the `Rejected` ones.
fn rejections(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::Rejected { reason } = e {
            out.push(reason);
        }
    }
    out
}

fn texts(c: &Client, conv: &GroupId) -> Vec<String> {
    c.history(conv, usize::MAX).unwrap().into_iter().filter(|e| !e.system).map(|e| e.text).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_not_bound_to_the_uploader_are_refused() {
    let mut h = TempServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let bob = account(&h, dir.path(), "bob").await; // uploads his KeyPackages at login
    let bob_key = bob.identity_key();

    // mallory: a real device of her own.
    let vault = Arc::new(Vault::create(&dir.path().join("mallory.qpq"), b"m", FAST).unwrap());
    let mallory_id = Identity::generate();
    let seed = *mallory_id.seed();
    let mallory_key = mallory_id.public_key();
    let mallory_mls = Mls::new(vault.clone(), mallory_id);
    let mallory = raw(&h, "mallory", &mallory_key).await;

    // bob's own package, fetched from the server and offered as mallory's: valid signatures,
    // bob's credential, not hers.
    let stolen = fetch_kp(&mallory, &bob_key).await.unwrap().package;
    assert!(!stolen.is_empty());
    for last_resort in [false, true] {
        let (s, e) = refusal(
            "bob's package as mallory's",
            upload(&mallory, stolen.clone(), last_resort).await,
        );
        assert_eq!(s, Status::BadRequest, "{e:?}");
        assert!(e.message.contains("credential belongs to account"), "{e:?}");
    }

    // A package on mallory's key whose credential names bob's account (v1 with a made-up
    // binding signature, and legacy).
    let forge = |credential: Vec<u8>| {
        let provider = QpqProvider::new(vault.clone());
        let cred = CredentialWithKey {
            credential: BasicCredential::new(credential).into(),
            signature_key: mallory_key.to_vec().into(),
        };
        let bundle = KeyPackage::builder()
            .build(CIPHERSUITE, &provider, &Identity::from_seed(&seed), cred)
            .unwrap();
        MlsMessageOut::from(bundle.key_package().clone()).tls_serialize_detached().unwrap()
    };
    let named_bob = qpq_core::credential::encode_v1(&bob_key, &mallory_key, &[1; 64]);
    for (what, package) in
        [("v1 naming bob", forge(named_bob)), ("legacy naming bob", forge(bob_key.to_vec()))]
    {
        let (s, e) = refusal(what, upload(&mallory, package, false).await);
        assert_eq!(s, Status::BadRequest, "{what}: {e:?}");
        assert!(e.message.contains("credential"), "{what}: {e:?}");
    }

    // Her own package, with one signature byte flipped, truncated, with a trailing byte, or
    // junk behind a KeyPackage header.
    let own = mallory_mls.key_package().unwrap();
    let mut flipped = own.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let mut trailing = own.clone();
    trailing.push(0);
    let junk = [&[0u8, 1, 0, 5, 0, 1, 0, 0x4F][..], &[7; 100]].concat();
    for (what, package, needle) in [
        ("flipped signature", flipped, "signature does not verify"),
        ("truncated", own[..own.len() - 10].to_vec(), "malformed"),
        ("trailing byte", trailing, "trailing"),
        ("junk", junk, "malformed"),
        ("bare KeyPackage", own[4..].to_vec(), "not an MLS 1.0 KeyPackage"),
    ] {
        let (s, e) = refusal(what, upload(&mallory, package, false).await);
        assert_eq!(s, Status::BadRequest, "{what}: {e:?}");
        assert!(e.message.contains(needle), "{what}: {e:?}");
    }
    let stock: v1::KeyPackageStockResponse =
        mallory.call(method::KEY_PACKAGE_STOCK, &v1::KeyPackageStockRequest {}).await.unwrap();
    assert_eq!(stock.stock, 0, "nothing refused was stored");

    // The same package, untouched, is hers and is accepted.
    let r = upload(&mallory, own, false).await.unwrap();
    assert_eq!(r.stock, 1);
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_flood_leaves_room_for_group_changes() {
    // 20 queued messages per user, 5 per sender; 8 more for handshakes, 2 per sender.
    let mut h = TempServer::start(&[
        "--set",
        "limits.max_queue_messages=20",
        "--set",
        "limits.handshake_reserve_messages=8",
        // Nine accounts register from one address.
        "--set",
        "limits.auth_per_ip_burst=100",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut alice = account(&h, dir.path(), "alice").await;
    let mut bob = account(&h, dir.path(), "bob").await;
    let mut carol = account(&h, dir.path(), "carol").await;
    let mut dave = account(&h, dir.path(), "dave").await;
    let team = alice.create_group("team").await.unwrap();
    alice.add_members(&team, &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let bob_key = bob.identity_key();
    bob.disconnect().await; // bob is offline from here on

    // mallory floods bob: her share of five, plus the three stored while bob's queue held
    // less than half a share (not counted per sender), then a clear refusal, by Enqueue and
    // BatchEnqueue.
    let mallory = raw(&h, "mallory", &identity()).await;
    for i in 0..8u8 {
        mallory.enqueue(&bob_key, &[i; 100], message_id()).await.unwrap();
    }
    let (s, e) = refusal("sixth", mallory.enqueue(&bob_key, b"more", message_id()).await);
    assert_eq!(s, Status::RateLimited, "{e:?}");
    assert!(e.message.contains("share") && e.retry_after_ms > 0, "{e:?}");
    let batch = v1::BatchEnqueueRequest {
        recipient_keys: vec![bob_key.to_vec()],
        payload: b"more".to_vec(),
        message_id: message_id().to_vec(),
        ..Default::default()
    };
    let r: v1::BatchEnqueueResponse = mallory.call(method::BATCH_ENQUEUE, &batch).await.unwrap();
    assert_eq!(r.seqs, [0]);
    assert_eq!(r.refusals, [v1::EnqueueRefusal::SenderShare as i32]);
    // Labelling junk as a commit earns her two more (her share of the reserve), no more.
    let fake_commit = [&[0u8, 1, 0, 2, 1, 7][..], &[0; 8], &[3], &[9; 40]].concat();
    for _ in 0..2 {
        mallory.enqueue(&bob_key, &fake_commit, message_id()).await.unwrap();
    }
    let r = mallory.enqueue(&bob_key, &fake_commit, message_id()).await;
    assert_eq!(refusal("third fake commit", r).0, Status::RateLimited);

    // Three more accounts fill bob's queue (the twelve places mallory left).
    let mut room = 20 - 8;
    for n in 1..=3 {
        let sybil = raw(&h, &format!("sybil{n}"), &identity()).await;
        for i in 0..room.min(5) {
            sybil.enqueue(&bob_key, &[i; 100], message_id()).await.unwrap();
            room -= 1;
        }
    }
    assert_eq!(room, 0);

    // An application message from alice finds the queue full; alice is told who missed it.
    let mut events = alice.subscribe();
    alice.send_text(&team, "lost in the flood").await.unwrap();
    let reasons = rejections(&mut events);
    assert!(
        reasons.iter().any(|r| r.contains("not delivered to bob") && r.contains("full")),
        "{reasons:?}"
    );

    // Group changes still reach bob: alice's commit adding carol, dave's Welcome to a DM.
    alice.add_members(&team, &["carol".into()]).await.unwrap();
    // (Only the group's name, an application message sent after the commit for carol, did
    // not fit in bob's queue.)
    let rejected = rejections(&mut events);
    assert!(!rejected.iter().any(|r| r.contains("group change")), "{rejected:?}");
    let dm = dave.dm("bob").await.unwrap();
    carol.sync().await.unwrap();

    // bob comes back: junk is rejected, the commit and the Welcome are processed.
    bob.sync().await.unwrap();
    let members: Vec<qpq_core::ids::IdentityKey> =
        bob.group_info(&team).await.unwrap().members.into_iter().map(|m| m.0).collect();
    assert!(members.contains(&carol.identity_key()), "bob saw carol's addition");
    assert!(bob.conversation(&dm).unwrap().is_some(), "bob joined dave's DM");
    assert!(!texts(&bob, &team).contains(&"lost in the flood".to_string()));
    // ... and he is still in the group with everyone.
    alice.send_text(&team, "after the flood").await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(texts(&bob, &team).last().map(String::as_str), Some("after the flood"));
    assert_eq!(texts(&carol, &team).last().map(String::as_str), Some("after the flood"));
    dave.send_text(&dm, "hi bob").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, &dm), ["hi bob"]);
    // The flood is gone with bob's ack: mallory may send again.
    mallory.enqueue(&bob_key, b"again", message_id()).await.unwrap();
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_stock_falls_back_to_the_last_resort() {
    let mut h = TempServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut alice = account(&h, dir.path(), "alice").await;
    let mut bob = account(&h, dir.path(), "bob").await;
    let bob_key = bob.identity_key();
    bob.disconnect().await; // offline: no top-up while his stock is drained

    // mallory takes every KeyPackage of bob's. The last resort comes out when the stock is
    // empty, and stays.
    let mallory = raw(&h, "mallory", &identity()).await;
    let mut regular = 0;
    let last = loop {
        let r = fetch_kp(&mallory, &bob_key).await.unwrap();
        assert!(!r.package.is_empty());
        if r.last_resort {
            break r.package;
        }
        regular += 1;
        assert!(regular <= 10, "more packages than bob uploaded");
    };
    assert_eq!(regular, 10);
    let again = fetch_kp(&mallory, &bob_key).await.unwrap();
    assert!(again.last_resort);
    assert_eq!(again.package, last, "kept, not deleted");

    // A DM to bob still works, on the last resort; and a second one on the same package
    // (it keeps its private keys after the first Welcome, being marked last-resort).
    let dm = alice.dm("bob").await.unwrap();
    alice.send_text(&dm, "hello via the last resort").await.unwrap();
    let mut carol = account(&h, dir.path(), "carol").await;
    let carols = carol.dm("bob").await.unwrap();
    carol.send_text(&carols, "me too").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, &dm), ["hello via the last resort"]);
    assert_eq!(texts(&bob, &carols), ["me too"]);

    // bob tops up to the target and replaces the handed-out last resort; no more.
    assert_eq!(bob.ensure_key_packages().await.unwrap(), 11);
    assert_eq!(bob.ensure_key_packages().await.unwrap(), 0);
    let r = fetch_kp(&mallory, &bob_key).await.unwrap();
    assert!(!r.last_resort, "a regular package again");
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_stock_pushes_top_up_at_most_once_a_minute_and_never_past_the_target() {
    let mut h = TempServer::start(&["--set", "limits.key_package_fetch_per_target_burst=100"]);
    let dir = tempfile::tempdir().unwrap();
    let mut bob = account(&h, dir.path(), "bob").await; // online: 10 packages and a last resort
    let bob_key = bob.identity_key();
    let mallory = raw(&h, "mallory", &identity()).await;
    let drain = |n: usize| {
        let (mallory, bob_key) = (&mallory, bob_key);
        async move {
            for _ in 0..n {
                let r = fetch_kp(mallory, &bob_key).await.unwrap();
                assert!(!r.package.is_empty() && !r.last_resort);
            }
        }
    };
    // Below the low-water mark (5): the push makes bob top up, back to 10.
    drain(6).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    bob.sync().await.unwrap();
    // Again within the minute: the push is not obeyed, however often it comes.
    drain(6).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    bob.sync().await.unwrap();
    let mut regular = 0;
    while !fetch_kp(&mallory, &bob_key).await.unwrap().last_resort {
        regular += 1;
        assert!(regular <= 10);
    }
    assert_eq!(regular, 4, "one top-up to exactly 10, then none: 10 - 6 left");
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_package_fetches_are_rate_limited_per_requester_and_per_target() {
    let mut h = TempServer::start(&[
        "--set",
        "limits.key_package_fetch_per_user_burst=3",
        "--set",
        "limits.key_package_fetch_per_user_per_min=1",
        "--set",
        "limits.key_package_fetch_per_target_burst=5",
        "--set",
        "limits.key_package_fetch_per_target_per_min=1",
    ]);
    let (v1_key, v2_key) = (identity(), identity());
    let _victim1 = raw(&h, "victim1", &v1_key).await;
    let _victim2 = raw(&h, "victim2", &v2_key).await;
    let mallory = raw(&h, "mallory", &identity()).await;
    for _ in 0..3 {
        fetch_kp(&mallory, &v1_key).await.unwrap();
    }
    let (s, e) = refusal("4th by mallory", fetch_kp(&mallory, &v1_key).await);
    assert_eq!(s, Status::RateLimited);
    assert!(e.message.contains("from your account") && e.retry_after_ms > 0, "{e:?}");
    let (s, _) = refusal("another target", fetch_kp(&mallory, &v2_key).await);
    assert_eq!(s, Status::RateLimited, "the limit is per requester, whatever the target");

    // Two other users share victim2's bucket: five fetches in all, then refused.
    let eve1 = raw(&h, "eve1", &identity()).await;
    let eve2 = raw(&h, "eve2", &identity()).await;
    for _ in 0..3 {
        fetch_kp(&eve1, &v2_key).await.unwrap();
    }
    for _ in 0..2 {
        fetch_kp(&eve2, &v2_key).await.unwrap();
    }
    let (s, e) = refusal("6th of victim2's", fetch_kp(&eve2, &v2_key).await);
    assert_eq!(s, Status::RateLimited);
    assert!(e.message.contains("of this user's packages") && e.retry_after_ms > 0, "{e:?}");
    // eve2 still has a token of her own for someone else.
    fetch_kp(&eve2, &v1_key).await.unwrap();
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_budget_answers_unavailable_and_keeps_a_tail_for_handshakes() {
    // 10,000 bytes: application messages and blobs up to 9,000.
    let mut h = TempServer::start(&["--set", "limits.disk_budget_bytes=10000"]);
    let (alice, bob_key) = (raw(&h, "alice", &identity()).await, identity());
    let _bob = raw(&h, "bob", &bob_key).await;
    for _ in 0..4 {
        alice.enqueue(&bob_key, &[1; 2000], message_id()).await.unwrap();
    }
    let (s, e) = refusal("past 90 %", alice.enqueue(&bob_key, &[1; 2000], message_id()).await);
    assert_eq!(s, Status::Unavailable);
    assert!(e.message.contains("storage budget") && e.retry_after_ms > 0, "{e:?}");
    let batch = v1::BatchEnqueueRequest {
        recipient_keys: vec![bob_key.to_vec()],
        payload: vec![1; 2000],
        message_id: message_id().to_vec(),
        ..Default::default()
    };
    let (s, _) = refusal(
        "batch",
        alice.call::<_, v1::BatchEnqueueResponse>(method::BATCH_ENQUEUE, &batch).await,
    );
    assert_eq!(s, Status::Unavailable);
    let blob = v1::UploadBlobRequest {
        blob_id: vec![9; 32],
        total_size: 2000,
        offset: 0,
        chunk: vec![],
        media_type: String::new(),
    };
    let r = alice.call::<_, v1::UploadBlobResponse>(method::UPLOAD_BLOB, &blob).await;
    assert_eq!(refusal("blob", r).0, Status::Unavailable);
    // A Welcome still fits in the last 10 %.
    let welcome = [&[0u8, 1, 0, 3][..], &[5; 1500]].concat();
    alice.enqueue(&bob_key, &welcome, message_id()).await.unwrap();
    h.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_no_queue_takes_is_dropped_not_merged() {
    // bob's queue takes two messages and one handshake message beyond them.
    let mut h = TempServer::start(&[
        "--set",
        "limits.max_queue_messages=2",
        "--set",
        "limits.handshake_reserve_messages=1",
        // No per-sender shares in the way here (a share of so small a queue is one message).
        "--set",
        "limits.queue_sender_share_percent=100",
        // Six accounts register from one address.
        "--set",
        "limits.auth_per_ip_burst=100",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut alice = account(&h, dir.path(), "alice").await;
    let mut bob = account(&h, dir.path(), "bob").await;
    let team = alice.create_group("team").await.unwrap();
    alice.add_members(&team, &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let bob_key = bob.identity_key();
    bob.disconnect().await;
    let before = alice.group_info(&team).await.unwrap();

    // Flooders fill his queue and his reserve (junk and junk labelled as commits) ...
    let fake_commit = [&[0u8, 1, 0, 2, 1, 7][..], &[0; 8], &[3], &[9; 40]].concat();
    for n in 0..3 {
        let flooder = raw(&h, &format!("flooder{n}"), &identity()).await;
        for payload in [&b"junk"[..], &fake_commit] {
            let _ = flooder.enqueue(&bob_key, payload, message_id()).await;
        }
    }
    // ... until not even a message labelled as a commit gets in.
    let last = raw(&h, "flooder-last", &identity()).await;
    refusal("a commit into a full queue", last.enqueue(&bob_key, &fake_commit, message_id()).await);

    // alice's rotation reaches no one: it is reported and dropped, never merged.
    let mut events = alice.subscribe();
    let err = alice.rotate_keys(&team).await.unwrap_err();
    assert!(err.to_string().contains("dropped"), "{err}");
    assert!(rejections(&mut events).iter().any(|r| r.contains("not delivered to bob")));
    let after = alice.group_info(&team).await.unwrap();
    assert_eq!((after.epoch, &after.verification_code), (before.epoch, &before.verification_code));
    assert_eq!(alice.outbox_len().unwrap(), 0);

    // Once bob drains his queue, the next change reaches him and both stay in step.
    bob.sync().await.unwrap();
    alice.rotate_keys(&team).await.unwrap();
    let mut alice_events = alice.subscribe();
    alice.send_text(&team, "in step").await.unwrap();
    let mut bob_events = bob.subscribe();
    bob.sync().await.unwrap();
    assert_eq!(
        texts(&bob, &team).last().map(String::as_str),
        Some("in step"),
        "alice: {:?} bob: {:?}",
        rejections(&mut alice_events),
        rejections(&mut bob_events)
    );
    let (a, b) = (alice.group_info(&team).await.unwrap(), bob.group_info(&team).await.unwrap());
    assert_eq!((a.epoch, a.verification_code), (b.epoch, b.verification_code));
    h.assert_alive();
}
