//! The encrypted client store: one redb file per account.
//!
//! Keys are plaintext and namespaced by table; every value is sealed with ChaCha20-Poly1305
//! under a key derived with Argon2id from the user's passphrase, with the table name and the
//! key as associated data, so a value cannot be moved to another slot. A plaintext `header`
//! table holds the format version, the KDF parameters, the salt and a sealed check value: a
//! wrong passphrase is detected before anything is read or written. The file is private to
//! its owner (0600 from its creation; an open that finds it readable by others makes it 0600
//! and says so through [`Vault::loosened_mode`]): a copy is what an offline guess of the
//! passphrase needs.
//!
//! Writes outside [`Vault::atomic`] commit one by one. Inside it, every read and write goes
//! through one redb write transaction that commits when the closure returns `Ok`: an MLS
//! operation and the history it produces land together or not at all.
//!
//! **Rollback detection.** Every committing write transaction also advances the store's
//! *generation*, a counter sealed in the private `manifest` table, in the same transaction.
//! After the commit the new value is mirrored, with an HMAC under a key derived from the vault
//! key, to the *anchor* file `<store>.anchor` beside the store (written to a temporary file,
//! synced, renamed). [`Vault::open`] refuses a store whose generation is below its anchor's
//! ([`VaultError::RolledBack`]): an older copy was put back, and using it would rewind MLS
//! state. A store *ahead* of its anchor is normal (the process died between the commit and the
//! anchor write). A missing anchor is accepted only for a store at generation 0 (new, or last
//! written before this build: that first open starts the anchor); otherwise it is
//! [`VaultError::AnchorMissing`]. Locally undetectable: replacing the store *and* the anchor
//! with older copies of both, or editing the redb file to copy the current sealed generation
//! into an older copy (values are bound to their slot, not to the rest of the store).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use ring::hmac;
use zeroize::Zeroizing;

/// A key and its opened value.
pub type Entry = (Vec<u8>, Zeroizing<Vec<u8>>);

/// Keys and still-sealed values, as read from a table.
type RawEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Format version of the vault file.
pub const FORMAT_VERSION: u32 = 1;

const HEADER: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("header");
const CHECK_PLAINTEXT: &[u8] = b"qpq-vault-check-v1";

/// The store's own bookkeeping, apart from the [`Space`]s (a scan never sees it): `generation`
/// → sealed u64 BE, the number of committed write transactions. Absent in stores written before
/// rollback detection (generation 0).
const MANIFEST: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("manifest");
const GENERATION: &[u8] = b"generation";
/// The anchor file: this magic, the generation (u64 BE), HMAC-SHA256 over both.
const ANCHOR_MAGIC: &[u8; 8] = b"qpqanch1";
const ANCHOR_LEN: usize = 8 + 8 + 32;
/// What the anchor's MAC key is derived with, from the vault key.
const ANCHOR_KEY_LABEL: &[u8] = b"qpq vault anchor key v1";

/// The namespaces of the vault. Each is its own redb table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Space {
    /// Account facts: identity key, username, server, session token.
    Account,
    /// openmls storage provider entries.
    Mls,
    /// Conversations (DMs and groups) by group id.
    Conversations,
    /// Message history: conversation id || seq.
    Messages,
    /// Messages typed but not yet acknowledged by the server.
    Outbox,
    /// The delivery cursor (last processed seq), outbox counter, name cache, settings.
    State,
}

impl Space {
    fn name(self) -> &'static str {
        match self {
            Self::Account => "account",
            Self::Mls => "mls",
            Self::Conversations => "conversations",
            Self::Messages => "messages",
            Self::Outbox => "outbox",
            Self::State => "state",
        }
    }

    fn table(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.name())
    }

    const ALL: [Space; 6] =
        [Self::Account, Self::Mls, Self::Conversations, Self::Messages, Self::Outbox, Self::State];
}

/// Argon2id parameters of the passphrase KDF, stored in the vault header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 32 MiB, 3 passes, 1 lane: about a quarter of a second on a router-class CPU, and it
    /// fits beside everything else in 128 MB of RAM.
    fn default() -> Self {
        Self { memory_kib: 32 * 1024, iterations: 3, parallelism: 1 }
    }
}

/// A vault that could not be opened or used. Each says what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The passphrase does not open this vault. Nothing was changed.
    #[error("wrong passphrase for this store (nothing was changed; try again)")]
    WrongPassphrase,
    /// The file exists but is not a qpq store at all.
    #[error("not a qpq store: {0}")]
    NotAVault(String),
    /// The file is a qpq store, but damaged beyond what recovery can repair.
    #[error(
        "the store is damaged and could not be recovered: {0}; restore it from a backup or \
         move it aside and register again"
    )]
    Corrupt(String),
    /// Written by a newer qpq.
    #[error("store format {0} is newer than this build supports; upgrade qpq")]
    TooNew(u32),
    /// There is already a vault at this path.
    #[error("a store already exists at this path")]
    Exists,
    /// Another process has the store open.
    #[error("the store is in use by {holder}; close that first, or wait for it to end")]
    Locked {
        /// Who holds it, as that process recorded it (pid, command, since when).
        holder: String,
    },
    /// A sealed value failed authentication: the file was modified outside qpq.
    #[error("stored value failed authentication (tampered or corrupt)")]
    Tampered,
    /// Reading or writing the file failed (permissions, disk full, I/O error).
    #[error("store I/O error: {0}")]
    Io(String),
    /// redb failed in use.
    #[error("database error: {0}")]
    Db(String),
    /// The KDF or cipher refused its parameters.
    #[error("crypto error: {0}")]
    Crypto(&'static str),
    /// The store is older than its anchor: an older copy of the file was put back.
    #[error(
        "this store is an older copy than the one last used here (it has {store} writes, its \
         anchor file records {anchor}): a backup, a sync tool or someone with access to this \
         machine put an old copy back. Using it would rewind your encryption state and could \
         reuse keys, so it stays closed. Put the newest copy of the store back; only if you \
         restored this old copy on purpose and have no newer one, accept it with `qpq reanchor`"
    )]
    RolledBack {
        /// The store's generation.
        store: u64,
        /// The generation the anchor records.
        anchor: u64,
    },
    /// The store has been written, but the anchor file beside it is gone.
    #[error(
        "the anchor file beside this store (<store>.anchor) is missing, but the store has been \
         written {generation} times: an old copy may have been put back with its anchor \
         removed. If you moved the store yourself, move its .anchor file along; if you are sure \
         this is the newest copy, accept it with `qpq reanchor`"
    )]
    AnchorMissing {
        /// The store's generation.
        generation: u64,
    },
    /// The anchor file fails its MAC: modified outside qpq, or another store's.
    #[error(
        "the anchor file beside this store (<store>.anchor) failed authentication: it was \
         modified outside qpq or belongs to another store. Put back the one that belongs to \
         this store; if you are sure this store is the newest copy, accept it with \
         `qpq reanchor`"
    )]
    AnchorTampered,
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for VaultError {
            fn from(e: $t) -> Self {
                Self::Db(e.to_string())
            }
        }
    )*};
}
db_err!(redb::TableError, redb::TransactionError, redb::CommitError);

