//! The client: one account's connection, login, groups, delivery, outbox and file transfer.
//!
//! Shaped like quinn-proto and quinn: the protocol state is synchronous and does no network
//! I/O, and thin async drivers move bytes.
//!
//! - [`error`] and [`event`]: what fails and what the UI hears (depend on nothing else here).
//! - `local`: the [`LocalStore`](local), the one owner of every client key in the vault.
//! - `state`: the synchronous client state (MLS + local store): records a send, handles a
//!   queued envelope, decides slots and redos; events out through a queue, effects out as
//!   return values.
//! - `session`: the connection (dial the pinned server, resume, call); knows nothing of the
//!   outbox.
//! - `engine` (with `groups` and `transfer`): the async driver [`Client`]. Transfers are
//!   detached futures, so a UI runs them in tasks of their own.
//!
//! It acknowledges only what is stored in the vault, and sends through a persistent outbox so
//! a message typed offline goes out once after reconnecting. Everything it learns is also
//! published as an [`Event`] stream for the terminal UI and tests.

mod engine;
pub mod error;
pub mod event;
pub mod files;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod groups;
mod history;
mod local;
pub mod net;
pub(crate) mod records;
mod session;
mod state;
mod transfer;

pub use engine::{Client, ProgressHook, RegisterOptions};
pub use error::ClientError;
pub use event::{ConnState, Event, GroupInfo, Transfer};
pub use history::{ConvKind, Conversation, HistoryEntry};
pub use local::Contact;
pub use transfer::TransferProgress;
