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
    let idle = store.sweep(999, 1_000_000, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!(idle, SweepReport::default());
    assert_eq!(file_bytes(dir.path()), before, "nothing due: not a byte written");

    let r = store.sweep(1_000, 1_000_000, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.messages, r.dedup), (1, 0));
    assert_eq!(store.queued_count(&bob).unwrap(), 1);
    let r = store.sweep(6_000, 1_000, SLOT_LIMITS.ttl_ms).await.unwrap();
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
    let r = store.sweep(20_000, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
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
    let r = store.sweep(2_000, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!(r.blobs, 0);
    assert_eq!(store.download_blob(id, 0, 10).await.unwrap().unwrap().chunk, content);
    let r = store.sweep(1_000_500, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
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
    store.sweep(5_000, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
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

/// A payload whose clear MLS header says commit (`qpq_core::keypackage::is_commit`): an
/// `MLSMessage` v1 `PrivateMessage`, group "g", epoch 7, content type 3, empty AAD, padded
/// with `fill` to `len` bytes.
pub(crate) fn commit(fill: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0, 1, 0, 2, 1, b'g'];
    p.extend_from_slice(&7u64.to_be_bytes());
    p.extend_from_slice(&[3, 0]);
    p.resize(len.max(p.len()), fill);
    assert!(qpq_core::keypackage::is_commit(&p));
    p
}

const SLOT_LIMITS: SlotLimits = SlotLimits {
    max_claims: 1024,
    max_open_claims: 1024,
    max_open_claim_bytes: 1 << 20,
    ttl_ms: 1_000,
};

fn claim(slot: u8, claimer: [u8; 32], mid: u8, payload: &[u8], to: &[[u8; 32]]) -> SlotClaim {
    let payload = Arc::new(payload.to_vec());
    SlotClaim {
        slot: [slot; 16],
        claimer,
        message_id: [mid; 16],
        payload: payload.clone(),
        items: to
            .iter()
            .map(|r| EnqueueItem {
                recipient: *r,
                channel: Vec::new(),
                message_id: vec![mid; 16],
                payload: payload.clone(),
                expires_ms: u64::MAX,
                sender: claimer,
                handshake: true,
            })
            .collect(),
    }
}

fn table_len<K: redb::Key + 'static, V: redb::Value + 'static>(
    store: &Store,
    def: redb::TableDefinition<'_, K, V>,
) -> u64 {
    redb::ReadableTableMetadata::len(&store.read().unwrap().open_table(def).unwrap()).unwrap()
}

#[tokio::test]
async fn slot_claims_are_first_come_deduplicated_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = user(&store, "alice", 1).await;
    let bob = user(&store, "bob", 2).await;
    let carol = user(&store, "carol", 3).await;
    let limits = SlotLimits { max_claims: 2, ..SLOT_LIMITS };
    let run = |c: SlotClaim| {
        let store = store.clone();
        async move { store.claim_slot(c, LIMITS, limits, 100).await.unwrap() }
    };
    let (a, b) = (commit(0xA, 20), commit(0xB, 30));
    let stored = |seq| EnqueueOutcome::Stored { seq, duplicate: false };
    assert_eq!(
        run(claim(7, alice, 1, &a, &[bob, carol])).await,
        ClaimOutcome::Claimed { position: 0, total: 1, outcomes: vec![stored(1), stored(1)] }
    );
    assert_eq!(
        run(claim(7, bob, 2, &b, &[alice, carol])).await,
        ClaimOutcome::Claimed { position: 1, total: 2, outcomes: vec![stored(1), stored(2)] }
    );
    let all = store.fetch_slot(&[7; 16], 0, 100, usize::MAX, 100).unwrap();
    assert_eq!(all, SlotClaims { claims: vec![a.clone(), b.clone()], total: 2 });
    // 2 x 20 + 2 x 30 queued, and a copy of each in the slot.
    assert_eq!(store.stored_bytes().unwrap(), 150);
    // A retry is a duplicate: nothing enqueued again, nothing written.
    assert_eq!(
        run(claim(7, alice, 1, &a, &[bob, carol])).await,
        ClaimOutcome::Duplicate { position: 0, total: 2 }
    );
    assert_eq!(store.queued_count(&bob).unwrap(), 1);
    assert_eq!(store.queued_count(&carol).unwrap(), 2);
    // Another commit from the same account in the same slot is refused, naming its claim.
    assert_eq!(
        run(claim(7, alice, 3, &commit(0xC, 20), &[bob, carol])).await,
        ClaimOutcome::AlreadyClaimed { position: 0, total: 2 }
    );
    assert_eq!(store.queued_count(&bob).unwrap(), 1);
    // The slot is full at two claims.
    assert_eq!(
        run(claim(7, carol, 4, &commit(0xD, 20), &[alice, bob])).await,
        ClaimOutcome::SlotFull { total: 2 }
    );
    assert_eq!(store.queued_count(&alice).unwrap(), 1);
    assert_eq!(store.stored_bytes().unwrap(), 150);
    assert_eq!(
        (store.open_claims(&alice).unwrap(), store.open_claims(&bob).unwrap()),
        ((1, 20), (1, 30))
    );
    assert_eq!(store.open_claims(&carol).unwrap(), (0, 0));
    // Another slot is another list.
    assert_eq!(
        run(claim(8, carol, 4, &commit(0xD, 20), &[alice])).await,
        ClaimOutcome::Claimed { position: 0, total: 1, outcomes: vec![stored(2)] }
    );
    assert_eq!(store.fetch_slot(&[7; 16], 0, 100, usize::MAX, 100).unwrap().total, 2);
    assert_eq!(store.fetch_slot(&[9; 16], 0, 100, usize::MAX, 100).unwrap().total, 0);
}

#[tokio::test]
async fn open_claims_are_bounded_and_an_undelivered_claim_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = user(&store, "alice", 1).await;
    let bob = user(&store, "bob", 2).await;
    let limits = SlotLimits { max_open_claims: 2, ..SLOT_LIMITS };
    let run = |c: SlotClaim| {
        let store = store.clone();
        async move { store.claim_slot(c, LIMITS, limits, 100).await.unwrap() }
    };
    let p = commit(0, 10);
    // Nobody stored it: not in the slot, not counted.
    assert_eq!(
        run(claim(1, alice, 1, &p, &[[9; 32], [8; 32]])).await,
        ClaimOutcome::NotDelivered {
            total: 0,
            outcomes: vec![EnqueueOutcome::UnknownRecipient; 2]
        }
    );
    // A queue that is full (no reserve at all here) refuses it too.
    let full = QueueLimits { max_messages: 0, ..LIMITS };
    assert_eq!(
        store.claim_slot(claim(1, alice, 1, &p, &[bob]), full, limits, 100).await.unwrap(),
        ClaimOutcome::NotDelivered { total: 0, outcomes: vec![EnqueueOutcome::QueueFull] }
    );
    assert_eq!(store.fetch_slot(&[1; 16], 0, 100, usize::MAX, 100).unwrap().total, 0);
    assert_eq!(table_len(&store, SLOTS), 0);
    assert_eq!(store.open_claims(&alice).unwrap(), (0, 0));
    assert_eq!(store.stored_bytes().unwrap(), 0);
    // One recipient of two is enough.
    assert!(matches!(
        run(claim(1, alice, 1, &p, &[[9; 32], bob])).await,
        ClaimOutcome::Claimed { position: 0, total: 1, .. }
    ));
    assert!(matches!(run(claim(2, alice, 2, &p, &[bob])).await, ClaimOutcome::Claimed { .. }));
    // Two commits of 16 bytes (`commit` pads to its header's length at least).
    assert_eq!(store.open_claims(&alice).unwrap(), (2, 32));
    assert_eq!(run(claim(3, alice, 3, &p, &[bob])).await, ClaimOutcome::TooManyOpenClaims);
    assert_eq!(store.queued_count(&bob).unwrap(), 2, "the refused claim was not enqueued");
    // A repeat of a claim held is still answered.
    assert_eq!(
        run(claim(2, alice, 2, &p, &[bob])).await,
        ClaimOutcome::Duplicate { position: 0, total: 1 }
    );
    // Another account is not limited by alice's claims.
    assert!(matches!(run(claim(3, bob, 3, &p, &[alice])).await, ClaimOutcome::Claimed { .. }));
}

#[tokio::test]
async fn the_slot_copy_is_charged_with_the_queued_copies_and_the_claim_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = user(&store, "alice", 1).await;
    let bob = user(&store, "bob", 2).await;
    let p = commit(0, 20);
    let c = claim(1, alice, 1, &p, &[bob, [9; 32]]);
    // The slot's copy (20) and bob's queued copy (20) must fit the handshake ceiling together;
    // the application ceiling does not hold group changes back (a disk full of chat).
    let tight = QueueLimits { disk_bytes: 0, disk_handshake_bytes: 39, ..LIMITS };
    assert_eq!(
        store.claim_slot(c.clone(), tight, SLOT_LIMITS, 100).await.unwrap(),
        ClaimOutcome::StorageFull
    );
    assert_eq!(store.stored_bytes().unwrap(), 0);
    assert_eq!(store.queued_count(&bob).unwrap(), 0);
    assert_eq!(table_len(&store, SLOTS), 0);
    assert_eq!(store.open_claims(&alice).unwrap(), (0, 0));
    let room = QueueLimits { disk_bytes: 0, disk_handshake_bytes: 40, ..LIMITS };
    assert!(matches!(
        store.claim_slot(c, room, SLOT_LIMITS, 100).await.unwrap(),
        ClaimOutcome::Claimed { position: 0, total: 1, .. }
    ));
    assert_eq!(store.stored_bytes().unwrap(), 40);
    // Already queued everywhere (a BatchEnqueue with the same id, say), the slot copy alone
    // must still fit.
    store.enqueue(claim(2, bob, 2, &p, &[alice]).items, LIMITS, 100).await.unwrap();
    let stored = store.stored_bytes().unwrap();
    let budget = QueueLimits { disk_bytes: 0, disk_handshake_bytes: stored + 19, ..LIMITS };
    assert_eq!(
        store.claim_slot(claim(2, bob, 2, &p, &[alice]), budget, SLOT_LIMITS, 100).await.unwrap(),
        ClaimOutcome::StorageFull
    );
    let budget = QueueLimits { disk_bytes: 0, disk_handshake_bytes: stored + 20, ..LIMITS };
    assert_eq!(
        store.claim_slot(claim(2, bob, 2, &p, &[alice]), budget, SLOT_LIMITS, 100).await.unwrap(),
        ClaimOutcome::Claimed {
            position: 0,
            total: 1,
            outcomes: vec![EnqueueOutcome::Stored { seq: 1, duplicate: true }]
        }
    );
    assert_eq!(store.stored_bytes().unwrap(), stored + 20);
}

