//! Stored record layouts (see [`super::codec`]).

use super::StoreError;
use super::codec::{Dec, Enc};

/// A registered user.
pub(crate) struct User {
    pub identity: [u8; 32],
    pub created_ms: u64,
    /// Serialized OPAQUE `ServerRegistration` (the password file).
    pub opaque_record: Vec<u8>,
}

impl User {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().bytes(&self.identity).u64(self.created_ms).bytes(&self.opaque_record).done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        let identity = key32(d.bytes()?)?;
        Ok(Self { identity, created_ms: d.u64()?, opaque_record: d.bytes()?.to_vec() })
    }
}

/// A login session; the key is SHA-256 of the token, so a stolen database holds no tokens.
#[derive(Clone)]
pub(crate) struct Session {
    pub identity: [u8; 32],
    pub username: String,
    pub device_id: Vec<u8>,
    pub created_ms: u64,
    pub last_used_ms: u64,
}

impl Session {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default()
            .bytes(&self.identity)
            .bytes(self.username.as_bytes())
            .bytes(&self.device_id)
            .u64(self.created_ms)
            .u64(self.last_used_ms)
            .done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self {
            identity: key32(d.bytes()?)?,
            username: d.string()?,
            device_id: d.bytes()?.to_vec(),
            created_ms: d.u64()?,
            last_used_ms: d.u64()?,
        })
    }
}

/// A queued message.
pub(crate) struct Queued {
    pub expires_ms: u64,
    pub enqueued_ms: u64,
    pub message_id: Vec<u8>,
    pub payload: Vec<u8>,
    /// Who enqueued it; `None` for messages stored by schema 1, which did not record it.
    pub sender: Option<[u8; 32]>,
    /// Charged to the handshake reserve rather than the queue's quota.
    pub reserve: bool,
}

impl Queued {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default()
            .u64(self.expires_ms)
            .u64(self.enqueued_ms)
            .bytes(&self.message_id)
            .bytes(&self.payload)
            .bytes(self.sender.as_ref().map_or(&[][..], |s| s.as_slice()))
            .u8(u8::from(self.reserve))
            .done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        let mut q = Self {
            expires_ms: d.u64()?,
            enqueued_ms: d.u64()?,
            message_id: d.bytes()?.to_vec(),
            payload: d.bytes()?.to_vec(),
            sender: None,
            reserve: false,
        };
        // Schema 1 records end here.
        if !d.is_empty() {
            let sender = d.bytes()?;
            q.sender = if sender.is_empty() { None } else { Some(key32(sender)?) };
            q.reserve = d.u8()? != 0;
        }
        Ok(q)
    }
    /// Bytes this message counts against the recipient's quota.
    pub(crate) fn cost(&self) -> u64 {
        self.payload.len() as u64
    }
}

/// Per-user usage counters: queued messages and bytes within the quota, those in the handshake
/// reserve (schema 2; absent from schema 1 records, read as 0), and blob bytes.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Usage {
    pub messages: u64,
    pub message_bytes: u64,
    pub blob_bytes: u64,
    pub reserve_messages: u64,
    pub reserve_bytes: u64,
}

impl Usage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default()
            .u64(self.messages)
            .u64(self.message_bytes)
            .u64(self.blob_bytes)
            .u64(self.reserve_messages)
            .u64(self.reserve_bytes)
            .done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        let mut u = Self {
            messages: d.u64()?,
            message_bytes: d.u64()?,
            blob_bytes: d.u64()?,
            ..Self::default()
        };
        if !d.is_empty() {
            u.reserve_messages = d.u64()?;
            u.reserve_bytes = d.u64()?;
        }
        Ok(u)
    }
    /// Queued bytes plus blob bytes: what this user adds to the server's stored bytes.
    pub(crate) fn stored(&self) -> u64 {
        self.message_bytes.saturating_add(self.reserve_bytes).saturating_add(self.blob_bytes)
    }
}

/// What one sender holds in one recipient's queues: within the quota, and in the reserve.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SenderUsage {
    pub messages: u64,
    pub bytes: u64,
    pub reserve_messages: u64,
    pub reserve_bytes: u64,
}

impl SenderUsage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default()
            .u64(self.messages)
            .u64(self.bytes)
            .u64(self.reserve_messages)
            .u64(self.reserve_bytes)
            .done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self {
            messages: d.u64()?,
            bytes: d.u64()?,
            reserve_messages: d.u64()?,
            reserve_bytes: d.u64()?,
        })
    }
    pub(crate) fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// A last-resort KeyPackage.
