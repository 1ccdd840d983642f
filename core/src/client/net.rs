//! The QUIC connection to a qpq server: certificate pinning, one stream per call, pushes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use qpq_proto::CloseCode;
use qpq_proto::frame::{self, RESPONSE_HEADER_LEN, ResponseHeader};
use qpq_proto::{MAX_PAYLOAD, Message, Status, v1};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::identity::hex;

/// How long a single call may take before the client gives up (FetchWait adds its own wait).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle timeout: a connection that hears nothing for this long is declared dead.
/// Keep-alives go out every quarter of it, and sending one restarts the idle timer (RFC 9000
/// §10.1), so a vanished server is noticed within 1.25 × this: 3.75 s.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// A failed call or connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The server answered with an error status.
    #[error("{status}: {message}")]
    Status {
        /// The status.
        status: Status,
        /// The server's message.
        message: String,
        /// Retry hint, ms.
        retry_after_ms: u64,
    },
    /// The server's certificate is not the pinned one.
    #[error(
        "SERVER CERTIFICATE CHANGED: pinned sha256:{expected}, server presented sha256:{presented}. \
         Someone may be intercepting the connection. If the operator really replaced the \
         certificate, re-pin it explicitly."
    )]
    CertificateChanged {
        /// The pinned fingerprint.
        expected: String,
        /// What the server presented.
        presented: String,
    },
    /// The connection failed or was lost; the [`ConnectionLost`] says how (with the server's
    /// close code when it closed the connection).
    #[error(transparent)]
    Connection(ConnectionLost),
    /// The server sent something that is not a valid frame or message.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The call did not finish in time.
    #[error("timed out")]
    Timeout,
}

impl NetError {
    /// The server's status, if it answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's hint of how long to wait before retrying, if it gave one.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Status { retry_after_ms, .. } if *retry_after_ms > 0 => {
                Some(std::time::Duration::from_millis(*retry_after_ms))
            }
            _ => None,
        }
    }

    /// The code the server closed the connection with, if it closed it with one this client
    /// knows.
    pub fn close_code(&self) -> Option<CloseCode> {
        self.connection_lost().and_then(ConnectionLost::close_code)
    }

    /// How the connection failed or was lost, if that is the error.
    pub fn connection_lost(&self) -> Option<&ConnectionLost> {
        match self {
            Self::Connection(lost) => Some(lost),
            _ => None,
        }
    }

    /// Whether retrying later may succeed (connection trouble, rate limits, unavailability).
    /// Not when the server closed the connection because the session was revoked: that needs a
    /// new login.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connection(lost) => lost.is_transient(),
            Self::Timeout => true,
            Self::Status { status, .. } => matches!(
                status,
                Status::RateLimited
                    | Status::Unavailable
                    | Status::DeadlineExceeded
                    | Status::Internal
            ),
            _ => false,
        }
    }
}

impl From<ConnectionLost> for NetError {
    fn from(lost: ConnectionLost) -> Self {
        Self::Connection(lost)
    }
}

/// How a connection failed or was lost ([`NetError::Connection`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionLost {
    /// The server closed the connection with an application close code (see [`CloseCode`]
    /// for what each asks of the client).
    #[error("the server closed the connection: {}", closed_text(.code, *.raw, .reason))]
    ClosedByServer {
        /// The close code; `None` for a number this client does not know (see `raw`).
        code: Option<CloseCode>,
        /// The close code's number as sent.
        raw: u64,
        /// The server's reason text (control characters removed, shortened).
        reason: String,
    },
    /// Nothing was heard from the server for the idle timeout: it or the network went away.
    #[error("the server stopped answering (idle timeout)")]
    TimedOut,
    /// The server no longer knew the connection (it restarted) and reset it.
    #[error("the server reset the connection (it may have restarted)")]
    Reset,
    /// The server refused the connection before the handshake (too many connections or
    /// handshakes, or out of memory).
    #[error("the server refused the connection")]
    Refused,
    /// Nothing answered the handshake: the server is down, the address is wrong, or UDP is
    /// blocked.
    #[error("no answer from the server")]
    Unreachable,
    /// The TLS handshake failed (no common protocol, a bad signature, or a certificate one
    /// side refused) other than a changed certificate ([`NetError::CertificateChanged`]).
    #[error("the TLS handshake failed: {0}")]
    Handshake(String),
    /// A QUIC transport error: one side found the other breaking the protocol, or there is no
    /// common QUIC version.
    #[error("QUIC transport error: {0}")]
    Transport(String),
    /// This client closed the connection.
    #[error("the connection was closed by this client")]
    ClosedLocally,
    /// This client could not set up a connection (socket, TLS configuration, address).
    #[error("could not set up the connection: {0}")]
    Setup(String),
    /// A stream failed in a way that carries no more detail (stopped or reset by the server,
    /// finished early).
    #[error("connection: {0}")]
    Io(String),
    /// There is no connection to use (the client is offline or not connected yet).
    #[error("connection: {0}")]
    Local(&'static str),
}

