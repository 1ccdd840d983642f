//! Cross-compiled servers under qemu-user, and the OpenWrt package installed offline and run.
//!
//! These need the static binaries of `cross/build.sh` (`target/cross/bin/TRIPLE/`) and
//! qemu-user-static, and they run only when `QPQTEST_CROSS=1`, which `cross/ci.sh` sets after
//! building: stale cross binaries must not fail a plain `cargo test --workspace`. Without it they
//! are ignored, with that reason (`build.rs` sets `qpq_no_cross`). With `QPQTEST_CROSS=1`, a
//! missing binary or emulator is a failure. The OpenWrt test also needs root (it chroots into the
//! scratch install; ignored when cargo does not run as root, cfg `qpq_not_root`) and a static
//! busybox (a failure without it; `cross/ci.sh` installs busybox-static).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use qpq_tests::{Client, identity, message_id};

/// Time a server under emulation gets to print its start lines.
const START: Duration = Duration::from_secs(60);
/// Time one protocol exchange may take under emulation.
const EXCHANGE: Duration = Duration::from_secs(120);

/// (Rust target, user-mode emulator or None for native).
const TARGETS: [(&str, Option<&str>); 4] = [
    ("aarch64-unknown-linux-musl", Some("qemu-aarch64-static")),
    ("armv7-unknown-linux-musleabihf", Some("qemu-arm-static")),
    ("armv7-unknown-linux-musleabi", Some("qemu-arm-static")),
    ("x86_64-unknown-linux-musl", None),
];

