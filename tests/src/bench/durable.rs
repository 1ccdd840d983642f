//! `durable`: enqueue throughput with group commit (many concurrent enqueues from several
//! connections), disk bytes per stored message from `/proc/<pid>/io`, and the disk writes of
//! an idle server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qpq_tests::Client;

use super::common::{self, Io, Opts, Table};

/// Connections of the sending account, and enqueues in flight on each.
const CONNECTIONS: usize = 8;
const PER_CONNECTION: usize = 16;
/// Bytes per message.
const PAYLOAD: usize = 256;
/// Recipients the messages rotate over.
const RECIPIENTS: usize = 8;

/// Runs the benchmark and prints its table.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let secs = Duration::from_secs(if opts.quick { 1 } else { 10 });
    let idle = Duration::from_secs(if opts.quick { 1 } else { 10 });
    let dir = tempfile::tempdir()?;
    let mut pairs = vec![("max_queue_messages", "100000000"), ("max_queue_bytes", "100000000000")];
    pairs.extend_from_slice(common::NO_AUTH_LIMITS);
    let args = common::limits(&pairs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::start_server(opts, dir.path(), &args)?;
    let pid = server.pid();
    let endpoint = Client::endpoint(&server.fingerprint)?;
    let sender = common::account(&endpoint, &server, "sender").await?;
    let recipients = common::accounts(&endpoint, &server, "rcpt", RECIPIENTS).await?;
    let keys: Arc<Vec<[u8; 32]>> = Arc::new(recipients.iter().map(|a| a.identity).collect());
    let mut conns = vec![Arc::new(sender.client)];
    for _ in 1..CONNECTIONS {
        let c = Client::connect_on(&endpoint, server.addr).await?;
        c.resume(&sender.token).await?;
        conns.push(Arc::new(c));
    }

    // One enqueue at a time (every message its own commit), then the full load.
    let single = load(&conns[..1], 1, &keys, secs / 2, pid).await?;
    let grouped = load(&conns, PER_CONNECTION, &keys, secs, pid).await?;

    // Idle, connections open with keep-alives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = common::io(pid)?;
    tokio::time::sleep(idle).await;
    let after = common::io(pid)?;

    let mut t =
        Table::new(format!("durable: Enqueue ({PAYLOAD} B) with group commit, default durability"));
    for (name, r) in [
        ("1 enqueue in flight", &single),
        (
            &*format!(
                "{} in flight ({CONNECTIONS} conns x {PER_CONNECTION})",
                CONNECTIONS * PER_CONNECTION
            ),
            &grouped,
        ),
    ] {
        t.info(
            format!("{name}: messages/s"),
            format!("{:.0} ({} in {:.1} s)", r.rate(), r.messages, r.elapsed.as_secs_f64()),
        );
        t.info(
            format!("{name}: disk per message"),
            format!(
                "write_bytes {:.0} B, wchar {:.0} B, rchar {:.0} B, write syscalls {:.2}",
                r.per(r.io.write_bytes),
                r.per(r.io.wchar),
                r.per(r.io.rchar),
                r.per(r.io.syscw)
            ),
        );
    }
    let idle_bytes = after.write_bytes - before.write_bytes;
    t.goal(
        format!("idle {} s: write_bytes delta", idle.as_secs()),
        format!("{idle_bytes} B (wchar {} B)", after.wchar - before.wchar),
        "0 B",
        idle_bytes == 0,
    );
    t.note(format!(
        "messages rotate over {RECIPIENTS} recipients; write_bytes is what the kernel sent to \
         the block layer for the server process (/proc/{pid}/io); queue quota raised"
    ));
    t.print();
    for c in &conns {
        c.conn.close(0u32.into(), b"done");
    }
    Ok(())
}

struct Load {
    messages: u64,
    elapsed: Duration,
    io: Io,
}

impl Load {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    fn per(&self, v: u64) -> f64 {
        v as f64 / self.messages.max(1) as f64
    }
}

async fn load(
    conns: &[Arc<Client>],
    per_conn: usize,
    keys: &Arc<Vec<[u8; 32]>>,
    secs: Duration,
    pid: u32,
) -> anyhow::Result<Load> {
    let count = Arc::new(AtomicU64::new(0));
    let before = common::io(pid)?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (ci, c) in conns.iter().enumerate() {
        for w in 0..per_conn {
            let (c, count, keys) = (c.clone(), count.clone(), keys.clone());
            let payload = vec![0x5a; PAYLOAD];
            tasks.push(tokio::spawn(async move {
                let mut i = ci * per_conn + w;
                while t0.elapsed() < secs {
                    c.enqueue(&keys[i % keys.len()], &payload, qpq_tests::message_id()).await?;
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = t0.elapsed();
    let after = common::io(pid)?;
    Ok(Load {
        messages: count.load(Ordering::Relaxed),
        elapsed,
        io: Io {
            rchar: after.rchar - before.rchar,
            wchar: after.wchar - before.wchar,
            syscw: after.syscw - before.syscw,
            write_bytes: after.write_bytes - before.write_bytes,
        },
    })
}
