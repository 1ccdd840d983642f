//! [`Client`]: account, connection, messaging, groups and transfers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qpq_proto::{Status, method, v1};
use rand::{Rng, RngCore};
use tokio::sync::{broadcast, mpsc};

use super::files::{self, FileCryptoError};
use super::history::{ConvKind, Conversation, HistoryEntry, conv_prefix, message_key};
use super::net::{Connection, NetError, Push};
use crate::content::{Body, Content, ContentError, FileOffer};
use crate::identity::{Identity, hex, safety_number};
use crate::keypackage::{self, ClearHeader};
use crate::mls::{GroupError, Incoming, Kind, Mls, Outgoing};
use crate::opaque;
use crate::vault::{KdfParams, Space, Vault, VaultError};

/// KeyPackages the client keeps on the server.
const KEY_PACKAGE_TARGET: u32 = 10;
/// Blob chunk size for uploads and downloads (well below the frame cap).
const CHUNK: usize = 1 << 20;
/// Reconnect attempts before an operation gives up.
const RECONNECT_ATTEMPTS: u32 = 5;

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The network or the server said no.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The local store failed (or the passphrase is wrong).
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// MLS refused.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A message did not decode.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// File encryption or I/O failed.
    #[error(transparent)]
    File(#[from] FileCryptoError),
    /// OPAQUE failed (wrong password, or not the server we registered with).
    #[error(transparent)]
    Opaque(#[from] opaque::OpaqueClientError),
    /// The session expired: log in with the password again.
    #[error("not logged in (session expired or revoked): run `qpq login`")]
    NeedLogin,
    /// No such user on the server.
    #[error("no user named {0:?}")]
    UnknownUser(String),
    /// No conversation matches.
    #[error("no conversation {0:?}")]
    UnknownConversation(String),
    /// A bare name that more than one conversation has: the user must say which.
    #[error(
        "{name:?} could mean {}: say which, with @{} for the direct conversation or #{} for \
         a group (or the group's id, as listed)",
        matches.join(", "),
        name.escape_debug(),
        name.escape_debug()
    )]
    AmbiguousConversation {
        /// What was asked for.
        name: String,
        /// The conversations it matches, as `@name` / `#name (id …)`.
        matches: Vec<String>,
    },
    /// The store of a registered account has no pinned server certificate. Registration
    /// always stores one, so the entry was deleted outside qpq; trusting whatever certificate
    /// answers now would hand the account to whoever answers.
    #[error(
        "the store has no pinned server certificate: it was modified outside qpq. Nothing was \
         sent. Restore the store from a backup, or move it aside and register again (if \
         registration was interrupted, that is all it takes)"
    )]
    PinMissing,
    /// The user has no KeyPackage left on the server.
    #[error("{0} has no KeyPackages left on the server; they need to come online")]
    NoKeyPackage(String),
    /// The server maps a username to another account key than the one remembered for it
    /// (trust on first use). Nothing was sent; the user has to look into it.
    #[error(
        "WARNING: the server now says {username} is account {presented}, but you have known \
         {username} as account {pinned}. Someone may be impersonating {username} (or they \
         registered again). Nothing was sent. Compare safety numbers with {username} in person \
         or on a call, then accept the new key with `qpq trust {username}`."
    )]
    KeyChanged {
        /// The username.
        username: String,
        /// The key remembered for it (hex).
        pinned: String,
        /// The key the server gives now (hex).
        presented: String,
    },
    /// Something local is inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// Local file I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Connection state, as events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConnState {
    /// Connected and authenticated.
    Online,
    /// Trying to reconnect.
    Reconnecting,
    /// Not connected.
    Offline,
}

/// A file transfer's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// File name.
    pub name: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// Upload (true) or download.
    pub upload: bool,
}

/// What the engine tells its UI.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // short-lived, and boxing would cost an allocation per message
#[non_exhaustive]
pub enum Event {
    /// A new history entry (message, file offer, system line).
    Message {
        /// Conversation id.
        conv: Vec<u8>,
        /// The entry.
        entry: HistoryEntry,
    },
    /// An existing entry changed (edit, delete, reaction, receipt).
    Updated {
        /// Conversation id.
        conv: Vec<u8>,
        /// The entry's message id.
        message_id: [u8; 16],
    },
    /// Someone started or stopped typing.
    Typing {
        /// Conversation id.
        conv: Vec<u8>,
        /// Who.
        who: [u8; 32],
        /// Started (true) or stopped.
        active: bool,
    },
    /// We joined, a conversation was renamed, or membership changed.
    Conversation {
        /// Conversation id.
        conv: Vec<u8>,
    },
    /// Transfer progress.
    Transfer(Transfer),
    /// Connection state changed.
    Connection(ConnState),
    /// A message was rejected (tampered, unauthorized commit, undecryptable).
    Rejected {
        /// Why.
        reason: String,
    },
    /// A member proposed a change (e.g. leaving) that waits for an admin's commit.
    Proposal {
        /// Conversation id.
        conv: Vec<u8>,
    },
    /// Gap in a queue's seq numbers: messages expired on the server before we fetched them.
    Gap {
        /// Last seq seen.
        after: u64,
        /// Next seq received.
        next: u64,
    },
}

/// Group details for an info view.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    /// The conversation.
    pub conversation: Conversation,
    /// Members: identity, username (if known), admin.
    pub members: Vec<([u8; 32], String, bool)>,
    /// MLS epoch.
    pub epoch: u64,
    /// Verification code (same for every member in this epoch).
    pub verification_code: String,
}

/// Everything `register` needs.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// The account's store file (created).
    pub store: PathBuf,
    /// Passphrase for the store.
    pub passphrase: String,
    /// Server address.
    pub server: SocketAddr,
    /// Pinned server certificate fingerprint; `None` trusts the first one seen and pins it.
    pub pin: Option<String>,
    /// Username.
    pub username: String,
    /// Password (never leaves this process: OPAQUE).
    pub password: String,
    /// Invite code, if the server needs one.
    pub invite: String,
    /// KDF parameters for the store.
    pub kdf: KdfParams,
}

/// One account's client engine.
pub struct Client {
    vault: Arc<Vault>,
    mls: Mls,
    username: String,
    server: SocketAddr,
    pin: Option<String>,
    conn: Option<Connection>,
    push_tx: mpsc::Sender<Push>,
    push_rx: mpsc::Receiver<Push>,
    events: broadcast::Sender<Event>,
    names: HashMap<[u8; 32], String>,
    last_seq: u64,
    progress: Option<ProgressHook>,
    idle_timeout: Duration,
    /// Whether a call made while offline reconnects (with retries) first. A UI turns it off
    /// and reconnects on its own schedule, so no command waits behind a retry loop.
    auto_reconnect: bool,
    pending_pushes: Vec<Push>,
    /// Look at every group's current slot at the next sync (set at start and by a gap).
    probe_slots: bool,
    /// Slots resolved during the current sync: the probe does not read them again (nor
    /// report their junk twice).
    resolved: std::collections::HashSet<[u8; 16]>,
    /// Resolving a slot queued something (messages sent again, a change redone): the sync
    /// that did it delivers it.
    queued_by_resolution: std::sync::atomic::AtomicBool,
}

/// Called after every uploaded or downloaded chunk with (bytes done, bytes in all).
pub type ProgressHook = Box<dyn FnMut(u64, u64) + Send + Sync>;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(v).map_err(|e| ClientError::Invalid(e.to_string()))
}

fn unjson<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(b).map_err(|e| ClientError::Invalid(format!("stored record: {e}")))
}

fn key32(b: &[u8]) -> Result<[u8; 32], ClientError> {
    b.try_into().map_err(|_| ClientError::Invalid("identity key is not 32 bytes".into()))
}

impl Client {
    /// Creates the store, registers with OPAQUE, logs in and uploads KeyPackages.
    pub async fn register(o: RegisterOptions) -> Result<Self, ClientError> {
        if let Some(dir) = o.store.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let vault = Arc::new(Vault::create(&o.store, o.passphrase.as_bytes(), o.kdf)?);
        let identity = Identity::generate();
        let seed = identity.seed();
        let mut client =
            Self::assemble(vault, identity, o.username.clone(), o.server, o.pin.clone());
        let mut registered = false;
        let result = async {
            // Without a pin given, the certificate of this first connection is the account's
            // pin (trust on first use, here and nowhere else). The identity, the server and
            // the pin land in one transaction: no store of this account ever lacks its pin,
            // so a missing one later means the store was edited (`ClientError::PinMissing`).
            if client.pin.is_none() {
                let conn = Connection::connect(
                    client.server,
                    "localhost",
                    None,
                    client.push_tx.clone(),
                    client.idle_timeout,
                )
                .await?;
                client.pin = Some(conn.fingerprint.clone());
                client.conn = Some(conn);
            }
            let pin = client.pin.clone().ok_or(ClientError::PinMissing)?;
            client.vault.atomic(|| -> Result<(), VaultError> {
                client.vault.put(Space::Account, b"seed", seed.as_slice())?;
                client.vault.put(Space::Account, b"username", o.username.as_bytes())?;
                client.vault.put(Space::Account, b"server", o.server.to_string().as_bytes())?;
                client.vault.put(Space::Account, b"pin", pin.as_bytes())
            })?;
            if client.conn.is_none() {
                client.dial().await?;
            }
            let conn = Calls(client.connection()?);
            let identity = client.identity_key();
            opaque::flow::register(&conn, &o.username, &o.password, &identity, &o.invite).await?;
            registered = true;
            client.login(&o.password).await
        }
        .await;
        match result {
            Ok(()) => Ok(client),
            // The account exists on the server: keep the store (its identity key is the
            // account's), so `qpq login` can finish the job later.
            Err(e) if registered => Err(e),
            Err(e) => {
                // Nothing was created on the server: leave no store that claims an account.
                drop(client);
                let _ = std::fs::remove_file(&o.store);
                let _ = std::fs::remove_file(crate::vault::anchor_path(&o.store));
                Err(e)
            }
        }
    }

    /// Unlocks an existing store. No network.
    ///
    /// Refuses a store that was rolled back or edited outside qpq: an older copy put back
    /// ([`VaultError::RolledBack`] and its siblings), or an account without its pinned server
    /// certificate ([`ClientError::PinMissing`]).
    pub fn open(store: &Path, passphrase: &str) -> Result<Self, ClientError> {
        let vault = Arc::new(Vault::open(store, passphrase.as_bytes())?);
        let seed = vault
            .get(Space::Account, b"seed")?
            .ok_or(ClientError::Invalid("store has no identity".into()))?;
        let seed: [u8; 32] =
            seed.as_slice().try_into().map_err(|_| ClientError::Invalid("bad identity".into()))?;
        let username =
            String::from_utf8_lossy(&vault.get(Space::Account, b"username")?.unwrap_or_default())
                .into_owned();
        let server =
            String::from_utf8_lossy(&vault.get(Space::Account, b"server")?.unwrap_or_default())
                .parse()
                .map_err(|_| ClientError::Invalid("store has no server address".into()))?;
        let pin = vault
            .get(Space::Account, b"pin")?
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .ok_or(ClientError::PinMissing)?;
        let mut c = Self::assemble(vault, Identity::from_seed(&seed), username, server, Some(pin));
        c.last_seq = c.state_u64(b"last_seq")?;
        Ok(c)
    }

    pub(crate) fn assemble(
        vault: Arc<Vault>,
        identity: Identity,
        username: String,
        server: SocketAddr,
        pin: Option<String>,
    ) -> Self {
        let (push_tx, push_rx) = mpsc::channel(256);
        let (events, _) = broadcast::channel(1024);
        Self {
            mls: Mls::new(vault.clone(), identity),
            vault,
            username,
            server,
            pin,
            conn: None,
            push_tx,
            push_rx,
            events,
            names: HashMap::new(),
            last_seq: 0,
            probe_slots: true,
            resolved: Default::default(),
            queued_by_resolution: std::sync::atomic::AtomicBool::new(false),
            progress: None,
            idle_timeout: super::net::IDLE_TIMEOUT,
            auto_reconnect: true,
            pending_pushes: Vec::new(),
        }
    }

    /// How long a silent connection lives before it is declared dead (default
    /// [`IDLE_TIMEOUT`](super::net::IDLE_TIMEOUT)). Applies from the next connection on.
    pub fn set_idle_timeout(&mut self, t: Duration) {
        self.idle_timeout = t.max(Duration::from_millis(300));
    }

    /// With `false`, a call made while offline fails at once with a connection error instead
    /// of reconnecting (up to 5 attempts with backoff) first; the caller reconnects with
    /// [`Client::reconnect`] when it chooses. Default `true` (one-shot commands).
    pub fn set_auto_reconnect(&mut self, on: bool) {
        self.auto_reconnect = on;
    }

    /// Sets a function called synchronously after each transferred chunk (the event stream
    /// reports the same progress asynchronously).
    pub fn set_progress_hook(&mut self, hook: Option<ProgressHook>) {
        self.progress = hook;
    }

    fn progress(&mut self, t: Transfer) {
        if let Some(hook) = self.progress.as_mut() {
            hook(t.done, t.total);
        }
        self.emit(Event::Transfer(t));
    }

    /// Our username.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Our identity key.
    pub fn identity_key(&self) -> [u8; 32] {
        self.mls.identity_key()
    }