/// (OpenWrt architecture, Rust target, emulator) of the packages installed and run.
const PACKAGES: [(&str, &str, &str); 2] = [
    ("arm_cortex-a7_neon-vfpv4", "armv7-unknown-linux-musleabihf", "qemu-arm-static"),
    ("aarch64_cortex-a53", "aarch64-unknown-linux-musl", "qemu-aarch64-static"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(qpq_no_cross, ignore = "needs QPQTEST_CROSS=1 and the cross binaries: bash cross/ci.sh")]
async fn cross_servers_serve_a_native_client() {
    for (target, qemu) in TARGETS {
        let bin = cross_dir().join("bin").join(target).join("qpq-server-lite");
        let runner =
            qemu.map(|q| require(which(q), &format!("{q} (apt-get install qemu-user-static)")));
        let bin = require(bin.exists().then_some(bin.clone()), &format!("{}", bin.display()));
        let data = tempfile::tempdir().unwrap();
        let command = |extra: &[&str]| {
            let mut c = match &runner {
                Some(q) => {
                    let mut c = Command::new(q);
                    c.arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            c.arg("--data-dir").arg(data.path()).args(["--registration", "open"]).args(extra);
            c
        };
        println!("{target}: starting under {}", qemu.unwrap_or("no emulator"));
        let mut server = Spawned::start(command(&["--listen", "127.0.0.1:0"])).unwrap();
        let (alice, bob) = bounded(exchange(&server, "", "")).await;
        assert!(server.terminate().success(), "{target}: SIGTERM exit\n{}", server.stderr());

        // Same data, same port: the account and the certificate survive the restart.
        let addr = server.addr.to_string();
        let before = server.fingerprint.clone();
        let mut server = Spawned::start(command(&["--listen", &addr])).unwrap();
        assert_eq!(server.fingerprint, before, "{target}: certificate changed");
        bounded(relogin(&server, &alice, &bob)).await;
        assert!(server.terminate().success(), "{target}: SIGTERM exit\n{}", server.stderr());
        println!("{target}: register, login, send, receive, restart: ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(qpq_no_cross, ignore = "needs QPQTEST_CROSS=1 and the cross binaries: bash cross/ci.sh")]
#[cfg_attr(
    all(not(qpq_no_cross), qpq_not_root),
    ignore = "chroots into the scratch OpenWrt install: run cargo as root"
)]
async fn openwrt_package_installs_and_serves() {
    for (arch, target, qemu) in PACKAGES {
        openwrt_package(arch, target, qemu).await;
    }
}

async fn openwrt_package(arch: &str, target: &str, qemu: &str) {
    let ws = workspace();
    let qemu = require(which(qemu), qemu);
    let bin = cross_dir().join("bin").join(target).join("qpq-server-lite");
    require(bin.exists().then_some(()), &format!("{}", bin.display()));
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");

    // Build the package from the cross binary, then verify and install it as opkg would.
    let out = run(Command::new("bash")
        .arg(ws.join("openwrt/build-ipk.sh"))
        .args(["--arch", arch, "--bin-dir"])
        .arg(cross_dir().join("bin"))
        .arg("--out")
        .arg(tmp.path().join("ipk")));
    let ipk = PathBuf::from(out.trim());
    let out = run(Command::new("bash")
        .arg(ws.join("openwrt/test/install.sh"))
        .arg(&ipk)
        .arg(&root)
        .arg(arch));
    print!("{out}");
    let ids = out.lines().last().unwrap();
    let (uid, gid) = ids
        .strip_prefix("uid=")
        .and_then(|s| s.split_once(" gid="))
        .map(|(u, g)| (u.parse::<u32>().unwrap(), g.parse::<u32>().unwrap()))
        .unwrap();

    // The UCI defaults, except the address: what `uci set qpq.server.listen=127.0.0.1;
    // uci set qpq.server.port=0` would write. Everything else is as shipped.
    let config = root.join("etc/config/qpq");
    edit(&config, "option listen '::'", "option listen '127.0.0.1'");
    edit(&config, "option port '5001'", "option port '0'");

    // The init script, run in the scratch root, turns UCI into procd's instance.
    let procd = Procd::read(&root);
    assert_eq!(procd.first("status"), Some("0"), "start_service failed");
    let command = procd.all("command");
    assert_eq!(command[0], "/usr/bin/qpq-server-lite");
    for pair in [
        ["--data-dir", "/etc/qpq"],
        ["--listen", "127.0.0.1:0"],
        ["--registration", "invite"],
        ["--set", "limits.max_queue_bytes=8388608"],
        ["--set", "limits.blob_quota_bytes=16000000"],
    ] {
        assert!(command.windows(2).any(|w| w == pair), "no {pair:?} in {command:?}");
    }
    assert_eq!(procd.first("user"), Some("qpq"));
    assert_eq!(procd.first("stderr"), Some("1"), "logs must reach logread");
    assert!(procd.lines.iter().any(|l| l[0] == "respawn"));
    assert!(procd.all("env").contains(&"NO_COLOR=1".to_string()));
    assert!(procd.has_trigger(&["config.change", "qpq"]), "no reload trigger");
    assert!(procd.has_trigger(&["mount.add", "/etc/qpq"]), "no mount trigger");
    let data_dir = root.join("etc/qpq");
    assert_eq!(std::fs::metadata(&data_dir).unwrap().uid(), uid, "data dir owner");

    // procd runs the command as the qpq user; here: chroot + qemu with that uid.
    std::fs::copy(&qemu, root.join("usr/bin").join(qemu.file_name().unwrap())).unwrap();
    let qemu_in_root = Path::new("/usr/bin").join(qemu.file_name().unwrap());
    let server_command = |procd: &Procd| {
        let mut c = Command::new("chroot");
        c.arg(format!("--userspec={uid}:{gid}")).arg(&root).arg(&qemu_in_root);
        c.args(procd.all("command"));
        c.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for kv in procd.all("env") {
            let (k, v) = kv.split_once('=').unwrap();
            c.env(k, v);
        }
        c
    };
    let mut server = Spawned::start(server_command(&procd)).unwrap();
    assert!(!server.stderr().contains("\x1b["), "ANSI colours in the log");

    // An invite over SSH, as docs/OPENWRT.md shows it, while the server runs.
    let invite = run(Command::new("chroot").arg(&root).arg(&qemu_in_root).args([
        "/usr/bin/qpq-server-lite",
        "--data-dir",
        "/etc/qpq",
        "invite",
        "create",
        "--uses",
        "2",
    ]));
    let invite = invite.trim().to_string();
    assert!(invite.starts_with("qpq-"), "invite code {invite:?}");
    let (alice, bob) = bounded(exchange(&server, &invite, &invite)).await;
    for f in ["qpq.redb", "server-cert.der", "server-key.der"] {
        let owner = std::fs::metadata(data_dir.join(f)).unwrap().uid();
        assert_eq!(owner, uid, "{f} is owned by {owner}, not the service user");
    }

    // `uci set qpq.limits.max_devices=4; uci add_list qpq.limits.key_package_ciphersuites=61441;
    // /etc/init.d/qpq-server-lite reload`: a new command line, so procd restarts the server.
    edit(&config, "option max_devices '3'", "option max_devices '4'");
    edit(
        &config,
        "option db_cache_bytes '2097152'",
        "option db_cache_bytes '2097152'\n\tlist key_package_ciphersuites '61441'",
    );
    let reloaded = Procd::read(&root);
    let new_command = reloaded.all("command");
    assert_ne!(new_command, command, "reload must change the instance");
    for pair in
        [["--set", "limits.max_devices=4"], ["--set", "limits.key_package_ciphersuites=[61441]"]]
    {
        assert!(new_command.windows(2).any(|w| w == pair), "no {pair:?} in {new_command:?}");
    }
    assert!(server.terminate().success(), "{arch}: SIGTERM exit\n{}", server.stderr());
    let mut server = Spawned::start(server_command(&reloaded)).unwrap();
    bounded(relogin(&server, &alice, &bob)).await;
    assert!(server.terminate().success(), "{arch}: SIGTERM exit\n{}", server.stderr());
    println!("{arch}: package verified, installed, configured from UCI, served, reloaded: ok");
}

/// A registered user: name, identity key.
struct User(&'static str, [u8; 32]);

/// Registers alice and bob (with the given invite codes), logs both in, and passes a message
/// each way through the server.
async fn exchange(server: &Spawned, invite_a: &str, invite_b: &str) -> (User, User) {
    let alice = User("alice", identity());
    let bob = User("bob", identity());
    let a = Client::connect(server.addr, &server.fingerprint).await.unwrap();
    let b = Client::connect(server.addr, &server.fingerprint).await.unwrap();
    a.register(alice.0, "alice-pw", &alice.1, invite_a).await.unwrap();
    b.register(bob.0, "bob-pw", &bob.1, invite_b).await.unwrap();
    a.login(alice.0, "alice-pw", &alice.1).await.unwrap();
    b.login(bob.0, "bob-pw", &bob.1).await.unwrap();
    send_and_receive(&a, &b, &bob.1, b"hello from the native client").await;
    send_and_receive(&b, &a, &alice.1, b"and back").await;
    (alice, bob)
}

/// Logs both users in again and passes one more message.
async fn relogin(server: &Spawned, alice: &User, bob: &User) {
    let a = Client::connect(server.addr, &server.fingerprint).await.unwrap();
    let b = Client::connect(server.addr, &server.fingerprint).await.unwrap();
    a.login(alice.0, "alice-pw", &alice.1).await.unwrap();
    b.login(bob.0, "bob-pw", &bob.1).await.unwrap();
    send_and_receive(&a, &b, &bob.1, b"after the restart").await;
}

async fn send_and_receive(from: &Client, to: &Client, to_id: &[u8; 32], payload: &[u8]) {
    let sent = from.enqueue(to_id, payload, message_id()).await.unwrap();
    let got = to.fetch(0).await.unwrap();
    assert_eq!(got.len(), 1, "one message queued");
    assert_eq!((got[0].seq, got[0].data.as_slice()), (sent.seq, payload));
    assert_eq!(to.ack(sent.seq).await.unwrap(), 1);
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(EXCHANGE, f).await.expect("exchange timed out under emulation")
}

/// A server process whose stdout announces its address and certificate fingerprint.
struct Spawned {
    child: Child,
    addr: SocketAddr,
    fingerprint: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Spawned {
    fn start(mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut addr, mut fingerprint) = (None, None);
        while addr.is_none() || fingerprint.is_none() {
            match rx.recv_timeout(START) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening on ") {
                        addr = Some(a.parse()?);
                    } else if let Some(f) = line.strip_prefix("fingerprint sha256:") {
                        fingerprint = Some(f.to_string());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    anyhow::bail!("server did not start:\n{}", stderr.lock().unwrap());
                }
            }
        }
        Ok(Self { child, addr: addr.unwrap(), fingerprint: fingerprint.unwrap(), stderr })
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM (what procd sends), then the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the init script told (the stand-in for) procd: tab-separated lines.
struct Procd {
    lines: Vec<Vec<String>>,
}

impl Procd {
    fn read(root: &Path) -> Self {
        let out =
            run(Command::new("bash").arg(workspace().join("openwrt/test/service.sh")).arg(root));
        let lines = out.lines().map(|l| l.split('\t').map(String::from).collect()).collect();
        Self { lines }
    }

    fn all(&self, param: &str) -> Vec<String> {
        self.lines.iter().find(|l| l[0] == param).map(|l| l[1..].to_vec()).unwrap_or_default()
    }

    fn first(&self, param: &str) -> Option<&str> {
        self.lines.iter().find(|l| l[0] == param).and_then(|l| l.get(1)).map(String::as_str)
    }

    fn has_trigger(&self, what: &[&str]) -> bool {
        self.lines.iter().any(|l| l[0] == "trigger" && l[1..] == *what)
    }
}

/// `what` is required once the cross tests run.
fn require<T>(found: Option<T>, what: &str) -> T {
    found.unwrap_or_else(|| panic!("{what} is missing; bash cross/ci.sh builds and installs it"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn cross_dir() -> PathBuf {
    std::env::var_os("QPQ_CROSS_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/cross"))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs `cmd`, failing the test with its output unless it succeeds; returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Replaces `from` (which must be there) by `to` in `file`.
fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}
