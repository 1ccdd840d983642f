//! ClaimSlot and FetchSlot through the real dispatch ([`crate::fuzzing::Harness`]).

use qpq_proto::{Status, method, v1};

use crate::config::Config;
use crate::fuzzing::{Connection, Harness};
use crate::handler::Bound;
use crate::handler::delivery::MAX_MESSAGE;
use crate::handler::{RpcError, slots::MAX_SLOT_FETCH};
use crate::store::{now_ms, queue_key};

/// An `MLSMessage` v1 `PrivateMessage` header with `content_type`, padded with `fill` to
/// `len` bytes.
fn private_message(content_type: u8, fill: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0, 1, 0, 2, 1, b'g'];
    p.extend_from_slice(&7u64.to_be_bytes());
    p.extend_from_slice(&[content_type, 0]);
    p.resize(len.max(p.len()), fill);
    p
}

fn commit(fill: u8, len: usize) -> Vec<u8> {
    let p = private_message(3, fill, len);
    assert!(qpq_core::keypackage::is_commit(&p));
    p
}

fn claim_req(slot: u8, mid: u8, payload: &[u8], to: &[[u8; 32]]) -> v1::ClaimSlotRequest {
    v1::ClaimSlotRequest {
        slot: vec![slot; 16],
        payload: payload.to_vec(),
        recipient_keys: to.iter().map(|k| k.to_vec()).collect(),
        message_id: vec![mid; 16],
    }
}

async fn claim(
    c: &Connection,
    req: &v1::ClaimSlotRequest,
) -> Result<v1::ClaimSlotResponse, RpcError> {
    c.call(method::CLAIM_SLOT, req).await
}

async fn fetch(c: &Connection, slot: u8, from: u32) -> v1::FetchSlotResponse {
    c.call(method::FETCH_SLOT, &v1::FetchSlotRequest { slot: vec![slot; 16], from }).await.unwrap()
}

/// A harness with `tune` applied to its limits, and alice (1), bob (2) and carol (3)
/// registered, each on a bound connection.
async fn setup(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut crate::config::Limits),
) -> (Harness, [Connection; 3]) {
    let mut config: Config = Harness::config(dir);
    tune(&mut config.limits);
    let h = Harness::open_with(config).await.unwrap();
    let mut conns = Vec::new();
    for (name, id) in [("alice", 1u8), ("bob", 2), ("carol", 3)] {
        let account = h.register(name, "pw", [id; 32]).await.unwrap();
        let c = h.connection();
        c.bind(account.bound);
        conns.push(c);
    }
    let Ok(conns) = <[Connection; 3]>::try_from(conns) else { unreachable!() };
    (h, conns)
}

/// A connection bound to an account that was never registered (a claimer need not be one).
fn as_account(h: &Harness, identity: [u8; 32]) -> Connection {
    let c = h.connection();
    c.bind(Bound {
        identity,
        username: format!("u{}", identity[0]),
        device_id: Vec::new(),
        session: identity,
    });
    c
}

const ALICE: [u8; 32] = [1; 32];
const BOB: [u8; 32] = [2; 32];
const CAROL: [u8; 32] = [3; 32];

fn refusal(r: v1::SlotRefusal) -> i32 {
    r.into()
}

