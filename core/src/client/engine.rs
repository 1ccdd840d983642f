//! The client's async driver: one account's [`Session`] (connection, login), its [`State`]
//! (the synchronous protocol state over the [`LocalStore`]) and the calls between them.
//!
//! Each public method is a short sequence: ask the state what to send, send it over the
//! session, hand the answer back to the state, publish what the state reports. Group changes
//! live in `groups.rs`, file transfers in `transfer.rs`, both as more `impl Client` blocks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qpq_proto::{Status, method, v1};
use rand::Rng;
use tokio::sync::broadcast;

use super::error::ClientError;
use super::event::{ConnState, Event};
use super::history::{ConvKind, Conversation, HistoryEntry};
use super::local::{Contact, LocalStore};
use super::net::{Connection, NetError, Push};
use super::session::Session;
use super::state::{Effect, Resolution, Route, State, now_ms};
use crate::content::{Body, Content, FileOffer};
use crate::identity::{Identity, hex};
use crate::ids::{GroupId, IdentityKey, MessageId};
use crate::mls::{GroupError, Incoming, Mls};
use crate::vault::{KdfParams, Vault};

/// KeyPackages the client keeps on the server.
const KEY_PACKAGE_TARGET: u32 = 10;
/// Reconnect attempts before an operation gives up.
pub(crate) const RECONNECT_ATTEMPTS: u32 = 5;

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
    pub(crate) state: State,
    pub(crate) session: Session,
    events: broadcast::Sender<Event>,
    /// Shared with running transfers, so that one cancelled midway never takes it along.
    pub(crate) progress: Arc<std::sync::Mutex<Option<ProgressHook>>>,
    /// Whether a call made while offline reconnects (with retries) first. A UI turns it off
    /// and reconnects on its own schedule, so no command waits behind a retry loop.
    auto_reconnect: bool,
    pending_pushes: Vec<Push>,
    /// Look at every group's current slot at the next sync (set at start and by a gap).
    probe_slots: bool,
}

