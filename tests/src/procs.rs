//! Child processes in end-to-end tests: signals, waiting for exit, output collected as it
//! comes, and the pid of the `qpq daemon` holding an account's store.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sends `sig` (`-TERM`, `-KILL`, ...) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// Whether `pid` still exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until `pid` is gone.
pub fn wait_gone(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still runs after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid in the store's owner note once it names a `qpq daemon` other than `not`.
pub fn daemon_pid(home: &Path, not: Option<u32>, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(home.join("account.qpq.owner"))
            && text.contains("command qpq daemon")
            && let Some(pid) = text
                .lines()
                .find_map(|l| l.strip_prefix("pid "))
                .and_then(|p| p.trim().parse::<u32>().ok())
            && Some(pid) != not
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no qpq daemon holds the store in {}", home.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a child printed, collected on threads as it comes.
pub struct Collected {
    /// Its stdout so far.
    pub out: Arc<Mutex<String>>,
    /// Its stderr so far.
    pub err: Arc<Mutex<String>>,
}

/// Collects the piped stdout and stderr of `child` (either may be absent).
pub fn collect(child: &mut Child) -> Collected {
    fn pump(r: Option<impl std::io::Read + Send + 'static>) -> Arc<Mutex<String>> {
        let text = Arc::new(Mutex::new(String::new()));
        if let Some(mut r) = r {
            let sink = text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        text
    }
    Collected { out: pump(child.stdout.take()), err: pump(child.stderr.take()) }
}

/// Waits until `text` contains `needle`.
pub fn wait_text(text: &Arc<Mutex<String>>, needle: &str, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while !text.lock().unwrap().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{what}: {needle:?} never appeared in:\n{}",
            text.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed if the test ends without stopping it (a failed assertion must not
/// leave a daemon or a `tail -f` behind).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
