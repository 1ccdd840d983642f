//! The client engine end to end: three accounts, DMs and groups with MLS (X-Wing), roles,
//! removal, offline delivery, restarts, the outbox, file transfer with a resumed upload,
//! wrong passphrases, tampered ciphertext, and no plaintext on the server's disk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qpq_core::client::{Client, ClientError, Event};
use qpq_core::content::Body;
use qpq_core::ids::GroupId;
use qpq_core::mls::GroupError;
use qpq_core::vault::{Space, Vault, VaultError};
use qpq_proto::{method, v1};
use qpq_tests::engine::{Stolen, account, account_at, reopen, stolen, store, team_of_three, texts};
use qpq_tests::{ServerProcess, message_id};

/// Server flags for tests whose accounts register, log in and reconnect (the thief's raw
/// connections, reopened clients) many times from 127.0.0.1: the default per-address
/// authentication budget runs out, and then refuses even a valid Resume.
const AUTH: [&str; 4] =
    ["--set", "limits.auth_per_ip_burst=1000", "--set", "limits.auth_per_ip_per_min=1000"];

fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// Every plaintext sent must be absent from the server's database and the clients' stores.
fn assert_no_plaintext(files: &[PathBuf], plaintexts: &[&str]) {
    for f in files {
        for p in plaintexts {
            assert!(!file_contains(f, p.as_bytes()), "{p:?} found in {}", f.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_group_roles_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let mut alice = account(&server, dir.path(), "alice").await;
    let mut bob = account(&server, dir.path(), "bob").await;
    let mut carol = account(&server, dir.path(), "carol").await;

    // DM.
    let dm = alice.dm("bob").await.unwrap();
    alice.send_text(&dm, "hello bob, dm secret 1").await.unwrap();
    bob.sync().await.unwrap();
    let bob_dm = bob.find_conversation("alice").unwrap();
    assert_eq!(bob_dm.id, dm);
    assert_eq!(texts(&bob, &dm), ["hello bob, dm secret 1"]);
    bob.send_text(&dm, "hi alice, dm secret 2").await.unwrap();
    alice.sync().await.unwrap();
    assert_eq!(texts(&alice, &dm), ["hello bob, dm secret 1", "hi alice, dm secret 2"]);
    assert_eq!(alice.dm("bob").await.unwrap(), dm, "the DM is found again, not recreated");
    assert_eq!(
        alice.safety_number("bob").await.unwrap(),
        bob.safety_number("alice").await.unwrap()
    );

    // A group of three with alice as admin.
    let team = alice.create_group("team").await.unwrap();
    alice.add_members(&team, &["bob".into(), "carol".into()]).await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(carol.find_conversation("team").unwrap().id, team, "the group name arrived");
    alice.send_text(&team, "group secret 3").await.unwrap();
    carol.sync().await.unwrap();
    carol.send_text(&team, "group secret 4").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, &team), ["group secret 3", "group secret 4"]);
    let info = bob.group_info(&team).await.unwrap();
    assert_eq!(info.members.len(), 3);
    assert!(info.members.iter().any(|(_, n, admin)| n == "alice" && *admin));
    assert!(info.members.iter().any(|(_, n, admin)| n == "bob" && !*admin));
    alice.sync().await.unwrap();
    carol.sync().await.unwrap();
    let code = alice.group_info(&team).await.unwrap().verification_code;
    assert_eq!(code, info.verification_code);
    assert_eq!(code, carol.group_info(&team).await.unwrap().verification_code);

    // A non-admin cannot change membership.
    let e = bob.remove_member(&team, "carol").await.unwrap_err();
    assert!(matches!(e, ClientError::Group(GroupError::NotAdmin)), "{e}");

    // Removal: carol gets nothing sent after it.
    alice.remove_member(&team, "carol").await.unwrap();
    alice.send_text(&team, "group secret 5, not for carol").await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(
        texts(&bob, &team),
        ["group secret 3", "group secret 4", "group secret 5, not for carol"]
    );
    assert_eq!(texts(&carol, &team), ["group secret 3", "group secret 4"]);
    assert!(carol.send_text(&team, "am I still here?").await.is_err(), "carol's group is gone");

    // Promote bob; now he may rename and add.
    alice.set_admin(&team, "bob", true).await.unwrap();
    bob.sync().await.unwrap();
    bob.rename(&team, "crew", Some("launch")).await.unwrap();
    alice.sync().await.unwrap();
    let c = alice.conversation(&team).unwrap().unwrap();
    assert_eq!((c.name.as_str(), c.topic.as_str()), ("crew", "launch"));

    let plaintexts =
        ["dm secret 1", "dm secret 2", "group secret 3", "group secret 4", "group secret 5"];
    let mut files = vec![server.data_dir.join("qpq.redb")];
    files.extend(["alice", "bob", "carol"].iter().map(|n| store(dir.path(), n)));
    drop((alice, bob, carol));
    assert_no_plaintext(&files, &plaintexts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_everything_once_in_order_and_restarts_keep_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let mut alice = account(&server, dir.path(), "alice").await;
    let bob = account(&server, dir.path(), "bob").await;
    drop(bob); // bob goes offline

    let team = alice.create_group("team").await.unwrap();
    alice.add_members(&team, &["bob".into()]).await.unwrap();
    for i in 0..20 {
        alice.send_text(&team, &format!("m{i}")).await.unwrap();
    }
    let mut bob = reopen(dir.path(), "bob").await;
    bob.sync().await.unwrap();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&bob, &team), want);
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, &team).len(), 20, "nothing twice");

    // Both restart: history and group state survive.
    drop((alice, bob));
    let mut alice = reopen(dir.path(), "alice").await;
    let mut bob = reopen(dir.path(), "bob").await;
    assert_eq!(texts(&alice, &team).len(), 20);
    bob.send_text(&team, "after restart").await.unwrap();
    alice.sync().await.unwrap();
    assert_eq!(texts(&alice, &team).last().unwrap(), "after restart");
    alice.send_text(&team, "and back").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, &team).last().unwrap(), "and back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_typed_offline_go_out_once_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let mut server = ServerProcess::start(&server_dir, &[]).unwrap();
    let addr = server.addr;
    let mut alice = account(&server, dir.path(), "alice").await;
    let mut bob = account(&server, dir.path(), "bob").await;
    for c in [&mut alice, &mut bob] {
        c.set_idle_timeout(Duration::from_secs(1));
        c.disconnect().await;
        c.ensure_connected().await.unwrap();
    }
    let dm = alice.dm("bob").await.unwrap();
    alice.send_text(&dm, "online").await.unwrap();

    server.kill();
    alice.send_text(&dm, "typed while the server was down").await.unwrap();
    assert_eq!(alice.outbox_len().unwrap(), 1);
    let _server = ServerProcess::start_on(&server_dir, &addr.to_string(), &[]).unwrap();
    alice.ensure_connected().await.unwrap();
    assert_eq!(alice.outbox_len().unwrap(), 0);
    alice.flush_outbox().await.unwrap();
    bob.ensure_connected().await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, &dm), ["online", "typed while the server was down"]);
    assert!(!alice.history(&dm, 10).unwrap().iter().any(|e| e.pending));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabyte_file_with_a_resumed_upload() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let server = Arc::new(Mutex::new(ServerProcess::start(&server_dir, &[]).unwrap()));
    let (addr, pin) = {
        let s = server.lock().unwrap();
        (s.addr, s.fingerprint.clone())
    };
    let mut alice = account_at(addr, &pin, dir.path(), "alice").await;
    let mut bob = account_at(addr, &pin, dir.path(), "bob").await;
    for c in [&mut alice, &mut bob] {
        c.set_idle_timeout(Duration::from_secs(1));
        c.disconnect().await;
        c.ensure_connected().await.unwrap();
    }
    let dm = alice.dm("bob").await.unwrap();

    let content: Vec<u8> =
        (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let path = dir.path().join("report.bin");
    std::fs::write(&path, &content).unwrap();

    // After the first chunk the server dies and comes back: the upload must resume.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (srv, log, dir2) = (server.clone(), seen.clone(), server_dir.clone());
    alice.set_progress_hook(Some(Box::new(move |done, _total| {
        let mut log = log.lock().unwrap();
        log.push(done);
        if log.len() == 1 {
            let mut s = srv.lock().unwrap();
            s.kill();
            *s = ServerProcess::start_on(&dir2, &addr.to_string(), &[]).unwrap();
        }
    })));
    let offer = alice.send_file(&dm, &path).await.unwrap();
    let progress = seen.lock().unwrap().clone();
    assert!(progress.len() >= 3, "{progress:?}");
    let first = progress[0];
    assert!(first > 0 && first < offer.ciphertext_size);
    assert!(progress[1..].iter().all(|d| *d > first), "resumed, not restarted: {progress:?}");
    assert_eq!(*progress.last().unwrap(), offer.ciphertext_size);

    bob.ensure_connected().await.unwrap();
    bob.sync().await.unwrap();
    let entry =
        bob.history(&dm, 10).unwrap().into_iter().find(|e| e.file.is_some()).expect("offer");
    let offer = Client::offer_of(&entry).unwrap();
    assert_eq!(offer.size, 5_000_000);
    let saved = bob.download(&offer, &dir.path().join("downloads")).await.unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), content);
    // The server only ever held ciphertext.
    let blob = std::fs::read_dir(server_dir.join("blobs")).unwrap().next().unwrap().unwrap().path();
    assert!(!file_contains(&blob, &content[1000..1064]));
}

