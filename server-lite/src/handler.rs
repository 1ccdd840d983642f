//! RPC handlers: decode the request message, check authentication and ownership, act on the
//! store, and encode the response. Every failure is an [`RpcError`] with a documented status.

mod account;
mod auth;
mod blob;
mod delivery;
mod keys;
mod slots;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use opaque_ke::ServerLogin;
use qpq_core::opaque::Suite;
use qpq_proto::{Message, Status, method};

use crate::hub::PushSender;
use crate::shared::Shared;
use crate::store::StoreError;

/// A failed RPC: the status byte and the `Error` payload's fields.
#[derive(Debug)]
pub struct RpcError {
    /// The response status.
    pub status: Status,
    /// Human-readable reason.
    pub message: String,
    /// Retry hint for RateLimited / Unavailable.
    pub retry_after_ms: u64,
}

impl RpcError {
    /// An error with no retry hint.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after_ms: 0 }
    }

    /// An error with a retry hint.
    pub fn retry(status: Status, message: impl Into<String>, after: std::time::Duration) -> Self {
        Self { status, message: message.into(), retry_after_ms: after.as_millis().max(1) as u64 }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(Status::BadRequest, message)
    }
}

impl From<StoreError> for RpcError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failure");
        match e {
            StoreError::WriterGone => Self::retry(
                Status::Unavailable,
                "server is shutting down",
                std::time::Duration::from_secs(1),
            ),
            _ => Self::new(Status::Internal, "storage error"),
        }
    }
}

type RpcResult = Result<Vec<u8>, RpcError>;

/// The authenticated principal of a connection.
#[derive(Clone, Debug)]
pub struct Bound {
    /// Ed25519 identity key.
    pub identity: [u8; 32],
    /// Username.
    pub username: String,
    /// Device id given at login (may be empty).
    pub device_id: Vec<u8>,
    /// SHA-256 of the session token.
    pub session: [u8; 32],
}

/// Per-connection state.
pub struct Conn {
    /// Server-wide state.
    pub shared: Arc<Shared>,
    /// The QUIC connection, closed when the session is ended elsewhere; `None` for a connection
    /// that exists only in-process (the fuzz harness, [`crate::fuzzing`]).
    conn: Option<quinn::Connection>,
    id: u64,
    ip: IpAddr,
    push: PushSender,
    bound: Mutex<Option<Bound>>,
    /// When this connection last refreshed its session's idle clock, ms.
    touched_ms: std::sync::atomic::AtomicU64,
    pending_login: Mutex<Option<(String, ServerLogin<Suite>)>>,
    /// Slots for calls whose responses can be megabytes (Fetch, Peek, DownloadBlob, FetchSlot,
    /// and a FetchWait once it has data): a connection holds at most this many such responses
    /// at once, however many streams it opens and however slowly it reads.
    pub large_responses: Arc<tokio::sync::Semaphore>,
}

/// Large responses one connection may have in flight.
pub const LARGE_RESPONSES_PER_CONNECTION: usize = 2;

/// Whether a method's response can be megabytes.
pub fn large_response(method_id: u16) -> bool {
    matches!(method_id, method::FETCH | method::PEEK | method::DOWNLOAD_BLOB | method::FETCH_SLOT)
}

impl Conn {
    /// State for a new connection.
    pub fn new(
        shared: Arc<Shared>,
        conn: quinn::Connection,
        id: u64,
        ip: IpAddr,
        push: PushSender,
    ) -> Self {
        Self::with_connection(shared, Some(conn), id, ip, push)
    }

    /// State for a connection without a QUIC connection behind it: requests come from the fuzz
    /// harness, and ending its session elsewhere cannot close anything.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn detached(shared: Arc<Shared>, id: u64, ip: IpAddr, push: PushSender) -> Self {
        Self::with_connection(shared, None, id, ip, push)
    }

    fn with_connection(
        shared: Arc<Shared>,
        conn: Option<quinn::Connection>,
        id: u64,
        ip: IpAddr,
        push: PushSender,
    ) -> Self {
        Self {
            shared,
            conn,
            id,
            ip,
            push,
            bound: Mutex::new(None),
            touched_ms: std::sync::atomic::AtomicU64::new(0),
            pending_login: Mutex::new(None),
            large_responses: Arc::new(tokio::sync::Semaphore::new(LARGE_RESPONSES_PER_CONNECTION)),
        }
    }

    /// The principal, or Unauthorized.
    pub(crate) fn principal(&self) -> Result<Bound, RpcError> {
        lock(&self.bound)
            .clone()
            .ok_or_else(|| RpcError::new(Status::Unauthorized, "log in or resume first"))
    }

    /// Binds the connection to `b` and registers it for pushes.
    pub(crate) fn bind(&self, b: Bound) {
        self.touched_ms.store(crate::store::now_ms(), std::sync::atomic::Ordering::Relaxed);
        let previous = lock(&self.bound).replace(b.clone());
        if let Some(prev) = previous {
            self.shared.hub.unregister(&prev.identity, self.id);
        }
        self.shared.hub.register(
            b.identity,
            self.id,
            b.device_id,
            b.session,
            self.push.clone(),
            self.conn.clone(),
        );
    }

    /// Drops the binding (logout, connection end).
    pub fn unbind(&self) {
        if let Some(prev) = lock(&self.bound).take() {
            self.shared.hub.unregister(&prev.identity, self.id);
        }
    }
}

