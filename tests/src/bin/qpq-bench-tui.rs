//! `qpq-bench-tui`: the terminal UI's start-up, render time and memory with a large store.
//!
//! Builds a real account store through a real server (50 conversations, 10,000 messages, all
//! sent with MLS), then measures, in this process, what `qpq` does at start: unlock the store
//! (Argon2id with the default parameters), load the conversation list and the newest history
//! page, and draw the first frame; then the time to render a frame, and the resident memory.
//!
//! Then the daemon: it starts the real `qpq daemon` on that store (the server still running),
//! unlocks it over its socket, and measures what `qpq` does when it attaches to a running
//! daemon (attach, greeting, open the biggest conversation, draw the first frame), the
//! daemon's idle memory, and its CPU time while idle, with nothing attached and with one idle
//! attached connection.
//!
//! Run: `cargo build --release --workspace --bins && ./target/release/qpq-bench-tui`
//! (`QPQ_BENCH_MESSAGES` changes the message count, `QPQ_BENCH_ATTACHES` the number of timed
//! attaches (20), `QPQ_BENCH_IDLE_SECS` each idle CPU window (30 s).)

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qpq_core::client::{Client, ConnState, RegisterOptions};
use qpq_core::ids::GroupId;
use qpq_core::vault::KdfParams;
use qpq_tests::ServerProcess;
use qpq_tui::app::{Action, App, Command, WorkerEvent};
use qpq_tui::attach::Attached;
use qpq_tui::config::Config;
use qpq_tui::protocol::{Reply, Request};
use qpq_tui::worker::HISTORY_PAGE;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

const CONVERSATIONS: usize = 50;

