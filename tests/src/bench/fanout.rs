//! `fanout`: one sender, one message to a 100-member group's queues (BatchEnqueue), every
//! recipient connected and receiving by push; the same shape against mosquitto (QoS 1).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qpq_proto::{method, v1};
use qpq_tests::Client;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, Semaphore};

use super::common::{self, Opts, Summary, Table, dur, pcts};
use super::mqtt;
use super::probe::{self, Recorder};

/// Bytes per message: about an MLS application message carrying a short padded text.
const PAYLOAD: usize = 256;
/// Concurrent sends at saturation: the server's default streams per connection. The
/// environment variable `QPQ_BENCH_WINDOW` changes it (and raises the server's stream limit
/// to match), to see how group commit scales with more writes in flight.
const WINDOW: usize = 16;

fn window() -> usize {
    std::env::var("QPQ_BENCH_WINDOW").ok().and_then(|v| v.parse().ok()).unwrap_or(WINDOW)
}

/// One system's figures.
struct Figures {
    /// Deliveries per second at saturation (pushes received by recipients).
    saturated: f64,
    /// Messages the sender got acknowledged per second at saturation, times recipients.
    stored: f64,
    /// Server CPU time per delivery at saturation, and the share of one core it used.
    cpu_per_delivery: Duration,
    cpu_cores: f64,
    /// Latency at the steady rate.
    latency: Summary,
    /// Deliveries expected and received at the steady rate.
    expected: u64,
    received: u64,
}

/// Runs the benchmark and prints its table.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let members = if opts.quick { 10 } else { 100 };
    let sat = Duration::from_secs(if opts.quick { 1 } else { 5 });
    let steady = Duration::from_secs(if opts.quick { 1 } else { 10 });
    let rate = if opts.quick { 50 } else { 100 }; // messages (batches) per second
    let ours = qpq(opts, members, sat, steady, rate).await?;
    let theirs = match mqtt::find() {
        Some(bin) => Some(mosquitto(&bin, members, sat, steady, rate).await?),
        None => None,
    };
    let mut t = Table::new(format!(
        "fanout: 1 sender -> {members} recipients, {PAYLOAD} B payload, durable enqueue, push"
    ));
    t.goal(
        "qpq deliveries/s at saturation",
        format!("{:.0} ({:.0} stored/s)", ours.saturated, ours.stored),
        ">= 50000",
        ours.saturated >= 50_000.0,
    );
    t.goal(
        format!("qpq latency at {} deliveries/s", rate as usize * members),
        pcts(&ours.latency),
        "p99 < 10 ms",
        ours.latency.p99 < Duration::from_millis(10) && ours.received == ours.expected,
    );
    t.info("qpq deliveries received / expected", format!("{} / {}", ours.received, ours.expected));
    t.info(
        "qpq server CPU at saturation",
        format!("{:.2} cores, {} per delivery", ours.cpu_cores, dur(ours.cpu_per_delivery)),
    );
    match &theirs {
        Some((m, version)) => {
            t.info(
                "mosquitto deliveries/s at saturation",
                format!("{:.0} ({:.0} acked/s)", m.saturated, m.stored),
            );
            t.info(
                format!("mosquitto latency at {} deliveries/s", rate as usize * members),
                pcts(&m.latency),
            );
            t.info(
                "mosquitto deliveries received / expected",
                format!("{} / {}", m.received, m.expected),
            );
            t.info(
                "mosquitto CPU at saturation",
                format!("{:.2} cores, {} per delivery", m.cpu_cores, dur(m.cpu_per_delivery)),
            );
            t.info(
                "ratio qpq / mosquitto, deliveries/s",
                format!("{:.2}", ours.saturated / m.saturated),
            );
            t.info(
                "ratio qpq / mosquitto, p99 latency",
                format!("{:.2}", ours.latency.p99.as_secs_f64() / m.latency.p99.as_secs_f64()),
            );
            t.note(
                format!(
                    "{version}: TLS 1.3, QoS 1, clean_session=0, persistence true (snapshots, no per-message fsync)"
                ),
            );
        }
        None => t.note("mosquitto not installed: baseline and ratio skipped"),
    }
    t.note(format!(
        "saturation: {} sends in flight for {} s; steady: {rate} messages/s for {} s; \
         qpq limits raised: queue quota, connections per IP, auth rates; recipients never Ack",
        window(),
        sat.as_secs(),
        steady.as_secs()
    ));
    t.print();
    Ok(())
}

