use std::sync::Arc;

use sha2::Digest;

use super::*;
use crate::store::accounts::SessionInfo;

fn open(dir: &Path) -> Store {
    // A store dropped just before may still be closing on its writer thread.
    for _ in 0..100 {
        match Store::open(&dir.join("t.redb"), &dir.join("blobs"), 1 << 20) {
            Ok(s) => return s,
            Err(StoreError::Locked) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
    panic!("database stayed locked");
}

const LIMITS: QueueLimits = QueueLimits::quota_only(1000, 1 << 20, 60_000);
/// The sender of [`item`]s.
const SENDER: [u8; 32] = [0xEE; 32];

async fn user(store: &Store, name: &str, id: u8) -> [u8; 32] {
    let identity = [id; 32];
    let r = store.register(name.into(), identity, vec![1, 2, 3], None, 1).await.unwrap();
    assert_eq!(r, RegisterOutcome::Created);
    identity
}

fn item(to: [u8; 32], payload: &[u8], mid: Option<u8>, expires_ms: u64) -> EnqueueItem {
    EnqueueItem {
        recipient: to,
        channel: Vec::new(),
        message_id: mid.map(|m| vec![m; 16]).unwrap_or_default(),
        payload: Arc::new(payload.to_vec()),
        expires_ms,
        sender: SENDER,
        handshake: false,
    }
}

fn from(sender: u8, to: [u8; 32], payload: &[u8], handshake: bool) -> EnqueueItem {
    EnqueueItem { sender: [sender; 32], handshake, ..item(to, payload, None, u64::MAX) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_share_commits_and_get_unique_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = user(&store, "bob", 2).await;
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let out = s.enqueue(vec![item(bob, &i.to_be_bytes(), None, u64::MAX)], LIMITS, 1).await;
            match out.unwrap()[0] {
                EnqueueOutcome::Stored { seq, duplicate: false } => seq,
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    assert_eq!(store.queued_count(&bob).unwrap(), 200);
    let all = store.fetch(&queue_key(&bob, &[]), 500, usize::MAX, 0).unwrap();
    assert_eq!(all.len(), 200);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test]
async fn data_survives_reopen_and_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let bob = user(&store, "bob", 2).await;
        store.enqueue(vec![item(bob, b"kept", Some(1), u64::MAX)], LIMITS, 1).await.unwrap();
    }
    {
        let store = open(dir.path());
        assert_eq!(store.login_record("bob").unwrap().unwrap().identity, [2; 32]);
        let q = store.fetch(&queue_key(&[2; 32], &[]), 10, usize::MAX, 0).unwrap();
        assert_eq!(q[0].payload, b"kept");
        store
            .write(|txn| {
                txn.open_table(META)?.insert("schema_version", 99u32.to_be_bytes().as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
    }
    let mut result = Err(StoreError::Locked);
    for _ in 0..100 {
        result = Store::open(&dir.path().join("t.redb"), &dir.path().join("blobs"), 1 << 20);
        if !matches!(result, Err(StoreError::Locked)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(matches!(result, Err(StoreError::TooNew { found: 99, supported: SCHEMA_VERSION })));
}

#[tokio::test]
async fn queue_limits_dedup_and_ack_keep_usage_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = user(&store, "bob", 2).await;
    let tight = QueueLimits { max_messages: 2, max_bytes: 10, ..LIMITS };
    let out = store
        .enqueue(
            vec![
                item(bob, b"12345", Some(1), u64::MAX),
                item(bob, b"12345", Some(1), u64::MAX),
                item(bob, b"123456", Some(2), u64::MAX),
                item(bob, b"1", Some(3), u64::MAX),
                item([9; 32], b"1", None, u64::MAX),
            ],
            tight,
            1,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            EnqueueOutcome::Stored { seq: 1, duplicate: false },
            EnqueueOutcome::Stored { seq: 1, duplicate: true },
            EnqueueOutcome::QueueFull,
            EnqueueOutcome::Stored { seq: 2, duplicate: false },
            EnqueueOutcome::UnknownRecipient,
        ]
    );
    assert_eq!(store.queued_count(&bob).unwrap(), 2);
    assert_eq!(store.ack(bob, queue_key(&bob, &[]), 1).await.unwrap(), 1);
    assert_eq!(store.queued_count(&bob).unwrap(), 1);
    let again =
        store.enqueue(vec![item(bob, b"123456", Some(2), u64::MAX)], tight, 1).await.unwrap();
    assert_eq!(again, vec![EnqueueOutcome::Stored { seq: 3, duplicate: false }]);
}

fn file_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("t.redb")).unwrap()
}

#[tokio::test]
async fn sweep_expires_what_is_due_and_writes_nothing_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = user(&store, "bob", 2).await;
    store
        .enqueue(
            vec![item(bob, b"short", Some(1), 1_000), item(bob, b"long", Some(2), 1_000_000)],
            QueueLimits { dedup_window_ms: 5_000, ..LIMITS },
            500,
        )
        .await
        .unwrap();
    let session =
        SessionInfo { identity: bob, username: "bob".into(), device_id: vec![], last_used_ms: 0 };
    store.create_session([5; 32], session, 100).await.unwrap();

    let before = file_bytes(dir.path());
    let idle = store.sweep(999, 1_000_000).await.unwrap();
    assert_eq!(idle, SweepReport::default());
    assert_eq!(file_bytes(dir.path()), before, "nothing due: not a byte written");

    let r = store.sweep(1_000, 1_000_000).await.unwrap();
    assert_eq!((r.messages, r.dedup), (1, 0));
    assert_eq!(store.queued_count(&bob).unwrap(), 1);
    let r = store.sweep(6_000, 1_000).await.unwrap();
    assert_eq!((r.messages, r.dedup, r.sessions), (0, 2, 1));
    assert!(matches!(store.session(&[5; 32]).unwrap(), ResumeOutcome::Unknown));
    // The dedup record is gone, so the same id is a new message now.
    let out = store.enqueue(vec![item(bob, b"x", Some(1), u64::MAX)], LIMITS, 7_000).await.unwrap();
    assert_eq!(out, vec![EnqueueOutcome::Stored { seq: 3, duplicate: false }]);
}

#[tokio::test]
async fn delete_account_removes_only_that_user() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = user(&store, "alice", 1).await;
    let bob = user(&store, "bob", 2).await;
    for to in [alice, bob] {
        store.enqueue(vec![item(to, b"m", Some(to[0]), 10_000)], LIMITS, 1).await.unwrap();
        store.upload_key_package(to, vec![0, 1, 0xF0, 1], 10).await.unwrap();
        store.set_hybrid_key(to, vec![to[0]; 4]).await.unwrap();
        let info = SessionInfo {
            identity: to,
            username: String::new(),
            device_id: vec![],
            last_used_ms: 1,
        };
        store.create_session([to[0]; 32], info, 1).await.unwrap();
    }
    store.delete_account(bob).await.unwrap();
    assert!(store.login_record("bob").unwrap().is_none());
    assert!(store.username_of(&bob).unwrap().is_none());
    assert_eq!(store.queued_count(&bob).unwrap(), 0);
    assert!(store.fetch(&queue_key(&bob, &[]), 10, usize::MAX, 0).unwrap().is_empty());
    assert_eq!(store.key_package_stock(&bob).unwrap(), 0);
    assert!(store.hybrid_key(&bob).unwrap().is_none());
    assert!(matches!(store.session(&[2; 32]).unwrap(), ResumeOutcome::Unknown));
    // Alice is untouched.
    assert_eq!(store.queued_count(&alice).unwrap(), 1);
    assert_eq!(store.key_package_stock(&alice).unwrap(), 1);
    assert!(matches!(store.session(&[1; 32]).unwrap(), ResumeOutcome::Valid(_)));
    // No expiry entry of bob's is left for the sweep to trip over.
    let r = store.sweep(20_000, u64::MAX).await.unwrap();
    assert_eq!(r.messages, 1, "only alice's message expires");
}

#[tokio::test]
async fn a_discarded_upload_leaves_no_expiry_that_could_hit_a_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = user(&store, "alice", 1).await;
    let limits = BlobLimits {
        max_blob_bytes: 100,
        quota_bytes: 1000,
        ttl_ms: 1_000_000,
        incomplete_ttl_ms: 1_000,
        disk_bytes: u64::MAX,
    };
    let content = b"hello".to_vec();
    let id: [u8; 32] = sha2::Sha256::digest(&content).into();
    let up = |bytes: Vec<u8>, now| {
        let store = store.clone();
        async move {
            store
                .upload_blob_chunk(alice, id, 5, 0, bytes, String::new(), limits, now)
                .await
                .unwrap()
        }
    };
    assert_eq!(up(b"HELLO".to_vec(), 10).await, UploadOutcome::HashMismatch);
    assert_eq!(up(content.clone(), 500).await, UploadOutcome::Complete);
    // The first attempt's one-day expiry (at 1010) has passed; the good blob must stay.
    let r = store.sweep(2_000, u64::MAX).await.unwrap();
    assert_eq!(r.blobs, 0);
    assert_eq!(store.download_blob(id, 0, 10).await.unwrap().unwrap().chunk, content);
    let r = store.sweep(1_000_500, u64::MAX).await.unwrap();
    assert_eq!(r.blobs, 1);
    assert!(store.download_blob(id, 0, 10).await.unwrap().is_none());
}

