//! The terminal UI's main loop: terminal setup, the first-run and unlock forms, then input,
//! worker events and ticks feeding [`App::update`], and a redraw after each.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
    Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, MouseEventKind,
};
use qpq_core::client::net::Connection;
use qpq_core::client::{Client, RegisterOptions};
use qpq_core::vault::KdfParams;
use ratatui::DefaultTerminal;
use tokio::sync::mpsc;

use crate::app::{Action, App, Command, WorkerEvent};
use crate::attach::Attached;
use crate::config::Config;
use crate::login::{Form, FormAction, Stage};
use crate::protocol::{Reply, Request};
use crate::signals::Signals;
use crate::{ipc, ui};

/// Restores the terminal however the UI ends: quit, error, signal or a dropped future.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = crossterm::execute!(std::io::stdout(), DisableMouseCapture, DisableBracketedPaste);
        ratatui::restore();
    }
}

/// Runs the UI for the account in `home` until the user quits, a stop signal arrives (SIGHUP
/// from a dropped SSH session, SIGTERM, SIGINT) or the terminal goes away; each way the worker
/// closes the store and the connection and the terminal is restored. `server` (`--server` or
/// `QPQ_SERVER`) is the default of the registration form, and where a daemon this UI starts
/// reaches an existing account's server.
pub async fn run(
    home: PathBuf,
    store: PathBuf,
    server: Option<SocketAddr>,
    signals: Signals,
) -> anyhow::Result<()> {
    let config = Config::load()?;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "the terminal UI needs a terminal; for scripts use a subcommand (qpq --help)"
        );
    }
    let mut terminal =
        ratatui::try_init().map_err(|e| anyhow::anyhow!("cannot set up the terminal: {e}"))?;
    let _guard = TerminalGuard;
    let _ = crossterm::execute!(std::io::stdout(), EnableBracketedPaste);
    let (key_tx, mut keys) = mpsc::channel::<TermEvent>(256);
    std::thread::Builder::new().name("qpq-input".into()).spawn(move || {
        while let Ok(ev) = crossterm::event::read() {
            if key_tx.blocking_send(ev).is_err() {
                break;
            }
        }
    })?;
    let mut stop = signals.clone();
    let mut notice = None;
    loop {
        let setup = tokio::select! {
            r = setup(&mut terminal, &mut keys, &home, &store, server, notice.take()) => r?,
            i = stop.interrupted() => return Err(i.into()),
        };
        let Some(attached) = setup else { return Ok(()) };
        match main_loop(&mut terminal, &mut keys, attached, config.clone(), signals.clone()).await?
        {
            Ended::Quit => return Ok(()),
            // Killed, or stopped by hand: attach again (a new daemon starts locked).
            Ended::DaemonGone => {
                notice = Some("the qpq daemon serving this account stopped".to_string());
            }
        }
    }
}

/// How the main loop ended.
enum Ended {
    /// The user quit (or the terminal went away).
    Quit,
    /// The daemon closed the connection.
    DaemonGone,
}

async fn next_key(keys: &mut mpsc::Receiver<TermEvent>) -> Option<crossterm::event::KeyEvent> {
    loop {
        match keys.recv().await? {
            TermEvent::Key(k) if k.kind != KeyEventKind::Release => return Some(k),
            _ => continue,
        }
    }
}

