//! `latency`: 1:1 messages at a steady 1,000 per second, send to receive by push: opaque
//! bytes, then MLS application messages (encrypt on the sender and decrypt on the receiver
//! included, vaults in a temporary directory on disk as a client keeps them).
//!
//! Every hop that stores something waits for its flush (the server before it answers and
//! pushes, each vault before it hands out a ciphertext or a plaintext), so the figures carry
//! the disk's flush latency. To show how much, the run measures that latency on its own first
//! (a small write and `fdatasync` in the same directory, at the same rate) and then repeats
//! everything with the database and vaults on tmpfs (`/dev/shm`), where a flush costs nothing.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qpq_core::identity::Identity;
use qpq_core::mls::{Incoming, Kind, Mls};
use qpq_core::vault::{KdfParams, Vault};
use qpq_proto::{Message, v1};
use qpq_tests::Client;

use super::common::{self, Opts, Summary, Table, pcts};
use super::probe::{self, Recorder};

/// Messages per second.
const RATE: u32 = 1000;
/// Payload bytes without MLS; MLS plaintext bytes (the smallest padding bucket).
const PAYLOAD: usize = 256;
const PLAINTEXT: usize = 128;
/// Messages sent one at a time (each waits for its answer, so these phases run slower).
const SERIAL_MAX: u64 = 2000;

/// Runs the benchmark and prints its tables: storage in the temp directory, then on tmpfs.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    measure(opts, &std::env::temp_dir(), "storage in the temp directory").await?;
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && std::env::temp_dir() != shm {
        measure(opts, shm, "storage on tmpfs (/dev/shm): flushes cost nothing").await?;
    }
    Ok(())
}