#[tokio::test]
async fn claims_are_first_come_deduplicated_and_refused_by_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (h, [a, mut b, c]) = setup(dir.path(), |l| l.max_slot_claims = 2).await;
    let (pa, pb) = (commit(0xA, 40), commit(0xB, 50));
    b.take_pushes();

    let r = claim(&a, &claim_req(7, 1, &pa, &[BOB, CAROL])).await.unwrap();
    assert!(r.stored && !r.duplicate);
    assert_eq!((r.position, r.total, r.refusal), (0, 1, refusal(v1::SlotRefusal::None)));
    assert_eq!((r.seqs, r.refusals), (vec![1, 1], vec![0, 0]));
    assert_eq!(b.take_pushes().len(), 1, "bob is told of the commit");

    let r = claim(&b, &claim_req(7, 2, &pb, &[ALICE, CAROL])).await.unwrap();
    assert!(r.stored);
    assert_eq!((r.position, r.total, r.seqs), (1, 2, vec![1, 2]));
    let f = fetch(&c, 7, 0).await;
    assert_eq!((f.claims, f.total), (vec![pa.clone(), pb.clone()], 2));
    let f = fetch(&c, 7, 1).await;
    assert_eq!((f.claims, f.total), (vec![pb.clone()], 2));

    // The same claim again: a duplicate, enqueued and pushed once only.
    let r = claim(&a, &claim_req(7, 1, &pa, &[BOB, CAROL])).await.unwrap();
    assert!(r.stored && r.duplicate);
    assert_eq!((r.position, r.total), (0, 2));
    assert!(r.seqs.is_empty() && r.refusals.is_empty());
    assert!(b.take_pushes().is_empty());
    let queued: v1::FetchResponse =
        b.call(method::FETCH, &v1::FetchRequest::default()).await.unwrap();
    assert_eq!(queued.payloads.len(), 1);
    assert_eq!(queued.payloads[0].data, pa);

    // Another commit from alice in the same epoch: refused, naming the claim she holds.
    let r = claim(&a, &claim_req(7, 3, &commit(0xC, 40), &[BOB, CAROL])).await.unwrap();
    assert!(!r.stored && !r.duplicate);
    assert_eq!((r.refusal, r.position, r.total), (refusal(v1::SlotRefusal::AlreadyClaimed), 0, 2));
    assert!(b.take_pushes().is_empty());

    // Two claims is the limit here.
    let r = claim(&c, &claim_req(7, 4, &commit(0xD, 40), &[ALICE, BOB])).await.unwrap();
    assert!(!r.stored);
    assert_eq!((r.refusal, r.total), (refusal(v1::SlotRefusal::SlotFull), 2));
    assert!(b.take_pushes().is_empty());

    // Nobody took it: the refusals say why, and the slot does not exist.
    let r = claim(&c, &claim_req(8, 5, &commit(0xE, 40), &[[9; 32]])).await.unwrap();
    assert!(!r.stored);
    assert_eq!((r.refusal, r.total), (refusal(v1::SlotRefusal::NotDelivered), 0));
    assert_eq!(r.seqs, vec![0]);
    assert_eq!(r.refusals, vec![i32::from(v1::EnqueueRefusal::UnknownRecipient)]);
    let f = fetch(&a, 8, 0).await;
    assert_eq!((f.claims.len(), f.total), (0, 0));

    assert_eq!(h.store().open_claims(&ALICE).unwrap(), (1, 40));
    assert_eq!(h.store().open_claims(&CAROL).unwrap(), (0, 0));
    assert_eq!(h.store().queued_count(&CAROL).unwrap(), 2);
}

