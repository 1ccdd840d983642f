//! Attacks on the epoch commit slots (PROTOCOL.md §6.9), with library `Client`s against a real
//! server: junk claims from members ahead of an admin's change, a removed member's claims, an
//! outsider's claim, one account trying to fill a slot, a winning commit withheld from a
//! member, a retried claim whose first answer was lost, and two admins racing. Every test
//! ends with all current members in one epoch with one verification code, and a message from
//! one of them reaching the others.

use std::path::Path;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{GroupId, MlsGroup, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion};
use openmls_traits::OpenMlsProvider as _;
use qpq_core::client::{Client, Event};
use qpq_core::ids::GroupId as ConvId;
use qpq_core::keypackage::is_commit;
use qpq_core::mls::QpqProvider;
use qpq_core::vault::{Space, Vault};
use qpq_proto::{method, v1};
use qpq_tests::engine::{Stolen, account, passphrase, reopen, stolen, store, texts};
use qpq_tests::{ServerProcess, message_id};
use tokio::sync::broadcast;

/// A server for one test. Its per-address authentication budget is raised: every account here
/// registers and logs in from 127.0.0.1, and an exhausted budget refuses even a valid Resume
/// (the thief's connections, a reopened client).
fn start(dir: &Path) -> ServerProcess {
    let limits =
        ["--set", "limits.auth_per_ip_burst=1000", "--set", "limits.auth_per_ip_per_min=1000"];
    ServerProcess::start(&dir.join("server"), &limits).unwrap()
}

/// `names[0]` (the admin) makes the group "team" with the others in it; everyone has synced.
async fn team<const N: usize>(
    server: &ServerProcess,
    dir: &Path,
    names: [&str; N],
) -> ([Client; N], ConvId) {
    let mut clients = Vec::new();
    for name in names {
        clients.push(account(server, dir, name).await);
    }
    let others: Vec<String> = names[1..].iter().map(|n| n.to_string()).collect();
    let team = clients[0].create_group("team").await.unwrap();
    clients[0].add_members(&team, &others).await.unwrap();
    for c in &mut clients[1..] {
        c.sync().await.unwrap();
    }
    (clients.try_into().unwrap_or_else(|_| unreachable!()), team)
}

/// Claims `slot` with `payload` for `to` under a fresh message id.
async fn claim(
    raw: &qpq_tests::Client,
    slot: [u8; 16],
    payload: Vec<u8>,
    to: &[[u8; 32]],
) -> v1::ClaimSlotResponse {
    claim_as(raw, slot, payload, to, message_id()).await
}

async fn claim_as(
    raw: &qpq_tests::Client,
    slot: [u8; 16],
    payload: Vec<u8>,
    to: &[[u8; 32]],
    id: [u8; 16],
) -> v1::ClaimSlotResponse {
    let req = v1::ClaimSlotRequest {
        slot: slot.to_vec(),
        payload,
        recipient_keys: to.iter().map(|k| k.to_vec()).collect(),
        message_id: id.to_vec(),
    };
    raw.call(method::CLAIM_SLOT, &req).await.unwrap()
}

/// Every claim of `slot`, in order.
async fn claims(raw: &qpq_tests::Client, slot: [u8; 16]) -> v1::FetchSlotResponse {
    let req = v1::FetchSlotRequest { slot: slot.to_vec(), from: 0 };
    raw.call(method::FETCH_SLOT, &req).await.unwrap()
}

/// The reasons of the `Rejected` events received so far.
fn rejections(events: &mut broadcast::Receiver<Event>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::Rejected { reason } = e {
            out.push(reason);
        }
    }
    out
}

/// Syncs `c`; returns what it rejected meanwhile.
async fn sync_rejecting(c: &mut Client) -> Vec<String> {
    let mut events = c.subscribe();
    c.sync().await.unwrap();
    rejections(&mut events)
}

fn mentions(reasons: &[String], needle: &str) -> bool {
    reasons.iter().any(|r| r.contains(needle))
}

