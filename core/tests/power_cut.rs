//! Power cuts under the client vault: nothing acknowledged is lost, nothing unacknowledged is
//! half there.
//!
//! For several seeds, a vault on a [`PowerCutBackend`] (a simulated disk that keeps only what
//! was synced) runs a random workload of single puts and deletes, multi-key `Vault::atomic`
//! transactions, `delete_prefix` and atomic transactions that abort, recording after each call
//! that returned `Ok` what is now acknowledged. The disk dies at a seeded random point, usually
//! inside a commit (or, for some runs, once the workload is done), and the machine comes back in
//! one of three ways: a power cut (only synced data), a crash (the page cache survives) or a torn
//! write-back (a random subset of the unsynced sectors, in any order). The vault must then open
//! with the passphrase, hold exactly the acknowledged state, or that state plus the whole of the
//! one call that was in flight (never part of it, never an aborted transaction), accept new
//! writes, and keep those across a further power cut. Counters on the disk check that the
//! workload really synced and that cuts really landed inside commits with unsynced writes.
//!
//! Run with `cargo test -p qpq-core --features mls --test power_cut`.
#![cfg(feature = "mls")]

use std::collections::BTreeMap;

use qpq_core::testing::{Cut, PowerCutBackend, SECTOR, SplitMix64};
use qpq_core::vault::{KdfParams, Space, Vault, VaultError};

const FAST: KdfParams = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
const PASS: &[u8] = b"correct horse";
/// Seeds run by default; `POWER_CUT_SEEDS=n` runs more (a soak).
const SEEDS: u64 = 12;
const OPS: usize = 60;
/// The spaces the workload writes; a key in the model is (index into this, key).
const SPACES: [Space; 3] = [Space::Messages, Space::State, Space::Outbox];
/// What an atomic transaction that gives up returns.
const ABORT: VaultError = VaultError::Crypto("deliberate abort");

type Model = BTreeMap<(usize, Vec<u8>), Vec<u8>>;