#[tokio::test]
async fn claim_requests_are_checked_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (h, [a, _b, _c]) = setup(dir.path(), |_| {}).await;
    let p = commit(0, 40);
    let status = |r: Result<v1::ClaimSlotResponse, RpcError>| r.unwrap_err().status;
    let bad = |r| assert_eq!(status(r), Status::BadRequest);

    // Not a commit by its clear header: an application message, a proposal, a Welcome, junk.
    for payload in [
        private_message(1, 0, 40),
        private_message(2, 0, 40),
        vec![0, 1, 0, 3, 0, 0],
        b"not an MLS message".to_vec(),
    ] {
        let e = claim(&a, &claim_req(1, 1, &payload, &[BOB])).await.unwrap_err();
        assert_eq!(e.status, Status::BadRequest);
        assert!(e.message.contains("commit"), "{}", e.message);
    }
    for len in [0, 15, 17] {
        bad(claim(&a, &v1::ClaimSlotRequest { slot: vec![1; len], ..claim_req(1, 1, &p, &[BOB]) })
            .await);
        let e = a
            .call::<_, v1::FetchSlotResponse>(
                method::FETCH_SLOT,
                &v1::FetchSlotRequest { slot: vec![1; len], from: 0 },
            )
            .await
            .unwrap_err();
        assert_eq!(e.status, Status::BadRequest);
        bad(claim(
            &a,
            &v1::ClaimSlotRequest { message_id: vec![1; len], ..claim_req(1, 1, &p, &[BOB]) },
        )
        .await);
    }
    // The BatchEnqueue rules for recipients ...
    bad(claim(&a, &claim_req(1, 1, &p, &[])).await);
    bad(claim(&a, &claim_req(1, 1, &p, &[BOB, CAROL, BOB])).await);
    let mut short = claim_req(1, 1, &p, &[BOB]);
    short.recipient_keys[0].pop();
    bad(claim(&a, &short).await);
    let many: Vec<[u8; 32]> = (0..17u8).map(|i| [i + 100; 32]).collect();
    assert_eq!(status(claim(&a, &claim_req(1, 1, &p, &many)).await), Status::PayloadTooLarge);
    // ... and Enqueue's for the payload.
    bad(claim(&a, &claim_req(1, 1, &[], &[BOB])).await);
    let huge = commit(0, MAX_MESSAGE + 1);
    assert_eq!(status(claim(&a, &claim_req(1, 1, &huge, &[BOB])).await), Status::PayloadTooLarge);
    // Both methods need a login.
    let anon = h.connection();
    assert_eq!(status(claim(&anon, &claim_req(1, 1, &p, &[BOB])).await), Status::Unauthorized);
    let e = anon
        .call::<_, v1::FetchSlotResponse>(
            method::FETCH_SLOT,
            &v1::FetchSlotRequest { slot: vec![1; 16], from: 0 },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status, Status::Unauthorized);

    assert_eq!(h.store().stored_bytes().unwrap(), 0, "nothing was stored");
    assert_eq!(h.store().queued_count(&BOB).unwrap(), 0);
    assert_eq!(fetch(&a, 1, 0).await.total, 0);
    // The same request with a commit goes through.
    assert!(claim(&a, &claim_req(1, 1, &p, &[BOB])).await.unwrap().stored);
}

#[tokio::test]
async fn open_claims_are_rate_limited_and_a_full_disk_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let (h, [a, b, _c]) = setup(dir.path(), |l| {
        l.max_open_claims = 1;
        l.disk_budget_bytes = 100;
    })
    .await;
    assert!(claim(&a, &claim_req(1, 1, &commit(0, 20), &[BOB])).await.unwrap().stored);
    let e = claim(&a, &claim_req(2, 2, &commit(0, 20), &[BOB])).await.unwrap_err();
    assert_eq!(e.status, Status::RateLimited);
    assert!(e.retry_after_ms > 0);
    assert_eq!(e.message, "too many open commit claims");
    assert_eq!(h.store().queued_count(&BOB).unwrap(), 1);
    // 40 stored; two copies of 30 more would be 100 (handshakes may fill the budget) ...
    assert!(claim(&b, &claim_req(3, 3, &commit(0, 30), &[ALICE])).await.unwrap().stored);
    assert_eq!(h.store().stored_bytes().unwrap(), 100);
    // ... and then not a byte more, neither queued nor in a slot.
    let e = claim(&as_account(&h, [7; 32]), &claim_req(4, 4, &commit(0, 16), &[BOB]))
        .await
        .unwrap_err();
    assert_eq!(e.status, Status::Unavailable);
    assert!(e.retry_after_ms > 0);
    assert_eq!(h.store().stored_bytes().unwrap(), 100);
    assert_eq!(h.store().queued_count(&BOB).unwrap(), 1);
}

