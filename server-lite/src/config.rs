//! Server configuration: defaults, then the TOML file, then `QPQ_*` environment variables,
//! then command-line flags (each later source overrides the earlier ones).
//!
//! Environment variables map onto keys by name: `QPQ_LISTEN` sets `listen`,
//! `QPQ_LIMITS_MAX_CONNECTIONS` sets `limits.max_connections`. Values parse as TOML scalars
//! (so `QPQ_LIMITS_MAX_CONNECTIONS=64` is a number). `config.example.toml` lists every option
//! at its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything the server reads at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP address to listen on. Default `[::]:5001` (dual-stack: IPv6 and IPv4); if the host
    /// has no IPv6, the server falls back to `0.0.0.0` on the same port.
    pub listen: SocketAddr,
    /// Directory for the database, the generated certificate and blobs. Default `qpq-data`.
    pub data_dir: PathBuf,
    /// Database file; relative paths are inside `data_dir`. Default `qpq.redb`.
    pub db_file: PathBuf,
    /// PEM or DER certificate chain. Unset: a self-signed certificate is generated on first
    /// start in `data_dir/server-cert.der` and reused afterwards.
    pub tls_cert: Option<PathBuf>,
    /// PEM or DER private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Who may register: `open`, `invite` (needs a code from `qpq-server-lite invite create`)
    /// or `closed`. Default `invite`.
    pub registration: Registration,
    /// Log filter, e.g. `info` or `qpq_server_lite=debug,info`. Default `info`.
    pub log: String,
    /// Resource limits.
    pub limits: Limits,
}

/// Registration policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone who can reach the server may register.
    Open,
    /// Registration needs a valid invite code.
    Invite,
    /// Nobody may register.
    Closed,
}

impl Registration {
    /// The policy's name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Invite => "invite",
            Self::Closed => "closed",
        }
    }
}

