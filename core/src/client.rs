//! The client engine: one account's connection, login, delivery, outbox and file transfer.
//!
//! The engine is the I/O shell around the sans-I/O parts of this crate ([`crate::mls`],
//! [`crate::vault`], [`crate::content`]). It owns the QUIC connection (pinned certificate,
//! resumable session), receives by push and long poll, acknowledges only what is stored in
//! the vault, and sends through a persistent outbox so a message typed offline goes out once
//! after reconnecting. Everything it learns is also published as an [`Event`] stream for the
//! terminal UI and tests.

mod engine;
pub mod files;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod history;
pub mod net;

pub use engine::{
    Client, ClientError, ConnState, Contact, Event, GroupInfo, ProgressHook, RegisterOptions,
    Transfer,
};
pub use history::{ConvKind, Conversation, HistoryEntry};
