//! What the client tells its UI: the [`Event`] stream and the types it carries.

use super::history::{Conversation, HistoryEntry};
use crate::ids::{GroupId, IdentityKey, MessageId};

/// Connection state, as events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConnState {
    /// Connected and authenticated.
    Online,
    /// Trying to reconnect.
    Reconnecting,
    /// Not connected.
    Offline,
}

/// A file transfer's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// File name.
    pub name: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// Upload (true) or download.
    pub upload: bool,
}

/// What the engine tells its UI.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // short-lived, and boxing would cost an allocation per message
#[non_exhaustive]
pub enum Event {
    /// A new history entry (message, file offer, system line).
    Message {
        /// Conversation id.
        conv: GroupId,
        /// The entry.
        entry: HistoryEntry,
    },
    /// An existing entry changed (edit, delete, reaction, receipt).
    Updated {
        /// Conversation id.
        conv: GroupId,
        /// The entry's message id.
        message_id: MessageId,
    },
    /// Someone started or stopped typing.
    Typing {
        /// Conversation id.
        conv: GroupId,
        /// Who.
        who: IdentityKey,
        /// Started (true) or stopped.
        active: bool,
    },
    /// We joined, a conversation was renamed, or membership changed.
    Conversation {
        /// Conversation id.
        conv: GroupId,
    },
    /// Transfer progress.
    Transfer(Transfer),
    /// Connection state changed.
    Connection(ConnState),
    /// A message was rejected (tampered, unauthorized commit, undecryptable).
    Rejected {
        /// Why.
        reason: String,
    },
    /// A member proposed a change (e.g. leaving) that waits for an admin's commit.
    Proposal {
        /// Conversation id.
        conv: GroupId,
    },
    /// Gap in a queue's seq numbers: messages expired on the server before we fetched them.
    Gap {
        /// Last seq seen.
        after: u64,
        /// Next seq received.
        next: u64,
    },
}

/// Group details for an info view.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    /// The conversation.
    pub conversation: Conversation,
    /// Members: identity, username (if known), admin.
    pub members: Vec<(IdentityKey, String, bool)>,
    /// MLS epoch.
    pub epoch: u64,
    /// Verification code (same for every member in this epoch).
    pub verification_code: String,
}