impl From<redb::StorageError> for VaultError {
    fn from(e: redb::StorageError) -> Self {
        match e {
            redb::StorageError::Corrupted(d) => Self::Corrupt(d),
            redb::StorageError::Io(e) => Self::Io(e.to_string()),
            e => Self::Db(e.to_string()),
        }
    }
}

impl From<redb::DatabaseError> for VaultError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen
            | redb::DatabaseError::LockProtocolMismatch => {
                Self::Locked { holder: "another process".into() }
            }
            redb::DatabaseError::UpgradeRequired(v) => {
                Self::Corrupt(format!("unsupported database file format {v}"))
            }
            redb::DatabaseError::RepairAborted => Self::Corrupt("repair did not finish".into()),
            redb::DatabaseError::Storage(s) => s.into(),
            e => Self::Db(e.to_string()),
        }
    }
}

/// An open, unlocked vault.
pub struct Vault {
    db: Database,
    cipher: ChaCha20Poly1305,
    batch: Mutex<Option<WriteTransaction>>,
    /// The `<store>.owner` file naming this process while it holds the store.
    owner: Option<PathBuf>,
    /// The store's generation as last committed (the vault is its only writer).
    generation: AtomicU64,
    /// The open batch has written something: its commit advances the generation.
    dirty: AtomicBool,
    /// `<store>.anchor`, for a vault on a file.
    anchor: Option<PathBuf>,
    /// The mode the store file had when it was opened, if that let group or others in (it
    /// was then made 0600).
    loosened: Option<u32>,
    /// The anchor's MAC key, derived from the vault key.
    anchor_key: hmac::Key,
}

/// How [`Vault::open_with`] treats an anchor that disagrees with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchoring {
    /// Refuse a rollback, a missing anchor (generation > 0) or a forged one.
    Check,
    /// The user says this copy is the newest: anchor it at its own generation.
    Accept,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        if let Some(owner) = &self.owner {
            let _ = std::fs::remove_file(owner);
        }
    }
}

/// What a redb file starts with.
const REDB_MAGIC: &[u8] = b"redb";

