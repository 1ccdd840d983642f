//! Two real `qpq` terminal UIs in tmux against a real server: one types, the other's screen
//! shows the typing indicator, the message and a file offer (read with capture-pane).
//!
//! Ignored, with the reason, when no tmux was on PATH as the tests were built (`build.rs` sets
//! `qpq_no_tmux`); `.ci/run` installs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qpq_core::client::{Client, RegisterOptions};
use qpq_core::vault::KdfParams;
use qpq_tests::{ServerProcess, workspace_bin};

const FAST: KdfParams = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };

struct Tmux {
    socket: String,
}

impl Tmux {
    /// A private tmux server. Fails if tmux does not run: the test is ignored where build.rs
    /// found no tmux, so here it must work.
    fn new(tag: &str) -> Self {
        let out = Command::new("tmux").arg("-V").output();
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "`tmux -V` fails ({out:?}); tmux was on PATH when the tests were built"
        );
        Self { socket: format!("qpq-test-{}-{tag}", std::process::id()) }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start(&self, name: &str, home: &Path) {
        let cmd = format!(
            "env -u QPQ_PASSPHRASE -u QPQ_PASSWORD QPQ_HOME={} XDG_CONFIG_HOME={} {}",
            home.display(),
            home.display(),
            workspace_bin("qpq").display()
        );
        self.run(&["new-session", "-d", "-s", name, "-x", "100", "-y", "30", &cmd]);
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Types literal text (no key names).
    fn type_text(&self, name: &str, text: &str) {
        self.run(&["send-keys", "-t", name, "-l", text]);
    }

    fn screen(&self, name: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", name])
    }

    fn wait_for(&self, name: &str, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.screen(name);
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared on {name}'s screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

async fn account(server: &ServerProcess, home: &Path, name: &str) {
    let mut c = Client::register(RegisterOptions {
        store: home.join("account.qpq"),
        passphrase: format!("{name}-pass"),
        server: server.addr,
        pin: Some(server.fingerprint.clone()),
        username: name.into(),
        password: format!("{name}-password"),
        invite: String::new(),
        kdf: FAST,
    })
    .await
    .unwrap();
    c.disconnect().await;
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
