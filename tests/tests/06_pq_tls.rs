//! The hybrid X25519MLKEM768 TLS key exchange of `qpq_core::pq_tls` against an independent
//! implementation (rustls's aws-lc-rs provider, a dev-dependency of this crate only) and against
//! classical-only peers: first in memory (a rustls client and server connected through buffers),
//! then through the real `qpq-server-lite` binary over QUIC.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use qpq_proto::frame;
use qpq_proto::{Message, Status, method, v1};
use qpq_tests::{ServerProcess, read_response};
use rustls::crypto::{
    ActiveKeyExchange, CompletedKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup,
    aws_lc_rs, ring,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, Connection, NamedGroup, PeerIncompatible, ProtocolVersion,
    RootCertStore, ServerConfig, ServerConnection,
};

// ------------------------------------------------------------------------------------------------
// In memory
// ------------------------------------------------------------------------------------------------

#[test]
fn our_client_and_an_aws_lc_rs_hybrid_only_server_agree() {
    let out = handshake(ours(), aws_lc_rs(&[aws_lc_rs::kx_group::X25519MLKEM768])).unwrap();
    assert_eq!(out.groups(), [NamedGroup::X25519MLKEM768; 2]);
    assert_eq!(out.client_flights, 2, "no HelloRetryRequest");
}

#[test]
fn an_aws_lc_rs_hybrid_only_client_and_our_server_agree() {
    let out = handshake(aws_lc_rs(&[aws_lc_rs::kx_group::X25519MLKEM768]), ours()).unwrap();
    assert_eq!(out.groups(), [NamedGroup::X25519MLKEM768; 2]);
    assert_eq!(out.client_flights, 2, "no HelloRetryRequest");
}

/// With everyone's default group lists (aws-lc-rs with `prefer-post-quantum` also puts the hybrid
/// first), both directions and our own pair pick the hybrid group.
#[test]
fn default_group_lists_pick_the_hybrid_group() {
    let aws_default = Arc::new(aws_lc_rs::default_provider());
    assert_eq!(aws_default.kx_groups[0].name(), NamedGroup::X25519MLKEM768);
    for (client, server) in
        [(ours(), aws_default.clone()), (aws_default.clone(), ours()), (ours(), ours())]
    {
        let out = handshake(client, server).unwrap();
        assert_eq!(out.groups(), [NamedGroup::X25519MLKEM768; 2]);
        assert_eq!(out.client_flights, 2, "no HelloRetryRequest");
    }
}

#[test]
fn a_classical_only_client_gets_x25519_from_our_server() {
    let out = handshake(ring(&[ring::kx_group::X25519]), ours()).unwrap();
    assert_eq!(out.groups(), [NamedGroup::X25519; 2]);
}

/// A ring server with its default groups (X25519, P-256, P-384) takes the separate X25519 share
/// our client sends beside the hybrid one (`hybrid_component`), so there is no extra round
/// trip; a server with P-256 only costs a HelloRetryRequest and still connects.
#[test]
fn our_client_connects_to_classical_only_servers() {
    let out = handshake(ours(), Arc::new(ring::default_provider())).unwrap();
    assert_eq!(out.groups(), [NamedGroup::X25519; 2]);
    assert_eq!(out.client_flights, 2, "no HelloRetryRequest");

    let out = handshake(ours(), ring(&[ring::kx_group::SECP256R1])).unwrap();
    assert_eq!(out.groups(), [NamedGroup::secp256r1; 2]);
    assert_eq!(out.client_flights, 3, "one HelloRetryRequest");
}

/// The control for the tests above and below: a hybrid-only peer cannot connect to a server
/// without the hybrid group, so a successful hybrid-only handshake proves the server has it.
#[test]
fn a_hybrid_only_client_cannot_reach_a_classical_only_server() {
    let err = handshake(
        aws_lc_rs(&[aws_lc_rs::kx_group::X25519MLKEM768]),
        Arc::new(ring::default_provider()),
    )
    .err()
    .expect("handshake must fail");
    assert_eq!(err, rustls::Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon));
}

// ------------------------------------------------------------------------------------------------
// Through the real server binary
// ------------------------------------------------------------------------------------------------

/// An aws-lc-rs QUIC client that offers nothing but X25519MLKEM768 gets a working connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_speaks_the_hybrid_group_to_an_aws_lc_rs_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let (_endpoint, conn) =
        quic_connect(&server, aws_lc_rs(&[aws_lc_rs::kx_group::X25519MLKEM768])).await.unwrap();
    assert_eq!(health(&conn).await.unwrap().status, "ok");
}

/// The default client provider (wrapped to record how each key exchange completed) against the
/// server's default configuration: the hybrid group, not the X25519 share offered beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_client_and_server_negotiate_the_hybrid_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();

    let completed = Arc::new(Mutex::new(Vec::new()));
    let mut provider = qpq_core::pq_tls::crypto_provider();
    for group in &mut provider.kx_groups {
        *group = Box::leak(Box::new(Recorder { inner: *group, completed: completed.clone() }));
    }
    let (_endpoint, conn) = quic_connect(&server, Arc::new(provider)).await.unwrap();
    assert_eq!(health(&conn).await.unwrap().status, "ok");
    assert_eq!(*completed.lock().unwrap(), [NamedGroup::X25519MLKEM768]);

    // And the harness client, built by `qpq_core::client::net::pinned_crypto`, connects.
    let c = server.client().await.unwrap();
    let h: v1::HealthResponse = c.call(method::HEALTH, &v1::HealthRequest {}).await.unwrap();
    assert_eq!(h.status, "ok");
}