/// One write of a transaction: `None` deletes.
#[derive(Debug, Clone)]
struct Change {
    space: usize,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum Op {
    /// `put` or `delete`, committed on its own.
    Single(Change),
    /// Several changes in one `Vault::atomic`.
    Atomic(Vec<Change>),
    /// `delete_prefix`.
    DeletePrefix { space: usize, prefix: Vec<u8> },
    /// Changes in a `Vault::atomic` whose closure returns `Err`: never visible.
    Aborted(Vec<Change>),
}

impl Op {
    /// What `model` becomes if this op commits.
    fn apply(&self, model: &mut Model) {
        let set = |model: &mut Model, c: &Change| match &c.value {
            Some(v) => {
                model.insert((c.space, c.key.clone()), v.clone());
            }
            None => {
                model.remove(&(c.space, c.key.clone()));
            }
        };
        match self {
            Op::Single(c) => set(model, c),
            Op::Atomic(cs) => cs.iter().for_each(|c| set(model, c)),
            Op::DeletePrefix { space, prefix } => {
                model.retain(|(s, k), _| !(s == space && k.starts_with(prefix)));
            }
            Op::Aborted(_) => {}
        }
    }
}

fn change(rng: &mut SplitMix64, op: usize) -> Change {
    let space = rng.below(SPACES.len());
    let key = format!("k{}", rng.below(30)).into_bytes();
    if rng.chance(1, 5) {
        return Change { space, key, value: None };
    }
    // Mostly small values, some spanning several 4 KiB pages, so the file grows and pages move.
    let len = if rng.chance(1, 8) { 4000 + rng.below(12_000) } else { 1 + rng.below(300) };
    let mut value = format!("op{op}:").into_bytes();
    let fill = rng.next_u64().to_le_bytes();
    value.extend((0..len).map(|i| fill[i % 8] ^ (i as u8)));
    Change { space, key, value: Some(value) }
}

fn workload(seed: u64) -> Vec<Op> {
    let mut rng = SplitMix64::new(seed);
    (0..OPS)
        .map(|i| {
            let many =
                |rng: &mut SplitMix64| (0..2 + rng.below(5)).map(|_| change(rng, i)).collect();
            match rng.below(20) {
                0..=7 => Op::Single(change(&mut rng, i)),
                8..=15 => Op::Atomic(many(&mut rng)),
                16 => Op::DeletePrefix {
                    space: rng.below(SPACES.len()),
                    prefix: format!("k{}", 1 + rng.below(3)).into_bytes(),
                },
                _ => Op::Aborted(many(&mut rng)),
            }
        })
        .collect()
}

fn write(vault: &Vault, c: &Change) -> Result<(), VaultError> {
    match &c.value {
        Some(v) => vault.put(SPACES[c.space], &c.key, v),
        None => vault.delete(SPACES[c.space], &c.key).map(drop),
    }
}

/// Runs `op`. `Ok(true)`: committed (acknowledged); `Ok(false)`: aborted as intended.
fn run(vault: &Vault, op: &Op) -> Result<bool, VaultError> {
    match op {
        Op::Single(c) => write(vault, c).map(|()| true),
        Op::Atomic(cs) => {
            vault.atomic(|| cs.iter().try_for_each(|c| write(vault, c))).map(|()| true)
        }
        Op::DeletePrefix { space, prefix } => {
            vault.delete_prefix(SPACES[*space], prefix).map(|_| true)
        }
        Op::Aborted(cs) => {
            let r: Result<(), VaultError> = vault.atomic(|| {
                cs.iter().try_for_each(|c| write(vault, c))?;
                Err(ABORT)
            });
            match r {
                Err(VaultError::Crypto("deliberate abort")) => Ok(false),
                Err(e) => Err(e),
                Ok(()) => unreachable!("the closure always fails"),
            }
        }
    }
}

/// Everything the vault holds in the workload's spaces.
fn contents(vault: &Vault) -> Model {
    let mut out = Model::new();
    for (i, space) in SPACES.iter().enumerate() {
        for (k, v) in vault.scan(*space, b"").expect("scan") {
            out.insert((i, k), v.to_vec());
        }
    }
    out
}

fn describe(model: &Model) -> Vec<String> {
    model
        .iter()
        .map(|((s, k), v)| {
            let tag = v.split(|&b| b == b':').next().unwrap_or_default();
            format!(
                "{s}/{}={}({}B)",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(tag),
                v.len()
            )
        })
        .collect()
}

/// What the runs covered, so that a test that could not fail does not pass quietly.
#[derive(Debug, Default)]
struct Coverage {
    runs: u32,
    /// The disk died inside a call (rather than after the workload).
    mid_call: u32,
    /// ... and that call's data was there after the restart.
    in_flight_landed: u32,
    /// A cut with unsynced writes to lose.
    unsynced_at_cut: u32,
    torn_with_unsynced: u32,
    /// A torn cut kept a newer redb header (its first sector) than the last sync had ...
    torn_newer_header: u32,
    /// ... and yet the call in flight was not there: redb fell back to the previous commit.
    torn_rolled_back: u32,
}

/// Mutating disk calls the workload of `seed` makes after the vault is created.
fn measure(ops: &[Op]) -> u64 {
    let disk = PowerCutBackend::new();
    let vault = Vault::create_with_backend(disk.clone(), PASS, FAST).expect("create");
    let (before, syncs_before) = (disk.mutations(), disk.syncs());
    let mut commits = 0;
    for op in ops {
        commits += u64::from(run(&vault, op).expect("no fault without a power cut"));
    }
    assert!(
        disk.syncs() - syncs_before >= commits,
        "every acknowledged commit syncs (Durability::Immediate): {} syncs for {commits} commits",
        disk.syncs() - syncs_before
    );
    disk.mutations() - before
}

fn one_run(seed: u64, ops: &[Op], cut: Cut, die_after: Option<u64>, cov: &mut Coverage) {
    let ctx = format!("seed {seed}, {cut:?}, disk dies after {die_after:?} mutations");
    let disk = PowerCutBackend::new();
    let vault = Vault::create_with_backend(disk.clone(), PASS, FAST).expect("create");
    let syncs_at_start = disk.syncs();
    if let Some(n) = die_after {
        disk.fail_after(n);
    }
    let mut acked = Model::new();
    let mut in_flight = None;
    let mut committed = 0u64;
    for op in ops {
        match run(&vault, op) {
            Ok(true) => {
                op.apply(&mut acked);
                committed += 1;
            }
            Ok(false) => {}
            Err(e) => {
                assert!(disk.is_dead(), "{ctx}: a call failed with the power on: {e}");
                in_flight = Some(op);
                break;
            }
        }
        if disk.is_dead() {
            break;
        }
    }
    assert!(disk.syncs() - syncs_at_start >= committed, "{ctx}: commits without syncs");
    cov.runs += 1;
    cov.mid_call += u32::from(in_flight.is_some());
    if disk.unsynced() > 0 {
        cov.unsynced_at_cut += 1;
        cov.torn_with_unsynced += u32::from(matches!(cut, Cut::Torn(_)));
    }

    // The power goes while the vault is open; the old handle dies with the old disk.
    let restarted = cut.take(&disk);
    let newer_header = matches!(cut, Cut::Torn(_))
        && restarted.image().get(..SECTOR) != disk.synced_image().get(..SECTOR);
    drop(vault);
    let vault = Vault::open_with_backend(restarted.clone(), PASS)
        .unwrap_or_else(|e| panic!("{ctx}: the vault does not open after the cut: {e}"));
    let found = contents(&vault);
    let mut landed = acked.clone();
    if let Some(op) = in_flight {
        op.apply(&mut landed);
    }
    if found == landed && found != acked {
        cov.in_flight_landed += 1;
    }
    if newer_header {
        cov.torn_newer_header += 1;
        cov.torn_rolled_back += u32::from(found == acked && found != landed);
    }
    assert!(
        found == acked || found == landed,
        "{ctx}: after the cut the vault holds\n  {:?}\nbut acknowledged was\n  {:?}\n\
         (in flight: {in_flight:?})",
        describe(&found),
        describe(&acked),
    );

    // It still takes writes, single and atomic, and they survive the next power cut.
    vault.put(Space::State, b"after", b"restart").expect("put after restart");
    vault
        .atomic(|| {
            vault.put(Space::Messages, b"after/1", b"one")?;
            vault.put(Space::Messages, b"after/2", b"two")
        })
        .expect("atomic after restart");
    let again = restarted.power_cut();
    drop(vault);
    let vault = Vault::open_with_backend(again, PASS)
        .unwrap_or_else(|e| panic!("{ctx}: the vault does not open after a second cut: {e}"));
    assert_eq!(vault.get(Space::State, b"after").unwrap().unwrap().as_slice(), b"restart");
    assert_eq!(vault.scan(Space::Messages, b"after/").unwrap().len(), 2, "{ctx}");
    let mut after = contents(&vault);
    after.retain(|(_, k), _| !k.starts_with(b"after"));
    assert_eq!(after, found, "{ctx}: the second cut changed older data");
}

#[test]
fn acknowledged_vault_writes_survive_power_cuts_crashes_and_torn_writes() {
    let mut cov = Coverage::default();
    let seeds = std::env::var("POWER_CUT_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS);
    for seed in 0..seeds {
        let ops = workload(seed);
        let total = measure(&ops);
        assert!(total > OPS as u64, "the workload wrote to the disk");
        let mut rng = SplitMix64::new(seed ^ 0x5eed);
        for cut in [Cut::Power, Cut::Crash, Cut::Torn(rng.next_u64()), Cut::Torn(rng.next_u64())] {
            // One run in ten cuts once the workload is done, with the vault still open.
            let at = rng.below(total as usize + total as usize / 10 + 1) as u64;
            one_run(seed, &ops, cut, (at < total).then_some(at), &mut cov);
        }
    }
    eprintln!("{cov:?}");
    assert!(cov.mid_call > cov.runs / 2, "most cuts land inside a call: {cov:?}");
    assert!(cov.in_flight_landed > 0, "some in-flight call survived (crash): {cov:?}");
    assert!(cov.torn_with_unsynced > 0, "some torn cut had unsynced writes to tear: {cov:?}");
    assert!(cov.torn_rolled_back > 0, "some torn cut kept a new header, not its data: {cov:?}");
}

#[test]
fn a_vault_cut_before_its_first_commit_does_not_open_as_a_vault() {
    // Not an acknowledged write, so nothing may be expected of it; but it must not panic, and
    // must not open as an empty vault with some other passphrase.
    let disk = PowerCutBackend::new();
    disk.fail_after(3);
    assert!(Vault::create_with_backend(disk.clone(), PASS, FAST).is_err());
    match Vault::open_with_backend(disk.power_cut(), b"other") {
        Ok(_) => panic!("a vault that was never created opened"),
        Err(e) => eprintln!("as expected: {e}"),
    }
}
