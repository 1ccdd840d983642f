//! qpq-core: the cryptography a qpq client needs, with no networking and no clock.
//!
//! Today it holds the OPAQUE cipher suite shared by client and server ([`opaque::Suite`]) and
//! the client halves of registration and login. The server depends on this crate only for the
//! suite type; it never runs the client's key-stretching function.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod opaque;