/// Clients from before the hybrid group (ring, X25519 only) still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_still_accepts_classical_only_clients() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let (_endpoint, conn) = quic_connect(&server, ring(&[ring::kx_group::X25519])).await.unwrap();
    assert_eq!(health(&conn).await.unwrap().status, "ok");
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// The provider our client and server use.
fn ours() -> Arc<CryptoProvider> {
    Arc::new(qpq_core::pq_tls::crypto_provider())
}

fn aws_lc_rs(groups: &[&'static dyn SupportedKxGroup]) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider { kx_groups: groups.to_vec(), ..aws_lc_rs::default_provider() })
}

fn ring(groups: &[&'static dyn SupportedKxGroup]) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider { kx_groups: groups.to_vec(), ..ring::default_provider() })
}

struct Outcome {
    client_group: Option<NamedGroup>,
    server_group: Option<NamedGroup>,
    /// How many times the client had something to send before both sides finished.
    client_flights: usize,
}

impl Outcome {
    fn groups(&self) -> [NamedGroup; 2] {
        [self.client_group.expect("client group"), self.server_group.expect("server group")]
    }
}

/// A TLS 1.3 handshake between a client and a server with the given providers, through buffers,
/// then application data both ways.
fn handshake(
    client: Arc<CryptoProvider>,
    server: Arc<CryptoProvider>,
) -> Result<Outcome, rustls::Error> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));

    let server_config = ServerConfig::builder_with_provider(server)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    let mut roots = RootCertStore::empty();
    roots.add(cert)?;
    let client_config = ClientConfig::builder_with_provider(client)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let name = ServerName::try_from("localhost").unwrap();
    let mut c = Connection::Client(ClientConnection::new(Arc::new(client_config), name)?);
    let mut s = Connection::Server(ServerConnection::new(Arc::new(server_config))?);
    let mut client_flights = 0;
    while c.is_handshaking() || s.is_handshaking() {
        let client_sent = pump(&mut c, &mut s)?;
        let server_sent = pump(&mut s, &mut c)?;
        client_flights += usize::from(client_sent);
        assert!(client_sent || server_sent, "handshake stalled");
        assert!(client_flights < 10, "handshake does not end");
    }

    send_data(&mut c, &mut s, b"ping from the client")?;
    send_data(&mut s, &mut c, b"pong from the server")?;
    Ok(Outcome {
        client_group: c.negotiated_key_exchange_group().map(|g| g.name()),
        server_group: s.negotiated_key_exchange_group().map(|g| g.name()),
        client_flights,
    })
}

/// Sends `text` as application data and checks that it arrives.
fn send_data(from: &mut Connection, to: &mut Connection, text: &[u8]) -> Result<(), rustls::Error> {
    from.writer().write_all(text).unwrap();
    pump(from, to)?;
    let mut buf = [0u8; 64];
    let n = to.reader().read(&mut buf).unwrap();
    assert_eq!(&buf[..n], text);
    Ok(())
}

/// Moves everything `from` has to send into `to`; whether there was anything.
fn pump(from: &mut Connection, to: &mut Connection) -> Result<bool, rustls::Error> {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets()?;
    }
    Ok(!wire.is_empty())
}

/// A QUIC connection to `server` with a client that uses `provider` and pins the server's
/// certificate.
async fn quic_connect(
    server: &ServerProcess,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let mut tls = qpq_core::client::net::pinned_tls(&server.fingerprint, provider)?;
    tls.alpn_protocols = vec![qpq_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connecting = endpoint.connect(server.addr, "localhost")?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .context("handshake timed out")?
        .context("QUIC handshake")?;
    Ok((endpoint, conn))
}

async fn health(conn: &quinn::Connection) -> anyhow::Result<v1::HealthResponse> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = v1::HealthRequest {}.encode_to_vec();
    send.write_all(&frame::encode_request(method::HEALTH, 1, &request)?).await?;
    send.finish()?;
    let (header, body) = read_response(&mut recv).await?;
    anyhow::ensure!(header.status == Status::Ok, "Health answered {:?}", header.status);
    Ok(v1::HealthResponse::decode(body.as_slice())?)
}

/// A key-exchange group that delegates to `inner` and records, for each exchange it started,
/// which group it completed: the hybrid itself or (through `complete_hybrid_component`) its
/// classical half.
#[derive(Debug)]
struct Recorder {
    inner: &'static dyn SupportedKxGroup,
    completed: Arc<Mutex<Vec<NamedGroup>>>,
}

impl SupportedKxGroup for Recorder {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(RecordedExchange {
            inner: self.inner.start()?,
            completed: self.completed.clone(),
        }))
    }

    fn start_and_complete(&self, peer: &[u8]) -> Result<CompletedKeyExchange, rustls::Error> {
        let done = self.inner.start_and_complete(peer)?;
        self.completed.lock().unwrap().push(done.group);
        Ok(done)
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        self.inner.ffdhe_group()
    }

    fn name(&self) -> NamedGroup {
        self.inner.name()
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        self.inner.usable_for_version(version)
    }
}

struct RecordedExchange {
    inner: Box<dyn ActiveKeyExchange>,
    completed: Arc<Mutex<Vec<NamedGroup>>>,
}

impl ActiveKeyExchange for RecordedExchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let group = self.inner.group();
        let secret = self.inner.complete(peer)?;
        self.completed.lock().unwrap().push(group);
        Ok(secret)
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        self.inner.hybrid_component()
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        peer: &[u8],
    ) -> Result<SharedSecret, rustls::Error> {
        let group = self.inner.hybrid_component().map(|(g, _)| g);
        let secret = self.inner.complete_hybrid_component(peer)?;
        self.completed.lock().unwrap().extend(group);
        Ok(secret)
    }

    fn pub_key(&self) -> &[u8] {
        self.inner.pub_key()
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        self.inner.ffdhe_group()
    }

    fn group(&self) -> NamedGroup {
        self.inner.group()
    }
}