/// Limits a peer cannot exceed. Defaults suit a router with 128 MB of RAM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections in total. Default 512.
    pub max_connections: u32,
    /// Connections from one IP address. Default 16.
    pub max_connections_per_ip: u32,
    /// Concurrent RPC streams one connection may open. Default 16.
    pub max_streams_per_connection: u32,
    /// Close a connection after this long without traffic, seconds. Default 60.
    pub idle_timeout_secs: u64,
    /// Time a client has to send a whole request frame, seconds. Default 10.
    pub request_timeout_secs: u64,
    /// Longest `FetchWait` a client may ask for, ms. Default 60000.
    pub fetch_wait_max_ms: u64,
    /// Messages queued for one user, all channels. Default 10000.
    pub max_queue_messages: u64,
    /// Payload bytes queued for one user, all channels. Default 64 MiB.
    pub max_queue_bytes: u64,
    /// The share of one recipient's queue (`max_queue_messages` and `max_queue_bytes`, and of
    /// the handshake reserve) that one sender may hold, percent: a flood from one account
    /// leaves room for everyone else. Default 25.
    pub queue_sender_share_percent: u32,
    /// Messages a recipient's queue takes beyond `max_queue_messages`, for MLS handshake
    /// messages (commits, proposals, Welcomes) only, so a queue full of application messages
    /// still takes the group changes that keep its owner in their groups. Default 500.
    pub handshake_reserve_messages: u64,
    /// ... and payload bytes beyond `max_queue_bytes`. Default 8 MiB.
    pub handshake_reserve_bytes: u64,
    /// Queued payload bytes plus blob bytes the whole server may hold. Past 90 % of it only
    /// handshake messages are stored; at 100 % nothing (`Unavailable`, retry in 60 s).
    /// Default 256 MiB.
    pub disk_budget_bytes: u64,
    /// Recipients in one `BatchEnqueue`. Default 1000.
    pub max_batch_recipients: u32,
    /// Payload bytes times recipients in one `BatchEnqueue` (one write transaction).
    /// Default 16 MiB.
    pub max_batch_bytes: u64,
    /// Message lifetime when the sender gives none, seconds. Default 14 days.
    pub default_ttl_secs: u64,
    /// Longest message lifetime a sender may ask for, seconds. Default 30 days.
    pub max_ttl_secs: u64,
    /// How long a message id is remembered for idempotent enqueue, seconds. Default 7 days.
    pub dedup_window_secs: u64,
    /// Claims one epoch commit slot holds (`ClaimSlot`; a slot lives `max_ttl_secs` from its
    /// latest claim, and is then closed for as long again). Default 1024.
    pub max_slot_claims: u32,
    /// Claims one account may hold across the slots not yet expired. Default 1024.
    pub max_open_claims: u32,
    /// Payload bytes of those claims (each keeps a copy of its commit for the slot's
    /// lifetime). Default 8 MiB.
    pub max_open_claim_bytes: u64,
    /// KeyPackages held per user. Default 100.
    pub max_key_packages: u32,
    /// Below this stock the owner gets a `KeyPackagesLow` push. Default 5.
    pub key_package_low_water: u32,
    /// Largest KeyPackage, bytes. Default 64 KiB.
    pub max_key_package_bytes: u32,
    /// MLS ciphersuites accepted in uploaded KeyPackages. Default `[0x004F]`
    /// (MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519).
    pub key_package_ciphersuites: Vec<u16>,
    /// KeyPackage fetches by one user (any targets): burst. Default 100.
    pub key_package_fetch_per_user_burst: u32,
    /// ... and sustained rate per minute. Default 60.
    pub key_package_fetch_per_user_per_min: u32,
    /// KeyPackage fetches of one target's packages (by anyone): burst. Default 20.
    pub key_package_fetch_per_target_burst: u32,
    /// ... and sustained rate per minute. Default 20.
    pub key_package_fetch_per_target_per_min: u32,
    /// Largest blob, bytes. Default 50 MB.
    pub max_blob_bytes: u64,
    /// Blob bytes one user may hold. Default 200 MB.
    pub blob_quota_bytes: u64,
    /// Lifetime of a complete blob, seconds. Default 30 days.
    pub blob_ttl_secs: u64,
    /// Sessions unused for this long expire, days. Default 30.
    pub session_idle_days: u64,
    /// Devices per user. Default 5.
    pub max_devices: u32,
    /// Auth attempts (register/login/resume) from one IP address: burst. Default 20.
    pub auth_per_ip_burst: u32,
    /// ... and sustained rate per minute. Default 30.
    pub auth_per_ip_per_min: u32,
    /// Login attempts for one username: burst. Default 10.
    pub auth_per_user_burst: u32,
    /// ... and sustained rate per minute. Default 6.
    pub auth_per_user_per_min: u32,
    /// How often the TTL sweep runs, seconds. Default 60.
    pub sweep_interval_secs: u64,
    /// On SIGTERM/SIGINT, how long in-flight RPCs get to finish, seconds. Default 10.
    pub drain_timeout_secs: u64,
    /// redb page cache, bytes. Default 4 MiB.
    pub db_cache_bytes: usize,
    /// Memory the server may use in all, bytes: past 85 % of it new connections are refused,
    /// past 90 % large uploads, at 100 % every request (see `budget.rs`). Default 48 MiB, for a
    /// router with 128 MB of RAM.
    pub memory_budget_bytes: u64,
    /// TLS handshakes in progress at once; more are refused, and past a quarter of it new
    /// clients must first prove their address (QUIC Retry). Default 256.
    pub max_handshakes: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, qpq_proto::DEFAULT_PORT)),
            data_dir: PathBuf::from("qpq-data"),
            db_file: PathBuf::from("qpq.redb"),
            tls_cert: None,
            tls_key: None,
            registration: Registration::Invite,
            log: "info".into(),
            limits: Limits::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_connections_per_ip: 16,
            max_streams_per_connection: 16,
            idle_timeout_secs: 60,
            request_timeout_secs: 10,
            fetch_wait_max_ms: 60_000,
            max_queue_messages: 10_000,
            max_queue_bytes: 64 << 20,
            queue_sender_share_percent: 25,
            handshake_reserve_messages: 500,
            handshake_reserve_bytes: 8 << 20,
            disk_budget_bytes: 256 << 20,
            max_batch_recipients: 1000,
            max_batch_bytes: 16 << 20,
            default_ttl_secs: 14 * 86_400,
            max_ttl_secs: 30 * 86_400,
            dedup_window_secs: 7 * 86_400,
            max_slot_claims: 1024,
            max_open_claims: 1024,
            max_open_claim_bytes: 8 << 20,
            max_key_packages: 100,
            key_package_low_water: 5,
            max_key_package_bytes: 64 << 10,
            key_package_ciphersuites: vec![0x004F],
            key_package_fetch_per_user_burst: 100,
            key_package_fetch_per_user_per_min: 60,
            key_package_fetch_per_target_burst: 20,
            key_package_fetch_per_target_per_min: 20,
            max_blob_bytes: 50_000_000,
            blob_quota_bytes: 200_000_000,
            blob_ttl_secs: 30 * 86_400,
            session_idle_days: 30,
            max_devices: 5,
            auth_per_ip_burst: 20,
            auth_per_ip_per_min: 30,
            auth_per_user_burst: 10,
            auth_per_user_per_min: 6,
            sweep_interval_secs: 60,
            drain_timeout_secs: 10,
            db_cache_bytes: 4 << 20,
            memory_budget_bytes: 48 << 20,
            max_handshakes: 256,
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file, a variable or a flag did not parse or names an unknown option.
    #[error("{origin}: {message}")]
    Invalid {
        /// Where the bad value came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Overrides collected from the command line: `key` -> raw value (`limits.max_connections`).
pub type Overrides = Vec<(String, String)>;

impl Config {
    /// Loads defaults <- `file` <- `env` (`QPQ_*` pairs) <- `flags`, then validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.into(), source })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::Invalid {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(key) = env_key(&name) else { continue };
            set(&mut table, &key, &value, &format!("environment variable {name}"))?;
        }
        for (key, value) in flags {
            set(&mut table, key, value, &format!("flag for {key}"))?;
        }
        let config: Config =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
                ConfigError::Invalid { origin: "configuration".into(), message: e.to_string() }
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The database path (absolute, or relative to the working directory).
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(&self.db_file)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |message: &str| ConfigError::Invalid {
            origin: "configuration".into(),
            message: message.into(),
        };
        let l = &self.limits;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(bad("tls_cert and tls_key must be set together"));
        }
        if l.max_connections == 0 || l.max_connections_per_ip == 0 {
            return Err(bad("connection limits must be at least 1"));
        }
        if l.max_streams_per_connection == 0 || l.max_streams_per_connection > 1024 {
            return Err(bad("limits.max_streams_per_connection must be 1..=1024"));
        }
        if l.idle_timeout_secs == 0 || l.request_timeout_secs == 0 {
            return Err(bad("timeouts must be at least 1 second"));
        }
        if l.default_ttl_secs == 0 || l.default_ttl_secs > l.max_ttl_secs {
            return Err(bad("limits.default_ttl_secs must be 1..=limits.max_ttl_secs"));
        }
        if l.max_blob_bytes > l.blob_quota_bytes {
            return Err(bad("limits.max_blob_bytes must not exceed limits.blob_quota_bytes"));
        }
        if l.auth_per_ip_per_min == 0 || l.auth_per_user_per_min == 0 {
            return Err(bad("auth rate limits must be at least 1 per minute"));
        }
        if l.sweep_interval_secs == 0 {
            return Err(bad("limits.sweep_interval_secs must be at least 1"));
        }
        if l.memory_budget_bytes < 4 << 20 {
            return Err(bad("limits.memory_budget_bytes must be at least 4 MiB"));
        }
        if l.max_handshakes == 0 {
            return Err(bad("limits.max_handshakes must be at least 1"));
        }
        if l.disk_budget_bytes == 0 {
            return Err(bad("limits.disk_budget_bytes must be at least 1"));
        }
        if l.queue_sender_share_percent == 0 || l.queue_sender_share_percent > 100 {
            return Err(bad("limits.queue_sender_share_percent must be 1..=100"));
        }
        if l.key_package_fetch_per_user_per_min == 0 || l.key_package_fetch_per_target_per_min == 0
        {
            return Err(bad("limits.key_package_fetch_per_user_per_min and \
                 key_package_fetch_per_target_per_min must be at least 1"));
        }
        if l.max_batch_recipients == 0 || l.max_key_packages == 0 {
            return Err(bad("limits.max_batch_recipients and max_key_packages must be at least 1"));
        }
        if l.max_slot_claims == 0 || l.max_open_claims == 0 || l.max_open_claim_bytes == 0 {
            return Err(bad(
                "limits.max_slot_claims, max_open_claims and max_open_claim_bytes must be at least 1",
            ));
        }
        Ok(())
    }
}