impl ConnectionLost {
    /// The code the server closed the connection with, if it is one this client knows.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            Self::ClosedByServer { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether connecting again later may help: everything except a revoked session (which
    /// needs a new login).
    pub fn is_transient(&self) -> bool {
        self.close_code() != Some(CloseCode::Revoked)
    }
}

/// `ClosedByServer`'s text after "the server closed the connection: ".
fn closed_text(code: &Option<CloseCode>, raw: u64, reason: &str) -> String {
    match code {
        Some(code) if reason.is_empty() || reason == code.describe() => {
            format!("{code} (code {raw})")
        }
        Some(code) => format!("{code} (code {raw}: {reason})"),
        None if reason.is_empty() => format!("code {raw}"),
        None => format!("{reason} (code {raw})"),
    }
}

/// The longest server reason text kept, in characters.
const MAX_REASON: usize = 200;

/// A peer's reason text fit to show: lossy UTF-8, control characters dropped, shortened.
fn reason_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().filter(|c| !c.is_control()).take(MAX_REASON).collect()
}

/// Whether a QUIC transport error code is a TLS alert (0x100 to 0x1ff, RFC 9001 §4.8).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// A state of this client's own making ("offline", "not connected"): [`ConnectionLost::Local`].
impl From<&'static str> for ConnectionLost {
    fn from(what: &'static str) -> Self {
        Self::Local(what)
    }
}

/// A failure described only in words: [`ConnectionLost::Io`].
impl From<String> for ConnectionLost {
    fn from(what: String) -> Self {
        Self::Io(what)
    }
}

impl From<quinn::ConnectionError> for ConnectionLost {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::ApplicationClosed(c) => {
                let raw = c.error_code.into_inner();
                Self::ClosedByServer {
                    code: CloseCode::from_u64(raw),
                    raw,
                    reason: reason_text(&c.reason),
                }
            }
            E::ConnectionClosed(c)
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                Self::Refused
            }
            E::ConnectionClosed(c) if is_crypto(c.error_code) => {
                let alert = u64::from(c.error_code) & 0xff;
                Self::Handshake(match reason_text(&c.reason) {
                    r if r.is_empty() => format!("the server sent TLS alert {alert}"),
                    r => format!("the server sent TLS alert {alert}: {r}"),
                })
            }
            E::ConnectionClosed(c) => Self::Transport(format!(
                "the server aborted the connection: {}",
                quinn::ConnectionClose { reason: reason_text(&c.reason).into_bytes().into(), ..c }
            )),
            E::TransportError(t) if is_crypto(t.code) => Self::Handshake(t.to_string()),
            E::TransportError(t) => Self::Transport(t.to_string()),
            E::VersionMismatch => Self::Transport(e.to_string()),
            E::Reset => Self::Reset,
            E::TimedOut => Self::TimedOut,
            E::LocallyClosed => Self::ClosedLocally,
            E::CidsExhausted => Self::Setup(e.to_string()),
        }
    }
}

impl From<quinn::ConnectError> for ConnectionLost {
    fn from(e: quinn::ConnectError) -> Self {
        Self::Setup(e.to_string())
    }
}

