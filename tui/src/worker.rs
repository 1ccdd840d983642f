//! The network side of the UI, in the process serving the account (`qpq daemon`): owns the
//! [`Client`], runs the [`Command`]s and subcommands of every attached `qpq`, and turns engine
//! events into [`WorkerEvent`]s for all of them ([`Hub`]). No UI ever waits on it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qpq_core::client::net::{Connection, NetError};
use qpq_core::client::{
    Client, ClientError, ConnState, ConvKind, Event, HistoryEntry, TransferProgress,
};
use qpq_core::content::Body;
use qpq_core::content::FileOffer;
use qpq_core::identity::hex;
use qpq_core::ids::{GroupId, IdentityKey};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::app::{Command, InfoView, WorkerEvent};
use crate::config::NotifyLevel;
use crate::protocol::Reply;

/// An attached process, as the serving process numbers them.
pub type AttachId = u64;

/// What the worker is asked to do.
#[derive(Debug)]
pub enum Input {
    /// A process attached (its reply channel is in the [`Hub`]): greet it with the state.
    Attach(AttachId),
    /// It went away.
    Detach(AttachId),
    /// A terminal UI's command.
    Ui(AttachId, Command),
    /// A subcommand (see [`crate::cli::perform`]).
    Cli(AttachId, Box<crate::cli::Command>, Option<String>),
}

/// The attached processes' reply queues. A process that does not keep up (its queue of
/// [`REPLY_QUEUE`] is full) is dropped from the hub rather than waited for: one stuck
/// terminal never stalls the others.
#[derive(Clone, Default)]
pub struct Hub(Arc<Mutex<HashMap<AttachId, mpsc::Sender<Reply>>>>);

/// Replies queued per attached process.
pub const REPLY_QUEUE: usize = 4096;

impl Hub {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<AttachId, mpsc::Sender<Reply>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds an attached process.
    pub fn add(&self, id: AttachId, tx: mpsc::Sender<Reply>) {
        self.map().insert(id, tx);
    }

    /// Removes one.
    pub fn remove(&self, id: AttachId) {
        self.map().remove(&id);
    }

    /// How many are attached.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The attached ids.
    pub fn ids(&self) -> Vec<AttachId> {
        self.map().keys().copied().collect()
    }

    /// Sends to one attached process.
    pub fn to(&self, id: AttachId, r: Reply) {
        let mut map = self.map();
        if let Some(tx) = map.get(&id)
            && tx.try_send(r).is_err()
        {
            map.remove(&id);
        }
    }

    /// Sends to all.
    pub fn all(&self, r: Reply) {
        self.map().retain(|_, tx| tx.try_send(r.clone()).is_ok());
    }
}

/// Where an event goes: the process whose command it answers, or all.
#[derive(Clone, Copy)]
struct Tx<'a> {
    hub: &'a Hub,
    to: Option<AttachId>,
}

impl<'a> Tx<'a> {
    fn send(&self, ev: WorkerEvent) {
        match self.to {
            Some(id) => self.hub.to(id, Reply::Event(ev)),
            None => self.hub.all(Reply::Event(ev)),
        }
    }

    /// The same hub, to everyone.
    fn all(&self) -> Tx<'a> {
        Tx { hub: self.hub, to: None }
    }
}

/// The conversation each attached UI has open.
type OpenSet = HashMap<AttachId, GroupId>;

fn is_open(open: &OpenSet, conv: &GroupId) -> bool {
    open.values().any(|c| c == conv)
}

/// Messages of history loaded when a conversation opens.
pub const HISTORY_PAGE: usize = 500;

/// First wait before reconnecting after the connection drops; it doubles per failed attempt
/// up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between reconnect attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The connection as the worker manages it: the engine never retries on its own here
/// ([`Client::set_auto_reconnect`]`(false)`), so no command waits behind a retry loop.
struct Link {
    /// When the next attempt starts (offline); `None` while online, dialing, or when retrying
    /// is pointless (the session expired, the server's certificate changed).
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    backoff: Duration,
    /// A handshake in flight, in its own task: commands go on meanwhile.
    dialing: Option<JoinHandle<Result<Connection, NetError>>>,
    /// The outage was reported once (its error line); later failures only move the retry time.
    reported: bool,
    /// Retrying cannot help (the session expired, the server's certificate changed): no
    /// attempt until the connection is back by other means (`qpq login`, `qpq trust`).
    halted: bool,
    /// What the UI was last told: (state, outbox, retry time).
    shown: Option<(ConnState, usize, Option<Instant>)>,
}

