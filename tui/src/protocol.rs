//! What the terminal UI and the worker say to each other, in one process or through the
//! account's socket (`qpq daemon`): [`Command`]s in, [`WorkerEvent`]s out. Every type here
//! is serde, carried in [`crate::ipc`] frames; [`Request`] and [`Reply`] are the socket's
//! envelopes. Changing a type here changes the socket protocol: bump
//! [`crate::ipc::IPC_VERSION`].

use std::path::PathBuf;
use std::time::Duration;

use qpq_core::client::{ConnState, Conversation, HistoryEntry};
use qpq_core::ids::{GroupId, MessageId};
use serde::{Deserialize, Serialize};

use crate::config;

/// Group details as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoView {
    /// Name.
    pub name: String,
    /// Topic.
    pub topic: String,
    /// MLS epoch.
    pub epoch: u64,
    /// Verification code.
    pub code: String,
    /// (name, admin).
    pub members: Vec<(String, bool)>,
}

/// What the UI asks the worker to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Load a conversation's history and members; mark it read.
    Open(GroupId),
    /// Load the page of history before local seq `before`.
    Older { conv: GroupId, before: u64 },
    /// Send text (optionally a reply).
    Send { conv: GroupId, text: String, reply_to: Option<MessageId> },
    /// Typing started/stopped.
    Typing { conv: GroupId, active: bool },
    /// Open (or create) the DM with a user.
    Dm(String),
    /// Create a group.
    CreateGroup(String),
    /// Add users to a group.
    Add { conv: GroupId, users: Vec<String> },
    /// Remove a user.
    Remove { conv: GroupId, user: String },
    /// Promote (true) or demote.
    SetAdmin { conv: GroupId, user: String, admin: bool },
    /// Rename / set topic.
    Rename { conv: GroupId, name: String, topic: Option<String> },
    /// Leave.
    Leave(GroupId),
    /// Rotate own keys.
    Rotate(GroupId),
    /// Group info.
    Info(GroupId),
    /// Safety number with a user.
    Verify(String),
    /// Record (or forget) that a user's safety number was compared.
    MarkVerified {
        /// The user.
        user: String,
        /// Verified or not.
        verified: bool,
    },
    /// Send a file.
    SendFile { conv: GroupId, path: PathBuf },
    /// Download a file offer into `dir` (`None`: the XDG download directory, which the worker
    /// looks up: the UI does no I/O).
    Download { conv: GroupId, message_id: MessageId, dir: Option<PathBuf> },
    /// React to a message.
    React { conv: GroupId, target: MessageId, emoji: String },
    /// Edit one of our messages.
    Edit { conv: GroupId, target: MessageId, text: String },
    /// Delete one of our messages.
    Delete { conv: GroupId, target: MessageId },
    /// Set a conversation's notification level.
    Notify { conv: GroupId, level: config::NotifyLevel },
    /// Copy text to the clipboard (OSC 52; the main loop writes it).
    Copy(String),
    /// Leave the program.
    Quit,
}

/// What the worker tells the UI.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // moved through a channel once
pub enum WorkerEvent {
    /// All conversations, most recent first.
    Conversations(Vec<Conversation>),
    /// A conversation's recent history (and the names of its senders).
    History { conv: GroupId, entries: Vec<HistoryEntry>, names: Vec<(Vec<u8>, String)> },
    /// An older page of a conversation's history (empty: the beginning was reached).
    Older { conv: GroupId, entries: Vec<HistoryEntry>, names: Vec<(Vec<u8>, String)> },
    /// A conversation's members: (name, admin, typing-capable identity).
    Members { conv: GroupId, members: Vec<(String, bool, Vec<u8>)> },
    /// A new message arrived in a conversation.
    Incoming { conv: GroupId, entry: HistoryEntry, sender: String, mention: bool },
    /// Someone is typing.
    Typing { conv: GroupId, who: String, active: bool },
    /// Group info.
    Info(InfoView),
    /// Safety number.
    Safety { user: String, number: String, verified: bool },
    /// A warning the user must acknowledge before anything else (a contact's key changed).
    Alert { title: String, text: String },
    /// Transfer progress.
    Transfer { name: String, done: u64, total: u64, upload: bool },
    /// An entry of a conversation changed (delivered, edited, deleted, reacted to, read).
    Changed { conv: GroupId, entry: HistoryEntry },
    /// Connection, outbox, and when the next reconnect attempt starts (offline).
    Status { conn: ConnState, outbox: usize, retry_in: Option<Duration> },
    /// Our identity and server.
    Identity { username: String, server: String, identity: String },
    /// A stored per-conversation notification level.
    NotifyLevel { conv: GroupId, level: config::NotifyLevel },
    /// Something to show in the status line.
    Notice(String),
    /// Something that failed.
    Error(String),
}

/// What an attached `qpq` sends to the process serving the account.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // one at a time, straight onto the socket
pub enum Request {
    /// The store's passphrase, when the daemon is locked ([`Reply::State`]). Sent only over
    /// the socket (mode 0600, peer uid checked): the daemon reads it from nowhere else.
    Unlock { passphrase: String },
    /// A terminal UI's command.
    Ui(Command),
    /// A subcommand to run on the daemon's client: [`Reply::Output`], then [`Reply::Done`].
    /// `password` is for `login` (asked by the attached process).
    Cli { command: crate::cli::Command, password: Option<String> },
}

/// What the serving process sends to an attached `qpq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // one at a time, straight onto the socket
pub enum Reply {
    /// Sent first on every connection, and again when it changes: whether the store is open.
    State { locked: bool },
    /// The passphrase did not open the store (the daemon stays locked).
    UnlockFailed(String),
    /// An event for the terminal UI (also seen by attached subcommands: `tail -f` prints
    /// new messages from them).
    Event(WorkerEvent),
    /// What a subcommand printed.
    Output(String),
    /// A subcommand ended; `error` is why it failed. `follow` is the conversation a
    /// `tail --follow` goes on printing from [`Reply::Event`]s, those with a local sequence
    /// number above `after` (the ones printed already are not printed twice).
    /// What went wrong on the way for others (`notes`, shown on stderr as `qpq: note:`).
    Done { error: Option<String>, follow: Option<GroupId>, after: u64, notes: Vec<String> },
    /// The connection is refused (a malformed or oversized frame, another version): the
    /// serving process closes it after this.
    Error(String),
}