    /// The server address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Uses another address for the account's server from now on in this process (it moved,
    /// or a test restarted it on another port). Not stored; the pinned certificate still has
    /// to match.
    pub fn set_server(&mut self, addr: SocketAddr) {
        if addr != self.server {
            self.server = addr;
            self.conn = None;
        }
    }

    /// The pinned certificate fingerprint.
    pub fn pinned_fingerprint(&self) -> Option<&str> {
        self.pin.as_deref()
    }

    /// Event stream.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether a live connection exists.
    pub fn is_online(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.is_closed())
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn connection(&self) -> Result<&Connection, ClientError> {
        self.conn.as_ref().ok_or(ClientError::Net(NetError::Connection("not connected".into())))
    }

    /// Opens the QUIC connection to the pinned certificate. No login. Never pins: only
    /// registration trusts a first certificate, so without a pin this is
    /// [`ClientError::PinMissing`] before any packet is sent.
    async fn dial(&mut self) -> Result<(), ClientError> {
        if let Some(old) = self.conn.take() {
            old.close().await;
        }
        let pin = self.pin.clone().ok_or(ClientError::PinMissing)?;
        let conn = Connection::connect(
            self.server,
            "localhost",
            Some(pin.as_str()),
            self.push_tx.clone(),
            self.idle_timeout,
        )
        .await?;
        self.conn = Some(conn);
        Ok(())
    }

    /// Closes the connection cleanly.
    pub async fn disconnect(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        self.emit(Event::Connection(ConnState::Offline));
    }

    /// Connects and resumes the stored session. [`ClientError::NeedLogin`] if there is none
    /// or it expired.
    pub async fn connect(&mut self) -> Result<(), ClientError> {
        self.dial().await?;
        self.resume().await
    }

    /// The slow half of a connect, detached from the client: the QUIC and TLS handshake with
    /// the pinned server (up to the idle timeout when nothing answers). A UI runs it in a
    /// task, so commands go on meanwhile, then hands the connection to
    /// [`Client::resume_on`].
    pub fn dialer(
        &self,
    ) -> Result<impl Future<Output = Result<Connection, NetError>> + Send + 'static, ClientError>
    {
        let pin = self.pin.clone().ok_or(ClientError::PinMissing)?;
        let (server, push_tx, idle) = (self.server, self.push_tx.clone(), self.idle_timeout);
        Ok(async move {
            Connection::connect(server, "localhost", Some(pin.as_str()), push_tx, idle).await
        })
    }

    /// Adopts a connection from [`Client::dialer`], resumes the session on it and delivers
    /// the outbox: the fast half of a reconnect (a few round trips).
    pub async fn resume_on(&mut self, conn: Connection) -> Result<(), ClientError> {
        if let Some(old) = self.conn.replace(conn) {
            old.close().await;
        }
        self.resume().await?;
        self.flush_outbox().await?;
        Ok(())
    }

