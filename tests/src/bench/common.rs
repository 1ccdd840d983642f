//! What every benchmark shares: options, the server under test, /proc readers, statistics and
//! the result table.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qpq_proto::{method, v1};
use qpq_tests::{Client, ServerProcess};

/// Command-line options every subcommand sees.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Short smoke run.
    pub quick: bool,
    /// The server binary under test.
    pub server: PathBuf,
}

/// Starts the server under test on 127.0.0.1 in `dir`, logging only warnings.
pub fn start_server(opts: &Opts, dir: &Path, extra: &[&str]) -> anyhow::Result<ServerProcess> {
    ServerProcess::start_bin(&opts.server, dir, "127.0.0.1:0", extra, "warn")
        .with_context(|| format!("starting {}", opts.server.display()))
}

/// `--set limits.KEY=VALUE` pairs as arguments.
pub fn limits(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs.iter().flat_map(|(k, v)| ["--set".to_string(), format!("limits.{k}={v}")]).collect()
}

/// Auth rate limits high enough that benchmarks never hit them.
pub const NO_AUTH_LIMITS: &[(&str, &str)] = &[
    ("auth_per_ip_burst", "1000000"),
    ("auth_per_ip_per_min", "1000000"),
    ("auth_per_user_burst", "1000000"),
    ("auth_per_user_per_min", "1000000"),
];

/// `/proc/<pid>/io` counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Io {
    /// Bytes read through read(2) and friends.
    pub rchar: u64,
    /// Bytes written through write(2) and friends.
    pub wchar: u64,
    /// Write syscalls.
    pub syscw: u64,
    /// Bytes sent to the block layer.
    pub write_bytes: u64,
}

/// Reads `/proc/<pid>/io`.
pub fn io(pid: u32) -> anyhow::Result<Io> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Io {
        rchar: field("rchar"),
        wchar: field("wchar"),
        syscw: field("syscw"),
        write_bytes: field("write_bytes"),
    })
}

/// CPU time (user + system) the process has used.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10)) // USER_HZ is 100 on Linux
}

/// Latency percentiles of a sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Sample size.
    pub n: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

impl Summary {
    /// Summarises `sample` (sorts it).
    pub fn of(sample: &mut [Duration]) -> Self {
        if sample.is_empty() {
            return Self::default();
        }
        sample.sort_unstable();
        let at = |p: f64| sample[((sample.len() - 1) as f64 * p).round() as usize];
        Self { n: sample.len(), p50: at(0.5), p99: at(0.99), max: sample[sample.len() - 1] }
    }
}

/// Median of a sample.
pub fn median(sample: &mut [Duration]) -> Duration {
    Summary::of(sample).p50
}

/// Least-squares slope and intercept of `y` over `x`.
pub fn least_squares(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx == 0.0 { 0.0 } else { sxy / sxx };
    (slope, my - slope * mx)
}

/// A duration in the unit that reads best.
pub fn dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.1} s", us / 1e6)
    }
}

/// p50 / p99 / max of a summary.
pub fn pcts(s: &Summary) -> String {
    format!("p50 {} / p99 {} / max {} (n={})", dur(s.p50), dur(s.p99), dur(s.max), s.n)
}

/// A result table: one row per figure, the goal beside it and PASS/MISS where there is one.
pub struct Table {
    title: String,
    rows: Vec<[String; 4]>,
    notes: Vec<String>,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>) -> Self {
        Self { title: title.into(), rows: Vec::new(), notes: Vec::new() }
    }

    /// A line printed under the table.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// A figure without a goal.
    pub fn info(&mut self, measure: impl Into<String>, value: impl Into<String>) {
        self.rows.push([measure.into(), value.into(), String::new(), String::new()]);
    }

    /// A figure with its goal and whether it met it.
    pub fn goal(
        &mut self,
        measure: impl Into<String>,
        value: impl Into<String>,
        goal: impl Into<String>,
        met: bool,
    ) {
        let verdict = if met { "PASS" } else { "MISS" };
        self.rows.push([measure.into(), value.into(), goal.into(), verdict.into()]);
    }

    /// Prints the table.
    pub fn print(&self) {
        let width = |i: usize, min: usize| {
            self.rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(min)
        };
        let (w0, w1, w2) = (width(0, 7), width(1, 6), width(2, 4));
        println!("\n== {} ==", self.title);
        println!("{:<w0$}  {:<w1$}  {:<w2$}  verdict", "measure", "result", "goal");
        println!("{}", "-".repeat(w0 + w1 + w2 + 13));
        for r in &self.rows {
            println!("{:<w0$}  {:<w1$}  {:<w2$}  {}", r[0], r[1], r[2], r[3]);
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }
}

/// Size of `path` and, if `strip` is installed and the file has symbols, of a stripped copy.
pub fn stripped_size(path: &Path) -> anyhow::Result<(u64, u64)> {
    let size = std::fs::metadata(path)?.len();
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("stripped");
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Ok((size, std::fs::metadata(&copy)?.len())),
        _ => Ok((size, size)),
    }
}

/// A registered, logged-in account on its own connection.
pub struct Account {
    /// The logged-in connection.
    pub client: Client,
    /// Its identity key.
    pub identity: [u8; 32],
    /// Its session token, for more connections ([`Client::resume`]).
    pub token: Vec<u8>,
}

/// Registers `name` and logs in over a new connection on `endpoint`.
pub async fn account(
    endpoint: &quinn::Endpoint,
    server: &ServerProcess,
    name: &str,
) -> anyhow::Result<Account> {
    let client = Client::connect_on(endpoint, server.addr).await?;
    let identity = qpq_tests::identity();
    let password = format!("{name} password");
    client.register(name, &password, &identity, "").await?;
    let token = client.login(name, &password, &identity).await?;
    Ok(Account { client, identity, token })
}

/// Registers `n` accounts `{prefix}{i}`, `parallel` at a time (each costs two Argon2 runs).
pub async fn accounts(
    endpoint: &quinn::Endpoint,
    server: &ServerProcess,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<Account>> {
    let endpoint = endpoint.clone();
    let addr = server.addr;
    let sem = Arc::new(tokio::sync::Semaphore::new(2));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (endpoint, sem, name) = (endpoint.clone(), sem.clone(), format!("{prefix}{i}"));
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let client = Client::connect_on(&endpoint, addr).await?;
            let identity = qpq_tests::identity();
            let password = format!("{name} password");
            client.register(&name, &password, &identity, "").await?;
            let token = client.login(&name, &password, &identity).await?;
            anyhow::Ok(Account { client, identity, token })
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Calls Health once.
pub async fn health(client: &Client) -> anyhow::Result<v1::HealthResponse> {
    client.call(method::HEALTH, &v1::HealthRequest {}).await.map_err(Into::into)
}

/// Sleeps until `at` (a steady-rate sender's next slot).
pub async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}

/// Fails with a readable message if `cond` is false.
pub fn ensure(cond: bool, what: &str) -> anyhow::Result<()> {
    if !cond {
        bail!("{what}");
    }
    Ok(())
}
