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
use qpq_tests::{
    CallError, Client, ServerProcess, TempServer, identity, message_id, read_response,
};

const MIB: u64 = 1 << 20;

/// A registered, logged-in client of `s`; returns it with its identity key and session token.
async fn user(s: &TempServer, name: &str) -> (Client, [u8; 32], Vec<u8>) {
    let c = s.client().await;
    let key = identity();
    let pw = format!("pw {name}");
    within(STEP, "register", c.register(name, &pw, &key, "")).await.unwrap();
    let token = within(STEP, "login", c.login(name, &pw, &key)).await.unwrap();
    (c, key, token)
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

/// An upload of a whole 4 MiB frame but its last 1,000 bytes, left open: the server holds what
/// arrived until its request timeout.
const STALLED: usize = MAX_PAYLOAD as usize - 1000;

/// Starts an upload on `c` announcing `MAX_PAYLOAD` bytes, sends [`STALLED`] of them and
/// stalls. Returns the server's answer if it comes within `wait` (a refusal), or `None` once
/// the bytes are out and `wait` has passed (the server took the upload), and the stream, to be
/// kept open (dropping it would finish it).
async fn stalled_upload(
    c: &Client,
    wait: Duration,
) -> (Option<(Status, v1::Error)>, (quinn::SendStream, quinn::RecvStream)) {
    stalled_upload_of(c, STALLED, wait).await
}

/// [`stalled_upload`] that sends `sent` bytes of the announced `MAX_PAYLOAD`.
async fn stalled_upload_of(
    c: &Client,
    sent: usize,
    wait: Duration,
) -> (Option<(Status, v1::Error)>, (quinn::SendStream, quinn::RecvStream)) {
    let (mut send, mut recv) = c.conn.open_bi().await.unwrap();
    let mut header = frame::encode_request(method::UPLOAD_BLOB, 7, &[]).unwrap();
    header[REQUEST_HEADER_LEN - 4..].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
    let writer = async {
        let _ = send.write_all(&header).await;
        let _ = send.write_all(&vec![0x55u8; sent]).await;
        tokio::time::sleep(wait).await;
    };
    let reader = async {
        let (h, body) = read_response(&mut recv).await.unwrap();
        (h.status, <v1::Error as qpq_proto::Message>::decode(body.as_slice()).unwrap())
    };
    let answer = tokio::select! {
        () = writer => None,
        r = reader => Some(r),
    };
    (answer, (send, recv))
}

/// The base the server accounts its budget from (its resident size at start plus the
/// database cache), as it logs it, in bytes.
fn logged_base(server: &ServerProcess) -> u64 {
    for _ in 0..100 {
        let log = strip_ansi(&server.stderr.lock().unwrap());
        if let Some(rest) = log.split("base_kib=").nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            return digits.parse::<u64>().unwrap() * 1024;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the server did not log its memory budget base");
}

/// Starts the server on `dir` with `extra` arguments and the memory budget `budget_for(base)`,
/// computed from the base the server logs (its resident size at start plus the database
/// cache). That size varies a little from start to start, so the server is started again with
/// the budget recomputed until the base it logs is within 256 KiB of the one used. Returns the
/// server, its budget and its base.
fn start_with_budget(
    dir: &std::path::Path,
    extra: &[&str],
    budget_for: impl Fn(u64) -> u64,
) -> (ServerProcess, u64, u64) {
    let mut base = logged_base(&ServerProcess::start(dir, extra).unwrap());
    for _ in 0..5 {
        let budget = budget_for(base);
        let flag = format!("limits.memory_budget_bytes={budget}");
        let mut args = extra.to_vec();
        args.extend(["--set", &flag]);
        let process = ServerProcess::start(dir, &args).unwrap();
        let logged = logged_base(&process);
        if logged.abs_diff(base) < 256 * 1024 {
            return (process, budget, logged);
        }
        base = logged;
    }
    panic!("the server's base did not settle in five starts (last {base} bytes)");
}

/// `text` without ANSI colour sequences (`ESC [ ... m`), as the log may have them.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Past its memory budget the server turns new connections away with Unavailable and uploads
/// with RateLimited, both with a retry hint, while connected clients keep messaging; when the
/// load goes, it takes new connections again. The budget is set from the server's own base so
/// that six stalled 4 MiB uploads bring it to 87.5 %: past the 85 % for new connections,
/// short of the 90 % for uploads, so the seventh upload is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_memory_budget_turns_new_work_away_and_connected_clients_keep_working() {
    const HELD: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    // alice, bob, four uploaders (two large requests each at most), the newcomer.
    let conns = 7 * 48 * 1024;
    let (process, budget, base) = start_with_budget(
        dir.path(),
        &["--set", "limits.request_timeout_secs=30", "--set", "limits.sweep_interval_secs=1"],
        |base| (base + conns + HELD * STALLED as u64) * 8 / 7,
    );
    let mut s = TempServer::adopt(process, dir);
    let (alice, _, _) = user(&s, "alice").await;
    let (bob, bob_key, bob_token) = user(&s, "bob").await;
    round_trip(&alice, &bob, &bob_key, "before the load").await;
    let rss_before = s.server.rss_kib().unwrap();

    let mut uploaders = Vec::new();
    for _ in 0..4 {
        uploaders.push(s.client().await);
    }
    let mut open = Vec::new();
    for i in 0..HELD as usize {
        let (answer, stream) = stalled_upload(&uploaders[i / 2], Duration::from_millis(500)).await;
        assert!(answer.is_none(), "upload {i} of {HELD} refused below the budget: {answer:?}");
        open.push(stream);
    }
    // The seventh goes past 90 %.
    match stalled_upload(&uploaders[3], STEP).await.0 {
        Some((Status::RateLimited, e)) => assert!(e.retry_after_ms >= 1000, "retry hint: {e:?}"),
        other => panic!("an upload past 90 % of the budget got {other:?}"),
    }
    let rss_loaded = s.server.rss_kib().unwrap();
    // At 87.5 %, a new connection is told to come back later...
    let newcomer = s.client().await;
    match within(STEP, "resume while busy", newcomer.resume(&bob_token)).await {
        Err(CallError::Status(Status::Unavailable, e)) => {
            assert!(e.retry_after_ms >= 1000, "retry hint: {e:?}")
        }
        other => panic!("a new connection past 85 % of the budget got {other:?}"),
    }
    let closed = within(STEP, "busy close", newcomer.conn.closed()).await;
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(3)),
        "the busy connection is closed with code 3: {closed:?}"
    );
    // ... and the clients already connected keep messaging.
    for i in 0..3 {
        round_trip(&alice, &bob, &bob_key, &format!("under load {i}")).await;
    }
    // The operator sees it in the log (checked once a sweep interval, here 1 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.server.stderr.lock().unwrap().contains("memory budget reached") {
        assert!(Instant::now() < deadline, "no log line for the refusals");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Accounted bytes are live bytes; the resident size follows them (allocator slack aside).
    let grown = rss_loaded.saturating_sub(rss_before) * 1024;
    assert!(
        grown < budget,
        "resident size grew {} MiB under a {} MiB budget",
        grown >> 20,
        budget >> 20
    );
    println!(
        "budget {} KiB (base {} KiB): {HELD} uploads held, the 7th refused; RSS {rss_before} -> \
         {rss_loaded} KiB",
        budget >> 10,
        base >> 10
    );

    for c in &uploaders {
        c.conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    drop((open, uploaders));
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

/// A connection reads at most two large requests at once; a third is refused at once, not
/// left waiting with what its client sends piling up in the server's QUIC buffers outside the
/// memory budget. The budget leaves 2.5 MiB under its 90 % ceiling beside two stalled uploads:
/// after the refusal, another connection's upload still fits, so the refused one holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_large_request_on_a_connection_is_refused_at_once_and_holds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let conns = 2 * 48 * 1024;
    let (process, _, _) =
        start_with_budget(dir.path(), &["--set", "limits.request_timeout_secs=30"], |base| {
            (base + conns + 2 * STALLED as u64 + 5 * MIB / 2) * 10 / 9 + 100
        });
    let mut s = TempServer::adopt(process, dir);
    let (u, v) = (s.client().await, s.client().await);
    let quiet = Duration::from_millis(500);
    let mut open = Vec::new();
    for i in 0..2 {
        let (answer, stream) = stalled_upload(&u, quiet).await;
        assert!(answer.is_none(), "upload {i} refused below the budget: {answer:?}");
        open.push(stream);
    }
    // Both places taken: the third is refused straight away, though its client sends 512 KiB.
    let t = Instant::now();
    match stalled_upload_of(&u, 512 * 1024, STEP).await.0 {
        Some((Status::RateLimited, e)) => {
            assert!(e.message.contains("too many large requests"), "{e:?}");
            assert!(e.retry_after_ms >= 1000, "retry hint: {e:?}");
        }
        other => panic!("a third large request on one connection got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "refused only after {:?}", t.elapsed());
    // It holds nothing: another connection's upload (1 MiB of it sent) is still taken.
    let (answer, stream) = stalled_upload_of(&v, 1 << 20, quiet).await;
    assert!(answer.is_none(), "an upload that fits the budget was refused: {answer:?}");
    open.push(stream);
    s.assert_alive();
}

/// A client that never accepts its push streams is disconnected (close code 4) once a push
/// has waited 10 s for it, holding little server memory meanwhile; its messages wait on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_pushes_is_disconnected_and_loses_nothing() {
    const MESSAGES: usize = 150;
    let mut s = TempServer::start(&[]);
    let (sender, _, _) = user(&s, "sender").await;
    let deaf = Client::connect_ignoring_pushes(s.server.addr, &s.server.fingerprint).await.unwrap();
    let deaf_key = identity();
    within(STEP, "register", deaf.register("deaf", "pw deaf", &deaf_key, "")).await.unwrap();
    let token = within(STEP, "login", deaf.login("deaf", "pw deaf", &deaf_key)).await.unwrap();
    let rss_before = s.server.rss_kib().unwrap();

    let started = Instant::now();
    let payload = vec![0xA5u8; 32 * 1024];
    for i in 0..MESSAGES {
        within(STEP, "enqueue", sender.enqueue(&deaf_key, &payload, message_id()))
            .await
            .unwrap_or_else(|e| panic!("enqueue {i}: {e}"));
    }
    let rss_pushing = s.server.rss_kib().unwrap();
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
/// Aborting the returned task stops the forwarding.
async fn black_hole(
    listen: SocketAddr,
    server: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let front = Arc::new(tokio::net::UdpSocket::bind(listen).await.unwrap());
    let addr = front.local_addr().unwrap();
    let task = tokio::spawn(async move {
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
    (addr, task)
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
    let mut s = TempServer::start(&[
        "--set",
        "limits.max_handshakes=16",
        "--log",
        "qpq_server_lite=debug,info",
    ]);
    let (alice, _, _) = user(&s, "alice").await;
    let (bob, bob_key, _) = user(&s, "bob").await;
    let rss_before = s.server.rss_kib().unwrap();

    // 400 half-open handshakes from 40 loopback addresses (127.0.0.2 ..).
    let mut flooders = Vec::new();
    let mut holes = Vec::new();
    for i in 0..SOURCES {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + i);
        let (hole, forwarding) = black_hole(SocketAddr::from((ip, 0)), s.server.addr).await;
        holes.push(forwarding);
        for _ in 0..PER_SOURCE {
            let crypto = qpq_core::client::net::pinned_crypto(&s.server.fingerprint).unwrap();
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            let connecting = ep.connect(hole, "localhost").unwrap();
            flooders.push((ep, tokio::spawn(connecting)));
        }
    }
    let flood_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_flood = s.server.rss_kib().unwrap();
    // Connected clients are served throughout.
    round_trip(&alice, &bob, &bob_key, "during the flood").await;
    // A new client is refused while the half-open handshakes hold every place, and gets in
    // once they time out (10 s), as a client retrying with backoff would.
    let mut refused = 0;
    let carol = loop {
        match s.server.client().await {
            Ok(c) => break c,
            Err(e) => {
                refused += 1;
                // From now on the flooders' retransmissions no longer reach the server: the
                // places free up only by the server's own handshake timeout.
                holes.iter().for_each(|h| h.abort());
                assert!(flood_started.elapsed() < Duration::from_secs(20), "still refused: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let key = identity();
    within(STEP, "register", carol.register("carol", "pw carol", &key, "")).await.unwrap();
    within(STEP, "login", carol.login("carol", "pw carol", &key)).await.unwrap();
    println!("new client refused {refused} times, in after {:?}", flood_started.elapsed());
    assert!(refused > 0, "a new client got in while the half-open handshakes held every place");
    let log = s.server.stderr.lock().unwrap().clone();
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