/// Asserts that all `clients` are in the same epoch of `team` with the same verification
/// code and the same members; returns the epoch and the member count.
async fn converged(team: &ConvId, clients: &mut [&mut Client]) -> (u64, usize) {
    let first_name = clients[0].username().to_string();
    let first = clients[0].group_info(team).await.unwrap();
    let mut ids: Vec<[u8; 32]> = first.members.iter().map(|m| m.0.to_bytes()).collect();
    ids.sort();
    for c in clients.iter_mut().skip(1) {
        let info = c.group_info(team).await.unwrap();
        let who = c.username();
        assert_eq!(info.epoch, first.epoch, "{who} and {first_name} are in different epochs");
        assert_eq!(
            info.verification_code, first.verification_code,
            "{who} and {first_name} have different verification codes: the group forked"
        );
        let mut theirs: Vec<[u8; 32]> = info.members.iter().map(|m| m.0.to_bytes()).collect();
        theirs.sort();
        assert_eq!(theirs, ids, "{who} and {first_name} see different members");
    }
    (first.epoch, ids.len())
}

/// `from` sends `text` into `team`; each of `to` syncs and has it as its latest message.
async fn message_reaches(team: &ConvId, from: &mut Client, to: &mut [&mut Client], text: &str) {
    from.send_text(team, text).await.unwrap();
    for c in to.iter_mut() {
        c.sync().await.unwrap();
        assert_eq!(
            texts(c, team).last().map(String::as_str),
            Some(text),
            "{} did not get {}'s message",
            c.username(),
            from.username()
        );
    }
}

/// One of `of`'s KeyPackages, fetched as anyone can.
async fn key_package(raw: &qpq_tests::Client, of: &[u8; 32]) -> Vec<u8> {
    let r: v1::FetchKeyPackageResponse = raw
        .call(method::FETCH_KEY_PACKAGE, &v1::FetchKeyPackageRequest { identity_key: of.to_vec() })
        .await
        .unwrap();
    assert!(!r.package.is_empty());
    r.package
}

/// A commit by the thief, in its current epoch of `team`, adding the owner of `kp`: what a
/// modified client of a non-admin would make. Its pending state is cleared again.
fn forged_add(thief: &Stolen, team: &[u8], kp: &[u8]) -> Vec<u8> {
    let provider = QpqProvider::new(thief.vault.clone());
    let kp = match MlsMessageIn::tls_deserialize_exact(kp).unwrap().extract() {
        MlsMessageBodyIn::KeyPackage(kp) => {
            kp.validate(provider.crypto(), ProtocolVersion::Mls10).unwrap()
        }
        _ => panic!("not a KeyPackage"),
    };
    let mut group =
        MlsGroup::load(provider.storage(), &GroupId::from_slice(team)).unwrap().unwrap();
    let (commit, _welcome, _) = group.add_members(&provider, &thief.identity, &[kp]).unwrap();
    group.clear_pending_commit(provider.storage()).unwrap();
    commit.tls_serialize_detached().unwrap()
}

/// A commit by the thief removing `victim` (a non-admin may only remove itself).
fn forged_remove(thief: &Stolen, team: &[u8], victim: &[u8; 32]) -> Vec<u8> {
    let provider = QpqProvider::new(thief.vault.clone());
    let mut group =
        MlsGroup::load(provider.storage(), &GroupId::from_slice(team)).unwrap().unwrap();
    let leaf = group.members().find(|m| m.signature_key == victim.to_vec()).unwrap().index;
    let (commit, _, _) = group.remove_members(&provider, &thief.identity, &[leaf]).unwrap();
    group.clear_pending_commit(provider.storage()).unwrap();
    commit.tls_serialize_detached().unwrap()
}

/// A key update by the thief in its current epoch of `team` (only admins commit, so a
/// non-admin's is what a modified client would make). Its pending state is cleared again.
fn forged_update(thief: &Stolen, team: &[u8]) -> Vec<u8> {
    let provider = QpqProvider::new(thief.vault.clone());
    let mut group =
        MlsGroup::load(provider.storage(), &GroupId::from_slice(team)).unwrap().unwrap();
    let bundle = group
        .self_update(&provider, &thief.identity, openmls::prelude::LeafNodeParameters::default())
        .unwrap();
    let commit = bundle.commit().tls_serialize_detached().unwrap();
    group.clear_pending_commit(provider.storage()).unwrap();
    commit
}

/// TLS `opaque<V>`: an MLS varint length (1 or 2 bytes here), then the bytes.
fn vector(out: &mut Vec<u8>, bytes: &[u8]) {
    match bytes.len() {
        n @ 0..64 => out.push(n as u8),
        n @ 64..16384 => out.extend_from_slice(&(0x4000 | n as u16).to_be_bytes()),
        n => panic!("{n} bytes is too long here"),
    }
    out.extend_from_slice(bytes);
}

