//! The crash matrix: the real `qpq` binary is SIGKILLed at seeded random moments while it
//! sends (DM and group), receives (`sync`), commits group changes (remove, add, rotate),
//! uploads and downloads a file. After every kill the account must open again (`whoami`) and
//! a plain `sync` must finish what was cut short (the outbox, pending commits). At checkpoints
//! and at the end: every message a sender's history holds is in the receiver's history exactly
//! once, every send that exited successfully is among them, no history holds a message twice,
//! all members of the group agree on its epoch and verification code, the peers still decrypt
//! a fresh message, and a resumed download matches the file byte for byte.
//!
//! CI runs a bounded slice (`QPQTEST_CRASH_KILLS`, default 50 kills, seed
//! `QPQTEST_CRASH_SEED`, default fixed). The long run, with a fresh seed each time:
//!
//! ```sh
//! cargo build --workspace --bins
//! QPQTEST_CRASH_KILLS=1000 QPQTEST_CRASH_SEED=$RANDOM \
//!     cargo test -p qpq-tests --test 12_crash_matrix -- --nocapture
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use qpq_tests::{ServerProcess, qpq_command, register_account};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Account {
    name: &'static str,
    home: PathBuf,
}

impl Account {
    fn cmd(&self, args: &[&str]) -> Command {
        let (pass, password) =
            (format!("{} passphrase", self.name), format!("{} password", self.name));
        let mut c = qpq_command(&self.home, &pass, &password);
        c.args(args);
        c
    }

