//! A headless qpq protocol client and a harness that runs the real `qpq-server-lite` binary,
//! for end-to-end tests. Everything talks to 127.0.0.1 only.
#![allow(clippy::unwrap_used)]

pub mod procs;
pub mod tmux;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use qpq_proto::frame::{self, RESPONSE_HEADER_LEN, ResponseHeader};
use qpq_proto::{Message, Status, method, v1};
use tokio::sync::{Mutex, mpsc};

/// Path of a workspace binary next to the running test executable (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) =
        std::env::var_os(format!("QPQTEST_BIN_{}", name.replace('-', "_").to_uppercase()))
    {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built; run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// A running `qpq-server-lite` process on 127.0.0.1 with its own data directory.
pub struct ServerProcess {
    child: Child,
    /// The bound address.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate, hex.
    pub fingerprint: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Everything it logged to stderr, collected in the background.
    pub stderr: Arc<std::sync::Mutex<String>>,
}

impl ServerProcess {
    /// Starts a server with open registration in `data_dir`, plus `extra` arguments.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(data_dir, "127.0.0.1:0", extra)
    }

    /// Like [`Self::start`] on a given address (to restart on the same port).
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_bin(&workspace_bin("qpq-server-lite"), data_dir, listen, extra, "debug")
    }

    /// Like [`Self::start_on`] with another server binary and log filter (benchmarks run
    /// other builds, and quietly).
    pub fn start_bin(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        log: &str,
    ) -> anyhow::Result<Self> {
        Self::start_bin_env(bin, data_dir, listen, extra, log, &[])
    }

    /// Like [`Self::start`] with extra environment variables for the server process.
    pub fn start_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        Self::start_bin_env(
            &workspace_bin("qpq-server-lite"),
            data_dir,
            "127.0.0.1:0",
            extra,
            "debug",
            env,
        )
    }

    fn start_bin_env(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        log: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.arg("--data-dir").arg(data_dir).args(["--listen", listen]);
        if !extra.contains(&"--registration") {
            cmd.args(["--registration", "open"]);
        }
        cmd.args(extra).args(["--log", log]);
        cmd.env_remove("QPQ_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning qpq-server-lite")?;
        let stderr = Arc::new(std::sync::Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        let mut fingerprint = None;
        while addr.is_none() || fingerprint.is_none() {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                bail!("server exited before listening:\n{}", stderr.lock().unwrap());
            };
            let line = line?;
            if let Some(a) = line.strip_prefix("listening on ") {
                addr = Some(a.parse::<SocketAddr>()?);
            } else if let Some(f) = line.strip_prefix("fingerprint sha256:") {
                fingerprint = Some(f.to_string());
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Self {
            child,
            addr: addr.unwrap(),
            fingerprint: fingerprint.unwrap(),
            data_dir: data_dir.to_path_buf(),
            stderr,
        })
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                bail!("server did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB (`VmRSS`; Linux only).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Peak resident memory, KiB (`VmHWM`; Linux only).
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Open file descriptors (Linux only).
    pub fn open_fds(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A new connected client.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::connect(self.addr, &self.fingerprint).await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server on a temporary data directory of its own, for tests that need a server to
/// themselves; the directory goes when this is dropped, after the server is stopped.
pub struct TempServer {
    /// The server (declared first, so it is stopped before its directory is removed).
    pub server: ServerProcess,
    _dir: tempfile::TempDir,
}

impl TempServer {
    /// Starts a server with `extra` arguments on a fresh temporary directory; panics if it
    /// cannot.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(dir.path(), extra)
            .unwrap_or_else(|e| panic!("starting the server: {e:#}"));
        Self { server, _dir: dir }
    }

    /// Takes charge of a server already running on `dir`.
    pub fn adopt(server: ServerProcess, dir: tempfile::TempDir) -> Self {
        Self { server, _dir: dir }
    }

    /// A new connected client; panics if there is none within 20 s.
    pub async fn client(&self) -> Client {
        match tokio::time::timeout(Duration::from_secs(20), self.server.client()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("connect: {e:#}"),
            Err(_) => panic!("connect: no connection within 20 s"),
        }
    }

    /// Panics, showing the server's last 40 log lines, if it is no longer running.
    pub fn assert_alive(&mut self) {
        if !self.server.is_running() {
            let log = self.server.stderr.lock().unwrap();
            let lines: Vec<&str> = log.lines().collect();
            panic!("the server died:\n{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    line.split_whitespace().nth(1).context("empty field")?.parse().context("not a number")
}

/// A failed call.
#[derive(Debug)]
pub enum CallError {
    /// The server answered with a non-Ok status.
    Status(Status, v1::Error),
    /// The transport or framing failed.
    Transport(String),
}

impl CallError {
    /// The status, if the server answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Status(s, _) => Some(*s),
            Self::Transport(_) => None,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(s, e) => write!(f, "{s}: {}", e.message),
            Self::Transport(t) => write!(f, "transport: {t}"),
        }
    }
}

impl std::error::Error for CallError {}

/// A push received from the server.
#[derive(Debug, Clone)]
pub struct Push {
    /// Event id.
    pub event: u16,
    /// Protobuf payload.
    pub payload: Vec<u8>,
    /// When the push's stream had been read to the end.
    pub received: std::time::Instant,
}

/// A headless protocol client: one QUIC connection, one stream per call.
pub struct Client {
    _endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    next_id: AtomicU32,
    pushes: Mutex<mpsc::UnboundedReceiver<Push>>,
}

impl Client {
    /// Connects to `addr`, pinning the certificate with SHA-256 `fingerprint`.
    pub async fn connect(addr: SocketAddr, fingerprint: &str) -> anyhow::Result<Self> {
        let endpoint = Self::endpoint(fingerprint)?;
        Self::connect_on(&endpoint, addr).await
    }

    /// Like [`Client::connect`], but never accepts the server's push streams: a client that
    /// does not read its pushes.
    pub async fn connect_ignoring_pushes(
        addr: SocketAddr,
        fingerprint: &str,
    ) -> anyhow::Result<Self> {
        let endpoint = Self::endpoint(fingerprint)?;
        Self::open(&endpoint, addr, false).await
    }

    /// A client endpoint (one UDP socket on 127.0.0.1) whose connections pin `fingerprint`
    /// and send keep-alives every 5 s. Many [`Client`]s can share it ([`Self::connect_on`]).
    pub fn endpoint(fingerprint: &str) -> anyhow::Result<quinn::Endpoint> {
        let crypto = qpq_core::client::net::pinned_crypto(fingerprint)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        config.transport_config(Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(config);
        Ok(endpoint)
    }

    /// Connects to `addr` over `endpoint` (from [`Self::endpoint`]).
    pub async fn connect_on(endpoint: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::open(endpoint, addr, true).await
    }

    async fn open(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        read_pushes: bool,
    ) -> anyhow::Result<Self> {
        let endpoint = endpoint.clone();
        let conn = endpoint.connect(addr, "localhost")?.await.context("QUIC handshake")?;
        let (tx, rx) = mpsc::unbounded_channel();
        if !read_pushes {
            return Ok(Self {
                _endpoint: endpoint,
                conn,
                next_id: AtomicU32::new(1),
                pushes: Mutex::new(rx),
            });
        }
        qpq_core::client::net::spawn_push_reader(conn.clone(), move |event, payload| {
            let received = std::time::Instant::now();
            let _ = tx.send(Push { event, payload, received });
            std::future::ready(())
        });
        Ok(Self { _endpoint: endpoint, conn, next_id: AtomicU32::new(1), pushes: Mutex::new(rx) })
    }

    /// Calls `method` with `req` and decodes the response.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method_id: u16,
        req: &Req,
    ) -> Result<Resp, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode_request(method_id, id, &req.encode_to_vec())
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let (header, body) =
            self.raw(&bytes).await.map_err(|e| CallError::Transport(e.to_string()))?;
        if header.request_id != id {
            return Err(CallError::Transport(format!(
                "response id {} for request {id}",
                header.request_id
            )));
        }
        if header.status != Status::Ok {
            let err = v1::Error::decode(body.as_slice())
                .map_err(|e| CallError::Transport(e.to_string()))?;
            return Err(CallError::Status(header.status, err));
        }
        Resp::decode(body.as_slice()).map_err(|e| CallError::Transport(e.to_string()))
    }

    /// Sends raw bytes on a new stream, finishes it, and reads one response frame.
    pub async fn raw(&self, bytes: &[u8]) -> anyhow::Result<(ResponseHeader, Vec<u8>)> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(bytes).await?;
        send.finish()?;
        read_response(&mut recv).await
    }

    /// Registers `username` with `password` and `identity` (the client's OPAQUE flow,
    /// `qpq_core::opaque::flow`).
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        identity: &[u8; 32],
        invite: &str,
    ) -> Result<(), CallError> {
        qpq_core::opaque::flow::register(self, username, password, identity, invite).await
    }

    /// Logs in; returns the session token. A wrong password fails on the client side
    /// (`Transport("login failed ...")`) before LoginFinish is sent, as OPAQUE intends.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        identity: &[u8; 32],
    ) -> Result<Vec<u8>, CallError> {
        qpq_core::opaque::flow::login(self, username, password, identity).await
    }

    /// Binds this connection to an existing session.
    pub async fn resume(&self, token: &[u8]) -> Result<v1::ResumeResponse, CallError> {
        self.call(method::RESUME, &v1::ResumeRequest { session_token: token.to_vec() }).await
    }

    /// Enqueues `payload` for `recipient` with an idempotency key.
    pub async fn enqueue(
        &self,
        recipient: &[u8; 32],
        payload: &[u8],
        message_id: [u8; 16],
    ) -> Result<v1::EnqueueResponse, CallError> {
        self.call(
            method::ENQUEUE,
            &v1::EnqueueRequest {
                recipient_key: recipient.to_vec(),
                payload: payload.to_vec(),
                channel_id: Vec::new(),
                ttl_secs: 0,
                message_id: message_id.to_vec(),
            },
        )
        .await
    }

    /// Fetches from the caller's default queue.
    pub async fn fetch(&self, limit: u32) -> Result<Vec<v1::Envelope>, CallError> {
        let r: v1::FetchResponse =
            self.call(method::FETCH, &v1::FetchRequest { limit, ..Default::default() }).await?;
        Ok(r.payloads)
    }

    /// Acks the caller's default queue up to `seq`.
    pub async fn ack(&self, seq: u64) -> Result<u64, CallError> {
        let r: v1::AckResponse = self
            .call(method::ACK, &v1::AckRequest { seq_up_to: seq, ..Default::default() })
            .await?;
        Ok(r.removed)
    }

    /// The next push, waiting at most `timeout`.
    pub async fn next_push(&self, timeout: Duration) -> Option<Push> {
        let mut rx = self.pushes.lock().await;
        tokio::time::timeout(timeout, rx.recv()).await.ok().flatten()
    }
}

