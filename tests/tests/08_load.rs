//! The server under load it must refuse: a spent memory budget, a handshake flood, a client
//! that never reads its pushes. Each test checks the bound holds (memory, time), that the
//! refusal is the documented one (status and retry hint, or close code), and that clients
//! already connected keep being served.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qpq_proto::frame::{self, REQUEST_HEADER_LEN};
use qpq_proto::{MAX_PAYLOAD, Status, method, v1};
use qpq_tests::{CallError, Client, ServerProcess, identity, message_id, read_response};

const MIB: u64 = 1 << 20;

/// A server on a fresh temporary data directory (declared first: killed before the directory
/// is removed).
struct Server {
    process: ServerProcess,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let process = ServerProcess::start(dir.path(), extra).unwrap();
        Self { process, _dir: dir }
    }

    async fn client(&self) -> Client {
        within(Duration::from_secs(20), "connect", self.process.client()).await.unwrap()
    }

    /// A registered, logged-in client; returns it with its identity key and session token.
    async fn user(&self, name: &str) -> (Client, [u8; 32], Vec<u8>) {
        let c = self.client().await;
        let key = identity();
        let pw = format!("pw {name}");
        within(STEP, "register", c.register(name, &pw, &key, "")).await.unwrap();
        let token = within(STEP, "login", c.login(name, &pw, &key)).await.unwrap();
        (c, key, token)
    }

    fn assert_alive(&mut self) {
        assert!(self.process.is_running(), "server died:\n{}", self.process.stderr.lock().unwrap());
    }
}

const STEP: Duration = Duration::from_secs(15);

async fn within<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in {limit:?}"))
}

/// One small message from `from` to `to` and back out of `to`'s queue.
async fn round_trip(from: &Client, to: &Client, to_key: &[u8; 32], what: &str) {
    let payload = format!("small message {what}").into_bytes();
    let id = message_id();
    let sent = within(STEP, what, from.enqueue(to_key, &payload, id))
        .await
        .unwrap_or_else(|e| panic!("enqueue {what}: {e}"));
    let got = within(STEP, what, to.fetch(0)).await.unwrap_or_else(|e| panic!("fetch {what}: {e}"));
    assert!(got.iter().any(|e| e.message_id == id && e.data == payload), "{what}: message lost");
    within(STEP, what, to.ack(sent.seq)).await.unwrap_or_else(|e| panic!("ack {what}: {e}"));
}

/// Sends a request header announcing `len` bytes and `sent` bytes of it, then stalls (the
/// stream stays open); returns the response status and error when the server answers.
async fn stalled_upload(c: &Client, len: u32, sent: usize) -> (Status, v1::Error) {
    let (mut send, mut recv) = c.conn.open_bi().await.unwrap();
    let mut header = frame::encode_request(method::UPLOAD_BLOB, 7, &[]).unwrap();
    header[REQUEST_HEADER_LEN - 4..].copy_from_slice(&len.to_be_bytes());
    let writer = async move {
        let _ = send.write_all(&header).await;
        let _ = send.write_all(&vec![0x55u8; sent]).await;
        // Keep the stream open (unfinished) until the response arrives.
        std::future::pending::<()>().await;
    };
    let reader = async {
        let (h, body) = read_response(&mut recv).await.unwrap();
        (h.status, <v1::Error as qpq_proto::Message>::decode(body.as_slice()).unwrap())
    };
    tokio::select! {
        () = writer => unreachable!(),
        r = reader => r,
    }
}

