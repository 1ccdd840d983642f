//! The local store: every key the client keeps in its vault, in one place.
//!
//! [`LocalStore`] is the only code that knows the vault's key layout outside the MLS storage
//! provider ([`crate::mls`] keeps openmls' own records in [`Space::Mls`]). Everything here is
//! synchronous and does no network I/O; several calls make one durable change when run inside
//! [`LocalStore::atomic`].
//!
//! | space | key | value |
//! |---|---|---|
//! | account | `seed`, `username`, `server`, `pin`, `token` | raw bytes |
//! | conversations | group id | [`Conversation`] (JSON) |
//! | messages | `len ‖ group id ‖ seq` | [`HistoryEntry`] (JSON) |
//! | outbox | send counter (u64 BE) | [`OutboxItem`] (binary record) |
//! | state | `mid/ ‖ message id` | `group id ‖ seq`: where a message's entry is |
//! | state | `name/ ‖ identity key` | username (cache of the server's answers) |
//! | state | `contact/ ‖ username` | [`Contact`] (JSON): trust on first use |
//! | state | `commit/ ‖ group id` | [`PendingCommit`] (binary record) |
//! | state | `recent/ ‖ len ‖ group id ‖ slot` | `epoch ‖ send counter ‖ content`: a ring |
//! | state | `setting/ ‖ name` | UTF-8 |
//! | state | `last_seq`, `outbox_next`, `kp_top_up_ms` | u64 BE |

use std::net::SocketAddr;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::error::ClientError;
use super::history::{Conversation, HistoryEntry, conv_prefix, message_key};
use super::records::{OutboxItem, PendingCommit};
use crate::ids::{GroupId, IdentityKey};
use crate::vault::{Space, Vault, VaultError};

/// `state` keys of remembered contacts: `contact/ ‖ username`.
const CONTACT_PREFIX: &[u8] = b"contact/";
/// `state` keys of pending commits: `commit/ ‖ group id`.
const COMMIT_PREFIX: &[u8] = b"commit/";
/// Messages of ours kept per conversation for a resend (a ring: newer overwrite older).
pub(crate) const RECENT_PER_CONVERSATION: u64 = 64;

/// The account key remembered for a username (trust on first use), and whether its safety
/// number was verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Contact {
    /// The account identity key.
    pub key: IdentityKey,
    /// Verified out of band (`qpq verify --mark`).
    pub verified: bool,
    /// When it was first seen (ms since the epoch; 0 if accepted again by `trust`).
    pub since_ms: u64,
}

/// What the store says of its account.
pub(crate) struct Account {
    pub seed: Zeroizing<[u8; 32]>,
    pub username: String,
    pub server: SocketAddr,
    pub pin: Option<String>,
}

/// A message of ours kept for a resend: the epoch it was sent in, the send counter (the ring
/// is not in send order) and the encoded content.
pub(crate) struct Recent {
    pub epoch: u64,
    pub counter: u64,
    pub content: Vec<u8>,
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(v).map_err(|_| ClientError::Internal("a record did not serialize"))
}

fn unjson<T: serde::de::DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(b).map_err(|e| ClientError::CorruptStore { what, detail: e.to_string() })
}

fn contact_key(username: &str) -> Vec<u8> {
    [CONTACT_PREFIX, username.as_bytes()].concat()
}

fn commit_key(conv: &[u8]) -> Vec<u8> {
    [COMMIT_PREFIX, conv].concat()
}

fn name_key(id: &[u8; 32]) -> Vec<u8> {
    [b"name/".as_slice(), id].concat()
}

fn mid_key(message_id: &[u8; 16]) -> Vec<u8> {
    [b"mid/".as_slice(), message_id].concat()
}

fn setting_key(name: &str) -> Vec<u8> {
    [b"setting/".as_slice(), name.as_bytes()].concat()
}

/// `recent/‖len‖group id‖slot`, or the conversation's prefix without a slot.
fn recent_key(conv: &[u8], slot: Option<u64>) -> Vec<u8> {
    let mut k = [b"recent/".as_slice(), &conv_prefix(conv)].concat();
    if let Some(slot) = slot {
        k.push(slot as u8);
    }
    k
}

/// The client's records in its vault.
#[derive(Clone)]
pub(crate) struct LocalStore {
    vault: Arc<Vault>,
}