/// Attaches to the daemon serving the account (starting one, on `server` if given) and
/// unlocks it if needed, or registers a new account first; `None` if the user quit.
async fn setup(
    terminal: &mut DefaultTerminal,
    keys: &mut mpsc::Receiver<TermEvent>,
    home: &Path,
    store: &Path,
    server: Option<SocketAddr>,
    notice: Option<String>,
) -> anyhow::Result<Option<Attached>> {
    if store.exists() {
        let mut form = Form::unlock(&home.display().to_string());
        form.error = notice;
        form.stage = Stage::Working("attaching…".into());
        terminal.draw(|f| form.draw(f))?;
        let mut attached = Attached::to_or_start(home, server).await?;
        form.stage = Stage::Editing;
        while attached.locked {
            terminal.draw(|f| form.draw(f))?;
            // Another attached qpq may unlock the daemon meanwhile.
            let key = tokio::select! {
                key = next_key(keys) => key,
                reply = attached.recv() => match reply? {
                    Some(Reply::State { locked }) => {
                        attached.locked = locked;
                        continue;
                    }
                    Some(_) => continue,
                    None => anyhow::bail!("the qpq daemon went away"),
                },
            };
            let Some(key) = key else { return Ok(None) };
            match form.key(key) {
                FormAction::Quit => return Ok(None),
                FormAction::Submit => {
                    form.stage = Stage::Working("unlocking…".into());
                    terminal.draw(|f| form.draw(f))?;
                    let pass = form.fields[0].value.clone();
                    if let Err(why) = attached.unlock(pass).await? {
                        form.error = Some(why);
                        form.fields[0].value.clear();
                    }
                    form.stage = Stage::Editing;
                }
                _ => {}
            }
        }
        return Ok(Some(attached));
    }
    // `QPQ_SERVER` is in `server` already (clap reads it).
    let default_server = server.map_or_else(|| "127.0.0.1:5001".into(), |s| s.to_string());
    let mut form = Form::register(&default_server);
    let mut fingerprint = None;
    loop {
        terminal.draw(|f| form.draw(f))?;
        let Some(key) = next_key(keys).await else { return Ok(None) };
        match form.key(key) {
            FormAction::Quit => return Ok(None),
            FormAction::Submit => {
                let addr = match form.value("Server").parse() {
                    Ok(a) => a,
                    Err(_) => {
                        form.error =
                            Some("server must be host-ip:port, e.g. 192.0.2.1:5001".into());
                        continue;
                    }
                };
                form.stage = Stage::Working("connecting…".into());
                form.error = None;
                terminal.draw(|f| form.draw(f))?;
                let (tx, _rx) = mpsc::channel(1);
                match Connection::connect(addr, "localhost", None, tx, Duration::from_secs(10))
                    .await
                {
                    Ok(conn) => {
                        fingerprint = Some(conn.fingerprint.clone());
                        form.stage = Stage::Confirm(conn.fingerprint.clone());
                        conn.close().await;
                    }
                    Err(e) => {
                        form.stage = Stage::Editing;
                        form.error = Some(format!("cannot reach the server: {e}"));
                    }
                }
            }
            FormAction::Confirmed => {
                form.stage = Stage::Working("registering (deriving keys)…".into());
                terminal.draw(|f| form.draw(f))?;
                let opts = RegisterOptions {
                    store: store.to_path_buf(),
                    passphrase: form.value("Local passphrase").to_string(),
                    server: form.value("Server").parse()?,
                    pin: fingerprint.clone(),
                    username: form.value("Username").to_string(),
                    password: form.value("Password").to_string(),
                    invite: form.value("Invite code (if needed)").to_string(),
                    kdf: KdfParams::default(),
                };
                let passphrase = opts.passphrase.clone();
                match Client::register(opts).await {
                    Ok(mut c) => {
                        // The new store is served by a daemon like any other, on the server it
                        // was just registered on (the form's, which the store records).
                        c.disconnect().await;
                        drop(c);
                        let mut attached = Attached::to_or_start(home, None).await?;
                        if attached.locked
                            && let Err(why) = attached.unlock(passphrase).await?
                        {
                            anyhow::bail!("unlocking the new account: {why}");
                        }
                        return Ok(Some(attached));
                    }
                    Err(e) => {
                        form.stage = Stage::Editing;
                        form.error = Some(e.to_string());
                    }
                }
            }
            FormAction::None => {}
        }
    }
}

