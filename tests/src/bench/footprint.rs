//! `footprint`: the server's resident memory idle and with many idle authenticated
//! connections (one account, logged in once, every other connection `Resume`s its token).

use std::sync::Arc;
use std::time::Duration;

use qpq_tests::Client;
use tokio::sync::Semaphore;

use super::common::{self, Opts, Table};

/// Connections opened at once while ramping up.
const RAMP_PARALLEL: usize = 64;

/// Runs the benchmark and prints its table.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let steps: &[usize] = if opts.quick { &[0, 10, 50] } else { &[0, 100, 1000, 5000] };
    let settle = Duration::from_millis(if opts.quick { 300 } else { 3000 });
    let max = steps.iter().max().copied().unwrap_or(0) + 16;
    let dir = tempfile::tempdir()?;
    let max_s = max.to_string();
    let args = common::limits(&[
        ("max_connections", &max_s),
        ("max_connections_per_ip", &max_s),
        ("idle_timeout_secs", "600"),
        // 5,000 connections need more than the 48 MiB default budget, which would turn them
        // away (Unavailable) from about 700 on.
        ("memory_budget_bytes", "1073741824"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::start_server(opts, dir.path(), &args)?;
    let pid = server.pid();
    tokio::time::sleep(settle).await;
    let idle_rss = qpq_tests::proc_status_kib(pid, "VmRSS:")?;
    let idle_hwm = qpq_tests::proc_status_kib(pid, "VmHWM:")?;

    let endpoint = Client::endpoint(&server.fingerprint)?;
    let token = {
        let acct = common::account(&endpoint, &server, "footprint").await?;
        acct.client.conn.close(0u32.into(), b"done");
        acct.token
    };
    let token = Arc::new(token);
    let mut conns: Vec<Client> = Vec::new();
    let mut points = Vec::new();
    let mut rows = Vec::new();
    for &n in steps {
        let sem = Arc::new(Semaphore::new(RAMP_PARALLEL));
        let mut tasks = Vec::new();
        for _ in conns.len()..n {
            let (sem, endpoint, token, addr) =
                (sem.clone(), endpoint.clone(), token.clone(), server.addr);
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire_owned().await?;
                let c = Client::connect_on(&endpoint, addr).await?;
                c.resume(&token).await?;
                anyhow::Ok(c)
            }));
        }
        for t in tasks {
            conns.push(t.await??);
        }
        tokio::time::sleep(settle).await;
        let rss = qpq_tests::proc_status_kib(pid, "VmRSS:")?;
        points.push((n as f64, rss as f64));
        rows.push((n, rss));
    }
    let hwm = qpq_tests::proc_status_kib(pid, "VmHWM:")?;
    let (slope, intercept) = common::least_squares(&points);
    let (size, stripped) = common::stripped_size(&opts.server)?;

    let mut t = Table::new("footprint: server memory (VmRSS from /proc/<pid>/status)");
    t.goal(
        "idle RSS after start",
        format!("{:.2} MiB (VmHWM {:.2} MiB)", mib(idle_rss), mib(idle_hwm)),
        "<= 4 MiB",
        idle_rss <= 4096,
    );
    for (n, rss) in &rows {
        t.info(format!("RSS, {n} idle authenticated connections"), format!("{:.2} MiB", mib(*rss)));
    }
    t.goal(
        "slope (least squares)",
        format!("{slope:.2} KiB/conn (intercept {:.2} MiB)", intercept / 1024.0),
        "<= 10 KiB/conn",
        slope <= 10.0,
    );
    t.info("VmHWM at the end", format!("{:.2} MiB", mib(hwm)));
    t.info(
        "binary size",
        if size == stripped {
            format!("{} bytes ({:.2} MiB, stripped)", size, size as f64 / 1048576.0)
        } else {
            format!(
                "{} bytes stripped ({:.2} MiB; {} on disk)",
                stripped,
                stripped as f64 / 1048576.0,
                size
            )
        },
    );
    t.note(format!(
        "{}; connections share one client UDP socket, keep-alive 5 s, {:.1} s settle before each reading; limits raised: connections, idle timeout, memory budget (1 GiB)",
        opts.server.display(),
        settle.as_secs_f64()
    ));
    t.print();
    for c in &conns {
        c.conn.close(0u32.into(), b"done");
    }
    let mut server = server;
    server.terminate(Duration::from_secs(15))?;
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
