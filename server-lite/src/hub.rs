//! Who is connected: push channels to authenticated connections and long-poll wake-ups.
//!
//! Pushes are best effort. Each connection has a small bounded queue drained by its own push
//! task; when a client does not read, its queue fills and further pushes are dropped (the
//! messages stay queued on disk for Fetch). A queued push holds its size against the memory
//! budget, and is dropped instead when the budget is spent. Nothing here touches storage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use qpq_proto::CloseCode;
use tokio::sync::{Notify, mpsc};

use crate::budget::{Budget, Priority, Reservation};

/// Pushes a connection may have waiting before further ones are dropped.
pub const PUSH_QUEUE: usize = 32;

/// An encoded push frame, shared between recipients.
pub type PushFrame = Arc<Vec<u8>>;

/// A push waiting in a connection's queue, with the memory it holds against the budget.
pub struct Queued {
    /// The frame.
    pub frame: PushFrame,
    _memory: Reservation,
}

/// The sending half of a connection's push queue.
pub type PushSender = mpsc::Sender<Queued>;

/// A registered connection.
struct Peer {
    conn_id: u64,
    device_id: Vec<u8>,
    session: [u8; 32],
    push: PushSender,
    /// `None` for an in-process connection (the fuzz harness): nothing to close.
    conn: Option<quinn::Connection>,
}

/// The registry of authenticated connections.
pub struct Hub {
    peers: Mutex<HashMap<[u8; 32], Vec<Peer>>>,
    waiters: Mutex<HashMap<[u8; 32], Arc<Notify>>>,
    budget: Arc<Budget>,
}

impl Hub {
    /// A hub whose queued pushes count against `budget`.
    pub fn with_budget(budget: Arc<Budget>) -> Self {
        Self { peers: Mutex::default(), waiters: Mutex::default(), budget }
    }

    /// Registers an authenticated connection of `identity`.
    pub fn register(
        &self,
        identity: [u8; 32],
        conn_id: u64,
        device_id: Vec<u8>,
        session: [u8; 32],
        push: PushSender,
        conn: Option<quinn::Connection>,
    ) {
        let mut peers = lock(&self.peers);
        let list = peers.entry(identity).or_default();
        list.retain(|p| p.conn_id != conn_id);
        list.push(Peer { conn_id, device_id, session, push, conn });
    }

    /// Forgets a connection.
    pub fn unregister(&self, identity: &[u8; 32], conn_id: u64) {
        let mut peers = lock(&self.peers);
        if let Some(list) = peers.get_mut(identity) {
            list.retain(|p| p.conn_id != conn_id);
            if list.is_empty() {
                peers.remove(identity);
            }
        }
    }

    /// Queues `frame` for every connection of `identity` except `skip_conn`; returns how many
    /// took it. A full queue, or a spent memory budget, drops the push for that connection.
    pub fn push(&self, identity: &[u8; 32], frame: &PushFrame, skip_conn: Option<u64>) -> usize {
        let peers = lock(&self.peers);
        let Some(list) = peers.get(identity) else { return 0 };
        list.iter()
            .filter(|p| Some(p.conn_id) != skip_conn)
            .filter(|p| {
                // Counted per queue although recipients share the frame: an overestimate
                // when many are online, and exact for the stuck client that matters.
                let Ok(memory) = self.budget.reserve(frame.len() as u64, Priority::LargeRequest)
                else {
                    return false;
                };
                p.push.try_send(Queued { frame: frame.clone(), _memory: memory }).is_ok()
            })
            .count()
    }

    /// Whether `identity` has a connection right now.
    pub fn is_online(&self, identity: &[u8; 32]) -> bool {
        lock(&self.peers).contains_key(identity)
    }

    /// Authenticated connections in total.
    pub fn connections(&self) -> usize {
        lock(&self.peers).values().map(Vec::len).sum()
    }

    /// Closes the connections of `identity` that match `which` (all of them, one session's,
    /// or one device's), except `keep_conn`.
    pub fn disconnect(
        &self,
        identity: &[u8; 32],
        which: Which<'_>,
        keep_conn: Option<u64>,
        reason: &str,
    ) {
        let peers = lock(&self.peers);
        let Some(list) = peers.get(identity) else { return };
        for p in list {
            let hit = match which {
                Which::All => true,
                Which::Session(s) => p.session == *s,
                Which::Device(d) => p.device_id == d,
            };
            if hit
                && Some(p.conn_id) != keep_conn
                && let Some(conn) = &p.conn
            {
                conn.close(quinn::VarInt::from_u32(CloseCode::Revoked.as_u32()), reason.as_bytes());
            }
        }
    }

    /// The wake-up for long polls on `identity`'s queues.
    pub fn waiter(&self, identity: &[u8; 32]) -> Arc<Notify> {
        lock(&self.waiters).entry(*identity).or_default().clone()
    }

    /// Drops the wake-up of `identity` if no long poll holds it any more.
    pub fn release_waiter(&self, identity: &[u8; 32], notify: Arc<Notify>) {
        let mut w = lock(&self.waiters);
        drop(notify);
        if w.get(identity).is_some_and(|n| Arc::strong_count(n) == 1) {
            w.remove(identity);
        }
    }

    /// Wakes every long poll on `identity`'s queues.
    pub fn notify(&self, identity: &[u8; 32]) {
        if let Some(n) = lock(&self.waiters).get(identity) {
            n.notify_waiters();
        }
    }
}

/// Which connections [`Hub::disconnect`] closes.
#[derive(Clone, Copy)]
pub enum Which<'a> {
    /// Every connection of the user.
    All,
    /// The connections bound to one session (by token hash).
    Session(&'a [u8; 32]),
    /// The connections of one device.
    Device(&'a [u8]),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