/// The attach to first frame goal (p95).
const ATTACH_GOAL: Duration = Duration::from_millis(50);

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`; `pid` may be `self`. 0 if missing.
fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    status_kib("self", "VmRSS")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Second stage: measure in a fresh process, so RSS is the UI's and not the builder's.
    if let Some(store) = std::env::var_os("QPQ_BENCH_STORE") {
        let dm = hex_decode(&std::env::var("QPQ_BENCH_DM")?);
        return measure(std::path::Path::new(&store), &dm.into());
    }
    let messages: usize = env_or("QPQ_BENCH_MESSAGES", 10_000);
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(
        &dir.path().join("server"),
        &[
            "--set",
            "limits.max_queue_messages=100000",
            // alice adds bob to 50 conversations in a row.
            "--set",
            "limits.key_package_fetch_per_target_burst=100",
        ],
    )?;
    let register = |name: &str, kdf| RegisterOptions {
        store: dir.path().join(name).join("account.qpq"),
        passphrase: format!("{name} passphrase"),
        server: server.addr,
        pin: Some(server.fingerprint.clone()),
        username: name.into(),
        password: format!("{name} password"),
        invite: String::new(),
        kdf,
    };
    // bob's store is the one measured: default (production) KDF parameters.
    let mut alice = Client::register(register(
        "alice",
        KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 },
    ))
    .await?;
    let mut bob = Client::register(register("bob", KdfParams::default())).await?;

    let t = Instant::now();
    let dm = alice.dm("bob").await?;
    let mut convs = vec![dm.clone()];
    for i in 1..CONVERSATIONS {
        if i % 8 == 0 {
            bob.ensure_key_packages().await?;
        }
        let g = alice.create_group(&format!("group-{i:02}")).await?;
        alice.add_members(&g, &["bob".into()]).await?;
        convs.push(g);
    }
    for i in 0..messages {
        let conv = if i % 10 == 0 { &convs[i / 10 % CONVERSATIONS] } else { &dm };
        alice
            .send_text(conv, &format!("message {i}: the quick brown fox jumps over the lazy dog"))
            .await?;
        if i % 1000 == 999 {
            bob.sync().await?;
        }
    }
    bob.sync().await?;
    let total: usize = bob.conversations()?.iter().map(|c| c.next_seq as usize).sum();
    println!(
        "store: {} conversations, {total} history entries (built in {:.1?})",
        bob.conversations()?.len(),
        t.elapsed()
    );
    bob.disconnect().await;
    alice.disconnect().await;
    drop(bob);
    drop(alice);
    let store = dir.path().join("bob").join("account.qpq");
    println!("store file: {:.1} MiB", std::fs::metadata(&store)?.len() as f64 / (1 << 20) as f64);
    let status = std::process::Command::new(std::env::current_exe()?)
        .env("QPQ_BENCH_STORE", &store)
        .env("QPQ_BENCH_DM", qpq_core::identity::hex(&dm))
        .status()?;
    anyhow::ensure!(status.success(), "measurement failed");
    daemon(&dir.path().join("bob"), &dm).await
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

fn measure(store: &std::path::Path, dm: &GroupId) -> anyhow::Result<()> {
    let rss_before = rss_kib();
    // What `qpq` does between the passphrase and the first frame of the main screen.
    let t0 = Instant::now();
    let client = Client::open(store, "bob passphrase")?;
    let unlocked = t0.elapsed();
    let list = client.conversations()?;
    let first = list.iter().find(|c| c.id == *dm).cloned().unwrap_or_else(|| list[0].clone());
    let _ = &first;
    let entries = client.history(&first.id, HISTORY_PAGE)?;
    let names: Vec<(Vec<u8>, String)> = entries
        .iter()
        .filter_map(|e| client.cached_name(&e.sender).map(|n| (e.sender.clone(), n)))
        .collect();
    let mut app = App::new(Config::default());
    app.update(Action::Worker(WorkerEvent::Conversations(list)));
    app.update(Action::Worker(WorkerEvent::History {
        conv: app.open.clone().unwrap_or_default(),
        entries,
        names,
    }));
    let mut terminal = Terminal::new(TestBackend::new(100, 30))?;
    terminal.draw(|f| qpq_tui::ui::draw(f, &app))?;
    let first_frame = t0.elapsed();
    println!("unlock (Argon2id 32 MiB, 3 passes): {:.1} ms", unlocked.as_secs_f64() * 1e3);
    println!(
        "time to first frame (unlock + list + {HISTORY_PAGE} newest entries + draw): {:.1} ms",
        first_frame.as_secs_f64() * 1e3
    );
    println!("  of which after unlock: {:.1} ms", (first_frame - unlocked).as_secs_f64() * 1e3);

    for (w, h) in [(80u16, 24u16), (100, 30), (200, 60)] {
        let mut terminal = Terminal::new(TestBackend::new(w, h))?;
        let mut times = Vec::with_capacity(500);
        for _ in 0..500 {
            let t = Instant::now();
            terminal.draw(|f| qpq_tui::ui::draw(f, &app))?;
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "frame render {w}x{h} with {} entries: p50 {:.0} µs, p99 {:.0} µs",
            app.timeline.len(),
            percentile(&times, 0.5).as_secs_f64() * 1e6,
            percentile(&times, 0.99).as_secs_f64() * 1e6
        );
    }
    println!(
        "RSS (fresh process): {:.1} MiB with the store open and the UI loaded ({:.1} MiB before opening)",
        rss_kib() as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    drop(client);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `qpq daemon` child, killed if it still runs when dropped (a run that failed).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of a process, in clock ticks: fields 14 and 15 of `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Field 2, the command name, may hold spaces: count from the `)` that ends it.
    let rest = stat.rsplit_once(')').context("malformed /proc/<pid>/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        Ok(fields.get(n - 3).context("short /proc/<pid>/stat")?.parse()?)
    };
    Ok(field(14)? + field(15)?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

/// Reads replies, feeding every event to `app`, until `last` says an event was the last one.
/// Returns the commands `app` asked for on the way.
async fn read_until(
    attached: &mut Attached,
    app: &mut App,
    mut last: impl FnMut(&WorkerEvent) -> bool,
) -> anyhow::Result<Vec<Command>> {
    let mut asked = Vec::new();
    loop {
        match attached.recv().await? {
            Some(Reply::Event(ev)) => {
                let done = last(&ev);
                asked.extend(app.update(Action::Worker(ev)));
                if done {
                    return Ok(asked);
                }
            }
            Some(Reply::Error(e)) => bail!("the qpq daemon refused: {e}"),
            Some(_) => {}
            None => bail!("the qpq daemon closed the connection"),
        }
    }
}

/// What `qpq` does with a daemon already unlocked, up to its first frame: attach, take the
/// greeting, open the conversation the UI opens by itself (the newest: the DM, the biggest),
/// take its history, draw. Returns the connection and the times from the start to the
/// greeting's conversation list, to the history, and to the drawn frame.
async fn attach_and_draw(home: &Path, dm: &GroupId) -> anyhow::Result<(Attached, [Duration; 3])> {
    let t = Instant::now();
    let mut attached = Attached::to(home).await?.context("no qpq daemon on the socket")?;
    anyhow::ensure!(!attached.locked, "the qpq daemon is locked");
    let mut app = App::new(Config::default());
    let asked =
        read_until(&mut attached, &mut app, |e| matches!(e, WorkerEvent::Conversations(_))).await?;
    let greeted = t.elapsed();
    anyhow::ensure!(asked == [Command::Open(dm.clone())], "the UI did not open the DM first");
    for cmd in asked {
        attached.send(&Request::Ui(cmd)).await?;
    }
    let is_history = |e: &WorkerEvent| matches!(e, WorkerEvent::History { conv, .. } if conv == dm);
    read_until(&mut attached, &mut app, is_history).await?;
    let history = t.elapsed();
    let mut terminal = Terminal::new(TestBackend::new(120, 40))?;
    terminal.draw(|f| qpq_tui::ui::draw(f, &app))?;
    Ok((attached, [greeted, history, t.elapsed()]))
}

/// Third stage: the real `qpq daemon` on bob's store in `home`, the server still running.
async fn daemon(home: &Path, dm: &GroupId) -> anyhow::Result<()> {
    let attaches: usize = env_or("QPQ_BENCH_ATTACHES", 20).max(1);
    let idle = Duration::from_secs(env_or("QPQ_BENCH_IDLE_SECS", 30));
    let bin = qpq_tests::workspace_bin("qpq");
    // As `qpq` starts one: no secret, home or server override in its environment.
    let child = std::process::Command::new(&bin)
        .arg("--home")
        .arg(home)
        .arg("daemon")
        .env_remove("QPQ_PASSPHRASE")
        .env_remove("QPQ_PASSWORD")
        .env_remove("QPQ_HOME")
        .env_remove("QPQ_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut daemon = Daemon(child);
    let pid = daemon.0.id();
    let socket = qpq_tui::ipc::socket_path(home)?;
    let t = Instant::now();
    while !socket.exists() {
        if let Some(status) = daemon.0.try_wait()? {
            bail!("qpq daemon exited before serving: {status}");
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "no daemon socket after 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "daemon: `{} --home H daemon` (pid {pid}), socket after {:.0} ms",
        bin.display(),
        ms(t.elapsed())
    );

    // Unlock, then wait for the worker to connect, sync and greet.
    let mut attached = Attached::to(home).await?.context("no qpq daemon on the socket")?;
    anyhow::ensure!(attached.locked, "the qpq daemon started unlocked");
    let t = Instant::now();
    attached.unlock("bob passphrase".into()).await?.map_err(anyhow::Error::msg)?;
    let unlocked = t.elapsed();
    let mut app = App::new(Config::default());
    let (mut online, mut listed) = (false, false);
    let greeting = read_until(&mut attached, &mut app, |e| {
        online |= matches!(e, WorkerEvent::Status { conn: ConnState::Online, .. });
        listed |= matches!(e, WorkerEvent::Conversations(_));
        online && listed
    });
    tokio::time::timeout(Duration::from_secs(60), greeting)
        .await
        .context("the daemon did not come online within 60 s")??;
    let greeted = t.elapsed();
    drop(attached);
    let dm_entries = app.convs.iter().find(|c| c.id == *dm).map_or(0, |c| c.next_seq);
    println!(
        "daemon unlock over the socket (the store's default KDF: Argon2id 32 MiB, 3 passes): {:.1} ms; connected, synced and greeted {:.1} ms later",
        ms(unlocked),
        ms(greeted - unlocked)
    );
    let pid_s = pid.to_string();
    let rss_unlocked = status_kib(&pid_s, "VmRSS");

    // Attach to first frame, as `qpq` with the daemon running. A short pause between runs
    // lets the daemon finish the previous open (read marker, receipt) and the detach.
    let mut runs = Vec::with_capacity(attaches);
    for _ in 0..attaches {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (attached, times) =
            tokio::time::timeout(Duration::from_secs(30), attach_and_draw(home, dm))
                .await
                .context("an attach took over 30 s")??;
        drop(attached);
        runs.push(times);
    }
    let sorted = |i: usize| {
        let mut v: Vec<Duration> = runs.iter().map(|r| r[i]).collect();
        v.sort();
        v
    };
    let (greet, history, frame) = (sorted(0), sorted(1), sorted(2));
    let p95 = percentile(&frame, 0.95);
    println!(
        "attach to first frame (attach, greeting, open the DM: newest {HISTORY_PAGE} of {dm_entries} entries, draw 120x40), {attaches} runs: min {:.1} / p50 {:.1} / p95 {:.1} / max {:.1} ms; goal p95 ≤ {} ms: {}",
        ms(frame[0]),
        ms(percentile(&frame, 0.5)),
        ms(p95),
        ms(frame[frame.len() - 1]),
        ATTACH_GOAL.as_millis(),
        if p95 <= ATTACH_GOAL { "met" } else { "MISSED" }
    );
    println!(
        "  first run {:.1} ms; p50 to the greeting's conversation list {:.1} ms, to the history {:.1} ms; {} runs over 1 s, the slowest of the others {:.1} ms",
        ms(runs[0][2]),
        ms(percentile(&greet, 0.5)),
        ms(percentile(&history, 0.5)),
        frame.iter().filter(|d| d.as_secs() >= 1).count(),
        ms(frame.iter().filter(|d| d.as_secs() < 1).max().copied().unwrap_or_default())
    );

    // Idle memory: unlocked, online, nothing attached.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, hwm) = (status_kib(&pid_s, "VmRSS"), status_kib(&pid_s, "VmHWM"));
    println!(
        "daemon idle RSS (unlocked, online, nothing attached, 5 s after the attaches): VmRSS {:.1} MiB ({rss} KiB), VmHWM {:.1} MiB ({hwm} KiB); {:.1} MiB right after the unlock",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss_unlocked as f64 / 1024.0
    );

    // Idle CPU: utime + stime over a window, nothing attached, then one idle attached `qpq`
    // with the DM open (the common case: a terminal UI left open).
    let hz = clock_ticks_per_sec();
    let window = |what: &str, ticks: u64, wall: Duration| {
        let cpu_ms = ticks as f64 * 1e3 / hz as f64;
        println!(
            "daemon idle CPU, {what}: {ticks} ticks of {:.0} ms in {:.1} s = {:.0} ms CPU per minute, {:.3} % of one core",
            1e3 / hz as f64,
            wall.as_secs_f64(),
            cpu_ms * 60.0 / wall.as_secs_f64(),
            cpu_ms / wall.as_secs_f64() / 10.0
        );
    };
    let (t, c) = (Instant::now(), cpu_ticks(pid)?);
    tokio::time::sleep(idle).await;
    window("nothing attached", cpu_ticks(pid)? - c, t.elapsed());
    let (attached, _) = attach_and_draw(home, dm).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (t, c) = (Instant::now(), cpu_ticks(pid)?);
    tokio::time::sleep(idle).await;
    window("one idle attached qpq (DM open)", cpu_ticks(pid)? - c, t.elapsed());
    drop(attached);

    // Stop as a service manager does.
    let t = Instant::now();
    let kill = std::process::Command::new("kill").args(["-TERM", &pid_s]).status()?;
    anyhow::ensure!(kill.success(), "kill -TERM {pid} failed");
    let status = loop {
        if let Some(status) = daemon.0.try_wait()? {
            break status;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(15), "the daemon ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    anyhow::ensure!(status.success(), "the daemon exited with {status} on SIGTERM");
    println!("daemon stopped by SIGTERM in {:.0} ms ({status})", ms(t.elapsed()));
    Ok(())
}
