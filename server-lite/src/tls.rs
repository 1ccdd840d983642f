//! The server certificate: a configured PEM/DER pair, or a self-signed one generated on first
//! start and persisted in the data directory, and the rustls/quinn server configuration.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::store::hex;

/// File names of the generated pair inside the data directory.
pub const GENERATED_CERT: &str = "server-cert.der";
/// See [`GENERATED_CERT`].
pub const GENERATED_KEY: &str = "server-key.der";

/// A certificate chain with its key.
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Whether this start generated it.
    pub generated: bool,
}

impl Identity {
    /// SHA-256 of the leaf certificate, lower-case hex: what clients pin.
    pub fn fingerprint(&self) -> String {
        self.chain.first().map(|c| fingerprint(c.as_ref())).unwrap_or_default()
    }
}

/// SHA-256 of a DER certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

/// Loads `cert`/`key` when configured; otherwise loads or creates the generated pair in
/// `data_dir`.
pub fn load_or_generate(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
) -> anyhow::Result<Identity> {
    if let (Some(cert), Some(key)) = (cert, key) {
        return Ok(Identity { chain: read_chain(cert)?, key: read_key(key)?, generated: false });
    }
    let (cert_path, key_path) = (data_dir.join(GENERATED_CERT), data_dir.join(GENERATED_KEY));
    if cert_path.exists() && key_path.exists() {
        return Ok(Identity {
            chain: read_chain(&cert_path)?,
            key: read_key(&key_path)?,
            generated: false,
        });
    }
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names).context("generating certificate")?;
    let cert_der = generated.cert.der().to_vec();
    let key_der = generated.signing_key.serialize_der();
    write_private(&key_path, &key_der)
        .with_context(|| format!("writing {}", key_path.display()))?;
    std::fs::write(&cert_path, &cert_der)
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok(Identity {
        chain: vec![CertificateDer::from(cert_der)],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        generated: true,
    })
}

/// The quinn server configuration: TLS 1.3 only, ALPN `qpq`, no 0-RTT, no client certificates,
/// key exchange by [`qpq_core::pq_tls`] (hybrid X25519MLKEM768 when the client offers it).
pub fn server_crypto(
    identity: Identity,
) -> anyhow::Result<quinn::crypto::rustls::QuicServerConfig> {
    let provider = Arc::new(qpq_core::pq_tls::crypto_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the qpq provider")?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .context("certificate and key do not match or are unsupported")?;
    tls.alpn_protocols = vec![qpq_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    Ok(quinn::crypto::rustls::QuicServerConfig::try_from(tls)?)
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(b"-----BEGIN") {
        let chain = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing PEM in {}", path.display()))?;
        if chain.is_empty() {
            bail!("no certificate in {}", path.display());
        }
        return Ok(chain);
    }
    Ok(vec![CertificateDer::from(bytes)])
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(b"-----BEGIN") {
        return PrivateKeyDer::from_pem_slice(&bytes)
            .with_context(|| format!("parsing PEM key in {}", path.display()));
    }
    PrivateKeyDer::try_from(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a DER private key: {e}", path.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_is_persisted_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(None, None, dir.path()).unwrap();
        assert!(first.generated);
        let fp = first.fingerprint();
        assert_eq!(fp.len(), 64);
        let again = load_or_generate(None, None, dir.path()).unwrap();
        assert!(!again.generated);
        assert_eq!(again.fingerprint(), fp);
        server_crypto(again).unwrap();
    }

    #[test]
    fn garbage_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c.pem");
        let k = dir.path().join("k.pem");
        std::fs::write(&c, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
        std::fs::write(&k, b"junk").unwrap();
        assert!(load_or_generate(Some(&c), Some(&k), dir.path()).is_err());
    }
}