#[tokio::test]
async fn fetch_slot_pages_by_count_and_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (h, [a, _b, _c]) = setup(dir.path(), |l| l.max_queue_bytes = 64 << 20).await;
    let n = MAX_SLOT_FETCH as u32 + 1;
    let mut expected = Vec::new();
    for i in 0..n {
        let mut claimer = [0xC0; 32];
        claimer[..4].copy_from_slice(&i.to_be_bytes());
        let mut p = commit(0, 20);
        p.extend_from_slice(&i.to_be_bytes());
        let r = claim(&as_account(&h, claimer), &claim_req(1, i as u8, &p, &[BOB])).await.unwrap();
        assert_eq!((r.stored, r.position), (true, i));
        expected.push(p);
    }
    let f = fetch(&a, 1, 0).await;
    assert_eq!((f.claims.as_slice(), f.total), (&expected[..MAX_SLOT_FETCH], n));
    let f = fetch(&a, 1, MAX_SLOT_FETCH as u32).await;
    assert_eq!((f.claims.as_slice(), f.total), (&expected[MAX_SLOT_FETCH..], n));
    let f = fetch(&a, 1, n).await;
    assert_eq!((f.claims.len(), f.total), (0, n));

    // Three claims of 1.5 MiB: two fit in one response (4 MiB - 64 KiB), the third comes next.
    let big: Vec<Vec<u8>> = (0..3u8).map(|i| commit(i, 3 << 19)).collect();
    for (i, p) in big.iter().enumerate() {
        let c = as_account(&h, [0xD0 + i as u8; 32]);
        assert!(claim(&c, &claim_req(2, 200 + i as u8, p, &[BOB])).await.unwrap().stored);
    }
    let body = a
        .request(
            method::FETCH_SLOT,
            &qpq_proto::Message::encode_to_vec(&v1::FetchSlotRequest {
                slot: vec![2; 16],
                from: 0,
            }),
        )
        .await
        .unwrap();
    assert!(body.len() <= qpq_proto::MAX_PAYLOAD as usize);
    let f = fetch(&a, 2, 0).await;
    assert_eq!((f.claims.as_slice(), f.total), (&big[..2], 3));
    let f = fetch(&a, 2, 2).await;
    assert_eq!((f.claims.as_slice(), f.total), (&big[2..], 3));
    // The queue took each commit once.
    let q = h.store().fetch(&queue_key(&BOB, &[]), 500, usize::MAX, now_ms()).unwrap();
    assert_eq!(q.len(), n as usize + 3);
}

#[tokio::test]
async fn a_claim_listing_its_committer_as_a_recipient_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (h, [a, _b, _c]) = setup(dir.path(), |_| {}).await;
    let p = commit(0, 40);
    // Alone, or among others: the committer applies its own commit, no copy is queued for it.
    for to in [&[ALICE][..], &[BOB, ALICE, CAROL]] {
        let e = claim(&a, &claim_req(1, 1, &p, to)).await.unwrap_err();
        assert_eq!(e.status, Status::BadRequest);
        assert_eq!(e.message, "a commit is not sent to its own committer");
    }
    assert_eq!(h.store().stored_bytes().unwrap(), 0, "nothing was stored");
    assert_eq!(h.store().open_claims(&ALICE).unwrap(), (0, 0));
    assert_eq!(fetch(&a, 1, 0).await.total, 0);
    assert!(claim(&a, &claim_req(1, 1, &p, &[BOB, CAROL])).await.unwrap().stored);
}

#[tokio::test]
async fn open_claim_bytes_are_rate_limited_per_account() {
    let dir = tempfile::tempdir().unwrap();
    let (h, [a, mut b, _c]) = setup(dir.path(), |l| l.max_open_claim_bytes = 100).await;
    b.take_pushes();
    assert!(claim(&a, &claim_req(1, 1, &commit(0, 60), &[BOB])).await.unwrap().stored);
    assert!(claim(&a, &claim_req(2, 2, &commit(0, 40), &[BOB])).await.unwrap().stored);
    assert_eq!(h.store().open_claims(&ALICE).unwrap(), (2, 100));
    assert_eq!(b.take_pushes().len(), 2);
    // Bob acking the copies gives nothing back: the slots keep theirs.
    let _: v1::AckResponse =
        b.call(method::ACK, &v1::AckRequest { seq_up_to: 2, ..Default::default() }).await.unwrap();
    assert_eq!(h.store().queued_count(&BOB).unwrap(), 0);
    let e = claim(&a, &claim_req(3, 3, &commit(0, 16), &[BOB])).await.unwrap_err();
    assert_eq!(e.status, Status::RateLimited);
    assert!(e.retry_after_ms > 0);
    assert_eq!(e.message, "too many open commit claim bytes");
    assert!(b.take_pushes().is_empty());
    assert_eq!(h.store().queued_count(&BOB).unwrap(), 0);
    assert_eq!(fetch(&b, 3, 0).await.total, 0);
    // Bob's claims are his own.
    assert!(claim(&b, &claim_req(3, 4, &commit(0, 100), &[ALICE])).await.unwrap().stored);
}

