//! A dishonest server, played by an operator who edits the server's database between runs
//! (the server keeps its promises only as far as its operator does): it hands out mallory's
//! KeyPackages as bob's, and later maps the name `bob` to mallory's account key. The real
//! `qpq` must notice both: the DM to "bob" is refused with a key-mismatch error and nothing
//! reaches mallory; after the remap every action that resolves `bob` stops with the blocking
//! key-changed warning, the safety number is refused rather than computed over mallory's key,
//! and only `qpq trust bob` (the user's explicit decision) accepts the new key.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use qpq_tests::{ServerProcess, qpq_command, register_account};
use redb::{ReadableTable, TableDefinition};

// The server's tables as the operator sees them with any redb tool.
const USERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("users");
const KEY_PACKAGES: TableDefinition<'_, (&[u8], u64), &[u8]> = TableDefinition::new("key_packages");

async fn register(server: &ServerProcess, dir: &Path, name: &str) -> (PathBuf, [u8; 32]) {
    let home = dir.join(name);
    let (pass, password) = (format!("{name}-pass"), format!("{name}-password"));
    let id = register_account(server, &home, name, &pass, &password).await;
    (home, id)
}

fn qpq(home: &Path, name: &str, server: &ServerProcess, args: &[&str]) -> Output {
    qpq_command(home, &format!("{name}-pass"), &format!("{name}-password"))
        .arg("--server")
        .arg(server.addr.to_string())
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "qpq failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "qpq succeeded where it had to refuse");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    err
}

/// Stops the server, lets `edit` change its database, and starts it again on the same port.
fn operator_edits(server: &mut ServerProcess, edit: impl FnOnce(&redb::Database)) {
    let (dir, addr) = (server.data_dir.clone(), server.addr);
    server.terminate(Duration::from_secs(10)).unwrap();
    {
        let db = redb::Database::open(dir.join("qpq.redb")).unwrap();
        edit(&db);
    }
    *server = ServerProcess::start_on(&dir, &addr.to_string(), &[]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn substituted_key_packages_and_a_remapped_name_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let (alice, _) = register(&server, dir.path(), "alice").await;
    let (bob, bob_id) = register(&server, dir.path(), "bob").await;
    let (mallory, mallory_id) = register(&server, dir.path(), "mallory").await;

    // alice learns bob's key first (trust on first use), before the server turns.
    let first = ok(&qpq(&alice, "alice", &server, &["verify", "bob"]));
    assert!(first.contains("safety number with bob"), "{first}");

    // 1. bob's KeyPackage stock is replaced by mallory's.
    operator_edits(&mut server, |db| {
        let txn = db.begin_write().unwrap();
        {
            let mut kps = txn.open_table(KEY_PACKAGES).unwrap();
            let mallorys: Vec<(u64, Vec<u8>)> = kps
                .range((mallory_id.as_slice(), 0)..=(mallory_id.as_slice(), u64::MAX))
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value().1, v.value().to_vec())
                })
                .collect();
            let bobs: Vec<u64> = kps
                .range((bob_id.as_slice(), 0)..=(bob_id.as_slice(), u64::MAX))
                .unwrap()
                .map(|r| r.unwrap().0.value().1)
                .collect();
            assert!(!mallorys.is_empty() && !bobs.is_empty());
            for (n, kp) in bobs.iter().zip(mallorys.iter().map(|(_, kp)| kp).cycle()) {
                kps.insert((bob_id.as_slice(), *n), kp.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    });
    let err =
        refused(&qpq(&alice, "alice", &server, &["dm", "bob", "for bob only"]), "KEY MISMATCH");
    assert!(err.contains("nothing was added"), "{err}");
    ok(&qpq(&mallory, "mallory", &server, &["sync"]));
    let unread = ok(&qpq(&mallory, "mallory", &server, &["unread", "--json"]));
    assert_eq!(unread.trim(), "[]", "mallory received something: {unread}");
    assert!(!ok(&qpq(&alice, "alice", &server, &["unread", "--json"])).contains("bob"));

    // 2. The name `bob` now resolves to mallory's account.
    operator_edits(&mut server, |db| {
        let txn = db.begin_write().unwrap();
        {
            let mut users = txn.open_table(USERS).unwrap();
            let mut record = users.get("bob").unwrap().unwrap().value().to_vec();
            // User: bytes identity (u32 BE length 32, then the key) | ...
            assert_eq!(&record[..4], &32u32.to_be_bytes());
            assert_eq!(&record[4..36], &bob_id);
            record[4..36].copy_from_slice(&mallory_id);
            users.insert("bob", record.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    });
    for args in [&["dm", "bob", "hello?"][..], &["verify", "bob"], &["group", "create", "t"]] {
        let out = qpq(&alice, "alice", &server, args);
        if args[0] == "group" {
            ok(&out);
            continue;
        }
        let err = refused(&out, "WARNING: the server now says bob is account");
        assert!(err.contains("qpq trust bob") && err.contains("Nothing was sent"), "{err}");
    }
    refused(&qpq(&alice, "alice", &server, &["group", "add", "t", "bob"]), "WARNING");
    ok(&qpq(&mallory, "mallory", &server, &["sync"]));
    assert_eq!(ok(&qpq(&mallory, "mallory", &server, &["unread", "--json"])).trim(), "[]");

    // The user decides: `trust` accepts the new key, shows both, and marks it unverified.
    let trusted = ok(&qpq(&alice, "alice", &server, &["trust", "bob"]));
    assert!(
        trusted.contains(&qpq_core::identity::hex(&mallory_id))
            && trusted.contains(&qpq_core::identity::hex(&bob_id)),
        "{trusted}"
    );
    let contacts = ok(&qpq(&alice, "alice", &server, &["contacts"]));
    assert!(contacts.contains("bob") && contacts.contains("unverified"), "{contacts}");
    let _ = bob;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_contacts_are_marked_and_a_tree_key_is_what_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let (alice, _) = register(&server, dir.path(), "alice").await;
    let (bob, _) = register(&server, dir.path(), "bob").await;
    ok(&qpq(&alice, "alice", &server, &["dm", "bob", "hi"]));
    ok(&qpq(&bob, "bob", &server, &["sync"]));
    let a = ok(&qpq(&alice, "alice", &server, &["verify", "bob"]));
    let b = ok(&qpq(&bob, "bob", &server, &["verify", "alice"]));
    let number = |s: &str| s.lines().nth(1).unwrap_or_default().to_string();
    assert_eq!(number(&a), number(&b), "both sides compute the same safety number");
    assert!(a.contains("--mark"), "{a}");
    let marked = ok(&qpq(&alice, "alice", &server, &["verify", "bob", "--mark"]));
    assert!(marked.contains("is verified"), "{marked}");
    assert!(ok(&qpq(&alice, "alice", &server, &["contacts"])).contains("bob"));
    assert!(ok(&qpq(&alice, "alice", &server, &["contacts"])).contains(" verified"));
    let unmarked = ok(&qpq(&alice, "alice", &server, &["verify", "bob", "--unmark"]));
    assert!(!unmarked.contains("is verified"), "{unmarked}");
}
