//! Test support shared by this crate's tests and the server's: a redb storage backend that can
//! lose power. Not part of the API; hidden from the documentation.
//!
//! [`PowerCutBackend`] is a handle to a simulated disk holding two images of one file: the
//! `durable` image, what the platter held at the last `sync_data`, and the `volatile` image,
//! every write so far (the OS page cache). redb reads the volatile image, as it would read
//! through the page cache. Taking a cut returns a fresh disk built from one of them:
//!
//! - [`PowerCutBackend::power_cut`]: the machine lost power; only what was synced survives.
//! - [`PowerCutBackend::crash`]: the process was killed; the page cache survives, so every
//!   completed write does.
//! - [`PowerCutBackend::torn`]: the machine lost power while the disk was writing back: a
//!   seeded random subset of the unsynced writes, cut into [`SECTOR`]-byte pieces, reached the
//!   platter, in any order.
//!
//! A cut is taken while the database is still open (that is the point: redb never gets to shut
//! down cleanly). The disk it was taken from is dead from then on: every later write, `set_len`
//! and `sync_data` on it fails with an I/O error and changes nothing. Drop the old `Database`
//! (or whatever owns it) after the cut and before relying on anything else: its closing writes
//! fail and are lost, as they would be, and redb ignores errors when it closes.
//! [`PowerCutBackend::fail_after`] kills the disk the same way in the middle of whatever redb is
//! doing, typically a commit, so that a cut can land inside one.

use std::fmt;
use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use redb::{BackendError, StorageBackend};

/// The unit a disk writes atomically, in bytes: [`PowerCutBackend::torn`] keeps or loses each
/// such piece of an unsynced write on its own.
pub const SECTOR: usize = 512;

/// Identifies the handle that holds a byte-range lock. Every handle made with
/// [`PowerCutBackend::new`], [`Clone::clone`] or a cut gets its own.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A handle to a simulated disk that loses every write not followed by a sync when the power
/// goes. See the [module documentation](self).
///
/// Cloning makes another handle to the same disk, like opening the file a second time: byte
/// range locks taken through one conflict with those taken through another, so redb's locking
/// (all of its concurrency modes) works as on a real file.
pub struct PowerCutBackend {
    shared: Arc<Shared>,
    instance: u64,
}

struct Shared {
    disk: Mutex<Disk>,
    /// Signalled whenever a lock is released.
    unlocked: Condvar,
}

#[derive(Default)]
struct Disk {
    /// What survived the last sync.
    durable: Vec<u8>,
    /// Every write so far.
    volatile: Vec<u8>,
    /// The writes and length changes since the last sync, in order.
    unsynced: Vec<Unsynced>,
    writes: u64,
    set_lens: u64,
    syncs: u64,
    bytes_written: u64,
    /// Mutating calls that may still succeed before the power goes; `None`: no limit.
    budget: Option<u64>,
    /// The power went (a cut was taken, or the budget ran out): nothing changes any more.
    dead: bool,
    locks: Vec<Lock>,
}

enum Unsynced {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

struct Lock {
    owner: u64,
    start: u128,
    /// Exclusive; `u128::MAX` for an unbounded range.
    end: u128,
    shared: bool,
}

impl Disk {
    fn from_image(image: Vec<u8>) -> Self {
        Self { durable: image.clone(), volatile: image, ..Self::default() }
    }

    /// Spends one mutating call, or fails if the power is gone.
    fn power(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(power_failed());
        }
        match &mut self.budget {
            Some(0) => {
                self.dead = true;
                Err(power_failed())
            }
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn conflicts(&self, owner: u64, start: u128, end: u128, shared: bool) -> bool {
        self.locks
            .iter()
            .any(|l| l.owner != owner && l.start < end && start < l.end && !(shared && l.shared))
    }
}

fn power_failed() -> io::Error {
    io::Error::other("simulated power failure: the disk is gone")
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "access past the end of the simulated disk")
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| out_of_range())
}