#[tokio::test]
async fn a_claim_gets_through_a_disk_full_of_chat_but_not_past_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    // Application messages to 900 bytes, handshake messages (and commit claims) to 1000.
    let (h, [a, _b, c]) = setup(dir.path(), |l| l.disk_budget_bytes = 1_000).await;
    let fill = crate::store::EnqueueItem {
        recipient: BOB,
        channel: Vec::new(),
        message_id: Vec::new(),
        payload: std::sync::Arc::new(commit(0xF, 900)),
        expires_ms: u64::MAX,
        sender: CAROL,
        handshake: true,
    };
    let limits = crate::store::QueueLimits::quota_only(100, 1 << 20, 60_000);
    h.store().enqueue(vec![fill], limits, now_ms()).await.unwrap();
    assert_eq!(h.store().stored_bytes().unwrap(), 900);
    // Past the application ceiling already: 900 + 20 in the slot + 20 queued is 940, in.
    assert!(claim(&a, &claim_req(1, 1, &commit(0, 20), &[BOB])).await.unwrap().stored);
    assert_eq!(h.store().stored_bytes().unwrap(), 940);
    // 940 + 32 + 32 would pass 1000: the claim is refused whole.
    let p = commit(1, 32);
    let e = claim(&c, &claim_req(2, 2, &p, &[BOB])).await.unwrap_err();
    assert_eq!(e.status, Status::Unavailable);
    assert_eq!(h.store().stored_bytes().unwrap(), 940);
    assert_eq!(fetch(&a, 2, 0).await.total, 0);
}

#[tokio::test]
async fn an_expired_slot_is_closed_to_claims_and_reads_empty() {
    let dir = tempfile::tempdir().unwrap();
    // Slots live a second after their latest claim.
    let (h, [a, b, c]) = setup(dir.path(), |l| l.max_ttl_secs = 1).await;
    let p = commit(0, 40);
    assert!(claim(&a, &claim_req(1, 1, &p, &[BOB, CAROL])).await.unwrap().stored);
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let f = fetch(&c, 1, 0).await;
    assert_eq!((f.claims.len(), f.total), (0, 0));
    // Not swept yet, and after the sweep: closed, not restarted at position 0.
    let closed = |r: v1::ClaimSlotResponse| {
        assert!(!r.stored && !r.duplicate);
        assert_eq!((r.refusal, r.position, r.total), (refusal(v1::SlotRefusal::Closed), 0, 0));
        assert!(r.seqs.is_empty() && r.refusals.is_empty());
    };
    closed(claim(&b, &claim_req(1, 2, &commit(1, 40), &[ALICE, CAROL])).await.unwrap());
    let r = h.store().sweep(now_ms(), u64::MAX, 1_000).await.unwrap();
    assert_eq!((r.slots, r.claims), (1, 1));
    closed(claim(&b, &claim_req(1, 2, &commit(1, 40), &[ALICE, CAROL])).await.unwrap());
    closed(claim(&a, &claim_req(1, 1, &p, &[BOB, CAROL])).await.unwrap());
    assert_eq!(fetch(&c, 1, 0).await.total, 0);
    assert_eq!(h.store().queued_count(&ALICE).unwrap(), 0, "nothing was enqueued for it");
    assert_eq!(h.store().open_claims(&ALICE).unwrap(), (0, 0));
}
