//! `qpq daemon`: the one process that holds an account open and serves it to every `qpq` of
//! the same user on the account's socket ([`crate::ipc`]).
//!
//! A terminal UI that finds no daemon starts one (`qpq daemon --exit-when-detached`, in its own
//! process group, so a dropped SSH session does not reach it) and attaches; subcommands attach
//! to a running one, so two terminal UIs, a `tail -f` pane and scripts calling `qpq send` share
//! one live state. Run by hand (or by the systemd user unit / procd example in `contrib/`) it
//! stays up without anything attached and keeps receiving.
//!
//! The daemon starts **locked**: it opens the store only when an attached process sends the
//! passphrase over the socket ([`Request::Unlock`]), never from the environment or a file.
//! With `--lock-after`, it closes the store again after that long with nothing attached.
//!
//! Who serves is decided by an exclusive lock on `<home>/qpq.lock`, taken before the socket
//! is bound (so a leftover socket is known to be stale) and held until the process ends; a
//! one-shot `qpq` that runs without a daemon holds it too, and a daemon started meanwhile
//! waits for it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use qpq_core::client::{Client, ClientError, HistoryEntry};
use qpq_core::vault::VaultError;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ipc;
use crate::protocol::{Reply, Request};
use crate::worker::{self, AttachId, Hub, Input, REPLY_QUEUE};

/// How long a daemon started by a terminal UI waits for someone to attach, and stays after
/// the last one detached.
pub const AUTO_GRACE: Duration = Duration::from_secs(3);
/// How long a daemon waits for the serve lock that a one-shot `qpq` holds.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Exit [`AUTO_GRACE`] after the last attached process leaves (a daemon a terminal UI
    /// started).
    pub exit_when_detached: bool,
    /// Close the store after this long with nothing attached (it then receives nothing until
    /// unlocked again).
    pub lock_after: Option<Duration>,
    /// The command run for each new message.
    pub notifier: Option<Notifier>,
    /// Another address for the account's server (as `qpq --server`).
    pub server: Option<std::net::SocketAddr>,
}

/// Runs a command for each new message from someone else: how people extend qpq (a desktop
/// notification, a push to a phone, a log), in place of plugins a static binary cannot load.
///
/// The command runs with `sh -c`, nothing on stdin or stdout, and these variables:
/// `QPQ_CONVERSATION` (`@user` or `#group`), `QPQ_SENDER` (username), `QPQ_KIND` (`message`,
/// `mention` or `file`), and `QPQ_TEXT` (the plaintext) only if the user asked for it
/// (`--notify-text`): by default nothing decrypted leaves qpq.
#[derive(Debug, Clone)]
pub struct Notifier {
    command: String,
    plaintext: bool,
    /// Commands still running: above [`NOTIFY_AT_ONCE`], new messages are not announced (a
    /// catch-up or a flood must not start a process per message).
    running: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The most notify commands running at once.
pub const NOTIFY_AT_ONCE: usize = 4;

impl Notifier {
    /// A notifier running `command`; with `plaintext`, it gets the message text too.
    pub fn new(command: String, plaintext: bool) -> Self {
        Self { command, plaintext, running: Default::default() }
    }

