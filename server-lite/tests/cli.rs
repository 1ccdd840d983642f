//! The command line: help, version, configuration errors and the fingerprint command.
//!
//! (Having an integration test here also makes `cargo test --workspace` build the
//! `qpq-server-lite` binary that the end-to-end tests in `tests/` run.)

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpq-server-lite"));
    c.env_remove("QPQ_CONFIG");
    c
}

#[test]
fn help_and_version() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("invite create"));
    let out = bin().arg("-V").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("qpq-server-lite "));
}

#[test]
fn bad_configuration_fails_fast_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--registration", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sometimes"));
    let out = bin()
        .arg("--data-dir")
        .arg(dir.path())
        .env("QPQ_LIMITS_MAX_CONNECTIONS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connection limits"));
    let out = bin().args(["--config", "/nonexistent/qpq.toml"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/qpq.toml"));
    let out = bin().args(["frobnicate"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command"));
}

#[test]
fn fingerprint_is_stable_for_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let a = bin().arg("--data-dir").arg(dir.path()).arg("fingerprint").output().unwrap();
    let b = bin().arg("--data-dir").arg(dir.path()).arg("fingerprint").output().unwrap();
    assert!(a.status.success());
    let a = String::from_utf8(a.stdout).unwrap();
    assert!(a.starts_with("sha256:") && a.trim().len() == 7 + 64, "{a}");
    assert_eq!(a, String::from_utf8(b.stdout).unwrap());
}
