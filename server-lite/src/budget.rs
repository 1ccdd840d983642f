//! The server-wide memory budget.
//!
//! A router has a fixed amount of RAM and no swap; the kernel's answer to running out is to
//! kill the biggest process, which would be us. So everything a peer can make the server hold
//! asks the budget first, and is refused with a retry hint when the budget is spent:
//!
//! - a new connection reserves [`CONNECTION_COST`] until it ends (refused above
//!   [`Priority::NewConnection`]'s ceiling, 85 %);
//! - a request body reserves its bytes as they arrive (requests over
//!   [`LARGE_REQUEST`] bytes, uploads in practice, are refused above 90 %; small requests
//!   only at 100 %, so connected clients keep messaging while new work is turned away);
//! - a response over [`LARGE_REQUEST`] bytes (Fetch, Peek, DownloadBlob, a long poll's
//!   answer: all reads) reserves its size once built, while it is written; past 100 % it is
//!   dropped and the call refused;
//! - a queued push reserves its size while it waits (pushes are dropped, not queued, above
//!   90 %: the client fetches instead).
//!
//! Use is accounted, not measured: the resident size at start (plus the database cache it
//! will grow into) and the sum of the reservations. Measuring the resident size instead would
//! punish the server for memory its allocator has freed but kept, refusing work long after a
//! burst; accounting bounds the live memory, and the resident size follows its peak.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a connection is assumed to cost beyond its buffers: QUIC and TLS state, tasks,
/// channels (measured at 40 KiB per idle connection with glibc and 48 KiB with the static musl
/// build: `qpq-bench footprint`, docs/PERFORMANCE.md).
pub const CONNECTION_COST: u64 = 48 * 1024;
/// Request bodies larger than this are "large" and are refused earlier than small ones.
pub const LARGE_REQUEST: u64 = 64 * 1024;
/// Retry hint for a refused request.
pub const RETRY_REQUEST: Duration = Duration::from_secs(2);
/// Retry hint for a refused connection.
pub const RETRY_CONNECTION: Duration = Duration::from_secs(5);

/// How much of the budget may be spent when a reservation of this kind is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A new connection: up to 85 %.
    NewConnection,
    /// A request body over [`LARGE_REQUEST`] bytes: up to 90 %.
    LargeRequest,
    /// Any other request body: up to 100 %.
    Request,
}

impl Priority {
    fn ceiling(self, limit: u64) -> u64 {
        let percent = match self {
            Self::NewConnection => 85,
            Self::LargeRequest => 90,
            Self::Request => 100,
        };
        limit / 100 * percent
    }
}

/// A refused reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// Bytes in use when it was refused.
    pub used: u64,
    /// The budget.
    pub limit: u64,
}

/// The memory budget. Shared by every connection.
pub struct Budget {
    limit: u64,
    base: u64,
    reserved: AtomicU64,
    refusals: AtomicU64,
}

impl Budget {
    /// A budget of `limit` bytes for a process that uses `base` bytes without any peer.
    pub fn new(limit: u64, base: u64) -> Self {
        Self { limit, base, reserved: AtomicU64::new(0), refusals: AtomicU64::new(0) }
    }