/// Called after every uploaded or downloaded chunk with (bytes done, bytes in all).
pub type ProgressHook = Box<dyn FnMut(u64, u64) + Send + Sync>;

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
            Self::assemble(vault, identity, o.username.clone(), o.server, o.pin.clone())?;
        let mut registered = false;
        let result = async {
            // Without a pin given, the certificate of this first connection is the account's
            // pin (trust on first use, here and nowhere else). The identity, the server and
            // the pin land in one transaction: no store of this account ever lacks its pin,
            // so a missing one later means the store was edited (`ClientError::PinMissing`).
            let pin = match client.session.pin() {
                Some(pin) => pin.to_string(),
                None => client.session.first_contact().await?,
            };
            let seed: &[u8; 32] =
                seed.as_slice().try_into().map_err(|_| ClientError::Internal("seed size"))?;
            client.state.store.create_account(seed, &o.username, o.server, &pin)?;
            if !client.session.is_online() {
                client.session.dial().await?;
            }
            let identity = client.identity_key();
            client.session.register(&o.username, &o.password, &identity, &o.invite).await?;
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
    /// ([`crate::vault::VaultError::RolledBack`] and its siblings), or an account without its
    /// pinned server certificate ([`ClientError::PinMissing`]).
    pub fn open(store: &Path, passphrase: &str) -> Result<Self, ClientError> {
        let vault = Arc::new(Vault::open(store, passphrase.as_bytes())?);
        let account = LocalStore::new(vault.clone()).account()?;
        let pin = account.pin.ok_or(ClientError::PinMissing)?;
        Self::assemble(
            vault,
            Identity::from_seed(&account.seed),
            account.username,
            account.server,
            Some(pin),
        )
    }

    pub(crate) fn assemble(
        vault: Arc<Vault>,
        identity: Identity,
        username: String,
        server: SocketAddr,
        pin: Option<String>,
    ) -> Result<Self, ClientError> {
        let (events, _) = broadcast::channel(1024);
        let mls = Mls::new(vault.clone(), identity);
        Ok(Self {
            state: State::new(LocalStore::new(vault), mls, username)?,
            session: Session::new(server, pin),
            events,
            progress: Arc::default(),
            auto_reconnect: true,
            pending_pushes: Vec::new(),
            probe_slots: true,
        })
    }

    /// How long a silent connection lives before it is declared dead (default
    /// [`IDLE_TIMEOUT`](super::net::IDLE_TIMEOUT)). Applies from the next connection on.
    pub fn set_idle_timeout(&mut self, t: Duration) {
        self.session.set_idle_timeout(t.max(Duration::from_millis(300)));
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
        if let Ok(mut h) = self.progress.lock() {
            *h = hook;
        }
    }

    /// Our username.
    pub fn username(&self) -> &str {
        self.state.username()
    }

    /// Our identity key.
    pub fn identity_key(&self) -> IdentityKey {
        self.state.identity_key().into()
    }

    /// The server address.
    pub fn server(&self) -> SocketAddr {
        self.session.server()
    }

    /// Uses another address for the account's server from now on in this process (it moved,
    /// or a test restarted it on another port). Not stored; the pinned certificate still has
    /// to match.
    pub fn set_server(&mut self, addr: SocketAddr) {
        self.session.set_server(addr);
    }

    /// The pinned certificate fingerprint.
    pub fn pinned_fingerprint(&self) -> Option<&str> {
        self.session.pin()
    }

    /// Event stream.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether a live connection exists.
    pub fn is_online(&self) -> bool {
        self.session.is_online()
    }

    /// Publishes what the state reported, then `e`.
    pub(crate) fn emit(&self, e: Event) {
        self.publish();
        let _ = self.events.send(e);
    }

    /// Publishes what the state reported.
    pub(crate) fn publish(&self) {
        while let Some(e) = self.state.poll_event() {
            let _ = self.events.send(e);
        }
    }

    /// Closes the connection cleanly.
    pub async fn disconnect(&mut self) {
        self.session.close().await;
        self.emit(Event::Connection(ConnState::Offline));
    }

    /// Connects and resumes the stored session. [`ClientError::NeedLogin`] if there is none
    /// or it expired.
    pub async fn connect(&mut self) -> Result<(), ClientError> {
        self.session.dial().await?;
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
        self.session.dialer()
    }

    /// Adopts a connection from [`Client::dialer`], resumes the session on it and delivers
    /// the outbox: the fast half of a reconnect (a few round trips).
    pub async fn resume_on(&mut self, conn: Connection) -> Result<(), ClientError> {
        self.session.adopt(conn).await;
        self.resume().await?;
        self.flush_outbox().await?;
        Ok(())
    }

    /// Resumes the stored session on the current connection.
    pub(crate) async fn resume(&mut self) -> Result<(), ClientError> {
        let Some(token) = self.state.store.token()? else {
            // Not kept: an unauthenticated connection is no reason to look online.
            self.session.lose();
            return Err(ClientError::NeedLogin);
        };
        match self.session.resume(&token).await {
            Ok(()) => {
                self.emit(Event::Connection(ConnState::Online));
                Ok(())
            }
            Err(ClientError::NeedLogin) => {
                self.state.store.forget_token()?;
                Err(ClientError::NeedLogin)
            }
            Err(e) => Err(e),
        }
    }

    /// Logs in with the password (OPAQUE) and stores the session token.
    pub async fn login(&mut self, password: &str) -> Result<(), ClientError> {
        if !self.is_online() {
            self.session.dial().await?;
        }
        let me = self.identity_key();
        let token = self.session.login(self.state.username(), password, &me).await?;
        self.state.store.set_token(&token)?;
        self.emit(Event::Connection(ConnState::Online));
        self.ensure_key_packages().await?;
        Ok(())
    }

    /// Reconnects with exponential backoff and jitter if the connection is gone, then
    /// delivers the outbox.
    pub async fn ensure_connected(&mut self) -> Result<(), ClientError> {
        if self.is_online() {
            return Ok(());
        }
        self.session.lose();
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
    pub(crate) async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        method_id: u16,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.ensure_connected().await?;
        match self.session.call_once(method_id, req).await {
            Err(NetError::Connection(_) | NetError::Timeout) => {
                // The connection is dead (or silently gone): redial once and retry.
                self.ensure_connected().await?;
                Ok(self.session.call_once(method_id, req).await?)
            }
            Err(e) if e.status() == Some(Status::Unauthorized) => Err(ClientError::NeedLogin),
            other => Ok(other?),
        }
    }

    /// The cached username of an identity, without asking the server.
    pub fn cached_name(&self, id: &[u8]) -> Option<String> {
        self.state.cached_name(id)
    }

    /// The account key remembered for a username, if any.
    pub fn contact(&self, username: &str) -> Result<Option<Contact>, ClientError> {
        self.state.store.contact(username)
    }

    /// Every remembered contact, by username.
    pub fn contacts(&self) -> Result<Vec<(String, Contact)>, ClientError> {
        self.state.store.contacts()
    }

    /// Marks a contact verified (its safety number was compared out of band).
    pub fn mark_verified(&self, username: &str, verified: bool) -> Result<(), ClientError> {
        self.state.mark_verified(username, verified)
    }

    /// Every conversation, most recent first.
    pub fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        self.state.conversations()
    }

    /// A conversation by id.
    pub fn conversation(&self, id: &GroupId) -> Result<Option<Conversation>, ClientError> {
        self.state.store.conversation(id)
    }

    /// Finds a conversation by its address (see `State::find_conversation`): `@name`, `#name`,
    /// a bare name only when unambiguous, or a hex id prefix.
    pub fn find_conversation(&self, address: &str) -> Result<Conversation, ClientError> {
        self.state.find_conversation(address)
    }

    /// How a conversation is written in lists and output: `@name` or `#name`, and a group
    /// named like a person says so.
    pub fn conversation_label(&self, c: &Conversation) -> Result<String, ClientError> {
        self.state.conversation_label(c)
    }

    /// The last `limit` history entries of a conversation, oldest first.
    pub fn history(&self, conv: &GroupId, limit: usize) -> Result<Vec<HistoryEntry>, ClientError> {
        self.state.store.history(conv, limit)
    }

    /// Up to `limit` history entries older than local seq `before`, oldest first.
    pub fn history_before(
        &self,
        conv: &GroupId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, ClientError> {
        self.state.store.history_before(conv, before, limit)
    }

    /// Marks a conversation read; returns the last message id, for a read receipt.
    pub fn mark_read(&self, conv: &GroupId) -> Result<Option<MessageId>, ClientError> {
        self.state.mark_read(conv)
    }

    /// The history entry of a message id (ours or a peer's), with its conversation.
    pub fn entry(
        &self,
        message_id: &MessageId,
    ) -> Result<Option<(GroupId, HistoryEntry)>, ClientError> {
        self.state.store.entry(message_id)
    }

    /// A local setting (stored encrypted in the vault).
    pub fn setting(&self, key: &str) -> Result<Option<String>, ClientError> {
        Ok(self.state.store.setting(key)?)
    }

    /// Stores a local setting.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), ClientError> {
        Ok(self.state.store.set_setting(key, value)?)
    }

    /// Messages waiting in the outbox (counted without decrypting them).
    pub fn outbox_len(&self) -> Result<usize, ClientError> {
        Ok(self.state.store.outbox_len()?)
    }

    /// The file offer of a history entry.
    pub fn offer_of(entry: &HistoryEntry) -> Option<FileOffer> {
        entry.file.clone()
    }

    // ----- directory -----------------------------------------------------------------

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
                self.state.mls.last_resort_key_package()?
            } else {
                self.state.mls.key_package()?
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
    pub async fn resolve(&mut self, username: &str) -> Result<IdentityKey, ClientError> {
        let r = self
            .call::<_, v1::ResolveUserResponse>(
                method::RESOLVE_USER,
                &v1::ResolveUserRequest { username: username.into() },
            )
            .await;
        match r {
            Ok(r) => {
                let id: [u8; 32] = r
                    .identity_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| ClientError::PeerInvalid("an identity key is not 32 bytes"))?;
                self.state.check_contact(username, id)?;
                self.state.remember_name(id, username)?;
                Ok(id.into())
            }
            Err(ClientError::Net(e)) if e.status() == Some(Status::NotFound) => {
                Err(ClientError::UnknownUser(username.into()))
            }
            Err(e) => Err(e),
        }
    }

    /// The username of an identity (cached; asks the server once).
    pub async fn name_of(&mut self, id: &IdentityKey) -> String {
        if *id == self.identity_key() {
            return self.state.username().to_string();
        }
        if let Some(n) = self.state.known_name(id) {
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
                let _ = self.state.remember_name(id.to_bytes(), &r.username);
                r.username
            }
            Err(_) => hex(&id[..6]),
        }
    }

    /// Accepts the key the server gives for `username` now (after a [`ClientError::KeyChanged`]
    /// the user looked into); the contact is unverified again. Returns (old key, new key).
    pub async fn trust(
        &mut self,
        username: &str,
    ) -> Result<(Option<IdentityKey>, IdentityKey), ClientError> {
        let old = self.contact(username)?.map(|c| c.key);
        self.state.store.forget_contact(username)?;
        match self.resolve(username).await {
            Ok(new) => Ok((old, new)),
            Err(e) => {
                if let Some(key) = old {
                    self.state
                        .store
                        .save_contact(username, &Contact { key, verified: false, since_ms: 0 })?;
                }
                Err(e)
            }
        }
    }

    // ----- sending and receiving ----------------------------------------------------

    /// Encrypts `body` for a conversation, records it (history and outbox, atomically with
    /// the MLS state), then tries to deliver it. Returns the message id. Offline, the message
    /// stays in the outbox and goes out on the next connect.
    pub async fn send(&mut self, conv: &GroupId, body: Body) -> Result<MessageId, ClientError> {
        // Receivers take a name or topic only from a group's admin: do not show one locally
        // that they will reject.
        if matches!(body, Body::Meta { .. }) {
            if !self.conversation(conv)?.is_some_and(|c| c.kind == ConvKind::Group) {
                return Err(ClientError::NotAGroup);
            }
            let me = self.identity_key();
            if !self.state.mls.members(conv)?.iter().any(|m| m.identity == me && m.admin) {
                return Err(GroupError::NotAdmin.into());
            }
        }
        // A message encrypted while our own commit is pending would be readable by the
        // membership that commit ends: settle the commit first (it needs the server).
        if self.state.store.has_pending_commit(conv)? {
            let _ = self.flush_outbox().await;
            if self.state.store.has_pending_commit(conv)? {
                return Err(ClientError::ChangePending);
            }
        }
        let content = Content::new(body, now_ms());
        let me = self.identity_key();
        let entry = self.state.store.atomic(|| self.state.record_send(conv, &me, &content))?;
        if let Some(entry) = entry {
            self.emit(Event::Message { conv: conv.clone(), entry });
        }
        // Our edit, delete or reaction changed an entry: say which (a UI updates just that).
        if let Body::Edit { target, .. } | Body::Delete { target } | Body::Reaction { target, .. } =
            &content.body
        {
            self.emit(Event::Updated { conv: conv.clone(), message_id: *target });
        }
        match self.flush_outbox().await {
            Ok(_) | Err(ClientError::Net(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(content.message_id)
    }

    /// Sends a text message.
    pub async fn send_text(
        &mut self,
        conv: &GroupId,
        text: &str,
    ) -> Result<MessageId, ClientError> {
        self.send(conv, Body::Text { body: text.to_string(), reply_to: None }).await
    }

    /// Tells the conversation's connected members that we are typing (not stored anywhere).
    pub async fn send_typing(&mut self, conv: &GroupId, active: bool) -> Result<(), ClientError> {
        let content = Content::new(Body::Typing { active }, now_ms()).encode()?;
        let (ciphertext, to) = self
            .state
            .store
            .atomic(|| self.state.mls.encrypt(conv, &content).map_err(ClientError::from))?;
        let req = v1::RelayEphemeralRequest {
            recipient_keys: to.iter().map(|k| k.to_vec()).collect(),
            payload: ciphertext,
            channel_id: Vec::new(),
        };
        let _: v1::RelayEphemeralResponse = self.call(method::RELAY_EPHEMERAL, &req).await?;
        Ok(())
    }

    /// Delivers what waits for the server: queued messages in order, then our pending
    /// commits (which a crash or a lost connection may have left), then what merging them
    /// queued (Welcomes). Stops at the first network failure.
    pub async fn flush_outbox(&mut self) -> Result<usize, ClientError> {
        let r = self.flush_all().await;
        self.publish();
        r
    }

    async fn flush_all(&mut self) -> Result<usize, ClientError> {
        let mut sent = self.flush_items().await?;
        let pending = self.state.store.pending_commits()?;
        if pending.is_empty() {
            return Ok(sent);
        }
        for pending in pending {
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
    pub(crate) async fn flush_items(&mut self) -> Result<usize, ClientError> {
        let mut sent = 0;
        for (key, item) in self.state.store.outbox()? {
            let to: Vec<[u8; 32]> =
                item.to.iter().filter_map(|t| t.as_slice().try_into().ok()).collect();
            if !self.session.is_online() {
                return Err(ClientError::Net(NetError::Connection("offline".into())));
            }
            let req = batch_request(
                to.iter().map(|k| k.to_vec()).collect(),
                item.payload.clone(),
                item.message_id,
            );
            let r: Result<v1::BatchEnqueueResponse, NetError> =
                self.session.call_once(method::BATCH_ENQUEUE, &req).await;
            match r {
                // Recipients whose copy the server did not store (seq 0): say who, and why.
                Ok(resp) => self.report_refusals("message", &to, &resp.seqs, &resp.refusals),
                Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                    self.session.lose();
                    return Err(e.into());
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                // The session is gone: the message waits for a login, it is not refused.
                Err(e) if e.status() == Some(Status::Unauthorized) => {
                    return Err(ClientError::NeedLogin);
                }
                Err(e) => {
                    // A permanent refusal (e.g. too large): drop it rather than block the queue.
                    self.emit(Event::Rejected { reason: format!("message not delivered: {e}") });
                }
            }
            self.state.delivered(&key, &item)?;
            self.publish();
            sent += 1;
        }
        Ok(sent)
    }

    /// Fetches, processes and acknowledges everything queued; returns how many messages.
    pub async fn sync(&mut self) -> Result<usize, ClientError> {
        let r = self.sync_queue().await;
        self.publish();
        r
    }

    async fn sync_queue(&mut self) -> Result<usize, ClientError> {
        self.state.resolved.clear();
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
        if std::mem::take(&mut self.probe_slots) {
            if let Err(e) = self.catch_up_all().await {
                self.probe_slots = true; // the next sync tries again
                return Err(e);
            }
            // Leave proposals processed just before a crash (stored and acknowledged, the
            // commit not yet staged) are committed now.
            self.commit_all_proposals().await?;
        }
        self.commit_deferred_leaves().await?;
        if self.state.take_queued() {
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

    pub(crate) async fn drain_pushes(&mut self) -> Result<(), ClientError> {
        for p in std::mem::take(&mut self.pending_pushes) {
            self.handle_push(p).await?;
        }
        while let Some(p) = self.session.try_push() {
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
                    Some(env) if env.seq != 0 && env.seq <= self.state.last_seq() => {}
                    Some(env)
                        if !env.data.is_empty()
                            && Some(env.seq) == self.state.last_seq().checked_add(1) =>
                    {
                        self.process_envelopes(vec![env]).await?;
                    }
                    _ => self.sync_once().await?,
                }
            }
            method::PUSH_TYPING => {
                let Ok(t) = v1::TypingIndicator::decode(p.payload.as_slice()) else {
                    return Ok(());
                };
                let result = self.state.store.atomic(|| {
                    self.state.mls.process_ephemeral(&t.payload).map_err(ClientError::from)
                });
                if let Ok(Incoming::Application { group_id, sender, plaintext }) = result
                    && let Ok(Content { body: Body::Typing { active }, .. }) =
                        Content::decode(&plaintext)
                {
                    self.emit(Event::Typing { conv: group_id.into(), who: sender.into(), active });
                }
            }
            method::PUSH_KEY_PACKAGES_LOW => {
                // Whoever fetches our packages decides how often this comes (every fetch below
                // the low-water mark): top up from these pushes at most once a minute. The
                // last-resort package covers the gaps.
                const EVERY_MS: u64 = 60_000;
                let (now, last) = (now_ms(), self.state.store.key_package_top_up_ms()?);
                if now.saturating_sub(last) >= EVERY_MS || last > now {
                    self.state.store.set_key_package_top_up_ms(now)?;
                    self.ensure_key_packages().await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) async fn sync_once(&mut self) -> Result<(), ClientError> {
        let r: v1::FetchResponse = self
            .call(method::FETCH, &v1::FetchRequest { limit: 100, ..Default::default() })
            .await?;
        self.process_envelopes(r.payloads).await
    }

    /// Processes fetched envelopes in queue order, then acknowledges them: only once each is
    /// stored (or rejected for good), so a crash fetches the rest again.
    pub(crate) async fn process_envelopes(
        &mut self,
        envs: Vec<v1::Envelope>,
    ) -> Result<(), ClientError> {
        let Some(last) = envs.last().map(|e| e.seq) else { return Ok(()) };
        let mut effects = Vec::new();
        for env in envs {
            if env.seq <= self.state.last_seq() {
                continue; // already stored; the ack was lost
            }
            // Each envelope is a durable commit (an fsync): let the connection's keep-alives
            // and acks run between them on a slow disk.
            tokio::task::yield_now().await;
            if self.state.check_gap(env.seq) {
                self.probe_slots = true;
            }
            // Group changes go through the epoch's slot, not the queue's order (§6.9).
            if self.order_by_slot(&env.data).await? {
                self.state.skip(env.seq)?;
                continue;
            }
            match self.state.handle_envelope(env.seq, &env.data) {
                Ok(more) => effects.extend(more),
                // Our own storage failed: acknowledge only what is stored, so the message is
                // fetched again next time rather than lost.
                Err(e) => {
                    let done = self.state.last_seq();
                    if done > 0 && done < env.seq {
                        let _: Result<v1::AckResponse, _> = self
                            .call(
                                method::ACK,
                                &v1::AckRequest { seq_up_to: done, ..Default::default() },
                            )
                            .await;
                    }
                    self.publish();
                    return Err(e);
                }
            }
            self.publish();
        }
        // Acknowledge only now: everything up to `last` is stored (or was rejected for good).
        let _: v1::AckResponse = self
            .call(method::ACK, &v1::AckRequest { seq_up_to: last, ..Default::default() })
            .await?;
        let mut proposals = Vec::new();
        for effect in effects {
            match effect {
                Effect::LearnName(id) => {
                    self.name_of(&id.into()).await;
                }
                Effect::CommitProposals(conv) if !proposals.contains(&conv) => proposals.push(conv),
                Effect::CommitProposals(_) => {}
            }
        }
        for conv in proposals {
            // Someone left: as an admin, make it take effect.
            if let Some(pending) = self.state.stage_proposals(&conv)? {
                self.deliver_commit(pending).await?;
            }
        }
        self.name_dms().await
    }

    /// Routes a queued message through the slots (see [`Route`]): a message of a later epoch
    /// than ours first catches the group up from the missed epochs' slots; a commit of our
    /// epoch is settled by the slot's first valid claim (which may be another copy); a commit
    /// of an earlier epoch lost its slot or was applied from it already. Returns whether the
    /// message is done with (`false`: process it from the queue as usual).
    pub(crate) async fn order_by_slot(&mut self, data: &[u8]) -> Result<bool, ClientError> {
        let mut route = self.state.route(data, false)?;
        if let Route::CatchUp { conv, epoch } = &route {
            self.catch_up(conv, *epoch).await?;
            route = self.state.route(data, true)?;
        }
        let (conv, slot) = match route {
            Route::Direct | Route::CatchUp { .. } => return Ok(false),
            Route::Settled => return Ok(true),
            Route::Slot { conv, slot } => (conv, slot),
        };
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
    pub(crate) async fn name_dms(&mut self) -> Result<(), ClientError> {
        for mut c in self.conversations()? {
            let Some(peer) = c.peer else { continue };
            if c.kind == ConvKind::Dm && c.name == peer.short() {
                let name = self.name_of(&peer).await;
                if name != c.name {
                    c.name = name;
                    self.state.store.save_conversation(&c)?;
                    self.emit(Event::Conversation { conv: c.id.clone() });
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` until a push arrives or the queue is non-empty, without
    /// processing anything: safe to cancel (a UI drops it when the user acts). Call
    /// [`Client::sync`] afterwards.
    pub async fn wait_for_activity(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.ensure_connected().await?;
        if let Some(p) = self.session.wait_for_activity(timeout).await? {
            self.pending_pushes.push(p);
        }
        Ok(())
    }

    /// The event stream's sender (for detached work that reports progress).
    pub(crate) fn event_sender(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }
}

/// A BatchEnqueue of `payload` to `to` on the default channel with the default lifetime.
pub(crate) fn batch_request(
    to: Vec<Vec<u8>>,
    payload: Vec<u8>,
    id: MessageId,
) -> v1::BatchEnqueueRequest {
    v1::BatchEnqueueRequest {
        recipient_keys: to,
        payload,
        channel_id: Vec::new(),
        ttl_secs: 0,
        message_id: id.to_vec(),
    }
}

/// Whether a failed commit delivery leaves the commit pending (the server may still take it,
/// or may already hold it) rather than dropped.
pub(crate) fn keeps_pending(e: &ClientError) -> bool {
    match e {
        ClientError::Net(n) => {
            n.is_transient()
                || n.status() == Some(Status::Unauthorized)
                || n.close_code() == Some(super::net::CloseCode::Revoked)
        }
        ClientError::NeedLogin => true,
        _ => false,
    }
}