#[tokio::test]
async fn open_claim_bytes_are_bounded_per_account_and_given_back_by_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = user(&store, "alice", 1).await;
    let bob = user(&store, "bob", 2).await;
    let limits = SlotLimits { max_open_claim_bytes: 100, ..SLOT_LIMITS };
    let at = |c: SlotClaim, now: u64| {
        let store = store.clone();
        async move { store.claim_slot(c, LIMITS, limits, now).await.unwrap() }
    };
    let claimed = |o: &ClaimOutcome| matches!(o, ClaimOutcome::Claimed { .. });
    assert!(claimed(&at(claim(1, alice, 1, &commit(1, 60), &[bob]), 100).await));
    assert!(claimed(&at(claim(2, alice, 2, &commit(2, 40), &[bob]), 200).await));
    assert_eq!(store.open_claims(&alice).unwrap(), (2, 100));
    // One byte more than the limit: refused before anything is enqueued or stored.
    let stored = store.stored_bytes().unwrap();
    assert_eq!(
        at(claim(3, alice, 3, &commit(3, 16), &[bob]), 300).await,
        ClaimOutcome::TooManyOpenClaimBytes
    );
    assert_eq!(store.queued_count(&bob).unwrap(), 2);
    assert_eq!(store.stored_bytes().unwrap(), stored);
    assert_eq!(store.fetch_slot(&[3; 16], 0, 100, usize::MAX, 300).unwrap().total, 0);
    // The queues being acked changes nothing: the slot copies are what is counted.
    store.ack(bob, queue_key(&bob, &[]), u64::MAX).await.unwrap();
    assert_eq!(
        at(claim(3, alice, 3, &commit(3, 16), &[bob]), 300).await,
        ClaimOutcome::TooManyOpenClaimBytes
    );
    // Other accounts have their own.
    assert!(claimed(&at(claim(3, bob, 4, &commit(3, 100), &[alice]), 300).await));
    // The sweep closes slot 1 and gives its 60 bytes back.
    let r = store.sweep(1_100, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims), (1, 1));
    assert_eq!(store.open_claims(&alice).unwrap(), (1, 40));
    assert!(claimed(&at(claim(3, alice, 3, &commit(3, 60), &[bob]), 1_100).await));
    assert_eq!(store.open_claims(&alice).unwrap(), (2, 100));
    let r = store.sweep(10_000, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims), (2, 3));
    assert_eq!(store.open_claims(&alice).unwrap(), (0, 0));
    assert_eq!(store.open_claims(&bob).unwrap(), (0, 0));
    assert_eq!(table_len(&store, CLAIM_USAGE), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_slot_pages_in_claim_order_by_count_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = user(&store, "bob", 2).await;
    // 150 claimers at once (group commits): each position is given once, and the slot reads
    // back in position order.
    let mut tasks = Vec::new();
    for i in 0..150u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut claimer = [0u8; 32];
            claimer[..4].copy_from_slice(&i.to_be_bytes());
            let mut p = commit(i as u8, 100);
            p.extend_from_slice(&i.to_be_bytes());
            let c = claim(5, claimer, i as u8, &p, &[bob]);
            let out = store.claim_slot(c, LIMITS, SLOT_LIMITS, 100).await;
            match out.unwrap() {
                ClaimOutcome::Claimed { position, .. } => (position, p),
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut expected = Vec::new();
    for t in tasks {
        expected.push(t.await.unwrap());
    }
    expected.sort();
    assert_eq!(expected.iter().map(|(p, _)| *p).collect::<Vec<_>>(), (0..150).collect::<Vec<_>>());
    let expected: Vec<Vec<u8>> = expected.into_iter().map(|(_, p)| p).collect();
    let slot = [5; 16];
    let page = store.fetch_slot(&slot, 0, 100, usize::MAX, 100).unwrap();
    assert_eq!((page.claims.as_slice(), page.total), (&expected[..100], 150));
    let page = store.fetch_slot(&slot, 100, 100, usize::MAX, 100).unwrap();
    assert_eq!((page.claims.as_slice(), page.total), (&expected[100..], 150));
    for from in [150, 151, u32::MAX] {
        assert_eq!(
            store.fetch_slot(&slot, from, 100, usize::MAX, 100).unwrap(),
            SlotClaims { claims: vec![], total: 150 }
        );
    }
    // 104 bytes each, with the 64 counted per claim: 168 ...
    let page = store.fetch_slot(&slot, 10, 100, 3 * 168 - 1, 100).unwrap();
    assert_eq!(page.claims, &expected[10..12]);
    let page = store.fetch_slot(&slot, 10, 100, 3 * 168, 100).unwrap();
    assert_eq!(page.claims, &expected[10..13]);
    let page = store.fetch_slot(&slot, 10, 7, usize::MAX, 100).unwrap();
    assert_eq!(page.claims, &expected[10..17]);
    // ... and at least one is returned however small the budget.
    let page = store.fetch_slot(&slot, 149, 100, 0, 100).unwrap();
    assert_eq!(page.claims, &expected[149..]);
}

/// The EXPIRY entries of commit slots: (time, slot id).
fn slot_expiries(store: &Store) -> Vec<(u64, Vec<u8>)> {
    let txn = store.read().unwrap();
    let t = txn.open_table(EXPIRY).unwrap();
    let mut out = Vec::new();
    for row in t.iter().unwrap() {
        let (k, _) = row.unwrap();
        let (at, r) = k.value();
        if r.first() == Some(&EXPIRE_SLOT) {
            out.push((at, r[1..].to_vec()));
        }
    }
    out
}

#[tokio::test]
async fn each_claim_extends_its_slot_and_an_expired_slot_is_closed_never_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = user(&store, "alice", 1).await;
    let bob = user(&store, "bob", 2).await;
    let p = commit(0, 20);
    let at = |c: SlotClaim, now: u64| {
        let store = store.clone();
        async move { store.claim_slot(c, LIMITS, SLOT_LIMITS, now).await.unwrap() }
    };
    // Slot 1 lives 1000 ms from its latest claim: 1100, then 1900. Its EXPIRY entry moves.
    assert!(matches!(at(claim(1, alice, 1, &p, &[bob]), 100).await, ClaimOutcome::Claimed { .. }));
    assert_eq!(slot_expiries(&store), vec![(1_100, vec![1; 16])]);
    assert!(matches!(
        at(claim(1, bob, 2, &p, &[alice]), 900).await,
        ClaimOutcome::Claimed { position: 1, total: 2, .. }
    ));
    assert!(matches!(at(claim(2, alice, 3, &p, &[bob]), 500).await, ClaimOutcome::Claimed { .. }));
    assert_eq!(slot_expiries(&store), vec![(1_500, vec![2; 16]), (1_900, vec![1; 16])]);
    assert_eq!(store.stored_bytes().unwrap(), 120, "3 queued copies, 3 slot copies");
    // Past its first claim's lifetime slot 1 is still whole: bob's copy may be read until 1900.
    let whole = SlotClaims { claims: vec![p.clone(), p.clone()], total: 2 };
    assert_eq!(store.fetch_slot(&[1; 16], 0, 100, usize::MAX, 1_500).unwrap(), whole);
    let r = store.sweep(1_100, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!(r, SweepReport::default(), "slot 1's first expiry entry is gone");
    // Slot 2 closes at 1500: its claim goes, a tombstone stays until 2500.
    let r = store.sweep(1_500, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims, r.slot_tombstones, r.messages), (1, 1, 0, 0));
    assert_eq!(store.open_claims(&alice).unwrap(), (1, 20), "her claim in slot 1 is still open");
    assert_eq!(store.stored_bytes().unwrap(), 100, "3 queued copies and slot 1's two");
    assert_eq!(slot_expiries(&store), vec![(1_900, vec![1; 16]), (2_500, vec![2; 16])]);
    let empty = SlotClaims { claims: vec![], total: 0 };
    assert_eq!(store.fetch_slot(&[2; 16], 0, 100, usize::MAX, 1_600).unwrap(), empty);
    // A closed slot takes no claim (not even a retry), and nothing is enqueued for it.
    assert_eq!(at(claim(2, bob, 4, &p, &[alice]), 1_600).await, ClaimOutcome::Closed);
    assert_eq!(at(claim(2, alice, 3, &p, &[bob]), 1_600).await, ClaimOutcome::Closed);
    // Expired but not swept yet: empty, and closed already.
    assert_eq!(store.fetch_slot(&[1; 16], 0, 100, usize::MAX, 1_900).unwrap(), empty);
    let outsider = [7; 32];
    assert_eq!(at(claim(1, outsider, 5, &p, &[bob]), 1_950).await, ClaimOutcome::Closed);
    assert_eq!(store.queued_count(&bob).unwrap(), 2);
    assert_eq!(store.queued_count(&alice).unwrap(), 1);
    assert_eq!(store.stored_bytes().unwrap(), 100);
    let r = store.sweep(2_000, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims, r.slot_tombstones), (1, 2, 0));
    assert_eq!(
        (store.open_claims(&alice).unwrap(), store.open_claims(&bob).unwrap()),
        ((0, 0), (0, 0))
    );
    assert_eq!(table_len(&store, SLOT_CLAIMS) + table_len(&store, SLOT_CLAIMERS), 0);
    assert_eq!(table_len(&store, CLAIM_USAGE), 0, "rows at zero are deleted");
    assert_eq!(table_len(&store, SLOTS), 2, "two tombstones");
    assert_eq!(store.stored_bytes().unwrap(), 60, "the queued copies stay until acked");
    // The tombstone goes after its own lifetime; only then can the id be claimed afresh.
    let r = store.sweep(2_499, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!(r, SweepReport::default());
    assert_eq!(at(claim(2, bob, 4, &p, &[alice]), 2_499).await, ClaimOutcome::Closed);
    let r = store.sweep(2_500, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims, r.slot_tombstones), (0, 0, 1));
    assert!(matches!(
        at(claim(2, bob, 4, &p, &[alice]), 2_600).await,
        ClaimOutcome::Claimed { position: 0, total: 1, .. }
    ));
    assert_eq!(store.open_claims(&bob).unwrap(), (1, 20));
    // A late sweep closes and then forgets in one call: slot 1's tombstone (2900), slot 2
    // (3600) and its tombstone (4600).
    let r = store.sweep(10_000, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims, r.slot_tombstones), (1, 1, 2));
    assert_eq!(table_len(&store, SLOTS) + table_len(&store, CLAIM_USAGE), 0);
    assert!(slot_expiries(&store).is_empty());
    assert_eq!(store.stored_bytes().unwrap(), 80, "four queued copies, no slot copy");
    assert!(
        store.ack(bob, queue_key(&bob, &[]), u64::MAX).await.unwrap() > 0
            && store.ack(alice, queue_key(&alice, &[]), u64::MAX).await.unwrap() > 0
    );
    assert_eq!(store.stored_bytes().unwrap(), 0);
}