impl Vault {
    /// Creates a new vault at `path` sealed with `passphrase`.
    pub fn create(path: &Path, passphrase: &[u8], params: KdfParams) -> Result<Self, VaultError> {
        if path.exists() {
            return Err(VaultError::Exists);
        }
        // Built under a temporary name and renamed into place once its header is committed,
        // so a crash while creating leaves no half-made store under the real name.
        let mut tmp = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        tmp.push(".creating");
        let tmp = path.with_file_name(tmp);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VaultError::Io(e.to_string())),
        }
        // Private from its first byte (0600, before redb writes anything): whoever can read
        // the store can guess its passphrase offline. Renaming keeps the mode.
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| VaultError::Io(e.to_string()))?;
        }
        let db = Database::create(&tmp)?;
        let mut vault = Self::initialise(db, passphrase, params)?;
        std::fs::rename(&tmp, path).map_err(|e| VaultError::Io(e.to_string()))?;
        // Replaces any anchor a former store at this path left behind.
        let anchor = anchor_path(path);
        write_anchor(&anchor, &vault.anchor_key, 0).map_err(|e| anchor_io(&anchor, &e))?;
        vault.anchor = Some(anchor);
        vault.owner = claim(path);
        Ok(vault)
    }

    /// Like [`Vault::create`] on any redb storage backend (tests use one that can lose power).
    #[doc(hidden)]
    pub fn create_with_backend(
        backend: impl redb::StorageBackend,
        passphrase: &[u8],
        params: KdfParams,
    ) -> Result<Self, VaultError> {
        let db = redb::Builder::new().create_with_backend(backend)?;
        Self::initialise(db, passphrase, params)
    }

    fn initialise(db: Database, passphrase: &[u8], params: KdfParams) -> Result<Self, VaultError> {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let key = derive(passphrase, &salt, params)?;
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        let anchor_key = anchor_key(&key);
        let txn = db.begin_write()?;
        {
            let mut h = txn.open_table(HEADER)?;
            h.insert("format", FORMAT_VERSION.to_be_bytes().as_slice())?;
            let mut kdf = Vec::with_capacity(12);
            kdf.extend_from_slice(&params.memory_kib.to_be_bytes());
            kdf.extend_from_slice(&params.iterations.to_be_bytes());
            kdf.extend_from_slice(&params.parallelism.to_be_bytes());
            h.insert("kdf", kdf.as_slice())?;
            h.insert("salt", salt.as_slice())?;
            let check = seal(&cipher, "header", b"check", CHECK_PLAINTEXT)?;
            h.insert("check", check.as_slice())?;
        }
        for space in Space::ALL {
            txn.open_table(space.table())?;
        }
        txn.open_table(MANIFEST)?;
        txn.commit()?;
        Ok(Self::assemble(db, cipher, anchor_key, 0))
    }

    fn assemble(
        db: Database,
        cipher: ChaCha20Poly1305,
        anchor_key: hmac::Key,
        generation: u64,
    ) -> Self {
        Self {
            db,
            cipher,
            batch: Mutex::new(None),
            owner: None,
            generation: AtomicU64::new(generation),
            dirty: AtomicBool::new(false),
            anchor: None,
            anchor_key,
            loosened: None,
        }
    }

    /// Opens the vault at `path` with `passphrase`.
    ///
    /// A store left behind by a crash, a kill or a power cut is recovered (redb's repair) and
    /// opens with everything that was committed. A wrong passphrase is
    /// [`VaultError::WrongPassphrase`] and changes nothing logical (on an intact store it
    /// writes nothing at all). A store held by another process is [`VaultError::Locked`],
    /// naming that process.
    ///
    /// The store is checked against its anchor file (see the module documentation): an older
    /// copy is [`VaultError::RolledBack`], a missing anchor beside a store that has been
    /// written is [`VaultError::AnchorMissing`], a forged one [`VaultError::AnchorTampered`].
    /// A store without an anchor that was never written by this build (generation 0) gets one.
    pub fn open(path: &Path, passphrase: &[u8]) -> Result<Self, VaultError> {
        Self::open_with(path, passphrase, Anchoring::Check)
    }

    /// Opens the store at `path` and takes it as the newest copy: its anchor is rewritten at
    /// the store's own generation, whatever it recorded before (or if it is missing or fails
    /// its MAC). For a user who moved or restored the store on purpose (`qpq reanchor`); an
    /// older copy of a store reuses MLS state its groups have moved past. Returns the
    /// generation.
    pub fn reanchor(path: &Path, passphrase: &[u8]) -> Result<u64, VaultError> {
        let vault = Self::open_with(path, passphrase, Anchoring::Accept)?;
        Ok(vault.generation())
    }

    /// If the store file was readable or writable by its group or by others when this vault
    /// opened it, the mode it had (permission bits): it is 0600 now. Whoever could read it may
    /// have copied it to guess the passphrase offline; worth a warning.
    pub fn loosened_mode(&self) -> Option<u32> {
        self.loosened
    }

    /// The store's generation: how many write transactions it has committed since it was
    /// created (or since the first open by a build that counts them).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn open_with(path: &Path, passphrase: &[u8], anchoring: Anchoring) -> Result<Self, VaultError> {
        let mut head = [0u8; 4];
        match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)) {
            Ok(()) if head == REDB_MAGIC => {}
            Ok(()) => return Err(VaultError::NotAVault("the file is not a qpq store".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VaultError::NotAVault("no such file".into()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(VaultError::NotAVault("the file is empty or truncated".into()));
            }
            Err(e) => return Err(VaultError::Io(e.to_string())),
        }
        let locked = |e: VaultError| match e {
            VaultError::Locked { .. } => VaultError::Locked { holder: holder(path) },
            e => e,
        };
        // Check the passphrase on a read-only handle first: on an intact store a wrong one
        // must not touch the file. A store that was not closed cleanly refuses read-only
        // handles until it is repaired, which only a writable open does.
        let db = match redb::Builder::new().open_read_only(path) {
            Ok(ro) => {
                Header::read(&ro)?.unlock(passphrase)?;
                drop(ro);
                Database::builder().open(path).map_err(|e| locked(e.into()))?
            }
            Err(redb::DatabaseError::RepairAborted) => {
                Database::builder().open(path).map_err(|e| locked(e.into()))?
            }
            Err(e) => return Err(locked(e.into())),
        };
        let mut vault = Self::unlock(db, passphrase)?;
        vault.loosened = make_private(path);
        let anchor = anchor_path(path);
        vault.check_anchor(&anchor, anchoring)?;
        vault.anchor = Some(anchor);
        vault.owner = claim(path);
        Ok(vault)
    }

    /// Compares the store's generation with the anchor at `anchor` (the store is locked: no
    /// one writes either meanwhile), and brings the anchor up to date where that is safe.
    fn check_anchor(&self, anchor: &Path, anchoring: Anchoring) -> Result<(), VaultError> {
        let store = self.generation();
        let recorded = match read_anchor(anchor, &self.anchor_key) {
            Err(VaultError::AnchorTampered) if anchoring == Anchoring::Accept => None,
            r => r?,
        };
        let verdict = match recorded {
            Some(a) if store < a => Err(VaultError::RolledBack { store, anchor: a }),
            Some(a) if store == a => return Ok(()),
            // Ahead: the last process died between its commit and the anchor write.
            Some(_) => Ok(()),
            // Never anchored (a new store, or one written before this build): start now.
            None if store == 0 => Ok(()),
            None => Err(VaultError::AnchorMissing { generation: store }),
        };
        match (verdict, anchoring) {
            (Ok(()), _) | (Err(_), Anchoring::Accept) => {
                write_anchor(anchor, &self.anchor_key, store).map_err(|e| anchor_io(anchor, &e))
            }
            (Err(e), Anchoring::Check) => Err(e),
        }
    }

    /// Like [`Vault::open`] on any redb storage backend (tests use one that can lose power).
    #[doc(hidden)]
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        passphrase: &[u8],
    ) -> Result<Self, VaultError> {
        let db = redb::Builder::new().create_with_backend(backend)?;
        Self::unlock(db, passphrase)
    }

    fn unlock(db: Database, passphrase: &[u8]) -> Result<Self, VaultError> {
        let (cipher, anchor_key) = Header::read(&db)?.unlock(passphrase)?;
        let generation = read_generation(&db, &cipher)?;
        Ok(Self::assemble(db, cipher, anchor_key, generation))
    }

    /// Reads and opens the value at `key`.
    pub fn get(&self, space: Space, key: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, VaultError> {
        let batch = self.lock();
        let sealed = match batch.as_ref() {
            Some(txn) => txn.open_table(space.table())?.get(key)?.map(|v| v.value().to_vec()),
            None => self
                .db
                .begin_read()?
                .open_table(space.table())?
                .get(key)?
                .map(|v| v.value().to_vec()),
        };
        sealed.map(|s| open_sealed(&self.cipher, space.name(), key, &s)).transpose()
    }

    /// Seals and stores `value` at `key`.
    pub fn put(&self, space: Space, key: &[u8], value: &[u8]) -> Result<(), VaultError> {
        let sealed = seal(&self.cipher, space.name(), key, value)?;
        self.with_write(|txn| {
            txn.open_table(space.table())?.insert(key, sealed.as_slice())?;
            Ok(())
        })
    }

    /// Deletes the value at `key`; `true` if there was one.
    pub fn delete(&self, space: Space, key: &[u8]) -> Result<bool, VaultError> {
        self.with_write(|txn| Ok(txn.open_table(space.table())?.remove(key)?.is_some()))
    }

    /// Every (key, value) whose key starts with `prefix`, in key order.
    pub fn scan(&self, space: Space, prefix: &[u8]) -> Result<Vec<Entry>, VaultError> {
        self.read_page(space, prefix, Walk::All)
    }

    /// The last `limit` (key, value) pairs whose key starts with `prefix`, in key order. Only
    /// those are opened, so the newest page of a long history costs the same as a short one.
    pub fn scan_last(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, VaultError> {
        // Keys of the prefix sort below `prefix || 0xff...`.
        let mut end = prefix.to_vec();
        end.extend_from_slice(&[0xff; 16]);
        self.read_page(space, prefix, Walk::Before { end: &end, limit })
    }

    /// Like [`Vault::scan_last`], but only keys below `before` (an older page).
    pub fn scan_before(
        &self,
        space: Space,
        prefix: &[u8],
        before: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, VaultError> {
        self.read_page(space, prefix, Walk::Before { end: before, limit })
    }

    /// Reads keys of `prefix` as `walk` says (inside the open batch, if any) and opens the
    /// values, in key order.
    fn read_page(
        &self,
        space: Space,
        prefix: &[u8],
        walk: Walk<'_>,
    ) -> Result<Vec<Entry>, VaultError> {
        let batch = self.lock();
        let raw = match batch.as_ref() {
            Some(txn) => read_raw(&txn.open_table(space.table())?, prefix, walk)?,
            None => read_raw(&self.db.begin_read()?.open_table(space.table())?, prefix, walk)?,
        };
        raw.into_iter()
            .map(|(k, v)| {
                let plain = open_sealed(&self.cipher, space.name(), &k, &v)?;
                Ok((k, plain))
            })
            .collect()
    }

    /// How many keys start with `prefix`, in the open batch if any. Keys are stored in the
    /// clear, so nothing is read from disk beyond them and no value is opened.
    pub fn count(&self, space: Space, prefix: &[u8]) -> Result<usize, VaultError> {
        let batch = self.lock();
        match batch.as_ref() {
            Some(txn) => count_keys(&txn.open_table(space.table())?, prefix),
            None => count_keys(&self.db.begin_read()?.open_table(space.table())?, prefix),
        }
    }

    /// Deletes every key starting with `prefix`; returns how many.
    pub fn delete_prefix(&self, space: Space, prefix: &[u8]) -> Result<usize, VaultError> {
        self.with_write(|txn| {
            let mut t = txn.open_table(space.table())?;
            let keys: Vec<Vec<u8>> =
                read_raw(&t, prefix, Walk::All)?.into_iter().map(|(k, _)| k).collect();
            for k in &keys {
                t.remove(k.as_slice())?;
            }
            Ok(keys.len())
        })
    }

    /// Runs `f` with every vault read and write in one transaction, committed when `f`
    /// returns `Ok` and discarded when it returns `Err`. Nested calls join the outer one.
    pub fn atomic<T, E: From<VaultError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        {
            let mut batch = self.lock();
            if batch.is_some() {
                drop(batch);
                return f();
            }
            *batch = Some(self.db.begin_write().map_err(VaultError::from)?);
        }
        let result = f();
        let txn = self.lock().take();
        let dirty = self.dirty.swap(false, Ordering::AcqRel);
        match (result, txn) {
            (Ok(v), Some(txn)) if dirty => {
                let next = match self.stamp(&txn) {
                    Ok(next) => next,
                    Err(e) => {
                        let _ = txn.abort();
                        return Err(e.into());
                    }
                };
                txn.commit().map_err(VaultError::from)?;
                self.advance(next);
                Ok(v)
            }
            (Ok(v), Some(txn)) => {
                txn.commit().map_err(VaultError::from)?;
                Ok(v)
            }
            (Ok(v), None) => Ok(v),
            (Err(e), Some(txn)) => {
                let _ = txn.abort();
                Err(e)
            }
            (Err(e), None) => Err(e),
        }
    }

    fn with_write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let batch = self.lock();
        if let Some(txn) = batch.as_ref() {
            self.dirty.store(true, Ordering::Release);
            return f(txn);
        }
        drop(batch);
        let txn = self.db.begin_write()?;
        let out = f(&txn)?;
        let next = self.stamp(&txn)?;
        txn.commit()?;
        self.advance(next);
        Ok(out)
    }

    /// Writes the next generation into `txn` (the transaction about to commit); returns it.
    fn stamp(&self, txn: &WriteTransaction) -> Result<u64, VaultError> {
        let next = self
            .generation()
            .checked_add(1)
            .ok_or(VaultError::Corrupt("the store's generation counter is exhausted".into()))?;
        let sealed = seal(&self.cipher, "manifest", GENERATION, &next.to_be_bytes())?;
        txn.open_table(MANIFEST)?.insert(GENERATION, sealed.as_slice())?;
        Ok(next)
    }

    /// Records a committed generation and mirrors it to the anchor. Best effort: the commit is
    /// durable already, and an anchor left behind the store is harmless (only a store behind
    /// its anchor is a rollback); the next commit or open writes it again.
    fn advance(&self, next: u64) {
        self.generation.store(next, Ordering::Release);
        if let Some(anchor) = &self.anchor {
            let _ = write_anchor(anchor, &self.anchor_key, next);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<WriteTransaction>> {
        self.batch.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The plaintext header: format, KDF parameters, salt and the sealed check value.
struct Header {
    params: KdfParams,
    salt: Vec<u8>,
    check: Vec<u8>,
}

impl Header {
    fn read(db: &impl ReadableDatabase) -> Result<Self, VaultError> {
        let txn = db.begin_read()?;
        let h = txn.open_table(HEADER).map_err(|e| match e {
            redb::TableError::TableDoesNotExist(_) => {
                VaultError::NotAVault("a redb file without a qpq header".into())
            }
            e => e.into(),
        })?;
        let get = |k: &str| -> Result<Vec<u8>, VaultError> {
            Ok(h.get(k)?
                .ok_or_else(|| VaultError::Corrupt(format!("header field {k:?} is missing")))?
                .value()
                .to_vec())
        };
        let format = u32_at(&get("format")?, 0)?;
        if format > FORMAT_VERSION {
            return Err(VaultError::TooNew(format));
        }
        let kdf = get("kdf")?;
        let params = KdfParams {
            memory_kib: u32_at(&kdf, 0)?,
            iterations: u32_at(&kdf, 4)?,
            parallelism: u32_at(&kdf, 8)?,
        };
        Ok(Self { params, salt: get("salt")?, check: get("check")? })
    }

    /// The cipher and anchor key of this passphrase, if it opens the check value.
    fn unlock(&self, passphrase: &[u8]) -> Result<(ChaCha20Poly1305, hmac::Key), VaultError> {
        let key = derive(passphrase, &self.salt, self.params)?;
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        match open_sealed(&cipher, "header", b"check", &self.check) {
            Ok(p) if p.as_slice() == CHECK_PLAINTEXT => Ok((cipher, anchor_key(&key))),
            _ => Err(VaultError::WrongPassphrase),
        }
    }
}

/// The anchor's MAC key: HMAC-SHA256 keyed with the vault key over a fixed label (a PRF), so
/// the anchor never holds or reveals the vault key itself.
fn anchor_key(vault_key: &[u8; 32]) -> hmac::Key {
    let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, vault_key), ANCHOR_KEY_LABEL);
    hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
}

/// The store's generation as committed (0 if it was never counted).
fn read_generation(db: &Database, cipher: &ChaCha20Poly1305) -> Result<u64, VaultError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(MANIFEST) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let Some(sealed) = table.get(GENERATION)? else { return Ok(0) };
    let plain = open_sealed(cipher, "manifest", GENERATION, sealed.value())?;
    let bytes: [u8; 8] = plain.as_slice().try_into().map_err(|_| VaultError::Tampered)?;
    Ok(u64::from_be_bytes(bytes))
}

/// The path of the anchor file of the store at `path`: `<store>.anchor`.
pub fn anchor_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".anchor");
    path.with_file_name(name)
}

