//! The encrypted client store: one redb file per account.
//!
//! Keys are plaintext and namespaced by table; every value is sealed with ChaCha20-Poly1305
//! under a key derived with Argon2id from the user's passphrase, with the table name and the
//! key as associated data, so a value cannot be moved to another slot. A plaintext `header`
//! table holds the format version, the KDF parameters, the salt and a sealed check value: a
//! wrong passphrase is detected before anything is read or written.
//!
//! Writes outside [`Vault::atomic`] commit one by one. Inside it, every read and write goes
//! through one redb write transaction that commits when the closure returns `Ok`: an MLS
//! operation and the history it produces land together or not at all.

use std::path::Path;
use std::sync::Mutex;

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use zeroize::Zeroizing;

/// A key and its opened value.
pub type Entry = (Vec<u8>, Zeroizing<Vec<u8>>);

/// Keys and still-sealed values, as read from a table.
type RawEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Format version of the vault file.
pub const FORMAT_VERSION: u32 = 1;

const HEADER: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("header");
const CHECK_PLAINTEXT: &[u8] = b"qpq-vault-check-v1";

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

/// A vault that could not be opened or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The passphrase does not open this vault.
    #[error("wrong passphrase for this store")]
    WrongPassphrase,
    /// The file exists but is not a qpq vault, or its header is damaged.
    #[error("not a qpq store, or its header is damaged: {0}")]
    NotAVault(&'static str),
    /// Written by a newer qpq.
    #[error("store format {0} is newer than this build supports; upgrade qpq")]
    TooNew(u32),
    /// There is already a vault at this path.
    #[error("a store already exists at this path")]
    Exists,
    /// Another process has the store open.
    #[error("the store is open in another qpq process")]
    Locked,
    /// A sealed value failed authentication: the file was modified outside qpq.
    #[error("stored value failed authentication (tampered or corrupt)")]
    Tampered,
    /// redb failed.
    #[error("database error: {0}")]
    Db(String),
    /// The KDF or cipher refused its parameters.
    #[error("crypto error: {0}")]
    Crypto(&'static str),
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
db_err!(redb::StorageError, redb::TableError, redb::TransactionError, redb::CommitError);

impl From<redb::DatabaseError> for VaultError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Self::Locked,
            e => Self::Db(e.to_string()),
        }
    }
}

/// An open, unlocked vault.
pub struct Vault {
    db: Database,
    cipher: ChaCha20Poly1305,
    batch: Mutex<Option<WriteTransaction>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

impl Vault {
    /// Creates a new vault at `path` sealed with `passphrase`.
    pub fn create(path: &Path, passphrase: &[u8], params: KdfParams) -> Result<Self, VaultError> {
        if path.exists() {
            return Err(VaultError::Exists);
        }
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let key = derive(passphrase, &salt, params)?;
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        let db = Database::create(path)?;
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
        txn.commit()?;
        Ok(Self { db, cipher, batch: Mutex::new(None) })
    }

    /// Opens the vault at `path` with `passphrase`. A wrong passphrase is
    /// [`VaultError::WrongPassphrase`] and changes nothing.
    pub fn open(path: &Path, passphrase: &[u8]) -> Result<Self, VaultError> {
        if !path.exists() {
            return Err(VaultError::NotAVault("no such file"));
        }
        // Check the passphrase on a read-only handle first: a wrong one must not touch the file.
        let ro = Database::builder().open_read_only(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => VaultError::Locked,
            _ => VaultError::NotAVault("not a redb file"),
        })?;
        let (params, salt, check) = {
            let txn = ro.begin_read()?;
            let h = txn.open_table(HEADER).map_err(|_| VaultError::NotAVault("no header"))?;
            let get = |k: &str| -> Result<Vec<u8>, VaultError> {
                Ok(h.get(k)?.ok_or(VaultError::NotAVault("incomplete header"))?.value().to_vec())
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
            (params, get("salt")?, get("check")?)
        };
        let key = derive(passphrase, &salt, params)?;
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        match open_sealed(&cipher, "header", b"check", &check) {
            Ok(p) if p.as_slice() == CHECK_PLAINTEXT => {}
            _ => return Err(VaultError::WrongPassphrase),
        }
        drop(ro);
        let db = Database::open(path)?;
        Ok(Self { db, cipher, batch: Mutex::new(None) })
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
        match (result, txn) {
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
            return f(txn);
        }
        drop(batch);
        let txn = self.db.begin_write()?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<WriteTransaction>> {
        self.batch.lock().unwrap_or_else(|p| p.into_inner())
    }
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
        .ok_or(VaultError::NotAVault("short header field"))
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
}
