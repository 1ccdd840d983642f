//! The attached side of the account's socket: find the daemon (or start one), unlock it,
//! send requests and read replies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::ipc;
use crate::protocol::{Reply, Request};

/// How long to wait for a daemon just started (or starting) to answer on its socket.
pub const START_WAIT: Duration = Duration::from_secs(30);
/// How long a daemon may take to send its first frame once connected.
pub const HELLO_WAIT: Duration = Duration::from_secs(10);

/// A connection to the daemon serving the account. Replies are read by a task of their own
/// into a channel, so waiting for one is cancel-safe (a frame is never read half-way).
pub struct Attached {
    replies: mpsc::Receiver<Result<Reply, String>>,
    wr: OwnedWriteHalf,
    /// Whether the store is still locked (the daemon waits for [`Attached::unlock`]).
    pub locked: bool,
}

impl Attached {
    /// Attaches to the daemon serving `home`, if one does: `None` when none does.
    pub async fn to(home: &Path) -> anyhow::Result<Option<Self>> {
        let socket = ipc::socket_path(home)?;
        let Some(stream) = ipc::connect(&socket).await? else { return Ok(None) };
        let (mut rd, wr) = stream.into_split();
        // The daemon speaks first: whether the store is open.
        // A daemon that does not answer (stopped with Ctrl-Z, wedged) must not hang us.
        let first = tokio::time::timeout(HELLO_WAIT, async {
            loop {
                match ipc::read_frame::<Reply, _>(&mut rd).await {
                    Ok(Some(Reply::State { locked })) => break Ok(Some(locked)),
                    Ok(Some(Reply::Error(e))) => {
                        break Err(anyhow::anyhow!("the qpq daemon refused: {e}"));
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => break Ok(None),
                    // A daemon dying as we connect (its listener still had us queued).
                    Err(ipc::IpcError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::BrokenPipe
                                | std::io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        break Ok(None);
                    }
                    Err(e) => break Err(e.into()),
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("the qpq daemon did not answer within {HELLO_WAIT:?}"))?;
        let Some(locked) = first? else { return Ok(None) };
        let (tx, replies) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let r = match ipc::read_frame::<Reply, _>(&mut rd).await {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => break,
                    Err(e) => Err(e.to_string()),
                };
                let end = r.is_err();
                if tx.send(r).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Some(Self { replies, wr, locked }))
    }

    /// Attaches to the daemon serving `home`, starting one if none does (it exits a few
    /// seconds after the last attached process leaves). A daemon started here reaches the
    /// account's server at `server` when given (the caller's `--server` or `QPQ_SERVER`),
    /// else at the address the store records; one already serving keeps its own.
    pub async fn to_or_start(home: &Path, server: Option<SocketAddr>) -> anyhow::Result<Self> {
        if let Some(a) = Self::to(home).await? {
            return Ok(a);
        }
        start_daemon(home, server)?;
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(a) = Self::to(home).await? {
                return Ok(a);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the qpq daemon did not start within {START_WAIT:?}; see {}",
                    daemon_log(home).display()
                );
            }
        }
    }

    /// Sends a request.
    pub async fn send(&mut self, r: &Request) -> anyhow::Result<()> {
        ipc::write_frame(&mut self.wr, r).await.context("writing to the qpq daemon")
    }

    /// The next reply; `None` when the daemon closed the connection. Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Reply>> {
        match self.replies.recv().await {
            Some(Ok(r)) => Ok(Some(r)),
            Some(Err(e)) => bail!("reading from the qpq daemon: {e}"),
            None => Ok(None),
        }
    }

    /// Opens the store with `passphrase`. `Ok(Err(why))` if it did not (wrong passphrase).
    pub async fn unlock(&mut self, passphrase: String) -> anyhow::Result<Result<(), String>> {
        self.send(&Request::Unlock { passphrase }).await?;
        loop {
            match self.recv().await? {
                Some(Reply::State { locked: false }) => {
                    self.locked = false;
                    return Ok(Ok(()));
                }
                Some(Reply::UnlockFailed(why)) => return Ok(Err(why)),
                Some(Reply::Error(e)) => bail!("the qpq daemon refused: {e}"),
                Some(_) => {}
                None => bail!("the qpq daemon went away"),
            }
        }
    }

    /// The replies and the writing half, for the terminal UI's loop.
    pub fn split(self) -> (mpsc::Receiver<Result<Reply, String>>, OwnedWriteHalf) {
        (self.replies, self.wr)
    }
}

/// Where a daemon started by `qpq` writes its errors.
pub fn daemon_log(home: &Path) -> PathBuf {
    home.join("daemon.log")
}

/// Starts `qpq daemon --exit-when-detached` for `home` in the background (see
/// [`daemon_command`]), errors appended to `daemon.log`.
fn start_daemon(home: &Path, server: Option<SocketAddr>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the qpq executable")?;
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(daemon_log(home))
        .with_context(|| format!("opening {}", daemon_log(home).display()))?;
    let mut child = daemon_command(&exe, home, server)
        .stderr(log)
        .spawn()
        .context("starting the qpq daemon")?;
    // Reaped when it exits, so no zombie stays behind while we run.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// The command line of a daemon `qpq` starts: its own process group (a hang-up of this
/// terminal does not reach it), no terminal, neither secret variable in its environment, and
/// the caller's choice of server (`--server` or `QPQ_SERVER`, as parsed here) on its command
/// line, so that it reaches the server this `qpq` was told to.
fn daemon_command(exe: &Path, home: &Path, server: Option<SocketAddr>) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(exe);
    c.arg("--home").arg(home);
    if let Some(server) = server {
        c.arg("--server").arg(server.to_string());
    }
    c.args(["daemon", "--exit-when-detached"])
        .env_remove("QPQ_PASSPHRASE")
        .env_remove("QPQ_PASSWORD")
        .env_remove("QPQ_HOME")
        .env_remove("QPQ_SERVER")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0);
    c
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn a_started_daemon_takes_the_callers_server() {
        let (exe, home) = (Path::new("/usr/bin/qpq"), Path::new("/home/ann/.local/share/qpq"));
        let args = |c: &std::process::Command| {
            c.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>()
        };
        let server: SocketAddr = "192.0.2.7:5001".parse().unwrap();
        let c = daemon_command(exe, home, Some(server));
        assert_eq!(
            args(&c),
            [
                "--home",
                "/home/ann/.local/share/qpq",
                "--server",
                "192.0.2.7:5001",
                "daemon",
                "--exit-when-detached"
            ]
        );
        // Neither secret, nor a server of the environment that the caller overrode.
        let removed: Vec<&OsStr> =
            c.get_envs().filter(|(_, v)| v.is_none()).map(|(k, _)| k).collect();
        for var in ["QPQ_PASSPHRASE", "QPQ_PASSWORD", "QPQ_HOME", "QPQ_SERVER"] {
            assert!(removed.contains(&OsStr::new(var)), "{var} is removed");
        }
        // Without a choice, the daemon uses the server the store records.
        let c = daemon_command(exe, home, None);
        assert_eq!(
            args(&c),
            ["--home", "/home/ann/.local/share/qpq", "daemon", "--exit-when-detached"]
        );
    }
}