/// Reads one response frame from `recv`.
pub async fn read_response(
    recv: &mut quinn::RecvStream,
) -> anyhow::Result<(ResponseHeader, Vec<u8>)> {
    let mut head = [0u8; RESPONSE_HEADER_LEN];
    recv.read_exact(&mut head).await?;
    let header = ResponseHeader::decode(&head)?;
    let mut body = vec![0u8; header.len as usize];
    recv.read_exact(&mut body).await?;
    Ok((header, body))
}

/// A fresh random identity key. The server checks only its length, except in KeyPackages:
/// for an account that uploads them, use a [`KeyMaker`]'s key.
pub fn identity() -> [u8; 32] {
    rand::random()
}

/// A real device's MLS keys, for protocol-level tests: an Ed25519 identity and the
/// KeyPackages its client would upload (made by `qpq_core::mls::Mls`, private keys kept in a
/// throwaway vault).
pub struct KeyMaker {
    mls: qpq_core::mls::Mls,
    _dir: tempfile::TempDir,
}

impl KeyMaker {
    /// A fresh identity.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kdf = qpq_core::vault::KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let vault = qpq_core::vault::Vault::create(&dir.path().join("keys"), b"keys", kdf).unwrap();
        let identity = qpq_core::identity::Identity::generate();
        Self { mls: qpq_core::mls::Mls::new(Arc::new(vault), identity), _dir: dir }
    }

    /// The identity key to register with.
    pub fn identity_key(&self) -> [u8; 32] {
        self.mls.identity_key()
    }

    /// A fresh KeyPackage, as the client uploads it (an `MLSMessage`).
    pub fn key_package(&self) -> Vec<u8> {
        self.mls.key_package().unwrap()
    }
}

