//! The server's only persistent state: one redb file.
//!
//! Reads open a redb read transaction directly (MVCC, never blocked by the writer). Every write
//! goes through one writer thread that takes all jobs queued since its last commit and applies
//! them in a single transaction: concurrent enqueues share one fsync (group commit), and a
//! caller is answered only after the commit that holds its write is durable.
//!
//! Invariant: a write job returns `Err` only for storage faults, and an `Err` aborts the whole
//! batch, so a job never leaves a partial write behind. Outcomes a client caused (name taken,
//! queue full, ...) are `Ok` values.

mod accounts;
mod blobs;
pub(crate) mod codec;
mod delivery;
mod keys;
pub mod records;
mod slots;
mod sweep;
pub(crate) mod tables;

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ConcurrencyMode, Database, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

pub use accounts::{LoginRecord, RegisterOutcome, ResumeOutcome, SessionInfo};
pub use blobs::{BlobChunk, BlobLimits, UploadOutcome, hex};
pub use delivery::{EnqueueItem, EnqueueOutcome, QueueLimits, StoredEnvelope, queue_key};
pub use keys::KeyPackagePop;
pub use records::Invite;
pub use slots::{ClaimOutcome, SLOT_ID_LEN, SlotClaim, SlotClaims, SlotLimits};
pub use sweep::SweepReport;
use tables::*;

/// The on-disk schema this build writes. Opening a newer file is refused; older ones migrate.
///
/// - 1 (v0.1): the first layout.
/// - 2: tables `sender_usage` and `last_resort`; META `stored_bytes`; `Queued` records gain
///   the sender and the reserve flag, `Usage` the reserve counters (appended: schema 1 records
///   still decode, as sender unknown and nothing in the reserve).
/// - 3: epoch commit slots: tables `slots`, `slot_claims`, `slot_claimers`, `claim_usage` and
///   `expiry` kind 3 (nothing older changes). Before its release it grew, without a version
///   of its own: `SlotHeader` gained the `closed` flag (appended; older headers are open), and
///   `claim_usage` went from a redb `u64` (claims) to a `ClaimUsage` record (claims, bytes),
///   retyped on open by [`retype_claim_usage`].
pub const SCHEMA_VERSION: u32 = 3;

/// Jobs the writer folds into one transaction at most.
const MAX_BATCH: usize = 512;

/// A storage failure. Client-caused outcomes are not errors (see the module docs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb reported an error.
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    /// Another server (or an older redb) holds the database file.
    #[error("the database is in use by another process")]
    Locked,
    /// A stored value did not decode.
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
    /// The file was written by a newer qpq-server-lite.
    #[error("database schema {found} is newer than this build's {supported}; upgrade the server")]
    TooNew {
        /// Version in the file.
        found: u32,
        /// Version this build writes.
        supported: u32,
    },
    /// The write was in a batch whose commit failed.
    #[error("write batch aborted: {0}")]
    Aborted(String),
    /// The writer thread is gone (shutting down).
    #[error("database writer stopped")]
    WriterGone,
    /// Blob file I/O failed.
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self::Db(e.into())
            }
        }
    )*};
}
from_redb!(redb::StorageError, redb::TableError, redb::TransactionError, redb::CommitError);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen
            | redb::DatabaseError::LockProtocolMismatch => Self::Locked,
            e => Self::Db(e.into()),
        }
    }
}