/// Garbage dressed as a commit of `group` in `epoch`: a `PrivateMessage` whose clear header
/// says so, with random sender data and ciphertext. The server, which only reads that header,
/// takes it as a claim; members cannot process it.
fn junk_commit(group: &[u8], epoch: u64) -> Vec<u8> {
    let mut m = vec![0, 1, 0, 2]; // mls10, mls_private_message
    vector(&mut m, group);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.push(3); // content type: commit
    vector(&mut m, &[]); // authenticated data
    vector(&mut m, &rand::random::<[u8; 32]>()); // encrypted sender data
    vector(&mut m, &[rand::random::<[u8; 32]>(), rand::random()].concat().repeat(4));
    assert!(is_commit(&m), "labelled a commit in the clear");
    m
}

/// A member's session token, to open more raw connections as that member later.
fn token(thief: &Stolen) -> Vec<u8> {
    thief.vault.get(Space::Account, b"token").unwrap().unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_claims_ahead_of_an_admins_change_are_skipped_by_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let dave = account(&server, dir.path(), "dave").await;
    let dave_key = dave.identity_key().to_bytes();
    drop(dave);
    let ([mut alice, bob, mut carol, erin], team) =
        team(&server, dir.path(), ["alice", "bob", "carol", "erin"]).await;
    let (a, b, c, e) = (
        alice.identity_key().to_bytes(),
        bob.identity_key().to_bytes(),
        carol.identity_key().to_bytes(),
        erin.identity_key().to_bytes(),
    );
    let epoch = alice.group_info(&team).await.unwrap().epoch;
    drop((bob, erin));

    // bob's device is compromised: a forged Add of dave is the slot's first claim.
    let thief = stolen(&server, dir.path(), "bob").await;
    let slot = thief.mls().slot(&team).unwrap();
    let kp = key_package(&thief.raw, &dave_key).await;
    let r = claim(&thief.raw, slot, forged_add(&thief, &team, &kp), &[a, c, e]).await;
    assert!(r.stored && r.position == 0, "bob's forgery is first: {r:?}");
    drop(thief);
    // So is erin's, who is about to be removed: garbage labelled a commit of this epoch.
    let thief = stolen(&server, dir.path(), "erin").await;
    assert_eq!(thief.mls().slot(&team).unwrap(), slot, "the members of an epoch share its slot");
    let r = claim(&thief.raw, slot, junk_commit(&team, epoch), &[a, b, c]).await;
    assert!(r.stored && r.position == 1, "erin's junk is second: {r:?}");
    drop(thief);

    // alice removes erin: her claim is third, and the first valid one.
    let mut events = alice.subscribe();
    alice.remove_member(&team, "erin").await.unwrap();
    let seen = rejections(&mut events);
    assert!(mentions(&seen, "non-admin"), "alice skipped bob's forgery: {seen:?}");
    assert_eq!(
        seen.iter().filter(|r| r.contains("ignored an invalid commit claim")).count(),
        2,
        "alice skipped both junk claims: {seen:?}"
    );
    assert_eq!(alice.group_info(&team).await.unwrap().epoch, epoch + 1);

    // Every other member, reading the same slot, skips the same claims and takes hers.
    let seen = sync_rejecting(&mut carol).await;
    assert!(mentions(&seen, "non-admin"), "carol skipped bob's forgery: {seen:?}");
    let mut bob = reopen(dir.path(), "bob").await;
    bob.sync().await.unwrap();
    alice.sync().await.unwrap();
    let (now, members) = converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    assert_eq!((now, members), (epoch + 1, 3), "erin removed, dave never added");
    let info = carol.group_info(&team).await.unwrap();
    assert!(!info.members.iter().any(|m| m.0 == e || m.0 == dave_key));
    message_reaches(&team, &mut alice, &mut [&mut bob, &mut carol], "after the junk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_can_no_longer_touch_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ([mut alice, mut bob, carol, erin], team) =
        team(&server, dir.path(), ["alice", "bob", "carol", "erin"]).await;
    let (a, b, c) = (
        alice.identity_key().to_bytes(),
        bob.identity_key().to_bytes(),
        carol.identity_key().to_bytes(),
    );
    let epoch = alice.group_info(&team).await.unwrap().epoch;
    drop((carol, erin));

    alice.remove_member(&team, "erin").await.unwrap();
    assert_eq!(alice.group_info(&team).await.unwrap().epoch, epoch + 1);

    // erin kept her device's state of epoch e: she makes a key update with it (her own client
    // would refuse: only admins commit) and claims slot(e). The slot of e is decided already:
    // hers is the second claim.
    let thief = stolen(&server, dir.path(), "erin").await;
    let erin_mls = thief.mls();
    let slot_e = erin_mls.slot(&team).unwrap();
    let update = forged_update(&thief, &team);
    let r = claim(&thief.raw, slot_e, update.clone(), &[a, b, c]).await;
    assert!(r.stored && r.position == 1 && r.total == 2, "erin's claim comes second: {r:?}");
    let erin_slot = erin_mls.slot(&team).unwrap();
    assert_eq!(erin_slot, slot_e, "erin is stuck in epoch e");
    drop((erin_mls, thief));

    // carol was offline throughout; worse, the server hands her erin's claim but withholds
    // alice's removal. The slot still decides: she takes alice's removal.
    let thief = stolen(&server, dir.path(), "carol").await;
    let queued = thief.raw.fetch(100).await.unwrap();
    let commits: Vec<_> = queued.iter().filter(|e| is_commit(&e.data)).collect();
    assert_eq!(commits.len(), 2, "alice's removal, then erin's update");
    assert_eq!(commits[1].data, update);
    thief.raw.ack(commits[0].seq).await.unwrap();
    assert_eq!(thief.raw.fetch(100).await.unwrap().len(), 1, "only erin's claim is left");
    drop(thief);
    let mut carol = reopen(dir.path(), "carol").await;
    carol.sync().await.unwrap();
    let info = carol.group_info(&team).await.unwrap();
    assert_eq!(info.epoch, epoch + 1, "carol took alice's removal from the slot");
    assert!(info.members.iter().all(|m| m.1 != "erin"));
    for m in [&mut alice, &mut bob] {
        let seen = sync_rejecting(m).await;
        assert!(seen.is_empty(), "{}: erin's late claim is simply stale: {seen:?}", m.username());
    }
    let (now, members) = converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    assert_eq!((now, members), (epoch + 1, 3));

    // The next slot is beyond erin: it is an exporter value of an epoch she is not in. Compare
    // with the value alice's device computes.
    drop(alice);
    let thief = stolen(&server, dir.path(), "alice").await;
    let slot_next = thief.mls().slot(&team).unwrap();
    assert_ne!(slot_next, erin_slot, "erin cannot compute slot(e+1)");
    let listed = claims(&thief.raw, slot_e).await;
    assert_eq!(listed.total, 2);
    assert_eq!(claims(&thief.raw, slot_next).await.total, 0, "nobody claimed slot(e+1)");
    drop(thief);
    // Once her own client has taken the removal, erin has no group state left at all.
    let mut erin = reopen(dir.path(), "erin").await;
    erin.sync().await.unwrap();
    assert!(erin.group_info(&team).await.is_err(), "erin is out of the group");
    drop(erin);
    let thief = stolen(&server, dir.path(), "erin").await;
    assert!(thief.mls().slot(&team).is_err(), "erin's device cannot compute any slot of it");
    drop(thief);

    let mut alice = reopen(dir.path(), "alice").await;
    alice.sync().await.unwrap();
    converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    message_reaches(&team, &mut alice, &mut [&mut bob, &mut carol], "without erin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_cannot_claim_a_groups_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let dave = account(&server, dir.path(), "dave").await;
    drop(dave);
    let ([mut alice, mut bob, carol], team) =
        team(&server, dir.path(), ["alice", "bob", "carol"]).await;
    let (a, b, c) = (
        alice.identity_key().to_bytes(),
        bob.identity_key().to_bytes(),
        carol.identity_key().to_bytes(),
    );
    let epoch = alice.group_info(&team).await.unwrap().epoch;
    drop(carol);

    // dave, never a member, cannot compute the slot: he claims a random one, with junk
    // labelled a commit of the group's epoch (its id and epoch are in every message's clear
    // header), sent to all three. The server cannot tell and stores it.
    let thief = stolen(&server, dir.path(), "dave").await;
    let random: [u8; 16] = rand::random();
    let r = claim(&thief.raw, random, junk_commit(&team, epoch), &[a, b, c]).await;
    assert!(r.stored && r.position == 0, "{r:?}");
    assert_eq!(claims(&thief.raw, random).await.total, 1);
    drop(thief);

    // The real slot, as a member reads it, holds nothing.
    let thief = stolen(&server, dir.path(), "carol").await;
    let real = thief.mls().slot(&team).unwrap();
    assert_ne!(real, random);
    let listed = claims(&thief.raw, real).await;
    assert_eq!(
        (listed.total, listed.claims.len()),
        (0, 0),
        "dave's claim is not in the group's slot"
    );
    drop(thief);

    // The junk reached the members' queues; outside the slot, it is ignored.
    let mut carol = reopen(dir.path(), "carol").await;
    for m in [&mut alice, &mut bob, &mut carol] {
        let seen = sync_rejecting(m).await;
        assert!(
            mentions(&seen, "not claimed in its epoch's slot"),
            "{} did not ignore dave's junk: {seen:?}",
            m.username()
        );
        assert_eq!(m.group_info(&team).await.unwrap().epoch, epoch);
    }
    // A real change is the real slot's first claim.
    alice.rotate_keys(&team).await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let (now, members) = converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    assert_eq!((now, members), (epoch + 1, 3));
    message_reaches(&team, &mut bob, &mut [&mut alice, &mut carol], "outsiders stay out").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_account_holds_at_most_one_claim_per_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let dave = account(&server, dir.path(), "dave").await;
    let dave_key = dave.identity_key().to_bytes();
    drop(dave);
    let ([mut alice, bob, mut carol], team) =
        team(&server, dir.path(), ["alice", "bob", "carol"]).await;
    let (a, c) = (alice.identity_key().to_bytes(), carol.identity_key().to_bytes());
    let epoch = alice.group_info(&team).await.unwrap().epoch;
    drop(bob);

    // bob's device is compromised: he tries to fill the slot with forgeries, so that a real
    // change finds no room.
    let thief = stolen(&server, dir.path(), "bob").await;
    let slot = thief.mls().slot(&team).unwrap();
    let kp = key_package(&thief.raw, &dave_key).await;
    let add = forged_add(&thief, &team, &kp);
    let remove = forged_remove(&thief, &team, &c);
    let first = message_id();
    let r = claim_as(&thief.raw, slot, add.clone(), &[a, c], first).await;
    assert!(r.stored && r.position == 0 && r.total == 1, "{r:?}");
    let r = claim(&thief.raw, slot, remove, &[a, c]).await;
    assert!(!r.stored, "a second claim of the same account is refused: {r:?}");
    assert_eq!(r.refusal, v1::SlotRefusal::AlreadyClaimed as i32);
    assert_eq!((r.position, r.total), (0, 1), "it names the claim bob holds");
    assert!(r.seqs.is_empty(), "nothing of the refused claim was enqueued");
    // Repeating the first claim is a duplicate: nothing stored or enqueued again.
    let r = claim_as(&thief.raw, slot, add.clone(), &[a, c], first).await;
    assert!(r.stored && r.duplicate && r.position == 0 && r.total == 1, "{r:?}");
    let listed = claims(&thief.raw, slot).await;
    assert_eq!(listed.total, 1);
    assert_eq!(listed.claims, [add]);
    drop(thief);

    // The members got the first forgery once, and skip it.
    for m in [&mut alice, &mut carol] {
        let seen = sync_rejecting(m).await;
        assert!(mentions(&seen, "non-admin"), "{}: {seen:?}", m.username());
        let info = m.group_info(&team).await.unwrap();
        assert_eq!((info.epoch, info.members.len()), (epoch, 3));
    }
    alice.rotate_keys(&team).await.unwrap();
    carol.sync().await.unwrap();
    let mut bob = reopen(dir.path(), "bob").await;
    bob.sync().await.unwrap();
    let (now, members) = converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    assert_eq!((now, members), (epoch + 1, 3), "alice's change (the second claim) won");
    message_reaches(&team, &mut carol, &mut [&mut alice, &mut bob], "room for alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winning_commit_withheld_from_a_member_is_taken_from_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ([mut alice, mut bob, carol], team) =
        team(&server, dir.path(), ["alice", "bob", "carol"]).await;
    let epoch = alice.group_info(&team).await.unwrap().epoch;
    drop(carol);

    alice.rotate_keys(&team).await.unwrap();
    // The server withholds the commit from carol: her copy is taken out of her queue.
    let thief = stolen(&server, dir.path(), "carol").await;
    let carol_token = token(&thief);
    let queued = thief.raw.fetch(100).await.unwrap();
    let commit = queued.iter().find(|e| is_commit(&e.data)).expect("carol's copy");
    thief.raw.ack(commit.seq).await.unwrap();
    assert!(thief.raw.fetch(100).await.unwrap().is_empty());
    drop(thief);

    let mut carol = reopen(dir.path(), "carol").await;
    alice.send_text(&team, "in the new epoch").await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(texts(&carol, &team).last().unwrap(), "in the new epoch");
    bob.sync().await.unwrap();
    let (now, _) = converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    assert_eq!(now, epoch + 1);

    // Again with carol's session running (her first-sync look at the slots is done): only a
    // message of the later epoch tells her she missed a commit.
    alice.rotate_keys(&team).await.unwrap();
    let raw = server.client().await.unwrap();
    raw.resume(&carol_token).await.unwrap();
    let queued = raw.fetch(100).await.unwrap();
    let commit = queued.iter().find(|e| is_commit(&e.data)).expect("carol's copy");
    raw.ack(commit.seq).await.unwrap();
    alice.send_text(&team, "two epochs on").await.unwrap();
    let mut events = carol.subscribe();
    carol.sync().await.unwrap();
    let mut gap = false;
    while let Ok(e) = events.try_recv() {
        gap |= matches!(e, Event::Gap { .. });
    }
    assert!(gap, "carol noticed the hole in her queue");
    assert_eq!(texts(&carol, &team).last().unwrap(), "two epochs on");
    bob.sync().await.unwrap();
    let (now, _) = converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    assert_eq!(now, epoch + 2);
    message_reaches(&team, &mut carol, &mut [&mut alice, &mut bob], "caught up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_claim_whose_first_answer_was_lost_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ([mut alice, mut bob, carol], team) =
        team(&server, dir.path(), ["alice", "bob", "carol"]).await;
    let epoch = alice.group_info(&team).await.unwrap().epoch;
    drop(carol);

    // alice's change cannot go out: it stays pending in her vault.
    alice.disconnect().await;
    assert!(alice.rotate_keys(&team).await.is_err(), "offline");
    drop(alice);

    // Its first try reached the server, but the answer was lost: here it is, sent from the
    // record exactly as her client would send it.
    let (slot, commit) = {
        let vault =
            Vault::open(&store(dir.path(), "alice"), passphrase("alice").as_bytes()).unwrap();
        let key = [b"commit/".as_slice(), &team].concat();
        let record = vault.get(Space::State, &key).unwrap().expect("the pending commit's record");
        // The stored form (core/src/client/records.rs): 0x01 ‖ len ‖ metadata JSON ‖ len ‖
        // commit ‖ Welcome.
        assert_eq!(record[0], 0x01, "a pending commit in the binary form");
        let part = |at: usize| -> (&[u8], usize) {
            let len = u32::from_be_bytes(record[at..at + 4].try_into().unwrap()) as usize;
            (&record[at + 4..at + 4 + len], at + 4 + len)
        };
        let (meta, next) = part(1);
        let commit = part(next).0.to_vec();
        let record: serde_json::Value = serde_json::from_slice(meta).unwrap();
        let bytes = |v: &serde_json::Value| -> Vec<u8> {
            v.as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect()
        };
        let slot: [u8; 16] = bytes(&record["slot"]).try_into().unwrap();
        let to: Vec<[u8; 32]> = record["commit_to"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| bytes(k).try_into().unwrap())
            .collect();
        let id: [u8; 16] = bytes(&record["message_id"]).try_into().unwrap();
        assert_eq!(to.len(), 2);
        let raw = server.client().await.unwrap();
        raw.resume(&vault.get(Space::Account, b"token").unwrap().unwrap()).await.unwrap();
        let r = claim_as(&raw, slot, commit.clone(), &to, id).await;
        assert!(r.stored && !r.duplicate && r.position == 0, "{r:?}");
        (slot, commit)
    };

    // Her client sends it again on the next flush: the same claim, recognised as such.
    let mut alice = reopen(dir.path(), "alice").await;
    alice.flush_outbox().await.unwrap();
    assert_eq!(alice.group_info(&team).await.unwrap().epoch, epoch + 1, "alice merged it");

    // The slot holds one claim, and carol's queue one copy.
    let thief = stolen(&server, dir.path(), "carol").await;
    let listed = claims(&thief.raw, slot).await;
    assert_eq!((listed.total, listed.claims), (1, vec![commit.clone()]));
    let queued = thief.raw.fetch(100).await.unwrap();
    let copies = queued.iter().filter(|e| is_commit(&e.data)).count();
    assert_eq!(copies, 1, "the retry was not enqueued again");
    drop(thief);

    let mut carol = reopen(dir.path(), "carol").await;
    for m in [&mut bob, &mut carol] {
        let seen = sync_rejecting(m).await;
        assert!(seen.is_empty(), "{}: {seen:?}", m.username());
    }
    let (now, members) = converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    assert_eq!((now, members), (epoch + 1, 3));
    message_reaches(&team, &mut alice, &mut [&mut bob, &mut carol], "sent once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admins_racing_end_in_one_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let dave = account(&server, dir.path(), "dave").await;
    let dave_key = dave.identity_key().to_bytes();
    drop(dave);
    let ([mut alice, mut bob, mut carol], team) =
        team(&server, dir.path(), ["alice", "bob", "carol"]).await;
    alice.set_admin(&team, "bob", true).await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let info = bob.group_info(&team).await.unwrap();
    assert!(info.members.iter().any(|m| m.1 == "bob" && m.2), "bob is an admin");
    let epoch = info.epoch;

    // alice changes the group; bob, who has not seen it, changes it too, from epoch e.
    alice.rotate_keys(&team).await.unwrap();
    let mut events = bob.subscribe();
    bob.add_members(&team, &["dave".into()]).await.unwrap();
    let seen = rejections(&mut events);
    assert!(
        mentions(&seen, "your change was made again on top of theirs"),
        "bob was told his change was redone: {seen:?}"
    );
    assert_eq!(bob.group_info(&team).await.unwrap().epoch, epoch + 2, "alice's, then bob's");

    alice.sync().await.unwrap();
    carol.sync().await.unwrap();
    let mut dave = reopen(dir.path(), "dave").await;
    dave.sync().await.unwrap();
    let (now, members) = converged(&team, &mut [&mut alice, &mut bob, &mut carol, &mut dave]).await;
    assert_eq!((now, members), (epoch + 2, 4));
    assert!(alice.group_info(&team).await.unwrap().members.iter().any(|m| m.0 == dave_key));
    message_reaches(&team, &mut alice, &mut [&mut bob, &mut carol, &mut dave], "all four").await;
}

/// A message sent in an epoch that another member's commit then wins is not lost: members that
/// applied the commit before the message reached them cannot decrypt it, so its sender sends it
/// again in the new epoch once it applies the winner; members that did read it ignore the
/// repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_in_a_superseded_epoch_arrives_once_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ([mut alice, mut bob, mut carol], team) =
        team(&server, dir.path(), ["alice", "bob", "carol"]).await;
    let epoch = alice.group_info(&team).await.unwrap().epoch;

    // bob writes in epoch e; carol reads it there. alice has not synced: she commits from e,
    // wins, and meets bob's message only in e + 1, too late to decrypt it.
    bob.send_text(&team, "read by carol in time").await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(texts(&carol, &team), ["read by carol in time"]);
    alice.rotate_keys(&team).await.unwrap();
    // Still in e, bob writes once more: nobody in e + 1 can read this one.
    bob.send_text(&team, "sent after the commit won").await.unwrap();
    alice.sync().await.unwrap();
    assert!(texts(&alice, &team).is_empty(), "{:?}", texts(&alice, &team));

    // bob applies alice's commit from the slot and sends both again in e + 1.
    bob.sync().await.unwrap();
    assert_eq!(bob.group_info(&team).await.unwrap().epoch, epoch + 1);
    assert_eq!(bob.outbox_len().unwrap(), 0, "the repeats went out");
    alice.sync().await.unwrap();
    carol.sync().await.unwrap();
    let want = ["read by carol in time", "sent after the commit won"];
    assert_eq!(texts(&alice, &team), want);
    assert_eq!(texts(&carol, &team), want, "each once: the repeat is recognised");
    assert_eq!(texts(&bob, &team), want, "bob's own history is unchanged");
    converged(&team, &mut [&mut alice, &mut bob, &mut carol]).await;
    message_reaches(&team, &mut carol, &mut [&mut alice, &mut bob], "and on we go").await;
}
