//! The `qpq` command line without a server: help, version and clear errors.
//!
//! (An integration test here also makes `cargo test --workspace` build the `qpq` binary that
//! the end-to-end tests in `tests/` drive.)

use std::process::Command;

fn qpq() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpq"));
    c.env_remove("QPQ_HOME").env_remove("QPQ_PASSPHRASE").env_remove("QPQ_PASSWORD");
    c
}

#[test]
fn help_lists_the_subcommands() {
    let out = qpq().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "register",
        "login",
        "whoami",
        "dm",
        "group",
        "send",
        "tail",
        "unread",
        "send-file",
        "download",
        "verify",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
    let out = qpq().args(["group", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["create", "add", "remove", "promote", "demote", "rename", "leave", "info"] {
        assert!(text.contains(cmd), "group {cmd} missing:\n{text}");
    }
}

#[test]
fn commands_without_an_account_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = qpq().arg("--home").arg(dir.path()).arg("whoami").output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no account"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = qpq().arg("--home").arg(dir.path()).args(["send", "team", "hi"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn secrets_are_not_read_from_a_pipe_without_the_variables() {
    let dir = tempfile::tempdir().unwrap();
    let out = qpq()
        .arg("--home")
        .arg(dir.path())
        .args(["register", "-u", "alice", "--server", "127.0.0.1:9"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("QPQ_PASSPHRASE is not set"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("account.qpq").exists(), "nothing was created");
}
