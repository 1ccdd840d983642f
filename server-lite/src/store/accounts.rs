//! Users, sessions, invite codes, devices and account deletion.

use redb::{ReadableMultimapTable, ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::records::{Device, Invite, Session, Usage, User};
use super::tables::*;
use super::{Store, StoreError, change_stored_bytes};

/// Result of [`Store::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The user exists now.
    Created,
    /// The username is already registered.
    UsernameTaken,
    /// The identity key is already registered to another user.
    IdentityTaken,
    /// The registration policy needs an invite code and this one is unknown, used up or expired.
    InviteInvalid,
}

/// What a login needs to know about a user.
pub struct LoginRecord {
    /// The registered Ed25519 identity key.
    pub identity: [u8; 32],
    /// Serialized OPAQUE password file.
    pub opaque_record: Vec<u8>,
}

/// Result of looking up a session token.
pub enum ResumeOutcome {
    /// A live session.
    Valid(SessionInfo),
    /// No such token (never issued, logged out, revoked or swept).
    Unknown,
}

/// A live session as the handlers see it.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// The user's identity key.
    pub identity: [u8; 32],
    /// The user's name.
    pub username: String,
    /// The device the session was opened for (may be empty).
    pub device_id: Vec<u8>,
    /// Last time the token was used, ms since the epoch.
    pub last_used_ms: u64,
}

impl Store {
    /// The login record of `username`.
    pub fn login_record(&self, username: &str) -> Result<Option<LoginRecord>, StoreError> {
        let t = self.read()?.open_table(USERS)?;
        let Some(v) = t.get(username)? else { return Ok(None) };
        let u = User::decode(v.value())?;
        Ok(Some(LoginRecord { identity: u.identity, opaque_record: u.opaque_record }))
    }

    /// The username that owns `identity`.
    pub fn username_of(&self, identity: &[u8]) -> Result<Option<String>, StoreError> {
        let t = self.read()?.open_table(IDENTITIES)?;
        Ok(t.get(identity)?.map(|v| v.value().to_owned()))
    }

    /// Number of registered users.
    pub fn user_count(&self) -> Result<u64, StoreError> {
        Ok(self.read()?.open_table(USERS)?.len()?)
    }

    /// Creates a user. With `invite` set, one use of that code is consumed in the same
    /// transaction, and the registration fails if the code is not usable.
    pub async fn register(
        &self,
        username: String,
        identity: [u8; 32],
        opaque_record: Vec<u8>,
        invite: Option<String>,
        now_ms: u64,
    ) -> Result<RegisterOutcome, StoreError> {
        self.write(move |txn| {
            let mut users = txn.open_table(USERS)?;
            let mut ids = txn.open_table(IDENTITIES)?;
            if users.get(username.as_str())?.is_some() {
                return Ok(RegisterOutcome::UsernameTaken);
            }
            if ids.get(identity.as_slice())?.is_some() {
                return Ok(RegisterOutcome::IdentityTaken);
            }
            if let Some(code) = &invite {
                let mut invites = txn.open_table(INVITES)?;
                let inv = match invites.get(code.as_str())? {
                    Some(v) => Invite::decode(code, v.value())?,
                    None => return Ok(RegisterOutcome::InviteInvalid),
                };
                if !inv.usable(now_ms) {
                    return Ok(RegisterOutcome::InviteInvalid);
                }
                let used = Invite { uses_left: inv.uses_left - 1, ..inv };
                if used.uses_left == 0 {
                    invites.remove(code.as_str())?;
                } else {
                    invites.insert(code.as_str(), used.encode().as_slice())?;
                }
            }
            let user = User { identity, created_ms: now_ms, opaque_record };
            users.insert(username.as_str(), user.encode().as_slice())?;
            ids.insert(identity.as_slice(), username.as_str())?;
            Ok(RegisterOutcome::Created)
        })
        .await
    }