/// The half-open range `[start, end)` of lock bounds; `u128::MAX` stands for "no end".
fn lock_range(start: Bound<u64>, end: Bound<u64>) -> Result<(u128, u128), BackendError> {
    let s = match start {
        Bound::Included(s) => u128::from(s),
        Bound::Excluded(s) => u128::from(s) + 1,
        Bound::Unbounded => 0,
    };
    let e = match end {
        Bound::Included(e) => u128::from(e) + 1,
        Bound::Excluded(e) => u128::from(e),
        Bound::Unbounded => u128::MAX,
    };
    if s >= e {
        return Err(BackendError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty lock range",
        )));
    }
    Ok((s, e))
}

impl Default for PowerCutBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for PowerCutBackend {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for PowerCutBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.disk();
        f.debug_struct("PowerCutBackend")
            .field("durable_len", &d.durable.len())
            .field("volatile_len", &d.volatile.len())
            .field("unsynced", &d.unsynced.len())
            .field("writes", &d.writes)
            .field("syncs", &d.syncs)
            .field("dead", &d.dead)
            .finish()
    }
}

impl PowerCutBackend {
    /// An empty disk.
    pub fn new() -> Self {
        Self::on(Disk::default())
    }

    fn on(disk: Disk) -> Self {
        Self {
            shared: Arc::new(Shared { disk: Mutex::new(disk), unlocked: Condvar::new() }),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.shared.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a cut: kills this disk and returns a new one holding `image` in both images.
    fn cut(&self, image: impl FnOnce(&Disk) -> Vec<u8>) -> Self {
        let mut d = self.disk();
        d.dead = true;
        Self::on(Disk::from_image(image(&d)))
    }

    /// The power went and came back: a new disk holding what was synced. This disk is dead.
    pub fn power_cut(&self) -> Self {
        self.cut(|d| d.durable.clone())
    }

    /// The process was killed and restarted: a new disk holding every completed write (the
    /// page cache survived). This disk is dead.
    pub fn crash(&self) -> Self {
        self.cut(|d| d.volatile.clone())
    }

    /// The power went while the disk was writing back: a new disk holding what was synced plus
    /// a random subset, chosen by `seed`, of the [`SECTOR`]-sized pieces of the unsynced
    /// writes, applied in a random order (so a sector written twice may keep either version),
    /// and one of the lengths the file had since the last sync. This disk is dead.
    pub fn torn(&self, seed: u64) -> Self {
        self.cut(|d| {
            let mut rng = SplitMix64::new(seed);
            // Each piece survives with a probability that is itself random, so that some cuts
            // keep almost nothing and some almost everything.
            let keep = rng.next_u64() >> 1;
            let mut lens = vec![d.durable.len()];
            let mut pieces: Vec<(usize, &[u8])> = Vec::new();
            let mut len = d.durable.len();
            for op in &d.unsynced {
                match op {
                    Unsynced::SetLen(l) => len = *l,
                    Unsynced::Write { offset, data } => {
                        len = len.max(offset + data.len());
                        let mut at = *offset;
                        let mut rest = data.as_slice();
                        while !rest.is_empty() {
                            let n = rest.len().min(SECTOR - at % SECTOR);
                            let (piece, tail) = rest.split_at(n);
                            pieces.push((at, piece));
                            at += n;
                            rest = tail;
                        }
                    }
                }
                lens.push(len);
            }
            let mut image = d.durable.clone();
            let len = lens[rng.below(lens.len())];
            image.resize(len, 0);
            for i in (1..pieces.len()).rev() {
                pieces.swap(i, rng.below(i + 1));
            }
            for (at, piece) in pieces {
                if rng.next_u64() >> 1 >= keep || at >= len {
                    continue;
                }
                let n = piece.len().min(len - at);
                image[at..at + n].copy_from_slice(&piece[..n]);
            }
            image
        })
    }

    /// Lets `ops` more mutating calls (write, `set_len`, `sync_data`) succeed; then the power
    /// goes: that call and every later one fails with an I/O error and changes nothing. Reads
    /// still see the volatile image. Take a cut afterwards to "restart the machine".
    pub fn fail_after(&self, ops: u64) {
        self.disk().budget = Some(ops);
    }

    /// Whether the power has gone (a cut was taken or [`Self::fail_after`] ran out).
    pub fn is_dead(&self) -> bool {
        self.disk().dead
    }

    /// `write` calls that succeeded on this disk.
    pub fn writes(&self) -> u64 {
        self.disk().writes
    }

    /// `sync_data` calls that succeeded on this disk.
    pub fn syncs(&self) -> u64 {
        self.disk().syncs
    }

    /// Bytes written by successful `write` calls on this disk.
    pub fn bytes_written(&self) -> u64 {
        self.disk().bytes_written
    }

    /// Mutating calls (write, `set_len`, `sync_data`) that succeeded on this disk.
    pub fn mutations(&self) -> u64 {
        let d = self.disk();
        d.writes + d.set_lens + d.syncs
    }

    /// The file as redb sees it now (the volatile image).
    pub fn image(&self) -> Vec<u8> {
        self.disk().volatile.clone()
    }

    /// The file as of the last sync (the durable image).
    pub fn synced_image(&self) -> Vec<u8> {
        self.disk().durable.clone()
    }

    /// Writes and length changes since the last sync: what a power cut now would lose.
    pub fn unsynced(&self) -> usize {
        self.disk().unsynced.len()
    }

    fn lock(&self, start: Bound<u64>, end: Bound<u64>, shared: bool, wait: bool) -> LockResult {
        let (start, end) = lock_range(start, end)?;
        let mut d = self.disk();
        while d.conflicts(self.instance, start, end, shared) {
            if !wait {
                return Ok(false);
            }
            d = self.shared.unlocked.wait(d).unwrap_or_else(|p| p.into_inner());
        }
        d.locks.push(Lock { owner: self.instance, start, end, shared });
        Ok(true)
    }
}

type LockResult = Result<bool, BackendError>;

impl StorageBackend for PowerCutBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.disk().volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let d = self.disk();
        let offset = to_usize(offset)?;
        let src = offset
            .checked_add(out.len())
            .and_then(|end| d.volatile.get(offset..end))
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let len = to_usize(len)?;
        let mut d = self.disk();
        d.power()?;
        d.volatile.resize(len, 0);
        d.unsynced.push(Unsynced::SetLen(len));
        d.set_lens += 1;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut d = self.disk();
        d.power()?;
        d.durable = d.volatile.clone();
        d.unsynced.clear();
        d.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let offset = to_usize(offset)?;
        let end = offset.checked_add(data.len()).ok_or_else(out_of_range)?;
        let mut d = self.disk();
        d.power()?;
        // Like a file: a write past the end extends it.
        if d.volatile.len() < end {
            d.volatile.resize(end, 0);
        }
        d.volatile[offset..end].copy_from_slice(data);
        d.unsynced.push(Unsynced::Write { offset, data: data.to_vec() });
        d.writes += 1;
        d.bytes_written += data.len() as u64;
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        self.disk().locks.retain(|l| l.owner != self.instance);
        self.shared.unlocked.notify_all();
        Ok(())
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult {
        self.lock(start, end, false, false)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult {
        self.lock(start, end, true, false)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lock(start, end, false, true).map(drop)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lock(start, end, true, true).map(drop)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        let (start, end) = lock_range(start, end)?;
        let mut d = self.disk();
        let held = d
            .locks
            .iter()
            .position(|l| l.owner == self.instance && l.start == start && l.end == end);
        let Some(i) = held else {
            return Err(BackendError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unlock of a range this handle does not hold",
            )));
        };
        d.locks.swap_remove(i);
        drop(d);
        self.shared.unlocked.notify_all();
        Ok(())
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult {
        let (start, end) = lock_range(start, end)?;
        Ok(self.disk().conflicts(self.instance, start, end, false))
    }
}

/// A small deterministic PRNG (SplitMix64), so that a failing seed reproduces exactly.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0; slightly biased, which tests do not mind).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// `true` with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den.max(1) < num
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_writes_survive_a_power_cut() {
        let b = PowerCutBackend::new();
        b.set_len(1024).unwrap();
        b.write(0, b"synced").unwrap();
        b.sync_data().unwrap();
        b.write(0, b"volatile").unwrap();
        b.write(2000, b"x").unwrap();
        assert_eq!(b.len().unwrap(), 2001, "a write past the end extends the file");
        let mut buf = [0u8; 8];
        b.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"volatile", "reads see the page cache");
        assert_eq!((b.writes(), b.syncs(), b.unsynced()), (3, 1, 2));

