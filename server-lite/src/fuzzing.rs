//! In-process harness for the fuzz targets in `fuzz/` (cargo feature `fuzzing`; not part of the
//! server's API).
//!
//! [`Harness`] is the server's shared state on a real store in a directory the caller owns, with
//! limits sized for fuzzing ([`Harness::config`]). [`Connection`] is a connection without QUIC:
//! [`Connection::request`] runs one request through [`handle_request`], the same dispatch a
//! QUIC stream reaches in `server.rs` once its payload is read, and
//! [`Connection::take_pushes`] returns the push frames queued for it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opaque_ke::ServerSetup;
use qpq_core::opaque::{self, Suite};
use qpq_proto::{Message, Status};
use tokio::sync::mpsc;

use crate::config::{Config, Registration};
use crate::handler::{self, Bound, Conn, RpcError};
use crate::hub::{PUSH_QUEUE, PushFrame, Queued};
use crate::shared::Shared;
use crate::store::{RegisterOutcome, Store, StoreError, now_ms};

/// Runs one request on `conn` the way a QUIC stream does once its payload is read: refused
/// while draining, a large-response slot for Fetch/Peek/DownloadBlob/FetchSlot, then
/// [`handler::dispatch`]. The result is what the stream would send: the response message or
/// the error that becomes the `Error` payload.
pub async fn handle_request(conn: &Conn, method: u16, payload: &[u8]) -> Result<Vec<u8>, RpcError> {
    if conn.shared.is_draining() {
        return Err(RpcError::retry(
            Status::Unavailable,
            "server is shutting down",
            Duration::from_secs(1),
        ));
    }
    let _slot = if handler::large_response(method) {
        match conn.large_responses.clone().acquire_owned().await {
            Ok(p) => Some(p),
            // The semaphore is never closed; `serve_stream` would drop the stream here.
            Err(_) => {
                return Err(RpcError::retry(
                    Status::Unavailable,
                    "connection closing",
                    Duration::from_secs(1),
                ));
            }
        }
    } else {
        None
    };
    handler::dispatch(conn, method, payload).await.0
}

/// A server's shared state on a real store, without an endpoint.
pub struct Harness {
    shared: Arc<Shared>,
    next_conn: AtomicU64,
}

/// A user registered and logged in through the real handlers.
#[derive(Clone, Debug)]
pub struct Account {
    /// The connection binding its login produced.
    pub bound: Bound,
    /// The OPAQUE record the server stored, to recreate the user after a `DeleteAccount`.
    pub record: Vec<u8>,
}

impl Harness {
    /// Opens (creating) the store in `dir` with [`Harness::config`]'s limits.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(Self::config(dir)).await
    }

    /// Opens (creating) the store in `config.data_dir` with `config`'s limits.
    pub async fn open_with(config: Config) -> Result<Self, StoreError> {
        let dir = config.data_dir.clone();
        let store =
            Store::open(&config.db_path(), &dir.join("blobs"), config.limits.db_cache_bytes)?;
        let setup = store
            .meta_or_insert("opaque_setup", || {
                ServerSetup::<Suite>::new(&mut rand::rngs::OsRng).serialize().to_vec()
            })
            .await?;
        let opaque = ServerSetup::<Suite>::deserialize(&setup)
            .map_err(|_| StoreError::Corrupt("opaque setup"))?;
        Ok(Self {
            shared: Arc::new(Shared::new(config, store, opaque)),
            next_conn: AtomicU64::new(1),
        })
    }

    /// The configuration: the defaults, with open registration, auth and KeyPackage fetch rate
    /// limits too high to reach, long polls of at most 10 ms, and small queue, KeyPackage and
    /// blob limits so the store stays small however long a run lasts. The memory budget is out
    /// of reach too: a sanitizer's process is far larger than the server's, and the budget
    /// would drop pushes.
    pub fn config(dir: &Path) -> Config {
        let mut c = Config {
            data_dir: dir.to_path_buf(),
            registration: Registration::Open,
            ..Config::default()
        };
        let l = &mut c.limits;
        l.auth_per_ip_burst = 1 << 30;
        l.auth_per_ip_per_min = 1 << 30;
        l.auth_per_user_burst = 1 << 30;
        l.auth_per_user_per_min = 1 << 30;
        l.key_package_fetch_per_user_burst = 1 << 30;
        l.key_package_fetch_per_user_per_min = 1 << 30;
        l.key_package_fetch_per_target_burst = 1 << 30;
        l.key_package_fetch_per_target_per_min = 1 << 30;
        l.fetch_wait_max_ms = 10;
        l.max_queue_messages = 1000;
        l.max_queue_bytes = 4 << 20;
        l.max_batch_recipients = 16;
        l.max_key_packages = 10;
        l.max_blob_bytes = 256 << 10;
        l.blob_quota_bytes = 1 << 20;
        l.memory_budget_bytes = 1 << 40;
        c
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// A new, unauthenticated connection.
    pub fn connection(&self) -> Connection {
        let (push, pushes) = mpsc::channel(PUSH_QUEUE);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = Conn::detached(self.shared.clone(), id, IpAddr::V4(Ipv4Addr::LOCALHOST), push);
        Connection { conn, pushes }
    }

    /// Registers `username` with `identity` and logs in, each step through the real handlers
    /// on a fresh connection.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        identity: [u8; 32],
    ) -> Result<Account, RpcError> {
        let c = self.connection();
        opaque::flow::register(&c, username, password, &identity, "").await?;
        opaque::flow::login(&c, username, password, &identity).await?;
        let bound =
            c.bound().ok_or_else(|| RpcError::new(Status::Internal, "login did not bind"))?;
        let record = self
            .store()
            .login_record(username)?
            .ok_or_else(|| RpcError::new(Status::Internal, "registered user not found"))?
            .opaque_record;
        Ok(Account { bound, record })
    }

    /// Recreates `account`'s user (same name, identity and password) if a `DeleteAccount`
    /// removed it. Its KeyPackages, queues, devices and sessions stay gone.
    pub async fn restore(&self, account: &Account) -> Result<(), StoreError> {
        let b = &account.bound;
        if self.store().login_record(&b.username)?.is_some() {
            return Ok(());
        }
        match self
            .store()
            .register(b.username.clone(), b.identity, account.record.clone(), None, now_ms())
            .await?
        {
            RegisterOutcome::Created => Ok(()),
            _ => Err(StoreError::Corrupt("fuzz account could not be recreated")),
        }
    }
}

