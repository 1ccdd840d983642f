//! Durability of the real `qpq-server-lite` binary across SIGKILL and SIGTERM.
//!
//! The server answers an Enqueue only after the commit holding it is durable, so every message
//! whose Enqueue was acknowledged Ok must survive a crash, exactly once and in seq order, and
//! its message id must still deduplicate after a restart.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use qpq_proto::{Status, method, v1};
use qpq_tests::{CallError, Client, ServerProcess, identity, message_id};
use tokio::sync::Notify;

/// Upper bound for any single step that should complete promptly.
const STEP: Duration = Duration::from_secs(10);
/// Concurrent enqueue tasks in a burst, each on its own connection.
const TASKS: usize = 8;
/// Messages each task tries to enqueue.
const PER_TASK: usize = 200;

/// Keeps the per-address auth limit out of the way of the many logins and resumes here.
const AUTH_ARGS: [&str; 4] =
    ["--set", "limits.auth_per_ip_burst=1000", "--set", "limits.auth_per_ip_per_min=1000"];

/// Awaits `f`, failing the test if it takes longer than `limit`.
async fn bounded<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// The message id of message `i` of task `t`.
fn burst_id(t: usize, i: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = 0xD0;
    id[1] = t as u8;
    id[2..4].copy_from_slice(&(i as u16).to_be_bytes());
    id
}

/// The payload of message `i` of task `t`: it encodes its index.
fn burst_payload(t: usize, i: usize) -> Vec<u8> {
    format!("burst task {t} message {i} {}", "x".repeat(i % 97)).into_bytes()
}

/// The `(task, index)` a burst message id encodes.
fn parse_burst_id(id: &[u8]) -> Option<(usize, usize)> {
    match id {
        [0xD0, t, hi, lo, rest @ ..] if rest.iter().all(|b| *b == 0) && rest.len() == 12 => {
            Some((usize::from(*t), usize::from(u16::from_be_bytes([*hi, *lo]))))
        }
        _ => None,
    }
}

/// A registered, logged-in user on its own connection.
struct User {
    client: Client,
    key: [u8; 32],
    token: Vec<u8>,
}

async fn user(server: &ServerProcess, name: &str) -> User {
    let client = bounded("connect", STEP, server.client()).await.unwrap();
    let key = identity();
    let password = format!("password of {name}");
    bounded("register", STEP, client.register(name, &password, &key, "")).await.unwrap();
    let token = bounded("login", STEP, client.login(name, &password, &key)).await.unwrap();
    User { client, key, token }
}

/// A new connection bound to an existing session.
async fn resumed(server: &ServerProcess, token: &[u8]) -> Client {
    let client = bounded("connect", STEP, server.client()).await.unwrap();
    bounded("resume", STEP, client.resume(token))
        .await
        .unwrap_or_else(|e| panic!("resume on {}: {e}", server.addr));
    client
}

/// What the burst saw: every acknowledged message, and how each task ended.
#[derive(Default)]
struct Burst {
    /// message id -> (task, index, seq) for every Enqueue answered Ok.
    acked: std::sync::Mutex<HashMap<[u8; 16], (usize, usize, u64)>>,
    count: AtomicUsize,
    /// Stop starting new enqueues.
    stop: AtomicBool,
    /// Signalled once `count` reaches the `notify_at` given to [`run_burst`].
    reached: Notify,
}

/// Starts [`TASKS`] tasks, each on its own connection (resuming `token`), enqueueing
/// [`PER_TASK`] messages to `recipient` in order until one fails. Returns the connections (to
/// close them) and the tasks, which yield how they ended.
async fn run_burst(
    server: &ServerProcess,
    token: &[u8],
    recipient: [u8; 32],
    burst: &Arc<Burst>,
    notify_at: usize,
) -> (Vec<Arc<Client>>, Vec<tokio::task::JoinHandle<Result<(), CallError>>>) {
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = Arc::new(resumed(server, token).await);
        clients.push(client.clone());
        let burst = burst.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                if burst.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let r = client.enqueue(&recipient, &burst_payload(t, i), burst_id(t, i)).await?;
                assert!(!r.duplicate, "task {t} message {i}: a fresh id reported duplicate");
                burst.acked.lock().unwrap().insert(burst_id(t, i), (t, i, r.seq));
                if burst.count.fetch_add(1, Ordering::SeqCst) + 1 == notify_at {
                    burst.reached.notify_one();
                }
            }
            Ok(())
        }));
    }
    (clients, tasks)
}