#[tokio::test]
async fn one_sender_gets_a_share_and_handshakes_get_a_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = user(&store, "bob", 2).await;
    // 8 messages of quota, 2 per sender; a reserve of 2 handshake messages, 1 per sender.
    let limits = QueueLimits {
        sender_messages: 2,
        sender_bytes: 1 << 20,
        reserve_messages: 2,
        reserve_bytes: 1 << 20,
        sender_reserve_messages: 1,
        sender_reserve_bytes: 1 << 20,
        ..QueueLimits::quota_only(8, 1 << 20, 60_000)
    };
    let send = |sender: u8, handshake: bool| {
        let store = store.clone();
        async move {
            let out = store.enqueue(vec![from(sender, bob, b"m", handshake)], limits, 1).await;
            out.unwrap()[0]
        }
    };
    let stored = |o: EnqueueOutcome| matches!(o, EnqueueOutcome::Stored { duplicate: false, .. });
    // A flood from one sender stops at its share, application or (labelled) handshake. The
    // message stored while the queue held less than half a share is not counted against it:
    // a sender gets at most one and a half shares.
    assert!(stored(send(1, false).await));
    assert!(stored(send(1, false).await));
    assert!(stored(send(1, false).await));
    assert_eq!(send(1, false).await, EnqueueOutcome::SenderShare);
    // ... though its handshake messages may still use its share of the reserve.
    assert!(stored(send(1, true).await));
    assert_eq!(send(1, true).await, EnqueueOutcome::SenderShare);
    assert_eq!(store.sender_usage(&bob, &[1; 32]).unwrap(), (2, 2, 1, 1));
    // Three more senders fill the queue (3 + 2 + 2 + 1 = 8).
    for s in 2..=3 {
        assert!(stored(send(s, false).await));
        assert!(stored(send(s, false).await));
    }
    assert!(stored(send(4, false).await));
    assert_eq!(send(5, false).await, EnqueueOutcome::QueueFull);
    // A commit or Welcome from another member still gets in, once per sender, while the
    // reserve lasts.
    assert!(stored(send(5, true).await));
    assert_eq!(send(6, true).await, EnqueueOutcome::QueueFull, "the reserve is full");
    assert_eq!(store.queued_count(&bob).unwrap(), 8);
    assert_eq!(store.stored_bytes().unwrap(), 10);
    // Everything fetched and acked: every counter back at zero, no sender row left.
    let qk = queue_key(&bob, &[]);
    assert_eq!(store.ack(bob, qk, u64::MAX).await.unwrap(), 10);
    assert_eq!(store.queued_count(&bob).unwrap(), 0);
    assert_eq!(store.stored_bytes().unwrap(), 0);
    for s in 1..=6 {
        assert_eq!(store.sender_usage(&bob, &[s; 32]).unwrap(), (0, 0, 0, 0));
    }
    let rows =
        redb::ReadableTableMetadata::len(&store.read().unwrap().open_table(SENDER_USAGE).unwrap())
            .unwrap();
    assert_eq!(rows, 0);
    assert!(stored(send(1, false).await), "room again");
}

