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
}

impl Queued {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default()
            .u64(self.expires_ms)
            .u64(self.enqueued_ms)
            .bytes(&self.message_id)
            .bytes(&self.payload)
            .done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self {
            expires_ms: d.u64()?,
            enqueued_ms: d.u64()?,
            message_id: d.bytes()?.to_vec(),
            payload: d.bytes()?.to_vec(),
        })
    }
    /// Bytes this message counts against the recipient's quota.
    pub(crate) fn cost(&self) -> u64 {
        self.payload.len() as u64
    }
}

/// Per-user usage counters.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Usage {
    pub messages: u64,
    pub message_bytes: u64,
    pub blob_bytes: u64,
}

impl Usage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Enc::default().u64(self.messages).u64(self.message_bytes).u64(self.blob_bytes).done()
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let mut d = Dec::new(b);
        Ok(Self { messages: d.u64()?, message_bytes: d.u64()?, blob_bytes: d.u64()? })
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

pub(crate) fn key32(b: &[u8]) -> Result<[u8; 32], StoreError> {
    b.try_into().map_err(|_| StoreError::Corrupt("identity key length"))
}
