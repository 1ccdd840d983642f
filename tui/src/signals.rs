//! Ending cleanly on SIGHUP (what a dropped SSH session sends), SIGTERM and SIGINT.
//!
//! The handlers are installed once at start-up; the first signal is published on a watch
//! channel that every long-running part selects on (a subcommand, `tail --follow`, the terminal
//! UI's loop and forms), which then closes the store and the connection and restores the
//! terminal. A second signal while that runs ends the process at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// The process was asked to stop by a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by signal {0}")]
pub struct Interrupted(pub i32);

impl Interrupted {
    /// The conventional exit status, 128 + the signal number.
    pub fn exit_code(self) -> u8 {
        u8::try_from(128 + self.0).unwrap_or(1)
    }
}

/// A handle on the signal watch; cheap to clone.
#[derive(Clone, Debug)]
pub struct Signals {
    rx: watch::Receiver<Option<i32>>,
}

impl Signals {
    /// Resolves when a stop signal has arrived (at once if one already has).
    pub async fn interrupted(&mut self) -> Interrupted {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => Interrupted(v.unwrap_or(15)),
            // The watcher is gone (runtime shutting down): nothing will ever arrive.
            Err(_) => std::future::pending().await,
        }
    }

    /// A stop signal that has already arrived, if any.
    pub fn received(&self) -> Option<Interrupted> {
        (*self.rx.borrow()).map(Interrupted)
    }
}

/// Installs the handlers (inside the runtime) and returns the watch.
pub fn watch() -> std::io::Result<Signals> {
    watch_with(true)
}

/// Like [`watch`] for `qpq daemon`, which a hang-up does not stop (it is caught and
/// ignored): only SIGTERM and SIGINT do.
pub fn watch_daemon() -> std::io::Result<Signals> {
    watch_with(false)
}

fn watch_with(hangup_stops: bool) -> std::io::Result<Signals> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut first = None;
        loop {
            let n = tokio::select! {
                _ = hup.recv() => {
                    if !hangup_stops {
                        continue;
                    }
                    1
                }
                _ = term.recv() => 15,
                _ = int.recv() => 2,
            };
            match first {
                None => {
                    first = Some(n);
                    let _ = tx.send(Some(n));
                }
                // Asked twice: stop waiting for a clean end. The store recovers on next open.
                Some(_) => {
                    let _ = crossterm::terminal::disable_raw_mode();
                    std::process::exit(128 + n);
                }
            }
        }
    });
    Ok(Signals { rx })
}