    /// Stores a new session under the SHA-256 of its token.
    pub async fn create_session(
        &self,
        token_hash: [u8; 32],
        info: SessionInfo,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(move |txn| {
            let s = Session {
                identity: info.identity,
                username: info.username,
                device_id: info.device_id,
                created_ms: now_ms,
                last_used_ms: now_ms,
            };
            txn.open_table(SESSIONS)?.insert(token_hash.as_slice(), s.encode().as_slice())?;
            txn.open_multimap_table(USER_SESSIONS)?
                .insert(s.identity.as_slice(), token_hash.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Looks a session up by token hash.
    pub fn session(&self, token_hash: &[u8; 32]) -> Result<ResumeOutcome, StoreError> {
        let t = self.read()?.open_table(SESSIONS)?;
        let Some(v) = t.get(token_hash.as_slice())? else { return Ok(ResumeOutcome::Unknown) };
        let s = Session::decode(v.value())?;
        Ok(ResumeOutcome::Valid(SessionInfo {
            identity: s.identity,
            username: s.username,
            device_id: s.device_id,
            last_used_ms: s.last_used_ms,
        }))
    }

    /// Records that a session was used at `now_ms`.
    pub async fn touch_session(&self, token_hash: [u8; 32], now_ms: u64) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut t = txn.open_table(SESSIONS)?;
            let s = match t.get(token_hash.as_slice())? {
                Some(v) => Session::decode(v.value())?,
                None => return Ok(()),
            };
            let s = Session { last_used_ms: now_ms, ..s };
            t.insert(token_hash.as_slice(), s.encode().as_slice())?;
            Ok(())
        })
        .await
    }

    /// Deletes one session.
    pub async fn delete_session(&self, token_hash: [u8; 32]) -> Result<(), StoreError> {
        self.write(move |txn| delete_session_in(txn, &token_hash)).await
    }

    /// Creates an invite code.
    pub async fn create_invite(&self, invite: Invite) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let mut t = txn.open_table(INVITES)?;
            if t.get(invite.code.as_str())?.is_some() {
                return Ok(false);
            }
            t.insert(invite.code.as_str(), invite.encode().as_slice())?;
            Ok(true)
        })
        .await
    }

    /// Every invite code, usable or not.
    pub fn invites(&self) -> Result<Vec<Invite>, StoreError> {
        let t = self.read()?.open_table(INVITES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(Invite::decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Whether `code` admits a registration now (not consumed).
    pub fn invite_usable(&self, code: &str, now_ms: u64) -> Result<bool, StoreError> {
        let t = self.read()?.open_table(INVITES)?;
        let Some(v) = t.get(code)? else { return Ok(false) };
        Ok(Invite::decode(code, v.value())?.usable(now_ms))
    }

    /// Deletes an invite code; `false` if there was none.
    pub async fn revoke_invite(&self, code: String) -> Result<bool, StoreError> {
        self.write(move |txn| Ok(txn.open_table(INVITES)?.remove(code.as_str())?.is_some())).await
    }

    /// Registers a device of `identity`; `false` if it would exceed `max_devices`.
    pub async fn register_device(
        &self,
        identity: [u8; 32],
        device_id: Vec<u8>,
        name: String,
        max_devices: usize,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let mut t = txn.open_table(DEVICES)?;
            let key = (identity.as_slice(), device_id.as_slice());
            if t.get(key)?.is_none() {
                let count = t.range((identity.as_slice(), &[][..])..)?.take_while(|r| {
                    r.as_ref().is_ok_and(|(k, _)| k.value().0 == identity.as_slice())
                });
                if count.count() >= max_devices {
                    return Ok(false);
                }
            }
            t.insert(key, Device { name, registered_ms: now_ms }.encode().as_slice())?;
            Ok(true)
        })
        .await
    }

    /// The devices of `identity`: (id, name, registered ms).
    pub fn devices(&self, identity: &[u8]) -> Result<Vec<(Vec<u8>, String, u64)>, StoreError> {
        let t = self.read()?.open_table(DEVICES)?;
        let mut out = Vec::new();
        for row in t.range((identity, &[][..])..)? {
            let (k, v) = row?;
            let (id, dev) = k.value();
            if id != identity {
                break;
            }
            let d = Device::decode(v.value())?;
            out.push((dev.to_vec(), d.name, d.registered_ms));
        }
        Ok(out)
    }

    /// Removes a device and every session opened for it; `false` if there was no such device.
    pub async fn revoke_device(
        &self,
        identity: [u8; 32],
        device_id: Vec<u8>,
    ) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let removed = txn
                .open_table(DEVICES)?
                .remove((identity.as_slice(), device_id.as_slice()))?
                .is_some();
            if !removed {
                return Ok(false);
            }
            for hash in sessions_of(txn, &identity)? {
                let sessions = txn.open_table(SESSIONS)?;
                let dev = match sessions.get(hash.as_slice())? {
                    Some(v) => Session::decode(v.value())?.device_id,
                    None => continue,
                };
                drop(sessions);
                if dev == device_id {
                    delete_session_in(txn, &hash)?;
                }
            }
            Ok(true)
        })
        .await
    }

    /// Deletes the user owning `identity` and everything stored for it, in one transaction.
    /// Returns the ids of the blobs it owned (their files are removed after the commit).
    pub async fn delete_account(&self, identity: [u8; 32]) -> Result<Vec<Vec<u8>>, StoreError> {
        let blobs = self.write(move |txn| delete_account_in(txn, &identity)).await?;
        for id in &blobs {
            self.remove_blob_files(id);
        }
        Ok(blobs)
    }
}