async fn main_loop(
    terminal: &mut DefaultTerminal,
    keys: &mut mpsc::Receiver<TermEvent>,
    attached: Attached,
    config: Config,
    mut signals: Signals,
) -> anyhow::Result<Ended> {
    let (mut rd, mut wr) = attached.split();
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(256);
    // `None`: the daemon went away.
    let (ev_tx, mut events) = mpsc::channel::<Option<WorkerEvent>>(1024);
    let reader = tokio::spawn(async move {
        loop {
            let ev = match rd.recv().await {
                Some(Ok(Reply::Event(e))) => e,
                Some(Ok(Reply::Error(e))) => WorkerEvent::Error(e),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break,
            };
            if ev_tx.send(Some(ev)).await.is_err() {
                return;
            }
        }
        let _ = ev_tx.send(None).await;
    });
    let writer = tokio::spawn(async move {
        while let Some(cmd) = cmd_rx.recv().await {
            if ipc::write_frame(&mut wr, &Request::Ui(cmd)).await.is_err() {
                break;
            }
        }
    });
    if config.mouse {
        let _ = crossterm::execute!(std::io::stdout(), EnableMouseCapture);
    }
    let (mouse, hyperlinks) = (config.mouse, config.hyperlinks);
    let mut app = App::new(config);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // Every way out leaves through the end of this loop, so the worker always gets to close
    // the store and the connection.
    let outcome: anyhow::Result<Ended> = loop {
        let frame = match terminal.draw(|f| ui::draw(f, &app)) {
            Ok(f) => f,
            Err(e) => break Err(anyhow::Error::new(e).context("the terminal went away")),
        };
        if hyperlinks {
            write_links(frame.buffer);
        }
        if let Some(alert) = app.pending_alert.take() {
            notify(&alert);
        }
        if app.quit {
            break Ok(Ended::Quit);
        }
        let action = tokio::select! {
            ev = keys.recv() => match ev {
                Some(TermEvent::Key(k)) if k.kind != KeyEventKind::Release => Action::Key(k),
                Some(TermEvent::Paste(s)) => Action::Paste(s),
                Some(TermEvent::Mouse(m)) if mouse => match m.kind {
                    MouseEventKind::ScrollUp => Action::Key(KeyEvent::from(KeyCode::Up)),
                    MouseEventKind::ScrollDown => Action::Key(KeyEvent::from(KeyCode::Down)),
                    _ => continue,
                },
                Some(_) => continue, // resize and the rest: just redraw
                // The input thread ended: the terminal is gone (EIO on a hung-up tty).
                None => break Ok(Ended::Quit),
            },
            ev = events.recv() => match ev {
                Some(Some(e)) => Action::Worker(e),
                Some(None) | None => break Ok(Ended::DaemonGone),
            },
            i = signals.interrupted() => break Err(i.into()),
            _ = tick.tick() => Action::Tick(Instant::now()),
        };
        for cmd in app.update(action) {
            match cmd {
                Command::Copy(text) => copy(&text),
                Command::Quit => app.quit = true,
                other => match in_our_directory(other) {
                    Ok(cmd) => {
                        let _ = cmd_tx.send(cmd).await;
                    }
                    // Not sent: shown like the daemon's errors.
                    Err(e) => {
                        let _ = app.update(Action::Worker(WorkerEvent::Error(format!("{e:#}"))));
                    }
                },
            }
        }
    };
    if mouse {
        let _ = crossterm::execute!(std::io::stdout(), DisableMouseCapture);
    }
    // Detach: the commands already sent reach the daemon, which keeps the store (and closes
    // it once nothing is attached, if a terminal UI started it).
    drop(cmd_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    reader.abort();
    outcome
}

/// Paths as this terminal means them: the daemon runs in another working directory (and
/// environment), so a file to send becomes absolute here, and so does where downloads go
/// (this user's download directory by default), as for `qpq send-file` and `qpq download`.
/// An error, for the user to see, when a path cannot be resolved.
fn in_our_directory(cmd: Command) -> anyhow::Result<Command> {
    Ok(match cmd {
        Command::SendFile { conv, path } => {
            Command::SendFile { conv, path: crate::downloads::absolute(&path)? }
        }
        Command::Download { conv, message_id, dir } => {
            Command::Download { conv, message_id, dir: Some(crate::downloads::download_dir(dir)?) }
        }
        other => other,
    })
}

/// Rewrites every `http(s)://` run on screen as an OSC 8 hyperlink (same text, same place), so
/// terminals that support it make links clickable; others ignore the escape.
fn write_links(buffer: &ratatui::buffer::Buffer) {
    let area = buffer.area;
    let mut out = Vec::new();
    for y in area.top()..area.bottom() {
        let row: Vec<&str> = (area.left()..area.right()).map(|x| buffer[(x, y)].symbol()).collect();
        let line: String = row.concat();
        if !line.contains("http") {
            continue;
        }
        let mut x = 0usize;
        while x < row.len() {
            let rest: String = row[x..].concat();
            if rest.starts_with("https://") || rest.starts_with("http://") {
                let end = row[x..]
                    .iter()
                    .position(|c| c.trim().is_empty() || *c == "│" || *c == "┃")
                    .map_or(row.len(), |p| x + p);
                let url: String = row[x..end].concat();
                let _ = write!(
                    out,
                    "\x1b[{};{}H\x1b[4m\x1b]8;;{url}\x1b\\{url}\x1b]8;;\x1b\\\x1b[0m",
                    y + 1,
                    x as u16 + area.left() + 1
                );
                x = end;
            } else {
                x += 1;
            }
        }
    }
    if !out.is_empty() {
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(&out);
        let _ = stdout.flush();
    }
}

/// Bell, plus OSC 9 and OSC 777 desktop notifications (terminals that do not know them
/// ignore them).
fn notify(text: &str) {
    let clean: String = text.chars().filter(|c| !c.is_control()).take(120).collect();
    let mut out = std::io::stdout();
    let _ = write!(out, "\x07\x1b]9;{clean}\x07\x1b]777;notify;qpq;{clean}\x07");
    let _ = out.flush();
}

/// Copies to the clipboard with OSC 52 (works over SSH and in tmux with set-clipboard on).
fn copy(text: &str) {
    let mut out = std::io::stdout();
    let _ = write!(out, "\x1b]52;c;{}\x07", base64(text.as_bytes()));
    let _ = out.flush();
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        s.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    s
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{Command, in_our_directory};

    #[test]
    fn paths_are_resolved_here_or_refused_visibly() {
        let cwd = std::env::current_dir().unwrap();
        let send = |p: &str| Command::SendFile { conv: vec![1].into(), path: PathBuf::from(p) };
        assert_eq!(
            in_our_directory(send("a.txt")).unwrap(),
            send(&cwd.join("a.txt").to_string_lossy())
        );
        assert!(in_our_directory(send("")).is_err(), "an empty path is not sent as it is");
        let download = |dir: Option<&str>| Command::Download {
            conv: vec![1].into(),
            message_id: [2; 16].into(),
            dir: dir.map(PathBuf::from),
        };
        assert_eq!(
            in_our_directory(download(Some("in"))).unwrap(),
            download(Some(&cwd.join("in").to_string_lossy()))
        );
        match in_our_directory(download(None)).unwrap() {
            Command::Download { dir: Some(d), .. } => assert!(d.is_absolute(), "{}", d.display()),
            other => panic!("{other:?}"),
        }
        let open = Command::Open(vec![1].into());
        assert_eq!(in_our_directory(open.clone()).unwrap(), open);
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