/// Handle to the database and its writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    writer: mpsc::Sender<Box<dyn WriteJob>>,
    blob_dir: Arc<Path>,
    blob_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// Opens (creating if needed) `path`, migrates it to [`SCHEMA_VERSION`], creates every table
    /// and starts the writer thread. Blobs live in `blob_dir`.
    ///
    /// The file is opened in redb's multi-writer mode, so `qpq-server-lite invite ...` can
    /// change it while the server runs.
    pub fn open(path: &Path, blob_dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            .create(path)?;
        Self::start(db, blob_dir)
    }

    /// Like [`Store::open`] on any redb storage backend, in the same mode and with the same
    /// migration and writer thread (tests use a backend that can lose power).
    #[doc(hidden)]
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        blob_dir: &Path,
        cache_bytes: usize,
    ) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            .create_with_backend(backend)?;
        Self::start(db, blob_dir)
    }

    /// Migrates `db`, creates `blob_dir` and starts the writer thread.
    fn start(db: Database, blob_dir: &Path) -> Result<Self, StoreError> {
        migrate(&db)?;
        std::fs::create_dir_all(blob_dir)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel::<Box<dyn WriteJob>>(4096);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("qpq-db-writer".into())
            .spawn(move || run_writer(&writer_db, rx))?;
        Ok(Self { db, writer: tx, blob_dir: blob_dir.into(), blob_lock: Arc::default() })
    }

    /// Runs `f` inside the next group commit and returns its result once that commit is durable.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = TypedJob { f: Some(f), out: None, reply: tx };
        self.writer.send(Box::new(job)).await.map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// A read transaction on the latest committed state.
    pub(crate) fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }

    /// Queued payload bytes plus charged blob bytes on the whole server: what the disk budget
    /// counts.
    pub fn stored_bytes(&self) -> Result<u64, StoreError> {
        stored_bytes(&self.read()?.open_table(META)?)
    }

    /// Reads a META value.
    pub(crate) fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.read()?.open_table(META)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Returns the META value at `key`, storing `make()` first if there is none. Two racing
    /// callers (or processes) end up with the same stored value.
    pub async fn meta_or_insert(
        &self,
        key: &'static str,
        make: impl FnOnce() -> Vec<u8> + Send + 'static,
    ) -> Result<Vec<u8>, StoreError> {
        if let Some(v) = self.meta(key)? {
            return Ok(v);
        }
        self.write(move |txn| {
            let mut t = txn.open_table(META)?;
            if let Some(v) = t.get(key)? {
                return Ok(v.value().to_vec());
            }
            let v = make();
            t.insert(key, v.as_slice())?;
            Ok(v)
        })
        .await
    }

    /// The directory holding blob contents.
    pub(crate) fn blob_dir(&self) -> &Path {
        &self.blob_dir
    }

    /// Serialises blob uploads, so two chunks of one blob never interleave.
    fn blob_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.blob_lock
    }
}

