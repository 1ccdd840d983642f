//! The mosquitto baseline: a minimal MQTT 3.1.1 client (CONNECT, SUBSCRIBE, PUBLISH at QoS 1,
//! PUBACK) over TLS 1.3 (rustls, ring), and a broker run from a temporary configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The topic every subscriber listens on.
pub const TOPIC: &str = "qpq-bench/fanout";

/// Where mosquitto is installed, if it is.
pub fn find() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A running mosquitto with a TLS listener on 127.0.0.1.
pub struct Broker {
    child: Child,
    /// The TLS listener.
    pub addr: SocketAddr,
    /// The broker's certificate (pinned by the clients).
    pub cert: Vec<u8>,
    /// `mosquitto -h`'s first line.
    pub version: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts `bin` with persistence on and a self-signed certificate.
    pub fn start(bin: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_pem, ck.cert.pem())?;
        std::fs::write(&key_pem, ck.signing_key.serialize_pem())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\nuser root\n\
                 listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\ntls_version tlsv1.3\n\
                 persistence true\npersistence_location {}/\n\
                 max_queued_messages 1000000\nset_tcp_nodelay true\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n",
                cert_pem.display(),
                key_pem.display(),
                dir.path().display()
            ),
        )?;
        let version = Command::new(bin)
            .arg("-h")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
            .unwrap_or_default();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut broker = Self { child, addr, cert: ck.cert.der().to_vec(), version, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline || broker.child.try_wait()?.is_some() {
                bail!("mosquitto did not start listening on {addr}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(broker)
    }
}

impl Broker {
    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS connection to the broker that has sent CONNECT and got CONNACK.
pub async fn connect(
    addr: SocketAddr,
    cert: &[u8],
    client_id: &str,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pin: String =
        <sha2::Sha256 as sha2::Digest>::digest(cert).iter().map(|b| format!("{b:02x}")).collect();
    let config = qpq_core::client::net::pinned_tls(&pin, provider)?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    // CONNECT: protocol "MQTT" level 4, flags: clean session off (the broker keeps the session
    // and queues QoS 1 messages while we are away), keep-alive 600 s.
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x00, 0x02, 0x58]);
    put_str(&mut body, client_id);
    write_packet(&mut tls, 0x10, &body).await?;
    let (kind, body) = read_packet(&mut tls).await?;
    if kind >> 4 != 2 || body.len() < 2 || body[1] != 0 {
        bail!("CONNACK refused: {body:?}");
    }
    Ok(tls)
}

/// Subscribes to [`TOPIC`] at QoS 1 and waits for SUBACK.
pub async fn subscribe<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> anyhow::Result<()> {
    let mut body = vec![0, 1];
    put_str(&mut body, TOPIC);
    body.push(1);
    write_packet(s, 0x82, &body).await?;
    let (kind, body) = read_packet(s).await?;
    if kind >> 4 != 9 || body.get(2) != Some(&1) {
        bail!("SUBACK refused: {body:?}");
    }
    Ok(())
}

/// A PUBLISH at QoS 1 to [`TOPIC`].
pub fn publish_packet(packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + TOPIC.len() + 4);
    put_str(&mut body, TOPIC);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload);
    frame(0x32, &body)
}

/// A PUBACK for `packet_id`.
pub fn puback(packet_id: u16) -> [u8; 4] {
    let id = packet_id.to_be_bytes();
    [0x40, 2, id[0], id[1]]
}

/// An incoming PUBLISH: its packet id (QoS > 0) and payload.
pub fn parse_publish(kind: u8, body: &[u8]) -> Option<(Option<u16>, &[u8])> {
    if kind >> 4 != 3 || body.len() < 2 {
        return None;
    }
    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2 + tlen;
    let qos = (kind >> 1) & 3;
    let id = if qos > 0 {
        let id = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        at += 2;
        Some(id)
    } else {
        None
    };
    Some((id, body.get(at..)?))
}

/// Reads one packet: the fixed header's first byte and the body.
pub async fn read_packet<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<(u8, Vec<u8>)> {
    let kind = s.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("malformed remaining length");
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok((kind, body))
}

async fn write_packet<S: AsyncWrite + Unpin>(
    s: &mut S,
    kind: u8,
    body: &[u8],
) -> anyhow::Result<()> {
    s.write_all(&frame(kind, body)).await?;
    s.flush().await?;
    Ok(())
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(kind);
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}
