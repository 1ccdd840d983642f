//! Timestamped payloads and the receiving side of the delivery benchmarks.
//!
//! A payload starts with a phase byte and the send time in nanoseconds since a shared base
//! `Instant`; sender and receivers live in one process, so receive time minus send time is the
//! delivery latency.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qpq_proto::{Message, method, v1};
use qpq_tests::Client;

/// What the receivers record.
pub struct Recorder {
    base: Instant,
    phase: AtomicU8,
    count: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

impl Recorder {
    /// A recorder whose clock starts now; it counts phase 0 until [`Self::set_phase`].
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            phase: AtomicU8::new(0),
            count: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
        }
    }

    /// A payload of `len` bytes stamped with the current phase and time.
    pub fn payload(&self, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(9)];
        p[0] = self.phase.load(Ordering::Relaxed);
        let ns = self.base.elapsed().as_nanos() as u64;
        p[1..9].copy_from_slice(&ns.to_be_bytes());
        p
    }

    /// Starts counting a new phase: later receipts of older payloads are ignored.
    pub fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
        self.latencies.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Records one received payload at `at`.
    pub fn record(&self, payload: &[u8], at: Instant) {
        if payload.len() < 9 || payload[0] != self.phase.load(Ordering::Relaxed) {
            return;
        }
        let ns = u64::from_be_bytes(payload[1..9].try_into().unwrap_or_default());
        let sent = self.base + Duration::from_nanos(ns);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(at.saturating_duration_since(sent));
    }

    /// Payloads received in this phase.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The latencies of this phase.
    pub fn latencies(&self) -> Vec<Duration> {
        self.latencies.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reads `NewMessage` pushes on `client` forever and records their inline payloads.
pub fn spawn_receiver(
    client: std::sync::Arc<Client>,
    rec: std::sync::Arc<Recorder>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(push) = client.next_push(Duration::from_secs(3600)).await {
            if push.event != method::PUSH_NEW_MESSAGE {
                continue;
            }
            if let Ok(v1::NewMessage { envelope: Some(env), .. }) =
                v1::NewMessage::decode(push.payload.as_slice())
            {
                rec.record(&env.data, push.received);
            }
        }
    })
}
