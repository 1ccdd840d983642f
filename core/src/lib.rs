//! qpq-core: the cryptography and local state a qpq client needs, with no networking.
//!
//! - [`opaque`]: the OPAQUE cipher suite shared with the server and the client's halves of
//!   registration and login. The server builds this crate without default features and uses
//!   only the suite type.
//! - With feature `mls`: [`vault`], the encrypted per-account store, and the MLS layer on top.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "mls")]
pub mod content;
#[cfg(feature = "mls")]
pub mod identity;
#[cfg(feature = "mls")]
pub mod mls;
pub mod opaque;
#[cfg(feature = "mls")]
pub mod vault;