fn sessions_of(txn: &WriteTransaction, identity: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    let t = txn.open_multimap_table(USER_SESSIONS)?;
    let mut out = Vec::new();
    for v in t.get(identity)? {
        out.push(v?.value().to_vec());
    }
    Ok(out)
}

pub(super) fn delete_session_in(txn: &WriteTransaction, hash: &[u8]) -> Result<(), StoreError> {
    let mut t = txn.open_table(SESSIONS)?;
    if let Some(v) = t.remove(hash)? {
        let s = Session::decode(v.value())?;
        drop(v);
        txn.open_multimap_table(USER_SESSIONS)?.remove(s.identity.as_slice(), hash)?;
    }
    Ok(())
}

fn delete_account_in(
    txn: &WriteTransaction,
    identity: &[u8; 32],
) -> Result<Vec<Vec<u8>>, StoreError> {
    let id = identity.as_slice();
    let username = match txn.open_table(IDENTITIES)?.remove(id)? {
        Some(v) => v.value().to_owned(),
        None => return Ok(Vec::new()),
    };
    txn.open_table(USERS)?.remove(username.as_str())?;
    for hash in sessions_of(txn, id)? {
        txn.open_table(SESSIONS)?.remove(hash.as_slice())?;
    }
    txn.open_multimap_table(USER_SESSIONS)?.remove_all(id)?;
    txn.open_table(KEY_PACKAGES)?.retain_in((id, 0u64)..=(id, u64::MAX), |_, _| false)?;
    txn.open_table(KEY_PACKAGE_NEXT)?.remove(id)?;
    txn.open_table(LAST_RESORT)?.remove(id)?;
    txn.open_table(HYBRID_KEYS)?.remove(id)?;
    txn.open_table(DEVICES)?.retain(|(owner, _), _| owner != id)?;
    // Its queued bytes and its blobs (all deleted below) leave the server's stored bytes.
    let usage = txn.open_table(USAGE)?.remove(id)?.map(|v| Usage::decode(v.value()));
    if let Some(u) = usage.transpose()? {
        change_stored_bytes(txn, 0, u.stored())?;
    }
    // What others hold in its queues. (What it holds in others' queues stays counted for it
    // until those messages go.)
    let mut low = id.to_vec();
    low.extend_from_slice(&[0u8; 32]);
    let mut high = id.to_vec();
    high.extend_from_slice(&[0xffu8; 32]);
    txn.open_table(SENDER_USAGE)?.retain_in(low.as_slice()..=high.as_slice(), |_, _| false)?;
    // Queues: every queue key starts with the identity. Their expiry and dedup entries go with
    // them; the sweep would drop them later anyway, but deletion means now.
    let mut queue_keys = Vec::new();
    {
        let next = txn.open_table(QUEUE_NEXT)?;
        for row in next.range(id..)? {
            let (k, _) = row?;
            if !k.value().starts_with(id) {
                break;
            }
            queue_keys.push(k.value().to_vec());
        }
    }
    for qk in &queue_keys {
        txn.open_table(QUEUES)?
            .retain_in((qk.as_slice(), 0u64)..=(qk.as_slice(), u64::MAX), |_, _| false)?;
        txn.open_table(QUEUE_NEXT)?.remove(qk.as_slice())?;
    }
    txn.open_table(DEDUP)?.retain(|k, _| !k.starts_with(id))?;
    txn.open_table(EXPIRY)?.retain(|(_, r), _| {
        !(r.first() == Some(&EXPIRE_MESSAGE) || r.first() == Some(&EXPIRE_DEDUP))
            || !r[1..].starts_with(id)
    })?;
    let mut blobs = Vec::new();
    {
        let mut t = txn.open_table(BLOBS)?;
        for row in t.iter()? {
            let (k, v) = row?;
            if super::records::Blob::decode(v.value())?.owner == *identity {
                blobs.push(k.value().to_vec());
            }
        }
        for b in &blobs {
            t.remove(b.as_slice())?;
        }
    }
    let mut exp = txn.open_table(EXPIRY)?;
    exp.retain(|(_, r), _| {
        !(r.first() == Some(&EXPIRE_BLOB) && blobs.iter().any(|b| r[1..] == b[..]))
    })?;
    Ok(blobs)
}
