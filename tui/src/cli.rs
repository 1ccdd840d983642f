//! Scriptable subcommands.
//!
//! Secrets come from the environment when set (`QPQ_PASSPHRASE` for the local store,
//! `QPQ_PASSWORD` for the account), otherwise from a prompt on the terminal with echo off.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use qpq_core::client::{Client, ClientError, ConvKind, Conversation, Event, RegisterOptions};
use qpq_core::identity::hex;
use qpq_core::ids::GroupId;
use qpq_core::vault::{KdfParams, Vault};

use crate::downloads::printable;

#[derive(Parser)]
#[command(name = "qpq", version, about = "End-to-end encrypted group messaging for the terminal")]
struct Cli {
    /// Directory holding this account's encrypted store. Without a subcommand, `qpq` opens the
    /// terminal UI.
    #[arg(long, env = "QPQ_HOME", global = true)]
    home: Option<PathBuf>,
    /// Server address: where `register` creates the account; for an existing account, where
    /// to reach its server for this run (if it moved). The pinned certificate must still match.
    #[arg(long, env = "QPQ_SERVER", global = true)]
    server: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// A subcommand (also what an attached `qpq` asks the daemon to run: see
/// [`crate::protocol::Request::Cli`]).
#[derive(Subcommand, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Create an account on a server (and the local encrypted store).
    Register {
        /// Username.
        #[arg(long, short)]
        username: String,
        /// Invite code, if the server needs one.
        #[arg(long, default_value = "")]
        invite: String,
        /// Expected server certificate fingerprint (sha256:...). Without it, the first one seen
        /// is pinned.
        #[arg(long)]
        pin: Option<String>,
    },
    /// Log in again with the password (after a session expired).
    Login,
    /// Show this account.
    Whoami,
    /// Send a direct message.
    Dm {
        /// Recipient.
        user: String,
        /// Text.
        text: Vec<String>,
    },
    /// Group administration.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Send to a conversation (text from the arguments, or stdin with `-`).
    Send {
        /// Conversation: `@user` for the direct conversation, `#group` for a group; a bare
        /// name only when exactly one conversation has it.
        conversation: String,
        /// Text, or `-` to read stdin.
        text: Vec<String>,
    },
    /// Fetch new messages.
    Sync,
    /// Print a conversation's history; with --follow keep printing new messages.
    Tail {
        /// Conversation (`@user`, `#group`, or a name only one conversation has).
        conversation: String,
        /// Lines of history.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Keep following.
        #[arg(long, short)]
        follow: bool,
        /// Instead of the last lines: every entry after this local sequence number (how a
        /// `tail --follow` that attached again picks up where it was).
        #[arg(long, hide = true)]
        after: Option<u64>,
    },
    /// Conversations with unread messages.
    Unread {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Send a file.
    SendFile {
        /// Conversation (`@user`, `#group`, or a name only one conversation has).
        conversation: String,
        /// File.
        path: PathBuf,
    },
    /// Download a file offered in a conversation (the latest, or one by name).
    Download {
        /// Conversation (`@user`, `#group`, or a name only one conversation has).
        conversation: String,
        /// File name (default: the latest file offer).
        #[arg(long)]
        name: Option<String>,
        /// Directory to save to (default: `$XDG_DOWNLOAD_DIR`, the download directory of
        /// `user-dirs.dirs`, else `~/Downloads`). The file gets a safe form of the offered
        /// name and never replaces one: `notes (1).pdf`.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show the safety number shared with a user.
    Verify {
        /// The other user.
        user: String,
        /// Record that you compared it and it matched (`--unmark` takes it back).
        #[arg(long)]
        mark: bool,
        /// Forget that it was verified.
        #[arg(long, conflicts_with = "mark")]
        unmark: bool,
    },
    /// Accept the key the server now gives for a user, after `qpq` warned that it changed
    /// (check the new safety number with them first).
    Trust {
        /// The user.
        user: String,
    },
    /// The users you know, their account keys and whether you verified them.
    Contacts,
    /// Serve this account to every `qpq` of yours on a local socket, without a UI: it keeps
    /// receiving while nothing is attached. Starts locked: the first `qpq` that attaches
    /// unlocks it (the passphrase is never read from the environment or a file here).
    Daemon {
        /// Close the store after this many seconds with nothing attached (0: never).
        #[arg(long, default_value_t = 0)]
        lock_after: u64,
        /// Run this shell command for each new message (variables QPQ_CONVERSATION,
        /// QPQ_SENDER, QPQ_KIND: message, mention or file).
        #[arg(long)]
        notify: Option<String>,
        /// Give the notify command the message text too (QPQ_TEXT): plaintext leaves qpq.
        #[arg(long, requires = "notify")]
        notify_text: bool,
        /// Exit a few seconds after the last attached `qpq` leaves (how `qpq` starts one).
        #[arg(long, hide = true)]
        exit_when_detached: bool,
    },
    /// Accept this store as the newest copy after you moved or restored it yourself: its
    /// anchor file (`account.qpq.anchor`) is rewritten to match it. Not for a store you did
    /// not put back yourself: an older copy rewinds encryption state its groups have left.
    Reanchor,
}

/// `qpq group ...`.
#[derive(Subcommand, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum GroupCommand {
    /// Create a group.
    Create { name: String },
    /// Add members (admins only).
    Add { group: String, users: Vec<String> },
    /// Remove a member (admins only).
    Remove { group: String, user: String },
    /// Make a member an admin.
    Promote { group: String, user: String },
    /// Take admin rights away.
    Demote { group: String, user: String },
    /// Rename a group (and optionally set its topic).
    Rename {
        group: String,
        name: String,
        #[arg(long)]
        topic: Option<String>,
    },
    /// Leave a group.
    Leave { group: String },
    /// Members, roles, epoch and verification code.
    Info { group: String },
    /// Rotate your keys in a group.
    Rotate { group: String },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    qpq_core::vault::set_holder_label(&holder_label(&cli));
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qpq: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = matches!(cli.command, Some(Command::Daemon { .. }));
    let result = runtime.block_on(async {
        let signals =
            if daemon { crate::signals::watch_daemon()? } else { crate::signals::watch()? };
        run(cli, signals).await
    });
    // Dropping the runtime drops every task still holding the store, which closes it cleanly.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<crate::signals::Interrupted>() {
            Some(i) => ExitCode::from(i.exit_code()),
            None => {
                eprintln!("qpq: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// How another qpq refused by the store's lock names this one: the subcommand only (its
/// arguments may be message text).
fn holder_label(cli: &Cli) -> String {
    let sub = match &cli.command {
        None => "terminal UI",
        Some(Command::Register { .. }) => "register",
        Some(Command::Login) => "login",
        Some(Command::Whoami) => "whoami",
        Some(Command::Dm { .. }) => "dm",
        Some(Command::Group(_)) => "group",
        Some(Command::Send { .. }) => "send",
        Some(Command::Sync) => "sync",
        Some(Command::Tail { follow: true, .. }) => "tail --follow",
        Some(Command::Tail { .. }) => "tail",
        Some(Command::Unread { .. }) => "unread",
        Some(Command::SendFile { .. }) => "send-file",
        Some(Command::Download { .. }) => "download",
        Some(Command::Verify { .. }) => "verify",
        Some(Command::Trust { .. }) => "trust",
        Some(Command::Contacts) => "contacts",
        Some(Command::Reanchor) => "reanchor",
        Some(Command::Daemon { .. }) => "daemon",
    };
    format!("qpq {sub}")
}

fn home(cli_home: Option<PathBuf>) -> PathBuf {
    cli_home.unwrap_or_else(|| {
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("qpq")
    })
}

fn store_path(home: &Path) -> PathBuf {
    home.join("account.qpq")
}

async fn run(cli: Cli, signals: crate::signals::Signals) -> anyhow::Result<()> {
    let home = home(cli.home);
    let Some(command) = cli.command else {
        let store = store_path(&home);
        return crate::tui_main::run(home, store, cli.server, signals).await;
    };
    if let Command::Register { username, invite, pin } = command {
        let server = cli.server.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5001)));
        let store = store_path(&home);
        if store.exists() {
            bail!("{} already holds an account; use another --home", home.display());
        }
        let passphrase =
            ask(&signals, "QPQ_PASSPHRASE", "New passphrase for the local store: ").await?;
        let password = ask(&signals, "QPQ_PASSWORD", &format!("Password for {username}: ")).await?;
        let mut client = Client::register(RegisterOptions {
            store,
            passphrase,
            server,
            pin: pin.map(|p| p.trim_start_matches("sha256:").to_ascii_lowercase()),
            username: username.clone(),
            password,
            invite,
            kdf: KdfParams::default(),
        })
        .await?;
        let shown = (|| -> std::io::Result<()> {
            let mut out = std::io::stdout().lock();
            writeln!(out, "registered {username} on {server}")?;
            writeln!(out, "identity {}", client.identity_key())?;
            if let Some(fp) = client.pinned_fingerprint() {
                writeln!(out, "server certificate pinned: sha256:{fp}")?;
            }
            Ok(())
        })();
        client.disconnect().await;
        return Ok(shown?);
    }
    let store = store_path(&home);
    if !store.exists() {
        bail!("no account in {}; run `qpq register` first", home.display());
    }
    if let Command::Daemon { lock_after, notify, notify_text, exit_when_detached } = command {
        let opts = crate::daemon::Options {
            exit_when_detached,
            lock_after: (lock_after > 0).then(|| Duration::from_secs(lock_after)),
            notifier: notify.map(|c| crate::daemon::Notifier::new(c, notify_text)),
            server: cli.server,
        };
        return crate::daemon::run(home, opts, signals).await;
    }
    // `tail --follow` runs for as long as the user wants: it attaches to the daemon, starting
    // one if none serves, so other `qpq`s can use the account meanwhile.
    if matches!(command, Command::Tail { follow: true, .. }) {
        let mut stop = signals.clone();
        let attached = tokio::select! {
            a = crate::attach::Attached::to_or_start(&home, cli.server) => a?,
            i = stop.interrupted() => return Err(i.into()),
        };
        return remote(attached, &home, cli.server, command, &signals).await;
    }
    // A daemon serves the account: the command runs there. Otherwise it runs here, holding
    // the serve lock (a daemon started meanwhile waits for it). If another one-shot command
    // holds it for longer than a moment, opening the store below says which one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let _serving = loop {
        if let Some(attached) = crate::attach::Attached::to(&home).await? {
            return remote(attached, &home, cli.server, command, &signals).await;
        }
        if let Some(lock) = crate::daemon::try_serve_lock(&home)? {
            break Some(lock);
        }
        if tokio::time::Instant::now() >= deadline {
            break None;
        }
        // A daemon is starting (or another one-shot command runs): wait for it.
        let mut stop = signals.clone();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            i = stop.interrupted() => return Err(i.into()),
        }
    };
    let passphrase = ask(&signals, "QPQ_PASSPHRASE", "Passphrase: ").await?;
    if matches!(command, Command::Reanchor) {
        let generation = Vault::reanchor(&store, passphrase.as_bytes())?;
        writeln!(
            std::io::stdout().lock(),
            "{} accepted as the newest copy (write {generation})",
            store.display()
        )?;
        return Ok(());
    }
    let mut client = Client::open(&store, &passphrase)?;
    if let Some(server) = cli.server {
        client.set_server(server);
    }
    if matches!(command, Command::Whoami) {
        return whoami(&client, &mut Stdout);
    }
    // From here on the store is open: a signal or a lost terminal ends the command at its
    // next await point, and the store and the connection are closed cleanly below. Whatever
    // was cut short is as safe as after a crash (vault transactions never span an await).
    let mut stop = signals.clone();
    let result = tokio::select! {
        r = connect_and_act(&mut client, command, &signals) => r,
        i = stop.interrupted() => Err(i.into()),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    drop(client);
    result
}

