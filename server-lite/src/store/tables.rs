//! redb table definitions. Every table is created when the database is opened.
//!
//! Keys that name a user are the 32-byte Ed25519 identity key. A queue key is
//! `identity (32) || channel_id (0 or 16)`.

use redb::{MultimapTableDefinition, TableDefinition};

/// `"schema_version"` -> u32 BE; `"opaque_setup"` -> serialized OPAQUE `ServerSetup`;
/// [`STORED_BYTES`] -> u64 BE.
pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// username -> [`super::records::User`].
pub(crate) const USERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("users");
/// identity key -> username.
pub(crate) const IDENTITIES: TableDefinition<'_, &[u8], &str> = TableDefinition::new("identities");
/// SHA-256(session token) -> [`super::records::Session`].
pub(crate) const SESSIONS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("sessions");
/// identity key -> SHA-256(session token), for revoking all of a user's sessions.
pub(crate) const USER_SESSIONS: MultimapTableDefinition<'_, &[u8], &[u8]> =
    MultimapTableDefinition::new("user_sessions");
/// identity -> [`super::records::LastResort`]: the KeyPackage handed out, and kept, when the
/// stock is empty (schema 2).
pub(crate) const LAST_RESORT: TableDefinition<'_, &[u8], &[u8]> =
    TableDefinition::new("last_resort");
/// (identity, n) -> KeyPackage bytes; FIFO by n.
pub(crate) const KEY_PACKAGES: TableDefinition<'_, (&[u8], u64), &[u8]> =
    TableDefinition::new("key_packages");
/// identity -> next n for [`KEY_PACKAGES`].
pub(crate) const KEY_PACKAGE_NEXT: TableDefinition<'_, &[u8], u64> =
    TableDefinition::new("key_package_next");
/// identity -> hybrid public key (X25519 || ML-KEM-768 encapsulation key).
pub(crate) const HYBRID_KEYS: TableDefinition<'_, &[u8], &[u8]> =
    TableDefinition::new("hybrid_keys");
/// (queue key, seq) -> [`super::records::Queued`].
pub(crate) const QUEUES: TableDefinition<'_, (&[u8], u64), &[u8]> = TableDefinition::new("queues");
/// queue key -> next seq (u64).
pub(crate) const QUEUE_NEXT: TableDefinition<'_, &[u8], u64> = TableDefinition::new("queue_next");
/// identity -> [`super::records::Usage`] (queued messages and bytes, blob bytes).
pub(crate) const USAGE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("usage");
/// recipient identity (32) || sender identity (32) -> [`super::records::SenderUsage`]: what
/// one sender holds in one recipient's queues (schema 2). Rows at zero are deleted.
pub(crate) const SENDER_USAGE: TableDefinition<'_, &[u8], &[u8]> =
    TableDefinition::new("sender_usage");
/// queue key || message_id -> seq, for idempotent enqueue.
pub(crate) const DEDUP: TableDefinition<'_, &[u8], u64> = TableDefinition::new("dedup");
/// (expires_at_ms, kind byte || reference) -> (); the TTL sweep walks it in time order.
pub(crate) const EXPIRY: TableDefinition<'_, (u64, &[u8]), ()> = TableDefinition::new("expiry");
/// blob id (SHA-256 of content) -> [`super::records::Blob`].
pub(crate) const BLOBS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("blobs");
/// invite code -> [`super::records::Invite`].
pub(crate) const INVITES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("invites");
/// (identity, device id) -> [`super::records::Device`].
pub(crate) const DEVICES: TableDefinition<'_, (&[u8], &[u8]), &[u8]> =
    TableDefinition::new("devices");

/// slot id (16) -> [`super::records::SlotHeader`]: an epoch commit slot's claim count and
/// expiry, or the tombstone of an expired one (schema 3).
pub(crate) const SLOTS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("slots");
/// (slot id, index) -> [`super::records::Claim`]: a slot's claims in arrival order, index from
/// 0 (schema 3).
pub(crate) const SLOT_CLAIMS: TableDefinition<'_, (&[u8], u32), &[u8]> =
    TableDefinition::new("slot_claims");
/// slot id (16) || claimer identity (32) -> index of its claim in the slot (schema 3).
pub(crate) const SLOT_CLAIMERS: TableDefinition<'_, &[u8], u32> =
    TableDefinition::new("slot_claimers");
/// identity -> [`super::records::ClaimUsage`]: the claims it holds in slots not yet swept, and
/// their payload bytes (schema 3; rows at zero are deleted). Schema 3's first layout typed the
/// value as a redb `u64` (the count); [`super::migrate`] retypes such a table on open.
pub(crate) const CLAIM_USAGE: TableDefinition<'_, &[u8], &[u8]> =
    TableDefinition::new("claim_usage");
/// [`CLAIM_USAGE`] as schema 3's first layout defined it: identity -> claims (a redb `u64`).
pub(crate) const CLAIM_USAGE_COUNT_ONLY: TableDefinition<'_, &[u8], u64> =
    TableDefinition::new("claim_usage");

/// [`EXPIRY`] kind: a queued message; reference is queue key || seq (u64 BE).
pub(crate) const EXPIRE_MESSAGE: u8 = 0;
/// [`EXPIRY`] kind: a dedup record; reference is the [`DEDUP`] key.
pub(crate) const EXPIRE_DEDUP: u8 = 1;
/// [`EXPIRY`] kind: a blob; reference is the blob id.
pub(crate) const EXPIRE_BLOB: u8 = 2;

/// [`EXPIRY`] kind: an epoch commit slot; reference is the slot id. Only the entry whose time
/// matches the slot's current expiry acts: an open slot is closed (its claims go, a tombstone
/// stays), a tombstone is removed. A claim that extends a slot moves its entry.
pub(crate) const EXPIRE_SLOT: u8 = 3;

/// [`META`] key: queued payload bytes plus charged blob bytes on the whole server, for the
/// disk budget (schema 2; kept in the transactions that change them).
pub(crate) const STORED_BYTES: &str = "stored_bytes";