impl Default for KeyMaker {
    fn default() -> Self {
        Self::new()
    }
}

/// Copies a directory tree (a server's data directory, a fixture set), panicking on failure.
/// Copy a server's directory only while it is stopped.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A fresh random message id.
pub fn message_id() -> [u8; 16] {
    rand::random()
}

/// Argon2id parameters fast enough for tests (1 MiB, one pass) for stores the tests create.
pub const FAST_KDF: qpq_core::vault::KdfParams =
    qpq_core::vault::KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };

/// Registers `name` on `server` through the client engine (pinning its fingerprint), with the
/// store `home/account.qpq` sealed by `passphrase`; returns the account's identity key.
pub async fn register_account(
    server: &ServerProcess,
    home: &Path,
    name: &str,
    passphrase: &str,
    password: &str,
) -> [u8; 32] {
    let mut c = qpq_core::client::Client::register(qpq_core::client::RegisterOptions {
        store: home.join("account.qpq"),
        passphrase: passphrase.into(),
        server: server.addr,
        pin: Some(server.fingerprint.clone()),
        username: name.into(),
        password: password.into(),
        invite: String::new(),
        kdf: FAST_KDF,
    })
    .await
    .unwrap_or_else(|e| panic!("registering {name}: {e}"));
    let id = c.identity_key();
    c.disconnect().await;
    id.to_bytes()
}