/// Runs a subcommand on the daemon that serves the account (unlocking it first if it is
/// locked); a `tail --follow` then prints new messages from the daemon's events, and attaches
/// again (to a daemon it starts, on `server` if given, if need be) when the daemon goes away.
async fn remote(
    mut attached: crate::attach::Attached,
    home: &Path,
    server: Option<SocketAddr>,
    mut command: Command,
    signals: &crate::signals::Signals,
) -> anyhow::Result<()> {
    use crate::protocol::{Reply, Request, WorkerEvent};
    // What only this process can know: its stdin, its working directory, its environment.
    let mut password = None;
    match &mut command {
        Command::Send { text, .. } if *text == ["-"] => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            *text = vec![s.trim_end_matches('\n').to_string()];
        }
        Command::SendFile { path, .. } => *path = crate::downloads::absolute(path)?,
        Command::Download { dir, .. } => *dir = Some(crate::downloads::download_dir(dir.take())?),
        Command::Login => {
            password = Some(ask(signals, "QPQ_PASSWORD", "Password: ").await?);
        }
        _ => {}
    }
    let mut stop = signals.clone();
    let mut request = Request::Cli { command, password };
    loop {
        if attached.locked {
            let passphrase = ask(signals, "QPQ_PASSPHRASE", "Passphrase: ").await?;
            if let Err(why) = attached.unlock(passphrase).await? {
                bail!("{why}");
            }
        }
        attached.send(&request).await?;
        let mut follow = None;
        let mut printed_up_to = 0;
        loop {
            let reply = tokio::select! {
                r = attached.recv() => r?,
                i = stop.interrupted() => return Err(i.into()),
            };
            match reply {
                Some(Reply::Output(text)) => write!(std::io::stdout(), "{text}")?,
                Some(Reply::Done { error, follow: f, after, notes }) => {
                    for note in notes {
                        writeln!(std::io::stderr(), "qpq: note: {note}")?;
                    }
                    if let Some(e) = error {
                        bail!("{e}");
                    }
                    if f.is_none() {
                        return Ok(());
                    }
                    follow = f;
                    printed_up_to = printed_up_to.max(after);
                    std::io::stdout().flush()?;
                }
                Some(Reply::Event(WorkerEvent::Incoming { conv, entry, sender, .. }))
                    if follow.as_ref() == Some(&conv) && entry.seq > printed_up_to =>
                {
                    printed_up_to = entry.seq;
                    writeln!(std::io::stdout(), "{}", entry_line(&sender, &entry))?;
                    std::io::stdout().flush()?;
                }
                Some(Reply::Error(e)) if follow.is_none() => bail!("{e}"),
                None if follow.is_none() => bail!("the qpq daemon went away"),
                // Following: attach again (starting a daemon if none took over) and go on
                // after the last entry printed (what arrived meanwhile is printed then).
                None | Some(Reply::Error(_)) => break,
                Some(_) => {}
            }
        }
        writeln!(std::io::stderr(), "qpq: the qpq daemon went away; attaching again")?;
        if let Request::Cli { command: Command::Tail { after, .. }, .. } = &mut request {
            *after = Some(printed_up_to);
        }
        attached = tokio::select! {
            a = crate::attach::Attached::to_or_start(home, server) => a?,
            i = stop.interrupted() => return Err(i.into()),
        };
    }
}