/// The part file of `dir` (there is one while a download is unfinished).
fn part_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".qpq-part"))
}

/// Starts `bob` downloading `offer` into `dir` and drops the download once its first chunk is
/// on disk, as a lost connection or a stopped program would.
async fn cut_off_download(bob: &mut Client, offer: &qpq_core::content::FileOffer, dir: &Path) {
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    bob.set_progress_hook(Some(Box::new(move |done, _| {
        let _ = tx.send(done);
    })));
    tokio::select! {
        r = bob.download(offer, dir) => panic!("the download finished before it was cut off: {r:?}"),
        _ = rx.wait_for(|done| *done > 0) => {}
    }
    bob.set_progress_hook(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_and_a_bad_part_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let mut alice = account(&server, dir.path(), "alice").await;
    let mut bob = account(&server, dir.path(), "bob").await;
    let dm = alice.dm("bob").await.unwrap();
    let content: Vec<u8> = (0..3_500_000u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    let path = dir.path().join("photos.tar");
    std::fs::write(&path, &content).unwrap();
    alice.send_file(&dm, &path).await.unwrap();
    bob.sync().await.unwrap();
    let entry =
        bob.history(&dm, 10).unwrap().into_iter().find(|e| e.file.is_some()).expect("offer");
    let offer = Client::offer_of(&entry).unwrap();
    let record = |bob: &mut Client| {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        bob.set_progress_hook(Some(Box::new(move |done, _| log.lock().unwrap().push(done))));
        seen
    };

    // Cut off after the first chunk: the part file keeps it, and the next try goes on from it.
    let first = dir.path().join("first");
    cut_off_download(&mut bob, &offer, &first).await;
    let held = std::fs::metadata(part_file(&first).expect("a part file")).unwrap().len();
    assert!(held > 0 && held < offer.ciphertext_size, "part holds {held} bytes");
    let seen = record(&mut bob);
    let saved = bob.download(&offer, &first).await.unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), content);
    let progress = seen.lock().unwrap().clone();
    assert!(progress[0] > held, "resumed after {held} bytes, not restarted: {progress:?}");
    assert!(part_file(&first).is_none(), "the part file is gone once the file is saved");

    // A part that does not match (here: overwritten) is discovered at the end, discarded, and
    // the download starts over once, by itself.
    let second = dir.path().join("second");
    cut_off_download(&mut bob, &offer, &second).await;
    let part = part_file(&second).expect("a part file");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&part, &bytes).unwrap();
    let seen = record(&mut bob);
    let saved = bob.download(&offer, &second).await.unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), content);
    let progress = seen.lock().unwrap().clone();
    assert!(progress.windows(2).any(|w| w[1] < w[0]), "started over: {progress:?}");
    assert!(part_file(&second).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passphrase_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let alice = account(&server, dir.path(), "alice").await;
    drop(alice);
    let before = std::fs::read(store(dir.path(), "alice")).unwrap();
    match Client::open(&store(dir.path(), "alice"), "not the passphrase") {
        Err(ClientError::Vault(VaultError::WrongPassphrase)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened with the wrong passphrase"),
    }
    assert!(std::fs::read(store(dir.path(), "alice")).unwrap() == before);
    reopen(dir.path(), "alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertext_is_rejected_and_the_group_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let mut alice = account(&server, dir.path(), "alice").await;
    let mut bob = account(&server, dir.path(), "bob").await;
    let dm = alice.dm("bob").await.unwrap();
    bob.sync().await.unwrap();
    drop(bob);
    alice.send_text(&dm, "original").await.unwrap();

    // An attacker with access to bob's queue swaps the message for a tampered copy.
    let token = {
        let v = Vault::open(&store(dir.path(), "bob"), b"bob passphrase").unwrap();
        v.get(Space::Account, b"token").unwrap().unwrap().to_vec()
    };
    let raw = server.client().await.unwrap();
    raw.resume(&token).await.unwrap();
    let queued = raw.fetch(10).await.unwrap();
    assert_eq!(queued.len(), 1);
    let mut tampered = queued[0].data.clone();
    let n = tampered.len();
    tampered[n - 5] ^= 0x01;
    raw.ack(queued[0].seq).await.unwrap();
    let mallory = server.client().await.unwrap();
    let mid = qpq_tests::identity();
    mallory.register("mallory", "pw", &mid, "").await.unwrap();
    mallory.login("mallory", "pw", &mid).await.unwrap();
    let bob_id: v1::ResolveUserResponse = mallory
        .call(method::RESOLVE_USER, &v1::ResolveUserRequest { username: "bob".into() })
        .await
        .unwrap();
    let bob_key: [u8; 32] = bob_id.identity_key.try_into().unwrap();
    mallory.enqueue(&bob_key, &tampered, message_id()).await.unwrap();

    let mut bob = reopen(dir.path(), "bob").await;
    let mut events = bob.subscribe();
    bob.sync().await.unwrap();
    assert!(texts(&bob, &dm).is_empty(), "nothing from the tampered message was stored");
    let mut rejected = false;
    while let Ok(e) = events.try_recv() {
        rejected |= matches!(e, Event::Rejected { .. });
    }
    assert!(rejected, "the engine reported the rejection");
    alice.send_text(&dm, "still fine").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, &dm), ["still fine"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_commit_from_a_non_admin_is_rejected_by_the_others() {
    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
    use openmls::prelude::{GroupId, MlsGroup, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion};
    use openmls_traits::OpenMlsProvider as _;
    use qpq_core::mls::QpqProvider;

    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &AUTH).unwrap();
    let dave = account(&server, dir.path(), "dave").await;
    let dave_key = dave.identity_key();
    drop(dave);
    let (mut alice, bob, mut carol, team) = team_of_three(&server, dir.path()).await;
    let epoch = alice.group_info(&team).await.unwrap().epoch;
    drop(bob);

    // Bob's device is compromised: the attacker uses his keys and MLS state directly to commit
    // an Add of dave, which his own client would refuse to make, and claims the epoch's commit
    // slot with it before anyone else (a commit outside the slot would simply be ignored).
    let thief = stolen(&server, dir.path(), "bob").await;
    let slot = thief.mls().slot(&team).unwrap();
    let Stolen { vault, identity, raw } = thief;
    let provider = QpqProvider::new(vault);
    let kp: v1::FetchKeyPackageResponse = raw
        .call(
            method::FETCH_KEY_PACKAGE,
            &v1::FetchKeyPackageRequest { identity_key: dave_key.to_vec() },
        )
        .await
        .unwrap();
    let kp = match MlsMessageIn::tls_deserialize_exact(kp.package.as_slice()).unwrap().extract() {
        MlsMessageBodyIn::KeyPackage(kp) => {
            kp.validate(provider.crypto(), ProtocolVersion::Mls10).unwrap()
        }
        _ => panic!("not a KeyPackage"),
    };
    let mut group =
        MlsGroup::load(provider.storage(), &GroupId::from_slice(&team)).unwrap().unwrap();
    let (commit, _welcome, _) = group.add_members(&provider, &identity, &[kp]).unwrap();
    let forged = commit.tls_serialize_detached().unwrap();
    let req = v1::ClaimSlotRequest {
        slot: slot.to_vec(),
        payload: forged.clone(),
        recipient_keys: vec![alice.identity_key().to_vec(), carol.identity_key().to_vec()],
        message_id: message_id().to_vec(),
    };
    let claim: v1::ClaimSlotResponse = raw.call(method::CLAIM_SLOT, &req).await.unwrap();
    assert!(claim.stored && claim.position == 0, "the forgery is the slot's first claim");
    drop((group, provider, raw));

    for c in [&mut alice, &mut carol] {
        let mut events = c.subscribe();
        c.sync().await.unwrap();
        let mut rejected = false;
        while let Ok(e) = events.try_recv() {
            rejected |= matches!(&e, Event::Rejected { reason } if reason.contains("non-admin"));
        }
        assert!(rejected, "{} did not reject the forged commit", c.username());
        let info = c.group_info(&team).await.unwrap();
        assert_eq!(info.epoch, epoch, "{}: the commit was not merged", c.username());
        assert_eq!(info.members.len(), 3);
        assert!(!info.members.iter().any(|(id, _, _)| *id == dave_key));
    }
    alice.send_text(&team, "after the forgery").await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(texts(&carol, &team), ["after the forgery"]);

    // The forgery holds the slot's first place, but alice's real change (the second claim)
    // wins for everyone: each member skips the invalid claim alike.
    alice.rotate_keys(&team).await.unwrap();
    carol.sync().await.unwrap();
    let mut bob = reopen(dir.path(), "bob").await;
    bob.sync().await.unwrap();
    let code = alice.group_info(&team).await.unwrap().verification_code;
    for c in [&mut alice, &mut bob, &mut carol] {
        let info = c.group_info(&team).await.unwrap();
        assert_eq!(info.epoch, epoch + 1, "{} is not in alice's epoch", c.username());
        assert_eq!(info.verification_code, code, "{} is on another branch", c.username());
        assert!(!info.members.iter().any(|(id, _, _)| *id == dave_key));
    }
    // The slot holds both claims, the forgery first (anyone logged in may read it).
    let reader = stolen(&server, dir.path(), "dave").await;
    let listed: v1::FetchSlotResponse = reader
        .raw
        .call(method::FETCH_SLOT, &v1::FetchSlotRequest { slot: slot.to_vec(), from: 0 })
        .await
        .unwrap();
    assert_eq!(listed.total, 2, "the forgery, then alice's rotation");
    assert_eq!(listed.claims[0], forged);
    drop(reader);
    bob.send_text(&team, "one group").await.unwrap();
    for c in [&mut alice, &mut carol] {
        c.sync().await.unwrap();
        assert_eq!(texts(c, &team).last().unwrap(), "one group");
    }
}

/// Sends `body` into `conv` as `name`, past its client's own checks (a modified client): the
/// content is encrypted with the MLS state in `name`'s vault and enqueued over a raw
/// connection. `name`'s `Client` must be dropped first.
async fn forge(server: &ServerProcess, dir: &Path, name: &str, conv: &[u8], body: Body) {
    use qpq_core::content::Content;
    use qpq_core::mls::Mls;

    let Stolen { vault, identity, raw } = stolen(server, dir, name).await;
    let mls = Mls::new(vault, identity);
    let (ciphertext, to) = mls.encrypt(conv, &Content::new(body, 1).encode().unwrap()).unwrap();
    let req = v1::BatchEnqueueRequest {
        recipient_keys: to.iter().map(|k| k.to_vec()).collect(),
        payload: ciphertext,
        message_id: message_id().to_vec(),
        ..Default::default()
    };
    let _: v1::BatchEnqueueResponse = raw.call(method::BATCH_ENQUEUE, &req).await.unwrap();
}

/// Syncs `c` and returns whether it reported a rejected message mentioning `needle`.
async fn syncs_rejecting(c: &mut Client, needle: &str) -> bool {
    let mut events = c.subscribe();
    c.sync().await.unwrap();
    let mut rejected = false;
    while let Ok(e) = events.try_recv() {
        rejected |= matches!(&e, Event::Rejected { reason } if reason.contains(needle));
    }
    rejected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_admin_renames_a_group_and_nobody_renames_a_dm() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let (mut alice, mut bob, mut carol, team) = team_of_three(&server, dir.path()).await;
    let dm = bob.dm("carol").await.unwrap();
    carol.sync().await.unwrap();
    let name = |c: &Client, conv: &GroupId| c.conversation(conv).unwrap().unwrap().name;
    let dm_name = name(&carol, &dm);
    let meta = |name: &str| Body::Meta { name: name.into(), topic: String::new() };

    // Bob is a member but no admin, and a DM has no name to set: his client refuses both.
    match bob.send(&team, meta("bob's now")).await {
        Err(ClientError::Group(GroupError::NotAdmin)) => {}
        other => panic!("a non-admin's rename got {other:?}"),
    }
    assert!(matches!(bob.send(&dm, meta("renamed")).await, Err(ClientError::NotAGroup)));
    assert_eq!(name(&bob, &team), "team", "not even bob's own copy changes");
    // A modified client sends them anyway: the others reject them and change nothing.
    drop(bob);
    forge(&server, dir.path(), "bob", &team, meta("bob's now")).await;
    for c in [&mut alice, &mut carol] {
        assert!(syncs_rejecting(c, "not an admin").await, "{} took the rename", c.username());
        assert_eq!(name(c, &team), "team", "{} took a non-admin's rename", c.username());
    }
    forge(&server, dir.path(), "bob", &dm, meta("renamed")).await;
    assert!(syncs_rejecting(&mut carol, "direct conversation").await);
    assert_eq!(name(&carol, &dm), dm_name);

    // The admin's rename is taken.
    alice.rename(&team, "core team", Some("weekly sync")).await.unwrap();
    carol.sync().await.unwrap();
    let c = carol.conversation(&team).unwrap().unwrap();
    assert_eq!((c.name.as_str(), c.topic.as_str()), ("core team", "weekly sync"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_server_certificate_is_a_loud_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let addr = server.addr;
    let alice = account(&server, dir.path(), "alice").await;
    drop(alice);
    server.kill();
    // Another server (another certificate) now answers on the same address.
    let _impostor =
        ServerProcess::start_on(&dir.path().join("impostor"), &addr.to_string(), &[]).unwrap();
    let mut alice = Client::open(&store(dir.path(), "alice"), "alice passphrase").unwrap();
    match alice.connect().await {
        Err(ClientError::Net(e @ qpq_core::client::net::NetError::CertificateChanged { .. })) => {
            assert!(e.to_string().contains("CERTIFICATE CHANGED"), "{e}");
        }
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_takes_effect_when_an_admin_commits_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let (mut alice, mut bob, mut carol, team) = team_of_three(&server, dir.path()).await;

    bob.leave(&team).await.unwrap();
    assert!(bob.conversation(&team).unwrap().is_none(), "bob forgot the group");
    carol.sync().await.unwrap(); // a non-admin only queues the proposal
    assert_eq!(carol.group_info(&team).await.unwrap().members.len(), 3);
    alice.sync().await.unwrap(); // the admin commits it
    assert_eq!(alice.group_info(&team).await.unwrap().members.len(), 2);
    carol.sync().await.unwrap();
    let info = carol.group_info(&team).await.unwrap();
    assert_eq!(info.members.len(), 2);
    assert!(info.members.iter().all(|(_, n, _)| n != "bob"));
    assert_eq!(info.verification_code, alice.group_info(&team).await.unwrap().verification_code);
    alice.send_text(&team, "just us now").await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(texts(&carol, &team).last().unwrap(), "just us now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_proposals_extension_changes_and_typing_channel_commits_are_rejected() {
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls::prelude::{GroupId, MlsGroup};
    use openmls_traits::OpenMlsProvider as _;
    use qpq_core::mls::{GroupPolicy, Kind, QpqProvider};

    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &AUTH).unwrap();
    let (mut alice, bob, mut carol, team) = team_of_three(&server, dir.path()).await;
    // alice's first sync of the session also looks at the slot: have it done, so that each
    // forgery below is reported exactly once.
    alice.sync().await.unwrap();
    let before = alice.group_info(&team).await.unwrap();
    let bob_key = bob.identity_key();
    let others = vec![alice.identity_key().to_vec(), carol.identity_key().to_vec()];
    drop(bob);

    // bob's device is compromised: raw openmls with his keys and MLS state. Commits go to the
    // current epoch's slot (where members look for them), proposals to the queues.
    let thief = stolen(&server, dir.path(), "bob").await;
    let slot = thief.mls().slot(&team).unwrap();
    let Stolen { vault, identity, raw } = thief;
    let provider = QpqProvider::new(vault);
    let load = || MlsGroup::load(provider.storage(), &GroupId::from_slice(&team)).unwrap().unwrap();
    let bob_only =
        GroupPolicy { kind: Kind::Group, admins: vec![bob_key.to_bytes()] }.extensions().unwrap();
    let mut forged = Vec::new();
    // By reference: "make bob the only admin", "remove carol", for an admin to commit.
    let mut group = load();
    let (p, _) =
        group.propose_group_context_extensions(&provider, bob_only.clone(), &identity).unwrap();
    forged.push(p.tls_serialize_detached().unwrap());
    let carol_leaf =
        group.members().find(|m| m.signature_key == carol.identity_key().to_vec()).unwrap().index;
    let (p, _) = group.propose_remove_member(&provider, &identity, carol_leaf).unwrap();
    forged.push(p.tls_serialize_detached().unwrap());
    for payload in forged {
        let req = v1::BatchEnqueueRequest {
            recipient_keys: others.clone(),
            payload,
            message_id: message_id().to_vec(),
            ..Default::default()
        };
        let _: v1::BatchEnqueueResponse = raw.call(method::BATCH_ENQUEUE, &req).await.unwrap();
    }
    // By value: bob commits the take-over himself, as the slot's first claim.
    group.clear_pending_proposals(provider.storage()).unwrap();
    let (c, _, _) = group.update_group_context_extensions(&provider, bob_only, &identity).unwrap();
    let req = v1::ClaimSlotRequest {
        slot: slot.to_vec(),
        payload: c.tls_serialize_detached().unwrap(),
        recipient_keys: others.clone(),
        message_id: message_id().to_vec(),
    };
    let claim: v1::ClaimSlotResponse = raw.call(method::CLAIM_SLOT, &req).await.unwrap();
    assert!(claim.stored && claim.position == 0, "the take-over is the slot's first claim");
    // And a handshake message where typing indicators go (relayed to whoever is connected
    // now): bob's own removal, which an admin's client would commit if it were stored.
    group.clear_pending_commit(provider.storage()).unwrap();
    let leave = group.leave_group(&provider, &identity).unwrap();
    let relay = v1::RelayEphemeralRequest {
        recipient_keys: others.clone(),
        payload: leave.tls_serialize_detached().unwrap(),
        channel_id: Vec::new(),
    };
    let mut events: Vec<_> = [&alice, &carol].iter().map(|c| c.subscribe()).collect();
    let _: v1::RelayEphemeralResponse = raw.call(method::RELAY_EPHEMERAL, &relay).await.unwrap();

    for (c, events) in [&mut alice, &mut carol].into_iter().zip(events.iter_mut()) {
        c.wait(Duration::from_millis(300)).await.unwrap();
        c.sync().await.unwrap();
        let mut rejected = 0;
        while let Ok(e) = events.try_recv() {
            if let Event::Rejected { reason } = &e
                && (reason.contains("unauthorized proposal") || reason.contains("non-admin"))
            {
                rejected += 1;
            }
        }
        assert_eq!(rejected, 3, "{} rejected {rejected} of the 3 forgeries", c.username());
        let info = c.group_info(&team).await.unwrap();
        assert_eq!(info.epoch, before.epoch, "{}: something was merged", c.username());
        assert_eq!(info.verification_code, before.verification_code);
        let admins: Vec<_> = info.members.iter().filter(|m| m.2).map(|m| m.1.clone()).collect();
        assert_eq!(admins, ["alice"], "{}: roles changed", c.username());
        assert_eq!(info.members.len(), 3);
    }
    // Nothing waits to be committed, and the group works.
    alice.send_text(&team, "nothing changed").await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(texts(&carol, &team).last().unwrap(), "nothing changed");
    assert_eq!(carol.group_info(&team).await.unwrap().epoch, before.epoch);
}
