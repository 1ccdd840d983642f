//! Response status codes.

/// The status byte of a response frame. Every non-[`Status::Ok`] response carries a
/// [`crate::v1::Error`] payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum Status {
    /// The call succeeded; the payload is the method's response message.
    Ok = 0,
    /// The request was malformed or failed validation.
    BadRequest = 1,
    /// The connection is not authenticated, or the credentials were wrong.
    Unauthorized = 2,
    /// Authenticated, but not allowed to touch this resource.
    Forbidden = 3,
    /// The thing asked for does not exist.
    NotFound = 4,
    /// Too many attempts; `retry_after_ms` says when to try again.
    RateLimited = 5,
    /// The frame or a field in it exceeds a limit.
    PayloadTooLarge = 6,
    /// The request conflicts with existing state (name or key taken, KeyPackage stock full, blob
    /// uploaded by someone else).
    Conflict = 7,
    /// The client did not send its request in time.
    DeadlineExceeded = 8,
    /// The server cannot take the request now (shutting down, recipient queue full); see
    /// `retry_after_ms`.
    Unavailable = 9,
    /// A server-side failure that is not the caller's fault.
    Internal = 10,
    /// The method id is not known to this server.
    UnknownMethod = 11,
}

impl Status {
    /// The status for a wire byte, or `None` for an unassigned value.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Ok,
            1 => Self::BadRequest,
            2 => Self::Unauthorized,
            3 => Self::Forbidden,
            4 => Self::NotFound,
            5 => Self::RateLimited,
            6 => Self::PayloadTooLarge,
            7 => Self::Conflict,
            8 => Self::DeadlineExceeded,
            9 => Self::Unavailable,
            10 => Self::Internal,
            11 => Self::UnknownMethod,
            _ => return None,
        })
    }

    /// The wire byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips_or_is_rejected() {
        let mut known = 0;
        for b in 0..=u8::MAX {
            if let Some(s) = Status::from_u8(b) {
                assert_eq!(s.as_u8(), b);
                known += 1;
            }
        }
        assert_eq!(known, 12);
    }
}