impl From<quinn::WriteError> for ConnectionLost {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => c.into(),
            quinn::WriteError::Stopped(code) => {
                Self::Io(format!("the server stopped reading the request (code {code})"))
            }
            other => Self::Io(format!("sending the request: {other}")),
        }
    }
}

impl From<quinn::ClosedStream> for ConnectionLost {
    fn from(e: quinn::ClosedStream) -> Self {
        Self::Io(format!("sending the request: {e}"))
    }
}

impl From<quinn::ReadError> for ConnectionLost {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => c.into(),
            quinn::ReadError::Reset(code) => {
                Self::Io(format!("the server reset the response (code {code})"))
            }
            other => Self::Io(format!("reading the response: {other}")),
        }
    }
}

impl From<quinn::ReadExactError> for ConnectionLost {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::ReadError(e) => e.into(),
            quinn::ReadExactError::FinishedEarly(n) => {
                Self::Io(format!("the server ended the response early ({n} bytes read)"))
            }
        }
    }
}

/// A push from the server.
#[derive(Debug, Clone)]
pub struct Push {
    /// Event id (`qpq_proto::method::PUSH_*`).
    pub event: u16,
    /// Protobuf payload.
    pub payload: Vec<u8>,
}

/// Reads the server's pushes on `conn` until it ends: each is a unidirectional stream, read
/// whole (at most a frame) and decoded, then handed to `deliver` as (event id, payload); an
/// undecodable one is dropped. The one push reader, for the client and the test harness.
pub fn spawn_push_reader<F, Fut>(conn: quinn::Connection, deliver: F)
where
    F: Fn(u16, Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok(mut s) = conn.accept_uni().await {
            let deliver = deliver.clone();
            tokio::spawn(async move {
                let Ok(bytes) = s.read_to_end(MAX_PAYLOAD as usize + 6).await else { return };
                if let Ok((h, p)) = frame::decode_push(&bytes) {
                    deliver(h.event, p.to_vec()).await;
                }
            });
        }
    });
}

/// An open connection.
pub struct Connection {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    next_id: AtomicU32,
    /// The fingerprint the server presented (what a first-use pin records).
    pub fingerprint: String,
}

impl Connection {
    /// Connects to `addr`. With `pin` set, only a certificate with that SHA-256 is accepted;
    /// without, any certificate is accepted and its fingerprint is reported in
    /// [`Connection::fingerprint`] for the caller to pin (trust on first use). Pushes are sent
    /// to `pushes`.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        pin: Option<&str>,
        pushes: mpsc::Sender<Push>,
        idle_timeout: Duration,
    ) -> Result<Self, NetError> {
        let (crypto, verifier) = crypto(pin)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(idle_timeout / 4));
        transport.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .map_err(|_| ConnectionLost::Setup("bind address".into()))?;
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| ConnectionLost::Setup(format!("UDP socket: {e}")))?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(addr, server_name).map_err(ConnectionLost::from)?;
        let conn = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if let (Some(expected), Some(presented)) = (pin, verifier.seen())
                    && !expected.eq_ignore_ascii_case(&presented)
                {
                    return Err(NetError::CertificateChanged {
                        expected: expected.to_string(),
                        presented,
                    });
                }
                return Err(dial_failed(e).into());
            }
            Err(_) => return Err(NetError::Timeout),
        };
        let fingerprint = verifier.seen().unwrap_or_default();
        spawn_push_reader(conn.clone(), move |event, payload| {
            let tx = pushes.clone();
            async move {
                let _ = tx.send(Push { event, payload }).await;
            }
        });
        Ok(Self { _endpoint: endpoint, conn, next_id: AtomicU32::new(1), fingerprint })
    }

    /// Calls `method` and decodes its response, within [`CALL_TIMEOUT`] plus `extra`.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: u16,
        req: &Req,
        extra: Duration,
    ) -> Result<Resp, NetError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode_request(method, id, &req.encode_to_vec())
            .map_err(|e| NetError::Protocol(e.to_string()))?;
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
            send.write_all(&bytes).await.map_err(|e| self.lost(e))?;
            send.finish().map_err(|e| self.lost(e))?;
            let mut head = [0u8; RESPONSE_HEADER_LEN];
            recv.read_exact(&mut head).await.map_err(|e| self.lost(e))?;
            let header =
                ResponseHeader::decode(&head).map_err(|e| NetError::Protocol(e.to_string()))?;
            let mut body = vec![0u8; header.len as usize];
            recv.read_exact(&mut body).await.map_err(|e| self.lost(e))?;
            Ok::<_, NetError>((header, body))
        };
        let (header, body) = tokio::time::timeout(CALL_TIMEOUT + extra, exchange)
            .await
            .map_err(|_| NetError::Timeout)??;
        read_response(id, &header, &body)
    }

    /// Whether the connection is closed (lost or shut down by either side).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Why the connection closed (with the server's close code if it closed it), or `None`
    /// while it is open.
    pub fn close_reason(&self) -> Option<ConnectionLost> {
        self.conn.close_reason().map(ConnectionLost::from)
    }

    /// A failed stream operation as a connection error. A stream error that says nothing
    /// more (a finished or closed stream) gives way to the connection's own close reason
    /// when the connection is closed, so the server's close code is not lost.
    fn lost(&self, e: impl Into<ConnectionLost>) -> NetError {
        let lost = e.into();
        match (&lost, self.close_reason()) {
            (ConnectionLost::Io(_), Some(closed)) => NetError::Connection(closed),
            _ => NetError::Connection(lost),
        }
    }

    /// Waits until the connection closes.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// Closes the connection and waits (briefly) until the server has been told, so the
    /// server frees the connection's slot at once instead of at its idle timeout.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self._endpoint.wait_idle()).await;
    }
}