#[tokio::test]
async fn a_schema_2_database_migrates_to_3_and_takes_claims() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        user(&store, "alice", 1).await;
        user(&store, "bob", 2).await;
        store.enqueue(vec![item([2; 32], b"old", Some(1), u64::MAX)], LIMITS, 1).await.unwrap();
        // What schema 2 had: no slot tables, version 2.
        store
            .write(|txn| {
                txn.delete_table(SLOTS)?;
                txn.delete_table(SLOT_CLAIMS)?;
                txn.delete_table(SLOT_CLAIMERS)?;
                txn.delete_table(CLAIM_USAGE)?;
                txn.open_table(META)?.insert("schema_version", 2u32.to_be_bytes().as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.meta("schema_version").unwrap().unwrap(), 3u32.to_be_bytes());
    assert_eq!(store.stored_bytes().unwrap(), 3);
    let c = claim(1, [1; 32], 9, &commit(0, 20), &[[2; 32]]);
    assert!(matches!(
        store.claim_slot(c, LIMITS, SLOT_LIMITS, 1).await.unwrap(),
        ClaimOutcome::Claimed { position: 0, total: 1, .. }
    ));
    assert_eq!(store.fetch(&queue_key(&[2; 32], &[]), 10, usize::MAX, 0).unwrap().len(), 2);
    assert_eq!(store.stored_bytes().unwrap(), 43);
}

/// The server databases of the committed format fixtures (`tests/fixtures`, written by the
/// v0.1 and v0.2 servers: schemas 1 and 2) open, migrate to this schema, keep their users and
/// take claims.
#[tokio::test]
async fn the_v0_1_and_v0_2_fixture_databases_migrate_and_take_claims() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for version in ["v0.1", "v0.2"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixtures.join(version).join("data/server/qpq.redb"),
            dir.path().join("t.redb"),
        )
        .unwrap_or_else(|e| panic!("{version}: {e}"));
        let store = open(dir.path());
        assert_eq!(store.meta("schema_version").unwrap().unwrap(), SCHEMA_VERSION.to_be_bytes());
        let alice = store.login_record("alice").unwrap().expect("alice").identity;
        let bob = store.login_record("bob").unwrap().expect("bob").identity;
        let before = store.stored_bytes().unwrap();
        assert!(before > 0, "{version}: a message is queued for bob");
        let c = claim(1, alice, 0xF1, &commit(0, 20), &[bob]);
        assert!(matches!(
            store.claim_slot(c, LIMITS, SLOT_LIMITS, now_ms()).await.unwrap(),
            ClaimOutcome::Claimed { position: 0, total: 1, .. }
        ));
        assert_eq!(store.stored_bytes().unwrap(), before + 40, "{version}");
        let slot = store.fetch_slot(&[1; 16], 0, 100, usize::MAX, now_ms()).unwrap();
        assert_eq!(slot.total, 1, "{version}");
    }
}