#[tokio::test]
async fn the_disk_budget_counts_queues_and_blobs_and_keeps_a_tail_for_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (alice, bob) = (user(&store, "alice", 1).await, user(&store, "bob", 2).await);
    let limits = QueueLimits { disk_bytes: 10, disk_handshake_bytes: 14, ..LIMITS };
    let batch = |n: usize, payload: &'static [u8], handshake: bool, mid: u8| {
        let store = store.clone();
        async move {
            let items = [alice, bob][..n]
                .iter()
                .map(|to| EnqueueItem { handshake, ..item(*to, payload, Some(mid), u64::MAX) })
                .collect();
            store.enqueue(items, limits, 1).await.unwrap()
        }
    };
    let ok = |seq| EnqueueOutcome::Stored { seq, duplicate: false };
    assert_eq!(batch(2, b"1234", false, 1).await, vec![ok(1), ok(1)]);
    assert_eq!(store.stored_bytes().unwrap(), 8);
    // 8 + 2 x 2 > 10: the whole batch is refused, nothing of it stored ...
    assert_eq!(
        batch(2, b"12", false, 2).await,
        vec![EnqueueOutcome::StorageFull, EnqueueOutcome::StorageFull]
    );
    assert_eq!(store.stored_bytes().unwrap(), 8);
    assert_eq!(store.queued_count(&alice).unwrap(), 1);
    // ... a retry of what was stored is still a duplicate ...
    assert_eq!(
        batch(2, b"1234", false, 1).await,
        vec![EnqueueOutcome::Stored { seq: 1, duplicate: true }; 2]
    );
    // ... one that fits goes in, and handshakes have the tail to themselves.
    assert_eq!(batch(1, b"12", false, 3).await, vec![ok(2)]);
    assert_eq!(batch(1, b"x", false, 4).await, vec![EnqueueOutcome::StorageFull]);
    assert_eq!(batch(2, b"12", true, 5).await, vec![ok(3), ok(2)]);
    assert_eq!(store.stored_bytes().unwrap(), 14);
    // Blobs count against the same budget (from their first chunk) and give it back.
    store.ack(alice, queue_key(&alice, &[]), u64::MAX).await.unwrap();
    assert_eq!(store.stored_bytes().unwrap(), 6);
    let content = b"hello".to_vec();
    let id: [u8; 32] = sha2::Sha256::digest(&content).into();
    let blob = |disk_bytes| BlobLimits {
        max_blob_bytes: 100,
        quota_bytes: 1000,
        ttl_ms: 1_000,
        incomplete_ttl_ms: 1_000,
        disk_bytes,
    };
    let up = store.upload_blob_chunk(alice, id, 5, 0, vec![], String::new(), blob(10), 1).await;
    assert_eq!(up.unwrap(), UploadOutcome::StorageFull);
    let up = store.upload_blob_chunk(alice, id, 5, 0, content, String::new(), blob(11), 1).await;
    assert_eq!(up.unwrap(), UploadOutcome::Complete);
    assert_eq!(store.stored_bytes().unwrap(), 11);
    store.sweep(5_000, u64::MAX).await.unwrap();
    assert_eq!(store.stored_bytes().unwrap(), 6, "the expired blob gave its bytes back");
    // Deleting bob takes his queued bytes with him.
    store.delete_account(bob).await.unwrap();
    assert_eq!(store.stored_bytes().unwrap(), 0);
}