impl Drop for Connection {
    /// Closes the QUIC connection when the last owner lets go of it. Without this it would
    /// live on: the push reader holds a clone of it until it closes, and keep-alives keep it
    /// open (a dropped connection would go on holding a slot on the server and doubling
    /// pushes).
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"bye");
    }
}

/// A failed handshake as a connection error: no answer within the idle timeout means nobody
/// answered, not that an established connection went quiet.
fn dial_failed(e: quinn::ConnectionError) -> ConnectionLost {
    match e {
        quinn::ConnectionError::TimedOut => ConnectionLost::Unreachable,
        e => e.into(),
    }
}

/// Checks a response frame against the call it answers and decodes its payload: the error
/// for a non-Ok status, else the response message.
pub(crate) fn read_response<Resp: Message + Default>(
    id: u32,
    header: &ResponseHeader,
    body: &[u8],
) -> Result<Resp, NetError> {
    if header.request_id != id {
        return Err(NetError::Protocol(format!("response to {} for call {id}", header.request_id)));
    }
    if header.status != Status::Ok {
        let e = v1::Error::decode(body).unwrap_or_default();
        return Err(NetError::Status {
            status: header.status,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        });
    }
    Resp::decode(body).map_err(|e| NetError::Protocol(e.to_string()))
}

/// TLS 1.3 client crypto with ALPN `qpq` that accepts only the certificate whose SHA-256 is
/// `pin` (lower- or upper-case hex), checking handshake signatures, with the key exchanges of
/// [`crate::pq_tls`] (hybrid X25519MLKEM768 preferred). For tools and test harnesses that speak
/// the protocol without the engine.
pub fn pinned_crypto(pin: &str) -> Result<quinn::crypto::rustls::QuicClientConfig, NetError> {
    Ok(crypto(Some(pin))?.0)
}