fn encode_anchor(key: &hmac::Key, generation: u64) -> [u8; ANCHOR_LEN] {
    let mut out = [0u8; ANCHOR_LEN];
    out[..8].copy_from_slice(ANCHOR_MAGIC);
    out[8..16].copy_from_slice(&generation.to_be_bytes());
    let tag = hmac::sign(key, &out[..16]);
    out[16..].copy_from_slice(tag.as_ref());
    out
}

/// The generation an anchor file records; `None` if there is none.
fn read_anchor(path: &Path, key: &hmac::Key) -> Result<Option<u64>, VaultError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anchor_io(path, &e)),
    };
    if bytes.len() != ANCHOR_LEN || &bytes[..8] != ANCHOR_MAGIC {
        return Err(VaultError::AnchorTampered);
    }
    hmac::verify(key, &bytes[..16], &bytes[16..]).map_err(|_| VaultError::AnchorTampered)?;
    let generation: [u8; 8] = bytes[8..16].try_into().map_err(|_| VaultError::AnchorTampered)?;
    Ok(Some(u64::from_be_bytes(generation)))
}

/// Replaces the anchor file atomically: a temporary file, synced, renamed over it. A kill at
/// any point leaves the old anchor or the new one, both at most the store's generation. The
/// directory is synced when the anchor is new, so a power cut cannot lose it once a store
/// has been written past it.
fn write_anchor(path: &Path, key: &hmac::Key, generation: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp.push(".tmp");
    let tmp = path.with_file_name(tmp);
    let fresh = !path.exists();
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_anchor(key, generation))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if fresh {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // Directories cannot be synced everywhere; where they cannot, the rename stands alone.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

fn anchor_io(path: &Path, e: &std::io::Error) -> VaultError {
    VaultError::Io(format!(
        "cannot write or read the store's anchor file {}: {e} (qpq keeps it beside the store)",
        path.display()
    ))
}

/// The path of the file naming the process that holds the store at `path`.
fn owner_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".owner");
    path.with_file_name(name)
}

