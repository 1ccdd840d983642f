//! The qpq wire protocol: protobuf messages, method and push-event ids, status codes, QUIC
//! close codes and the sans-I/O frame codec.
//!
//! This crate does no I/O, no cryptography and reads no clock. Transports (the server's QUIC
//! driver, the client engine) read a fixed-size header, check it with the codec, then read
//! exactly the announced payload; nothing larger than [`MAX_PAYLOAD`] is ever buffered.
//!
//! ```
//! use qpq_proto::{frame, method, v1, Message};
//!
//! let body = v1::HealthRequest {}.encode_to_vec();
//! let bytes = frame::encode_request(method::HEALTH, 7, &body)?;
//! let (header, payload) = frame::decode_request(&bytes)?;
//! assert_eq!((header.method, header.request_id), (method::HEALTH, 7));
//! assert_eq!(payload, body.as_slice());
//! # Ok::<(), qpq_proto::frame::FrameError>(())
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

mod close;
pub mod frame;
pub mod method;
mod status;

pub use close::{CloseCode, UnknownCloseCode};
pub use prost::Message;
pub use status::Status;

/// Generated protobuf messages of package `qpq.v1`.
#[allow(missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/qpq.v1.rs"));

    impl EnqueueRefusal {
        /// Why the message was not stored for a recipient, in words for a user.
        pub fn describe(self) -> &'static str {
            match self {
                Self::None => "stored",
                Self::UnknownRecipient => "no such user on the server",
                Self::QueueFull => "their queue on the server is full (they have been offline)",
                Self::SenderShare => {
                    "you have used up your share of their queue on the server (they have been \
                     offline)"
                }
            }
        }
    }
}

/// Largest payload a frame may carry: 4 MiB. A header announcing more is refused before any
/// payload byte is read.
pub const MAX_PAYLOAD: u32 = 4 * 1024 * 1024;

/// The QUIC ALPN protocol id.
pub const ALPN: &[u8] = b"qpq";

/// The default UDP port.
pub const DEFAULT_PORT: u16 = 5001;
