//! `qpq-bench-tui`: the terminal UI's start-up, render time and memory with a large store.
//!
//! Builds a real account store through a real server (50 conversations, 10,000 messages, all
//! sent with MLS), then measures, in this process, what `qpq` does at start: unlock the store
//! (Argon2id with the default parameters), load the conversation list and the newest history
//! page, and draw the first frame; then the time to render a frame, and the resident memory.
//!
//! Run: `cargo build --release --workspace --bins && ./target/release/qpq-bench-tui`
//! (`QPQ_BENCH_MESSAGES` changes the message count.)

use std::time::{Duration, Instant};

use qpq_core::client::{Client, RegisterOptions};
use qpq_core::vault::KdfParams;
use qpq_tests::ServerProcess;
use qpq_tui::app::{Action, App, WorkerEvent};
use qpq_tui::config::Config;
use qpq_tui::worker::HISTORY_PAGE;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

const CONVERSATIONS: usize = 50;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Second stage: measure in a fresh process, so RSS is the UI's and not the builder's.
    if let Some(store) = std::env::var_os("QPQ_BENCH_STORE") {
        let dm = hex_decode(&std::env::var("QPQ_BENCH_DM")?);
        return measure(std::path::Path::new(&store), &dm);
    }
    let messages: usize =
        std::env::var("QPQ_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
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
    Ok(())
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

fn measure(store: &std::path::Path, dm: &[u8]) -> anyhow::Result<()> {
    let rss_before = rss_kib();
    // What `qpq` does between the passphrase and the first frame of the main screen.
    let t0 = Instant::now();
    let client = Client::open(store, "bob passphrase")?;
    let unlocked = t0.elapsed();
    let list = client.conversations()?;
    let first = list.iter().find(|c| c.id == dm).cloned().unwrap_or_else(|| list[0].clone());
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
