//! Feeds arbitrary bytes to the client engine's handling of what the server sends, through
//! `qpq_core::client::fuzzing::Harness`: fetched envelope data into MLS processing (openmls with
//! a real group state in a real vault) and the content decoder, plaintexts from a group member,
//! ciphertexts a member really encrypted, near-valid MLS messages (commits, a proposal, a
//! Welcome), push frames, response frames and fetched KeyPackages. The first input byte picks
//! the mode (see `Mode`). Every input's effects are rolled back.
//!
//! Checked: no panic, and a valid ciphertext of the group is always accepted again (the rollback
//! leaves no trace).
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use libfuzzer_sys::fuzz_target;
use qpq_core::client::fuzzing::{Harness, Mode};

struct State {
    harness: Mutex<Harness>,
    _dir: tempfile::TempDir,
}

static STATE: LazyLock<State> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let harness = Harness::new(dir.path()).expect("harness");
    State { harness: Mutex::new(harness), _dir: dir }
});

static RUNS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let mut h = STATE.harness.lock().unwrap_or_else(|p| p.into_inner());
    let _ = h.run(data);
    // Every 64 inputs: Alice's first message (a text) must still be accepted, i.e. no input left
    // state behind.
    if RUNS.fetch_add(1, Ordering::Relaxed).is_multiple_of(64) {
        let r = h.run(&[Mode::Patched as u8, 0]);
        assert!(r.is_ok(), "a valid message was refused after the inputs so far: {r:?}");
    }
});