#[tokio::test]
async fn a_schema_1_database_migrates_and_its_records_still_count() {
    let dir = tempfile::tempdir().unwrap();
    let bob;
    {
        let store = open(dir.path());
        bob = user(&store, "bob", 2).await;
        // Write what schema 1 wrote: a queued message without sender, 24-byte usage, no
        // stored-bytes counter, version 1.
        store
            .write(move |txn| {
                let old = records::Queued {
                    expires_ms: u64::MAX,
                    enqueued_ms: 1,
                    message_id: vec![],
                    payload: b"from v0.1".to_vec(),
                    sender: None,
                    reserve: false,
                };
                let mut bytes = old.encode();
                bytes.truncate(bytes.len() - 5); // no sender field, no reserve flag
                let qk = queue_key(&bob, &[]);
                txn.open_table(QUEUES)?.insert((qk.as_slice(), 1u64), bytes.as_slice())?;
                txn.open_table(QUEUE_NEXT)?.insert(qk.as_slice(), 2u64)?;
                let usage = codec::Enc::default().u64(1).u64(9).u64(0).done();
                txn.open_table(USAGE)?.insert(bob.as_slice(), usage.as_slice())?;
                let mut meta = txn.open_table(META)?;
                meta.remove(STORED_BYTES)?;
                meta.insert("schema_version", 1u32.to_be_bytes().as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.meta("schema_version").unwrap().unwrap(), SCHEMA_VERSION.to_be_bytes());
    assert_eq!(store.stored_bytes().unwrap(), 9, "the counter starts from the users' usage");
    let q = store.fetch(&queue_key(&bob, &[]), 10, usize::MAX, 0).unwrap();
    assert_eq!(q[0].payload, b"from v0.1");
    let out = store.enqueue(vec![item(bob, b"new", None, u64::MAX)], LIMITS, 1).await.unwrap();
    assert_eq!(out, vec![EnqueueOutcome::Stored { seq: 2, duplicate: false }]);
    assert_eq!(store.ack(bob, queue_key(&bob, &[]), 2).await.unwrap(), 2);
    assert_eq!(store.queued_count(&bob).unwrap(), 0);
    assert_eq!(store.stored_bytes().unwrap(), 0);
    assert_eq!(store.sender_usage(&bob, &SENDER).unwrap(), (0, 0, 0, 0));
}

#[tokio::test]
async fn the_last_resort_is_handed_out_only_when_the_stock_is_empty_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = user(&store, "bob", 2).await;
    assert!(store.pop_key_package(bob).await.unwrap().package.is_none());
    store.upload_key_package(bob, b"one".to_vec(), 10).await.unwrap();
    store.set_last_resort_key_package(bob, b"last".to_vec()).await.unwrap();
    assert!(store.has_fresh_last_resort(&bob).unwrap());
    let p = store.pop_key_package(bob).await.unwrap();
    assert_eq!((p.package.as_deref(), p.last_resort), (Some(&b"one"[..]), false));
    for _ in 0..3 {
        let p = store.pop_key_package(bob).await.unwrap();
        assert_eq!(
            (p.package.as_deref(), p.last_resort, p.remaining),
            (Some(&b"last"[..]), true, 0)
        );
    }
    assert!(!store.has_fresh_last_resort(&bob).unwrap(), "its owner should replace it");
    assert_eq!(store.key_package_stock(&bob).unwrap(), 0, "not part of the stock");
    store.set_last_resort_key_package(bob, b"newer".to_vec()).await.unwrap();
    assert!(store.has_fresh_last_resort(&bob).unwrap());
    assert_eq!(store.pop_key_package(bob).await.unwrap().package.unwrap(), b"newer");
    store.delete_account(bob).await.unwrap();
    assert!(store.pop_key_package(bob).await.unwrap().package.is_none());
}
