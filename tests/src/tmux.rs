//! A private tmux server for terminal-UI tests: start `qpq` in a session, type, read the
//! screen, find the process, end the session as a closed terminal would.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::workspace_bin;

/// A tmux server on its own socket, killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// A private tmux server. Fails if tmux does not run: the test is ignored where build.rs
    /// found no tmux, so here it must work.
    pub fn new(tag: &str) -> Self {
        let out = Command::new("tmux").arg("-V").output();
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "`tmux -V` fails ({out:?}); tmux was on PATH when the tests were built"
        );
        Self { socket: format!("qpq-test-{}-{tag}", std::process::id()) }
    }

    pub fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start(&self, name: &str, home: &Path) {
        let cmd = format!(
            "env -u QPQ_PASSPHRASE -u QPQ_PASSWORD QPQ_HOME={} XDG_CONFIG_HOME={} {}",
            home.display(),
            home.display(),
            workspace_bin("qpq").display()
        );
        self.run(&["new-session", "-d", "-s", name, "-x", "100", "-y", "30", &cmd]);
    }

    pub fn keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Types literal text (no key names).
    pub fn type_text(&self, name: &str, text: &str) {
        self.run(&["send-keys", "-t", name, "-l", text]);
    }

    pub fn screen(&self, name: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", name])
    }

    pub fn wait_for(&self, name: &str, needle: &str, limit: Duration) -> String {
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

impl Tmux {
    /// The pid of the process in `name`'s (first) pane.
    pub fn pane_pid(&self, name: &str) -> Option<u32> {
        self.run(&["list-panes", "-t", name, "-F", "#{pane_pid}"])
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}
