//! Formats are forever: the stores written by earlier releases open in this build and read
//! back everything they hold.
//!
//! `tests/fixtures/v0.1/data` was written by the v0.1 binaries (commit b63c7e5) through their
//! command lines (`tests/fixtures/make.sh`), and `v0.2` likewise by the build that
//! introduced server schema 2 and the vault's generation anchor, and `v0.3` by the one that introduced
//! commit slots (server schema 3): a server data directory (redb database,
//! blob, certificate and key) and alice's and bob's client stores, with a DM both ways, a group
//! with a message and a file offer, and one group message still queued on the server for bob.
//! This build's server serves the old database with the old certificate; this build's `qpq`
//! opens the old stores, shows their history, delivers the queued message from the old queue,
//! downloads the old blob, and the two still exchange new messages in the old MLS groups.
//! A later format change adds a migration and keeps this test green, and adds a fixture
//! directory of its own.

use std::path::Path;
use std::process::{Command, Stdio};

use qpq_tests::{ServerProcess, copy_dir, workspace_bin};

fn qpq(home: &Path, name: &str, server: &ServerProcess, args: &[&str]) -> String {
    let out = Command::new(workspace_bin("qpq"))
        .arg("--home")
        .arg(home)
        .arg("--server")
        .arg(server.addr.to_string())
        .args(args)
        .env("QPQ_PASSPHRASE", format!("{name} fixture passphrase"))
        .env("QPQ_PASSWORD", format!("{name} fixture password"))
        .env_remove("QPQ_HOME")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: qpq {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn v0_1_server_database_and_client_stores_open_and_read_back() {
    opens_and_reads_back("v0.1");
}

/// Server schema 2 (sender shares, handshake reserve), vaults with a generation counter and
/// their anchor files.
#[test]
fn v0_2_server_database_and_client_stores_open_and_read_back() {
    opens_and_reads_back("v0.2");
}

/// Server schema 3 (commit slots, with a claim waiting for bob), vaults whose pending-commit
/// records carry a slot and an intent.
#[test]
fn v0_3_server_database_and_client_stores_open_and_read_back() {
    opens_and_reads_back("v0.3");
}

fn opens_and_reads_back(version: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(version).join("data");
    // Every file of the set must be there (a *.redb once went missing to .gitignore).
    for f in [
        "server/qpq.redb",
        "server/server-key.der",
        "alice/account.qpq",
        "bob/account.qpq",
        "made_at",
    ] {
        assert!(fixture.join(f).is_file(), "the {version} fixture lacks {f}");
    }
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join("server/server-key.der");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // The server runs on the fixture's day (`made_at`: when the set was committed, shortly
    // after it was made, in Unix seconds): what the database holds expires after days (queued
    // messages, blobs, commit slots), and this test must pass on any later date.
    let made_at: i64 = std::fs::read_to_string(dir.path().join("made_at"))
        .expect("every fixture set has a made_at")
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        as i64;
    let offset = (made_at + 3600 - now).min(0).to_string();
    let server = ServerProcess::start_env(
        &dir.path().join("server"),
        &[],
        &[("QPQ_TEST_CLOCK_OFFSET_SECS", offset)],
    )
    .unwrap();
    let expected_fp = std::fs::read_to_string(dir.path().join("fingerprint")).unwrap();
    assert_eq!(
        format!("sha256:{}", server.fingerprint),
        expected_fp.trim(),
        "the old certificate and key are served"
    );
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));

    let who = qpq(&alice, "alice", &server, &["whoami"]);
    assert!(who.contains("username alice") && who.contains(expected_fp.trim()), "{who}");

    // alice's history, read from the old store (before any network traffic).
    let dm = qpq(&alice, "alice", &server, &["tail", "bob"]);
    assert!(dm.contains("[alice] fixture: hello bob"), "{dm}");
    assert!(dm.contains("[bob] fixture: hi alice, café ✓"), "{dm}");
    let team = qpq(&alice, "alice", &server, &["tail", "team"]);
    assert!(team.contains("fixture: first team message"), "{team}");
    assert!(team.contains("file notes.txt (22 bytes)"), "{team}");
    assert!(team.contains("fixture: queued on the server for bob"), "{team}");

    // bob's store holds the first part; the last message waits in the old server queue.
    let before = qpq(&bob, "bob", &server, &["tail", "team"]);
    assert!(before.contains("fixture: first team message"), "{before}");
    qpq(&bob, "bob", &server, &["sync"]);
    let after = qpq(&bob, "bob", &server, &["tail", "team"]);
    assert!(after.contains("[alice] fixture: queued on the server for bob"), "{after}");
    // Both are in the same epoch of the group (for v0.3, through the slot in the old database).
    let code = |home: &Path, name: &str| {
        qpq(home, name, &server, &["group", "info", "team"])
            .lines()
            .find(|l| l.starts_with("verification "))
            .map(str::to_string)
    };
    assert_eq!(code(&alice, "alice"), code(&bob, "bob"));

    // The old blob downloads and decrypts.
    let downloads = dir.path().join("downloads");
    qpq(&bob, "bob", &server, &["download", "team", "--dir", downloads.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(downloads.join("notes.txt")).unwrap(),
        std::fs::read(dir.path().join("notes.txt")).unwrap()
    );

    // The old MLS groups keep working both ways.
    qpq(&bob, "bob", &server, &["send", "team", "new build, old group"]);
    qpq(&bob, "bob", &server, &["send", "alice", "new build, old DM"]);
    qpq(&alice, "alice", &server, &["sync"]);
    assert!(
        qpq(&alice, "alice", &server, &["tail", "team"]).contains("[bob] new build, old group")
    );
    assert!(qpq(&alice, "alice", &server, &["tail", "bob"]).contains("[bob] new build, old DM"));
    qpq(&alice, "alice", &server, &["group", "rotate", "team"]);
    qpq(&alice, "alice", &server, &["send", "team", "after a rotate"]);
    qpq(&bob, "bob", &server, &["sync"]);
    assert!(qpq(&bob, "bob", &server, &["tail", "team"]).contains("[alice] after a rotate"));
}
