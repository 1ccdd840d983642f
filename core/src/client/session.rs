//! The connection to the account's server: dialing the pinned certificate, resuming the
//! session, calls on the current connection. It knows nothing of the outbox, the groups or
//! the local store: what to do after connecting is the driver's choice ([`super::engine`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qpq_proto::{Status, method, v1};
use tokio::sync::mpsc;

use super::error::ClientError;
use super::net::{Connection, NetError, Push};
use crate::opaque;

/// One account's link to its server.
pub(crate) struct Session {
    server: SocketAddr,
    pin: Option<String>,
    conn: Option<Arc<Connection>>,
    push_tx: mpsc::Sender<Push>,
    push_rx: mpsc::Receiver<Push>,
    idle_timeout: Duration,
}

impl Session {
    pub fn new(server: SocketAddr, pin: Option<String>) -> Self {
        let (push_tx, push_rx) = mpsc::channel(256);
        Self { server, pin, conn: None, push_tx, push_rx, idle_timeout: super::net::IDLE_TIMEOUT }
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Uses another address from now on; the current connection is dropped.
    pub fn set_server(&mut self, addr: SocketAddr) {
        if addr != self.server {
            self.server = addr;
            self.conn = None;
        }
    }

    pub fn pin(&self) -> Option<&str> {
        self.pin.as_deref()
    }

    pub fn set_idle_timeout(&mut self, t: Duration) {
        self.idle_timeout = t;
    }

    pub fn is_online(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.is_closed())
    }

    /// The current connection.
    pub fn connection(&self) -> Result<&Arc<Connection>, NetError> {
        self.conn.as_ref().ok_or(NetError::Connection("not connected".into()))
    }

    /// Forgets the current connection (it failed, or it is not to be used any more).
    pub fn lose(&mut self) {
        self.conn = None;
    }

    /// The first contact of a registration: trusts whichever certificate answers, and returns
    /// its fingerprint for the caller to pin. Nothing else dials without a pin.
    pub async fn first_contact(&mut self) -> Result<String, ClientError> {
        let conn = Connection::connect(
            self.server,
            "localhost",
            None,
            self.push_tx.clone(),
            self.idle_timeout,
        )
        .await?;
        let pin = conn.fingerprint.clone();
        self.pin = Some(pin.clone());
        self.conn = Some(Arc::new(conn));
        Ok(pin)
    }

    /// Opens the QUIC connection to the pinned certificate. No login. Without a pin this is
    /// [`ClientError::PinMissing`] before any packet is sent.
    pub async fn dial(&mut self) -> Result<(), ClientError> {
        self.close().await;
        let conn = self.dialer()?.await?;
        self.conn = Some(Arc::new(conn));
        Ok(())
    }

    /// The handshake with the pinned server, detached from the session (see
    /// [`super::Client::dialer`]).
    pub fn dialer(
        &self,
    ) -> Result<impl Future<Output = Result<Connection, NetError>> + Send + 'static, ClientError>
    {
        let dial = self.dial_params()?;
        Ok(async move { dial.connect().await })
    }

    /// What dialing the pinned server takes, for connections of their own (transfers).
    pub fn dial_params(&self) -> Result<Dial, ClientError> {
        Ok(Dial {
            server: self.server,
            pin: self.pin.clone().ok_or(ClientError::PinMissing)?,
            push_tx: self.push_tx.clone(),
            idle_timeout: self.idle_timeout,
        })
    }

    /// The current connection, if it is alive, to share with a transfer.
    pub fn shared(&self) -> Option<Arc<Connection>> {
        self.conn.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    /// Makes `conn` the current connection.
    pub async fn adopt(&mut self, conn: Connection) {
        self.close().await;
        self.conn = Some(Arc::new(conn));
    }

    /// Closes the current connection cleanly (if nothing else holds it: a transfer keeps the
    /// connection it runs on).
    pub async fn close(&mut self) {
        if let Some(old) = self.conn.take()
            && let Ok(old) = Arc::try_unwrap(old)
        {
            old.close().await;
        }
    }

    /// Resumes the session of `token` on the current connection. A refused token is
    /// [`ClientError::NeedLogin`]; any failure leaves the session without a connection (an
    /// unauthenticated connection is no reason to look online).
    pub async fn resume(&mut self, token: &[u8]) -> Result<(), ClientError> {
        let r = self
            .connection()?
            .call::<_, v1::ResumeResponse>(
                method::RESUME,
                &v1::ResumeRequest { session_token: token.to_vec() },
                Duration::ZERO,
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                // A busy server answers and then closes: do not keep the connection either.
                self.conn = None;
                if e.status() == Some(Status::Unauthorized) {
                    Err(ClientError::NeedLogin)
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// The OPAQUE login on the current connection; returns the session token.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        identity: &[u8; 32],
    ) -> Result<Vec<u8>, ClientError> {
        let calls = Calls(self.connection()?);
        opaque::flow::login(&calls, username, password, identity).await
    }

    /// The OPAQUE registration on the current connection.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        identity: &[u8; 32],
        invite: &str,
    ) -> Result<(), ClientError> {
        let calls = Calls(self.connection()?);
        opaque::flow::register(&calls, username, password, identity, invite).await
    }

    /// Calls `method` on the current connection, once. A lost or silent connection is
    /// forgotten, so the next call dials.
    pub async fn call_once<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        method_id: u16,
        req: &Req,
    ) -> Result<Resp, NetError> {
        let r = self.connection()?.call(method_id, req, Duration::ZERO).await;
        if let Err(NetError::Connection(_) | NetError::Timeout) = r {
            self.conn = None;
        }
        r
    }

    /// A push that already arrived.
    pub fn try_push(&mut self) -> Option<Push> {
        self.push_rx.try_recv().ok()
    }

    /// Waits up to `timeout` for a push, or for the server's long poll to say the queue is
    /// not empty. Safe to cancel. Returns the push, if one came.
    pub async fn wait_for_activity(&mut self, timeout: Duration) -> Result<Option<Push>, NetError> {
        if let Ok(p) = self.push_rx.try_recv() {
            return Ok(Some(p));
        }
        let req = v1::FetchWaitRequest {
            timeout_ms: timeout.as_millis() as u64,
            limit: 1,
            ..Default::default()
        };
        // Disjoint field borrows: the connection (shared) and the push channel (exclusive).
        let conn = self.conn.as_ref().ok_or(NetError::Connection("not connected".into()))?;
        tokio::select! {
            push = self.push_rx.recv() => Ok(push),
            r = conn.call::<_, v1::FetchWaitResponse>(method::FETCH_WAIT, &req, timeout) => {
                match r {
                    Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                        self.conn = None;
                        Err(e)
                    }
                    _ => Ok(None),
                }
            }
        }
    }
}

/// Dialing the pinned server (a connection's pushes reach the session's push channel).
#[derive(Clone)]
pub(crate) struct Dial {
    server: SocketAddr,
    pin: String,
    push_tx: mpsc::Sender<Push>,
    idle_timeout: Duration,
}

impl Dial {
    pub async fn connect(&self) -> Result<Connection, NetError> {
        Connection::connect(
            self.server,
            "localhost",
            Some(self.pin.as_str()),
            self.push_tx.clone(),
            self.idle_timeout,
        )
        .await
    }
}

/// A connection as the OPAQUE flows' [`opaque::flow::Call`].
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
