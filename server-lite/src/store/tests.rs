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

const LIMITS: QueueLimits =
    QueueLimits { max_messages: 1000, max_bytes: 1 << 20, dedup_window_ms: 60_000 };

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
    }
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
