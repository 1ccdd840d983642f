//! Conversations and message history as stored in the vault.

use serde::{Deserialize, Serialize};

use crate::content::{Body, Content, FileOffer};
use crate::ids::{GroupId, IdentityKey, MessageId};

/// DM or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConvKind {
    /// Two members.
    Dm,
    /// A group.
    Group,
}

/// A conversation: one MLS group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// MLS group id.
    pub id: GroupId,
    /// DM or group.
    pub kind: ConvKind,
    /// Group name; for a DM, the peer's username.
    pub name: String,
    /// Group topic.
    pub topic: String,
    /// The peer's identity key in a DM.
    pub peer: Option<IdentityKey>,
    /// Last message or change, ms.
    pub last_activity_ms: u64,
    /// Messages received since the user last read the conversation.
    pub unread: u32,
    /// Messages mentioning the user since they last read it.
    pub mentions: u32,
    /// Next local history sequence number.
    pub next_seq: u64,
    /// A DM whose peer's key is the one remembered for its name and was verified (safety
    /// number compared). Not stored: filled in from the contacts on every read.
    #[serde(skip)]
    pub verified: bool,
    /// Why this member can no longer trust or follow the group's state: a fork was detected
    /// (members on different branches) or a commit could not be followed. Empty if none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub warning: String,
}

/// One message in a conversation's history, with what later messages did to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Local sequence number (display order).
    pub seq: u64,
    /// The sender's message id.
    pub message_id: MessageId,
    /// Sender identity key.
    pub sender: Vec<u8>,
    /// Sender clock, ms.
    pub sent_at_ms: u64,
    /// Local arrival time, ms.
    pub received_at_ms: u64,
    /// Text, or a description for non-text entries.
    pub text: String,
    /// Message replied to.
    pub reply_to: Option<MessageId>,
    /// A file offer.
    pub file: Option<FileOffer>,
    /// Edited at least once.
    pub edited: bool,
    /// Deleted by its sender.
    pub deleted: bool,
    /// (emoji, reactor identity) pairs.
    pub reactions: Vec<(String, Vec<u8>)>,
    /// Identities that sent a read receipt covering this message.
    pub read_by: Vec<Vec<u8>>,
    /// A system line (membership change) rather than a user message.
    pub system: bool,
    /// Our own message still waiting in the outbox.
    pub pending: bool,
}

impl HistoryEntry {
    /// A history entry for a text or file message; `None` for bodies that only change
    /// other entries (edits, reactions, receipts, typing, metadata).
    pub fn from_content(seq: u64, sender: &[u8], c: &Content, now_ms: u64) -> Option<Self> {
        let (text, reply_to, file) = match &c.body {
            Body::Text { body, reply_to } => (body.clone(), *reply_to, None),
            Body::File(f) => {
                (format!("[file] {} ({} bytes)", f.name, f.size), None, Some(f.clone()))
            }
            _ => return None,
        };
        Some(Self {
            seq,
            message_id: c.message_id,
            sender: sender.to_vec(),
            sent_at_ms: c.sent_at_ms,
            received_at_ms: now_ms,
            text,
            reply_to,
            file,
            edited: false,
            deleted: false,
            reactions: Vec::new(),
            read_by: Vec::new(),
            system: false,
            pending: false,
        })
    }

    /// Whether the entry mentions `username` (`@username` in its text).
    pub fn mentions(&self, username: &str) -> bool {
        !self.system && self.text.contains(&format!("@{username}"))
    }

    /// A system line (member added, removed, ...).
    pub fn system(seq: u64, text: String, now_ms: u64) -> Self {
        Self {
            seq,
            message_id: MessageId::default(),
            sender: Vec::new(),
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            text,
            reply_to: None,
            file: None,
            edited: false,
            deleted: false,
            reactions: Vec::new(),
            read_by: Vec::new(),
            system: true,
            pending: false,
        }
    }
}

/// Vault key of a history entry: `len(group id) || group id || seq`.
pub(crate) fn message_key(conv: &[u8], seq: u64) -> Vec<u8> {
    let mut k = conv_prefix(conv);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Vault key prefix of a conversation's history.
pub(crate) fn conv_prefix(conv: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + conv.len() + 8);
    k.push(conv.len() as u8);
    k.extend_from_slice(conv);
    k
}