/// Reads the recipient's whole default queue with Fetch + Ack pages of `page` messages,
/// checking that seqs strictly increase across pages. Leaves the queue empty.
async fn drain_queue(client: &Client, page: u32) -> Vec<v1::Envelope> {
    let mut all: Vec<v1::Envelope> = Vec::new();
    for _ in 0..10_000 {
        let envs = bounded("fetch", STEP, client.fetch(page)).await.unwrap();
        let Some(last) = envs.last().map(|e| e.seq) else { return all };
        assert!(envs.len() <= page as usize, "fetch returned more than its limit");
        for e in envs {
            if let Some(prev) = all.last() {
                assert!(
                    e.seq > prev.seq,
                    "seqs must strictly increase: {} after {}",
                    e.seq,
                    prev.seq
                );
            }
            all.push(e);
        }
        let removed = bounded("ack", STEP, client.ack(last)).await.unwrap();
        assert!(removed > 0, "ack up to {last} removed nothing");
    }
    panic!("the queue never emptied");
}

/// Checks the recovered queue against what the burst acknowledged: every acknowledged message
/// present exactly once with its seq and payload; per task, the stored messages are the
/// acknowledged prefix plus at most the one enqueue that was in flight; nothing unknown.
fn verify_recovered(envs: &[v1::Envelope], acked: &HashMap<[u8; 16], (usize, usize, u64)>) {
    let mut by_id: HashMap<&[u8], &v1::Envelope> = HashMap::new();
    let mut per_task: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for e in envs {
        let (t, i) = parse_burst_id(&e.message_id)
            .unwrap_or_else(|| panic!("unknown message id {:?} (seq {})", e.message_id, e.seq));
        assert!(by_id.insert(&e.message_id, e).is_none(), "message id {t}/{i} stored twice");
        assert_eq!(e.data, burst_payload(t, i), "payload of task {t} message {i}");
        per_task.entry(t).or_default().push(i);
    }
    for (id, (t, i, seq)) in acked {
        let e = by_id
            .get(id.as_slice())
            .unwrap_or_else(|| panic!("acknowledged message {t}/{i} (seq {seq}) was lost"));
        assert_eq!(e.seq, *seq, "seq of acknowledged message {t}/{i}");
    }
    for t in 0..TASKS {
        let acked_count = acked.values().filter(|(task, _, _)| *task == t).count();
        let stored = per_task.remove(&t).unwrap_or_default();
        // Each task enqueues in order, one at a time.
        let prefix: Vec<usize> = (0..acked_count).collect();
        let with_inflight: Vec<usize> = (0..=acked_count.min(PER_TASK - 1)).collect();
        let mut sorted = stored.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, stored, "task {t}: stored out of enqueue order");
        assert!(
            stored == prefix || stored == with_inflight,
            "task {t}: {acked_count} acknowledged, stored {stored:?}"
        );
    }
    assert!(per_task.is_empty(), "messages of unknown tasks: {per_task:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_enqueues_survive_sigkill_exactly_once() {
    const KILL_AFTER: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &AUTH_ARGS).unwrap();
    let sender = user(&server, "sender").await;
    let recipient = user(&server, "recipient").await;

    let burst = Arc::new(Burst::default());
    let (clients, tasks) =
        run_burst(&server, &sender.token, recipient.key, &burst, KILL_AFTER).await;
    bounded("the first acknowledgements", Duration::from_secs(20), burst.reached.notified()).await;
    server.kill();
    let acked_at_kill = burst.count.load(Ordering::SeqCst);
    // Calls waiting on the dead server would hang until the idle timeout: end them now.
    for c in &clients {
        c.conn.close(quinn::VarInt::from_u32(0), b"server killed");
    }
    sender.client.conn.close(quinn::VarInt::from_u32(0), b"server killed");
    recipient.client.conn.close(quinn::VarInt::from_u32(0), b"server killed");
    for (t, task) in tasks.into_iter().enumerate() {
        // A task ends by finishing its messages or by losing its connection; the server never
        // refuses an enqueue here.
        match bounded("burst task", STEP, task).await.unwrap() {
            Ok(()) | Err(CallError::Transport(_)) => {}
            Err(e @ CallError::Status(..)) => panic!("task {t}: server refused an enqueue: {e}"),
        }
    }
    let acked = std::mem::take(&mut *burst.acked.lock().unwrap());
    assert!(acked.len() >= KILL_AFTER && acked.len() >= acked_at_kill);
    assert!(acked.len() < TASKS * PER_TASK, "the kill must interrupt the burst");

    // Restart on the same data directory (any port): same certificate, same sessions.
    let server = ServerProcess::start_on(dir.path(), "127.0.0.1:0", &AUTH_ARGS).unwrap();
    let recipient_client = resumed(&server, &recipient.token).await;
    let sender_client = resumed(&server, &sender.token).await;

    // Re-enqueueing acknowledged ids is idempotent: duplicate, same seq, nothing stored.
    let mut sample: Vec<_> = acked.iter().map(|(id, v)| (*id, *v)).collect();
    sample.sort_by_key(|(_, (_, _, seq))| *seq);
    let step = (sample.len() / 25).max(1);
    let sample: Vec<_> =
        sample.iter().step_by(step).chain(sample.last()).copied().collect::<Vec<_>>();
    for (id, (t, i, seq)) in &sample {
        let r = bounded(
            "re-enqueue",
            STEP,
            sender_client.enqueue(&recipient.key, &burst_payload(*t, *i), *id),
        )
        .await
        .unwrap_or_else(|e| panic!("re-enqueue of {t}/{i}: {e}"));
        assert!(r.duplicate, "re-enqueue of acknowledged {t}/{i} must be a duplicate");
        assert_eq!(r.seq, *seq, "re-enqueue of {t}/{i} returns the original seq");
    }

    // Everything acknowledged is there exactly once, in seq order.
    let recovered = drain_queue(&recipient_client, 128).await;
    verify_recovered(&recovered, &acked);
    assert!(recovered.len() <= acked.len() + TASKS, "at most one in-flight enqueue per task");
    let max_seq = recovered.last().unwrap().seq;

    // The dedup memory outlives the ack: still a duplicate, still not stored again.
    let (id, (t, i, seq)) = sample[0];
    let r = sender_client.enqueue(&recipient.key, &burst_payload(t, i), id).await.unwrap();
    assert!(r.duplicate && r.seq == seq, "dedup after ack: {r:?}");
    assert!(recipient_client.fetch(0).await.unwrap().is_empty(), "a duplicate was stored");

    // New messages continue the seq after the recovered ones.
    let fresh =
        sender_client.enqueue(&recipient.key, b"after restart", message_id()).await.unwrap();
    assert!(!fresh.duplicate);
    assert!(fresh.seq > max_seq, "seq {} reused after restart (max {max_seq})", fresh.seq);
    let envs = recipient_client.fetch(0).await.unwrap();
    assert_eq!(envs.len(), 1);
    assert_eq!((envs[0].seq, envs[0].data.as_slice()), (fresh.seq, &b"after restart"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_inflight_fetch_wait_and_enqueues_exits_cleanly() {
    const DRAIN_SECS: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    let drain = format!("limits.drain_timeout_secs={DRAIN_SECS}");
    let mut args = AUTH_ARGS.to_vec();
    args.extend(["--set", &drain]);
    let server = ServerProcess::start(dir.path(), &args).unwrap();
    let sender = user(&server, "sender").await;
    let recipient = user(&server, "recipient").await;
    let waiter = Arc::new(user(&server, "waiter").await);

    // A long poll on a queue nobody writes to: in flight for the whole shutdown.
    let poll = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            waiter
                .client
                .call::<_, v1::FetchWaitResponse>(
                    method::FETCH_WAIT,
                    &v1::FetchWaitRequest { timeout_ms: 30_000, ..Default::default() },
                )
                .await
        })
    };
    // And a burst of enqueues that keeps going through the shutdown.
    let burst = Arc::new(Burst::default());
    let (clients, tasks) = run_burst(&server, &sender.token, recipient.key, &burst, 100).await;
    bounded("the first acknowledgements", Duration::from_secs(20), burst.reached.notified()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!poll.is_finished(), "the long poll must still be waiting");

    let t0 = Instant::now();
    let (status, server) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let status = server.terminate(Duration::from_secs(DRAIN_SECS + 15));
        (status, server)
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    let log = server.stderr.lock().unwrap().clone();
    let status = status.unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert!(status.success(), "exit status {status:?} after SIGTERM\n{log}");
    // Drain timeout, then closing connections (at most 2 s), plus scheduling slack.
    assert!(took < Duration::from_secs(DRAIN_SECS + 3), "exited after {took:?}\n{log}");
    assert!(log.contains("shutdown complete"), "{log}");

    // The long poll ended with the server, without messages.
    match bounded("the long poll", STEP, poll).await.unwrap() {
        Ok(r) => assert!(r.payloads.is_empty(), "{r:?}"),
        Err(CallError::Transport(_)) => {}
        Err(e @ CallError::Status(..)) => {
            let s = e.status().unwrap();
            assert!(
                matches!(s, qpq_proto::Status::Unavailable | qpq_proto::Status::DeadlineExceeded),
                "long poll at shutdown: {e}"
            );
        }
    }
    // Connections were closed with code 1, "the server is shutting down".
    match waiter.client.conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(1), "close code: {c:?}");
        }
        other => panic!("the long poll's connection was not closed by the server: {other:?}"),
    }
    for c in &clients {
        c.conn.close(quinn::VarInt::from_u32(0), b"server gone");
    }
    for task in tasks {
        let _ = bounded("burst task", STEP, task).await.unwrap();
    }
    let acked = std::mem::take(&mut *burst.acked.lock().unwrap());
    drop(server);

    // The database reopens, and every acknowledged message is there exactly once.
    let server = ServerProcess::start_on(dir.path(), "127.0.0.1:0", &AUTH_ARGS).unwrap();
    let recipient_client = resumed(&server, &recipient.token).await;
    let recovered = drain_queue(&recipient_client, 500).await;
    verify_recovered(&recovered, &acked);
    let waiter_client = resumed(&server, &waiter.token).await;
    assert!(waiter_client.fetch(0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_short_rpcs_in_flight_exits_before_the_drain_timeout() {
    // A long drain timeout: the server must not need it when the in-flight RPCs are short.
    let dir = tempfile::tempdir().unwrap();
    let mut args = AUTH_ARGS.to_vec();
    args.extend(["--set", "limits.drain_timeout_secs=20"]);
    let server = ServerProcess::start(dir.path(), &args).unwrap();
    let sender = user(&server, "sender").await;
    let recipient = user(&server, "recipient").await;

    let burst = Arc::new(Burst::default());
    let (clients, tasks) = run_burst(&server, &sender.token, recipient.key, &burst, 100).await;
    bounded("the first acknowledgements", Duration::from_secs(20), burst.reached.notified()).await;
    // Enqueues are in flight; no new ones start once the signal is sent.
    burst.stop.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let (status, server) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let status = server.terminate(Duration::from_secs(25));
        (status, server)
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    let log = server.stderr.lock().unwrap().clone();
    let status = status.unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert!(status.success(), "exit status {status:?} after SIGTERM\n{log}");
    assert!(took < Duration::from_secs(5), "exited after {took:?}: waited for nothing\n{log}");

    for c in &clients {
        c.conn.close(quinn::VarInt::from_u32(0), b"server gone");
    }
    for (t, task) in tasks.into_iter().enumerate() {
        match bounded("burst task", STEP, task).await.unwrap() {
            Ok(()) | Err(CallError::Transport(_)) => {}
            // A task that checked `stop` just before the signal may land its last request in
            // the drain, which answers it `Unavailable` (PROTOCOL.md §1): not acknowledged.
            Err(CallError::Status(Status::Unavailable, _)) => {}
            Err(e) => panic!("task {t}: {e}"),
        }
    }
    let acked = std::mem::take(&mut *burst.acked.lock().unwrap());
    drop(server);

    let server = ServerProcess::start_on(dir.path(), "127.0.0.1:0", &AUTH_ARGS).unwrap();
    let recipient_client = resumed(&server, &recipient.token).await;
    let recovered = drain_queue(&recipient_client, 500).await;
    verify_recovered(&recovered, &acked);
}