/// Whether the store at `path` was left open by a process that never closed it (a crash, a
/// kill, a power cut): the next [`Vault::open`] repairs it. For tests and diagnostics.
#[doc(hidden)]
pub fn needs_recovery(path: &Path) -> Result<bool, VaultError> {
    match redb::Builder::new().open_read_only(path) {
        Ok(_) => Ok(false),
        Err(redb::DatabaseError::RepairAborted) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

static HOLDER_LABEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// How this process names itself to another one that finds the store locked (for example
/// `qpq tail --follow`); without it, the executable's name. Never include message text.
pub fn set_holder_label(label: &str) {
    let _ = HOLDER_LABEL.set(label.to_string());
}

/// Records this process as the store's holder, so another one refused with
/// [`VaultError::Locked`] can say who holds it. Best effort: the lock itself is redb's.
fn claim(path: &Path) -> Option<PathBuf> {
    let owner = owner_path(path);
    let label = HOLDER_LABEL.get().cloned().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default()
    });
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = format!("pid {}\ncommand {label}\nsince {since}\n", std::process::id());
    std::fs::write(&owner, text).ok().map(|()| owner)
}

/// Who holds the store at `path`, as its holder recorded it.
fn holder(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(owner_path(path)) else {
        return "another process".into();
    };
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    let (pid, command) = (field("pid "), field("command "));
    let since = field("since ").parse::<u64>().ok().and_then(|s| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(now.as_secs().saturating_sub(s))
    });
    let mut out = format!("process {pid}");
    if !command.is_empty() {
        out.push_str(&format!(" (`{command}`)"));
    }
    if let Some(age) = since {
        out.push_str(&format!(", open for {age} s"));
    }
    out
}

/// Makes the store file at `path` private (0600) if its group or others have any permission
/// on it; returns the mode it had then. Best effort: a file system without Unix permissions,
/// or a file someone else owns, is left as it is (and reported only if the change took).
#[cfg(unix)]
fn make_private(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return None;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).ok()?;
    Some(mode)
}