/// `QPQ_LIMITS_MAX_CONNECTIONS` -> `limits.max_connections`; `QPQ_DATA_DIR` -> `data_dir`.
/// `QPQ_CONFIG` (the file itself) is not a key.
/// Other `QPQ_*` variables (the client's `QPQ_SERVER`, say) are not the server's and are
/// ignored; an unknown `QPQ_LIMITS_*` is an error, since it can only be a typo.
fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("QPQ_")?.to_ascii_lowercase();
    if let Some(limit) = rest.strip_prefix("limits_") {
        return Some(format!("limits.{limit}"));
    }
    TOP_LEVEL_KEYS.contains(&rest.as_str()).then_some(rest)
}

/// The top-level options, as named in the TOML file.
const TOP_LEVEL_KEYS: &[&str] =
    &["listen", "data_dir", "db_file", "tls_cert", "tls_key", "registration", "log"];

fn set(table: &mut toml::Table, key: &str, raw: &str, origin: &str) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { origin: origin.into(), message };
    let value = parse_scalar(raw);
    match key.split_once('.') {
        None => {
            table.insert(key.into(), value);
        }
        Some(("limits", sub)) => {
            let limits =
                table.entry("limits").or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(limits) = limits else {
                return Err(invalid("`limits` is not a table".into()));
            };
            limits.insert(sub.into(), value);
        }
        Some(_) => return Err(invalid(format!("unknown option `{key}`"))),
    }
    Ok(())
}