impl LocalStore {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    /// Runs `f` as one vault transaction: all its writes land, or none.
    pub fn atomic<T, E: From<VaultError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.vault.atomic(f)
    }

    // ----- account -------------------------------------------------------------------

    /// Records a new account's identity, server and pinned certificate, together.
    pub fn create_account(
        &self,
        seed: &[u8; 32],
        username: &str,
        server: SocketAddr,
        pin: &str,
    ) -> Result<(), VaultError> {
        self.vault.atomic(|| -> Result<(), VaultError> {
            self.vault.put(Space::Account, b"seed", seed)?;
            self.vault.put(Space::Account, b"username", username.as_bytes())?;
            self.vault.put(Space::Account, b"server", server.to_string().as_bytes())?;
            self.vault.put(Space::Account, b"pin", pin.as_bytes())
        })
    }

    /// The account this store belongs to.
    pub fn account(&self) -> Result<Account, ClientError> {
        let corrupt = |detail: &str| ClientError::CorruptStore {
            what: "account",
            detail: detail.to_string(),
        };
        let seed =
            self.vault.get(Space::Account, b"seed")?.ok_or_else(|| corrupt("no identity"))?;
        let seed: [u8; 32] =
            seed.as_slice().try_into().map_err(|_| corrupt("identity is not 32 bytes"))?;
        let text = |key: &[u8]| -> Result<Option<String>, VaultError> {
            Ok(self.vault.get(Space::Account, key)?.map(|v| String::from_utf8_lossy(&v).into()))
        };
        let server = text(b"server")?
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("no server address"))?;
        Ok(Account {
            seed: Zeroizing::new(seed),
            username: text(b"username")?.unwrap_or_default(),
            server,
            pin: text(b"pin")?,
        })
    }

    /// The session token of the last login.
    pub fn token(&self) -> Result<Option<Zeroizing<Vec<u8>>>, VaultError> {
        self.vault.get(Space::Account, b"token")
    }

    pub fn set_token(&self, token: &[u8]) -> Result<(), VaultError> {
        self.vault.put(Space::Account, b"token", token)
    }

    pub fn forget_token(&self) -> Result<(), VaultError> {
        self.vault.delete(Space::Account, b"token").map(drop)
    }

    // ----- contacts and names ---------------------------------------------------------

    pub fn contact(&self, username: &str) -> Result<Option<Contact>, ClientError> {
        self.vault
            .get(Space::State, &contact_key(username))?
            .map(|v| unjson("contact", &v))
            .transpose()
    }

    pub fn contacts(&self) -> Result<Vec<(String, Contact)>, ClientError> {
        self.vault
            .scan(Space::State, CONTACT_PREFIX)?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(&k[CONTACT_PREFIX.len()..]).into_owned();
                Ok((name, unjson("contact", &v)?))
            })
            .collect()
    }

    pub fn save_contact(&self, username: &str, c: &Contact) -> Result<(), ClientError> {
        self.vault.put(Space::State, &contact_key(username), &json(c)?)?;
        Ok(())
    }

    pub fn forget_contact(&self, username: &str) -> Result<(), VaultError> {
        self.vault.delete(Space::State, &contact_key(username)).map(drop)
    }

    /// The username remembered for an identity.
    pub fn name(&self, id: &[u8; 32]) -> Result<Option<String>, VaultError> {
        Ok(self.vault.get(Space::State, &name_key(id))?.map(|n| String::from_utf8_lossy(&n).into()))
    }

    pub fn set_name(&self, id: &[u8; 32], name: &str) -> Result<(), VaultError> {
        self.vault.put(Space::State, &name_key(id), name.as_bytes())
    }

    // ----- conversations and history -------------------------------------------------

    /// Every conversation, in no particular order.
    pub fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        self.vault
            .scan(Space::Conversations, b"")?
            .iter()
            .map(|(_, v)| unjson("conversation", v))
            .collect()
    }

    pub fn conversation(&self, id: &[u8]) -> Result<Option<Conversation>, ClientError> {
        self.vault.get(Space::Conversations, id)?.map(|v| unjson("conversation", &v)).transpose()
    }

    pub fn save_conversation(&self, c: &Conversation) -> Result<(), ClientError> {
        self.vault.put(Space::Conversations, &c.id, &json(c)?)?;
        Ok(())
    }

    /// Forgets a conversation and its history.
    pub fn forget_conversation(&self, conv: &[u8]) -> Result<(), VaultError> {
        self.vault.atomic(|| -> Result<(), VaultError> {
            self.vault.delete(Space::Conversations, conv)?;
            self.vault.delete_prefix(Space::Messages, &conv_prefix(conv))?;
            Ok(())
        })
    }

    /// The last `limit` entries of a conversation, oldest first.
    pub fn history(&self, conv: &[u8], limit: usize) -> Result<Vec<HistoryEntry>, ClientError> {
        self.vault
            .scan_last(Space::Messages, &conv_prefix(conv), limit)?
            .iter()
            .map(|(_, v)| unjson("history", v))
            .collect()
    }

    /// Up to `limit` entries older than local seq `before`, oldest first.
    pub fn history_before(
        &self,
        conv: &[u8],
        before: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, ClientError> {
        self.vault
            .scan_before(Space::Messages, &conv_prefix(conv), &message_key(conv, before), limit)?
            .iter()
            .map(|(_, v)| unjson("history", v))
            .collect()
    }

    /// Stores a new entry of `c` (whose counters the caller updated) and indexes its message
    /// id. Call inside a transaction with the conversation's update.
    pub fn put_entry(&self, c: &Conversation, entry: &HistoryEntry) -> Result<(), ClientError> {
        self.vault.put(Space::Messages, &message_key(&c.id, entry.seq), &json(entry)?)?;
        if !entry.system {
            let mut index = c.id.to_vec();
            index.extend_from_slice(&entry.seq.to_be_bytes());
            self.vault.put(Space::State, &mid_key(&entry.message_id), &index)?;
        }
        self.save_conversation(c)
    }

    /// Whether a message id has an entry (any stored index counts).
    pub fn knows_message(&self, message_id: &[u8; 16]) -> Result<bool, VaultError> {
        Ok(self.vault.get(Space::State, &mid_key(message_id))?.is_some())
    }

    /// Where a message id's entry is: its conversation and local seq.
    pub fn locate(&self, message_id: &[u8; 16]) -> Result<Option<(GroupId, u64)>, ClientError> {
        let Some(index) = self.vault.get(Space::State, &mid_key(message_id))? else {
            return Ok(None);
        };
        Ok(index
            .split_last_chunk::<8>()
            .map(|(conv, seq)| (GroupId::from(conv), u64::from_be_bytes(*seq))))
    }

    /// The entry of a message id, with its conversation.
    pub fn entry(
        &self,
        message_id: &[u8; 16],
    ) -> Result<Option<(GroupId, HistoryEntry)>, ClientError> {
        let Some((conv, seq)) = self.locate(message_id)? else { return Ok(None) };
        let Some(v) = self.vault.get(Space::Messages, &message_key(&conv, seq))? else {
            return Ok(None);
        };
        Ok(Some((conv, unjson("history", &v)?)))
    }

    /// Changes the entry of a message id; returns its conversation, or `None` if unknown.
    pub fn update_entry(
        &self,
        message_id: &[u8; 16],
        f: impl FnOnce(&mut HistoryEntry),
    ) -> Result<Option<GroupId>, ClientError> {
        let Some((conv, seq)) = self.locate(message_id)? else { return Ok(None) };
        let key = message_key(&conv, seq);
        let Some(v) = self.vault.get(Space::Messages, &key)? else { return Ok(None) };
        let mut e: HistoryEntry = unjson("history", &v)?;
        f(&mut e);
        self.vault.put(Space::Messages, &key, &json(&e)?)?;
        Ok(Some(conv))
    }

    /// Changes each of the last `limit` entries of a conversation for which `f` says so.
    pub fn update_recent_entries(
        &self,
        conv: &[u8],
        limit: usize,
        mut f: impl FnMut(&mut HistoryEntry) -> bool,
    ) -> Result<(), ClientError> {
        for (key, value) in self.vault.scan_last(Space::Messages, &conv_prefix(conv), limit)? {
            let mut e: HistoryEntry = unjson("history", &value)?;
            if f(&mut e) {
                self.vault.put(Space::Messages, &key, &json(&e)?)?;
            }
        }
        Ok(())
    }

    // ----- outbox ----------------------------------------------------------------------

    /// Puts a payload in the outbox, after everything queued before.
    pub fn queue(&self, item: &OutboxItem) -> Result<(), ClientError> {
        let next = self.counter(b"outbox_next")?;
        self.vault.put(Space::State, b"outbox_next", &(next + 1).to_be_bytes())?;
        self.vault.put(Space::Outbox, &next.to_be_bytes(), &item.encode())?;
        Ok(())
    }

    /// The next send counter (what `queue` numbers the next item with).
    pub fn send_counter(&self) -> Result<u64, VaultError> {
        self.counter(b"outbox_next")
    }

    /// The outbox, in order, with each item's key.
    pub fn outbox(&self) -> Result<Vec<(Vec<u8>, OutboxItem)>, ClientError> {
        self.vault
            .scan(Space::Outbox, b"")?
            .into_iter()
            .map(|(k, v)| {
                let item = OutboxItem::decode(&v).map_err(|e| ClientError::CorruptStore {
                    what: "outbox",
                    detail: e.to_string(),
                })?;
                Ok((k, item))
            })
            .collect()
    }

    /// How many items wait in the outbox (nothing is decrypted to count them).
    pub fn outbox_len(&self) -> Result<usize, VaultError> {
        self.vault.count(Space::Outbox, b"")
    }

    pub fn unqueue(&self, key: &[u8]) -> Result<(), VaultError> {
        self.vault.delete(Space::Outbox, key).map(drop)
    }

    // ----- pending commits ------------------------------------------------------------

    pub fn pending_commit(&self, conv: &[u8]) -> Result<Option<PendingCommit>, ClientError> {
        self.vault.get(Space::State, &commit_key(conv))?.map(|v| decode_commit(&v)).transpose()
    }

    pub fn has_pending_commit(&self, conv: &[u8]) -> Result<bool, VaultError> {
        Ok(self.vault.get(Space::State, &commit_key(conv))?.is_some())
    }

    /// Every pending commit of ours.
    pub fn pending_commits(&self) -> Result<Vec<PendingCommit>, ClientError> {
        self.vault
            .scan(Space::State, COMMIT_PREFIX)?
            .into_iter()
            .map(|(_, v)| decode_commit(&v))
            .collect()
    }

    pub fn put_commit(&self, pending: &PendingCommit) -> Result<(), VaultError> {
        self.vault.put(Space::State, &commit_key(&pending.conv), &pending.encode())
    }

    pub fn forget_commit(&self, conv: &[u8]) -> Result<(), VaultError> {
        self.vault.delete(Space::State, &commit_key(conv)).map(drop)
    }

    // ----- what we sent, kept for a resend ----------------------------------------------

    /// Keeps a message of ours until its epoch is settled (slot `counter` of the ring).
    pub fn remember_sent(&self, conv: &[u8], recent: &Recent) -> Result<(), VaultError> {
        let value =
            [&recent.epoch.to_be_bytes()[..], &recent.counter.to_be_bytes(), &recent.content]
                .concat();
        let slot = recent.counter % RECENT_PER_CONVERSATION;
        self.vault.put(Space::State, &recent_key(conv, Some(slot)), &value)
    }

    /// The messages of ours kept for `conv`, in no particular order.
    pub fn recent(&self, conv: &[u8]) -> Result<Vec<Recent>, VaultError> {
        Ok(self
            .vault
            .scan(Space::State, &recent_key(conv, None))?
            .iter()
            .filter_map(|(_, v)| {
                let (at, rest) = v.split_first_chunk::<8>()?;
                let (n, bytes) = rest.split_first_chunk::<8>()?;
                Some(Recent {
                    epoch: u64::from_be_bytes(*at),
                    counter: u64::from_be_bytes(*n),
                    content: bytes.to_vec(),
                })
            })
            .collect())
    }

    pub fn forget_recent(&self, conv: &[u8]) -> Result<(), VaultError> {
        self.vault.delete_prefix(Space::State, &recent_key(conv, None)).map(drop)
    }

    // ----- settings and counters -------------------------------------------------------

    pub fn setting(&self, name: &str) -> Result<Option<String>, VaultError> {
        Ok(self
            .vault
            .get(Space::State, &setting_key(name))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), VaultError> {
        self.vault.put(Space::State, &setting_key(name), value.as_bytes())
    }

    /// The last queue seq stored or rejected for good.
    pub fn last_seq(&self) -> Result<u64, VaultError> {
        self.counter(b"last_seq")
    }

    pub fn set_last_seq(&self, seq: u64) -> Result<(), VaultError> {
        self.vault.put(Space::State, b"last_seq", &seq.to_be_bytes())
    }

    /// When KeyPackages were last topped up because of a push (ms since the epoch).
    pub fn key_package_top_up_ms(&self) -> Result<u64, VaultError> {
        self.counter(b"kp_top_up_ms")
    }

    pub fn set_key_package_top_up_ms(&self, ms: u64) -> Result<(), VaultError> {
        self.vault.put(Space::State, b"kp_top_up_ms", &ms.to_be_bytes())
    }

    fn counter(&self, key: &[u8]) -> Result<u64, VaultError> {
        Ok(self
            .vault
            .get(Space::State, key)?
            .and_then(|v| v.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes))
    }
}

fn decode_commit(v: &[u8]) -> Result<PendingCommit, ClientError> {
    PendingCommit::decode(v)
        .map_err(|e| ClientError::CorruptStore { what: "pending commit", detail: e.to_string() })
}
