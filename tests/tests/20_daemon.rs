//! One account in many terminals, through the real binaries: `qpq daemon` serves the account on
//! its socket and every `qpq` attaches (two terminal UIs in tmux, a `tail -f`, scripted
//! `send`s); SIGKILL of the daemon while they are attached (they say so, attach again, nothing
//! acknowledged is lost); malformed socket messages (an error and a closed socket, the daemon
//! goes on); the notify command; locking after an idle time; a daemon stopped with requests
//! queued (each either runs with its reply or never runs, and only those are told "stopping");
//! a daemon a `qpq` starts reaching the server that `qpq` was given.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qpq_tests::procs::{
    KillOnDrop, alive, collect, daemon_pid, signal as kill, wait_gone, wait_text,
};
use qpq_tests::tmux::Tmux;
use qpq_tests::{Pair, ServerProcess, qpq_command};
use qpq_tui::ipc;
use qpq_tui::protocol::{Reply, Request};
use tokio::io::AsyncWriteExt;

fn qpq(home: &Path, name: &str, args: &[&str]) -> Command {
    let mut c = qpq_command(home, &format!("{name}-pass"), &format!("{name}-password"));
    c.args(args);
    c
}

fn ok(home: &Path, name: &str, args: &[&str]) -> String {
    let out = qpq(home, name, args).output().unwrap();
    assert!(out.status.success(), "qpq {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_tui(tmux: &Tmux, name: &str, home: &Path) {
    tmux.start(name, home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(qpq_no_tmux, ignore = "tmux is not installed: apt-get install tmux")]
async fn two_tuis_a_tail_and_scripts_share_one_account_and_survive_a_killed_daemon() {
    let s = Pair::with_dm().await;
    let tmux = Tmux::new("daemon");

    // The first TUI starts the daemon and unlocks it; the second attaches, no passphrase.
    start_tui(&tmux, "one", &s.bob);
    tmux.wait_for("one", "Passphrase", Duration::from_secs(15));
    tmux.type_text("one", "bob-pass");
    tmux.keys("one", &["Enter"]);
    tmux.wait_for("one", "● online", Duration::from_secs(15));
    let daemon = daemon_pid(&s.bob, None, Duration::from_secs(5));
    start_tui(&tmux, "two", &s.bob);
    let two = tmux.wait_for("two", "● online", Duration::from_secs(15));
    assert!(!two.contains("Passphrase"), "the second TUI needed no passphrase:\n{two}");
    tmux.wait_for("two", "hello bob", Duration::from_secs(10));

    // A `tail -f` pane and a script, at the same time.
    let mut tail = KillOnDrop(qpq(&s.bob, "bob", &["tail", "@alice", "--follow"]).spawn().unwrap());
    let tailed = collect(&mut tail.0);
    wait_text(&tailed.out, "hello bob", Duration::from_secs(10), "tail history");
    assert_eq!(daemon_pid(&s.bob, None, Duration::from_secs(1)), daemon, "one daemon");
    ok(&s.bob, "bob", &["send", "@alice", "from the script"]);
    ok(&s.alice, "alice", &["send", "@bob", "from alice"]);
    tmux.type_text("one", "typed in tui one");
    tmux.keys("one", &["Enter"]);
    for text in ["from the script", "from alice", "typed in tui one"] {
        tmux.wait_for("one", text, Duration::from_secs(15));
        tmux.wait_for("two", text, Duration::from_secs(15));
        wait_text(&tailed.out, text, Duration::from_secs(15), "tail -f");
    }
    let alice_sees = ok(&s.alice, "alice", &["tail", "@bob"]);
    assert!(
        alice_sees.contains("from the script") && alice_sees.contains("typed in tui one"),
        "{alice_sees}"
    );
    assert!(alive(daemon));

    // SIGKILL of the daemon with all three attached.
    kill(daemon, "-KILL");
    wait_gone(daemon, Duration::from_secs(5));
    wait_text(&tailed.err, "the qpq daemon went away", Duration::from_secs(10), "tail stderr");
    // The tail starts a new daemon and unlocks it with its passphrase; the TUIs attach to it
    // and, unlocked by then or as soon as it is, go on without a passphrase typed.
    let second = daemon_pid(&s.bob, Some(daemon), Duration::from_secs(20));
    for tui in ["one", "two"] {
        tmux.wait_for(tui, "● online", Duration::from_secs(20));
        // Nothing acknowledged was lost: every message is back on screen once the history
        // page arrives.
        for text in ["hello bob", "from the script", "from alice", "typed in tui one"] {
            tmux.wait_for(tui, text, Duration::from_secs(10));
        }
    }
    ok(&s.alice, "alice", &["send", "@bob", "after the kill"]);
    tmux.wait_for("one", "after the kill", Duration::from_secs(15));
    tmux.wait_for("two", "after the kill", Duration::from_secs(15));
    wait_text(&tailed.out, "after the kill", Duration::from_secs(15), "tail -f after the kill");

    // Everyone leaves: the daemon a TUI started closes the store and exits.
    kill(tail.0.id(), "-TERM");
    let _ = tail.0.wait();
    tmux.keys("one", &["C-q"]);
    tmux.keys("two", &["C-q"]);
    wait_gone(second, Duration::from_secs(15));
    assert!(!s.bob.join("account.qpq.owner").exists(), "the store was closed");
    drop(s.server);
}

/// A daemon started by hand, for the socket-level tests.
fn start_daemon(home: &Path, name: &str, args: &[&str]) -> KillOnDrop {
    let mut all = vec!["daemon"];
    all.extend_from_slice(args);
    let child = qpq(home, name, &all).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let socket = ipc::socket_path(home).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the daemon never bound {}", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    KillOnDrop(child)
}

async fn raw(home: &Path) -> tokio::net::UnixStream {
    ipc::connect(&ipc::socket_path(home).unwrap()).await.unwrap().expect("a daemon serves")
}

/// Reads replies until the daemon closes the connection; returns them.
async fn until_closed(stream: &mut tokio::net::UnixStream) -> Vec<Reply> {
    let mut replies = Vec::new();
    let read = async {
        while let Ok(Some(r)) = ipc::read_frame::<Reply, _>(stream).await {
            replies.push(r);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the daemon closed it");
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_socket_messages_get_an_error_and_a_closed_socket() {
    let s = Pair::with_dm().await;
    let mut daemon = start_daemon(&s.bob, "bob", &[]);
    let header = |magic: &[u8; 4], version: u16, len: u32| {
        [&magic[..], &version.to_be_bytes(), &len.to_be_bytes()].concat()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not qpq", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "not a qpq"),
        ("another version", header(b"QPQS", 99, 2), "version"),
        ("oversized", header(b"QPQS", ipc::IPC_VERSION, u32::MAX), "over the"),
        ("not JSON", [header(b"QPQS", ipc::IPC_VERSION, 3), b"{{{".to_vec()].concat(), ""),
        (
            "an unknown request",
            [header(b"QPQS", ipc::IPC_VERSION, 11), br#"{"Nope":{}}"#.to_vec()].concat(),
            "",
        ),
        ("cut short", header(b"QPQS", ipc::IPC_VERSION, 100)[..7].to_vec(), ""),
    ];
    for (what, bytes, expect) in cases {
        let mut stream = raw(&s.bob).await;
        stream.write_all(&bytes).await.unwrap();
        stream.shutdown().await.unwrap();
        let replies = until_closed(&mut stream).await;
        assert!(
            matches!(replies.first(), Some(Reply::State { locked: true })),
            "{what}: first the state: {replies:?}"
        );
        let errors: Vec<&String> = replies
            .iter()
            .filter_map(|r| match r {
                Reply::Error(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 1, "{what}: one error, then closed: {replies:?}");
        assert!(errors[0].contains(expect), "{what}: {}", errors[0]);
        assert!(daemon.0.try_wait().unwrap().is_none(), "{what} stopped the daemon");
    }
    // A wrong passphrase is refused without closing anything; the right one opens the store.
    let mut stream = raw(&s.bob).await;
    let _ = ipc::read_frame::<Reply, _>(&mut stream).await.unwrap();
    ipc::write_frame(&mut stream, &Request::Unlock { passphrase: "wrong".into() }).await.unwrap();
    match ipc::read_frame::<Reply, _>(&mut stream).await.unwrap() {
        Some(Reply::UnlockFailed(why)) => assert!(why.contains("wrong passphrase"), "{why}"),
        other => panic!("expected UnlockFailed, got {other:?}"),
    }
    // Subcommands attach and work (unlocking with their passphrase).
    assert!(ok(&s.bob, "bob", &["tail", "@alice"]).contains("hello bob"));
    ok(&s.bob, "bob", &["send", "@alice", "through the daemon"]);
    assert!(ok(&s.alice, "alice", &["tail", "@bob"]).contains("through the daemon"));
    // A second daemon for the same account refuses to start.
    let out = qpq(&s.bob, "bob", &["daemon"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serves"));
    // SIGTERM: a clean stop; the socket is removed and the store needs no repair.
    drop(stream);
    kill(daemon.0.id(), "-TERM");
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!ipc::socket_path(&s.bob).unwrap().exists());
    assert!(!qpq_core::vault::needs_recovery(&s.bob.join("account.qpq")).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_command_gets_metadata_not_plaintext_and_the_daemon_locks_when_idle() {
    let s = Pair::with_dm().await;
    let log = s.bob.join("notified");
    let command = format!(
        "echo \"$QPQ_CONVERSATION|$QPQ_SENDER|$QPQ_KIND|${{QPQ_TEXT-unset}}\" >> {}",
        log.display()
    );
    let mut daemon = start_daemon(&s.bob, "bob", &["--notify", &command, "--lock-after", "2"]);
    // Unlocked by the first subcommand. An attachment is kept meanwhile, so the idle lock
    // (two seconds with nothing attached) cannot come before the message, however slow the
    // machine.
    let mut watcher = raw(&s.bob).await;
    ok(&s.bob, "bob", &["sync"]);
    ok(&s.alice, "alice", &["send", "@bob", "a secret plan"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("@alice|alice|message|unset")) {
        assert!(
            Instant::now() < deadline,
            "notify never ran as expected: {:?}",
            std::fs::read_to_string(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!std::fs::read_to_string(&log).unwrap().contains("secret"), "no plaintext");
    // Nothing attached for two seconds: locked again (the store is closed).
    watcher.shutdown().await.unwrap();
    drop(watcher);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.bob.join("account.qpq.owner").exists() {
        assert!(Instant::now() < deadline, "the daemon never locked");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stream = raw(&s.bob).await;
    assert!(matches!(
        ipc::read_frame::<Reply, _>(&mut stream).await.unwrap(),
        Some(Reply::State { locked: true })
    ));
    drop(stream);
    kill(daemon.0.id(), "-TERM");
    assert!(daemon.0.wait().unwrap().success());
    let mut err = String::new();
    daemon.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("locked after"), "{err}");
}

/// SIGTERM with a hundred sends queued on the daemon: every request either ran and got its
/// real reply, or never runs, and only those are told the daemon is stopping (a script that
/// retries on that error never sends twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_says_so_only_for_requests_that_never_run() {
    const N: usize = 100;
    let s = Pair::with_dm().await;
    let mut daemon = start_daemon(&s.bob, "bob", &[]);
    let mut stream = raw(&s.bob).await;
    ipc::write_frame(&mut stream, &Request::Unlock { passphrase: "bob-pass".into() })
        .await
        .unwrap();
    loop {
        match ipc::read_frame::<Reply, _>(&mut stream).await.unwrap() {
            Some(Reply::State { locked: false }) => break,
            Some(Reply::UnlockFailed(why)) => panic!("unlock: {why}"),
            Some(_) => {}
            None => panic!("the daemon closed the connection"),
        }
    }
    // All at once, on one connection: they queue on the worker and run in this order.
    let mut frames = Vec::new();
    for i in 0..N {
        let command = qpq_tui::cli::Command::Send {
            conversation: "@alice".into(),
            text: vec![format!("queued {i}")],
        };
        frames.extend(ipc::encode(&Request::Cli { command, password: None }).unwrap());
    }
    stream.write_all(&frames).await.unwrap();
    // The answers, in order; SIGTERM as soon as the first request has run.
    let mut answers: Vec<Option<String>> = Vec::new();
    let mut last_word = None;
    let mut answered_after_it = 0;
    let read = async {
        while let Ok(Some(r)) = ipc::read_frame::<Reply, _>(&mut stream).await {
            match r {
                Reply::Done { error, .. } if last_word.is_none() => {
                    if answers.is_empty() {
                        kill(daemon.0.id(), "-TERM");
                    }
                    answers.push(error);
                }
                Reply::Done { .. } => answered_after_it += 1,
                Reply::Error(e) => {
                    last_word.get_or_insert(e);
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the daemon closed it");
    assert!(daemon.0.wait().unwrap().success(), "a clean stop");
    let last_word = last_word.expect("the daemon said it was stopping");
    assert!(last_word.contains("stopping"), "{last_word}");

    // What was sent: bob's own messages in the conversation (read with the daemon gone).
    let history = ok(&s.bob, "bob", &["tail", "@alice", "-n", "1000"]);
    let sent: BTreeSet<usize> = history
        .lines()
        .filter_map(|l| l.rsplit_once("] queued ").and_then(|(_, i)| i.trim().parse().ok()))
        .collect();
    let mut not_run = 0;
    for (i, error) in answers.iter().enumerate() {
        match error {
            None => assert!(sent.contains(&i), "request {i} was answered done but not sent"),
            Some(e) => {
                assert!(e.contains("did not run"), "request {i}: {e}");
                assert!(!sent.contains(&i), "request {i} was told {e:?} but was sent");
                not_run += 1;
            }
        }
    }
    for i in answers.len()..N {
        assert!(!sent.contains(&i), "request {i} was sent after its caller was told {last_word:?}");
    }
    assert_eq!(answered_after_it, 0, "answers after {last_word:?}");
    assert!(not_run > 0, "the stop came after the queue had run: {answers:?}");
    assert!(!ipc::socket_path(&s.bob).unwrap().exists());
}

/// The server moved (same data and certificate, another port) and the stores still record
/// the old address: a daemon that `tail --follow` starts reaches the address that `qpq` was
/// given, by `--server` or by `QPQ_SERVER`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_qpq_starts_reaches_the_server_qpq_was_given() {
    let mut s = Pair::with_dm().await;
    let old = s.server.addr;
    let data = s.server.data_dir.clone();
    s.server.kill();
    s.server = ServerProcess::start(&data, &[]).unwrap();
    let moved = s.server.addr;
    assert_ne!(moved, old, "the server moved");
    let server = moved.to_string();
    ok(&s.alice, "alice", &["--server", &server, "send", "@bob", "after the move"]);
    let mut previous = None;
    for (how, text) in [("--server", "after the move"), ("QPQ_SERVER", "and again")] {
        let mut tail = match how {
            "--server" => qpq(&s.bob, "bob", &["--server", &server, "tail", "@alice", "--follow"]),
            _ => {
                let mut c = qpq(&s.bob, "bob", &["tail", "@alice", "--follow"]);
                c.env("QPQ_SERVER", &server);
                c
            }
        };
        let mut tail = KillOnDrop(tail.spawn().unwrap());
        let tailed = collect(&mut tail.0);
        // The daemon caught up from the moved server before the history was printed.
        wait_text(&tailed.out, text, Duration::from_secs(20), how);
        let daemon = daemon_pid(&s.bob, previous, Duration::from_secs(5));
        // Runs on that daemon (given no server itself): the daemon's address.
        let whoami = ok(&s.bob, "bob", &["whoami"]);
        assert!(whoami.contains(&format!("server {moved}")), "{how}: {whoami}");
        kill(tail.0.id(), "-TERM");
        let _ = tail.0.wait();
        wait_gone(daemon, Duration::from_secs(15));
        previous = Some(daemon);
        if how == "--server" {
            ok(&s.alice, "alice", &["--server", &server, "send", "@bob", "and again"]);
        }
    }
}

/// Reads the daemon's events on `watcher` until an upload (or download) is part-way through.
async fn until_under_way(watcher: &mut tokio::net::UnixStream, upload: bool) {
    use qpq_tui::protocol::WorkerEvent;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no transfer progress (upload: {upload})");
        match tokio::time::timeout(left, ipc::read_frame::<Reply, _>(watcher)).await {
            Ok(Ok(Some(Reply::Event(WorkerEvent::Transfer {
                done, total, upload: up, ..
            }))))
                if up == upload && done > 0 && done < total =>
            {
                return;
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("the watcher lost the daemon: {other:?}"),
        }
    }
}

/// A transfer runs in a task of its own: while a large upload is on its way, a `send` from
/// another terminal goes out at once, and both arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_does_not_hold_up_other_commands() {
    let s = Pair::with_dm().await;
    let _daemon = start_daemon(&s.alice, "alice", &[]);
    ok(&s.alice, "alice", &["sync"]); // unlocks it
    let file = s.alice.join("big.bin");
    // 45 MB, incompressible (under the server's 50 MB blob limit).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let content: Vec<u8> = (0..45_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&file, &content).unwrap();
    let mut watcher = raw(&s.alice).await;
    let upload = qpq(&s.alice, "alice", &["send-file", "@bob", file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut upload = KillOnDrop(upload);
    // The upload is under way once its first chunk is acknowledged.
    until_under_way(&mut watcher, true).await;
    let started = Instant::now();
    ok(&s.alice, "alice", &["send", "@bob", "while uploading"]);
    let took = started.elapsed();
    assert!(
        upload.0.try_wait().unwrap().is_none(),
        "the send waited for the upload to end (it took {took:?})"
    );
    eprintln!("send during an upload took {took:?}");
    let status = upload.0.wait().unwrap();
    let mut out = String::new();
    upload.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success() && out.contains("sent big.bin"), "{status:?}: {out}");
    drop(watcher);
    ok(&s.bob, "bob", &["sync"]);
    let history = ok(&s.bob, "bob", &["tail", "@alice"]);
    assert!(history.contains("while uploading"), "{history}");
    assert!(history.contains("big.bin"), "{history}");
    let dir = s.bob.join("downloads");
    let saved = ok(&s.bob, "bob", &["download", "@alice", "--dir", dir.to_str().unwrap()]);
    assert!(saved.contains("saved"), "{saved}");
    let path = dir.join("big.bin").display().to_string();
    let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} ({saved})"));
    assert!(got == content, "bob got the file intact");

    // Through bob's daemon, the same file into the same directory twice at once: the second is
    // refused (the two would share a part file), the first completes intact.
    let _bob_daemon = start_daemon(&s.bob, "bob", &[]);
    ok(&s.bob, "bob", &["sync"]);
    let mut watcher = raw(&s.bob).await;
    let again = s.bob.join("again");
    let args = ["download", "@alice", "--dir", again.to_str().unwrap()];
    let first = qpq(&s.bob, "bob", &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut first = KillOnDrop(first.unwrap());
    until_under_way(&mut watcher, false).await;
    let second = qpq(&s.bob, "bob", &args).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("already being downloaded"), "{err}");
    assert!(first.0.wait().unwrap().success(), "the first download ended well");
    assert!(std::fs::read(again.join("big.bin")).unwrap() == content, "and intact");
}
