//! `qpq-server-lite`: command line, logging and signals. See `--help`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use qpq_server_lite::config::{Config, Overrides};
use qpq_server_lite::store::{Invite, Store, now_ms};
use qpq_server_lite::{Server, tls};
use rand::Rng;

const HELP: &str = "\
qpq-server-lite: end-to-end encrypted messaging relay (QUIC + TLS 1.3, redb)

USAGE:
    qpq-server-lite [OPTIONS] [serve]
    qpq-server-lite [OPTIONS] invite create [--uses N] [--expires-days D]
    qpq-server-lite [OPTIONS] invite list
    qpq-server-lite [OPTIONS] invite revoke CODE
    qpq-server-lite [OPTIONS] fingerprint

OPTIONS (override the config file and QPQ_* environment variables):
    -c, --config FILE         TOML configuration (also QPQ_CONFIG)
        --data-dir DIR        database, certificate and blobs [qpq-data]
        --listen ADDR         UDP address [[::]:5001]
        --registration P      open | invite | closed [invite]
        --log FILTER          log filter for stderr [info]
        --tls-cert FILE       certificate chain (PEM or DER)
        --tls-key FILE        private key (PEM or DER)
        --set KEY=VALUE       any option, e.g. --set limits.max_connections=64
    -h, --help                this text
    -V, --version             version

`invite` commands work on the database directly, also while the server runs.
";

enum Command {
    Serve,
    InviteCreate { uses: u32, expires_days: u64 },
    InviteList,
    InviteRevoke(String),
    Fingerprint,
}

fn main() -> anyhow::Result<()> {
    let (config_file, overrides, command) = parse_args()?;
    let config_file = config_file.or_else(|| std::env::var_os("QPQ_CONFIG").map(PathBuf::from));
    let env = std::env::vars().filter(|(k, _)| k.starts_with("QPQ_"));
    let config = Config::load(config_file.as_deref(), env, &overrides)?;
    init_logging(&config.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("qpq-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config, command))
}

async fn run(config: Config, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Fingerprint => {
            let id = tls::load_or_generate(
                config.tls_cert.as_deref(),
                config.tls_key.as_deref(),
                &config.data_dir,
            )?;
            println!("sha256:{}", id.fingerprint());
            Ok(())
        }
        Command::InviteCreate { uses, expires_days } => {
            let store = open_store(&config)?;
            let now = now_ms();
            let invite = Invite {
                code: new_invite_code(),
                created_ms: now,
                expires_ms: if expires_days == 0 {
                    0
                } else {
                    now.saturating_add(expires_days.saturating_mul(86_400_000))
                },
                uses_left: uses,
            };
            if !store.create_invite(invite.clone()).await? {
                bail!("invite code collision; run the command again");
            }
            println!("{}", invite.code);
            Ok(())
        }
        Command::InviteList => {
            let store = open_store(&config)?;
            let now = now_ms();
            println!("{:<24} {:>5} {:>12} state", "code", "uses", "expires");
            for i in store.invites()? {
                let expires = if i.expires_ms == 0 {
                    "never".to_string()
                } else {
                    format!("in {}h", i.expires_ms.saturating_sub(now) / 3_600_000)
                };
                let state = if i.usable(now) { "usable" } else { "expired" };
                println!("{:<24} {:>5} {:>12} {state}", i.code, i.uses_left, expires);
            }
            Ok(())
        }
        Command::InviteRevoke(code) => {
            let store = open_store(&config)?;
            if store.revoke_invite(code.clone()).await? {
                println!("revoked {code}");
                Ok(())
            } else {
                bail!("no invite code {code}")
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Server::bind(config.clone()).await?;
    let addr = server.local_addr()?;
    tracing::info!(%addr, registration = config.registration.as_str(), data_dir = %config.data_dir.display(), "listening");
    if server.generated_cert() {
        tracing::info!(
            "generated a self-signed certificate; clients pin its fingerprint on first use"
        );
    }
    // Machine-readable start lines on stdout (tests and scripts read them).
    println!("listening on {addr}");
    println!("fingerprint sha256:{}", server.fingerprint());
    server.run(shutdown_signal()).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    Store::open(&config.db_path(), &config.data_dir.join("blobs"), config.limits.db_cache_bytes)
        .with_context(|| format!("opening {}", config.db_path().display()))
}

/// `qpq-` and 16 characters from a 31-letter alphabet without look-alikes (about 79 bits).
fn new_invite_code() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut rng = rand::rngs::OsRng;
    let mut code = String::from("qpq-");
    for i in 0..16 {
        if i > 0 && i % 4 == 0 {
            code.push('-');
        }
        code.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    code
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    let targets: tracing_subscriber::filter::Targets =
        filter.parse().with_context(|| format!("log filter {filter:?}"))?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
        .with(targets)
        .init();
    Ok(())
}

fn parse_args() -> anyhow::Result<(Option<PathBuf>, Overrides, Command)> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut config = None;
    let mut overrides: Overrides = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut uses = 1u32;
    let mut expires_days = 7u64;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') | Long("config") => config = Some(PathBuf::from(parser.value()?)),
            Long("data-dir") => {
                overrides.push(("data_dir".into(), quoted(parser.value()?.string()?)))
            }
            Long("listen") => overrides.push(("listen".into(), quoted(parser.value()?.string()?))),
            Long("registration") => {
                overrides.push(("registration".into(), quoted(parser.value()?.string()?)))
            }
            Long("log") => overrides.push(("log".into(), quoted(parser.value()?.string()?))),
            Long("tls-cert") => {
                overrides.push(("tls_cert".into(), quoted(parser.value()?.string()?)))
            }
            Long("tls-key") => {
                overrides.push(("tls_key".into(), quoted(parser.value()?.string()?)))
            }
            Long("set") => {
                let kv = parser.value()?.string()?;
                let (k, v) = kv.split_once('=').context("--set takes KEY=VALUE")?;
                overrides.push((k.trim().to_string(), v.trim().to_string()));
            }
            Long("uses") => uses = parser.value()?.parse()?,
            Long("expires-days") => expires_days = parser.value()?.parse()?,
            Short('h') | Long("help") => {
                print!("{HELP}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("qpq-server-lite {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            Value(v) => words.push(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let command = match words.as_slice() {
        [] | ["serve"] => Command::Serve,
        ["fingerprint"] => Command::Fingerprint,
        ["invite", "create"] => {
            if uses == 0 {
                bail!("--uses must be at least 1");
            }
            Command::InviteCreate { uses, expires_days }
        }
        ["invite", "list"] => Command::InviteList,
        ["invite", "revoke", code] => Command::InviteRevoke((*code).to_string()),
        _ => bail!("unknown command `{}`; see --help", words.join(" ")),
    };
    Ok((config, overrides, command))
}

/// A flag value as a TOML string literal, so paths and addresses never parse as numbers.
fn quoted(s: String) -> String {
    toml_string(&s)
}

fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
