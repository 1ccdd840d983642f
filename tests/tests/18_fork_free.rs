//! Groups that never fork (PROTOCOL.md §6.9), through the real `qpq` and `qpq-server-lite`
//! binaries.
//!
//! - Two admins change a group at the same moment, round after round (adds, removes, key
//!   rotations, members leaving and an admin committing their removal), while one of the
//!   committing `qpq` processes is sometimes SIGKILLed and the server is SIGKILLed and
//!   restarted in the middle of a round. After every round all members have the same epoch,
//!   verification code and member list; at the end every member's fresh message reaches every
//!   other member.
//! - A server that gives different commits to different members (two copies of its database
//!   serving two halves of the group) is detected by the members of the other branch.
//!
//! CI runs a bounded slice (`QPQTEST_FORK_ROUNDS`, default 8, seed `QPQTEST_FORK_SEED`,
//! default fixed). The long run, with a fresh seed each time:
//!
//! ```sh
//! cargo build --workspace --bins
//! QPQTEST_FORK_ROUNDS=200 QPQTEST_FORK_SEED=$RANDOM \
//!     cargo test -p qpq-tests --test 18_fork_free -- --nocapture
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use qpq_tests::{ServerProcess, copy_dir, qpq_command, register_account};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
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
    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}: qpq {} failed ({}):\n{}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run(args).stdout).into_owned()
    }

    /// `sync`, retried while the server restarts.
    fn sync(&self) -> String {
        for _ in 0..20 {
            let out = self.cmd(&["sync"]).output().unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stderr).into_owned();
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        String::from_utf8_lossy(&self.run(&["sync"]).stderr).into_owned()
    }

    /// (epoch, verification code, sorted member names, warning) of a group.
    fn info(&self, group: &str) -> Info {
        let out = self.stdout(&["group", "info", group]);
        let mut info = Info::default();
        for l in out.lines() {
            if let Some(e) = l.strip_prefix("epoch ") {
                info.epoch = e.trim().parse().unwrap();
            } else if let Some(c) = l.strip_prefix("verification ") {
                info.code = c.trim().to_string();
            } else if let Some(m) = l.strip_prefix("member ") {
                info.members.push(m.split(' ').next().unwrap().to_string());
            } else if let Some(w) = l.strip_prefix("warning ") {
                info.warning = w.to_string();
            }
        }
        info.members.sort();
        info
    }

    /// Message texts of a conversation's history, oldest first.
    fn texts(&self, conv: &str) -> Vec<String> {
        self.stdout(&["tail", conv, "-n", "100000"])
            .lines()
            .filter_map(|l| l.split_once("] ").map(|(_, t)| t.to_string()))
            .collect()
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Info {
    epoch: u64,
    code: String,
    members: Vec<String>,
    warning: String,
}

/// Seven accounts register from one address: keep the per-address auth limit out of the way.
const AUTH_ARGS: [&str; 4] =
    ["--set", "limits.auth_per_ip_burst=1000", "--set", "limits.auth_per_ip_per_min=1000"];

fn env_or(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn register(server: &ServerProcess, dir: &Path, name: &'static str) -> Account {
    let home = dir.join(name);
    let (pass, password) = (format!("{name} passphrase"), format!("{name} password"));
    register_account(server, &home, name, &pass, &password).await;
    Account { name, home }
}

/// Waits for a spawned `qpq`; returns (exited successfully, stderr). `kill_after`: SIGKILL it
/// then if it still runs (a client restart: the next `sync` must finish what it began).
fn finish(mut child: Child, kill_after: Option<Duration>) -> (bool, bool, String) {
    let mut killed = false;
    if let Some(after) = kill_after {
        let deadline = Instant::now() + after;
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            killed = true;
        }
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), killed, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Syncs everyone (admins first) until all members of `group` agree, at most `passes` times.
/// Returns the agreed info, or panics showing who disagrees.
fn settle(all: &[&Account], group: &str, passes: usize) -> Info {
    let mut last = Vec::new();
    for _ in 0..passes {
        for a in all {
            a.sync();
        }
        let reference = all[0].info(group);
        last = all
            .iter()
            .filter(|a| reference.members.iter().any(|m| m == a.name))
            .map(|a| (a.name, a.info(group)))
            .collect::<Vec<_>>();
        if last.iter().all(|(_, i)| *i == reference) {
            return reference;
        }
    }
    panic!("the members of {group} did not converge: {last:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admins_committing_at_once_never_fork_the_group() {
    let rounds = env_or("QPQTEST_FORK_ROUNDS", 8);
    let seed = env_or("QPQTEST_FORK_SEED", 0xf04c_f2ee);
    println!("fork-free: {rounds} rounds, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut server = ServerProcess::start(&data, &AUTH_ARGS).unwrap();
    let addr = server.addr.to_string();
    let alice = register(&server, dir.path(), "alice").await;
    let bob = register(&server, dir.path(), "bob").await;
    let mut pool = Vec::new();
    for name in ["carol", "dave", "erin", "frank", "gina"] {
        pool.push(register(&server, dir.path(), name).await);
    }
    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", "bob", "carol", "dave", "erin"]);
    alice.run(&["group", "promote", "team", "bob"]);
    let all: Vec<&Account> = [&alice, &bob].into_iter().chain(pool.iter()).collect();
    let mut agreed = settle(&all, "team", 3);
    assert_eq!(agreed.members, ["alice", "bob", "carol", "dave", "erin"]);

    let (mut races, mut kills, mut server_kills) = (0, 0, 0);
    for round in 1..=rounds {
        let members = agreed.members.clone();
        let inside: Vec<&Account> =
            pool.iter().filter(|a| members.iter().any(|m| m == a.name)).collect();
        let outside: Vec<&Account> =
            pool.iter().filter(|a| !members.iter().any(|m| m == a.name)).collect();
        // Now and then a member leaves first: an admin's client commits its removal, in the
        // same race as the admins' own changes.
        let leaver =
            (rng.gen_bool(0.25) && inside.len() > 2).then(|| *inside.choose(&mut rng).unwrap());
        if let Some(l) = leaver {
            l.run(&["group", "leave", "team"]);
        }
        let mut taken: Vec<&str> = leaver.iter().map(|l| l.name).collect();
        let mut op = |rng: &mut StdRng| -> Vec<String> {
            let adds: Vec<&&Account> =
                outside.iter().filter(|a| !taken.contains(&a.name)).collect();
            let removes: Vec<&&Account> =
                inside.iter().filter(|a| !taken.contains(&a.name)).collect();
            let r: f64 = rng.r#gen();
            if r < 0.35 && !adds.is_empty() {
                let who = adds.choose(rng).unwrap();
                taken.push(who.name);
                vec!["group".into(), "add".into(), "team".into(), who.name.into()]
            } else if r < 0.65 && removes.len() > 1 {
                let who = removes.choose(rng).unwrap();
                taken.push(who.name);
                vec!["group".into(), "remove".into(), "team".into(), who.name.into()]
            } else {
                vec!["group".into(), "rotate".into(), "team".into()]
            }
        };
        let ops = [op(&mut rng), op(&mut rng)];
        // Whoever is added needs KeyPackages on the server: any sync tops them up.
        for a in &outside {
            a.sync();
        }
        let kill_server = round == rounds / 2 + 1;
        let kill_client: Option<usize> = rng.gen_bool(0.3).then(|| rng.gen_range(0..2));
        let children: Vec<Child> = [&alice, &bob]
            .iter()
            .zip(&ops)
            .map(|(a, args)| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                a.cmd(&args).spawn().unwrap()
            })
            .collect();
        if kill_server {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
            server.kill();
            server = ServerProcess::start_on(&data, &addr, &AUTH_ARGS).unwrap();
            server_kills += 1;
        }
        let mut notes = String::new();
        let mut done = [false; 2];
        for (i, child) in children.into_iter().enumerate() {
            let after =
                (kill_client == Some(i)).then(|| Duration::from_millis(rng.gen_range(5..400)));
            let (ok, killed, stderr) = finish(child, after);
            kills += usize::from(killed);
            done[i] = ok;
            notes.push_str(&stderr);
        }
        agreed = settle(&all, "team", 6);
        // A change whose command succeeded took effect, whichever commit won the race.
        for (op, ok) in ops.iter().zip(done) {
            let (verb, who) = (op[1].as_str(), op.get(3).map(String::as_str));
            match (ok, verb, who) {
                (true, "add", Some(w)) => {
                    assert!(agreed.members.iter().any(|m| m == w), "round {round}: {w} not added")
                }
                (true, "remove", Some(w)) => {
                    assert!(
                        !agreed.members.iter().any(|m| m == w),
                        "round {round}: {w} not removed"
                    )
                }
                _ => {}
            }
        }
        races += notes.matches("at the same time").count();
        println!(
            "round {round}: alice {:?} {}, bob {:?} {}, leaver {:?} -> epoch {}, members {:?}",
            ops[0].get(1..).unwrap_or_default(),
            if done[0] { "ok" } else { "cut off" },
            ops[1].get(1..).unwrap_or_default(),
            if done[1] { "ok" } else { "cut off" },
            leaver.map(|l| l.name),
            agreed.epoch,
            agreed.members
        );
        assert!(agreed.warning.is_empty(), "round {round}: {}", agreed.warning);
        if let Some(l) = leaver {
            assert!(
                !agreed.members.iter().any(|m| m == l.name),
                "round {round}: {} is still in",
                l.name
            );
        }
    }
    println!("{races} races lost and redone, {kills} clients killed, {server_kills} server kills");

    // Every message sent after convergence arrives.
    let members: Vec<&Account> =
        all.iter().copied().filter(|a| agreed.members.iter().any(|m| m == a.name)).collect();
    for a in &members {
        a.run(&["send", "team", &format!("after from {}", a.name)]);
    }
    for a in &members {
        a.sync();
    }
    for a in &members {
        let texts = a.texts("team");
        for b in &members {
            let want = format!("after from {}", b.name);
            assert!(texts.contains(&want), "{} lacks {want:?}: {texts:?}", a.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_gives_members_different_commits_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut server = ServerProcess::start(&data, &AUTH_ARGS).unwrap();
    let addr = server.addr.to_string();
    let alice = register(&server, dir.path(), "alice").await;
    let bob = register(&server, dir.path(), "bob").await;
    let carol = register(&server, dir.path(), "carol").await;
    let dave = register(&server, dir.path(), "dave").await;
    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", "bob", "carol", "dave"]);
    alice.run(&["group", "promote", "team", "bob"]);
    let all = [&alice, &bob, &carol, &dave];
    let start = settle(&all, "team", 3);

    // The dishonest server: two copies of one database, each showing half of the group its
    // own commit for the same epoch (both are the first claim of their copy of the slot).
    server.kill();
    copy_dir(&data, &dir.path().join("server-copy"));
    let server = ServerProcess::start_on(&data, &addr, &AUTH_ARGS).unwrap();
    let copy = ServerProcess::start(&dir.path().join("server-copy"), &AUTH_ARGS).unwrap();
    assert_eq!(copy.fingerprint, server.fingerprint);
    let other = copy.addr.to_string();

    alice.run(&["group", "rotate", "team"]);
    carol.sync();
    bob.run(&["--server", &other, "group", "rotate", "team"]);
    dave.run(&["--server", &other, "sync"]);
    let (a, b) = (alice.info("team"), bob.info("team"));
    assert_eq!((a.epoch, b.epoch), (start.epoch + 1, start.epoch + 1));
    assert_ne!(a.code, b.code, "two branches, so two verification codes");
    assert_eq!(carol.info("team").code, a.code);
    assert_eq!(dave.info("team").code, b.code);

    // Back on one server: alice's next message reaches bob and dave from the other branch.
    alice.run(&["send", "team", "which branch are you on?"]);
    let notes: Vec<String> = all.iter().map(|a| a.sync()).collect();
    for (i, a) in all.iter().enumerate() {
        let info = a.info("team");
        let forked = a.name == "bob" || a.name == "dave";
        if forked {
            assert!(info.warning.contains("FORK"), "{} saw no fork: {info:?}", a.name);
            assert!(notes[i].contains("FORK"), "{} was not told: {}", a.name, notes[i]);
            let history = a.stdout(&["tail", "team", "-n", "1000"]);
            assert!(
                history.lines().any(|l| l.starts_with("* ") && l.contains("FORK")),
                "{}: no history line:\n{history}",
                a.name
            );
        } else {
            assert!(info.warning.is_empty(), "{}: {}", a.name, info.warning);
        }
    }
    assert!(carol.texts("team").contains(&"which branch are you on?".to_string()));
    drop(copy);
}