async fn qpq(
    opts: &Opts,
    members: usize,
    sat: Duration,
    steady: Duration,
    rate: u32,
) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let conns = (members + 16).to_string();
    let streams = window().max(16).to_string();
    let mut pairs = vec![
        ("max_connections_per_ip", conns.as_str()),
        ("max_streams_per_connection", streams.as_str()),
        ("max_queue_messages", "100000000"),
        ("max_queue_bytes", "100000000000"),
    ];
    pairs.extend_from_slice(common::NO_AUTH_LIMITS);
    let args = common::limits(&pairs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::start_server(opts, dir.path(), &args)?;
    let endpoint = Client::endpoint(&server.fingerprint)?;
    let sender = Arc::new(common::account(&endpoint, &server, "sender").await?.client);
    let recipients = common::accounts(&endpoint, &server, "member", members).await?;
    let keys: Vec<Vec<u8>> = recipients.iter().map(|a| a.identity.to_vec()).collect();
    let rec = Arc::new(Recorder::new());
    let receivers: Vec<_> = recipients
        .into_iter()
        .map(|a| probe::spawn_receiver(Arc::new(a.client), rec.clone()))
        .collect();
    let send = {
        let (sender, keys, rec) = (sender.clone(), keys.clone(), rec.clone());
        move || {
            let (sender, keys, rec) = (sender.clone(), keys.clone(), rec.clone());
            async move {
                let req = v1::BatchEnqueueRequest {
                    recipient_keys: keys,
                    payload: rec.payload(PAYLOAD),
                    ..Default::default()
                };
                let r: v1::BatchEnqueueResponse = sender.call(method::BATCH_ENQUEUE, &req).await?;
                anyhow::Ok(r.seqs.iter().filter(|s| **s != 0).count() as u64)
            }
        }
    };
    // Warm up and check that pushes arrive.
    rec.set_phase(1);
    send().await?;
    settle(&rec, members as u64, Duration::from_secs(5)).await;
    common::ensure(rec.count() == members as u64, "fanout: warm-up pushes did not all arrive")?;

    // Saturation: WINDOW sends in flight, back to back.
    rec.set_phase(2);
    let stored = Arc::new(AtomicU64::new(0));
    let cpu0 = common::cpu_time(server.pid())?;
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..window() {
        let (send, stored) = (send.clone(), stored.clone());
        workers.push(tokio::spawn(async move {
            while t0.elapsed() < sat {
                stored.fetch_add(send().await?, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let elapsed = t0.elapsed();
    let stored = stored.load(Ordering::Relaxed);
    settle(&rec, stored, Duration::from_secs(2)).await;
    let cpu = common::cpu_time(server.pid())? - cpu0;
    let saturated = rec.count() as f64 / elapsed.as_secs_f64();

    // Steady rate, open loop.
    rec.set_phase(3);
    let (expected, latency) = steady_rate(rate, steady, members, &rec, move || {
        let send = send.clone();
        async move {
            send().await?;
            anyhow::Ok(())
        }
    })
    .await?;
    for r in receivers {
        r.abort();
    }
    Ok(Figures {
        saturated,
        cpu_per_delivery: cpu / rec_count_at(saturated, elapsed),
        cpu_cores: cpu.as_secs_f64() / elapsed.as_secs_f64(),
        stored: stored as f64 / elapsed.as_secs_f64(),
        latency,
        expected,
        received: rec.count(),
    })
}

async fn mosquitto(
    bin: &std::path::Path,
    members: usize,
    sat: Duration,
    steady: Duration,
    rate: u32,
) -> anyhow::Result<(Figures, String)> {
    let broker = mqtt::Broker::start(bin)?;
    let version = broker.version.clone();
    let rec = Arc::new(Recorder::new());
    let mut receivers = Vec::new();
    for i in 0..members {
        let mut s = mqtt::connect(broker.addr, &broker.cert, &format!("qpq-bench-sub-{i}")).await?;
        mqtt::subscribe(&mut s).await?;
        let rec = rec.clone();
        receivers.push(tokio::spawn(async move {
            while let Ok((kind, body)) = mqtt::read_packet(&mut s).await {
                let at = Instant::now();
                if let Some((id, payload)) = mqtt::parse_publish(kind, &body) {
                    rec.record(payload, at);
                    if let Some(id) = id {
                        if s.write_all(&mqtt::puback(id)).await.is_err() {
                            break;
                        }
                        let _ = s.flush().await;
                    }
                }
            }
        }));
    }
    let publisher = mqtt::connect(broker.addr, &broker.cert, "qpq-bench-pub").await?;
    let (mut rd, wr) = tokio::io::split(publisher);
    let wr = Arc::new(Mutex::new(wr));
    let window = Arc::new(Semaphore::new(self::window()));
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let (window, acked) = (window.clone(), acked.clone());
        tokio::spawn(async move {
            while let Ok((kind, _)) = mqtt::read_packet(&mut rd).await {
                if kind >> 4 == 4 {
                    acked.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
            }
        })
    };
    let next_id = Arc::new(AtomicU64::new(0));
    let publish = {
        let (wr, rec, next_id) = (wr.clone(), rec.clone(), next_id.clone());
        move || {
            let (wr, rec, next_id) = (wr.clone(), rec.clone(), next_id.clone());
            async move {
                let id = (next_id.fetch_add(1, Ordering::Relaxed) % 65535 + 1) as u16;
                let packet = mqtt::publish_packet(id, &rec.payload(PAYLOAD));
                let mut w = wr.lock().await;
                w.write_all(&packet).await?;
                w.flush().await?;
                anyhow::Ok(())
            }
        }
    };
    rec.set_phase(1);
    publish().await?;
    settle(&rec, members as u64, Duration::from_secs(5)).await;
    common::ensure(
        rec.count() == members as u64,
        "mosquitto: warm-up messages did not all arrive",
    )?;

    rec.set_phase(2);
    let acked0 = acked.load(Ordering::Relaxed);
    let cpu0 = common::cpu_time(broker.pid())?;
    let t0 = Instant::now();
    while t0.elapsed() < sat {
        window.acquire().await?.forget();
        publish().await?;
    }
    // Wait for the window to drain so every publish counted was acknowledged.
    let _ =
        tokio::time::timeout(Duration::from_secs(5), window.acquire_many(self::window() as u32))
            .await;
    let elapsed = t0.elapsed();
    let acked_n = acked.load(Ordering::Relaxed) - acked0;
    settle(&rec, acked_n * members as u64, Duration::from_secs(2)).await;
    let cpu = common::cpu_time(broker.pid())? - cpu0;
    let saturated = rec.count() as f64 / elapsed.as_secs_f64();
    window.add_permits(self::window());

    rec.set_phase(3);
    let (expected, latency) = steady_rate(rate, steady, members, &rec, publish).await?;
    reader.abort();
    for r in receivers {
        r.abort();
    }
    drop(broker);
    let figures = Figures {
        saturated,
        cpu_per_delivery: cpu / rec_count_at(saturated, elapsed),
        cpu_cores: cpu.as_secs_f64() / elapsed.as_secs_f64(),
        stored: acked_n as f64 * members as f64 / elapsed.as_secs_f64(),
        latency,
        expected,
        received: rec.count(),
    };
    Ok((figures, version))
}

/// Sends `rate` messages per second for `secs` without waiting for answers (open loop), then
/// waits for the deliveries; returns the number expected and the latencies.
async fn steady_rate<F, Fut>(
    rate: u32,
    secs: Duration,
    members: usize,
    rec: &Recorder,
    send: F,
) -> anyhow::Result<(u64, Summary)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let n = (rate as f64 * secs.as_secs_f64()) as u64;
    let gap = Duration::from_secs_f64(1.0 / rate as f64);
    let t0 = Instant::now();
    let mut calls = Vec::new();
    for i in 0..n {
        common::sleep_until(t0 + gap * i as u32).await;
        calls.push(tokio::spawn(send()));
    }
    for c in calls {
        c.await??;
    }
    let expected = n * members as u64;
    settle(rec, expected, Duration::from_secs(2)).await;
    Ok((expected, Summary::of(&mut rec.latencies())))
}

/// Deliveries in the saturation window, at least 1 (a divisor).
fn rec_count_at(rate: f64, elapsed: Duration) -> u32 {
    ((rate * elapsed.as_secs_f64()) as u32).max(1)
}

/// Waits until `want` deliveries were recorded, or nothing arrived for `quiet`.
async fn settle(rec: &Recorder, want: u64, quiet: Duration) {
    let mut last = (rec.count(), Instant::now());
    while rec.count() < want {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let c = rec.count();
        if c != last.0 {
            last = (c, Instant::now());
        } else if last.1.elapsed() > quiet {
            return;
        }
    }
}
