//! What this machine lacks for some end-to-end tests, as cfgs, so that a test that cannot do its
//! real work is reported as ignored with the reason instead of passing without running:
//!
//! - `qpq_no_tmux`: no `tmux` executable on PATH; `tests/11_tui_tmux.rs` is ignored (and with
//!   `CI=true` cargo prints a warning).
//! - `qpq_no_cross`: `QPQTEST_CROSS` is not `1`; `tests/05_cross.rs` is ignored (`cross/ci.sh`
//!   builds the cross binaries, then sets it).
//! - `qpq_not_root`: cargo does not run as root; the OpenWrt package test in `tests/05_cross.rs`
//!   chroots into its scratch install, so it is ignored.
//!
//! Runs again when PATH, QPQTEST_CROSS or CI change, when tmux disappears, and, while tmux is
//! missing, when a directory on PATH changes (installing tmux adds a file there).

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(qpq_no_tmux)");
    println!("cargo::rustc-check-cfg=cfg(qpq_no_cross)");
    println!("cargo::rustc-check-cfg=cfg(qpq_not_root)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=QPQTEST_CROSS");
    println!("cargo::rerun-if-env-changed=CI");

    let path: Vec<PathBuf> =
        env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    match path.iter().map(|dir| dir.join("tmux")).find(|f| is_executable(f)) {
        // A missing file counts as changed: uninstalling tmux reruns this script.
        Some(tmux) => println!("cargo::rerun-if-changed={}", tmux.display()),
        None => {
            println!("cargo::rustc-cfg=qpq_no_tmux");
            // Cargo scans a directory recursively; watch only flat ones (/usr/bin, not $HOME).
            for dir in path.iter().filter(|d| d.is_absolute() && is_flat_dir(d)) {
                println!("cargo::rerun-if-changed={}", dir.display());
            }
            if env::var_os("CI").is_some_and(|v| v == "true") {
                println!(
                    "cargo::warning=tmux is not installed: the terminal-UI end-to-end test \
                     (tests/tests/11_tui_tmux.rs) is ignored; apt-get install tmux"
                );
            }
        }
    }

    if env::var_os("QPQTEST_CROSS").is_none_or(|v| v != "1") {
        println!("cargo::rustc-cfg=qpq_no_cross");
    }

    if !building_as_root() {
        println!("cargo::rustc-cfg=qpq_not_root");
    }
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    file.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A directory with no subdirectories (symbolic links aside).
fn is_flat_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .is_ok_and(|entries| entries.flatten().all(|e| e.file_type().is_ok_and(|t| !t.is_dir())))
}

/// Whether cargo runs as root: OUT_DIR, which cargo has just created, is then owned by uid 0.
fn building_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    env::var_os("OUT_DIR").and_then(|d| std::fs::metadata(d).ok()).is_some_and(|m| m.uid() == 0)
}