    /// Runs the command for a message (in the background: never waited for).
    pub fn message(&self, conversation: &str, sender: &str, e: &HistoryEntry, mention: bool) {
        use std::sync::atomic::Ordering;
        if self.running.fetch_add(1, Ordering::SeqCst) >= NOTIFY_AT_ONCE {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let kind = if e.file.is_some() {
            "file"
        } else if mention {
            "mention"
        } else {
            "message"
        };
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c")
            .arg(&self.command)
            .env("QPQ_CONVERSATION", conversation)
            .env("QPQ_SENDER", sender)
            .env("QPQ_KIND", kind)
            .env_remove("QPQ_TEXT")
            .env_remove("QPQ_PASSPHRASE")
            .env_remove("QPQ_PASSWORD")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if self.plaintext {
            c.env("QPQ_TEXT", &e.text);
        }
        let running = self.running.clone();
        match c.spawn() {
            // Reaped on a thread of its own, so no zombie is left.
            Ok(mut child) => {
                std::thread::spawn(move || {
                    let _ = child.wait();
                    running.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) => {
                running.fetch_sub(1, Ordering::SeqCst);
                eprintln!("qpq daemon: notify command: {e}");
            }
        }
    }
}

/// The exclusive lock on `<home>/qpq.lock`: whoever holds it serves the account (or uses it
/// in-process). Released when dropped or when the process dies.
#[derive(Debug)]
pub struct ServeLock {
    _file: File,
}

/// Takes the serve lock if it is free.
pub fn try_serve_lock(home: &Path) -> anyhow::Result<Option<ServeLock>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let path = home.join("qpq.lock");
    // Private: another user able to open it could hold the lock and keep every daemon out.
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata()?;
    if meta.uid() != rustix::process::geteuid().as_raw() {
        bail!("{} belongs to another user", path.display());
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    match file.try_lock() {
        Ok(()) => Ok(Some(ServeLock { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
        }
    }
}

/// What the connection tasks tell the daemon's loop.
enum Ctl {
    Attached(AttachId, mpsc::Sender<Reply>),
    Request(AttachId, Request),
    /// A malformed frame: the error to send before the connection closes.
    Refused(AttachId, String),
    Gone(AttachId),
}

/// The running worker: its input, its task, and the flag that tells it to start nothing more.
struct Running {
    input: mpsc::Sender<Input>,
    task: JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

/// Serves the account in `home` until a signal, or (with `exit_when_detached`) until nothing
/// is attached. Returns `Ok` at once if another daemon already serves it and this one was
/// started by a terminal UI.
pub async fn run(
    home: PathBuf,
    opts: Options,
    signals: crate::signals::Signals,
) -> anyhow::Result<()> {
    let store = home.join("account.qpq");
    if !store.exists() {
        bail!("no account in {}; run `qpq register` or `qpq` first", home.display());
    }
    let socket = ipc::socket_path(&home)?;
    let Some(_lock) = wait_for_lock(&home, &socket).await? else {
        if opts.exit_when_detached {
            return Ok(());
        }
        bail!("another qpq daemon already serves {}", home.display());
    };
    let listener = ipc::bind(&socket)?;
    let hub = Hub::default();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Ctl>(256);
    // Each connection's writer holds a clone until it has sent what was queued for it: on the
    // way out, the replies are written before the process ends.
    let (writers_tx, mut writers_rx) = mpsc::channel::<()>(1);
    let mut worker: Option<Running> = None;
    let mut next_id: AttachId = 0;
    // Since when nothing has been attached.
    let mut alone_since = Some(Instant::now());
    let mut stop = signals.clone();
    loop {
        let exit_at = alone_since.filter(|_| opts.exit_when_detached).map(|t| t + AUTO_GRACE);
        let lock_at = alone_since
            .filter(|_| worker.is_some())
            .and_then(|t| opts.lock_after.map(|after| t + after));
        tokio::select! {
            accepted = ipc::accept_checked(&listener) => match accepted {
                Ok(stream) => {
                    next_id += 1;
                    tokio::spawn(connection(stream, next_id, ctl_tx.clone(), writers_tx.clone()));
                }
                // Another user, or an accept error (out of descriptors): keep serving, without
                // spinning on an error that persists.
                Err(e) => {
                    eprintln!("qpq daemon: refused a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(ctl) = ctl_rx.recv() => match ctl {
                Ctl::Attached(id, tx) => {
                    hub.add(id, tx);
                    hub.to(id, Reply::State { locked: worker.is_none() });
                    if let Some(w) = &worker {
                        let _ = w.input.try_send(Input::Attach(id));
                    }
                    alone_since = None;
                }
                Ctl::Refused(id, why) => hub.to(id, Reply::Error(why)),
                Ctl::Gone(id) => {
                    hub.remove(id);
                    if let Some(w) = &worker {
                        let _ = w.input.try_send(Input::Detach(id));
                    }
                    if hub.is_empty() {
                        alone_since = Some(Instant::now());
                    }
                }
                Ctl::Request(id, Request::Unlock { passphrase }) => {
                    if worker.is_none() {
                        match unlock(&store, passphrase, &opts).await {
                            Ok(client) => {
                                let (input, rx) = mpsc::channel(256);
                                let stopping = Arc::new(AtomicBool::new(false));
                                let task = tokio::spawn(worker::run(
                                    client,
                                    rx,
                                    hub.clone(),
                                    opts.notifier.clone(),
                                    stopping.clone(),
                                ));
                                worker = Some(Running { input, task, stopping });
                            }
                            Err(why) => {
                                hub.to(id, Reply::UnlockFailed(why));
                                continue;
                            }
                        }
                    }
                    hub.all(Reply::State { locked: false });
                }
                // Never waited for: a worker busy with a long command must not stall accepting,
                // attaching and stopping. A full queue is answered "busy".
                Ctl::Request(id, request) => match (&worker, request) {
                    (Some(w), Request::Ui(cmd)) => {
                        if w.input.try_send(Input::Ui(id, cmd)).is_err() {
                            let busy = "the qpq daemon is busy; try again".to_string();
                            hub.to(id, Reply::Event(crate::protocol::WorkerEvent::Error(busy)));
                        }
                    }
                    (Some(w), Request::Cli { command, password }) => {
                        let input = Input::Cli(id, Box::new(command), password);
                        if w.input.try_send(input).is_err() {
                            hub.to(id, Reply::Done {
                                error: Some("the qpq daemon is busy; try again".into()),
                                follow: None,
                                after: 0,
                                notes: Vec::new(),
                            });
                        }
                    }
                    (None, Request::Cli { .. }) => hub.to(
                        id,
                        Reply::Done {
                            error: Some("the daemon is locked: unlock it first".into()),
                            follow: None,
                            after: 0,
                            notes: Vec::new(),
                        },
                    ),
                    (None, _) => hub.to(id, Reply::State { locked: true }),
                    (Some(_), Request::Unlock { .. }) => {}
                },
            },
            () = sleep_until(exit_at), if exit_at.is_some() => break,
            () = sleep_until(lock_at), if lock_at.is_some() => {
                if let Some(w) = worker.take() {
                    close(w).await;
                }
                eprintln!("qpq daemon: locked after {:?} with nothing attached", opts.lock_after);
            }
            _ = stop.interrupted() => break,
        }
    }
    // What the worker took off its queue ran and its reply is queued; what it had not taken
    // is answered "did not run" (`worker::NOT_RUN`), and so is, by the error below, every
    // request still on its way to it (those never run either). Only then is anyone told the
    // daemon is stopping. A command cut short after 5 s may have taken effect: then nothing is
    // claimed, and the attached processes see their connection close.
    let finished = match worker.take() {
        Some(w) => close(w).await,
        None => true,
    };
    if finished {
        hub.all(Reply::Error("the qpq daemon is stopping".into()));
    }
    // Requests not taken yet, and connections not attached yet, go with the channel.
    drop(ctl_rx);
    for id in hub.ids() {
        hub.remove(id);
    }
    drop(writers_tx);
    // Every writer ends once it has sent what was queued (a peer that does not read gets 2 s).
    let _ = tokio::time::timeout(Duration::from_secs(2), writers_rx.recv()).await;
    // The lock is still ours: the socket at that path is ours to remove.
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Waits for the serve lock (a one-shot `qpq` may hold it for a moment). `None` if another
/// daemon serves the account already, or the lock stays taken for [`LOCK_WAIT`].
async fn wait_for_lock(home: &Path, socket: &Path) -> anyhow::Result<Option<ServeLock>> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        if let Some(lock) = try_serve_lock(home)? {
            return Ok(Some(lock));
        }
        if ipc::connect(socket).await.ok().flatten().is_some() || Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens the store (the key derivation runs on a blocking thread).
async fn unlock(store: &Path, passphrase: String, opts: &Options) -> Result<Client, String> {
    let path = store.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || Client::open(&path, &passphrase)).await;
    match opened {
        Ok(Ok(mut client)) => {
            if let Some(server) = opts.server {
                client.set_server(server);
            }
            Ok(client)
        }
        Ok(Err(ClientError::Vault(VaultError::WrongPassphrase))) => Err("wrong passphrase".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("opening the store failed: {e}")),
    }
}

/// Stops the worker: the command it runs finishes, the ones queued are answered "did not
/// run", then it closes the connection and drops the client, which closes the store. `false`
/// if it had to be cut short (a command still running after 5 s).
async fn close(mut w: Running) -> bool {
    // Set before the channel closes: the worker tells them apart by this flag.
    w.stopping.store(true, Ordering::SeqCst);
    drop(w.input);
    if tokio::time::timeout(Duration::from_secs(5), &mut w.task).await.is_err() {
        // Dropping the task drops the client, which closes the store all the same.
        eprintln!("qpq daemon: the worker did not stop within 5 s; stopping it");
        w.task.abort();
        let _ = w.task.await;
        return false;
    }
    true
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One attached process: frames in, replies out. A malformed, oversized or foreign frame
/// gets [`Reply::Error`] and the connection is closed; the daemon goes on. `alive` is held
/// by the writer until it ends (see [`run`]).
async fn connection(
    stream: UnixStream,
    id: AttachId,
    ctl: mpsc::Sender<Ctl>,
    alive: mpsc::Sender<()>,
) {
    let (mut rd, mut wr) = stream.into_split();
    // The hub holds the only sender: once it drops this connection (gone, or too slow to
    // read its replies), the writer ends and the socket closes, and the attached `qpq`
    // attaches again.
    let (tx, mut rx) = mpsc::channel::<Reply>(REPLY_QUEUE);
    if ctl.send(Ctl::Attached(id, tx)).await.is_err() {
        return;
    }
    let writer = tokio::spawn(async move {
        let _alive = alive;
        while let Some(r) = rx.recv().await {
            match ipc::write_frame(&mut wr, &r).await {
                Ok(()) => {}
                // Refused before a byte was written: say so and go on.
                Err(e @ ipc::IpcError::TooLarge(_)) => {
                    let note = Reply::Error(format!("a reply was not sent: {e}"));
                    if ipc::write_frame(&mut wr, &note).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    loop {
        match ipc::read_frame::<Request, _>(&mut rd).await {
            Ok(Some(request)) => {
                if ctl.send(Ctl::Request(id, request)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            // Through the daemon's loop, so it follows the state sent on attach.
            Err(e) => {
                let _ = ctl.send(Ctl::Refused(id, format!("closing the connection: {e}"))).await;
                break;
            }
        }
    }
    let _ = ctl.send(Ctl::Gone(id)).await;
    // The writer ends once the hub has dropped its sender too (after `Gone`), having sent
    // what was queued (an error, above).
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}