/// Runs one RPC.
pub async fn dispatch(
    ctx: &Conn,
    method_id: u16,
    body: &[u8],
) -> (RpcResult, Option<tokio::sync::OwnedSemaphorePermit>) {
    let (result, slot) = if method_id == method::FETCH_WAIT {
        // A long poll takes a large-response slot only once it has data to return.
        match decode(body) {
            Ok(req) => delivery::fetch_wait(ctx, req).await,
            Err(e) => (Err(e), None),
        }
    } else {
        (call(ctx, method_id, body).await, None)
    };
    keep_session_alive(ctx).await;
    (result, slot)
}

/// A connection in use keeps its session from idling out: its idle clock is refreshed at most
/// hourly, so an active client costs one small write an hour, not one per call.
async fn keep_session_alive(ctx: &Conn) {
    use std::sync::atomic::Ordering;
    let Some(session) = lock(&ctx.bound).as_ref().map(|b| b.session) else { return };
    let now = crate::store::now_ms();
    if now.saturating_sub(ctx.touched_ms.load(Ordering::Relaxed)) < 3_600_000 {
        return;
    }
    ctx.touched_ms.store(now, Ordering::Relaxed);
    if let Err(e) = ctx.shared.store.touch_session(session, now).await {
        tracing::warn!(error = %e, "could not refresh session");
    }
}

async fn call(ctx: &Conn, method_id: u16, body: &[u8]) -> RpcResult {
    use method::*;
    match method_id {
        OPAQUE_REGISTER_START => auth::register_start(ctx, decode(body)?).await,
        OPAQUE_REGISTER_FINISH => auth::register_finish(ctx, decode(body)?).await,
        OPAQUE_LOGIN_START => auth::login_start(ctx, decode(body)?).await,
        OPAQUE_LOGIN_FINISH => auth::login_finish(ctx, decode(body)?).await,
        RESUME => auth::resume(ctx, decode(body)?).await,
        LOGOUT => auth::logout(ctx, decode(body)?).await,
        ENQUEUE => delivery::enqueue(ctx, decode(body)?).await,
        BATCH_ENQUEUE => delivery::batch_enqueue(ctx, decode(body)?).await,
        FETCH => delivery::fetch(ctx, decode(body)?).await,
        PEEK => delivery::peek(ctx, decode(body)?).await,
        ACK => delivery::ack(ctx, decode(body)?).await,
        RELAY_EPHEMERAL => delivery::relay(ctx, decode(body)?).await,
        CLAIM_SLOT => slots::claim_slot(ctx, decode(body)?).await,
        FETCH_SLOT => slots::fetch_slot(ctx, decode(body)?).await,
        UPLOAD_KEY_PACKAGE => keys::upload_key_package(ctx, decode(body)?).await,
        FETCH_KEY_PACKAGE => keys::fetch_key_package(ctx, decode(body)?).await,
        KEY_PACKAGE_STOCK => keys::stock(ctx, decode(body)?).await,
        UPLOAD_HYBRID_KEY => keys::upload_hybrid_key(ctx, decode(body)?).await,
        FETCH_HYBRID_KEY => keys::fetch_hybrid_key(ctx, decode(body)?).await,
        FETCH_HYBRID_KEYS => keys::fetch_hybrid_keys(ctx, decode(body)?).await,
        RESOLVE_USER => account::resolve_user(ctx, decode(body)?).await,
        RESOLVE_IDENTITY => account::resolve_identity(ctx, decode(body)?).await,
        UPLOAD_BLOB => blob::upload(ctx, decode(body)?).await,
        DOWNLOAD_BLOB => blob::download(ctx, decode(body)?).await,
        REGISTER_DEVICE => account::register_device(ctx, decode(body)?).await,
        LIST_DEVICES => account::list_devices(ctx, decode(body)?).await,
        REVOKE_DEVICE => account::revoke_device(ctx, decode(body)?).await,
        HEALTH => account::health(ctx, decode(body)?).await,
        DELETE_ACCOUNT => account::delete_account(ctx, decode(body)?).await,
        other => Err(RpcError::new(Status::UnknownMethod, format!("unknown method {other}"))),
    }
}

fn decode<T: Message + Default>(body: &[u8]) -> Result<T, RpcError> {
    T::decode(body).map_err(|e| RpcError::bad(format!("malformed request: {e}")))
}

fn ok<T: Message>(msg: T) -> RpcResult {
    Ok(msg.encode_to_vec())
}

/// A 32-byte key field, or BadRequest naming it.
fn key32(field: &str, bytes: &[u8]) -> Result<[u8; 32], RpcError> {
    bytes.try_into().map_err(|_| RpcError::bad(format!("{field} must be 32 bytes")))
}

/// An optional 16-byte id field (empty or exactly 16 bytes).
fn id16(field: &str, bytes: &[u8]) -> Result<(), RpcError> {
    match bytes.len() {
        0 | 16 => Ok(()),
        n => Err(RpcError::bad(format!("{field} must be empty or 16 bytes, got {n}"))),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