#[cfg(not(unix))]
fn make_private(_path: &Path) -> Option<u32> {
    None
}

/// How many keys of the table start with `prefix`, without reading values.
fn count_keys(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<usize, VaultError> {
    if prefix.is_empty() {
        // redb keeps each table's length in its root: no walk at all.
        return Ok(usize::try_from(t.len()?).unwrap_or(usize::MAX));
    }
    let mut n = 0;
    for row in t.range(prefix..)? {
        let (k, _) = row?;
        if !k.value().starts_with(prefix) {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// Which keys of a prefix [`read_raw`] returns.
#[derive(Clone, Copy)]
enum Walk<'a> {
    /// All of them.
    All,
    /// The last `limit` below `end`.
    Before { end: &'a [u8], limit: usize },
}

/// Keys of `prefix` and their still-sealed values, in key order.
fn read_raw(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    walk: Walk<'_>,
) -> Result<RawEntries, VaultError> {
    let mut out = Vec::new();
    match walk {
        Walk::All => {
            for row in t.range(prefix..)? {
                let (k, v) = row?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((k.value().to_vec(), v.value().to_vec()));
            }
        }
        Walk::Before { end, limit } => {
            for row in t.range(prefix..end)?.rev() {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = row?;
                if k.value().starts_with(prefix) {
                    out.push((k.value().to_vec(), v.value().to_vec()));
                }
            }
            out.reverse();
        }
    }
    Ok(out)
}

fn derive(passphrase: &[u8], salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let params = Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|_| VaultError::Crypto("argon2 parameters"))?;
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, key.as_mut_slice())
        .map_err(|_| VaultError::Crypto("argon2"))?;
    Ok(key)
}

fn aad(space: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(space.len() + 1 + key.len());
    a.extend_from_slice(space.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

fn seal(
    cipher: &ChaCha20Poly1305,
    space: &str,
    key: &[u8],
    value: &[u8],
) -> Result<Vec<u8>, VaultError> {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: value, aad: &aad(space, key) })
        .map_err(|_| VaultError::Crypto("seal"))?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open_sealed(
    cipher: &ChaCha20Poly1305,
    space: &str,
    key: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    if sealed.len() < 12 + 16 {
        return Err(VaultError::Tampered);
    }
    let (nonce, ct) = sealed.split_at(12);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad(space, key) })
        .map(Zeroizing::new)
        .map_err(|_| VaultError::Tampered)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, VaultError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| VaultError::Corrupt("short header field".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };

    #[test]
    fn values_are_sealed_and_the_passphrase_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.redb");
        {
            let v = Vault::create(&path, b"pass", FAST).unwrap();
            v.put(Space::Messages, b"k1", b"attack at dawn").unwrap();
            assert_eq!(
                v.get(Space::Messages, b"k1").unwrap().unwrap().as_slice(),
                b"attack at dawn"
            );
            assert!(v.get(Space::Account, b"k1").unwrap().is_none());
        }
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(14).any(|w| w == b"attack at dawn"), "plaintext on disk");
        assert!(matches!(Vault::open(&path, b"wrong"), Err(VaultError::WrongPassphrase)));
        assert!(std::fs::read(&path).unwrap() == raw, "a failed open writes nothing");
        let v = Vault::open(&path, b"pass").unwrap();
        assert_eq!(v.get(Space::Messages, b"k1").unwrap().unwrap().as_slice(), b"attack at dawn");
        assert!(matches!(Vault::create(&path, b"pass", FAST), Err(VaultError::Exists)));
    }

    #[test]
    fn atomic_commits_all_or_nothing_and_sees_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(&dir.path().join("v.redb"), b"p", FAST).unwrap();
        let r: Result<(), VaultError> = v.atomic(|| {
            v.put(Space::State, b"a", b"1")?;
            assert_eq!(v.get(Space::State, b"a")?.unwrap().as_slice(), b"1");
            Err(VaultError::Crypto("boom"))
        });
        assert!(r.is_err());
        assert!(v.get(Space::State, b"a").unwrap().is_none());
        v.atomic(|| -> Result<(), VaultError> {
            v.put(Space::State, b"p/1", b"x")?;
            v.put(Space::State, b"p/2", b"y")?;
            v.put(Space::State, b"q/1", b"z")?;
            v.atomic(|| v.delete(Space::State, b"p/2").map(|_| ()))
        })
        .unwrap();
        let keys: Vec<Vec<u8>> =
            v.scan(Space::State, b"p/").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"p/1".to_vec()]);
        let last: Vec<Vec<u8>> =
            v.scan_last(Space::State, b"", 1).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(last, vec![b"q/1".to_vec()]);
        for i in 0..10u8 {
            v.put(Space::Messages, &[b'm', i], &[i]).unwrap();
        }
        let last: Vec<u8> =
            v.scan_last(Space::Messages, b"m", 3).unwrap().into_iter().map(|(_, v)| v[0]).collect();
        assert_eq!(last, vec![7, 8, 9], "the newest three, oldest first");
        let older: Vec<u8> = v
            .scan_before(Space::Messages, b"m", &[b'm', 7], 3)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v[0])
            .collect();
        assert_eq!(older, vec![4, 5, 6], "the page before 7");
        assert_eq!(v.delete_prefix(Space::State, b"").unwrap(), 2);
    }

    #[test]
    fn open_errors_say_what_happened() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.qpq");
        assert!(matches!(Vault::open(&missing, b"p"), Err(VaultError::NotAVault(_))));
        let empty = dir.path().join("empty.qpq");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(Vault::open(&empty, b"p"), Err(VaultError::NotAVault(_))));
        let text = dir.path().join("text.qpq");
        std::fs::write(&text, b"just some text, not a database").unwrap();
        assert!(matches!(Vault::open(&text, b"p"), Err(VaultError::NotAVault(_))));
        // A redb file that is not a vault.
        let other = dir.path().join("other.redb");
        drop(Database::create(&other).unwrap());
        assert!(matches!(Vault::open(&other, b"p"), Err(VaultError::NotAVault(_))));

        // Held by someone: the refusal names the holder from its note.
        let path = dir.path().join("v.qpq");
        set_holder_label("qpq unit-test");
        let held = Vault::create(&path, b"p", FAST).unwrap();
        assert!(!dir.path().join("v.qpq.creating").exists());
        match Vault::open(&path, b"p") {
            Err(VaultError::Locked { holder }) => {
                assert!(holder.contains(&std::process::id().to_string()), "{holder}");
                assert!(holder.contains("qpq unit-test"), "{holder}");
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        assert!(!dir.path().join("v.qpq.owner").exists(), "a clean close removes the note");
        assert!(!needs_recovery(&path).unwrap());
        let v = Vault::open(&path, b"p").unwrap();
        drop(v);
        assert!(matches!(Vault::open(&path, b"q"), Err(VaultError::WrongPassphrase)));
    }

    #[test]
    fn a_value_moved_to_another_key_fails_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(&dir.path().join("v.redb"), b"p", FAST).unwrap();
        v.put(Space::Account, b"a", b"secret").unwrap();
        let sealed = {
            let t = v.db.begin_read().unwrap().open_table(Space::Account.table()).unwrap();
            t.get(b"a".as_slice()).unwrap().unwrap().value().to_vec()
        };
        v.with_write(|txn| {
            txn.open_table(Space::Account.table())?.insert(b"b".as_slice(), sealed.as_slice())?;
            Ok(())
        })
        .unwrap();
        assert!(matches!(v.get(Space::Account, b"b"), Err(VaultError::Tampered)));
    }

    fn anchored(path: &Path) -> Option<u64> {
        let v = Vault::open(path, b"p").unwrap();
        let key = v.anchor_key.clone();
        drop(v);
        read_anchor(&anchor_path(path), &key).unwrap()
    }

    #[test]
    fn every_committing_write_advances_the_generation_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        let v = Vault::create(&path, b"p", FAST).unwrap();
        assert_eq!(v.generation(), 0);
        v.put(Space::State, b"a", b"1").unwrap();
        v.delete(Space::State, b"a").unwrap();
        assert_eq!(v.generation(), 2, "one per single write");
        v.atomic(|| -> Result<(), VaultError> {
            v.put(Space::State, b"a", b"1")?;
            v.put(Space::Messages, b"b", b"2")?;
            v.atomic(|| v.put(Space::Outbox, b"c", b"3"))
        })
        .unwrap();
        assert_eq!(v.generation(), 3, "one per transaction, nested ones included");
        let r: Result<(), VaultError> = v.atomic(|| {
            v.put(Space::State, b"x", b"1")?;
            Err(VaultError::Crypto("abort"))
        });
        assert!(r.is_err());
        v.atomic(|| v.get(Space::State, b"a").map(drop)).unwrap();
        assert_eq!(v.generation(), 3, "an aborted or read-only transaction counts nothing");
        let key = v.anchor_key.clone();
        assert_eq!(read_anchor(&anchor_path(&path), &key).unwrap(), Some(3), "mirrored");
        drop(v);
        let v = Vault::open(&path, b"p").unwrap();
        assert_eq!(v.generation(), 3, "sealed in the store");
        assert!(v.scan(Space::State, b"").unwrap().iter().all(|(k, _)| k != GENERATION));
        let raw = std::fs::read(anchor_path(&path)).unwrap();
        assert_eq!(raw.len(), ANCHOR_LEN);
    }

    #[test]
    fn an_older_copy_put_back_is_refused_until_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        let old = dir.path().join("old.qpq");
        {
            let v = Vault::create(&path, b"p", FAST).unwrap();
            v.put(Space::Mls, b"epoch", b"1").unwrap();
        }
        std::fs::copy(&path, &old).unwrap();
        {
            let v = Vault::open(&path, b"p").unwrap();
            v.put(Space::Mls, b"epoch", b"2").unwrap();
            v.put(Space::Mls, b"epoch", b"3").unwrap();
        }
        std::fs::copy(&old, &path).unwrap();
        let e = Vault::open(&path, b"p").unwrap_err();
        assert!(matches!(e, VaultError::RolledBack { store: 1, anchor: 3 }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("older copy") && text.contains("qpq reanchor"), "{text}");
        assert!(!dir.path().join("v.qpq.owner").exists(), "a refused open holds nothing");
        // Still refused the second time: the refusal changed nothing.
        assert!(matches!(Vault::open(&path, b"p"), Err(VaultError::RolledBack { .. })));
        // A wrong passphrase is still that, and writes nothing.
        let anchor = std::fs::read(anchor_path(&path)).unwrap();
        assert!(matches!(Vault::open(&path, b"q"), Err(VaultError::WrongPassphrase)));
        assert_eq!(std::fs::read(anchor_path(&path)).unwrap(), anchor);
        // The user takes the old copy on purpose.
        assert_eq!(Vault::reanchor(&path, b"p").unwrap(), 1);
        let v = Vault::open(&path, b"p").unwrap();
        assert_eq!(v.get(Space::Mls, b"epoch").unwrap().unwrap().as_slice(), b"1");
    }

    #[test]
    fn a_deleted_generation_is_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        {
            let v = Vault::create(&path, b"p", FAST).unwrap();
            v.put(Space::Account, b"pin", b"x").unwrap();
        }
        // Keys are plaintext: anyone with the file can delete an entry.
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(MANIFEST).unwrap().remove(GENERATION).unwrap();
        txn.commit().unwrap();
        drop(db);
        assert!(matches!(
            Vault::open(&path, b"p"),
            Err(VaultError::RolledBack { store: 0, anchor: 1 })
        ));
    }

    #[test]
    fn a_store_ahead_of_its_anchor_opens_and_catches_it_up() {
        // What a kill between the store's commit and the anchor write leaves behind.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        {
            let v = Vault::create(&path, b"p", FAST).unwrap();
            v.put(Space::State, b"a", b"1").unwrap();
        }
        let behind = std::fs::read(anchor_path(&path)).unwrap();
        {
            let v = Vault::open(&path, b"p").unwrap();
            v.put(Space::State, b"a", b"2").unwrap();
            v.put(Space::State, b"a", b"3").unwrap();
        }
        std::fs::write(anchor_path(&path), &behind).unwrap();
        // A kill inside the anchor write leaves its temporary file: ignored.
        let mut tmp = anchor_path(&path).into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, b"half").unwrap();
        assert_eq!(anchored(&path), Some(3), "opens, and the anchor is brought up to date");
        let v = Vault::open(&path, b"p").unwrap();
        assert_eq!(v.get(Space::State, b"a").unwrap().unwrap().as_slice(), b"3");
    }

    #[test]
    fn a_forged_or_foreign_anchor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        let other = dir.path().join("other.qpq");
        for p in [&path, &other] {
            let v = Vault::create(p, b"p", FAST).unwrap();
            v.put(Space::State, b"a", b"1").unwrap();
        }
        let good = std::fs::read(anchor_path(&path)).unwrap();
        // A higher count without the key (it would lock the user out): the MAC fails.
        let mut forged = good.clone();
        forged[15] = 9;
        std::fs::write(anchor_path(&path), &forged).unwrap();
        assert!(matches!(Vault::open(&path, b"p"), Err(VaultError::AnchorTampered)));
        // Same passphrase, another store: another salt, another key.
        std::fs::copy(anchor_path(&other), anchor_path(&path)).unwrap();
        let e = Vault::open(&path, b"p").unwrap_err();
        assert!(matches!(e, VaultError::AnchorTampered), "{e:?}");
        assert!(e.to_string().contains("failed authentication"), "{e}");
        std::fs::write(anchor_path(&path), &good[..20]).unwrap();
        assert!(matches!(Vault::open(&path, b"p"), Err(VaultError::AnchorTampered)));
        std::fs::write(anchor_path(&path), &good).unwrap();
        assert!(Vault::open(&path, b"p").is_ok());
    }

    #[test]
    fn a_missing_anchor_is_started_only_for_a_store_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        drop(Vault::create(&path, b"p", FAST).unwrap());
        // A store as a build without rollback detection left it: no manifest, no anchor.
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(MANIFEST).unwrap();
        txn.commit().unwrap();
        drop(db);
        std::fs::remove_file(anchor_path(&path)).unwrap();
        assert_eq!(anchored(&path), Some(0), "the first open starts the anchor");
        {
            let v = Vault::open(&path, b"p").unwrap();
            v.put(Space::State, b"a", b"1").unwrap();
            assert_eq!(v.generation(), 1);
        }
        std::fs::remove_file(anchor_path(&path)).unwrap();
        let e = Vault::open(&path, b"p").unwrap_err();
        assert!(matches!(e, VaultError::AnchorMissing { generation: 1 }), "{e:?}");
        assert_eq!(Vault::reanchor(&path, b"p").unwrap(), 1);
        assert_eq!(anchored(&path), Some(1));
    }

    #[test]
    fn creating_a_store_replaces_an_anchor_left_by_a_former_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        {
            let v = Vault::create(&path, b"p", FAST).unwrap();
            v.put(Space::State, b"a", b"1").unwrap();
        }
        std::fs::remove_file(&path).unwrap();
        drop(Vault::create(&path, b"p", FAST).unwrap());
        assert_eq!(anchored(&path), Some(0));
    }

    #[test]
    fn count_counts_keys_without_opening_values() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(&dir.path().join("v.qpq"), b"p", FAST).unwrap();
        assert_eq!(v.count(Space::Outbox, b"").unwrap(), 0);
        for k in [b"a/1".as_slice(), b"a/2", b"a/\xff", b"ab", b"b/1"] {
            v.put(Space::State, k, b"x").unwrap();
        }
        v.put(Space::Outbox, b"a/1", b"x").unwrap();
        assert_eq!(v.count(Space::State, b"").unwrap(), 5);
        assert_eq!(v.count(Space::State, b"a").unwrap(), 4);
        assert_eq!(v.count(Space::State, b"a/").unwrap(), 3);
        assert_eq!(v.count(Space::State, b"a/1").unwrap(), 1);
        assert_eq!(v.count(Space::State, b"c").unwrap(), 0);
        assert_eq!(v.count(Space::Outbox, b"").unwrap(), 1);
        // Inside a transaction it sees that transaction's writes.
        v.atomic(|| -> Result<(), VaultError> {
            v.put(Space::State, b"a/3", b"x")?;
            v.delete(Space::State, b"b/1")?;
            assert_eq!(v.count(Space::State, b"a/")?, 4);
            assert_eq!(v.count(Space::State, b"")?, 5);
            Err(VaultError::Crypto("roll back"))
        })
        .unwrap_err();
        assert_eq!(v.count(Space::State, b"a/").unwrap(), 3);
        // Values are not opened: one that fails authentication is still counted.
        {
            let txn = v.db.begin_write().unwrap();
            txn.open_table(Space::State.table())
                .unwrap()
                .insert(b"a/4".as_slice(), [0u8; 40].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(v.scan(Space::State, b"a/"), Err(VaultError::Tampered)));
        assert_eq!(v.count(Space::State, b"a/").unwrap(), 4);
    }

    #[cfg(unix)]
    #[test]
    fn the_store_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qpq");
        let v = Vault::create(&path, b"p", FAST).unwrap();
        assert_eq!(mode(&path), 0o600, "created private");
        assert_eq!(v.loosened_mode(), None);
        drop(v);
        let v = Vault::open(&path, b"p").unwrap();
        assert_eq!((mode(&path), v.loosened_mode()), (0o600, None));
        drop(v);
        // A store made readable by others (an older build, a copy, a chmod) is tightened, and
        // the open says what it was; a wrong passphrase changes nothing.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Vault::open(&path, b"wrong"), Err(VaultError::WrongPassphrase)));
        assert_eq!(mode(&path), 0o644);
        let v = Vault::open(&path, b"p").unwrap();
        assert_eq!((mode(&path), v.loosened_mode()), (0o600, Some(0o644)));
        drop(v);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(Vault::reanchor(&path, b"p").unwrap(), 0);
        assert_eq!(mode(&path), 0o600);
        // Owner-only modes are left alone.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        let v = Vault::open(&path, b"p").unwrap();
        assert_eq!((mode(&path), v.loosened_mode()), (0o700, None));
    }
}