/// Milliseconds since the Unix epoch.
///
/// `QPQ_TEST_CLOCK_OFFSET_SECS` (read once; signed seconds) shifts this clock. It exists for
/// the format tests (`tests/tests/14_formats.rs`), which serve databases written on a past day
/// with that day's clock so that the lifetimes of what they hold (queued messages, blobs,
/// commit slots) run as they did then. Nothing else reads it; unset, it is 0.
pub fn now_ms() -> u64 {
    static OFFSET_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let offset = *OFFSET_MS.get_or_init(|| {
        std::env::var("QPQ_TEST_CLOCK_OFFSET_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |s| s.saturating_mul(1000))
    });
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    now.saturating_add_signed(offset)
}

fn migrate(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    txn.open_table(USERS)?;
    txn.open_table(IDENTITIES)?;
    txn.open_table(SESSIONS)?;
    txn.open_multimap_table(USER_SESSIONS)?;
    txn.open_table(KEY_PACKAGES)?;
    txn.open_table(KEY_PACKAGE_NEXT)?;
    txn.open_table(LAST_RESORT)?;
    txn.open_table(HYBRID_KEYS)?;
    txn.open_table(QUEUES)?;
    txn.open_table(QUEUE_NEXT)?;
    txn.open_table(USAGE)?;
    txn.open_table(SENDER_USAGE)?;
    txn.open_table(DEDUP)?;
    txn.open_table(EXPIRY)?;
    txn.open_table(BLOBS)?;
    txn.open_table(INVITES)?;
    txn.open_table(DEVICES)?;
    txn.open_table(SLOTS)?;
    txn.open_table(SLOT_CLAIMS)?;
    txn.open_table(SLOT_CLAIMERS)?;
    retype_claim_usage(&txn)?;
    txn.open_table(CLAIM_USAGE)?;
    let found = {
        let meta = txn.open_table(META)?;
        match meta.get("schema_version")? {
            Some(v) => {
                let b: [u8; 4] = v.value().try_into().map_err(|_| StoreError::Corrupt("schema"))?;
                Some(u32::from_be_bytes(b))
            }
            None => None,
        }
    };
    match found {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(StoreError::TooNew { found: v, supported: SCHEMA_VERSION });
        }
        Some(v) if v == SCHEMA_VERSION => {}
        // A fresh file, or an older schema: one step per version, in this same transaction.
        older => {
            if older.is_some_and(|v| v < 2) {
                // 1 -> 2: the disk budget's counter starts from what the users hold. The new
                // tables exist already; schema 1 records decode as they are.
                let mut total = 0u64;
                for row in txn.open_table(USAGE)?.iter()? {
                    let (_, v) = row?;
                    total = total.saturating_add(records::Usage::decode(v.value())?.stored());
                }
                set_stored_bytes(&txn, total)?;
            }
            // 2 -> 3: the slot tables, created above, start empty; no record changes.
            txn.open_table(META)?
                .insert("schema_version", SCHEMA_VERSION.to_be_bytes().as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Schema 3 as first written (the v0.3 fixture) typed [`CLAIM_USAGE`] as identity -> `u64`
/// (claims only); redb refuses to open it as bytes. Such a table is rewritten in the opening
/// transaction as [`records::ClaimUsage`] rows: the count it held, and the payload bytes of
/// the claimer's claims still stored (a one-time walk of `slot_claims`), so later sweeps give
/// back exactly what they took. A table of the current type is left alone.
fn retype_claim_usage(txn: &WriteTransaction) -> Result<(), StoreError> {
    let Err(current) = txn.open_table(CLAIM_USAGE).map(drop) else { return Ok(()) };
    let counts = match txn.open_table(CLAIM_USAGE_COUNT_ONLY) {
        Ok(t) => {
            let mut rows = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                rows.push((k.value().to_vec(), v.value()));
            }
            rows
        }
        // Not the old type either: the first error is the one to report.
        Err(_) => return Err(current.into()),
    };
    let mut bytes = std::collections::BTreeMap::<[u8; 32], u64>::new();
    for row in txn.open_table(SLOT_CLAIMS)?.iter()? {
        let (_, v) = row?;
        let c = records::Claim::decode(v.value())?;
        let b = bytes.entry(c.claimer).or_default();
        *b = b.saturating_add(c.payload.len() as u64);
    }
    txn.delete_table(CLAIM_USAGE_COUNT_ONLY)?;
    let mut t = txn.open_table(CLAIM_USAGE)?;
    for (identity, claims) in counts {
        let claimer = records::key32(&identity)?;
        let u = records::ClaimUsage { claims, bytes: bytes.get(&claimer).copied().unwrap_or(0) };
        t.insert(identity.as_slice(), u.encode().as_slice())?;
    }
    Ok(())
}

/// Queued payload bytes plus charged blob bytes on the whole server ([`STORED_BYTES`]).
pub(crate) fn stored_bytes(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
    match meta.get(STORED_BYTES)? {
        Some(v) => {
            let b: [u8; 8] = v.value().try_into().map_err(|_| StoreError::Corrupt("stored"))?;
            Ok(u64::from_be_bytes(b))
        }
        None => Ok(0),
    }
}

fn set_stored_bytes(txn: &WriteTransaction, value: u64) -> Result<(), StoreError> {
    txn.open_table(META)?.insert(STORED_BYTES, value.to_be_bytes().as_slice())?;
    Ok(())
}

/// Adds `add` and takes `sub` from the server's stored bytes, in the caller's transaction.
pub(crate) fn change_stored_bytes(
    txn: &WriteTransaction,
    add: u64,
    sub: u64,
) -> Result<(), StoreError> {
    if add == sub {
        return Ok(());
    }
    let now = stored_bytes(&txn.open_table(META)?)?;
    set_stored_bytes(txn, now.saturating_add(add).saturating_sub(sub))
}

trait WriteJob: Send {
    /// Applies the job; `false` means a storage fault that must abort the batch.
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Delivers the job's result once the batch's fate is known.
    fn finish(self: Box<Self>, commit: Result<(), String>);
}

struct TypedJob<T, F> {
    f: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> WriteJob for TypedJob<T, F>
where
    T: Send,
    F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, txn: &WriteTransaction) -> bool {
        let Some(f) = self.f.take() else { return true };
        let out = f(txn);
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), String>) {
        let result = match (commit, self.out) {
            (Ok(()), Some(out)) => out,
            (Err(e), Some(Err(own))) => Err(StoreError::Aborted(format!("{own}; {e}"))),
            (Err(e), _) => Err(StoreError::Aborted(e)),
            (Ok(()), None) => Err(StoreError::Aborted("job did not run".into())),
        };
        // The caller may have gone away (connection closed); its write stands regardless.
        let _ = self.reply.send(result);
    }
}

fn run_writer(db: &Database, mut rx: mpsc::Receiver<Box<dyn WriteJob>>) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let commit = apply(db, &mut jobs);
        if let Err(e) = &commit {
            tracing::error!(error = %e, jobs = jobs.len(), "write batch failed");
        }
        for job in jobs {
            job.finish(commit.clone());
        }
    }
    tracing::debug!("database writer stopped");
}

fn apply(db: &Database, jobs: &mut [Box<dyn WriteJob>]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    for job in jobs.iter_mut() {
        if !job.run(&txn) {
            let _ = txn.abort();
            return Err("a write in the batch failed".into());
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Reads and decodes the usage counters of `identity`.
pub(crate) fn usage_of(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    identity: &[u8],
) -> Result<records::Usage, StoreError> {
    match t.get(identity)? {
        Some(v) => records::Usage::decode(v.value()),
        None => Ok(records::Usage::default()),
    }
}

#[cfg(test)]
mod tests;
