//! The QUIC connection to a qpq server: certificate pinning, one stream per call, pushes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// The connection failed or was lost.
    #[error("connection: {0}")]
    Connection(String),
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

    /// Whether retrying later may succeed (connection trouble, rate limits, unavailability).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connection(_) | Self::Timeout => true,
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

/// A push from the server.
#[derive(Debug, Clone)]
pub struct Push {
    /// Event id (`qpq_proto::method::PUSH_*`).
    pub event: u16,
    /// Protobuf payload.
    pub payload: Vec<u8>,
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
            .map_err(|_| NetError::Connection("bind address".into()))?;
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| NetError::Connection(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let connecting =
            endpoint.connect(addr, server_name).map_err(|e| NetError::Connection(e.to_string()))?;
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
                return Err(NetError::Connection(e.to_string()));
            }
            Err(_) => return Err(NetError::Timeout),
        };
        let fingerprint = verifier.seen().unwrap_or_default();
        let c = conn.clone();
        tokio::spawn(async move {
            while let Ok(mut s) = c.accept_uni().await {
                let tx = pushes.clone();
                tokio::spawn(async move {
                    let Ok(bytes) = s.read_to_end(MAX_PAYLOAD as usize + 6).await else { return };
                    if let Ok((h, p)) = frame::decode_push(&bytes) {
                        let _ = tx.send(Push { event: h.event, payload: p.to_vec() }).await;
                    }
                });
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
            let (mut send, mut recv) =
                self.conn.open_bi().await.map_err(|e| NetError::Connection(e.to_string()))?;
            send.write_all(&bytes).await.map_err(|e| NetError::Connection(e.to_string()))?;
            send.finish().map_err(|e| NetError::Connection(e.to_string()))?;
            let mut head = [0u8; RESPONSE_HEADER_LEN];
            recv.read_exact(&mut head).await.map_err(|e| NetError::Connection(e.to_string()))?;
            let header =
                ResponseHeader::decode(&head).map_err(|e| NetError::Protocol(e.to_string()))?;
            let mut body = vec![0u8; header.len as usize];
            recv.read_exact(&mut body).await.map_err(|e| NetError::Connection(e.to_string()))?;
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
        .map_err(|e| NetError::Connection(e.to_string()))?
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
        .map_err(|e| NetError::Connection(e.to_string()))?;
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