/// A connection without QUIC. Dropping it unbinds it, as the end of a QUIC connection does.
pub struct Connection {
    conn: Conn,
    pushes: mpsc::Receiver<Queued>,
}

impl Connection {
    /// Runs one request (see [`handle_request`]).
    pub async fn request(&self, method: u16, payload: &[u8]) -> Result<Vec<u8>, RpcError> {
        handle_request(&self.conn, method, payload).await
    }

    /// Runs one request with a typed request and response.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: u16,
        req: &Req,
    ) -> Result<Resp, RpcError> {
        let body = self.request(method, &req.encode_to_vec()).await?;
        Resp::decode(body.as_slice())
            .map_err(|_| RpcError::new(Status::Internal, "response does not decode"))
    }

    /// Binds the connection as a successful login or resume would.
    pub fn bind(&self, bound: Bound) {
        self.conn.bind(bound);
    }

    /// The principal the connection is bound to, if any.
    pub fn bound(&self) -> Option<Bound> {
        self.conn.principal().ok()
    }

    /// The push frames queued for this connection since the last call.
    pub fn take_pushes(&mut self) -> Vec<PushFrame> {
        std::iter::from_fn(|| self.pushes.try_recv().ok()).map(|q| q.frame).collect()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.conn.unbind();
    }
}

impl opaque::flow::Call for Connection {
    type Error = RpcError;

    async fn call<Req, Resp>(&self, method: u16, req: &Req) -> Result<Resp, RpcError>
    where
        Req: Message + Sync,
        Resp: Message + Default,
    {
        Connection::call(self, method, req).await
    }
}

impl From<opaque::OpaqueClientError> for RpcError {
    fn from(e: opaque::OpaqueClientError) -> Self {
        RpcError::new(Status::Internal, format!("OPAQUE step failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qpq_proto::{method, v1};

    #[tokio::test]
    async fn requests_run_unauthenticated_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let h = Harness::open(dir.path()).await.unwrap();
        let alice = h.register("alice", "pw", [1; 32]).await.unwrap();
        let bob = h.register("bob", "pw", [2; 32]).await.unwrap();

        let anon = h.connection();
        assert_eq!(
            anon.request(method::FETCH, &[]).await.unwrap_err().status,
            Status::Unauthorized
        );
        assert_eq!(anon.request(9999, &[]).await.unwrap_err().status, Status::UnknownMethod);
        let health: v1::HealthResponse =
            anon.call(method::HEALTH, &v1::HealthRequest {}).await.unwrap();
        assert_eq!(health.registration, "open");

        let mut b = h.connection();
        b.bind(bob.bound.clone());
        let a = h.connection();
        a.bind(alice.bound.clone());
        let req = v1::EnqueueRequest {
            recipient_key: vec![2; 32],
            payload: b"hi".to_vec(),
            ..Default::default()
        };
        let _: v1::EnqueueResponse = a.call(method::ENQUEUE, &req).await.unwrap();
        let pushes = b.take_pushes();
        assert_eq!(pushes.len(), 1);
        let (head, _) = qpq_proto::frame::decode_push(&pushes[0]).unwrap();
        assert_eq!(head.event, method::PUSH_NEW_MESSAGE);

        let _: v1::DeleteAccountResponse =
            a.call(method::DELETE_ACCOUNT, &v1::DeleteAccountRequest {}).await.unwrap();
        assert!(a.bound().is_none());
        assert!(h.store().login_record("alice").unwrap().is_none());
        h.restore(&alice).await.unwrap();
        assert_eq!(h.store().login_record("alice").unwrap().unwrap().identity, [1; 32]);
    }
}