    /// Runs `qpq args` to the end; panics with its stderr unless it succeeds.
    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert_ok(self.name, args, &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `qpq args` and SIGKILLs it after `after`; true if it was still running then.
    fn run_and_kill(&self, args: &[&str], after: Duration) -> bool {
        let mut child = self.cmd(args).spawn().unwrap();
        let deadline = Instant::now() + after;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let _ = child.wait();
        killed
    }

    /// Message texts of a conversation's history, oldest first.
    fn texts(&self, conv: &str) -> Vec<String> {
        self.run(&["tail", conv, "-n", "100000"])
            .lines()
            .filter_map(|l| l.split_once("] ").map(|(_, t)| t.to_string()))
            // File offers all read `file payload.bin (…)`: the messages are what is counted.
            .filter(|t| !t.starts_with("file "))
            .collect()
    }

    /// (epoch, verification code, member names) of a group.
    fn group_info(&self, group: &str) -> (u64, String, Vec<String>) {
        let out = self.run(&["group", "info", group]);
        let mut epoch = 0;
        let mut code = String::new();
        let mut members = Vec::new();
        for l in out.lines() {
            if let Some(e) = l.strip_prefix("epoch ") {
                epoch = e.trim().parse().unwrap();
            } else if let Some(c) = l.strip_prefix("verification ") {
                code = c.trim().to_string();
            } else if let Some(m) = l.strip_prefix("member ") {
                members.push(m.split([' ']).next().unwrap().to_string());
            }
        }
        (epoch, code, members)
    }
}

fn assert_ok(name: &str, args: &[&str], out: &Output) {
    assert!(
        out.status.success(),
        "{name}: qpq {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn env_or(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn register(server: &ServerProcess, dir: &Path, name: &'static str) -> Account {
    let home = dir.join(name);
    let (pass, password) = (format!("{name} passphrase"), format!("{name} password"));
    register_account(server, &home, name, &pass, &password).await;
    Account { name, home }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    SendDm,
    SendGroup,
    Receive,
    Rotate,
    RemoveOrAdd,
    Upload,
    Download,
}

const OPS: [Op; 7] =
    [Op::SendDm, Op::SendGroup, Op::Receive, Op::Rotate, Op::RemoveOrAdd, Op::Upload, Op::Download];

/// What the test knows must hold.
#[derive(Default)]
struct Ledger {
    /// DM texts alice's `send` acknowledged (exit 0).
    dm_acked: Vec<String>,
    /// Group texts whose `send` exited 0, by sender.
    group_acked: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let kills_wanted = env_or("QPQTEST_CRASH_KILLS", 50);
    let seed = env_or("QPQTEST_CRASH_SEED", 0x5eed_c4a5);
    println!("crash matrix: {kills_wanted} kills, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let alice = register(&server, dir.path(), "alice").await;
    let bob = register(&server, dir.path(), "bob").await;
    let carol = register(&server, dir.path(), "carol").await;

    alice.run(&["dm", "bob", "dm-0"]);
    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", "bob", "carol"]);
    alice.run(&["send", "team", "group-0"]);
    for a in [&bob, &carol] {
        a.run(&["sync"]);
    }
    let mut ledger = Ledger { dm_acked: vec!["dm-0".into()], group_acked: vec!["group-0".into()] };

    let file = dir.path().join("payload.bin");
    let payload: Vec<u8> =
        (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &payload).unwrap();
    let file_arg = file.to_str().unwrap().to_string();
    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let mut uploaded = false;

    // How long each operation takes when left alone, to spread the kills over its whole run.
    let mut took: HashMap<Op, Duration> = HashMap::new();
    let mut kills = 0u64;
    let mut kills_by_op: HashMap<Op, u64> = HashMap::new();
    let mut round = 0u64;
    while kills < kills_wanted {
        round += 1;
        assert!(round < kills_wanted * 4 + 40, "too few kills landed ({kills} in {round} rounds)");
        let op = OPS[rng.gen_range(0..OPS.len())];
        let text = format!("r{round}-{}", rng.r#gen::<u32>());
        let carol_in = alice.group_info("team").2.iter().any(|m| m == "carol");
        let (who, args): (&Account, Vec<String>) = match op {
            Op::SendDm => (&alice, vec!["send".into(), "bob".into(), text.clone()]),
            Op::SendGroup => (&alice, vec!["send".into(), "team".into(), text.clone()]),
            Op::Receive => (&bob, vec!["sync".into()]),
            Op::Rotate => (&alice, vec!["group".into(), "rotate".into(), "team".into()]),
            Op::RemoveOrAdd if carol_in => {
                (&alice, vec!["group".into(), "remove".into(), "team".into(), "carol".into()])
            }
            Op::RemoveOrAdd => {
                // carol must have taken her Welcome-free state and topped up KeyPackages.
                carol.run(&["sync"]);
                (&alice, vec!["group".into(), "add".into(), "team".into(), "carol".into()])
            }
            Op::Upload => (&alice, vec!["send-file".into(), "team".into(), file_arg.clone()]),
            Op::Download if uploaded => {
                bob.run(&["sync"]);
                let d = downloads.to_str().unwrap().to_string();
                (&bob, vec!["download".into(), "team".into(), "--dir".into(), d])
            }
            Op::Download => continue,
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let Some(full) = took.get(&op).copied() else {
            // First time: run it whole, to learn how long it takes.
            let t = Instant::now();
            who.run(&args);
            took.insert(op, t.elapsed());
            after_success(op, &text, &mut ledger, &mut uploaded, &downloads, &payload);
            continue;
        };
        let at = full.mul_f64(rng.gen_range(0.02..1.1));
        if who.run_and_kill(&args, at) {
            kills += 1;
            *kills_by_op.entry(op).or_default() += 1;
            // The account opens, and a plain sync finishes what the kill cut short.
            who.run(&["whoami"]);
            who.run(&["sync"]);
        } else {
            // It finished before the kill: its exit status must be success.
            after_success(op, &text, &mut ledger, &mut uploaded, &downloads, &payload);
        }
        if op == Op::Download && downloads.join("payload.bin").exists() {
            check_download(&downloads, &payload);
        }
        if round.is_multiple_of(15) {
            check(&alice, &bob, &carol, &ledger, round);
        }
    }
    check(&alice, &bob, &carol, &ledger, round + 1);
    // A download cut short resumes and completes.
    if uploaded {
        bob.run(&["download", "team", "--dir", downloads.to_str().unwrap()]);
        check_download(&downloads, &payload);
    }
    println!("crash matrix: {kills} kills in {round} rounds: {kills_by_op:?}");
}

/// Records what an operation that ran to its end acknowledged. (A run that ended before its
/// kill is checked by exit status in `run_and_kill`'s caller only through this ledger: its
/// message must arrive like any other.)
fn after_success(
    op: Op,
    text: &str,
    ledger: &mut Ledger,
    uploaded: &mut bool,
    downloads: &Path,
    payload: &[u8],
) {
    match op {
        Op::SendDm => ledger.dm_acked.push(text.to_string()),
        Op::SendGroup => ledger.group_acked.push(text.to_string()),
        Op::Upload => *uploaded = true,
        Op::Download => check_download(downloads, payload),
        _ => {}
    }
}

fn check_download(downloads: &Path, payload: &[u8]) {
    let saved = downloads.join("payload.bin");
    if let Ok(bytes) = std::fs::read(&saved) {
        assert!(bytes == payload, "the downloaded file differs from the one sent");
        std::fs::remove_file(&saved).unwrap();
    }
}

fn assert_once(who: &str, conv: &str, texts: &[String]) {
    let mut seen = std::collections::HashSet::new();
    for t in texts {
        assert!(seen.insert(t), "{who}'s history of {conv} holds {t:?} twice: {texts:?}");
    }
}

fn check(alice: &Account, bob: &Account, carol: &Account, ledger: &Ledger, round: u64) {
    // Settle: everyone flushes and fetches, twice (commits, then what follows them).
    for _ in 0..2 {
        for a in [alice, bob, carol] {
            a.run(&["sync"]);
        }
    }
    // The peers still decrypt a fresh message.
    let probe = format!("probe-{round}");
    alice.run(&["send", "bob", &probe]);
    alice.run(&["send", "team", &probe]);
    bob.run(&["sync"]);
    carol.run(&["sync"]);

    let (a_dm, b_dm) = (alice.texts("bob"), bob.texts("alice"));
    assert_once("alice", "the DM", &a_dm);
    assert_once("bob", "the DM", &b_dm);
    assert_eq!(a_dm, b_dm, "alice's and bob's DM histories differ");
    for t in &ledger.dm_acked {
        assert!(a_dm.contains(t), "acknowledged DM {t:?} missing");
    }
    assert_eq!(a_dm.last(), Some(&probe), "bob did not get the probe");

    let (a_g, b_g) = (alice.texts("team"), bob.texts("team"));
    assert_once("alice", "team", &a_g);
    assert_once("bob", "team", &b_g);
    for t in &a_g {
        assert!(b_g.contains(t), "bob never got group message {t:?}");
    }
    for t in &ledger.group_acked {
        assert!(a_g.contains(t), "acknowledged group message {t:?} missing from alice's history");
    }
    assert!(b_g.contains(&probe), "bob did not get the group probe");

    let (epoch, code, members) = alice.group_info("team");
    for other in [bob, carol] {
        if members.iter().any(|m| m == other.name) {
            let (e, c, _) = other.group_info("team");
            assert_eq!((e, &c), (epoch, &code), "{} disagrees with alice on the group", other.name);
        }
    }
    if members.iter().any(|m| m == "carol") {
        assert!(carol.texts("team").contains(&probe), "carol did not get the group probe");
    }
    println!(
        "checkpoint {round}: epoch {epoch}, {} DM and {} group messages",
        a_dm.len(),
        a_g.len()
    );
}