/// One full run with the server's database and the vaults under `root`.
async fn measure(opts: &Opts, root: &Path, storage: &str) -> anyhow::Result<()> {
    let secs = Duration::from_millis(if opts.quick { 300 } else { 10_000 });
    let dir = tempfile::tempdir_in(root)?;
    let n = (RATE as f64 * secs.as_secs_f64()) as u64;
    let flush = flush_latency(dir.path(), n.min(SERIAL_MAX)).await?;
    let mut pairs = vec![("max_queue_messages", "10000000"), ("max_queue_bytes", "10000000000")];
    pairs.extend_from_slice(common::NO_AUTH_LIMITS);
    let args = common::limits(&pairs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::start_server(opts, dir.path(), &args)?;
    let endpoint = Client::endpoint(&server.fingerprint)?;
    let alice = common::account(&endpoint, &server, "alice").await?;
    let bob = common::account(&endpoint, &server, "bob").await?;
    let (sender, bob_key) = (Arc::new(alice.client), bob.identity);
    let receiver = Arc::new(bob.client);

    // Opaque bytes.
    let rec = Arc::new(Recorder::new());
    let task = probe::spawn_receiver(receiver.clone(), rec.clone());
    let gap = Duration::from_secs_f64(1.0 / RATE as f64);
    rec.set_phase(1);
    let t0 = Instant::now();
    let mut calls = Vec::with_capacity(n as usize);
    for i in 0..n {
        common::sleep_until(t0 + gap * i as u32).await;
        let (sender, payload) = (sender.clone(), rec.payload(PAYLOAD));
        calls.push(tokio::spawn(async move {
            sender.enqueue(&bob_key, &payload, qpq_tests::message_id()).await
        }));
    }
    let sent_in = t0.elapsed();
    for c in calls {
        c.await??;
    }
    wait_for(&rec, n).await;
    task.abort();
    let plain = Summary::of(&mut rec.latencies());
    let plain_received = rec.count();

    // One at a time: each send waits for its answer (as the client's outbox does), at up
    // to RATE per second.
    rec.set_phase(2);
    let serial_n = n.min(SERIAL_MAX);
    let task = probe::spawn_receiver(receiver.clone(), rec.clone());
    let t0 = Instant::now();
    for i in 0..serial_n {
        common::sleep_until(t0 + gap * i as u32).await;
        sender.enqueue(&bob_key, &rec.payload(PAYLOAD), qpq_tests::message_id()).await?;
    }
    let serial_in = t0.elapsed();
    wait_for(&rec, serial_n).await;
    task.abort();
    let serial = Summary::of(&mut rec.latencies());
    let serial_received = rec.count();

    // MLS: a two-member group, alice encrypts and sends one at a time (in order, as the
    // outbox does), carol decrypts in queue order.
    let carol = common::account(&endpoint, &server, "carol").await?;
    let (carol_key, carol_client) = (carol.identity, Arc::new(carol.client));
    let vaults = tempfile::tempdir_in(root)?;
    let kdf = KdfParams { memory_kib: 8, iterations: 1, parallelism: 1 };
    let vault = |name: &str| -> anyhow::Result<Arc<Vault>> {
        Ok(Arc::new(Vault::create(&vaults.path().join(name), b"bench", kdf)?))
    };
    let a = Arc::new(Mls::new(vault("alice.qpq")?, Identity::generate()));
    let b = Arc::new(Mls::new(vault("carol.qpq")?, Identity::generate()));
    let group = a.create(Kind::Group)?;
    let out = a.add(&group, &[b.key_package()?], &[b.identity_key()])?;
    a.confirm(&group)?;
    let welcome = out.welcome.ok_or_else(|| anyhow::anyhow!("no Welcome"))?;
    common::ensure(matches!(b.process(&welcome)?, Incoming::Joined { .. }), "carol did not join")?;

    rec.set_phase(3);
    let decrypt_times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let recv_task = {
        let (receiver, rec, b, times, failures) =
            (carol_client.clone(), rec.clone(), b.clone(), decrypt_times.clone(), failures.clone());
        tokio::spawn(async move {
            // Pushes travel on separate streams and may overtake each other; MLS wants
            // them in order, so process by queue seq (carol's queue starts at 1).
            let mut next = 1u64;
            let mut held = std::collections::BTreeMap::new();
            while let Some(push) = receiver.next_push(Duration::from_secs(3600)).await {
                let Ok(m) = v1::NewMessage::decode(push.payload.as_slice()) else { continue };
                let Some(env) = m.envelope else { continue };
                held.insert(env.seq, env.data);
                while let Some(data) = held.remove(&next) {
                    next += 1;
                    let t = Instant::now();
                    let r = tokio::task::block_in_place(|| b.process(&data));
                    let done = Instant::now();
                    match r {
                        Ok(Incoming::Application { plaintext, .. }) => {
                            rec.record(&plaintext, done);
                            times.lock().unwrap_or_else(|p| p.into_inner()).push(done - t);
                        }
                        _ => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    };
    let mut encrypt_times = Vec::with_capacity(n as usize);
    let t0 = Instant::now();
    for i in 0..serial_n {
        common::sleep_until(t0 + gap * i as u32).await;
        let plaintext = rec.payload(PLAINTEXT);
        let t = Instant::now();
        let (ct, _) = tokio::task::block_in_place(|| a.encrypt(&group, &plaintext))?;
        encrypt_times.push(t.elapsed());
        sender.enqueue(&carol_key, &ct, qpq_tests::message_id()).await?;
    }
    let mls_sent_in = t0.elapsed();
    wait_for(&rec, serial_n).await;
    recv_task.abort();
    let mls = Summary::of(&mut rec.latencies());
    let enc = Summary::of(&mut encrypt_times);
    let dec = Summary::of(&mut decrypt_times.lock().unwrap_or_else(|p| p.into_inner()));

    let mut t = Table::new(format!(
        "latency: 1:1 Enqueue at {RATE}/s for {:.1} s, send -> receiver has it (push); {storage}",
        secs.as_secs_f64()
    ));
    t.info("baseline: write 256 B + fdatasync, one at a time", pcts(&flush));
    t.goal(
        "without MLS (256 B opaque), open loop",
        pcts(&plain),
        "p99 <= 1 ms",
        plain.p99 <= Duration::from_millis(1) && plain_received == n,
    );
    t.info(
        "  sent in / received",
        format!("{:.2} s / {plain_received} of {n}", sent_in.as_secs_f64()),
    );
    t.info("without MLS, one at a time (<= 1000/s)", pcts(&serial));
    t.info(
        "  sent in (rate) / received",
        format!(
            "{:.2} s ({:.0}/s) / {serial_received} of {serial_n}",
            serial_in.as_secs_f64(),
            serial_n as f64 / serial_in.as_secs_f64()
        ),
    );
    t.goal(
        "with MLS encrypt + decrypt, one at a time",
        pcts(&mls),
        "p99 <= 2 ms",
        mls.p99 <= Duration::from_millis(2) && rec.count() == serial_n,
    );
    t.info(
        "  sent in (rate) / received / undecryptable",
        format!(
            "{:.2} s ({:.0}/s) / {} of {serial_n} / {}",
            mls_sent_in.as_secs_f64(),
            serial_n as f64 / mls_sent_in.as_secs_f64(),
            rec.count(),
            failures.load(std::sync::atomic::Ordering::Relaxed)
        ),
    );
    t.info("  of which: MLS encrypt (sender)", pcts(&enc));
    t.info("  of which: MLS decrypt (receiver)", pcts(&dec));
    t.note(
        "durable enqueue (default server); open loop: a send does not wait for the previous \
         one; one at a time: it does, so the rate falls below 1000/s when a send takes longer \
         than 1 ms; MLS vaults are redb files beside the database, one commit per \
         encrypt/decrypt; baseline: the flush every stored hop waits for, measured alone",
    );
    t.note(format!("{}; data under {}", opts.server.display(), root.display()));
    t.print();
    Ok(())
}

/// Latency of a 256-byte append plus `fdatasync` in `dir`, `n` times at `RATE` per second:
/// the floor under every hop that stores before it answers.
async fn flush_latency(dir: &Path, n: u64) -> anyhow::Result<Summary> {
    let path = dir.join("flush-probe");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let gap = Duration::from_secs_f64(1.0 / RATE as f64);
    let mut times = Vec::with_capacity(n as usize);
    let t0 = Instant::now();
    for i in 0..n {
        common::sleep_until(t0 + gap * i as u32).await;
        let t = Instant::now();
        tokio::task::block_in_place(|| {
            file.write_all(&[0x5a; 256])?;
            file.sync_data()
        })?;
        times.push(t.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Summary::of(&mut times))
}

async fn wait_for(rec: &Recorder, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while rec.count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