#[test]
fn slot_records_decode_or_are_corrupt() {
    let c = records::Claim { claimer: [1; 32], message_id: vec![2; 16], payload: vec![3; 5] };
    let bytes = c.encode();
    let back = records::Claim::decode(&bytes).unwrap();
    assert_eq!((back.claimer, back.message_id, back.payload), ([1; 32], vec![2; 16], vec![3; 5]));
    for n in 0..bytes.len() {
        assert!(matches!(records::Claim::decode(&bytes[..n]), Err(StoreError::Corrupt(_))));
    }
    let mut short_key = bytes.clone();
    short_key[3] = 31;
    assert!(matches!(records::Claim::decode(&short_key), Err(StoreError::Corrupt(_))));
    for closed in [false, true] {
        let h = records::SlotHeader { count: 3, expires_ms: 9, closed };
        assert_eq!(records::SlotHeader::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.encode().len(), 13);
    }
    assert!(matches!(records::SlotHeader::decode(&[0; 11]), Err(StoreError::Corrupt(_))));
    // Schema 3's first layout (count, expiry) is an open slot.
    let old = [3u32.to_be_bytes().as_slice(), 9u64.to_be_bytes().as_slice()].concat();
    assert_eq!(
        records::SlotHeader::decode(&old).unwrap(),
        records::SlotHeader { count: 3, expires_ms: 9, closed: false }
    );
    let u = records::ClaimUsage { claims: 2, bytes: 5 };
    assert_eq!(records::ClaimUsage::decode(&u.encode()).unwrap(), u);
    assert_eq!(u.encode().len(), 16);
    // The count-only layout (8 bytes) holds no bytes.
    assert_eq!(
        records::ClaimUsage::decode(&7u64.to_be_bytes()).unwrap(),
        records::ClaimUsage { claims: 7, bytes: 0 }
    );
    for n in [0, 7, 9, 15] {
        assert!(matches!(records::ClaimUsage::decode(&[0; 16][..n]), Err(StoreError::Corrupt(_))));
    }
}