/// Past its memory budget the server turns new connections away with Unavailable and uploads
/// with RateLimited, both with a retry hint, while connected clients keep messaging; when the
/// load goes, it takes new connections again. The load: 12 connections each with two 4 MiB
/// uploads stalled before their last bytes (about 96 MiB, against a 48 MiB budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_memory_budget_turns_new_work_away_and_connected_clients_keep_working() {
    const BUDGET: u64 = 48 * MIB;
    let budget = format!("limits.memory_budget_bytes={BUDGET}");
    let mut s = Server::start(&["--set", &budget, "--set", "limits.request_timeout_secs=10"]);
    let (alice, _, _) = s.user("alice").await;
    let (bob, bob_key, bob_token) = s.user("bob").await;
    round_trip(&alice, &bob, &bob_key, "before the load").await;
    let rss_before = s.process.rss_kib().unwrap();

    let mut attackers = Vec::new();
    for _ in 0..12 {
        attackers.push(Arc::new(s.client().await));
    }
    let started = Instant::now();
    let mut uploads = tokio::task::JoinSet::new();
    for a in &attackers {
        for _ in 0..2 {
            let a = a.clone();
            uploads.spawn(async move {
                stalled_upload(&a, MAX_PAYLOAD, MAX_PAYLOAD as usize - 1000).await
            });
        }
    }
    // The uploads the budget takes stall until the 10 s request timeout, so the first answer is
    // a refusal: from then on the budget is spent (a refusal at 90 % leaves at least 88 % in
    // use, past the 85 % for new connections) until the stalled ones time out.
    let (status, e) =
        within(STEP, "first upload answer", uploads.join_next()).await.unwrap().unwrap();
    assert_eq!(status, Status::RateLimited, "first answer to the uploads: {e:?}");
    assert!(e.retry_after_ms >= 1000, "retry hint: {e:?}");
    let rss_loaded = s.process.rss_kib().unwrap();

    // A new connection is told to come back later.
    let newcomer = s.client().await;
    match within(STEP, "resume while busy", newcomer.resume(&bob_token)).await {
        Err(CallError::Status(Status::Unavailable, e)) => {
            assert!(e.retry_after_ms >= 1000, "retry hint: {e:?}")
        }
        other => panic!("a new connection past the budget got {other:?}"),
    }
    let closed = within(STEP, "busy close", newcomer.conn.closed()).await;
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(3)),
        "the busy connection is closed with code 3: {closed:?}"
    );
    // The clients already connected keep messaging.
    for i in 0..3 {
        round_trip(&alice, &bob, &bob_key, &format!("under load {i}")).await;
    }
    assert!(started.elapsed() < Duration::from_secs(10), "checks ran while the uploads stalled");

    let mut refused = 1;
    let mut timed_out = 0;
    while let Some(r) = uploads.join_next().await {
        let (status, e) = r.unwrap();
        match status {
            Status::RateLimited => {
                assert!(e.retry_after_ms >= 1000, "retry hint: {e:?}");
                refused += 1;
            }
            Status::DeadlineExceeded => timed_out += 1,
            other => panic!("upload answered {other}: {e:?}"),
        }
    }
    assert!(refused > 0, "no upload was refused: the budget did not hold");
    assert!(timed_out > 0, "every upload was refused: the budget admitted nothing");
    // Accounted bytes are live bytes; the resident size follows them (allocator slack aside).
    let grown = rss_loaded.saturating_sub(rss_before) * 1024;
    assert!(
        grown < BUDGET,
        "resident size grew {} MiB under a {} MiB budget",
        grown >> 20,
        BUDGET >> 20
    );
    println!(
        "uploads refused {refused}, timed out {timed_out}; RSS {} -> {} KiB",
        rss_before, rss_loaded
    );

    for a in &attackers {
        a.conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    drop(attackers);
    // The budget is given back: a new connection is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = s.client().await;
        match within(STEP, "resume after the load", c.resume(&bob_token)).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                println!("still busy after the load: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the budget was not given back: {e}"),
        }
    }
    round_trip(&alice, &bob, &bob_key, "after the load").await;
    s.assert_alive();
}

/// A client that never accepts its push streams is disconnected (close code 4) once a push
/// has waited 10 s for it, holding little server memory meanwhile; its messages wait on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_pushes_is_disconnected_and_loses_nothing() {
    const MESSAGES: usize = 150;
    let mut s = Server::start(&[]);
    let (sender, _, _) = s.user("sender").await;
    let deaf =
        Client::connect_ignoring_pushes(s.process.addr, &s.process.fingerprint).await.unwrap();
    let deaf_key = identity();
    within(STEP, "register", deaf.register("deaf", "pw deaf", &deaf_key, "")).await.unwrap();
    let token = within(STEP, "login", deaf.login("deaf", "pw deaf", &deaf_key)).await.unwrap();
    let rss_before = s.process.rss_kib().unwrap();

    let started = Instant::now();
    let payload = vec![0xA5u8; 32 * 1024];
    for i in 0..MESSAGES {
        within(STEP, "enqueue", sender.enqueue(&deaf_key, &payload, message_id()))
            .await
            .unwrap_or_else(|e| panic!("enqueue {i}: {e}"));
    }
    let rss_pushing = s.process.rss_kib().unwrap();
    let closed = within(Duration::from_secs(30), "slow consumer close", deaf.conn.closed()).await;
    let took = started.elapsed();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(4)),
        "closed with code 4: {closed:?}"
    );
    assert!(took < Duration::from_secs(25), "disconnected after {took:?}");
    let grown = rss_pushing.saturating_sub(rss_before);
    assert!(grown < 16 * 1024, "{grown} KiB held for a client that does not read");

    // Nothing was lost: a well-behaved reconnect gets every message.
    let back = s.client().await;
    within(STEP, "resume", back.resume(&token)).await.unwrap();
    let mut got = 0;
    while got < MESSAGES {
        let batch = within(STEP, "fetch", back.fetch(0)).await.unwrap();
        assert!(!batch.is_empty(), "only {got} of {MESSAGES} messages on disk");
        assert!(batch.iter().all(|e| e.data == payload));
        got += batch.len();
        within(STEP, "ack", back.ack(batch.last().unwrap().seq)).await.unwrap();
    }
    assert_eq!(got, MESSAGES);
    s.assert_alive();
}

