//! QUIC application close codes: why the server closed a connection.
//!
//! The server closes a connection with one of these codes in the QUIC `CONNECTION_CLOSE`
//! frame (type 0x1d) and a short reason text. The numbers are on the wire and never reused.
//! Clients close with code 0 (nothing wrong), which the server does not interpret.

use std::fmt;

/// Why the server closed a connection (QUIC application close code). The numbers are on the
/// wire: a client that meets one it does not know treats it as an unexplained close.
///
/// ```
/// use qpq_proto::CloseCode;
///
/// assert_eq!(CloseCode::from_u32(2), Some(CloseCode::Revoked));
/// assert_eq!(CloseCode::Revoked.as_u32(), 2);
/// assert_eq!(CloseCode::try_from(9u64), Err(qpq_proto::UnknownCloseCode(9)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1: the server is shutting down. Reconnect with backoff; it is usually back shortly.
    Shutdown,
    /// 2: the session ended (logout, device revocation or account deletion). Do not retry with
    /// the same session token: log in again.
    Revoked,
    /// 3: the server is at its memory budget. Reconnect after a pause (the server asks for 5 s
    /// in the `Unavailable` answer it sends first).
    Busy,
    /// 4: the client left a push unread for 10 s. Reconnect and fetch (the messages stay
    /// queued), and keep accepting push streams.
    SlowConsumer,
}

impl CloseCode {
    /// Every code, in wire order.
    pub const ALL: [CloseCode; 4] = [Self::Shutdown, Self::Revoked, Self::Busy, Self::SlowConsumer];

    /// The code's number on the wire.
    pub const fn as_u32(self) -> u32 {
        match self {
            Self::Shutdown => 1,
            Self::Revoked => 2,
            Self::Busy => 3,
            Self::SlowConsumer => 4,
        }
    }

    /// The code with this wire number; `None` for a number this version does not know.
    pub const fn from_u32(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Shutdown),
            2 => Some(Self::Revoked),
            3 => Some(Self::Busy),
            4 => Some(Self::SlowConsumer),
            _ => None,
        }
    }

    /// Like [`CloseCode::from_u32`] for a QUIC varint (up to 2^62 - 1), as QUIC stacks report
    /// close codes.
    pub const fn from_u64(code: u64) -> Option<Self> {
        if code > u32::MAX as u64 {
            return None;
        }
        Self::from_u32(code as u32)
    }

    /// A few words for a user: "server shutting down", "session revoked", ...
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Shutdown => "server shutting down",
            Self::Revoked => "session revoked",
            Self::Busy => "server busy",
            Self::SlowConsumer => "pushes not read",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

impl From<CloseCode> for u32 {
    fn from(code: CloseCode) -> Self {
        code.as_u32()
    }
}

impl From<CloseCode> for u64 {
    fn from(code: CloseCode) -> Self {
        u64::from(code.as_u32())
    }
}

/// A close code number that [`CloseCode`] does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown close code {0}")]
pub struct UnknownCloseCode(pub u64);

impl TryFrom<u32> for CloseCode {
    type Error = UnknownCloseCode;

    fn try_from(code: u32) -> Result<Self, Self::Error> {
        Self::from_u32(code).ok_or(UnknownCloseCode(u64::from(code)))
    }
}

impl TryFrom<u64> for CloseCode {
    type Error = UnknownCloseCode;

    fn try_from(code: u64) -> Result<Self, Self::Error> {
        Self::from_u64(code).ok_or(UnknownCloseCode(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_numbers_are_fixed() {
        let numbers: Vec<u32> = CloseCode::ALL.iter().map(|c| c.as_u32()).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
    }

    #[test]
    fn round_trips_and_refuses_unknown_numbers() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_u32(code.as_u32()), Some(code));
            assert_eq!(CloseCode::try_from(u64::from(code)), Ok(code));
            assert_eq!(CloseCode::try_from(u32::from(code)), Ok(code));
        }
        for unknown in [0u64, 5, 255, u64::from(u32::MAX), u64::from(u32::MAX) + 2, (1 << 62) - 1] {
            assert_eq!(CloseCode::from_u64(unknown), None, "{unknown}");
            assert_eq!(CloseCode::try_from(unknown), Err(UnknownCloseCode(unknown)));
        }
        assert_eq!(CloseCode::try_from(0u32), Err(UnknownCloseCode(0)));
    }

    #[test]
    fn display_is_for_people() {
        assert_eq!(CloseCode::Revoked.to_string(), "session revoked");
        assert_eq!(UnknownCloseCode(9).to_string(), "unknown close code 9");
    }
}