/// The v0.3 fixture database (`tests/fixtures/v0.3`, schema 3 as first written: `claim_usage`
/// a redb `u64` of claims, slot headers without the closed flag) opens: its `claim_usage` is
/// retyped with the bytes of the claim alice holds, her slot reads back, takes claims and
/// extends, and the sweep gives everything back.
#[tokio::test]
async fn the_v0_3_fixture_database_retypes_its_claim_usage_and_keeps_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v0.3");
    std::fs::copy(fixture.join("data/server/qpq.redb"), dir.path().join("t.redb")).unwrap();
    let store = open(dir.path());
    assert_eq!(store.meta("schema_version").unwrap().unwrap(), SCHEMA_VERSION.to_be_bytes());
    let alice = store.login_record("alice").unwrap().expect("alice").identity;
    let bob = store.login_record("bob").unwrap().expect("bob").identity;
    let (slot, raw) = {
        let txn = store.read().unwrap();
        let t = txn.open_table(SLOTS).unwrap();
        let mut rows = t.iter().unwrap();
        let (k, v) = rows.next().expect("the fixture holds a slot").unwrap();
        assert!(rows.next().is_none());
        (<[u8; 16]>::try_from(k.value()).unwrap(), v.value().to_vec())
    };
    assert_eq!(raw.len(), 12, "written without the closed flag");
    let header = records::SlotHeader::decode(&raw).unwrap();
    assert_eq!((header.count, header.closed), (1, false));
    // Before its expiry (the fixture's own clock: its slot lives 30 days from its claim).
    let now = header.expires_ms - 1;
    let page = store.fetch_slot(&slot, 0, 100, usize::MAX, now).unwrap();
    assert_eq!(page.total, 1);
    let bytes = page.claims[0].len() as u64;
    assert!(bytes > 0);
    assert_eq!(store.open_claims(&alice).unwrap(), (1, bytes));
    assert_eq!(store.open_claims(&bob).unwrap(), (0, 0));
    // Bob claims behind her; the slot now lives 1000 ms (this test's TTL) from his claim.
    let c = claim(0, bob, 0xB0, &commit(0, 20), &[alice]);
    let c = SlotClaim { slot, ..c };
    assert!(matches!(
        store.claim_slot(c, LIMITS, SLOT_LIMITS, now).await.unwrap(),
        ClaimOutcome::Claimed { position: 1, total: 2, .. }
    ));
    assert_eq!(slot_expiries(&store), vec![(now + 1_000, slot.to_vec())]);
    assert_eq!(store.open_claims(&bob).unwrap(), (1, 20));
    drop(store);
    // Opened again: the table has its new type already.
    let store = open(dir.path());
    assert_eq!(store.open_claims(&alice).unwrap(), (1, bytes));
    let r = store.sweep(now + 1_000, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims), (1, 2));
    assert_eq!(store.open_claims(&alice).unwrap(), (0, 0));
    assert_eq!(table_len(&store, CLAIM_USAGE), 0);
    // Its tombstone refuses claims.
    let c = SlotClaim { slot, ..claim(0, alice, 1, &commit(0, 20), &[bob]) };
    assert_eq!(
        store.claim_slot(c, LIMITS, SLOT_LIMITS, now + 1_000).await.unwrap(),
        ClaimOutcome::Closed
    );
}