pub(crate) struct LastResort {
    /// Handed out at least once since its upload.
    pub handed_out: bool,
    pub package: Vec<u8>,
}

impl LastResort {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().u8(u8::from(self.handed_out)).bytes(&self.package).done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self { handed_out: d.u8()? != 0, package: d.bytes()?.to_vec() })
    }
}

/// Blob metadata; the content lives in `blobs/<hex id>` beside the database.
#[derive(Clone, Debug)]
pub(crate) struct Blob {
    pub owner: [u8; 32],
    pub total_size: u64,
    pub received: u64,
    pub complete: bool,
    pub created_ms: u64,
    /// When the sweep removes it: a day after creation while incomplete, the blob TTL after.
    pub expires_ms: u64,
    pub media_type: String,
}

impl Blob {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default()
            .bytes(&self.owner)
            .u64(self.total_size)
            .u64(self.received)
            .u8(u8::from(self.complete))
            .u64(self.created_ms)
            .u64(self.expires_ms)
            .bytes(self.media_type.as_bytes())
            .done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self {
            owner: key32(d.bytes()?)?,
            total_size: d.u64()?,
            received: d.u64()?,
            complete: d.u8()? != 0,
            created_ms: d.u64()?,
            expires_ms: d.u64()?,
            media_type: d.string()?,
        })
    }
}

/// An invite code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// The code itself.
    pub code: String,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Expiry, ms since the epoch; 0 = never.
    pub expires_ms: u64,
    /// Registrations it still allows.
    pub uses_left: u32,
}

impl Invite {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().u64(self.created_ms).u64(self.expires_ms).u32(self.uses_left).done()
    }
    pub(crate) fn decode(code: &str, b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self {
            code: code.to_owned(),
            created_ms: d.u64()?,
            expires_ms: d.u64()?,
            uses_left: d.u32()?,
        })
    }
    /// Whether the code admits a registration at `now_ms`.
    pub fn usable(&self, now_ms: u64) -> bool {
        self.uses_left > 0 && (self.expires_ms == 0 || now_ms < self.expires_ms)
    }
}

/// A registered device.
pub(crate) struct Device {
    pub name: String,
    pub registered_ms: u64,
}

impl Device {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().bytes(self.name.as_bytes()).u64(self.registered_ms).done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self { name: d.string()?, registered_ms: d.u64()? })
    }
}

/// An epoch commit slot: how many claims it holds and when it expires (`max_ttl_secs` after
/// its latest claim, so it outlives every queued copy of its claims).
///
/// An expired slot is swept into a *tombstone*: its claims are deleted, `closed` is set,
/// `count` is 0 and `expires_ms` is when the tombstone itself is swept. A closed slot takes no
/// claim and reads as empty, so an epoch's slot is never started afresh while a member may
/// still meet a copy of one of its commits.
///
/// Layout: `count u32 ‖ expires_ms u64 ‖ closed u8`. The flag was appended to schema 3's first
/// layout; a record without it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotHeader {
    pub count: u32,
    pub expires_ms: u64,
    pub closed: bool,
}

impl SlotHeader {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().u32(self.count).u64(self.expires_ms).u8(u8::from(self.closed)).done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        let mut h = Self { count: d.u32()?, expires_ms: d.u64()?, closed: false };
        // Records of schema 3's first layout end here: open.
        if !d.is_empty() {
            h.closed = d.u8()? != 0;
        }
        Ok(h)
    }
}

/// What one account holds in commit slots not yet swept: its claims, and their payload bytes
/// (each claim keeps a copy of its commit for the slot's lifetime).
///
/// Layout: `claims u64 ‖ bytes u64`. Schema 3's first layout held the count alone (8 bytes);
/// such a row decodes with `bytes` = 0.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClaimUsage {
    pub claims: u64,
    pub bytes: u64,
}

impl ClaimUsage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().u64(self.claims).u64(self.bytes).done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        let mut u = Self { claims: d.u64()?, bytes: 0 };
        if !d.is_empty() {
            u.bytes = d.u64()?;
        }
        Ok(u)
    }
}

/// One claim in a slot: who claimed it, under which message id, and the commit.
pub(crate) struct Claim {
    pub claimer: [u8; 32],
    pub message_id: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Claim {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().bytes(&self.claimer).bytes(&self.message_id).bytes(&self.payload).done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self {
            claimer: key32(d.bytes()?)?,
            message_id: d.bytes()?.to_vec(),
            payload: d.bytes()?.to_vec(),
        })
    }
}

pub(crate) fn key32(b: &[u8]) -> Result<[u8; 32], StoreError> {
    b.try_into().map_err(|_| StoreError::Corrupt("identity key length"))
}