impl Link {
    fn new() -> Self {
        Self {
            retry_at: Some(Instant::now()),
            backoff: RETRY_FIRST,
            dialing: None,
            reported: false,
            halted: false,
            shown: None,
        }
    }

    fn state(&self, client: &Client) -> ConnState {
        if client.is_online() {
            ConnState::Online
        } else if self.dialing.is_some() {
            ConnState::Reconnecting
        } else {
            ConnState::Offline
        }
    }

    /// The connection was found dead: schedule the first attempt.
    fn lost(&mut self) {
        if self.retry_at.is_none() && self.dialing.is_none() && !self.halted {
            self.backoff = RETRY_FIRST;
            self.retry_at = Some(Instant::now() + RETRY_FIRST);
        }
    }

    /// An attempt failed: wait longer (or as long as a busy server asked).
    fn failed(&mut self, hint: Option<Duration>) {
        let wait = hint.map_or(self.backoff, |h| h.clamp(self.backoff, Duration::from_secs(60)));
        self.retry_at = Some(Instant::now() + wait);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    /// Tells the UI the connection state, the outbox size and the next retry, if changed.
    fn publish(&mut self, client: &Client, tx: &Tx<'_>) {
        let now = (self.state(client), client.outbox_len().unwrap_or(0), self.retry_at);
        if self.shown != Some(now) {
            self.shown = Some(now);
            let (conn, outbox, retry_at) = now;
            let retry_in = retry_at.map(|t| t.saturating_duration_since(Instant::now()));
            tx.send(WorkerEvent::Status { conn, outbox, retry_in });
        }
    }
}

/// Sends one attached process what it needs to draw: who we are, the connection, the
/// conversations and their notification levels.
fn greet(client: &Client, link: &Link, tx: &Tx<'_>) {
    tx.send(WorkerEvent::Identity {
        username: client.username().to_string(),
        server: client.server().to_string(),
        identity: hex(&client.identity_key()[..6]),
    });
    let retry_in = link.retry_at.map(|t| t.saturating_duration_since(Instant::now()));
    let (conn, outbox) = (link.state(client), client.outbox_len().unwrap_or(0));
    tx.send(WorkerEvent::Status { conn, outbox, retry_in });
    if let Ok(list) = client.conversations() {
        for c in &list {
            let key = format!("notify/{}", hex(&c.id));
            let level = match client.setting(&key).ok().flatten().as_deref() {
                Some("all") => NotifyLevel::All,
                Some("mentions") => NotifyLevel::Mentions,
                Some("none") => NotifyLevel::None,
                _ => continue,
            };
            tx.send(WorkerEvent::NotifyLevel { conv: c.id.clone(), level });
        }
        tx.send(WorkerEvent::Conversations(list));
    }
}

/// Runs until the input channel closes; returns after closing the connection (the caller
/// drops the client, which closes the store). Events go to every process in `hub`.
///
/// Once `stopping` is set (before the channel is closed), no request is started any more:
/// the one running finishes and gets its reply, and every one still queued is answered
/// [`refuse`]d, so that no caller is told "stopping" about a request that ran.
pub async fn run(
    mut client: Client,
    mut rx: mpsc::Receiver<Input>,
    hub: Hub,
    notifier: Option<crate::daemon::Notifier>,
    stopping: Arc<AtomicBool>,
) {
    client.set_auto_reconnect(false);
    let mut events = client.subscribe();
    let mut open = OpenSet::new();
    let mut link = Link::new();
    if client.is_online() {
        link.retry_at = None;
    }
    let everyone = Tx { hub: &hub, to: None };
    let (finished_tx, mut finished) = mpsc::unbounded_channel();
    let transfers = Transfers {
        done: finished_tx,
        hub: hub.clone(),
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
        downloading: Arc::default(),
        running: Mutex::default(),
    };
    // Connect and catch up before the first command, so a subcommand sent with the unlock
    // sees the account as it is (one attempt: unreachable, the link retries as usual).
    if !client.is_online() {
        match client.reconnect().await {
            Ok(()) => {
                link.retry_at = None;
                let _ = client.sync().await;
            }
            Err(e) => report_net(&mut link, &client, e, &everyone),
        }
    }
    for id in hub.ids() {
        greet(&client, &link, &Tx { hub: &hub, to: Some(id) });
    }
    loop {
        // Forward what the engine reported since the last turn (never inside the select:
        // an event must not cancel a sync half-way).
        let mut lagged = false;
        loop {
            match events.try_recv() {
                Ok(ev) => forward(&mut client, ev, &open, &everyone, notifier.as_ref()).await,
                Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                Err(_) => break,
            }
        }
        if lagged {
            send_conversations(&client, &everyone);
            for (id, conv) in &open {
                let _ = send_history(&mut client, conv, &Tx { hub: &hub, to: Some(*id) });
            }
        }
        if client.is_online() {
            link.halted = false;
        } else {
            link.lost();
        }
        link.publish(&client, &everyone);
        let online = client.is_online();
        let retry_at = link.retry_at.map(tokio::time::Instant::from_std);
        tokio::select! {
            input = rx.recv() => match input {
                None => break,
                Some(input) if stopping.load(Ordering::SeqCst) => {
                    rx.close();
                    refuse(&hub, input);
                    while let Some(input) = rx.recv().await {
                        refuse(&hub, input);
                    }
                    break;
                }
                Some(Input::Attach(id)) => greet(&client, &link, &Tx { hub: &hub, to: Some(id) }),
                Some(Input::Detach(id)) => {
                    open.remove(&id);
                }
                Some(Input::Ui(_, Command::Quit)) => {}
                Some(Input::Ui(id, cmd)) => {
                    if let Command::Open(conv) = &cmd {
                        open.insert(id, conv.clone());
                    }
                    let tx = Tx { hub: &hub, to: Some(id) };
                    if let Err(e) =
                        run_command(&mut client, cmd, &mut events, &open, &tx, &transfers, notifier.as_ref()).await
                    {
                        let event = match &e {
                            // Loud and blocking: an overlay that must be acknowledged.
                            CommandError::Client(ClientError::KeyChanged { username, .. }) => WorkerEvent::Alert {
                                title: format!("{username}'s key changed"),
                                text: e.to_string(),
                            },
                            CommandError::Client(ClientError::Net(_)) if !client.is_online() => {
                                WorkerEvent::Error(format!("offline: {e}"))
                            }
                            _ => WorkerEvent::Error(e.to_string()),
                        };
                        tx.send(event);
                    }
                }
                Some(Input::Cli(id, command, _)) if command.is_transfer() => {
                    if let Err(e) = transfers.start_cli(&client, id, *command) {
                        let error = Some(format!("{e:#}"));
                        hub.to(id, Reply::Done { error, follow: None, after: 0, notes: Vec::new() });
                    }
                }
                Some(Input::Cli(id, command, password)) => {
                    let (output, notes, result) =
                        crate::cli::perform(&mut client, *command, password).await;
                    if !output.is_empty() {
                        hub.to(id, Reply::Output(output));
                    }
                    let (error, follow, after) = match result {
                        Ok(Some((conv, after))) => (None, Some(conv), after),
                        Ok(None) => (None, None, 0),
                        Err(e) => (Some(format!("{e:#}")), None, 0),
                    };
                    hub.to(id, Reply::Done { error, follow, after, notes });
                }
            },
            // A transfer ended in its own task: offer the upload, tell who asked.
            Some(done) = finished.recv() => finish(&mut client, done, &hub).await,
            // Cancel-safe: a command interrupts the wait, never a sync.
            r = client.wait_for_activity(Duration::from_secs(20)), if online => {
                if let Err(e) = r {
                    report_net(&mut link, &client, e, &everyone);
                }
            }
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if !online && retry_at.is_some() && link.dialing.is_none() =>
            {
                link.retry_at = None;
                match client.dialer() {
                    Ok(dial) => link.dialing = Some(tokio::spawn(dial)),
                    Err(e) => report_net(&mut link, &client, e, &everyone),
                }
            }
            dialed = async {
                match link.dialing.as_mut() {
                    Some(handshake) => handshake.await,
                    None => std::future::pending().await,
                }
            }, if link.dialing.is_some() => {
                link.dialing = None;
                let r = match dialed {
                    Ok(Ok(conn)) => client.resume_on(conn).await,
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(ClientError::Internal("the connecting task failed")),
                };
                match r {
                    Ok(()) => {
                        link.backoff = RETRY_FIRST;
                        if std::mem::take(&mut link.reported) {
                            everyone.send(WorkerEvent::Notice("back online".into()));
                        }
                        send_conversations(&client, &everyone);
                    }
                    Err(e) => report_net(&mut link, &client, e, &everyone),
                }
            }
        }
        if client.is_online()
            && !stopping.load(Ordering::SeqCst)
            && let Err(e) = client.sync().await
        {
            let local = !matches!(e, ClientError::Net(_) | ClientError::NeedLogin);
            report_net(&mut link, &client, e, &everyone);
            // A failure that persists (the disk is full) must not spin the loop: the message
            // stays queued, so the wait above would return at once.
            if local {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    if let Some(dialing) = link.dialing.take() {
        dialing.abort();
    }
    client.disconnect().await;
}

/// What a request that will never run is answered: the daemon is stopping, so it did not run
/// (and running it again elsewhere cannot do it twice).
pub const NOT_RUN: &str = "the qpq daemon is stopping; this request did not run";

/// Answers a request taken off the queue of a stopping worker, unrun.
fn refuse(hub: &Hub, input: Input) {
    match input {
        Input::Cli(id, ..) => hub.to(
            id,
            Reply::Done { error: Some(NOT_RUN.into()), follow: None, after: 0, notes: Vec::new() },
        ),
        // Typing is no request anyone waits for.
        Input::Ui(_, Command::Typing { .. } | Command::Quit | Command::Copy(_)) => {}
        Input::Ui(id, _) => hub.to(id, Reply::Event(WorkerEvent::Error(NOT_RUN.into()))),
        Input::Attach(_) | Input::Detach(_) => {}
    }
}

/// Transfers run in tasks of their own, so that no command waits behind them; each reports
/// back to the worker ([`Finished`]) when it ends. Progress goes to every attached process.
struct Transfers {
    done: mpsc::UnboundedSender<Finished>,
    hub: Hub,
    /// At most [`MAX_TRANSFERS`] run at once (each holds a stream, maybe a connection, and
    /// server memory); the others wait their turn.
    slots: Arc<tokio::sync::Semaphore>,
    /// Downloads running, by directory and blob: a second one of the same file into the same
    /// directory would share its part file.
    downloading: Arc<Mutex<std::collections::HashSet<DownloadKey>>>,
    /// The running tasks, aborted when the worker ends (a locked or stopped daemon transfers
    /// nothing more).
    running: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A download's target: its directory and its blob.
type DownloadKey = (PathBuf, [u8; 32]);

/// Transfers that run at once.
const MAX_TRANSFERS: usize = 2;

impl Drop for Transfers {
    fn drop(&mut self) {
        if let Ok(running) = self.running.lock() {
            for task in running.iter() {
                task.abort();
            }
        }
    }
}

/// A transfer that ended, and who asked for it (a subcommand gets its output and `Done`; a
/// UI a notice).
struct Finished {
    to: Option<AttachId>,
    cli: bool,
    what: Ended,
}

enum Ended {
    Uploaded { conv: GroupId, offer: Result<FileOffer, ClientError> },
    Saved { offered: String, path: Result<PathBuf, ClientError> },
}

impl Transfers {
    fn progress(&self) -> TransferProgress {
        let hub = self.hub.clone();
        Box::new(move |t| hub.all(Reply::Event(transfer(t))))
    }

    /// Runs `task` in a task of its own once a slot is free; what it returns goes back to the
    /// worker.
    fn spawn(&self, task: impl Future<Output = Finished> + Send + 'static) {
        let (slots, done) = (self.slots.clone(), self.done.clone());
        let handle = tokio::spawn(async move {
            let _slot = slots.acquire_owned().await;
            let _ = done.send(task.await);
        });
        if let Ok(mut running) = self.running.lock() {
            running.retain(|t| !t.is_finished());
            running.push(handle.abort_handle());
        }
    }

    fn upload(
        &self,
        client: &Client,
        to: Option<AttachId>,
        cli: bool,
        conv: GroupId,
        path: &std::path::Path,
    ) -> Result<(), CommandError> {
        let upload = client.uploader(path, self.progress())?;
        self.spawn(async move {
            let offer = upload.await;
            Finished { to, cli, what: Ended::Uploaded { conv, offer } }
        });
        Ok(())
    }

    fn download(
        &self,
        client: &Client,
        to: Option<AttachId>,
        cli: bool,
        offer: &FileOffer,
        dir: &std::path::Path,
    ) -> Result<(), CommandError> {
        let key = (dir.to_path_buf(), offer.blob_id);
        let fresh = self.downloading.lock().is_ok_and(|mut d| d.insert(key.clone()));
        if !fresh {
            return Err(CommandError::Refused(format!(
                "{} is already being downloaded into {}",
                offer.name,
                crate::downloads::printable(&dir.display().to_string())
            )));
        }
        let download = match client.downloader(offer, dir, self.progress()) {
            Ok(d) => d,
            Err(e) => {
                if let Ok(mut d) = self.downloading.lock() {
                    d.remove(&key);
                }
                return Err(e.into());
            }
        };
        let (downloading, offered) = (self.downloading.clone(), offer.name.clone());
        self.spawn(async move {
            let path = download.await;
            if let Ok(mut d) = downloading.lock() {
                d.remove(&key);
            }
            Finished { to, cli, what: Ended::Saved { offered, path } }
        });
        Ok(())
    }

    /// Starts a subcommand's transfer (`send-file`, `download`); its caller gets the output
    /// and `Done` when it ends.
    fn start_cli(
        &self,
        client: &Client,
        id: AttachId,
        command: crate::cli::Command,
    ) -> anyhow::Result<()> {
        use crate::cli::Command as Cli;
        match command {
            Cli::SendFile { conversation, path } => {
                if !path.is_absolute() {
                    anyhow::bail!("not an absolute path: {}", path.display());
                }
                let conv = client.find_conversation(&conversation)?.id;
                self.upload(client, Some(id), true, conv, &path)?;
            }
            Cli::Download { conversation, name, dir } => {
                let offer = crate::cli::find_offer(client, &conversation, name.as_deref())?;
                let dir = dir.unwrap_or_else(crate::downloads::default_dir);
                if !dir.is_absolute() {
                    anyhow::bail!("not an absolute path: {}", dir.display());
                }
                self.download(client, Some(id), true, &offer, &dir)?;
            }
            _ => anyhow::bail!("not a transfer"),
        }
        Ok(())
    }
}

/// A transfer ended: an upload is offered in its conversation (a message like any other);
/// whoever asked hears how it went.
async fn finish(client: &mut Client, done: Finished, hub: &Hub) {
    let result = match done.what {
        Ended::Uploaded { conv, offer: Ok(offer) } => {
            match client.offer_file(&conv, &offer).await {
                Ok(()) => Ok(crate::cli::sent(&offer)),
                Err(e) => Err(format!("uploaded, but offering it failed: {e}")),
            }
        }
        Ended::Uploaded { offer: Err(e), .. } => Err(format!("upload failed: {e}")),
        Ended::Saved { offered, path: Ok(path) } => Ok(crate::cli::saved(&path, &offered)),
        Ended::Saved { path: Err(e), .. } => Err(format!("download failed: {e}")),
    };
    let Some(to) = done.to else { return };
    if done.cli {
        let error = match result {
            Ok(text) => {
                hub.to(to, Reply::Output(text + "\n"));
                None
            }
            Err(e) => Some(e),
        };
        hub.to(to, Reply::Done { error, follow: None, after: 0, notes: Vec::new() });
    } else {
        hub.to(
            to,
            Reply::Event(match result {
                Ok(text) => WorkerEvent::Notice(text),
                Err(e) => WorkerEvent::Error(e),
            }),
        );
    }
}

/// Why a command from a UI failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    /// The client failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The command can't be carried out as given (a bad argument): nothing was done.
    #[error("{0}")]
    Refused(String),
}

/// Runs one command while forwarding, as they happen, the events that need no access to the
/// client: transfer progress and our own new messages (shown at once, marked pending). The
/// rest is forwarded after the command.
async fn run_command(
    client: &mut Client,
    cmd: Command,
    events: &mut broadcast::Receiver<Event>,
    open: &OpenSet,
    tx: &Tx<'_>,
    transfers: &Transfers,
    notifier: Option<&crate::daemon::Notifier>,
) -> Result<(), CommandError> {
    let (me, username) = (client.identity_key(), client.username().to_string());
    let mut held = Vec::new();
    let mut own_message = false;
    let result = {
        let fut = handle(client, cmd, tx, transfers);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => break r,
                ev = events.recv() => match ev {
                    Ok(Event::Transfer(t)) => {
                        tx.all().send(transfer(t));
                    }
                    Ok(Event::Message { conv, entry }) if *entry.sender == *me => {
                        own_message = true;
                        let incoming = WorkerEvent::Incoming {
                            conv,
                            entry,
                            sender: username.clone(),
                            mention: false,
                        };
                        tx.all().send(incoming);
                    }
                    Ok(other) => held.push(other),
                    // Too many at once: the caller's next turn reloads.
                    Err(_) => {}
                }
            }
        }
    };
    for ev in held {
        forward(client, ev, open, &tx.all(), notifier).await;
    }
    if own_message {
        send_conversations(client, tx);
    }
    result
}

fn transfer(t: qpq_core::client::Transfer) -> WorkerEvent {
    WorkerEvent::Transfer { name: t.name, done: t.done, total: t.total, upload: t.upload }
}

/// A network failure: the connection may be gone (then a reconnect is scheduled). The first
/// failure of an outage is shown; later ones only move the retry time in the status bar.
fn report_net(link: &mut Link, client: &Client, e: ClientError, tx: &Tx<'_>) {
    let text = match &e {
        ClientError::NeedLogin => {
            link.retry_at = None;
            link.halted = true;
            Some("session expired: quit and run `qpq login`".to_string())
        }
        ClientError::Net(NetError::CertificateChanged { .. }) | ClientError::PinMissing => {
            link.retry_at = None;
            link.halted = true;
            Some(e.to_string())
        }
        ClientError::Net(n) if !client.is_online() => {
            if link.dialing.is_none() {
                link.failed(n.retry_after());
            }
            (!std::mem::replace(&mut link.reported, true)).then(|| format!("offline: {e}"))
        }
        _ => Some(e.to_string()),
    };
    if let Some(text) = text {
        tx.send(WorkerEvent::Error(text));
    }
    link.publish(client, tx);
}

fn send_conversations(client: &Client, tx: &Tx<'_>) {
    if let Ok(list) = client.conversations() {
        tx.all().send(WorkerEvent::Conversations(list));
    }
}

/// The most a page of history may take once encoded for the socket (half a frame): peers
/// choose the text, and 500 long entries of control characters (six bytes each in JSON) would
/// not fit in one.
const HISTORY_PAGE_BYTES: usize = crate::ipc::MAX_FRAME / 2;

/// Keeps the newest entries that fit in [`HISTORY_PAGE_BYTES`] once encoded.
fn fit_page(mut entries: Vec<HistoryEntry>) -> Vec<HistoryEntry> {
    let mut total = 0;
    let mut keep = 0;
    for e in entries.iter().rev() {
        total += serde_json::to_vec(e).map_or(usize::MAX / 2, |v| v.len());
        if total > HISTORY_PAGE_BYTES {
            break;
        }
        keep += 1;
    }
    entries.drain(..entries.len() - keep);
    entries
}

fn send_history(client: &mut Client, conv: &GroupId, tx: &Tx<'_>) -> Result<(), ClientError> {
    let entries = fit_page(client.history(conv, HISTORY_PAGE)?);
    let mut names = Vec::new();
    for e in &entries {
        if let Some(n) = client.cached_name(&e.sender) {
            names.push((e.sender.clone(), n));
        }
    }
    tx.send(WorkerEvent::History { conv: conv.clone(), entries, names });
    Ok(())
}

async fn send_members(client: &mut Client, conv: &GroupId, tx: &Tx<'_>) {
    if client.conversation(conv).ok().flatten().is_none_or(|c| c.kind != ConvKind::Group) {
        return;
    }
    if let Ok(info) = client.group_info(conv).await {
        let members =
            info.members.into_iter().map(|(id, name, admin)| (name, admin, id.to_vec())).collect();
        tx.all().send(WorkerEvent::Members { conv: conv.clone(), members });
    }
}

async fn forward(
    client: &mut Client,
    ev: Event,
    open: &OpenSet,
    tx: &Tx<'_>,
    notifier: Option<&crate::daemon::Notifier>,
) {
    match ev {
        Event::Message { conv, entry } => {
            let sender = match <[u8; 32]>::try_from(entry.sender.as_slice()) {
                Ok(id) => client.name_of(&IdentityKey::from(id)).await,
                Err(_) => String::new(),
            };
            let mention = entry.mentions(client.username());
            if is_open(open, &conv) {
                let _ = client.mark_read(&conv);
            }
            // Not for a conversation muted with `/notify none`.
            let muted = || {
                client.setting(&format!("notify/{}", hex(&conv))).ok().flatten().as_deref()
                    == Some("none")
            };
            if let Some(n) = notifier
                && *entry.sender != *client.identity_key()
                && !entry.system
                && !muted()
                && let Ok(Some(c)) = client.conversation(&conv)
            {
                let label = client.conversation_label(&c).unwrap_or_else(|_| c.name.clone());
                n.message(&label, &sender, &entry, mention);
            }
            tx.send(WorkerEvent::Incoming { conv, entry, sender, mention });
            send_conversations(client, tx);
        }
        // Only the entry that changed, not a reload of the page.
        Event::Updated { conv, message_id } if is_open(open, &conv) => {
            if let Ok(Some((in_conv, entry))) = client.entry(&message_id)
                && in_conv == conv
            {
                tx.send(WorkerEvent::Changed { conv, entry });
            }
        }
        Event::Typing { conv, who, active } => {
            let name = client.name_of(&who).await;
            tx.send(WorkerEvent::Typing { conv, who: name, active });
        }
        Event::Conversation { conv } => {
            send_conversations(client, tx);
            if is_open(open, &conv) {
                send_members(client, &conv, tx).await;
            }
        }
        Event::Transfer(t) => {
            tx.send(transfer(t));
        }
        Event::Rejected { reason } => {
            tx.send(WorkerEvent::Error(format!("rejected a message: {reason}")));
        }
        Event::Gap { after, next } => {
            tx.send(WorkerEvent::Error(format!(
                "messages {}..{} expired on the server before arriving",
                after + 1,
                next - 1
            )));
        }
        _ => {}
    }
}

async fn handle(
    client: &mut Client,
    cmd: Command,
    tx: &Tx<'_>,
    transfers: &Transfers,
) -> Result<(), CommandError> {
    match cmd {
        Command::Open(conv) => {
            send_history(client, &conv, tx)?;
            let last = client.mark_read(&conv)?;
            send_conversations(client, tx);
            send_members(client, &conv, tx).await;
            if let Some(up_to) = last {
                // A read receipt; failures (offline) are not worth an error line.
                let _ = client.send(&conv, Body::Receipt { up_to }).await;
            }
        }
        Command::Older { conv, before } => {
            let entries = fit_page(client.history_before(&conv, before, HISTORY_PAGE)?);
            let names = entries
                .iter()
                .filter_map(|e| client.cached_name(&e.sender).map(|n| (e.sender.clone(), n)))
                .collect();
            tx.send(WorkerEvent::Older { conv, entries, names });
        }
        // The engine's events carry the new entry (pending, then delivered).
        Command::Send { conv, text, reply_to } => {
            client.send(&conv, Body::Text { body: text, reply_to }).await?;
        }
        Command::Typing { conv, active } => {
            let _ = client.send_typing(&conv, active).await;
        }
        Command::Dm(user) => {
            let conv = client.dm(&user).await?;
            send_conversations(client, tx);
            tx.send(WorkerEvent::Notice(format!("DM with {user} ready")));
            send_history(client, &conv, tx)?;
        }
        Command::CreateGroup(name) => {
            if let Some(why) = crate::cli::personal_name(client, &name)? {
                return Err(CommandError::Refused(why));
            }
            client.create_group(&name).await?;
            send_conversations(client, tx);
            tx.send(WorkerEvent::Notice(format!("created #{name}; /invite people")));
        }
        Command::Add { conv, users } => {
            client.add_members(&conv, &users).await?;
            send_members(client, &conv, tx).await;
            send_history(client, &conv, tx)?;
        }
        Command::Remove { conv, user } => {
            client.remove_member(&conv, &user).await?;
            send_members(client, &conv, tx).await;
            send_history(client, &conv, tx)?;
        }
        Command::SetAdmin { conv, user, admin } => {
            client.set_admin(&conv, &user, admin).await?;
            send_members(client, &conv, tx).await;
            send_history(client, &conv, tx)?;
        }
        Command::Rename { conv, name, topic } => {
            // `/topic` keeps the name it has; only a new name is checked.
            let current = client.conversation(&conv)?.map(|c| c.name);
            if current.as_deref() != Some(name.as_str())
                && let Some(why) = crate::cli::personal_name(client, &name)?
            {
                return Err(CommandError::Refused(why));
            }
            client.rename(&conv, &name, topic.as_deref()).await?;
            send_conversations(client, tx);
        }
        Command::Leave(conv) => {
            client.leave(&conv).await?;
            send_conversations(client, tx);
            tx.send(WorkerEvent::Notice("left the group".into()));
        }
        Command::Rotate(conv) => {
            client.rotate_keys(&conv).await?;
            tx.send(WorkerEvent::Notice("keys rotated".into()));
        }
        Command::Info(conv) => {
            let info = client.group_info(&conv).await?;
            let view = InfoView {
                name: info.conversation.name,
                topic: info.conversation.topic,
                epoch: info.epoch,
                code: info.verification_code,
                members: info.members.into_iter().map(|(_, n, a)| (n, a)).collect(),
            };
            tx.send(WorkerEvent::Info(view));
        }
        Command::Verify(user) => {
            let number = client.safety_number(&user).await?;
            let verified = client.contact(&user)?.is_some_and(|c| c.verified);
            tx.send(WorkerEvent::Safety { user, number, verified });
        }
        Command::MarkVerified { user, verified } => {
            client.mark_verified(&user, verified)?;
            let what = if verified { "marked verified ✓" } else { "no longer marked verified" };
            tx.send(WorkerEvent::Notice(format!("{user}: {what}")));
            send_conversations(client, tx);
        }
        Command::SendFile { conv, path } => {
            // The daemon's working directory is not the terminal's: the UI sends it absolute.
            if !path.is_absolute() {
                return Err(CommandError::Refused(format!(
                    "not an absolute path: {}",
                    path.display()
                )));
            }
            // In a task of its own: other commands go on meanwhile.
            transfers.upload(client, tx.to, false, conv, &path)?;
        }
        Command::Download { conv, message_id, dir } => {
            let entry = client
                .history(&conv, usize::MAX)?
                .into_iter()
                .find(|e| e.message_id == message_id)
                .ok_or_else(|| CommandError::Refused("no such message".into()))?;
            let offer = Client::offer_of(&entry)
                .ok_or_else(|| CommandError::Refused("not a file".into()))?;
            let dir = dir.unwrap_or_else(crate::downloads::default_dir);
            if !dir.is_absolute() {
                return Err(CommandError::Refused(format!(
                    "not an absolute path: {}",
                    dir.display()
                )));
            }
            transfers.download(client, tx.to, false, &offer, &dir)?;
        }
        Command::React { conv, target, emoji } => {
            client.send(&conv, Body::Reaction { target, emoji, remove: false }).await?;
        }
        Command::Edit { conv, target, text } => {
            client.send(&conv, Body::Edit { target, body: text }).await?;
        }
        Command::Delete { conv, target } => {
            client.send(&conv, Body::Delete { target }).await?;
        }
        Command::Notify { conv, level } => {
            let v = match level {
                NotifyLevel::All => "all",
                NotifyLevel::Mentions => "mentions",
                NotifyLevel::None => "none",
            };
            client.set_setting(&format!("notify/{}", hex(&conv)), v)?;
            tx.send(WorkerEvent::Notice(format!("notifications: {v}")));
        }
        Command::Copy(_) | Command::Quit => {}
    }
    Ok(())
}
