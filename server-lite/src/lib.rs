//! qpq-server-lite: a relay for end-to-end encrypted qpq messages, small enough for a router.
//!
//! It stores and forwards ciphertext, KeyPackages and blobs for authenticated users and never
//! sees plaintext or group membership. `main.rs` only parses the command line; everything else
//! lives here so tests can run the server in-process too.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod budget;
pub mod config;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
pub mod hub;
pub mod rate;
pub mod server;
pub mod shared;
pub mod store;
pub mod tls;

pub use config::Config;
pub use server::Server;