    /// A budget of `limit` bytes for this process: its resident size now plus `grows_by`
    /// (caches that fill later) is the base.
    pub fn for_this_process(limit: u64, grows_by: u64) -> Self {
        Self::new(limit, resident_bytes().unwrap_or(0).saturating_add(grows_by))
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// What the server uses without any peer.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes reserved right now.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// How many reservations were refused since start.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// Bytes in use: the base plus the reservations.
    pub fn used(&self) -> u64 {
        self.base.saturating_add(self.reserved())
    }

    /// Reserves `bytes` if the budget allows it at `priority`.
    pub fn reserve(
        self: &Arc<Self>,
        bytes: u64,
        priority: Priority,
    ) -> Result<Reservation, Exhausted> {
        let mut r = Reservation { budget: self.clone(), bytes: 0 };
        r.grow(bytes, priority)?;
        Ok(r)
    }

    /// Reserves `bytes` whatever the budget says (memory that is already allocated).
    pub fn force(self: &Arc<Self>, bytes: u64) -> Reservation {
        self.reserved.fetch_add(bytes, Ordering::Relaxed);
        Reservation { budget: self.clone(), bytes }
    }

    /// Adds `bytes` to the reservations if the total stays under the ceiling of `priority`.
    fn try_add(&self, bytes: u64, priority: Priority) -> Result<(), Exhausted> {
        let ceiling = priority.ceiling(self.limit);
        let mut current = self.reserved.load(Ordering::Relaxed);
        loop {
            let used = self.base.saturating_add(current);
            if used.saturating_add(bytes) > ceiling {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                return Err(Exhausted { used, limit: self.limit });
            }
            match self.reserved.compare_exchange_weak(
                current,
                current + bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => current = now,
            }
        }
    }
}

/// Bytes held against the budget, given back when dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    /// Adds `bytes` to this reservation if the budget allows it at `priority`.
    pub fn grow(&mut self, bytes: u64, priority: Priority) -> Result<(), Exhausted> {
        self.budget.try_add(bytes, priority)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Gives back all but `bytes` of this reservation (nothing if it holds no more).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.budget.reserved.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
            self.bytes = bytes;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The resident set size of this process, from `/proc/self/status` (Linux only).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn budget(limit: u64, base: u64) -> Arc<Budget> {
        Arc::new(Budget::new(limit, base))
    }

    #[test]
    fn priorities_have_their_own_ceilings() {
        let b = budget(100 * MIB, 10 * MIB);
        // 10 + 74 = 84 MiB: a connection still fits under 85 %.
        let _r = b.reserve(74 * MIB, Priority::Request).unwrap();
        assert!(b.reserve(MIB / 2, Priority::NewConnection).is_ok());
        let e = b.reserve(2 * MIB, Priority::NewConnection).err().unwrap();
        assert_eq!(e.limit, 100 * MIB);
        assert_eq!(e.used, 84 * MIB);
        // Uploads up to 90 %, small requests up to 100 %.
        let _big = b.reserve(5 * MIB, Priority::LargeRequest).unwrap();
        assert!(b.reserve(2 * MIB, Priority::LargeRequest).is_err());
        let small = b.reserve(10 * MIB, Priority::Request).unwrap();
        assert!(b.reserve(MIB, Priority::Request).is_ok(), "exactly 100 % still fits");
        assert!(b.reserve(MIB + 1, Priority::Request).is_err());
        assert_eq!(b.refusals(), 3);
        drop(small);
        assert!(b.reserve(MIB, Priority::Request).is_ok());
    }

    #[test]
    fn reservations_are_returned_when_dropped() {
        let b = budget(10 * MIB, MIB);
        let mut r = b.reserve(MIB, Priority::Request).unwrap();
        r.grow(2 * MIB, Priority::Request).unwrap();
        assert_eq!(r.bytes(), 3 * MIB);
        assert!(r.grow(7 * MIB, Priority::Request).is_err(), "1 + 3 + 7 > 10");
        assert_eq!(b.reserved(), 3 * MIB, "a refused grow reserves nothing");
        r.shrink_to(2 * MIB);
        assert_eq!((r.bytes(), b.reserved()), (2 * MIB, 2 * MIB));
        r.shrink_to(5 * MIB);
        assert_eq!(r.bytes(), 2 * MIB, "shrink_to never grows");
        r.grow(MIB, Priority::Request).unwrap();
        let forced = b.force(20 * MIB);
        assert_eq!(b.used(), 24 * MIB);
        assert!(b.reserve(1, Priority::Request).is_err(), "forced bytes count");
        drop(forced);
        drop(r);
        assert_eq!(b.reserved(), 0);
        assert_eq!(b.used(), MIB);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_size() {
        let rss = resident_bytes().unwrap();
        assert!(rss > 64 * 1024, "{rss}");
        let b = Budget::for_this_process(u64::MAX, 1 << 20);
        assert!(b.base() > rss);
    }
}