async fn connect_and_act(
    client: &mut Client,
    command: Command,
    signals: &crate::signals::Signals,
) -> anyhow::Result<()> {
    if matches!(command, Command::Login) {
        let password =
            ask(signals, "QPQ_PASSWORD", &format!("Password for {}: ", client.username())).await?;
        client.login(&password).await?;
        writeln!(std::io::stdout(), "logged in as {}", client.username())?;
        return Ok(());
    }
    match client.connect().await {
        Ok(()) => {}
        Err(ClientError::NeedLogin) => {
            let password = ask(
                signals,
                "QPQ_PASSWORD",
                &format!("Session expired. Password for {}: ", client.username()),
            )
            .await?;
            client.login(&password).await?;
        }
        Err(e) => return Err(e.into()),
    }
    act(client, command).await
}

/// `writeln!` to the command's output (stdout, or the buffer sent back to an attached
/// `qpq`), returning the error instead of panicking when stdout is gone (a closed pipe, a
/// terminal that went away with its SSH session).
macro_rules! say {
    ($out:expr, $($t:tt)*) => {
        writeln!($out, $($t)*)
    };
}

/// Standard output, written fallibly (the lock is taken per write: `Send`, unlike the
/// guard).
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().lock().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

/// A subcommand's output.
type Out<'a> = &'a mut (dyn Write + Send);

