//! `start`: time from spawning the server to accepting connections, with a ~100 MB database
//! built through the real server (messages enqueued and left queued) and a clean stop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qpq_tests::Client;

use super::common::{self, Opts, Summary, Table, dur};

/// Bytes per message used to fill the database.
const FILL_PAYLOAD: usize = 4000;

/// Runs the benchmark and prints its table.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let target: u64 = if opts.quick { 2 << 20 } else { 100 << 20 };
    let runs = if opts.quick { 3 } else { 9 };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let queue_limits =
        common::limits(&[("max_queue_messages", "100000000"), ("max_queue_bytes", "100000000000")]);

    // Fill.
    let fill_t = Instant::now();
    let (fingerprint, messages) = {
        let mut args: Vec<&str> = queue_limits.iter().map(String::as_str).collect();
        args.extend(["--listen", &listen]);
        let mut server = common::start_server(opts, &data, &args)?;
        let endpoint = Client::endpoint(&server.fingerprint)?;
        let acct = common::account(&endpoint, &server, "filler").await?;
        let (client, me) = (Arc::new(acct.client), acct.identity);
        let db = data.join("qpq.redb");
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (client, count, db) = (client.clone(), count.clone(), db.clone());
            tasks.push(tokio::spawn(async move {
                let mut payload = vec![0u8; FILL_PAYLOAD];
                loop {
                    if std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) >= target {
                        return anyhow::Ok(());
                    }
                    for _ in 0..20 {
                        rand::Rng::fill(&mut rand::thread_rng(), &mut payload[..]);
                        client.enqueue(&me, &payload, qpq_tests::message_id()).await?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let status = server.terminate(Duration::from_secs(30))?;
        common::ensure(status.success(), "server did not stop cleanly after the fill")?;
        (server.fingerprint.clone(), count.load(Ordering::Relaxed))
    };
    let fill_time = fill_t.elapsed();
    let db_size = std::fs::metadata(data.join("qpq.redb"))?.len();

    // Measure.
    let addr: SocketAddr = listen.parse()?;
    let endpoint = Client::endpoint(&fingerprint)?;
    let mut listening = Vec::new();
    let mut ready = Vec::new();
    for _ in 0..runs {
        let (l, r) = one_start(opts, &data, &listen, &queue_limits, addr, &endpoint).await?;
        listening.push(l);
        ready.push(r);
    }
    let l = Summary::of(&mut listening);
    let r = Summary::of(&mut ready);
    let (lmin, rmin) = (listening[0], ready[0]);

    let mut t =
        Table::new("start: spawn to accepting connections, database filled through the server");
    t.info(
        "database",
        format!(
            "{:.1} MB redb file, {messages} queued messages of {FILL_PAYLOAD} B (filled in {:.1} s), clean stop",
            db_size as f64 / 1e6,
            fill_time.as_secs_f64()
        ),
    );
    t.goal(
        format!("spawn -> first Health answered, median of {runs}"),
        format!("{} (min {}, max {})", dur(r.p50), dur(rmin), dur(r.max)),
        "<= 100 ms",
        r.p50 <= Duration::from_millis(100),
    );
    t.info(
        format!("spawn -> 'listening on' on stdout, median of {runs}"),
        format!("{} (min {}, max {})", dur(l.p50), dur(lmin), dur(l.max)),
    );
    t.note(
        "Health time includes a QUIC + TLS handshake from a fresh connection; attempts start \
         every 2 ms from spawn (an attempt that hits an unbound port is abandoned)",
    );
    t.print();
    Ok(())
}

/// One start: returns (spawn -> listening line, spawn -> first Health answered).
async fn one_start(
    opts: &Opts,
    data: &std::path::Path,
    listen: &str,
    extra: &[String],
    addr: SocketAddr,
    endpoint: &quinn::Endpoint,
) -> anyhow::Result<(Duration, Duration)> {
    let mut cmd = Command::new(&opts.server);
    cmd.arg("--data-dir").arg(data).args(["--listen", listen, "--log", "warn"]).args(extra);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("spawning the server")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("listening on") {
                let _ = tx.send(Instant::now());
            }
        }
    });
    let mut attempts = tokio::task::JoinSet::new();
    let deadline = t0 + Duration::from_secs(30);
    let ready = loop {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("server did not answer Health within 30 s");
        }
        let endpoint = endpoint.clone();
        attempts.spawn(async move {
            let c = tokio::time::timeout(
                Duration::from_millis(500),
                Client::connect_on(&endpoint, addr),
            )
            .await??;
            common::health(&c).await?;
            let at = Instant::now();
            c.conn.close(0u32.into(), b"");
            anyhow::Ok(at)
        });
        let tick = tokio::time::sleep(Duration::from_millis(2));
        tokio::pin!(tick);
        let mut done = None;
        loop {
            tokio::select! {
                Some(r) = attempts.join_next() => {
                    if let Ok(Ok(at)) = r {
                        done = Some(at);
                        break;
                    }
                }
                () = &mut tick => break,
            }
        }
        if let Some(at) = done {
            break at;
        }
    };
    attempts.abort_all();
    let listening = rx.recv_timeout(Duration::from_secs(5)).context("no 'listening on' line")?;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let status = child.wait()?;
    common::ensure(status.success(), "server did not stop cleanly")?;
    Ok((listening - t0, ready - t0))
}