/// The real `qpq` on the store in `home`, with its secrets in the environment, stdin closed,
/// output captured, and nothing inherited that could point it at another account or server.
pub fn qpq_command(home: &Path, passphrase: &str, password: &str) -> Command {
    let mut c = Command::new(workspace_bin("qpq"));
    c.arg("--home")
        .arg(home)
        .env("QPQ_PASSPHRASE", passphrase)
        .env("QPQ_PASSWORD", password)
        .env_remove("QPQ_HOME")
        .env_remove("QPQ_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// A server and two accounts with real `qpq` stores, `alice` and `bob` (passphrase
/// `<name>-pass`, password `<name>-password`), and a DM between them: alice said "hello bob",
/// and bob has synced it. For the tests that drive the `qpq` binary.
pub struct Pair {
    /// The server.
    pub server: ServerProcess,
    /// Holds everything.
    pub dir: tempfile::TempDir,
    /// alice's home.
    pub alice: PathBuf,
    /// bob's home.
    pub bob: PathBuf,
}

impl Pair {
    /// Starts the server, registers both and sends the first DM.
    pub async fn with_dm() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
        let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
        for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
            let (pass, password) = (format!("{name}-pass"), format!("{name}-password"));
            register_account(&server, home, name, &pass, &password).await;
        }
        for (home, name, args) in
            [(&alice, "alice", &["dm", "bob", "hello bob"][..]), (&bob, "bob", &["sync"][..])]
        {
            let out = qpq_command(home, &format!("{name}-pass"), &format!("{name}-password"))
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        Self { server, dir, alice, bob }
    }
}

impl qpq_core::opaque::flow::Call for Client {
    type Error = CallError;

    async fn call<Req, Resp>(&self, method: u16, req: &Req) -> Result<Resp, CallError>
    where
        Req: Message + Sync,
        Resp: Message + Default,
    {
        Client::call(self, method, req).await
    }
}

impl From<qpq_core::opaque::OpaqueClientError> for CallError {
    fn from(e: qpq_core::opaque::OpaqueClientError) -> Self {
        CallError::Transport(e.to_string())
    }
}

/// Library [`qpq_core::client::Client`]s against a [`ServerProcess`], each account in
/// `dir/<name>/account.qpq`, and what an attacker holding a device has ([`engine::Stolen`]):
/// shared by the engine-level tests (10_client, 19_slot_attacks).
pub mod engine {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use qpq_core::client::{Client, RegisterOptions};
    use qpq_core::identity::Identity;
    use qpq_core::ids::GroupId;
    use qpq_core::mls::Mls;
    use qpq_core::vault::{Space, Vault};

    use super::{FAST_KDF, ServerProcess};

    /// The store of account `name`.
    pub fn store(dir: &Path, name: &str) -> PathBuf {
        dir.join(name).join("account.qpq")
    }

    /// The vault passphrase of account `name`.
    pub fn passphrase(name: &str) -> String {
        format!("{name} passphrase")
    }

    /// Registers `name` (password "`name` password") on `server`.
    pub async fn account(server: &ServerProcess, dir: &Path, name: &str) -> Client {
        account_at(server.addr, &server.fingerprint, dir, name).await
    }

    /// Registers `name` on the server at `addr` with certificate fingerprint `pin`.
    pub async fn account_at(addr: SocketAddr, pin: &str, dir: &Path, name: &str) -> Client {
        Client::register(RegisterOptions {
            store: store(dir, name),
            passphrase: passphrase(name),
            server: addr,
            pin: Some(pin.to_string()),
            username: name.into(),
            password: format!("{name} password"),
            invite: String::new(),
            kdf: FAST_KDF,
        })
        .await
        .unwrap_or_else(|e| panic!("registering {name}: {e}"))
    }

    /// Opens `name`'s store again and connects (a new session of the engine).
    pub async fn reopen(dir: &Path, name: &str) -> Client {
        let mut c = Client::open(&store(dir, name), &passphrase(name)).unwrap();
        c.connect().await.unwrap();
        c
    }

    /// The texts (not system lines) of `conv`'s history, oldest first.
    pub fn texts(c: &Client, conv: &GroupId) -> Vec<String> {
        c.history(conv, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| !e.system)
            .map(|e| e.text)
            .collect()
    }

    /// alice, bob and carol, and the group "team" alice made with the other two in it (all
    /// synced).
    pub async fn team_of_three(
        server: &ServerProcess,
        dir: &Path,
    ) -> (Client, Client, Client, GroupId) {
        let mut alice = account(server, dir, "alice").await;
        let mut bob = account(server, dir, "bob").await;
        let mut carol = account(server, dir, "carol").await;
        let team = alice.create_group("team").await.unwrap();
        alice.add_members(&team, &["bob".into(), "carol".into()]).await.unwrap();
        bob.sync().await.unwrap();
        carol.sync().await.unwrap();
        (alice, bob, carol, team)
    }

    /// What an attacker holding `name`'s device has: its vault (MLS state), its identity, and
    /// a raw protocol connection logged in with its session token. `name`'s `Client` must be
    /// dropped first, and this dropped before it is opened again.
    pub struct Stolen {
        /// The open vault.
        pub vault: Arc<Vault>,
        /// The account's identity.
        pub identity: Identity,
        /// A raw connection resumed with the stored session token.
        pub raw: super::Client,
    }

    impl Stolen {
        /// The account's MLS state, to use as its own client would not.
        pub fn mls(&self) -> Mls {
            Mls::new(self.vault.clone(), Identity::from_seed(&self.identity.seed()))
        }
    }

    /// Opens `name`'s vault and session as an attacker would (see [`Stolen`]).
    pub async fn stolen(server: &ServerProcess, dir: &Path, name: &str) -> Stolen {
        let vault = Arc::new(Vault::open(&store(dir, name), passphrase(name).as_bytes()).unwrap());
        let seed: [u8; 32] =
            vault.get(Space::Account, b"seed").unwrap().unwrap().as_slice().try_into().unwrap();
        let token = vault.get(Space::Account, b"token").unwrap().unwrap().to_vec();
        let raw = server.client().await.unwrap();
        raw.resume(&token).await.unwrap();
        Stolen { vault, identity: Identity::from_seed(&seed), raw }
    }
}