async fn act(client: &mut Client, command: Command) -> anyhow::Result<()> {
    // What went wrong on the way (a message or group change refused for someone, a fork
    // detected) is told on stderr at the end, whatever the command printed.
    let mut notes = client.subscribe();
    let result = act_on(client, command).await;
    for note in rejections(&mut notes) {
        let _ = writeln!(std::io::stderr(), "qpq: note: {note}");
    }
    result
}

/// The `Rejected` reasons among the events received, made printable.
fn rejections(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<String> {
    let mut notes = Vec::new();
    loop {
        match events.try_recv() {
            Ok(Event::Rejected { reason }) => notes.push(printable(&reason)),
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    notes
}

async fn act_on(client: &mut Client, command: Command) -> anyhow::Result<()> {
    client.flush_outbox().await?;
    client.sync().await?;
    let mut out = Stdout;
    if let Some((conv, _)) = execute(client, command, &mut out, true).await? {
        let mut events = client.subscribe();
        loop {
            client.wait(Duration::from_secs(25)).await?;
            while let Ok(ev) = events.try_recv() {
                if let Event::Message { conv: c, entry } = ev
                    && c == conv
                {
                    print_entry(client, &entry, &mut out)?;
                }
            }
            out.flush()?;
        }
    }
    Ok(())
}

impl Command {
    /// A file transfer: run by a serving daemon in a task of its own.
    pub fn is_transfer(&self) -> bool {
        matches!(self, Self::SendFile { .. } | Self::Download { .. })
    }
}

/// The newest file offer in a conversation (of that name, if given).
pub fn find_offer(
    client: &Client,
    conversation: &str,
    name: Option<&str>,
) -> anyhow::Result<qpq_core::content::FileOffer> {
    let conv = client.find_conversation(conversation)?.id;
    let entry = client
        .history(&conv, usize::MAX)?
        .into_iter()
        .rev()
        .find(|e| e.file.as_ref().is_some_and(|f| name.is_none_or(|n| n == f.name)))
        .context("no such file offer in this conversation")?;
    Client::offer_of(&entry).context("no file")
}

/// What a finished upload says.
pub fn sent(offer: &qpq_core::content::FileOffer) -> String {
    format!("sent {} ({} bytes)", offer.name, offer.size)
}

/// What a finished download says: where it went, and under which name it was offered if
/// another one was used (the offered one was taken, or unsafe).
pub fn saved(path: &Path, offered: &str) -> String {
    let shown = printable(&path.display().to_string());
    if path.file_name().is_some_and(|n| n.to_string_lossy() == offered) {
        format!("saved {shown}")
    } else {
        format!("saved {shown} (offered as {offered:?})")
    }
}

/// Runs a subcommand for an attached `qpq` on the daemon's client (connected and synced by
/// the worker, so no preamble). Returns what it printed and the notes to show on stderr with
/// the result: `Ok(Some(conversation))` for a `tail --follow`, which the attached process
/// goes on printing from the daemon's events.
pub async fn perform(
    client: &mut Client,
    command: Command,
    password: Option<String>,
) -> (String, Vec<String>, anyhow::Result<Option<(GroupId, u64)>>) {
    let mut notes = client.subscribe();
    let mut out = Vec::new();
    let result = match command {
        Command::Login => match password {
            Some(p) => client
                .login(&p)
                .await
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(say!(out, "logged in as {}", client.username())?))
                .map(|()| None),
            None => Err(anyhow::anyhow!("no password given")),
        },
        Command::Whoami => whoami(client, &mut out).map(|()| None),
        Command::Register { .. } => {
            Err(anyhow::anyhow!("this home already holds an account; use another --home"))
        }
        Command::Reanchor | Command::Daemon { .. } => Err(anyhow::anyhow!(
            "the account is open in a qpq daemon: stop it (and every attached qpq) first"
        )),
        other => {
            // What arrived since the worker's last turn, as a one-shot command would see it.
            if client.is_online() {
                let _ = client.sync().await;
            }
            execute(client, other, &mut out, false).await
        }
    };
    let mut notes = rejections(&mut notes);
    if result.is_ok() && !client.is_online() && client.outbox_len().unwrap_or(0) > 0 {
        notes.push(
            "the server is unreachable: what you sent waits in the outbox and goes out when \
             the connection is back"
                .into(),
        );
    }
    (String::from_utf8_lossy(&out).into_owned(), notes, result)
}

fn whoami(client: &Client, out: Out<'_>) -> anyhow::Result<()> {
    say!(out, "username {}", client.username())?;
    say!(out, "identity {}", client.identity_key())?;
    say!(out, "server {}", client.server())?;
    if let Some(fp) = client.pinned_fingerprint() {
        say!(out, "pinned sha256:{fp}")?;
    }
    say!(out, "outbox {}", client.outbox_len()?)?;
    Ok(())
}

/// What a subcommand does on a connected, synced client, printing to `out`. A `tail
/// --follow` prints the history and returns the conversation to follow.
async fn execute(
    client: &mut Client,
    command: Command,
    out: Out<'_>,
    stdin: bool,
) -> anyhow::Result<Option<(GroupId, u64)>> {
    match command {
        Command::Dm { user, text } => {
            let conv = client.dm(&user).await?;
            client.send_text(&conv, &text.join(" ")).await?;
        }
        Command::Send { conversation, text } => {
            let conv = client.find_conversation(&conversation)?.id;
            // `-` reads stdin only in the process whose stdin it is (an attached `qpq` sends
            // the text itself).
            let text = if text == ["-"] && stdin {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s.trim_end_matches('\n').to_string()
            } else {
                text.join(" ")
            };
            if text.is_empty() {
                bail!("nothing to send");
            }
            client.send_text(&conv, &text).await?;
        }
        Command::Group(g) => group(client, g, out).await?,
        Command::Sync => {
            let unread: u32 = client.conversations()?.iter().map(|c| c.unread).sum();
            say!(out, "{unread} unread")?;
        }
        Command::Tail { conversation, lines, follow, after } => {
            let conv = client.find_conversation(&conversation)?;
            let entries = match after {
                Some(after) => {
                    let mut all = client.history(&conv.id, usize::MAX)?;
                    all.retain(|e| e.seq > after);
                    all
                }
                None => {
                    say!(out, "-- {} --", printable(&client.conversation_label(&conv)?))?;
                    client.history(&conv.id, lines)?
                }
            };
            let mut last = after.unwrap_or(0);
            for e in &entries {
                print_entry(client, e, out)?;
                last = last.max(e.seq);
            }
            client.mark_read(&conv.id)?;
            if follow {
                // Entries up to here are printed: the follower goes on after them.
                let last = last.max(conv.next_seq.saturating_sub(1));
                return Ok(Some((conv.id, last)));
            }
        }
        Command::Unread { json } => {
            let convs: Vec<_> =
                client.conversations()?.into_iter().filter(|c| c.unread > 0).collect();
            if json {
                let list = convs
                    .iter()
                    .map(|c| {
                        let label = client.conversation_label(c)?;
                        Ok(serde_json::json!({
                            "conversation": address(c),
                            "name": c.name,
                            "id": hex(&c.id),
                            "kind": if c.kind == ConvKind::Dm { "dm" } else { "group" },
                            "named_like_person": label != address(c),
                            "unread": c.unread,
                            "mentions": c.mentions,
                        }))
                    })
                    .collect::<anyhow::Result<Vec<serde_json::Value>>>()?;
                say!(out, "{}", serde_json::Value::Array(list))?;
            } else {
                for c in convs {
                    say!(out, "{:>4}  {}", c.unread, printable(&client.conversation_label(&c)?))?;
                }
            }
        }
        Command::SendFile { conversation, path } => {
            let conv = client.find_conversation(&conversation)?.id;
            let offer = client.send_file(&conv, &path).await?;
            say!(out, "{}", sent(&offer))?;
        }
        Command::Download { conversation, name, dir } => {
            let offer = find_offer(client, &conversation, name.as_deref())?;
            let dir = dir.unwrap_or_else(crate::downloads::default_dir);
            let path = client.download(&offer, &dir).await?;
            say!(out, "{}", saved(&path, &offer.name))?;
        }
        Command::Verify { user, mark, unmark } => {
            let n = client.safety_number(&user).await?;
            if mark || unmark {
                client.mark_verified(&user, mark)?;
            }
            let verified = client.contact(&user)?.is_some_and(|c| c.verified);
            say!(out, "safety number with {user}:\n{n}")?;
            if verified {
                say!(out, "✓ {user} is verified: you compared this number with them.")?;
            } else {
                say!(
                    out,
                    "Compare it with {user} in person or on a call; it matches only if no one is \
                     in between. Then record it with `qpq verify {user} --mark`."
                )?;
            }
        }
        Command::Trust { user } => {
            let (old, new) = client.trust(&user).await?;
            match old {
                Some(old) if old != new => say!(
                    out,
                    "{user}: now trusting account {} (was {}); not verified: compare safety \
                     numbers with `qpq verify {user}`",
                    new,
                    old
                )?,
                _ => say!(out, "{user}: account {} (unchanged; not verified)", new)?,
            }
        }
        Command::Contacts => {
            for (name, c) in client.contacts()? {
                let mark = if c.verified { "verified" } else { "unverified" };
                say!(out, "{name}  {}  {mark}", c.key)?;
            }
        }
        Command::Register { .. }
        | Command::Login
        | Command::Whoami
        | Command::Reanchor
        | Command::Daemon { .. } => {}
    }
    Ok(None)
}

/// A group command's conversation: a bare name means the group of that name.
fn group_address(group: &str) -> String {
    if group.starts_with(['#', '@']) { group.to_string() } else { format!("#{group}") }
}

/// How a conversation is addressed: `@user` or `#group`.
fn address(c: &Conversation) -> String {
    match c.kind {
        ConvKind::Dm => format!("@{}", c.name),
        ConvKind::Group => format!("#{}", c.name),
    }
}

/// Why `name` may not be a group's name here: it is a person's (ours, a contact's, a DM
/// peer's), and `#bob` next to `@bob` is a trap for whoever reads the list. The CLI and the
/// terminal UI both ask before creating or renaming a group.
pub(crate) fn personal_name(client: &Client, name: &str) -> Result<Option<String>, ClientError> {
    let personal = name == client.username()
        || client.contact(name)?.is_some()
        || client.conversations()?.iter().any(|c| c.kind == ConvKind::Dm && c.name == name);
    Ok(personal.then(|| {
        format!(
            "{:?} is a person's name here (@{}); choose another name for the group, so that no \
             one confuses the two",
            printable(name),
            printable(name)
        )
    }))
}

fn refuse_personal_name(client: &Client, name: &str) -> anyhow::Result<()> {
    match personal_name(client, name)? {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

async fn group(client: &mut Client, g: GroupCommand, out: Out<'_>) -> anyhow::Result<()> {
    let find = |client: &Client, group: &str| -> anyhow::Result<GroupId> {
        Ok(client.find_conversation(&group_address(group))?.id)
    };
    match g {
        GroupCommand::Create { name } => {
            refuse_personal_name(client, &name)?;
            client.create_group(&name).await?;
            say!(out, "created #{}", printable(&name))?;
        }
        GroupCommand::Add { group, users } => {
            let conv = find(client, &group)?;
            client.add_members(&conv, &users).await?;
        }
        GroupCommand::Remove { group, user } => {
            let conv = find(client, &group)?;
            client.remove_member(&conv, &user).await?;
        }
        GroupCommand::Promote { group, user } => {
            let conv = find(client, &group)?;
            client.set_admin(&conv, &user, true).await?;
        }
        GroupCommand::Demote { group, user } => {
            let conv = find(client, &group)?;
            client.set_admin(&conv, &user, false).await?;
        }
        GroupCommand::Rename { group, name, topic } => {
            let conv = find(client, &group)?;
            // Setting the topic under the same name is no new claim to it.
            if client.conversation(&conv)?.is_none_or(|c| c.name != name) {
                refuse_personal_name(client, &name)?;
            }
            client.rename(&conv, &name, topic.as_deref()).await?;
        }
        GroupCommand::Leave { group } => {
            let conv = find(client, &group)?;
            client.leave(&conv).await?;
        }
        GroupCommand::Rotate { group } => {
            let conv = find(client, &group)?;
            client.rotate_keys(&conv).await?;
        }
        GroupCommand::Info { group } => {
            let conv = find(client, &group)?;
            let info = client.group_info(&conv).await?;
            say!(out, "name {}", printable(&info.conversation.name))?;
            if !info.conversation.topic.is_empty() {
                say!(out, "topic {}", printable(&info.conversation.topic))?;
            }
            say!(out, "epoch {}", info.epoch)?;
            say!(out, "verification {}", info.verification_code)?;
            if !info.conversation.warning.is_empty() {
                say!(out, "warning {}", printable(&info.conversation.warning))?;
            }
            for (id, name, admin) in info.members {
                say!(
                    out,
                    "member {name}{} {}",
                    if admin { " (admin)" } else { "" },
                    hex(&id[..8])
                )?;
            }
        }
    }
    Ok(())
}

fn print_entry(
    client: &Client,
    e: &qpq_core::client::HistoryEntry,
    out: Out<'_>,
) -> std::io::Result<()> {
    let who =
        client.cached_name(&e.sender).unwrap_or_else(|| hex(&e.sender[..e.sender.len().min(6)]));
    say!(out, "{}", entry_line(&who, e))
}

/// How `tail` shows an entry from `who`. Peers choose the text and file names: shown, never
/// obeyed by the terminal.
pub(crate) fn entry_line(who: &str, e: &qpq_core::client::HistoryEntry) -> String {
    if e.system {
        return format!("* {}", printable(&e.text));
    }
    let mut line = format!("[{who}] {}", if e.deleted { "(deleted)" } else { &e.text });
    if e.edited {
        line.push_str(" (edited)");
    }
    if let Some(f) = &e.file {
        line = format!("[{who}] file {} ({} bytes)", f.name, f.size);
    }
    printable(&line)
}

/// A secret from `var`, or typed at the terminal without echo. The prompt runs on a blocking
/// thread, so a signal still ends the command while it waits.
async fn ask(signals: &crate::signals::Signals, var: &str, prompt: &str) -> anyhow::Result<String> {
    if let Ok(v) = std::env::var(var) {
        return Ok(v);
    }
    if !std::io::stdin().is_terminal() {
        bail!("{var} is not set and stdin is not a terminal");
    }
    let (var, prompt) = (var.to_string(), prompt.to_string());
    let mut stop = signals.clone();
    tokio::select! {
        r = tokio::task::spawn_blocking(move || secret(&var, &prompt)) => r?,
        i = stop.interrupted() => {
            let _ = crossterm::terminal::disable_raw_mode();
            Err(i.into())
        }
    }
}

/// Reads a secret at the terminal without echo.
fn secret(var: &str, prompt: &str) -> anyhow::Result<String> {
    let _ = var;
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    crossterm::terminal::enable_raw_mode()?;
    let mut s = String::new();
    let result = loop {
        match crossterm::event::read() {
            Ok(crossterm::event::Event::Key(k)) => match k.code {
                crossterm::event::KeyCode::Enter => break Ok(()),
                crossterm::event::KeyCode::Char('c')
                    if k.modifiers.contains(crossterm::event::KeyModifiers::CONTROL) =>
                {
                    break Err(anyhow::anyhow!("cancelled"));
                }
                crossterm::event::KeyCode::Char(c) => s.push(c),
                crossterm::event::KeyCode::Backspace => {
                    s.pop();
                }
                _ => {}
            },
            Ok(_) => {}
            Err(e) => break Err(e.into()),
        }
    };
    crossterm::terminal::disable_raw_mode()?;
    eprintln!();
    result.map(|()| s)
}