        let crashed = b.crash();
        crashed.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"volatile");
        assert_eq!(crashed.len().unwrap(), 2001);
        assert!(b.is_dead() && b.write(0, b"late").is_err() && b.sync_data().is_err());

        let cut = crashed.power_cut();
        assert_eq!(cut.len().unwrap(), 2001, "the crash image was never synced, but it is both");
        let fresh = PowerCutBackend::new();
        fresh.set_len(16).unwrap();
        fresh.write(0, b"synced").unwrap();
        fresh.sync_data().unwrap();
        fresh.write(0, b"volatile").unwrap();
        let cut = fresh.power_cut();
        let mut six = [0u8; 6];
        cut.read(0, &mut six).unwrap();
        assert_eq!(&six, b"synced");
        assert!(cut.read(10, &mut buf).is_err(), "read past the end");
    }

    #[test]
    fn fail_after_kills_the_disk_mid_way() {
        let b = PowerCutBackend::new();
        b.fail_after(2);
        b.set_len(8).unwrap();
        b.write(0, b"ab").unwrap();
        assert!(b.sync_data().is_err());
        assert!(b.is_dead() && b.write(0, b"cd").is_err());
        let mut two = [0u8; 2];
        b.read(0, &mut two).unwrap();
        assert_eq!(&two, b"ab");
        assert_eq!(b.power_cut().len().unwrap(), 0);
    }

    #[test]
    fn torn_keeps_sectors_from_the_writes_history() {
        let b = PowerCutBackend::new();
        b.set_len(4 * SECTOR as u64).unwrap();
        b.sync_data().unwrap();
        b.write(0, &[1; 4 * SECTOR]).unwrap();
        b.write(SECTOR as u64, &[2; SECTOR]).unwrap();
        let mut seen_mixed = false;
        for seed in 0..64 {
            let t = b.clone().torn(seed);
            let mut img = vec![0u8; 4 * SECTOR];
            t.read(0, &mut img).unwrap();
            for (i, s) in img.chunks(SECTOR).enumerate() {
                assert!(s.iter().all(|&x| x == s[0]), "a sector is never torn");
                let allowed: &[u8] = if i == 1 { &[0, 1, 2] } else { &[0, 1] };
                assert!(allowed.contains(&s[0]));
            }
            seen_mixed |= img[0] != img[3 * SECTOR];
        }
        assert!(seen_mixed, "some cut keeps part of a write");
    }

    #[test]
    fn locks_conflict_between_handles_and_close_releases_them() {
        let a = PowerCutBackend::new();
        let b = a.clone();
        let all = (Bound::Unbounded, Bound::Unbounded);
        assert!(a.try_lock_shared_range(all.0, all.1).unwrap());
        assert!(b.try_lock_shared_range(Bound::Included(5), Bound::Excluded(9)).unwrap());
        assert!(!b.try_lock_range(Bound::Included(10), Bound::Unbounded).unwrap());
        assert!(b.query_lock_range(Bound::Included(10), Bound::Included(10)).unwrap());
        a.close().unwrap();
        assert!(!b.query_lock_range(Bound::Included(10), Bound::Included(10)).unwrap());
        assert!(b.try_lock_range(Bound::Included(10), Bound::Unbounded).unwrap());
        b.unlock_range(Bound::Included(10), Bound::Unbounded).unwrap();
        assert!(b.unlock_range(Bound::Included(10), Bound::Unbounded).is_err());
        assert!(lock_range(Bound::Excluded(3), Bound::Included(3)).is_err());
    }
}

/// Which way the disk goes down, for tests that try each: [`Cut::take`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// [`PowerCutBackend::power_cut`].
    Power,
    /// [`PowerCutBackend::crash`].
    Crash,
    /// [`PowerCutBackend::torn`] with this seed.
    Torn(u64),
}

impl Cut {
    /// Takes this cut of `disk`, which is dead from then on.
    pub fn take(self, disk: &PowerCutBackend) -> PowerCutBackend {
        match self {
            Cut::Power => disk.power_cut(),
            Cut::Crash => disk.crash(),
            Cut::Torn(seed) => disk.torn(seed),
        }
    }
}
