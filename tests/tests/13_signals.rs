//! Every way a `qpq` can be ended leaves an account that opens: a terminal that goes away under
//! the TUI (tmux `kill-session` and `kill-pane`, which hang up the pane), SIGHUP, SIGTERM and
//! SIGINT to `tail --follow`, and SIGKILL of the daemon that holds the store. Both the TUI and
//! `tail --follow` attach to a `qpq daemon` they start, which holds the store while anything
//! is attached, so a second `qpq` works meanwhile. A clean end is checked, not assumed: the
//! signalled process exits with 128 + the signal, and the daemon, once nothing is attached,
//! removes its `account.qpq.owner` note and leaves a store that needs no repair. After SIGKILL
//! of the daemon the store needs repair, the attached `tail --follow` says so, attaches to a
//! new daemon and goes on printing. User errors never print a backtrace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use qpq_core::vault::needs_recovery;
use qpq_tests::procs::{collect, daemon_pid, signal, wait_gone, wait_text};
use qpq_tests::tmux::Tmux;
use qpq_tests::{Pair, qpq_command};

fn qpq(home: &Path, name: &str, args: &[&str]) -> Command {
    let mut c = qpq_command(home, &format!("{name}-pass"), &format!("{name}-password"));
    c.args(args).env("RUST_BACKTRACE", "1");
    c
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "qpq did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process closed its store: the note is gone and redb needs no repair.
fn assert_closed_cleanly(home: &Path, how: &str) {
    let store = home.join("account.qpq");
    assert!(!home.join("account.qpq.owner").exists(), "{how}: the owner note was left behind");
    assert!(!needs_recovery(&store).unwrap(), "{how}: the store was not closed cleanly");
}

fn assert_opens(home: &Path, name: &str) {
    let out = qpq(home, name, &["whoami"]).output().unwrap();
    assert!(out.status.success(), "whoami failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("username {name}")));
}

/// Waits until nothing holds the store (the daemon closed it, at most a few seconds after
/// the last attached process left).
fn wait_closed(home: &Path, limit: Duration) {
    let note = home.join("account.qpq.owner");
    let deadline = Instant::now() + limit;
    while note.exists() {
        assert!(Instant::now() < deadline, "the store is still held after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `tail --follow` (which starts a daemon and unlocks it) and waits until the daemon
/// holds the store; returns the tail and the daemon's pid.
fn start_tail(home: &Path) -> (Child, u32) {
    let mut child = qpq(home, "bob", &["tail", "alice", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let daemon = daemon_pid(home, None, Duration::from_secs(15));
    assert!(child.try_wait().unwrap().is_none(), "tail exited early");
    // Past the open: let the tail get its history and reach its wait.
    std::thread::sleep(Duration::from_millis(500));
    (child, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_ends_cleanly_on_hangup_terminate_and_interrupt() {
    let s = Pair::with_dm().await;
    for (sig, code) in [("-HUP", 129), ("-TERM", 143), ("-INT", 130)] {
        let (mut tail, daemon) = start_tail(&s.bob);
        // A second qpq works meanwhile: it attaches to the same daemon.
        assert_opens(&s.bob, "bob");
        signal(tail.id(), sig);
        let status = wait_exit(&mut tail, Duration::from_secs(10));
        assert_eq!(status.code(), Some(code), "exit status after {sig}");
        let out = tail.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("hello bob"), "tail printed the history: {stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
        // Nothing attached: the daemon closes the store and exits.
        wait_gone(daemon, Duration::from_secs(10));
        assert_closed_cleanly(&s.bob, sig);
        assert_opens(&s.bob, "bob");
        wait_closed(&s.bob, Duration::from_secs(10));
    }
    // SIGKILL of the process that holds the store, with a `tail -f` attached: nothing can run
    // there, so the store needs repair. The tail says so, starts a new daemon (unlocking it
    // with its passphrase), and goes on: a message sent afterwards is printed.
    let (mut tail, daemon) = start_tail(&s.bob);
    let printed = collect(&mut tail);
    signal(daemon, "-KILL");
    wait_gone(daemon, Duration::from_secs(10));
    // The owner note is the dead daemon's until a new one opens (and repairs) the store.
    daemon_pid(&s.bob, Some(daemon), Duration::from_secs(20));
    let out = qpq(&s.alice, "alice", &["send", "bob", "after the kill"]).output().unwrap();
    assert!(out.status.success());
    wait_text(&printed.out, "after the kill", Duration::from_secs(20), "tail after the kill");
    signal(tail.id(), "-TERM");
    let status = wait_exit(&mut tail, Duration::from_secs(10));
    assert_eq!(status.code(), Some(143));
    // (Its stderr was collected as it came.)
    std::thread::sleep(Duration::from_millis(100));
    let stderr = printed.err.lock().unwrap().clone();
    assert!(stderr.contains("the qpq daemon went away"), "the tail reported it: {stderr}");
    // And a one-shot command reads it too.
    let out = qpq(&s.bob, "bob", &["tail", "alice"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("after the kill"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(qpq_no_tmux, ignore = "tmux is not installed: apt-get install tmux")]
async fn the_tui_closes_the_store_when_its_terminal_goes_away() {
    let s = Pair::with_dm().await;
    let tmux = Tmux::new("signals");
    for (round, how) in ["kill-session", "kill-pane", "SIGTERM"].into_iter().enumerate() {
        let name = format!("bob{round}");
        tmux.start(&name, &s.bob);
        tmux.wait_for(&name, "Passphrase", Duration::from_secs(10));
        tmux.type_text(&name, "bob-pass");
        tmux.keys(&name, &["Enter"]);
        tmux.wait_for(&name, "online", Duration::from_secs(15));
        tmux.wait_for(&name, "alice", Duration::from_secs(5));
        let pid = tmux.pane_pid(&name).expect("the pane's pid");
        let daemon = daemon_pid(&s.bob, None, Duration::from_secs(5));
        match how {
            "kill-session" => {
                tmux.run(&["kill-session", "-t", &name]);
            }
            "kill-pane" => {
                // A second window keeps the session, so only the pane's terminal goes away.
                tmux.run(&["new-window", "-t", &name, "sleep 60"]);
                tmux.run(&["kill-pane", "-t", &format!("{name}:0.0")]);
            }
            _ => signal(pid, "-TERM"),
        }
        wait_gone(pid, Duration::from_secs(10));
        // The TUI was the only one attached: its daemon closes the store and exits.
        wait_gone(daemon, Duration::from_secs(10));
        assert_closed_cleanly(&s.bob, how);
        assert_opens(&s.bob, "bob");
        tmux.run(&["kill-session", "-t", &name]);
    }
}

#[test]
fn user_errors_print_no_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("nobody");
    std::fs::create_dir_all(&home).unwrap();
    // No account; no terminal for the UI; not a store; a wrong passphrase.
    let garbage = dir.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("account.qpq"), b"this is not a redb file at all").unwrap();
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (home.clone(), vec!["whoami"], "no account"),
        (home.clone(), vec![], "needs a terminal"),
        (garbage.clone(), vec!["whoami"], "not a qpq store"),
        (home.clone(), vec!["send", "x", "y"], "no account"),
    ];
    for (home, args, expect) in cases {
        let out = qpq(&home, "nobody", &args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "qpq {args:?}: {err}");
        assert!(err.contains(expect), "qpq {args:?} says {err:?}, expected {expect:?}");
        assert!(
            !err.contains("panicked") && !err.contains("stack backtrace"),
            "qpq {args:?} printed a backtrace: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line of error: {err}");
    }
}
