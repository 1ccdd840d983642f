//! Why a client operation failed: one variant per cause a caller can act on (peer fault,
//! caller misuse, local storage, network with the server's status or close code).

use super::files::FileCryptoError;
use super::net::NetError;
use crate::content::ContentError;
use crate::mls::GroupError;
use crate::opaque;
use crate::vault::VaultError;

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The network or the server said no.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The local store failed (or the passphrase is wrong).
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// MLS refused.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A message did not decode.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// File encryption or I/O failed.
    #[error(transparent)]
    File(#[from] FileCryptoError),
    /// OPAQUE failed (wrong password, or not the server we registered with).
    #[error(transparent)]
    Opaque(#[from] opaque::OpaqueClientError),
    /// The session expired: log in with the password again.
    #[error("not logged in (session expired or revoked): run `qpq login`")]
    NeedLogin,
    /// No such user on the server.
    #[error("no user named {0:?}")]
    UnknownUser(String),
    /// No conversation matches.
    #[error("no conversation {0:?}")]
    UnknownConversation(String),
    /// A bare name that more than one conversation has: the user must say which.
    #[error(
        "{name:?} could mean {}: say which, with @{} for the direct conversation or #{} for \
         a group (or the group's id, as listed)",
        matches.join(", "),
        name.escape_debug(),
        name.escape_debug()
    )]
    AmbiguousConversation {
        /// What was asked for.
        name: String,
        /// The conversations it matches, as `@name` / `#name (id …)`.
        matches: Vec<String>,
    },
    /// The store of a registered account has no pinned server certificate. Registration
    /// always stores one, so the entry was deleted outside qpq; trusting whatever certificate
    /// answers now would hand the account to whoever answers.
    #[error(
        "the store has no pinned server certificate: it was modified outside qpq. Nothing was \
         sent. Restore the store from a backup, or move it aside and register again (if \
         registration was interrupted, that is all it takes)"
    )]
    PinMissing,
    /// The user has no KeyPackage left on the server.
    #[error("{0} has no KeyPackages left on the server; they need to come online")]
    NoKeyPackage(String),
    /// The server maps a username to another account key than the one remembered for it
    /// (trust on first use). Nothing was sent; the user has to look into it.
    #[error(
        "WARNING: the server now says {username} is account {presented}, but you have known \
         {username} as account {pinned}. Someone may be impersonating {username} (or they \
         registered again). Nothing was sent. Compare safety numbers with {username} in person \
         or on a call, then accept the new key with `qpq trust {username}`."
    )]
    KeyChanged {
        /// The username.
        username: String,
        /// The key remembered for it (hex).
        pinned: String,
        /// The key the server gives now (hex).
        presented: String,
    },
    /// A record of the local store did not decode: the store was modified outside qpq, or
    /// written by a newer version.
    #[error(
        "the local store holds a damaged {what} record ({detail}): it was modified outside qpq \
         or written by a newer version"
    )]
    CorruptStore {
        /// Which kind of record.
        what: &'static str,
        /// What the decoder said.
        detail: String,
    },
    /// The server answered with something that breaks the protocol (a peer fault: nothing of
    /// it was used).
    #[error("the server's answer is invalid: {0}")]
    PeerInvalid(&'static str),
    /// A DM with ourselves was asked for.
    #[error("that is you: a direct conversation needs another user")]
    SelfConversation,
    /// A new group would share its name with a conversation we have.
    #[error("a conversation named {0:?} exists")]
    NameTaken(String),
    /// Names and topics belong to groups; a direct conversation has none.
    #[error("only groups have names")]
    NotAGroup,
    /// A change of ours to this group is still on its way to the server: messages wait for it
    /// (they would be readable by the membership it ends).
    #[error("a change to this group is still on its way to the server; send again once online")]
    ChangePending,
    /// No member's queue took our group change, so it was dropped (the group is unchanged).
    #[error(
        "no member's queue took the group change, so it was dropped and the group is \
         unchanged; try again later"
    )]
    ChangeNotDelivered,
    /// The server refused our group change for good (the group is unchanged).
    #[error("the group change was not accepted: {0}; the group is unchanged")]
    ChangeRefused(&'static str),
    /// An upload made no progress through several reconnects in a row (the server keeps
    /// refusing its chunks): it was given up; sending the file again starts over.
    #[error("the upload made no progress (the server keeps refusing it); try again later")]
    UploadStalled,
    /// A bug of ours, reported instead of a panic.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// Local file I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
