//! qpq-core: what a qpq client needs below its user interface.
//!
//! - [`opaque`]: the OPAQUE cipher suite shared with the server and the client's halves of
//!   registration and login. The server builds this crate without features and uses only the
//!   suite type and [`pq_tls`].
//! - [`credential`]: the qpq MLS credential binding a device key to an account key, checked
//!   by clients and by the server on KeyPackage upload.
//! - [`keypackage`]: a feature-free reader of RFC 9420 KeyPackages (structure, both
//!   signatures, the credential binding) and of the clear header of MLS messages, for the
//!   server.
//! - [`pq_tls`]: the rustls crypto provider of both client and server, with the hybrid
//!   post-quantum `X25519MLKEM768` TLS key exchange preferred.
//! - Feature `mls` (sans-I/O apart from the store file): [`vault`], the encrypted per-account
//!   store; [`identity`], Ed25519 keys and safety numbers; [`content`], the padded message
//!   model; [`mls`], groups and DMs on openmls with the X-Wing ciphersuite and admin roles.
//! - Feature `client`: [`client`], the engine that does the networking (QUIC, pinning, login,
//!   outbox, sync, file transfer) around those parts.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "mls")]
pub mod content;
pub mod credential;
#[cfg(feature = "mls")]
pub mod identity;
#[cfg(feature = "mls")]
pub mod ids;
pub mod keypackage;
#[cfg(feature = "mls")]
pub mod mls;
pub mod opaque;
pub mod pq_tls;
/// Test support (a redb backend that loses unsynced writes on a power cut); not API.
#[doc(hidden)]
pub mod testing;
#[cfg(feature = "mls")]
pub mod vault;