/// A TOML scalar or array if `raw` parses as one, else the raw string.
fn parse_scalar(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[]), &vec![]).unwrap();
        assert_eq!(c.listen.port(), 5001);
        assert_eq!(c.registration, Registration::Invite);
        assert_eq!(c.limits.max_connections, 512);
    }

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "registration = \"closed\"\nlisten = \"127.0.0.1:1\"\n[limits]\nmax_connections = 7\nmax_devices = 2\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("QPQ_LIMITS_MAX_CONNECTIONS", "8"),
                ("QPQ_REGISTRATION", "open"),
                ("HOME", "/x"),
            ]),
            &vec![("limits.max_connections".into(), "9".into())],
        )
        .unwrap();
        assert_eq!(c.limits.max_connections, 9);
        assert_eq!(c.limits.max_devices, 2);
        assert_eq!(c.registration, Registration::Open);
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn unknown_and_bad_values_are_clear_errors() {
        let c = Config::load(None, env(&[("QPQ_SERVER", "x:1"), ("QPQ_BIN_Q", "/b")]), &vec![]);
        assert!(c.is_ok(), "variables that are not server options are ignored");
        let e = Config::load(None, env(&[("QPQ_LIMITS_NO_SUCH", "1")]), &vec![]).unwrap_err();
        assert!(e.to_string().contains("no_such"), "{e}");
        for (key, value) in [
            ("limits.queue_sender_share_percent", "0"),
            ("limits.queue_sender_share_percent", "101"),
            ("limits.disk_budget_bytes", "0"),
            ("limits.key_package_fetch_per_target_per_min", "0"),
            ("limits.max_slot_claims", "0"),
            ("limits.max_open_claims", "0"),
            ("limits.max_open_claim_bytes", "0"),
        ] {
            let e = Config::load(None, env(&[]), &vec![(key.into(), value.into())]).unwrap_err();
            assert!(e.to_string().contains(key.trim_start_matches("limits.")), "{key}: {e}");
        }
        let e = Config::load(None, env(&[("QPQ_REGISTRATION", "maybe")]), &vec![]).unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        let e = Config::load(None, env(&[]), &vec![("tls_cert".into(), "/x".into())]).unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
        let e =
            Config::load(Some(Path::new("/nonexistent/qpq.toml")), env(&[]), &vec![]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../config.example.toml");
        let uncommented: String = text
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|l| !l.starts_with('#')).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, &uncommented).unwrap();
        let from_file = Config::load(Some(&file), env(&[]), &vec![]).unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }
}
