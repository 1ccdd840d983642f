//! Two real `qpq` terminal UIs in tmux against a real server: one types, the other's screen
//! shows the typing indicator, the message and a file offer (read with capture-pane).
//!
//! Ignored, with the reason, when no tmux was on PATH as the tests were built (`build.rs` sets
//! `qpq_no_tmux`); `.ci/run` installs it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qpq_tests::tmux::Tmux;
use qpq_tests::{ServerProcess, register_account};

async fn account(server: &ServerProcess, home: &Path, name: &str) {
    register_account(server, home, name, &format!("{name}-pass"), &format!("{name}-password"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(qpq_no_tmux, ignore = "tmux is not installed: apt-get install tmux")]
async fn two_tuis_exchange_a_message_a_typing_indicator_and_a_file() {
    let tmux = Tmux::new("pair");
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let (alice_home, bob_home): (PathBuf, PathBuf) =
        (dir.path().join("alice"), dir.path().join("bob"));
    account(&server, &alice_home, "alice").await;
    account(&server, &bob_home, "bob").await;

    tmux.start("alice", &alice_home);
    tmux.start("bob", &bob_home);
    for (name, pass) in [("alice", "alice-pass"), ("bob", "bob-pass")] {
        tmux.wait_for(name, "Passphrase", Duration::from_secs(10));
        tmux.type_text(name, pass);
        tmux.keys(name, &["Enter"]);
        tmux.wait_for(name, "online", Duration::from_secs(15));
    }

    // alice opens a DM with bob from the composer and says hello.
    tmux.type_text("alice", "/dm bob");
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("alice", "@bob", Duration::from_secs(15));
    tmux.type_text("alice", "hello from the alice terminal");
    tmux.keys("alice", &["Enter"]);
    let bob = tmux.wait_for("bob", "hello from the alice terminal", Duration::from_secs(15));
    assert!(bob.contains("@alice"), "bob's list shows the DM:\n{bob}");

    // Typing shows up on bob's screen while alice types (and before she sends).
    tmux.type_text("alice", "still typ");
    tmux.wait_for("bob", "alice is typing", Duration::from_secs(10));
    tmux.keys("alice", &["C-u"]);

    // A file offer.
    let file = dir.path().join("tmux-notes.txt");
    std::fs::write(&file, "notes for the tmux test\n").unwrap();
    tmux.keys("alice", &["Escape", "i"]);
    tmux.type_text("alice", &format!("/send-file {}", file.display()));
    tmux.keys("alice", &["Enter"]);
    let bob = tmux.wait_for("bob", "tmux-notes.txt", Duration::from_secs(15));
    assert!(bob.contains("d to download"), "{bob}");

    // Quitting leaves the terminal usable (the session ends).
    tmux.keys("bob", &["C-q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.run(&["list-sessions"]).contains("bob:") {
        assert!(Instant::now() < deadline, "bob's qpq did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
}