/// A `claim_usage` table of the count-only type is rewritten on open: each row keeps its count
/// and gains the bytes of its claimer's stored claims; a table of the new type is kept as is.
#[tokio::test]
async fn a_count_only_claim_usage_table_is_retyped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let alice = user(&store, "alice", 1).await;
        let bob = user(&store, "bob", 2).await;
        for (slot, len) in [(1, 30), (2, 50)] {
            let c = claim(slot, alice, slot, &commit(slot, len), &[bob]);
            store.claim_slot(c, LIMITS, SLOT_LIMITS, 100).await.unwrap();
        }
        let c = claim(1, bob, 9, &commit(9, 20), &[alice]);
        store.claim_slot(c, LIMITS, SLOT_LIMITS, 100).await.unwrap();
        // What schema 3 first wrote: counts only, in a table typed u64.
        store
            .write(|txn| {
                txn.delete_table(CLAIM_USAGE)?;
                let mut t = txn.open_table(CLAIM_USAGE_COUNT_ONLY)?;
                t.insert([1u8; 32].as_slice(), 2)?;
                t.insert([2u8; 32].as_slice(), 1)?;
                Ok(())
            })
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let store = open(dir.path());
        assert_eq!(store.open_claims(&[1; 32]).unwrap(), (2, 80));
        assert_eq!(store.open_claims(&[2; 32]).unwrap(), (1, 20));
        drop(store);
    }
    let store = open(dir.path());
    let r = store.sweep(1_100, u64::MAX, SLOT_LIMITS.ttl_ms).await.unwrap();
    assert_eq!((r.slots, r.claims), (2, 3));
    assert_eq!(table_len(&store, CLAIM_USAGE), 0);
}