    /// Resumes the stored session on the current connection.
    async fn resume(&mut self) -> Result<(), ClientError> {
        let token = self.vault.get(Space::Account, b"token")?.ok_or(ClientError::NeedLogin)?;
        let r = self
            .connection()?
            .call::<_, v1::ResumeResponse>(
                method::RESUME,
                &v1::ResumeRequest { session_token: token.to_vec() },
                Duration::ZERO,
            )
            .await;
        match r {
            Ok(_) => {
                self.emit(Event::Connection(ConnState::Online));
                Ok(())
            }
            Err(e) if e.status() == Some(Status::Unauthorized) => {
                // Not kept: an unauthenticated connection is no reason to look online.
                self.conn = None;
                self.vault.delete(Space::Account, b"token")?;
                Err(ClientError::NeedLogin)
            }
            Err(e) => {
                // A busy server answers and then closes: do not keep the connection.
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// Logs in with the password (OPAQUE) and stores the session token.
    pub async fn login(&mut self, password: &str) -> Result<(), ClientError> {
        if !self.is_online() {
            self.dial().await?;
        }
        let conn = Calls(self.connection()?);
        let token =
            opaque::flow::login(&conn, &self.username, password, &self.identity_key()).await?;
        self.vault.put(Space::Account, b"token", &token)?;
        self.emit(Event::Connection(ConnState::Online));
        self.ensure_key_packages().await?;
        Ok(())
    }

    /// Reconnects with exponential backoff and jitter if the connection is gone.
    pub async fn ensure_connected(&mut self) -> Result<(), ClientError> {
        if self.is_online() {
            return Ok(());
        }
        self.conn = None;
        if !self.auto_reconnect {
            return Err(ClientError::Net(NetError::Connection("offline".into())));
        }
        self.emit(Event::Connection(ConnState::Reconnecting));
        let mut delay = Duration::from_millis(200);
        let mut last = None;
        for _ in 0..RECONNECT_ATTEMPTS {
            match self.reconnect().await {
                Ok(()) => return Ok(()),
                Err(ClientError::NeedLogin) => return Err(ClientError::NeedLogin),
                Err(ClientError::Net(NetError::CertificateChanged { expected, presented })) => {
                    return Err(NetError::CertificateChanged { expected, presented }.into());
                }
                Err(e) => {
                    // A busy server says when to come back (memory budget, rate limits).
                    if let ClientError::Net(n) = &e
                        && let Some(after) = n.retry_after()
                    {
                        delay = delay.max(after.min(Duration::from_secs(60)));
                    }
                    last = Some(e);
                }
            }
            let jitter = rand::rngs::OsRng.gen_range(0..=delay.as_millis() as u64 / 2);
            tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        self.emit(Event::Connection(ConnState::Offline));
        Err(last.unwrap_or(ClientError::Net(NetError::Connection("unreachable".into()))))
    }

    /// One attempt to connect, resume the session and deliver the outbox (see
    /// [`Client::flush_outbox`]): what a reconnect does. An error leaves the client offline
    /// unless only the outbox failed for a reason other than the network.
    pub async fn reconnect(&mut self) -> Result<(), ClientError> {
        self.connect().await?;
        self.flush_outbox().await?;
        Ok(())
    }

    /// Calls `method`, reconnecting once if the connection was lost.
    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        method_id: u16,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.ensure_connected().await?;
        match self.connection()?.call(method_id, req, Duration::ZERO).await {
            Err(NetError::Connection(_) | NetError::Timeout) => {
                // The connection is dead (or silently gone): redial once and retry.
                self.conn = None;
                self.ensure_connected().await?;
                Ok(self.connection()?.call(method_id, req, Duration::ZERO).await?)
            }
            Err(e) if e.status() == Some(Status::Unauthorized) => Err(ClientError::NeedLogin),
            other => Ok(other?),
        }
    }

    /// Tops the KeyPackage stock up to the target, never past it (at most the shortfall the
    /// server reported, however fast others fetch meanwhile), and uploads a last-resort package
    /// when the server holds none that is unused: the one handed out when the stock runs dry,
    /// so a DM or an add still works. Returns how many were uploaded.
    pub async fn ensure_key_packages(&mut self) -> Result<u32, ClientError> {
        let stock: v1::KeyPackageStockResponse =
            self.call(method::KEY_PACKAGE_STOCK, &v1::KeyPackageStockRequest {}).await?;
        let shortfall = KEY_PACKAGE_TARGET.saturating_sub(stock.stock);
        let (mut uploaded, mut full) = (0, false);
        for i in 0..shortfall + u32::from(!stock.last_resort) {
            let last_resort = i == shortfall;
            if full && !last_resort {
                continue;
            }
            let package = if last_resort {
                self.mls.last_resort_key_package()?
            } else {
                self.mls.key_package()?
            };
            let req =
                v1::UploadKeyPackageRequest { identity_key: Vec::new(), package, last_resort };
            match self
                .call::<_, v1::UploadKeyPackageResponse>(method::UPLOAD_KEY_PACKAGE, &req)
                .await
            {
                Ok(r) => {
                    uploaded += 1;
                    full = r.stock >= KEY_PACKAGE_TARGET;
                }
                // The server holds all it will take (its limit is below our target).
                Err(ClientError::Net(e)) if e.status() == Some(Status::Conflict) => full = true,
                Err(e) => return Err(e),
            }
        }
        Ok(uploaded)
    }

    /// The identity key of `username`.
    ///
    /// Trust on first use, like SSH's known_hosts: the first key the server gives for a name is
    /// remembered; a different key later is [`ClientError::KeyChanged`] until the user accepts
    /// it with [`Client::trust`]. The server is asked every time, so a remapped name is seen.
    pub async fn resolve(&mut self, username: &str) -> Result<[u8; 32], ClientError> {
        let r = self
            .call::<_, v1::ResolveUserResponse>(
                method::RESOLVE_USER,
                &v1::ResolveUserRequest { username: username.into() },
            )
            .await;
        match r {
            Ok(r) => {
                let id = key32(&r.identity_key)?;
                match self.contact(username)? {
                    Some(c) if c.key != id => {
                        return Err(ClientError::KeyChanged {
                            username: username.into(),
                            pinned: hex(&c.key),
                            presented: hex(&id),
                        });
                    }
                    Some(_) => {}
                    None => self.save_contact(
                        username,
                        &Contact { key: id, verified: false, since_ms: now_ms() },
                    )?,
                }
                self.remember_name(id, username)?;
                Ok(id)
            }
            Err(ClientError::Net(e)) if e.status() == Some(Status::NotFound) => {
                Err(ClientError::UnknownUser(username.into()))
            }
            Err(e) => Err(e),
        }
    }

    /// The username of an identity (cached; asks the server once).
    pub async fn name_of(&mut self, id: &[u8; 32]) -> String {
        if *id == self.identity_key() {
            return self.username.clone();
        }
        if let Some(n) = self.names.get(id) {
            return n.clone();
        }
        if let Ok(Some(n)) = self.vault.get(Space::State, &[b"name/".as_slice(), id].concat()) {
            let n = String::from_utf8_lossy(&n).into_owned();
            self.names.insert(*id, n.clone());
            return n;
        }
        let r = self
            .call::<_, v1::ResolveIdentityResponse>(
                method::RESOLVE_IDENTITY,
                &v1::ResolveIdentityRequest { identity_key: id.to_vec() },
            )
            .await;
        match r {
            Ok(r) => {
                let _ = self.remember_name(*id, &r.username);
                r.username
            }
            Err(_) => hex(&id[..6]),
        }
    }

    /// The cached username of an identity, without asking the server.
    pub fn cached_name(&self, id: &[u8]) -> Option<String> {
        let id: [u8; 32] = id.try_into().ok()?;
        if id == self.identity_key() {
            return Some(self.username.clone());
        }
        self.names.get(&id).cloned().or_else(|| {
            self.vault
                .get(Space::State, &[b"name/".as_slice(), &id].concat())
                .ok()
                .flatten()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
        })
    }

    /// The account key remembered for a username, if any.
    pub fn contact(&self, username: &str) -> Result<Option<Contact>, ClientError> {
        self.vault.get(Space::State, &contact_key(username))?.map(|v| unjson(&v)).transpose()
    }

    /// Every remembered contact, by username.
    pub fn contacts(&self) -> Result<Vec<(String, Contact)>, ClientError> {
        self.vault
            .scan(Space::State, CONTACT_PREFIX)?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(&k[CONTACT_PREFIX.len()..]).into_owned();
                Ok((name, unjson(&v)?))
            })
            .collect()
    }

    fn save_contact(&self, username: &str, c: &Contact) -> Result<(), ClientError> {
        self.vault.put(Space::State, &contact_key(username), &json(c)?)?;
        Ok(())
    }

    /// Accepts the key the server gives for `username` now (after a [`ClientError::KeyChanged`]
    /// the user looked into); the contact is unverified again. Returns (old key, new key).
    pub async fn trust(
        &mut self,
        username: &str,
    ) -> Result<(Option<[u8; 32]>, [u8; 32]), ClientError> {
        let old = self.contact(username)?.map(|c| c.key);
        self.vault.delete(Space::State, &contact_key(username))?;
        match self.resolve(username).await {
            Ok(new) => Ok((old, new)),
            Err(e) => {
                if let Some(key) = old {
                    self.save_contact(username, &Contact { key, verified: false, since_ms: 0 })?;
                }
                Err(e)
            }
        }
    }

    /// Marks a contact verified (its safety number was compared out of band).
    pub fn mark_verified(&self, username: &str, verified: bool) -> Result<(), ClientError> {
        let mut c =
            self.contact(username)?.ok_or_else(|| ClientError::UnknownUser(username.into()))?;
        c.verified = verified;
        self.save_contact(username, &c)
    }

    fn remember_name(&mut self, id: [u8; 32], name: &str) -> Result<(), ClientError> {
        // The server's reverse answer never overrides a name remembered for another key.
        if self.contact(name)?.is_some_and(|c| c.key != id) {
            return Ok(());
        }
        self.names.insert(id, name.to_string());
        self.vault.put(Space::State, &[b"name/".as_slice(), &id].concat(), name.as_bytes())?;
        Ok(())
    }

    // ----- conversations -------------------------------------------------------------

    /// Every conversation, most recent first.
    pub fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        let mut out: Vec<Conversation> = self
            .vault
            .scan(Space::Conversations, b"")?
            .iter()
            .map(|(_, v)| unjson(v))
            .collect::<Result<_, _>>()?;
        let verified: Vec<[u8; 32]> =
            self.contacts()?.into_iter().filter(|(_, c)| c.verified).map(|(_, c)| c.key).collect();
        for c in &mut out {
            c.verified = c.kind == ConvKind::Dm
                && c.peer.as_deref().is_some_and(|p| verified.iter().any(|v| v.as_slice() == p));
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.last_activity_ms));
        Ok(out)
    }

    /// A conversation by id.
    pub fn conversation(&self, id: &[u8]) -> Result<Option<Conversation>, ClientError> {
        self.vault.get(Space::Conversations, id)?.map(|v| unjson(&v)).transpose()
    }

    /// Finds a conversation by its address: `@name` is the direct conversation with that user,
    /// `#name` a group of that name, and a bare `name` either, but only when exactly one
    /// conversation has that name. Whoever runs a group chooses its name, so a group may be
    /// named like a contact: more than one match is [`ClientError::AmbiguousConversation`],
    /// never a guess. Where no name matches, a hex id prefix (4 digits or more, after the
    /// sigil or alone) names a conversation: the way to tell two groups of one name apart.
    pub fn find_conversation(&self, address: &str) -> Result<Conversation, ClientError> {
        let (kind, name) = if let Some(n) = address.strip_prefix('@') {
            (Some(ConvKind::Dm), n)
        } else if let Some(n) = address.strip_prefix('#') {
            (Some(ConvKind::Group), n)
        } else {
            (None, address)
        };
        let all: Vec<Conversation> = self
            .conversations()?
            .into_iter()
            .filter(|c| kind.is_none_or(|k| c.kind == k))
            .collect();
        let mut found: Vec<&Conversation> = all.iter().filter(|c| c.name == name).collect();
        if found.is_empty() && name.len() >= 4 {
            let prefix = name.to_ascii_lowercase();
            found = all.iter().filter(|c| hex(&c.id).starts_with(&prefix)).collect();
        }
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ClientError::UnknownConversation(address.into())),
            many => Err(ClientError::AmbiguousConversation {
                name: name.into(),
                matches: many
                    .iter()
                    // Names come from peers: escaped, so an error never drives a terminal.
                    .map(|c| match c.kind {
                        ConvKind::Dm => format!("@{}", c.name.escape_debug()),
                        ConvKind::Group => format!(
                            "#{} (id {})",
                            c.name.escape_debug(),
                            hex(&c.id[..4.min(c.id.len())])
                        ),
                    })
                    .collect(),
            }),
        }
    }

    /// How a conversation is written in lists and output, as [`Client::find_conversation`]
    /// takes it: `@name` for the direct conversation with that user, `#name` for a group. A
    /// group whose name is also a person's here (ours, a DM peer's, a remembered contact's)
    /// says so, since its name was chosen by whoever runs it.
    pub fn conversation_label(&self, c: &Conversation) -> Result<String, ClientError> {
        if c.kind == ConvKind::Dm {
            return Ok(format!("@{}", c.name));
        }
        let personal = c.name == self.username
            || self.contact(&c.name)?.is_some()
            || self.conversations()?.iter().any(|d| d.kind == ConvKind::Dm && d.name == c.name);
        Ok(if personal {
            format!("#{} (a group, named like the person @{})", c.name, c.name)
        } else {
            format!("#{}", c.name)
        })
    }

    fn save_conversation(&self, c: &Conversation) -> Result<(), ClientError> {
        self.vault.put(Space::Conversations, &c.id, &json(c)?)?;
        Ok(())
    }

    /// The last `limit` history entries of a conversation, oldest first.
    pub fn history(&self, conv: &[u8], limit: usize) -> Result<Vec<HistoryEntry>, ClientError> {
        self.vault
            .scan_last(Space::Messages, &conv_prefix(conv), limit)?
            .iter()
            .map(|(_, v)| unjson(v))
            .collect()
    }

    /// Up to `limit` history entries older than local seq `before`, oldest first.
    pub fn history_before(
        &self,
        conv: &[u8],
        before: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, ClientError> {
        self.vault
            .scan_before(Space::Messages, &conv_prefix(conv), &message_key(conv, before), limit)?
            .iter()
            .map(|(_, v)| unjson(v))
            .collect()
    }

    /// Marks a conversation read; returns the last message id, for a read receipt.
    pub fn mark_read(&self, conv: &[u8]) -> Result<Option<[u8; 16]>, ClientError> {
        if let Some(mut c) = self.conversation(conv)? {
            c.unread = 0;
            c.mentions = 0;
            self.save_conversation(&c)?;
        }
        Ok(self.history(conv, 1)?.last().filter(|e| !e.system).map(|e| e.message_id))
    }

    fn append(
        &self,
        conv: &[u8],
        make: impl FnOnce(u64) -> HistoryEntry,
        from_peer: bool,
    ) -> Result<HistoryEntry, ClientError> {
        let mut c =
            self.conversation(conv)?.ok_or_else(|| ClientError::UnknownConversation(hex(conv)))?;
        let seq = c.next_seq;
        let entry = make(seq);
        c.next_seq += 1;
        c.last_activity_ms = now_ms();
        if from_peer && !entry.system {
            c.unread += 1;
            if entry.text.contains(&format!("@{}", self.username)) {
                c.mentions += 1;
            }
        }
        self.vault.put(Space::Messages, &message_key(conv, seq), &json(&entry)?)?;
        if !entry.system {
            let mut index = conv.to_vec();
            index.extend_from_slice(&seq.to_be_bytes());
            self.vault.put(
                Space::State,
                &[b"mid/".as_slice(), &entry.message_id].concat(),
                &index,
            )?;
        }
        self.save_conversation(&c)?;
        Ok(entry)
    }

    /// The history entry of a message id (ours or a peer's), with its conversation.
    pub fn entry(
        &self,
        message_id: &[u8; 16],
    ) -> Result<Option<(Vec<u8>, HistoryEntry)>, ClientError> {
        let Some((conv, seq)) = self.locate(message_id)? else { return Ok(None) };
        let Some(v) = self.vault.get(Space::Messages, &message_key(&conv, seq))? else {
            return Ok(None);
        };
        Ok(Some((conv, unjson(&v)?)))
    }

    /// Where a message id's entry is: its conversation and local seq (the `mid/` index).
    fn locate(&self, message_id: &[u8; 16]) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        let Some(index) =
            self.vault.get(Space::State, &[b"mid/".as_slice(), message_id].concat())?
        else {
            return Ok(None);
        };
        Ok(index
            .split_last_chunk::<8>()
            .map(|(conv, seq)| (conv.to_vec(), u64::from_be_bytes(*seq))))
    }

    fn update_entry(
        &self,
        message_id: &[u8; 16],
        f: impl FnOnce(&mut HistoryEntry),
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let Some((conv, seq)) = self.locate(message_id)? else { return Ok(None) };
        let key = message_key(&conv, seq);
        let Some(v) = self.vault.get(Space::Messages, &key)? else { return Ok(None) };
        let mut e: HistoryEntry = unjson(&v)?;
        f(&mut e);
        self.vault.put(Space::Messages, &key, &json(&e)?)?;
        Ok(Some(conv))
    }

    fn new_conversation(
        &self,
        id: Vec<u8>,
        kind: ConvKind,
        name: String,
        peer: Option<[u8; 32]>,
    ) -> Result<Conversation, ClientError> {
        let c = Conversation {
            id,
            kind,
            name,
            topic: String::new(),
            peer: peer.map(|p| p.to_vec()),
            last_activity_ms: now_ms(),
            unread: 0,
            mentions: 0,
            next_seq: 0,
            verified: false,
            warning: String::new(),
        };
        self.save_conversation(&c)?;
        Ok(c)
    }

    /// The DM with `username`, created (and the peer invited) if there is none.
    pub async fn dm(&mut self, username: &str) -> Result<Vec<u8>, ClientError> {
        let peer = self.resolve(username).await?;
        if peer == self.identity_key() {
            return Err(ClientError::Invalid("that is you".into()));
        }
        if let Some(c) = self
            .conversations()?
            .into_iter()
            .find(|c| c.kind == ConvKind::Dm && c.peer.as_deref() == Some(peer.as_slice()))
        {
            return Ok(c.id);
        }
        let kp = self.fetch_key_package(&peer, username).await?;
        // The group, its conversation and the pending add of the peer land together: a crash
        // leaves no DM that the peer was never added to.
        let (id, pending) = self.vault.atomic(|| -> Result<_, ClientError> {
            let id = self.mls.create(Kind::Dm)?;
            self.new_conversation(id.clone(), ConvKind::Dm, username.to_string(), Some(peer))?;
            let intent = Intent::Add { kps: vec![kp], ids: vec![peer] };
            let out = self.build(&id, &intent)?.ok_or(GroupError::NotMember)?;
            let pending = self.stage_commit(&id, out, false, None, intent, 0)?;
            Ok((id, pending))
        })?;
        self.deliver_commit(pending).await?;
        Ok(id)
    }

    /// Creates a group named `name` with us as admin.
    pub async fn create_group(&mut self, name: &str) -> Result<Vec<u8>, ClientError> {
        if self.conversations()?.iter().any(|c| c.name == name) {
            return Err(ClientError::Invalid(format!("a conversation named {name:?} exists")));
        }
        self.vault.atomic(|| -> Result<_, ClientError> {
            let id = self.mls.create(Kind::Group)?;
            self.new_conversation(id.clone(), ConvKind::Group, name.to_string(), None)?;
            Ok(id)
        })
    }

    /// Adds users to a group (admins only); they get a Welcome, everyone else the commit.
    pub async fn add_members(
        &mut self,
        conv: &[u8],
        usernames: &[String],
    ) -> Result<(), ClientError> {
        let (mut kps, mut ids) = (Vec::new(), Vec::new());
        for u in usernames {
            let id = self.resolve(u).await?;
            kps.push(self.fetch_key_package(&id, u).await?);
            ids.push(id);
        }
        let system = format!("{} added {}", self.username, usernames.join(", "));
        // Once merged, the newcomers are told the group's name and topic.
        self.commit_change(conv, Intent::Add { kps, ids }, true, Some(system)).await
    }

    /// Removes a user (admins only).
    pub async fn remove_member(&mut self, conv: &[u8], username: &str) -> Result<(), ClientError> {
        let id = self.resolve(username).await?;
        let system = format!("{} removed {username}", self.username);
        self.commit_change(conv, Intent::Remove { ids: vec![id] }, false, Some(system)).await
    }

    /// Makes a member an admin or not (admins only).
    pub async fn set_admin(
        &mut self,
        conv: &[u8],
        username: &str,
        admin: bool,
    ) -> Result<(), ClientError> {
        let id = self.resolve(username).await?;
        if !self.mls.members(conv)?.iter().any(|m| m.identity == id) {
            return Err(GroupError::NotMember.into());
        }
        let verb = if admin { "promoted" } else { "demoted" };
        let system = format!("{} {verb} {username}", self.username);
        self.commit_change(conv, Intent::Admin { id, admin }, false, Some(system)).await
    }

    /// Rotates our keys in a conversation.
    pub async fn rotate_keys(&mut self, conv: &[u8]) -> Result<(), ClientError> {
        self.commit_change(conv, Intent::Rotate, false, None).await
    }

    /// Makes a commit for `intent` (nothing if there is nothing left to change), records it
    /// as pending in the same vault transaction, and delivers it.
    async fn commit_change(
        &mut self,
        conv: &[u8],
        intent: Intent,
        announce: bool,
        system: Option<String>,
    ) -> Result<(), ClientError> {
        self.settle_commits(conv).await?;
        let pending = self.vault.atomic(|| -> Result<_, ClientError> {
            match self.build(conv, &intent)? {
                Some(out) => Ok(Some(self.stage_commit(conv, out, announce, system, intent, 0)?)),
                None => Ok(None),
            }
        })?;
        match pending {
            Some(pending) => self.deliver_commit(pending).await,
            None => Ok(()),
        }
    }

    /// The commit that carries out `intent` in the group's current epoch, or `None` if the
    /// group already is as asked (another admin's commit did it first).
    fn build(&self, conv: &[u8], intent: &Intent) -> Result<Option<Outgoing>, ClientError> {
        let members = self.mls.members(conv)?;
        let member = |id: &[u8; 32]| members.iter().any(|m| m.identity == *id);
        Ok(match intent {
            Intent::Add { kps, ids } => {
                let (kps, ids): (Vec<Vec<u8>>, Vec<[u8; 32]>) = kps
                    .iter()
                    .cloned()
                    .zip(ids.iter().copied())
                    .filter(|(_, id)| !member(id))
                    .unzip();
                if ids.is_empty() { None } else { Some(self.mls.add(conv, &kps, &ids)?) }
            }
            Intent::Remove { ids } => {
                let ids: Vec<[u8; 32]> = ids.iter().copied().filter(|id| member(id)).collect();
                if ids.is_empty() { None } else { Some(self.mls.remove(conv, &ids)?) }
            }
            Intent::Admin { id, admin } => {
                let Some(target) = members.iter().find(|m| m.identity == *id) else {
                    return Ok(None);
                };
                if target.admin == *admin {
                    return Ok(None);
                }
                let mut admins: Vec<[u8; 32]> =
                    members.iter().filter(|m| m.admin).map(|m| m.identity).collect();
                admins.retain(|a| a != id);
                if *admin {
                    admins.push(*id);
                }
                Some(self.mls.set_admins(conv, admins)?)
            }
            Intent::Rotate => Some(self.mls.self_update(conv)?),
            // The members' own removal proposals, or, once another commit made them stale,
            // their removal by us as an admin (the proposals were authenticated; leaving must
            // not depend on winning a race).
            Intent::Leave { ids } => match self.mls.commit_pending(conv)? {
                Some(out) => Some(out),
                None => {
                    let me = self.identity_key();
                    let ids: Vec<[u8; 32]> = ids.iter().copied().filter(|id| member(id)).collect();
                    let admin = members.iter().any(|m| m.identity == me && m.admin);
                    if ids.is_empty() || !admin { None } else { Some(self.mls.remove(conv, &ids)?) }
                }
            },
        })
    }

    /// Renames a group and sets its topic (sent to all members).
    pub async fn rename(
        &mut self,
        conv: &[u8],
        name: &str,
        topic: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut c =
            self.conversation(conv)?.ok_or_else(|| ClientError::UnknownConversation(hex(conv)))?;
        if c.kind != ConvKind::Group {
            return Err(ClientError::Invalid("only groups have names".into()));
        }
        if !self.mls.members(conv)?.iter().any(|m| m.identity == self.identity_key() && m.admin) {
            return Err(GroupError::NotAdmin.into());
        }
        c.name = name.to_string();
        if let Some(t) = topic {
            c.topic = t.to_string();
        }
        self.save_conversation(&c)?;
        self.send(conv, Body::Meta { name: c.name, topic: c.topic }).await?;
        Ok(())
    }

    /// Leaves a conversation: proposes our removal to the others and forgets it locally.
    pub async fn leave(&mut self, conv: &[u8]) -> Result<(), ClientError> {
        // Only admins commit, so a group's last admin hands the role on before leaving (to
        // the first member in the tree), or nobody could carry out its leave or any change.
        let me = self.identity_key();
        let members = self.mls.members(conv)?;
        let mine = members.iter().any(|m| m.identity == me && m.admin);
        let others: Vec<_> = members.iter().filter(|m| m.identity != me).collect();
        if mine
            && !others.is_empty()
            && !others.iter().any(|m| m.admin)
            && self.mls.kind(conv)? == Kind::Group
        {
            let heir = others[0].identity;
            let name = self.name_of(&heir).await;
            let system = format!("{} made {name} an admin before leaving", self.username);
            self.commit_change(conv, Intent::Admin { id: heir, admin: true }, false, Some(system))
                .await?;
        }
        let (proposal, to) = self.mls.leave(conv)?;
        if !to.is_empty() {
            self.batch_enqueue(&to, proposal, random_id()).await?;
        }
        self.mls.forget(conv)?;
        self.vault.delete(Space::Conversations, conv)?;
        self.vault.delete_prefix(Space::Messages, &conv_prefix(conv))?;
        Ok(())
    }

    /// Members, epoch and verification code of a conversation.
    pub async fn group_info(&mut self, conv: &[u8]) -> Result<GroupInfo, ClientError> {
        let conversation =
            self.conversation(conv)?.ok_or_else(|| ClientError::UnknownConversation(hex(conv)))?;
        let mut members = Vec::new();
        for m in self.mls.members(conv)? {
            let name = self.name_of(&m.identity).await;
            members.push((m.identity, name, m.admin));
        }
        Ok(GroupInfo {
            conversation,
            members,
            epoch: self.mls.epoch(conv)?,
            verification_code: self.mls.verification_code(conv)?,
        })
    }

    /// The safety number shared with `username`.
    ///
    /// The key that counts is the one in the MLS tree: if we share a DM with `username`, its
    /// other member's account key, which must be the one remembered for the name.
    pub async fn safety_number(&mut self, username: &str) -> Result<String, ClientError> {
        let peer = self.resolve(username).await?;
        let me = self.identity_key();
        if let Some(dm) = self
            .conversations()?
            .into_iter()
            .find(|c| c.kind == ConvKind::Dm && c.peer.as_deref() == Some(peer.as_slice()))
        {
            let members = self.mls.members(&dm.id)?;
            if let Some(other) = members.iter().find(|m| m.identity != me)
                && other.identity != peer
            {
                return Err(ClientError::KeyChanged {
                    username: username.into(),
                    pinned: hex(&peer),
                    presented: hex(&other.identity),
                });
            }
        }
        Ok(safety_number(&me, &peer))
    }

    async fn fetch_key_package(
        &mut self,
        id: &[u8; 32],
        username: &str,
    ) -> Result<Vec<u8>, ClientError> {
        let r: v1::FetchKeyPackageResponse = self
            .call(
                method::FETCH_KEY_PACKAGE,
                &v1::FetchKeyPackageRequest { identity_key: id.to_vec() },
            )
            .await?;
        if r.package.is_empty() {
            return Err(ClientError::NoKeyPackage(username.into()));
        }
        Ok(r.package)
    }

    /// Records a commit we just made as pending, in the caller's vault transaction (the one
    /// that made it): from here on a crash leaves the record, and the next flush delivers it
    /// under the same message id, as a claim on the same slot.
    fn stage_commit(
        &self,
        conv: &[u8],
        out: Outgoing,
        announce: bool,
        system: Option<String>,
        intent: Intent,
        attempt: u8,
    ) -> Result<PendingCommit, ClientError> {
        let keys = |v: &[[u8; 32]]| v.iter().map(|k| k.to_vec()).collect();
        let pending = PendingCommit {
            conv: conv.to_vec(),
            commit: out.commit,
            commit_to: keys(&out.commit_to),
            message_id: random_id(),
            welcome: out.welcome,
            welcome_to: keys(&out.welcome_to),
            welcome_id: random_id(),
            announce,
            system,
            // While the commit is pending the group is still in the epoch it commits from.
            slot: Some(self.mls.slot(conv)?),
            intent: Some(intent),
            attempt,
        };
        self.vault.put(Space::State, &commit_key(conv), &json(&pending)?)?;
        Ok(pending)
    }

    /// The commit of ours pending in `conv`, if any.
    fn pending_commit(&self, conv: &[u8]) -> Result<Option<PendingCommit>, ClientError> {
        self.vault.get(Space::State, &commit_key(conv))?.map(|v| unjson(&v)).transpose()
    }

    /// Delivers a staged commit after whatever the outbox already holds (those messages were
    /// encrypted in the epoch the commit ends), merges it once it has won its slot, then sends
    /// the Welcome. If another member's commit won, ours is redone in the next epoch, up to
    /// [`MAX_REDO`] times. A network failure leaves it pending for the next flush, never
    /// abandoned: the server may hold it.
    async fn deliver_commit(&mut self, pending: PendingCommit) -> Result<(), ClientError> {
        self.flush_items().await?;
        let conv = pending.conv.clone();
        self.send_with_redo(pending).await?;
        match self.flush_items().await {
            Ok(_) | Err(ClientError::Net(_)) => {}
            Err(e) => return Err(e),
        }
        self.emit(Event::Conversation { conv });
        Ok(())
    }

    /// Sends a pending commit, then the redo our change gets each time another member's
    /// commit wins (each try is a claim on a new slot).
    async fn send_with_redo(&mut self, pending: PendingCommit) -> Result<(), ClientError> {
        let conv = pending.conv.clone();
        self.send_commit(pending).await?;
        for _ in 0..MAX_REDO {
            let Some(next) = self.pending_commit(&conv)? else { break };
            self.send_commit(next).await?;
        }
        Ok(())
    }

    /// Resolves any commit of ours still pending in `conv` before we make another one there.
    async fn settle_commits(&mut self, conv: &[u8]) -> Result<(), ClientError> {
        if self.vault.get(Space::State, &commit_key(conv))?.is_some() {
            self.flush_outbox().await?;
        }
        Ok(())
    }

    /// Sends one pending commit as a claim on its epoch's slot, under its message id (a repeat
    /// is a duplicate the server recognises). If it is the slot's first claim, or every claim
    /// before it fails the public checks, it won: merge it. Otherwise the first valid claim is
    /// applied instead and our change is staged again for the next epoch. A refusal for good
    /// drops the commit; a transient failure keeps it.
    async fn send_commit(&mut self, pending: PendingCommit) -> Result<(), ClientError> {
        let conv = pending.conv.clone();
        let key = commit_key(&conv);
        match self.mls.has_pending_commit(&conv) {
            Ok(true) => {}
            // Left, or superseded by a commit we processed from someone else.
            Ok(false) | Err(GroupError::UnknownGroup) => {
                self.vault.delete(Space::State, &key)?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        // Alone in the group (a new DM or group): nobody to race, nobody to tell.
        if pending.commit_to.is_empty() {
            return self.finish_commit(&pending);
        }
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            return Err(ClientError::Net(NetError::Connection("offline".into())));
        }
        let slot = match pending.slot {
            Some(s) => s,
            None => self.mls.slot(&conv)?, // a record from 0.2: same epoch, same slot
        };
        let req = v1::ClaimSlotRequest {
            slot: slot.to_vec(),
            payload: pending.commit.clone(),
            recipient_keys: pending.commit_to.clone(),
            message_id: pending.message_id.to_vec(),
        };
        let r: Result<v1::ClaimSlotResponse, NetError> =
            self.connection()?.call(method::CLAIM_SLOT, &req, Duration::ZERO).await;
        let resp = match r {
            Ok(resp) => resp,
            // A server from before slots: deliver without ordering (no fork protection).
            Err(e) if e.status() == Some(Status::UnknownMethod) => {
                return self.send_commit_unordered(pending).await;
            }
            Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                self.conn = None;
                return Err(e.into());
            }
            Err(e) if e.is_transient() || e.status() == Some(Status::Unauthorized) => {
                return Err(e.into());
            }
            // Refused for good (malformed, too large): the server holds nothing of it.
            Err(e) => {
                self.drop_commit(&conv)?;
                return Err(e.into());
            }
        };
        self.report_refusals("group change", &pending.commit_to, &resp.seqs, &resp.refusals);
        if resp.stored && resp.position == 0 {
            return self.finish_commit(&pending);
        }
        let refusal = v1::SlotRefusal::try_from(resp.refusal).unwrap_or(v1::SlotRefusal::None);
        if !resp.stored && refusal == v1::SlotRefusal::NotDelivered {
            // Nobody took it: merging would put us alone in an epoch no other member reaches.
            self.drop_commit(&conv)?;
            return Err(ClientError::Invalid(
                "no member's queue took the group change, so it was dropped and the group is \
                 unchanged; try again later"
                    .into(),
            ));
        }
        // Someone claimed the slot first (or it is full): its first valid claim decides.
        match self.resolve_slot(&conv, slot).await? {
            Resolution::Won | Resolution::Applied | Resolution::Lost => Ok(()),
            Resolution::Empty | Resolution::NoWinner | Resolution::Unsupported if resp.stored => {
                // Our claim is in the slot and valid, so the list cannot lack a winner: the
                // server answers inconsistently. Keep the commit; the next flush asks again.
                Err(ClientError::Invalid(
                    "the server's commit slot does not list the claim it just stored".into(),
                ))
            }
            Resolution::Empty | Resolution::NoWinner | Resolution::Unsupported => {
                self.drop_commit(&conv)?;
                Err(ClientError::Invalid(format!(
                    "the group change was not accepted: {}; the group is unchanged",
                    match refusal {
                        v1::SlotRefusal::SlotFull => "this epoch's commit slot is full",
                        v1::SlotRefusal::AlreadyClaimed => "another commit of ours holds the slot",
                        _ => "the server did not store it",
                    }
                )))
            }
        }
    }

    /// Drops our pending commit in `conv` and its record: the server holds none of it.
    fn drop_commit(&self, conv: &[u8]) -> Result<(), ClientError> {
        self.vault.atomic(|| -> Result<(), ClientError> {
            if self.mls.has_pending_commit(conv)? {
                self.mls.abandon(conv)?;
            }
            self.vault.delete(Space::State, &commit_key(conv))?;
            Ok(())
        })
    }

    /// Tells the user which recipients' queues did not store a message, and why.
    fn report_refusals(&self, what: &str, to: &[impl AsRef<[u8]>], seqs: &[u64], refusals: &[i32]) {
        for (i, k) in to.iter().enumerate() {
            if seqs.get(i) != Some(&0) {
                continue;
            }
            let k = k.as_ref();
            let who = self.cached_name(k).unwrap_or_else(|| hex(&k[..k.len().min(8)]));
            let why = match refusals.get(i).map(|r| v1::EnqueueRefusal::try_from(*r)) {
                Some(Ok(r)) if r != v1::EnqueueRefusal::None => r.describe(),
                _ => "the server did not store it",
            };
            self.emit(Event::Rejected { reason: format!("{what} not delivered to {who}: {why}") });
        }
    }

    /// The 0.2 delivery, for a server without commit slots: enqueue and merge.
    async fn send_commit_unordered(&mut self, pending: PendingCommit) -> Result<(), ClientError> {
        let req =
            batch_request(pending.commit_to.clone(), pending.commit.clone(), pending.message_id);
        let r: Result<v1::BatchEnqueueResponse, NetError> =
            self.connection()?.call(method::BATCH_ENQUEUE, &req, Duration::ZERO).await;
        match r {
            Ok(resp) => {
                self.report_refusals(
                    "group change",
                    &pending.commit_to,
                    &resp.seqs,
                    &resp.refusals,
                );
                if !resp.seqs.is_empty() && resp.seqs.iter().all(|s| *s == 0) {
                    self.drop_commit(&pending.conv)?;
                    return Err(ClientError::Invalid(
                        "no member's queue took the group change, so it was dropped and the \
                         group is unchanged; try again later"
                            .into(),
                    ));
                }
                self.finish_commit(&pending)
            }
            Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                self.conn = None;
                Err(e.into())
            }
            Err(e) if e.is_transient() || e.status() == Some(Status::Unauthorized) => Err(e.into()),
            Err(e) => {
                self.drop_commit(&pending.conv)?;
                Err(e.into())
            }
        }
    }

    /// Our commit won its slot (or nobody else is in the group): merge it, and queue the
    /// Welcome (and the group's name for newcomers) in the same vault transaction, so a crash
    /// now delays them instead of losing them.
    fn finish_commit(&self, pending: &PendingCommit) -> Result<(), ClientError> {
        let conv = &pending.conv;
        let me = self.identity_key();
        let entry = self.vault.atomic(|| -> Result<Option<HistoryEntry>, ClientError> {
            self.mls.confirm(conv)?;
            if let (Some(welcome), false) = (&pending.welcome, pending.welcome_to.is_empty()) {
                self.queue(
                    conv,
                    &keys32(&pending.welcome_to),
                    welcome.clone(),
                    pending.welcome_id,
                )?;
            }
            if pending.announce
                && let Some(c) = self.conversation(conv)?
                && c.kind == ConvKind::Group
            {
                let meta = Content::new(Body::Meta { name: c.name, topic: c.topic }, now_ms());
                self.record_send(conv, &me, &meta)?;
            }
            self.vault.delete(Space::State, &commit_key(conv))?;
            pending
                .system
                .as_ref()
                .map(|text| {
                    self.append(
                        conv,
                        |seq| HistoryEntry::system(seq, text.clone(), now_ms()),
                        false,
                    )
                })
                .transpose()
        })?;
        if let Some(entry) = entry {
            self.emit(Event::Message { conv: conv.clone(), entry });
        }
        Ok(())
    }

    /// Reads `slot`'s claims in order and applies the first valid one (PROTOCOL.md §6.9):
    /// ours if it comes first among the valid, else another member's, after which our own
    /// change (if any) is staged again for the next epoch.
    async fn resolve_slot(
        &mut self,
        conv: &[u8],
        slot: [u8; 16],
    ) -> Result<Resolution, ClientError> {
        let r = self.read_slot(conv, slot).await?;
        // A slot whose claims were all junk, or whose winner we cannot follow, is not read
        // again in this sync (nor its junk reported twice); an empty one may fill meanwhile.
        if matches!(r, Resolution::NoWinner | Resolution::Lost) {
            self.resolved.insert(slot);
        }
        Ok(r)
    }

    async fn read_slot(&mut self, conv: &[u8], slot: [u8; 16]) -> Result<Resolution, ClientError> {
        let mut from = 0u32;
        loop {
            let req = v1::FetchSlotRequest { slot: slot.to_vec(), from };
            // On the current connection only (this runs inside the outbox flush that
            // connecting does): a failure ends the flush and the next one asks again.
            let r: Result<v1::FetchSlotResponse, NetError> =
                self.connection()?.call(method::FETCH_SLOT, &req, Duration::ZERO).await;
            let r = match r {
                Ok(r) => r,
                Err(e) if e.status() == Some(Status::UnknownMethod) => {
                    return Ok(Resolution::Unsupported);
                }
                Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                    self.conn = None;
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            if r.claims.is_empty() {
                return Ok(if from == 0 { Resolution::Empty } else { Resolution::NoWinner });
            }
            // Bounded by the server's slot size, and we never go back.
            from = from.saturating_add(r.claims.len() as u32);
            for claim in r.claims {
                if let Some(done) = self.try_claim(conv, &claim)? {
                    return Ok(done);
                }
            }
            // `total` is the server's word: read no more than a slot can hold.
            if from >= r.total || from >= MAX_SLOT_CLAIMS {
                return Ok(Resolution::NoWinner);
            }
        }
    }

    /// Tries one claim of `conv`'s current slot. `None`: it fails a public check (every member
    /// skips it alike), try the next.
    fn try_claim(&self, conv: &[u8], claim: &[u8]) -> Result<Option<Resolution>, ClientError> {
        let pending = self.pending_commit(conv)?;
        if let Some(p) = &pending
            && p.commit == claim
        {
            self.finish_commit(p)?;
            return Ok(Some(Resolution::Won));
        }
        // A claim must be a commit of this group made in our epoch: anything else (a commit of
        // another group we are in, a replay from an earlier epoch) is junk here.
        let epoch = self.mls.epoch(conv)?;
        let fits = matches!(
            keypackage::clear_header(claim),
            Some(ClearHeader::Framed { group_id, epoch: e, content_type: keypackage::CONTENT_COMMIT, .. })
                if group_id == conv && e == epoch
        );
        if !fits {
            self.emit(Event::Rejected {
                reason: "ignored a commit claim that is not a commit of this group's epoch".into(),
            });
            return Ok(None);
        }
        // Who could read our messages of this epoch: they get what we send again.
        let before: Vec<[u8; 32]> = self.mls.members(conv)?.iter().map(|m| m.identity).collect();
        let result = self.vault.atomic(|| -> Result<(Vec<Event>, bool), ClaimError> {
            // Only what MLS says of the claim itself decides between skipping it and stopping;
            // any failure after that is ours, and ends this try (rolled back, tried again).
            let incoming = match self.mls.process(claim) {
                Ok(i @ Incoming::Commit { .. }) => i,
                Ok(_) => return Err(ClaimError::Invalid("not a commit".into())),
                Err(GroupError::CannotFollow(why)) => return Err(ClaimError::CannotFollow(why)),
                Err(e @ GroupError::Mls(_)) => return Err(ClaimError::Local(e.into())),
                Err(e) => return Err(ClaimError::Invalid(e.to_string())),
            };
            let events = self.apply_incoming(incoming)?;
            self.resend_superseded(conv, epoch, &before)?;
            // Our own commit of the same epoch lost: make the change again on top of the
            // winner, in this same transaction.
            let redone = match pending {
                Some(p) => {
                    self.vault.delete(Space::State, &commit_key(conv))?;
                    self.restage(p)?
                }
                None => false,
            };
            Ok((events, redone))
        });
        match result {
            Ok((events, redone)) => {
                for e in events {
                    self.emit(e);
                }
                if redone {
                    self.emit(Event::Rejected {
                        reason: "another admin changed the group at the same time: your change \
                                 was made again on top of theirs"
                            .into(),
                    });
                }
                Ok(Some(Resolution::Applied))
            }
            Err(ClaimError::CannotFollow(why)) => {
                self.drop_commit(conv)?;
                self.warn_conversation(
                    conv,
                    &format!(
                        "you can no longer follow this group: a change could not be decrypted \
                         for you ({why}). Ask an admin to remove and re-add you."
                    ),
                )?;
                Ok(Some(Resolution::Lost))
            }
            Err(ClaimError::Local(e)) => Err(e),
            Err(ClaimError::Invalid(why)) => {
                self.emit(Event::Rejected {
                    reason: format!("ignored an invalid commit claim: {why}"),
                });
                Ok(None)
            }
        }
    }

    /// Stages our change again after another member's commit won the epoch. Returns whether
    /// there was still something to change. Called in the transaction that applied the winner.
    fn restage(&self, lost: PendingCommit) -> Result<bool, ClientError> {
        let Some(intent) = lost.intent else { return Ok(false) };
        if lost.attempt >= MAX_REDO {
            self.emit(Event::Rejected {
                reason: "a group change lost to other admins' changes too often and was given up"
                    .into(),
            });
            return Ok(false);
        }
        let out = match self.build(&lost.conv, &intent) {
            Ok(Some(out)) => out,
            Ok(None) => return Ok(false),
            // No longer possible (we were demoted, or removed): say so, keep the winner.
            Err(ClientError::Group(e)) => {
                self.emit(Event::Rejected {
                    reason: format!("a group change could not be redone: {e}"),
                });
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        self.stage_commit(&lost.conv, out, lost.announce, lost.system, intent, lost.attempt + 1)?;
        self.queued_by_resolution.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Brings `conv` up to `target` (an epoch seen in a message) by applying each missed
    /// epoch's winning claim from its slot, at most [`MAX_CATCH_UP`] epochs per call.
    async fn catch_up(&mut self, conv: &[u8], target: u64) -> Result<(), ClientError> {
        // Each round applies a real commit of the group, so the rounds are as many as the
        // epochs we missed (the cap only guards against a runaway), and a slot this sync
        // already found without a winner is not read again.
        for _ in 0..MAX_CATCH_UP {
            let Ok(epoch) = self.mls.epoch(conv) else { return Ok(()) };
            if epoch >= target {
                break;
            }
            let slot = self.mls.slot(conv)?;
            if self.resolved.contains(&slot) {
                break;
            }
            if !matches!(
                self.resolve_slot(conv, slot).await?,
                Resolution::Applied | Resolution::Won
            ) {
                break;
            }
        }
        Ok(())
    }

    /// Looks at the current slot of every group: a commit our queue never got (it was full,
    /// or the server dropped it) is applied from there. Done at the first sync of a session
    /// and after a gap in our queue.
    async fn catch_up_all(&mut self) -> Result<(), ClientError> {
        for c in self.conversations()? {
            if self.mls.epoch(&c.id).is_err() {
                continue;
            }
            let slot = self.mls.slot(&c.id)?;
            if self.resolved.contains(&slot) {
                continue; // settled by this sync already
            }
            if matches!(
                self.resolve_slot(&c.id, slot).await?,
                Resolution::Applied | Resolution::Won
            ) {
                self.catch_up(&c.id, u64::MAX).await?;
            }
        }
        Ok(())
    }

    /// Puts a lasting warning on a conversation (shown in its info and as a system line), once.
    fn warn_conversation(&self, conv: &[u8], text: &str) -> Result<(), ClientError> {
        let Some(mut c) = self.conversation(conv)? else { return Ok(()) };
        if c.warning == text {
            return Ok(());
        }
        let entry = self.vault.atomic(|| -> Result<HistoryEntry, ClientError> {
            c.warning = text.to_string();
            self.save_conversation(&c)?;
            self.append(conv, |seq| HistoryEntry::system(seq, format!("⚠ {text}"), now_ms()), false)
        })?;
        self.emit(Event::Message { conv: conv.to_vec(), entry });
        self.emit(Event::Conversation { conv: conv.to_vec() });
        Ok(())
    }

    async fn batch_enqueue(
        &mut self,
        to: &[[u8; 32]],
        payload: Vec<u8>,
        message_id: [u8; 16],
    ) -> Result<(), ClientError> {
        let req = batch_request(to.iter().map(|k| k.to_vec()).collect(), payload, message_id);
        let _: v1::BatchEnqueueResponse = self.call(method::BATCH_ENQUEUE, &req).await?;
        Ok(())
    }

    // ----- sending ---------------------------------------------------------------------

    /// Encrypts `body` for a conversation, records it (history and outbox, atomically with
    /// the MLS state), then tries to deliver it. Returns the message id. Offline, the message
    /// stays in the outbox and goes out on the next connect.
    pub async fn send(&mut self, conv: &[u8], body: Body) -> Result<[u8; 16], ClientError> {
        // Receivers take a name or topic only from a group's admin: do not show one locally
        // that they will reject.
        if matches!(body, Body::Meta { .. }) {
            if !self.conversation(conv)?.is_some_and(|c| c.kind == ConvKind::Group) {
                return Err(ClientError::Invalid("only groups have names".into()));
            }
            let me = self.identity_key();
            if !self.mls.members(conv)?.iter().any(|m| m.identity == me && m.admin) {
                return Err(GroupError::NotAdmin.into());
            }
        }
        // A message encrypted while our own commit is pending would be readable by the
        // membership that commit ends: settle the commit first (it needs the server).
        if self.vault.get(Space::State, &commit_key(conv))?.is_some() {
            let _ = self.flush_outbox().await;
            if self.vault.get(Space::State, &commit_key(conv))?.is_some() {
                return Err(ClientError::Invalid(
                    "a change to this group is still on its way to the server; send again once \
                     online"
                        .into(),
                ));
            }
        }
        let content = Content::new(body, now_ms());
        let me = self.identity_key();
        let entry = self.vault.atomic(|| self.record_send(conv, &me, &content))?;
        if let Some(entry) = entry {
            self.emit(Event::Message { conv: conv.to_vec(), entry });
        }
        // Our edit, delete or reaction changed an entry: say which (a UI updates just that).
        if let Body::Edit { target, .. } | Body::Delete { target } | Body::Reaction { target, .. } =
            &content.body
        {
            self.emit(Event::Updated { conv: conv.to_vec(), message_id: *target });
        }
        match self.flush_outbox().await {
            Ok(_) | Err(ClientError::Net(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(content.message_id)
    }

    /// Encrypts `content` and records it: its history entry (pending), its own effect, its
    /// outbox item. Runs inside the caller's vault transaction, with the MLS state it spends.
    fn record_send(
        &self,
        conv: &[u8],
        me: &[u8; 32],
        content: &Content,
    ) -> Result<Option<HistoryEntry>, ClientError> {
        let bytes = content.encode()?;
        if let Body::Meta { name, topic } = &content.body
            && let Some(mut c) = self.conversation(conv)?
        {
            c.name = name.clone();
            c.topic = topic.clone();
            self.save_conversation(&c)?;
        }
        let epoch = self.mls.epoch(conv)?;
        let (ciphertext, to) = self.mls.encrypt(conv, &bytes)?;
        let entry = match HistoryEntry::from_content(0, me, content, now_ms()) {
            Some(_) => Some(self.append(
                conv,
                |seq| {
                    let mut e = HistoryEntry::from_content(seq, me, content, now_ms())
                        .unwrap_or_else(|| HistoryEntry::system(seq, String::new(), 0));
                    e.pending = !to.is_empty();
                    e
                },
                false,
            )?),
            None => None,
        };
        self.apply_own(conv, content)?;
        if !to.is_empty() {
            let n = self.state_u64(b"outbox_next")?;
            self.queue(conv, &to, ciphertext, content.message_id)?;
            // Kept until its epoch is settled: see `resend_superseded`.
            let value = [&epoch.to_be_bytes()[..], &n.to_be_bytes(), &bytes].concat();
            let slot = n % RECENT_PER_CONVERSATION;
            self.vault.put(Space::State, &recent_key(conv, Some(slot)), &value)?;
        }
        Ok(entry)
    }

    /// Sends again, in the group's new epoch, what we sent in `epoch` before another member's
    /// commit of that epoch won: members that applied the commit before our message reached
    /// them can no longer decrypt it (openmls keeps no past epochs' keys). Those that did read
    /// it recognise the repeat by its message id. Runs in the transaction that applied the
    /// winner; returns how many messages went out again.
    fn resend_superseded(
        &self,
        conv: &[u8],
        epoch: u64,
        readers: &[[u8; 32]],
    ) -> Result<usize, ClientError> {
        let recent = self.vault.scan(Space::State, &recent_key(conv, None))?;
        if recent.is_empty() || self.mls.epoch(conv).is_err() {
            return Ok(0);
        }
        // value = epoch ‖ send counter ‖ content; the ring is not in send order.
        let mut mine: Vec<(u64, &[u8])> = recent
            .iter()
            .filter_map(|(_, v)| {
                let (at, rest) = v.split_first_chunk::<8>()?;
                let (n, bytes) = rest.split_first_chunk::<8>()?;
                (u64::from_be_bytes(*at) == epoch).then_some((u64::from_be_bytes(*n), bytes))
            })
            .collect();
        mine.sort_by_key(|(n, _)| *n);
        let mut sent = 0;
        for (_, bytes) in mine {
            let (ciphertext, mut to) = self.mls.encrypt(conv, bytes)?;
            // Only to those who were members when it was first sent: not to newcomers.
            to.retain(|k| readers.contains(k));
            if !to.is_empty() {
                // A new transport id: the server still holds the first one for dedup.
                self.queue(conv, &to, ciphertext, random_id())?;
                sent += 1;
            }
        }
        self.vault.delete_prefix(Space::State, &recent_key(conv, None))?;
        if sent > 0 {
            self.queued_by_resolution.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(sent)
    }

    /// Puts a payload in the outbox (inside the caller's vault transaction, if any).
    fn queue(
        &self,
        conv: &[u8],
        to: &[[u8; 32]],
        payload: Vec<u8>,
        message_id: [u8; 16],
    ) -> Result<(), ClientError> {
        let next = self.state_u64(b"outbox_next")?;
        self.vault.put(Space::State, b"outbox_next", &(next + 1).to_be_bytes())?;
        let item = OutboxItem {
            conv: conv.to_vec(),
            to: to.iter().map(|t| t.to_vec()).collect(),
            payload,
            message_id,
        };
        self.vault.put(Space::Outbox, &next.to_be_bytes(), &json(&item)?)?;
        Ok(())
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, conv: &[u8], text: &str) -> Result<[u8; 16], ClientError> {
        self.send(conv, Body::Text { body: text.to_string(), reply_to: None }).await
    }

    /// Tells the conversation's connected members that we are typing (not stored anywhere).
    pub async fn send_typing(&mut self, conv: &[u8], active: bool) -> Result<(), ClientError> {
        let content = Content::new(Body::Typing { active }, now_ms()).encode()?;
        let (ciphertext, to) =
            self.vault.atomic(|| self.mls.encrypt(conv, &content).map_err(ClientError::from))?;
        let req = v1::RelayEphemeralRequest {
            recipient_keys: to.iter().map(|k| k.to_vec()).collect(),
            payload: ciphertext,
            channel_id: Vec::new(),
        };
        let _: v1::RelayEphemeralResponse = self.call(method::RELAY_EPHEMERAL, &req).await?;
        Ok(())
    }

    /// A local setting (stored encrypted in the vault).
    pub fn setting(&self, key: &str) -> Result<Option<String>, ClientError> {
        let k = [b"setting/".as_slice(), key.as_bytes()].concat();
        Ok(self.vault.get(Space::State, &k)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores a local setting.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), ClientError> {
        let k = [b"setting/".as_slice(), key.as_bytes()].concat();
        self.vault.put(Space::State, &k, value.as_bytes())?;
        Ok(())
    }

    /// Messages waiting in the outbox.
    pub fn outbox_len(&self) -> Result<usize, ClientError> {
        Ok(self.vault.scan(Space::Outbox, b"")?.len())
    }

    /// Delivers what waits for the server: queued messages in order, then our pending
    /// commits (which a crash or a lost connection may have left), then what merging them
    /// queued (Welcomes). Stops at the first network failure.
    pub async fn flush_outbox(&mut self) -> Result<usize, ClientError> {
        let mut sent = self.flush_items().await?;
        let pending = self.vault.scan(Space::State, COMMIT_PREFIX)?;
        if pending.is_empty() {
            return Ok(sent);
        }
        for (_, value) in pending {
            let pending: PendingCommit = unjson(&value)?;
            let conv = pending.conv.clone();
            match self.send_with_redo(pending).await {
                Ok(()) => self.emit(Event::Conversation { conv }),
                Err(e) if keeps_pending(&e) => return Err(e),
                Err(e) => self
                    .emit(Event::Rejected { reason: format!("group change not delivered: {e}") }),
            }
        }
        sent += self.flush_items().await?;
        Ok(sent)
    }

    /// Delivers the outbox's items in order; stops at the first network failure.
    async fn flush_items(&mut self) -> Result<usize, ClientError> {
        let mut sent = 0;
        for (key, value) in self.vault.scan(Space::Outbox, b"")? {
            let item: OutboxItem = unjson(&value)?;
            let to: Vec<[u8; 32]> =
                item.to.iter().filter_map(|t| t.as_slice().try_into().ok()).collect();
            if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
                return Err(ClientError::Net(NetError::Connection("offline".into())));
            }
            let req = batch_request(
                to.iter().map(|k| k.to_vec()).collect(),
                item.payload.clone(),
                item.message_id,
            );
            let r: Result<v1::BatchEnqueueResponse, NetError> =
                self.connection()?.call(method::BATCH_ENQUEUE, &req, Duration::ZERO).await;
            match r {
                // Recipients whose copy the server did not store (seq 0): say who, and why.
                Ok(resp) => self.report_refusals("message", &to, &resp.seqs, &resp.refusals),
                Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                    self.conn = None;
                    return Err(e.into());
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    // A permanent refusal (e.g. too large): drop it rather than block the queue.
                    self.emit(Event::Rejected { reason: format!("message not delivered: {e}") });
                }
            }
            self.vault.delete(Space::Outbox, &key)?;
            self.update_entry(&item.message_id, |e| e.pending = false)?;
            self.emit(Event::Updated { conv: item.conv.clone(), message_id: item.message_id });
            sent += 1;
        }
        Ok(sent)
    }

    /// Applies our own edits, deletes and reactions to local history.
    fn apply_own(&self, _conv: &[u8], content: &Content) -> Result<(), ClientError> {
        let me = self.identity_key();
        self.apply_effect(&me, content)?;
        Ok(())
    }

    /// Applies a non-text body from `sender` to history; returns the changed conversation.
    fn apply_effect(
        &self,
        sender: &[u8; 32],
        content: &Content,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(match &content.body {
            Body::Edit { target, body } => self.update_entry(target, |e| {
                if e.sender == sender {
                    e.text = body.clone();
                    e.edited = true;
                }
            })?,
            Body::Delete { target } => self.update_entry(target, |e| {
                if e.sender == sender {
                    e.text.clear();
                    e.file = None;
                    e.deleted = true;
                }
            })?,
            Body::Reaction { target, emoji, remove } => self.update_entry(target, |e| {
                e.reactions.retain(|(em, who)| !(em == emoji && who == sender));
                if !remove {
                    e.reactions.push((emoji.clone(), sender.to_vec()));
                }
            })?,
            Body::Receipt { up_to } => self.mark_read_by(sender, up_to)?,
            _ => None,
        })
    }

    /// Records that `reader` has read everything up to `up_to` (the recent history of that
    /// conversation; older entries were read long ago).
    fn mark_read_by(
        &self,
        reader: &[u8; 32],
        up_to: &[u8; 16],
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let Some((conv, last)) = self.locate(up_to)? else { return Ok(None) };
        for (key, value) in self.vault.scan_last(Space::Messages, &conv_prefix(&conv), 200)? {
            let mut e: HistoryEntry = unjson(&value)?;
            if e.seq <= last
                && !e.system
                && e.sender != reader
                && !e.read_by.iter().any(|w| w == reader)
            {
                e.read_by.push(reader.to_vec());
                self.vault.put(Space::Messages, &key, &json(&e)?)?;
            }
        }
        Ok(Some(conv))
    }

    // ----- receiving -------------------------------------------------------------------

    /// Fetches, processes and acknowledges everything queued; returns how many messages.
    pub async fn sync(&mut self) -> Result<usize, ClientError> {
        self.resolved.clear();
        let mut total = 0;
        loop {
            let r: v1::FetchResponse = self
                .call(method::FETCH, &v1::FetchRequest { limit: 100, ..Default::default() })
                .await?;
            if r.payloads.is_empty() {
                break;
            }
            total += r.payloads.len();
            self.process_envelopes(r.payloads).await?;
        }
        // Once the queue is drained: at the first sync of a session, and after a gap.
        if std::mem::take(&mut self.probe_slots)
            && let Err(e) = self.catch_up_all().await
        {
            self.probe_slots = true; // the next sync tries again
            return Err(e);
        }
        if self.queued_by_resolution.swap(false, std::sync::atomic::Ordering::Relaxed) {
            match self.flush_outbox().await {
                // Offline now: it waits in the outbox for the next connect.
                Ok(_) | Err(ClientError::Net(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.drain_pushes().await?;
        Ok(total)
    }

    /// Waits up to `timeout` for something to arrive (push or long poll), then syncs.
    pub async fn wait(&mut self, timeout: Duration) -> Result<usize, ClientError> {
        let n = self.sync().await?;
        if n > 0 {
            return Ok(n);
        }
        self.wait_for_activity(timeout).await?;
        self.sync().await
    }

    /// Waits up to `timeout` until a push arrives or the queue is non-empty, without
    /// processing anything: safe to cancel (a UI drops it when the user acts). Call
    /// [`Client::sync`] afterwards.
    pub async fn wait_for_activity(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.ensure_connected().await?;
        if let Ok(p) = self.push_rx.try_recv() {
            self.pending_pushes.push(p);
            return Ok(());
        }
        let req = v1::FetchWaitRequest {
            timeout_ms: timeout.as_millis() as u64,
            limit: 1,
            ..Default::default()
        };
        // Disjoint field borrows: the connection (shared) and the push channel (exclusive).
        let conn = self.conn.as_ref().ok_or(NetError::Connection("not connected".into()))?;
        tokio::select! {
            push = self.push_rx.recv() => {
                if let Some(p) = push {
                    self.pending_pushes.push(p);
                }
            }
            r = conn.call::<_, v1::FetchWaitResponse>(method::FETCH_WAIT, &req, timeout) => {
                if let Err(e @ (NetError::Connection(_) | NetError::Timeout)) = r {
                    self.conn = None;
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    async fn drain_pushes(&mut self) -> Result<(), ClientError> {
        for p in std::mem::take(&mut self.pending_pushes) {
            self.handle_push(p).await?;
        }
        while let Ok(p) = self.push_rx.try_recv() {
            self.handle_push(p).await?;
        }
        Ok(())
    }

    pub(crate) async fn handle_push(&mut self, p: Push) -> Result<(), ClientError> {
        use prost::Message as _;
        match p.event {
            method::PUSH_NEW_MESSAGE => {
                // The pushed envelope, when it is the next one of our queue, is processed and
                // acknowledged as if fetched: no Fetch round trip per message. One we already
                // have (a sync fetched it first) is dropped. Anything else (a gap: pushes use
                // separate streams and may overtake each other; a payload above the inline
                // limit; an undecodable push) goes through a fetch: the queue is the source of
                // truth for order and acknowledgements. A push for another channel is ignored:
                // the sender chooses the channel and seqs are per channel, so it says nothing
                // about the queue we fetch (the default one).
                let push = v1::NewMessage::decode(p.payload.as_slice()).ok();
                if push.as_ref().is_some_and(|m| !m.channel_id.is_empty()) {
                    return Ok(());
                }
                match push.and_then(|m| m.envelope) {
                    Some(env) if env.seq != 0 && env.seq <= self.last_seq => {}
                    Some(env) if !env.data.is_empty() && env.seq == self.last_seq + 1 => {
                        self.process_envelopes(vec![env]).await?;
                    }
                    _ => self.sync_once().await?,
                }
            }
            method::PUSH_TYPING => {
                let Ok(t) = v1::TypingIndicator::decode(p.payload.as_slice()) else {
                    return Ok(());
                };
                let result = self
                    .vault
                    .atomic(|| self.mls.process_ephemeral(&t.payload).map_err(ClientError::from));
                if let Ok(Incoming::Application { group_id, sender, plaintext }) = result
                    && let Ok(Content { body: Body::Typing { active }, .. }) =
                        Content::decode(&plaintext)
                {
                    self.emit(Event::Typing { conv: group_id, who: sender, active });
                }
            }
            method::PUSH_KEY_PACKAGES_LOW => {
                // Whoever fetches our packages decides how often this comes (every fetch below
                // the low-water mark): top up from these pushes at most once a minute. The
                // last-resort package covers the gaps.
                const LAST_TOP_UP: &[u8] = b"kp_top_up_ms";
                const EVERY_MS: u64 = 60_000;
                let (now, last) = (now_ms(), self.state_u64(LAST_TOP_UP)?);
                if now.saturating_sub(last) >= EVERY_MS || last > now {
                    self.vault.put(Space::State, LAST_TOP_UP, &now.to_be_bytes())?;
                    self.ensure_key_packages().await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn sync_once(&mut self) -> Result<(), ClientError> {
        let r: v1::FetchResponse = self
            .call(method::FETCH, &v1::FetchRequest { limit: 100, ..Default::default() })
            .await?;
        self.process_envelopes(r.payloads).await
    }

    async fn process_envelopes(&mut self, envs: Vec<v1::Envelope>) -> Result<(), ClientError> {
        let Some(last) = envs.last().map(|e| e.seq) else { return Ok(()) };
        let mut names_needed = Vec::new();
        let mut proposals: Vec<Vec<u8>> = Vec::new();
        for env in envs {
            if env.seq <= self.last_seq {
                continue; // already stored; the ack was lost
            }
            // Each envelope is a durable commit (an fsync): let the connection's keep-alives
            // and acks run between them on a slow disk.
            tokio::task::yield_now().await;
            if self.last_seq > 0 && env.seq > self.last_seq + 1 {
                self.emit(Event::Gap { after: self.last_seq, next: env.seq });
                self.probe_slots = true;
            }
            let seq = env.seq;
            // Group changes go through the epoch's slot, not the queue's order (§6.9).
            if self.order_by_slot(&env.data).await? {
                self.vault.put(Space::State, b"last_seq", &seq.to_be_bytes())?;
                self.last_seq = seq;
                continue;
            }
            let result = self.vault.atomic(|| -> Result<Vec<Event>, ClientError> {
                let events = self.process_one(&env.data)?;
                self.vault.put(Space::State, b"last_seq", &seq.to_be_bytes())?;
                Ok(events)
            });
            match result {
                Ok(events) => {
                    for e in events {
                        if let Event::Proposal { conv } = &e {
                            proposals.push(conv.clone());
                            continue;
                        }
                        if let Event::Message { entry, .. } = &e
                            && let Ok(id) = <[u8; 32]>::try_from(entry.sender.as_slice())
                        {
                            names_needed.push(id);
                        }
                        self.emit(e);
                    }
                }
                // Our own storage failed: stop here and acknowledge only what is stored, so the
                // message is fetched again next time rather than lost.
                Err(e @ (ClientError::Vault(_) | ClientError::Io(_))) => {
                    if let Some(done) = seq.checked_sub(1).filter(|d| *d > 0 && *d >= self.last_seq)
                    {
                        let _: Result<v1::AckResponse, _> = self
                            .call(
                                method::ACK,
                                &v1::AckRequest { seq_up_to: done, ..Default::default() },
                            )
                            .await;
                    }
                    return Err(e);
                }
                // The message itself is bad (tampered, not for us, unauthorized commit):
                // rejecting it is final, so it is acknowledged with the rest.
                Err(e) => {
                    self.vault.put(Space::State, b"last_seq", &seq.to_be_bytes())?;
                    if let ClientError::Group(g @ GroupError::Forked { .. }) = &e
                        && let Some(ClearHeader::Framed { group_id, .. }) =
                            keypackage::clear_header(&env.data)
                    {
                        self.warn_conversation(group_id, &g.to_string())?;
                    }
                    self.emit(Event::Rejected { reason: e.to_string() });
                }
            }
            self.last_seq = seq;
        }
        // Acknowledge only now: everything up to `last` is stored (or was rejected for good).
        let _: v1::AckResponse = self
            .call(method::ACK, &v1::AckRequest { seq_up_to: last, ..Default::default() })
            .await?;
        for id in names_needed {
            self.name_of(&id).await;
        }
        proposals.dedup();
        for conv in proposals {
            // Someone left: as an admin, make it take effect.
            if self.vault.get(Space::State, &commit_key(&conv))?.is_some() {
                continue; // one commit of ours at a time; the next sync gets back to it
            }
            let pending = self.vault.atomic(|| -> Result<_, ClientError> {
                let intent = Intent::Leave { ids: self.mls.leaving(&conv)? };
                match self.mls.commit_pending(&conv)? {
                    Some(out) => Ok(Some(self.stage_commit(&conv, out, false, None, intent, 0)?)),
                    None => Ok(None),
                }
            })?;
            if let Some(pending) = pending {
                self.deliver_commit(pending).await?;
            }
        }
        self.name_dms().await
    }

    /// Routes a queued message through the slots: a message of a later epoch than ours first
    /// catches the group up from the missed epochs' slots; a commit of our epoch is settled by
    /// the slot's first valid claim (which may be another copy); a commit of an earlier epoch
    /// lost its slot or was applied from it already. Returns whether the message is done with
    /// (`false`: process it from the queue as usual).
    async fn order_by_slot(&mut self, data: &[u8]) -> Result<bool, ClientError> {
        let Some(ClearHeader::Framed { group_id, epoch, content_type, .. }) =
            keypackage::clear_header(data)
        else {
            return Ok(false);
        };
        let conv = group_id.to_vec();
        let Ok(ours) = self.mls.epoch(&conv) else { return Ok(false) };
        if epoch > ours {
            self.catch_up(&conv, epoch).await?;
        }
        if content_type != keypackage::CONTENT_COMMIT {
            return Ok(false);
        }
        let Ok(ours) = self.mls.epoch(&conv) else { return Ok(true) }; // removed meanwhile
        if epoch < ours {
            return Ok(true); // a losing claim, or the winner we took from the slot
        }
        if epoch > ours {
            return Ok(false); // could not catch up: MLS rejects it, the user hears why
        }
        let slot = self.mls.slot(&conv)?;
        match self.resolve_slot(&conv, slot).await? {
            // A server without slots: the queue's order is all there is (no fork protection).
            Resolution::Unsupported => Ok(false),
            // Every claim is stored with its queued copies, so a commit in our queue that its
            // slot does not hold bypassed the ordering (a modified or pre-0.3 client): applying
            // it could fork us from the members that follow the slot.
            Resolution::Empty => {
                self.emit(Event::Rejected {
                    reason: "ignored a group change that was not claimed in its epoch's slot \
                             (sent by a client older than 0.3, or one that bypasses the \
                             ordering)"
                        .into(),
                });
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Names DMs joined before the peer's username was known.
    async fn name_dms(&mut self) -> Result<(), ClientError> {
        for mut c in self.conversations()? {
            let Some(peer) = c.peer.as_ref().and_then(|p| <[u8; 32]>::try_from(p.as_slice()).ok())
            else {
                continue;
            };
            if c.kind == ConvKind::Dm && c.name == hex(&peer[..6]) {
                let name = self.name_of(&peer).await;
                if name != c.name {
                    c.name = name;
                    self.save_conversation(&c)?;
                    self.emit(Event::Conversation { conv: c.id.clone() });
                }
            }
        }
        Ok(())
    }

    /// Processes one fetched envelope's data: MLS, then its effect on conversations and history.
    pub(crate) fn process_one(&self, data: &[u8]) -> Result<Vec<Event>, ClientError> {
        let incoming = self.mls.process(data)?;
        self.apply_incoming(incoming)
    }

    /// Applies what MLS made of an envelope: content decoding, history, conversations.
    pub(crate) fn apply_incoming(&self, incoming: Incoming) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        match incoming {
            Incoming::Joined { group_id, kind, members } => {
                let me = self.identity_key();
                let peer = members.iter().map(|m| m.identity).find(|id| *id != me);
                let (kind, name) = match kind {
                    Kind::Dm => (
                        ConvKind::Dm,
                        peer.and_then(|p| self.cached_name(&p))
                            .unwrap_or_else(|| peer.map(|p| hex(&p[..6])).unwrap_or_default()),
                    ),
                    _ => (
                        ConvKind::Group,
                        format!("group-{}", hex(&group_id[..4.min(group_id.len())])),
                    ),
                };
                self.new_conversation(
                    group_id.clone(),
                    kind,
                    name,
                    if kind == ConvKind::Dm { peer } else { None },
                )?;
                events.push(Event::Conversation { conv: group_id });
            }
            Incoming::Application { group_id, sender, plaintext } => {
                let content = Content::decode(&plaintext)?;
                match &content.body {
                    // A message sent again after its epoch was superseded
                    // (`resend_superseded`), which we had read the first time.
                    Body::Text { .. } | Body::File(_)
                        if self
                            .vault
                            .get(Space::State, &[b"mid/".as_slice(), &content.message_id].concat())?
                            .is_some() => {}
                    Body::Text { .. } | Body::File(_) => {
                        let entry = self.append(
                            &group_id,
                            |seq| {
                                HistoryEntry::from_content(seq, &sender, &content, now_ms())
                                    .unwrap_or_else(|| HistoryEntry::system(seq, String::new(), 0))
                            },
                            true,
                        )?;
                        events.push(Event::Message { conv: group_id, entry });
                    }
                    Body::Meta { name, topic } => {
                        // A group's name and topic are set by its admins; a DM has none to set.
                        let group =
                            self.conversation(&group_id)?.filter(|c| c.kind == ConvKind::Group);
                        let by_admin = self
                            .mls
                            .members(&group_id)?
                            .iter()
                            .any(|m| m.identity == sender && m.admin);
                        match group {
                            Some(mut c) if by_admin => {
                                c.name = name.clone();
                                c.topic = topic.clone();
                                self.save_conversation(&c)?;
                                events.push(Event::Conversation { conv: group_id });
                            }
                            _ => {
                                let who =
                                    self.cached_name(&sender).unwrap_or_else(|| hex(&sender[..6]));
                                let reason = match group {
                                    Some(_) => {
                                        format!("{who} tried to rename the group, not an admin")
                                    }
                                    None => format!("{who} tried to rename a direct conversation"),
                                };
                                events.push(Event::Rejected { reason });
                            }
                        }
                    }
                    Body::Typing { active } => {
                        events.push(Event::Typing { conv: group_id, who: sender, active: *active })
                    }
                    _ => {
                        if let Some(conv) = self.apply_effect(&sender, &content)? {
                            events.push(Event::Updated {
                                conv,
                                message_id: target_of(&content.body),
                            });
                        }
                    }
                }
            }
            Incoming::Commit { group_id, committer, added, removed, removed_us, .. } => {
                let who = |id: &[u8; 32]| self.cached_name(id).unwrap_or_else(|| hex(&id[..6]));
                let mut lines = Vec::new();
                if !added.is_empty() {
                    lines.push(format!(
                        "{} added {}",
                        who(&committer),
                        added.iter().map(who).collect::<Vec<_>>().join(", ")
                    ));
                }
                if !removed.is_empty() {
                    lines.push(format!(
                        "{} removed {}",
                        who(&committer),
                        removed.iter().map(who).collect::<Vec<_>>().join(", ")
                    ));
                }
                if removed_us && let Some(mut c) = self.conversation(&group_id)? {
                    c.topic = "you were removed from this group".into();
                    self.save_conversation(&c)?;
                }
                for line in lines {
                    let entry = self.append(
                        &group_id,
                        |seq| HistoryEntry::system(seq, line, now_ms()),
                        false,
                    )?;
                    events.push(Event::Message { conv: group_id.clone(), entry });
                }
                events.push(Event::Conversation { conv: group_id });
            }
            Incoming::Proposal { group_id, .. } => {
                events.push(Event::Proposal { conv: group_id.clone() });
                events.push(Event::Conversation { conv: group_id });
            }
        }
        Ok(events)
    }

    fn state_u64(&self, key: &[u8]) -> Result<u64, ClientError> {
        Ok(self
            .vault
            .get(Space::State, key)?
            .and_then(|v| v.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes))
    }

    // ----- files -----------------------------------------------------------------------

    /// Encrypts a file, uploads it in chunks (resuming after a dropped connection), and
    /// offers it in the conversation.
    pub async fn send_file(&mut self, conv: &[u8], path: &Path) -> Result<FileOffer, ClientError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let sealed_path = std::env::temp_dir().join(format!("qpq-upload-{}", hex(&random_id())));
        let sealed = {
            let input = std::io::BufReader::new(std::fs::File::open(path)?);
            let output = std::io::BufWriter::new(std::fs::File::create(&sealed_path)?);
            files::seal(&key, input, output)?
        };
        let upload =
            self.upload_blob(&sealed_path, &sealed.blob_id, sealed.sealed_size, &name).await;
        let _ = std::fs::remove_file(&sealed_path);
        upload?;
        let offer = FileOffer {
            blob_id: sealed.blob_id,
            size: sealed.plain_size,
            ciphertext_size: sealed.sealed_size,
            name,
            media_type: media_type(path),
            key,
            sha256: sealed.plain_sha256,
        };
        self.send(conv, Body::File(offer.clone())).await?;
        Ok(offer)
    }

    async fn upload_blob(
        &mut self,
        path: &Path,
        blob_id: &[u8; 32],
        total: u64,
        name: &str,
    ) -> Result<(), ClientError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(path)?;
        let mut offset = 0u64;
        let mut failures = 0;
        loop {
            file.seek(SeekFrom::Start(offset))?;
            let mut chunk = vec![0u8; CHUNK.min((total - offset) as usize)];
            file.read_exact(&mut chunk)?;
            let req = v1::UploadBlobRequest {
                blob_id: blob_id.to_vec(),
                total_size: total,
                offset,
                chunk,
                media_type: "application/octet-stream".into(),
            };
            match self.call::<_, v1::UploadBlobResponse>(method::UPLOAD_BLOB, &req).await {
                Ok(r) if r.complete => {
                    self.progress(Transfer { name: name.into(), done: total, total, upload: true });
                    return Ok(());
                }
                Ok(r) => {
                    offset = r.next_offset;
                    failures = 0;
                    self.progress(Transfer {
                        name: name.into(),
                        done: offset,
                        total,
                        upload: true,
                    });
                }
                Err(ClientError::Net(e)) if e.is_transient() && failures < RECONNECT_ATTEMPTS => {
                    failures += 1;
                    self.conn = None;
                    // Ask where to resume (empty chunk at offset 0 answers with the server's offset).
                    self.ensure_connected().await?;
                    let probe = v1::UploadBlobRequest {
                        blob_id: blob_id.to_vec(),
                        total_size: total,
                        offset: 0,
                        chunk: Vec::new(),
                        media_type: String::new(),
                    };
                    let r: v1::UploadBlobResponse = self.call(method::UPLOAD_BLOB, &probe).await?;
                    if r.complete {
                        return Ok(());
                    }
                    offset = r.next_offset;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Downloads, verifies and decrypts a file offer into `dir`; returns the file's path.
    ///
    /// The ciphertext goes to a hidden part file named after the blob first. A download that
    /// was cut off (connection lost, program stopped) resumes from what its part file holds;
    /// if the whole then fails the blob's hash, the part is discarded and the download starts
    /// over once.
    pub async fn download(
        &mut self,
        offer: &FileOffer,
        dir: &Path,
    ) -> Result<PathBuf, ClientError> {
        std::fs::create_dir_all(dir)?;
        // Named after the blob, not the offered name: unique, and never too long.
        let part = dir.join(format!(".{}.qpq-part", hex(&offer.blob_id)));
        let (mut intact, resumed_from) = self.fetch_blob(offer, &part, true).await?;
        if !intact && resumed_from > 0 {
            std::fs::remove_file(&part)?;
            (intact, _) = self.fetch_blob(offer, &part, false).await?;
        }
        if !intact {
            let _ = std::fs::remove_file(&part);
            return Err(FileCryptoError::Tampered.into());
        }
        // Decrypted into a file of our own, synced, and only then given its name: a crash never
        // leaves a truncated file under the offered name, and nothing existing is touched.
        let out = dir.join(format!(".{}.qpq-out", hex(&offer.blob_id)));
        let result = (|| -> Result<PathBuf, ClientError> {
            let input = std::io::BufReader::new(std::fs::File::open(&part)?);
            let file = std::fs::File::create(&out)?;
            let mut output = std::io::BufWriter::new(file);
            files::open(&offer.key, &offer.sha256, input, &mut output)?;
            let file = output.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok(files::place(&out, dir, &offer.name)?)
        })();
        // The part goes once it is decrypted, or if it cannot be (the offer is bad); after a
        // local failure (disk full, no permission) it stays, so the next try needs no download.
        let bad_offer = matches!(
            result,
            Err(ClientError::File(FileCryptoError::Tampered | FileCryptoError::HashMismatch))
        );
        if result.is_ok() || bad_offer {
            let _ = std::fs::remove_file(&part);
        }
        if result.is_err() {
            let _ = std::fs::remove_file(&out);
        }
        result
    }

    /// Completes `part` with the offer's ciphertext, from what it already holds if `resume`
    /// (otherwise from zero), and syncs it. Returns whether the whole matches the blob id (its
    /// SHA-256) and the offset it resumed from.
    async fn fetch_blob(
        &mut self,
        offer: &FileOffer,
        part: &Path,
        resume: bool,
    ) -> Result<(bool, u64), ClientError> {
        use sha2::Digest;
        use std::io::{Read, Seek, Write};
        let mut out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(part)?;
        let mut hash = sha2::Sha256::new();
        let mut offset = out.metadata()?.len();
        if !resume || offset > offer.ciphertext_size {
            out.set_len(0)?;
            offset = 0;
        }
        let mut held = std::io::BufReader::new(&out).take(offset);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = held.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        out.seek(std::io::SeekFrom::Start(offset))?;
        let resumed_from = offset;
        while offset < offer.ciphertext_size {
            let req = v1::DownloadBlobRequest {
                blob_id: offer.blob_id.to_vec(),
                offset,
                max_len: CHUNK as u32,
            };
            let r: v1::DownloadBlobResponse = self.call(method::DOWNLOAD_BLOB, &req).await?;
            if r.chunk.is_empty() {
                return Err(ClientError::Invalid("server returned an empty chunk".into()));
            }
            hash.update(&r.chunk);
            out.write_all(&r.chunk)?;
            offset += r.chunk.len() as u64;
            self.progress(Transfer {
                name: offer.name.clone(),
                done: offset,
                total: offer.ciphertext_size,
                upload: false,
            });
        }
        out.sync_all()?;
        Ok((<[u8; 32]>::from(hash.finalize()) == offer.blob_id, resumed_from))
    }

    /// The file offer of a history entry.
    pub fn offer_of(entry: &HistoryEntry) -> Option<FileOffer> {
        entry.file.clone()
    }
}

/// The engine's connection as the OPAQUE flows' [`opaque::flow::Call`].
struct Calls<'a>(&'a Connection);

impl opaque::flow::Call for Calls<'_> {
    type Error = ClientError;

    async fn call<Req, Resp>(&self, method: u16, req: &Req) -> Result<Resp, ClientError>
    where
        Req: prost::Message + Sync,
        Resp: prost::Message + Default,
    {
        Ok(self.0.call(method, req, Duration::ZERO).await?)
    }
}

fn target_of(body: &Body) -> [u8; 16] {
    match body {
        Body::Edit { target, .. } | Body::Delete { target } | Body::Reaction { target, .. } => {
            *target
        }
        Body::Receipt { up_to } => *up_to,
        _ => [0; 16],
    }
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    id
}

fn media_type(path: &Path) -> String {
    let ext =
        path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "md" | "log" => "text/plain",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
    .to_string()
}

/// `state` keys of remembered contacts: `contact/ ‖ username`.
const CONTACT_PREFIX: &[u8] = b"contact/";

fn contact_key(username: &str) -> Vec<u8> {
    [CONTACT_PREFIX, username.as_bytes()].concat()
}

/// The account key remembered for a username (trust on first use), and whether its safety
/// number was verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Contact {
    /// The account identity key.
    pub key: [u8; 32],
    /// Verified out of band (`qpq verify --mark`).
    pub verified: bool,
    /// When it was first seen (ms since the epoch; 0 if accepted again by `trust`).
    pub since_ms: u64,
}

/// `state` keys of pending commits: `commit/ ‖ group id`.
const COMMIT_PREFIX: &[u8] = b"commit/";

/// Messages of ours kept per conversation for `resend_superseded` (a ring: newer overwrite).
const RECENT_PER_CONVERSATION: u64 = 64;

/// `recent/‖len‖group id‖slot`, or the conversation's prefix without a slot.
fn recent_key(conv: &[u8], slot: Option<u64>) -> Vec<u8> {
    let mut k = [b"recent/".as_slice(), &conv_prefix(conv)].concat();
    if let Some(slot) = slot {
        k.push(slot as u8);
    }
    k
}

fn commit_key(conv: &[u8]) -> Vec<u8> {
    [COMMIT_PREFIX, conv].concat()
}

/// A BatchEnqueue of `payload` to `to` on the default channel with the default lifetime.
fn batch_request(to: Vec<Vec<u8>>, payload: Vec<u8>, id: [u8; 16]) -> v1::BatchEnqueueRequest {
    v1::BatchEnqueueRequest {
        recipient_keys: to,
        payload,
        channel_id: Vec::new(),
        ttl_secs: 0,
        message_id: id.to_vec(),
    }
}

fn keys32(keys: &[Vec<u8>]) -> Vec<[u8; 32]> {
    keys.iter().filter_map(|k| k.as_slice().try_into().ok()).collect()
}

/// Whether a failed commit delivery leaves the commit pending (the server may still take it,
/// or may already hold it) rather than dropped.
fn keeps_pending(e: &ClientError) -> bool {
    match e {
        ClientError::Net(n) => n.is_transient() || n.status() == Some(Status::Unauthorized),
        ClientError::NeedLogin => true,
        _ => false,
    }
}

/// A commit of ours that the server may or may not hold yet. Stored under
/// `state/commit/‖group id` in the vault transaction that creates the commit and removed in
/// the one that merges or drops it, so a crash at any point leaves either nothing or this
/// record; the next flush sends it again under the same message id (the server recognises the
/// repeat) and merges it.
#[derive(serde::Serialize, serde::Deserialize)]
struct PendingCommit {
    conv: Vec<u8>,
    commit: Vec<u8>,
    commit_to: Vec<Vec<u8>>,
    message_id: [u8; 16],
    welcome: Option<Vec<u8>>,
    welcome_to: Vec<Vec<u8>>,
    welcome_id: [u8; 16],
    /// Tell newcomers the group's name and topic once merged.
    #[serde(default)]
    announce: bool,
    /// The system line our history gets once merged.
    #[serde(default)]
    system: Option<String>,
    /// The slot this commit claims: its epoch's (PROTOCOL.md §6.9). Absent in 0.2 records,
    /// whose epoch is still the group's.
    #[serde(default)]
    slot: Option<[u8; 16]>,
    /// What the commit does, to make it again if another member's commit wins the slot.
    #[serde(default)]
    intent: Option<Intent>,
    /// How many times the change was already redone.
    #[serde(default)]
    attempt: u8,
}

/// What a commit of ours is for, so that it can be made again in the next epoch when another
/// member's commit wins the epoch's slot.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
enum Intent {
    /// Add these accounts with these KeyPackages (kept: a commit that lost had its Welcome
    /// never sent, so the packages were used for nothing).
    Add { kps: Vec<Vec<u8>>, ids: Vec<[u8; 32]> },
    /// Remove these accounts.
    Remove { ids: Vec<[u8; 32]> },
    /// Make an account an admin or not.
    Admin { id: [u8; 32], admin: bool },
    /// Update our own keys.
    Rotate,
    /// Commit the pending self-removals of these members.
    Leave { ids: Vec<[u8; 32]> },
}

/// Why trying a claim failed.
enum ClaimError {
    /// It fails a check every member makes alike: skip it.
    Invalid(String),
    /// Its private part fails for us: we cannot follow the group.
    CannotFollow(String),
    /// Our own storage or state failed: stop, roll back, try again later.
    Local(ClientError),
}

impl From<ClientError> for ClaimError {
    fn from(e: ClientError) -> Self {
        Self::Local(e)
    }
}

impl From<VaultError> for ClaimError {
    fn from(e: VaultError) -> Self {
        Self::Local(e.into())
    }
}

/// How a slot was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    /// The slot's first valid claim is our pending commit, now merged.
    Won,
    /// Another member's claim won and was applied (our commit, if any, staged again).
    Applied,
    /// The winner's private part failed here: we cannot follow the group (warned).
    Lost,
    /// The slot holds no claim.
    Empty,
    /// The server has no slots (older than 0.3).
    Unsupported,
    /// Claims, none valid.
    NoWinner,
}

/// How many times a change of ours is made again after losing its slot.
const MAX_REDO: u8 = 4;
/// At most this many epochs are applied by one catch-up (a guard, far above real gaps).
const MAX_CATCH_UP: usize = 100_000;
/// Claims read from one slot at most: the server's `max_slot_claims` default.
const MAX_SLOT_CLAIMS: u32 = 1024;

/// A message waiting for the server.
#[derive(serde::Serialize, serde::Deserialize)]
struct OutboxItem {
    conv: Vec<u8>,
    to: Vec<Vec<u8>>,
    payload: Vec<u8>,
    message_id: [u8; 16],
}
