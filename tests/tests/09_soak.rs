//! Soak: connect / log in / send / upload / download / disconnect churn for a bounded time
//! against the real server, then check that its resident memory returns to the baseline taken
//! after a warm-up and that no file descriptor leaked. `QPQTEST_SOAK_SECS` sets the churn time
//! (default 20 s; run longer by hand, e.g. 600).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qpq_proto::{method, v1};
use qpq_tests::{ServerProcess, identity, message_id};
use sha2::{Digest, Sha256};

const USERS: usize = 4;
const STEP: Duration = Duration::from_secs(20);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.unwrap_or_else(|_| panic!("{what}: no answer in {STEP:?}"))
}

struct User {
    name: String,
    key: [u8; 32],
}

/// One churn cycle: a fresh connection logs in with OPAQUE, sends a message to the next user,
/// drains its own queue, uploads a small blob, downloads it, logs out or not, and disconnects.
async fn cycle(server: &ServerProcess, users: &[User], i: usize, n: u64) {
    let me = &users[i];
    let to = &users[(i + 1) % users.len()];
    let c = within("connect", server.client()).await.unwrap();
    within("login", c.login(&me.name, &format!("pw {}", me.name), &me.key)).await.unwrap();
    let payload = format!("soak {n} from {}", me.name).into_bytes();
    within("enqueue", c.enqueue(&to.key, &payload, message_id())).await.unwrap();
    let got = within("fetch", c.fetch(0)).await.unwrap();
    if let Some(last) = got.last() {
        within("ack", c.ack(last.seq)).await.unwrap();
    }
    // One blob per user, uploaded again and again: the database does not grow with the churn
    // (sessions aside), so its cache cannot pass for a leak.
    let blob: Vec<u8> = (0..20_000u32).map(|b| (b as usize * (i + 1)) as u8).collect();
    let id = Sha256::digest(&blob).to_vec();
    let up: v1::UploadBlobResponse = within(
        "upload",
        c.call(
            method::UPLOAD_BLOB,
            &v1::UploadBlobRequest {
                blob_id: id.clone(),
                total_size: blob.len() as u64,
                offset: 0,
                chunk: blob.clone(),
                media_type: "application/octet-stream".into(),
            },
        ),
    )
    .await
    .unwrap();
    assert!(up.complete);
    let down: v1::DownloadBlobResponse = within(
        "download",
        c.call(
            method::DOWNLOAD_BLOB,
            &v1::DownloadBlobRequest { blob_id: id, offset: 0, max_len: 0 },
        ),
    )
    .await
    .unwrap();
    assert_eq!(down.chunk, blob);
    // Log out (the session row goes) on every other cycle; just drop the connection otherwise.
    if n.is_multiple_of(2) {
        let _: v1::LogoutResponse =
            within("logout", c.call(method::LOGOUT, &v1::LogoutRequest::default())).await.unwrap();
    }
    c.conn.close(quinn::VarInt::from_u32(0), b"bye");
}

/// Runs `workers` concurrent churn loops until `until`; returns the cycles done.
async fn churn(server: &Arc<ServerProcess>, users: &Arc<Vec<User>>, until: Instant) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..USERS {
        let (server, users, done) = (server.clone(), users.clone(), done.clone());
        tasks.spawn(async move {
            while Instant::now() < until {
                let n = done.fetch_add(1, Ordering::Relaxed);
                cycle(&server, &users, i, n).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    done.load(Ordering::Relaxed)
}

/// Waits until the server's open descriptors drop to `want` (connections close
/// asynchronously); returns the last count.
async fn settled_fds(server: &ServerProcess, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fds = server.open_fds().unwrap();
        if fds <= want || Instant::now() > deadline {
            return fds;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_returns_to_baseline_memory_and_leaks_no_descriptors() {
    let secs: u64 =
        std::env::var("QPQTEST_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(
        ServerProcess::start(
            dir.path(),
            &[
                "--set",
                "limits.auth_per_ip_burst=100000",
                "--set",
                "limits.auth_per_ip_per_min=100000",
                "--set",
                "limits.auth_per_user_burst=100000",
                "--set",
                "limits.auth_per_user_per_min=100000",
            ],
        )
        .unwrap(),
    );
    let mut users = Vec::new();
    for i in 0..USERS {
        let u = User { name: format!("soak{i}"), key: identity() };
        let c = within("connect", server.client()).await.unwrap();
        within("register", c.register(&u.name, &format!("pw {}", u.name), &u.key, ""))
            .await
            .unwrap();
        c.conn.close(quinn::VarInt::from_u32(0), b"bye");
        users.push(u);
    }
    let users = Arc::new(users);

    // Warm-up: caches, allocator arenas and the database reach their working size.
    let warm = churn(&server, &users, Instant::now() + Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (base_rss, base_fds) = (server.rss_kib().unwrap(), server.open_fds().unwrap());

    let started = Instant::now();
    let cycles = churn(&server, &users, started + Duration::from_secs(secs)).await;
    let churn_time = started.elapsed();
    let peak = server.peak_rss_kib().unwrap();
    let fds = settled_fds(&server, base_fds).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = server.rss_kib().unwrap();
    println!(
        "soak: {warm} warm-up cycles, then {cycles} cycles in {churn_time:.1?} \
         ({:.1}/s); RSS {base_rss} KiB -> peak {peak} KiB -> {rss} KiB after; fds {base_fds} -> {fds}",
        cycles as f64 / churn_time.as_secs_f64()
    );
    assert!(cycles >= 20, "only {cycles} cycles in {churn_time:?}");
    assert!(fds <= base_fds, "file descriptors leaked: {base_fds} before the churn, {fds} after");
    assert!(
        rss <= base_rss + 2048,
        "resident memory did not return to its baseline: {base_rss} KiB before the churn, \
         {rss} KiB after {cycles} cycles"
    );
}