/// A TLS 1.3 rustls client configuration on `provider` that accepts only the certificate whose
/// SHA-256 is `pin` (hex, any case) and checks handshake signatures. No ALPN is set. For tools
/// and tests that need the pinning with another provider or over TCP.
pub fn pinned_tls(
    pin: &str,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ClientConfig, NetError> {
    Ok(tls_config(Some(pin), provider)?.0)
}

fn tls_config(
    pin: Option<&str>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<(rustls::ClientConfig, Arc<PinVerifier>), NetError> {
    let verifier = Arc::new(PinVerifier {
        pin: pin.map(str::to_ascii_lowercase),
        seen: Mutex::new(None),
        provider: provider.clone(),
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConnectionLost::Setup(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((tls, verifier))
}

fn crypto(
    pin: Option<&str>,
) -> Result<(quinn::crypto::rustls::QuicClientConfig, Arc<PinVerifier>), NetError> {
    let (mut tls, verifier) = tls_config(pin, Arc::new(crate::pq_tls::crypto_provider()))?;
    tls.alpn_protocols = vec![qpq_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ConnectionLost::Setup(format!("TLS configuration: {e}")))?;
    Ok((crypto, verifier))
}

/// Accepts the pinned certificate only (or any, recording it, when nothing is pinned);
/// handshake signatures are always verified.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinVerifier {
    fn seen(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = hex(&Sha256::digest(end_entity.as_ref()));
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented.clone());
        match &self.pin {
            Some(pin) if *pin != presented => {
                Err(rustls::Error::General("certificate fingerprint does not match the pin".into()))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use quinn::{ConnectionError, TransportErrorCode, VarInt};

    use super::*;

    fn app_close(code: u32, reason: &[u8]) -> ConnectionError {
        ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: VarInt::from_u32(code),
            reason: reason.to_vec().into(),
        })
    }

    fn transport_close(code: TransportErrorCode) -> ConnectionError {
        ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: b"nope".to_vec().into(),
        })
    }

    fn net(e: impl Into<ConnectionLost>) -> NetError {
        NetError::Connection(e.into())
    }

    #[test]
    fn application_close_keeps_the_servers_code() {
        for code in CloseCode::ALL {
            let lost = ConnectionLost::from(app_close(code.as_u32(), b"why"));
            assert_eq!(
                lost,
                ConnectionLost::ClosedByServer {
                    code: Some(code),
                    raw: code.as_u32().into(),
                    reason: "why".into()
                }
            );
            assert_eq!(net(lost).close_code(), Some(code));
        }
        let revoked = net(app_close(2, b"logged out"));
        assert_eq!(
            revoked.to_string(),
            "the server closed the connection: session revoked (code 2: logged out)"
        );
        let shutdown = net(app_close(1, b"server shutting down"));
        assert_eq!(
            shutdown.to_string(),
            "the server closed the connection: server shutting down (code 1)"
        );
        assert_eq!(
            net(app_close(3, b"")).to_string(),
            "the server closed the connection: server busy (code 3)"
        );
    }

    #[test]
    fn unknown_close_codes_keep_the_number() {
        let lost = ConnectionLost::from(app_close(77, b"new reason"));
        assert_eq!(
            lost,
            ConnectionLost::ClosedByServer { code: None, raw: 77, reason: "new reason".into() }
        );
        assert_eq!(lost.close_code(), None);
        assert!(lost.is_transient());
        assert_eq!(lost.to_string(), "the server closed the connection: new reason (code 77)");
        assert_eq!(
            ConnectionLost::from(app_close(0, b"")).to_string(),
            "the server closed the connection: code 0"
        );
        // Beyond u32: still a number, not a code.
        let big = ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: VarInt::from_u64(1 << 40).unwrap(),
            reason: Vec::new().into(),
        });
        assert_eq!(ConnectionLost::from(big).close_code(), None);
    }

    #[test]
    fn a_hostile_reason_is_defanged() {
        let mut reason = b"\x1b]52;c;evil\x07\r\nok".to_vec();
        reason.extend([0xff; 3]);
        reason.extend([b'x'; 1000]);
        let ConnectionLost::ClosedByServer { reason, .. } =
            ConnectionLost::from(app_close(2, &reason))
        else {
            panic!("not a server close");
        };
        assert!(!reason.chars().any(char::is_control), "{reason:?}");
        assert!(reason.starts_with("]52;c;evilok\u{fffd}"), "{reason:?}");
        assert_eq!(reason.chars().count(), MAX_REASON);
    }

    #[test]
    fn only_a_revoked_session_is_not_transient() {
        for code in CloseCode::ALL {
            let e = net(app_close(code.as_u32(), b""));
            assert_eq!(e.is_transient(), code != CloseCode::Revoked, "{code:?}");
        }
        for lost in [
            ConnectionLost::TimedOut,
            ConnectionLost::Reset,
            ConnectionLost::Refused,
            ConnectionLost::Unreachable,
            ConnectionLost::ClosedLocally,
            ConnectionLost::Io("x".into()),
            "offline".into(),
        ] {
            assert!(net(lost.clone()).is_transient(), "{lost:?}");
            assert_eq!(net(lost).close_code(), None);
        }
    }

    #[test]
    fn quinn_connection_errors_map_by_kind() {
        let cases = [
            (ConnectionError::TimedOut, ConnectionLost::TimedOut),
            (ConnectionError::Reset, ConnectionLost::Reset),
            (ConnectionError::LocallyClosed, ConnectionLost::ClosedLocally),
            (transport_close(TransportErrorCode::CONNECTION_REFUSED), ConnectionLost::Refused),
        ];
        for (e, want) in cases {
            assert_eq!(ConnectionLost::from(e), want);
        }
        assert_eq!(
            ConnectionLost::from(transport_close(TransportErrorCode::crypto(120))).to_string(),
            "the TLS handshake failed: the server sent TLS alert 120: nope"
        );
        assert!(matches!(
            ConnectionLost::from(ConnectionError::TransportError(
                TransportErrorCode::crypto(42).into()
            )),
            ConnectionLost::Handshake(_)
        ));
        let violation =
            ConnectionLost::from(transport_close(TransportErrorCode::PROTOCOL_VIOLATION));
        assert!(matches!(violation, ConnectionLost::Transport(ref m) if m.ends_with(": nope")));
        assert!(matches!(
            ConnectionLost::from(ConnectionError::VersionMismatch),
            ConnectionLost::Transport(_)
        ));
        // While dialing, silence means nobody answered.
        assert_eq!(dial_failed(ConnectionError::TimedOut), ConnectionLost::Unreachable);
        assert_eq!(dial_failed(ConnectionError::Reset), ConnectionLost::Reset);
    }

    #[test]
    fn stream_errors_keep_the_connections_close_code() {
        let w = quinn::WriteError::ConnectionLost(app_close(2, b"device revoked"));
        assert_eq!(net(w).close_code(), Some(CloseCode::Revoked));
        let r = quinn::ReadError::ConnectionLost(app_close(1, b""));
        assert_eq!(net(r).close_code(), Some(CloseCode::Shutdown));
        let r = quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(app_close(
            4,
            b"pushes not read",
        )));
        assert_eq!(net(r).close_code(), Some(CloseCode::SlowConsumer));
        let r = quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
            ConnectionError::TimedOut,
        ));
        assert_eq!(ConnectionLost::from(r), ConnectionLost::TimedOut);
    }

    #[test]
    fn stream_errors_without_a_connection_error_are_io() {
        let stopped = ConnectionLost::from(quinn::WriteError::Stopped(VarInt::from_u32(1)));
        assert_eq!(
            stopped,
            ConnectionLost::Io("the server stopped reading the request (code 1)".into())
        );
        let reset = ConnectionLost::from(quinn::ReadError::Reset(VarInt::from_u32(1)));
        assert_eq!(reset.to_string(), "connection: the server reset the response (code 1)");
        let early = ConnectionLost::from(quinn::ReadExactError::FinishedEarly(3));
        assert!(matches!(early, ConnectionLost::Io(ref m) if m.contains("3 bytes")), "{early}");
        assert!(matches!(
            ConnectionLost::from(quinn::WriteError::ClosedStream),
            ConnectionLost::Io(_)
        ));
    }

    #[test]
    fn engine_states_stay_local_and_read_as_before() {
        let e = NetError::Connection("offline".into());
        assert!(matches!(e, NetError::Connection(ConnectionLost::Local("offline"))));
        assert_eq!(e.to_string(), "connection: offline");
        assert!(e.is_transient());
        assert_eq!(e.connection_lost(), Some(&ConnectionLost::Local("offline")));
        assert_eq!(NetError::Timeout.connection_lost(), None);
    }
}