/// Forwards datagrams from clients to `server` and drops everything the server sends back but
/// QUIC Retry packets: every handshake through it can prove its address and then never
/// finishes. Listens on `listen`.
async fn black_hole(listen: SocketAddr, server: SocketAddr) -> SocketAddr {
    let front = Arc::new(tokio::net::UdpSocket::bind(listen).await.unwrap());
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        // One upstream socket per client address, so each client is a distinct peer.
        let mut upstream: std::collections::HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> =
            Default::default();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            let up = match upstream.get(&from) {
                Some(up) => up.clone(),
                None => {
                    let up = Arc::new(
                        tokio::net::UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).await.unwrap(),
                    );
                    let (up2, front2) = (up.clone(), front.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = up2.recv(&mut buf).await {
                            // Long header, type Retry (0b11): 0xF0 in the first byte.
                            if n > 0 && buf[0] & 0xF0 == 0xF0 {
                                let _ = front2.send_to(&buf[..n], from).await;
                            }
                        }
                    });
                    up.connect(server).await.unwrap();
                    upstream.insert(from, up.clone());
                    up
                }
            };
            let _ = up.send(&buf[..n]).await;
        }
    });
    addr
}

/// A flood of handshakes that never complete, from many addresses, is bounded: past a quarter
/// of `max_handshakes` in progress the server asks new addresses to prove themselves with a
/// Retry, past all of it refuses them until the half-open ones time out; memory stays
/// bounded, connected clients are served throughout, and a new client gets in after the
/// handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_is_bounded_and_real_clients_connect() {
    const SOURCES: u8 = 40;
    const PER_SOURCE: usize = 10;
    let mut s = Server::start(&[
        "--set",
        "limits.max_handshakes=16",
        "--log",
        "qpq_server_lite=debug,info",
    ]);
    let (alice, _, _) = s.user("alice").await;
    let (bob, bob_key, _) = s.user("bob").await;
    let rss_before = s.process.rss_kib().unwrap();

    // 400 half-open handshakes from 40 loopback addresses (127.0.0.2 ..).
    let mut flooders = Vec::new();
    for i in 0..SOURCES {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + i);
        let hole = black_hole(SocketAddr::from((ip, 0)), s.process.addr).await;
        for _ in 0..PER_SOURCE {
            let crypto = qpq_core::client::net::pinned_crypto(&s.process.fingerprint).unwrap();
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            let connecting = ep.connect(hole, "localhost").unwrap();
            flooders.push((ep, tokio::spawn(connecting)));
        }
    }
    let flood_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_flood = s.process.rss_kib().unwrap();
    // Connected clients are served throughout.
    round_trip(&alice, &bob, &bob_key, "during the flood").await;
    // A new client is refused while the half-open handshakes hold every place, and gets in
    // once they time out (10 s), as a client retrying with backoff would.
    let mut refused = 0;
    let carol = loop {
        match s.process.client().await {
            Ok(c) => break c,
            Err(e) => {
                refused += 1;
                assert!(flood_started.elapsed() < Duration::from_secs(20), "still refused: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let key = identity();
    within(STEP, "register", carol.register("carol", "pw carol", &key, "")).await.unwrap();
    within(STEP, "login", carol.login("carol", "pw carol", &key)).await.unwrap();
    println!("new client refused {refused} times, in after {:?}", flood_started.elapsed());
    let log = s.process.stderr.lock().unwrap().clone();
    assert!(log.contains("address validation required"), "no Retry was asked for");
    assert!(log.contains("too many handshakes in progress"), "the handshake cap never applied");
    let grown = rss_flood.saturating_sub(rss_before);
    assert!(grown < 16 * 1024, "{grown} KiB for {} half-open handshakes", flooders.len());
    for (ep, task) in flooders {
        task.abort();
        ep.close(quinn::VarInt::from_u32(0), b"");
    }
    round_trip(&alice, &bob, &bob_key, "after the flood").await;
    s.assert_alive();
}
