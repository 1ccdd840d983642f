//! Sans-I/O frame codec. All integers are big-endian.
//!
//! ```text
//! request  (client -> server, bidi stream)  [method u16][request_id u32][len u32][protobuf]  10 B
//! response (server -> client, same stream)  [status u8][request_id u32][len u32][protobuf]   9 B
//! push     (server -> client, uni stream)   [event u16][len u32][protobuf]                   6 B
//! ```
//!
//! A transport reads the fixed-size header, decodes it with `*Header::decode` (which refuses a
//! length above [`MAX_PAYLOAD`] before any payload is read), then reads exactly `len` bytes.
//! The `decode_*` functions check a whole frame held in memory: the fuzz target and tests use
//! them, and they reject truncated frames and trailing bytes.

use crate::{MAX_PAYLOAD, Status};

/// Size of a request header.
pub const REQUEST_HEADER_LEN: usize = 10;
/// Size of a response header.
pub const RESPONSE_HEADER_LEN: usize = 9;
/// Size of a push header.
pub const PUSH_HEADER_LEN: usize = 6;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces (or the caller offers) a payload above the 4 MiB cap.
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced or offered payload length.
        len: u64,
        /// The cap, [`MAX_PAYLOAD`].
        max: u32,
    },
    /// Fewer bytes than the header or the announced payload need.
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// Bytes after the announced payload.
    #[error("{0} unexpected bytes after the frame")]
    TrailingBytes(usize),
    /// A response header with a status byte this protocol does not define.
    #[error("unknown status code {0}")]
    UnknownStatus(u8),
}

/// A request frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Method id, see [`crate::method`].
    pub method: u16,
    /// Client-chosen correlation id, echoed in the response.
    pub request_id: u32,
    /// Payload length in bytes.
    pub len: u32,
}

/// A response frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Outcome of the call.
    pub status: Status,
    /// The request's correlation id.
    pub request_id: u32,
    /// Payload length in bytes.
    pub len: u32,
}

/// A push frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushHeader {
    /// Push event id, see [`crate::method`] (`PUSH_*`).
    pub event: u16,
    /// Payload length in bytes.
    pub len: u32,
}

impl RequestHeader {
    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[..2].copy_from_slice(&self.method.to_be_bytes());
        out[2..6].copy_from_slice(&self.request_id.to_be_bytes());
        out[6..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Parses the first [`REQUEST_HEADER_LEN`] bytes of `buf` and checks the length cap.
    pub fn decode(buf: &[u8]) -> Result<Self, FrameError> {
        let b = header_bytes::<REQUEST_HEADER_LEN>(buf)?;
        let header = Self {
            method: u16::from_be_bytes([b[0], b[1]]),
            request_id: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
            len: u32::from_be_bytes([b[6], b[7], b[8], b[9]]),
        };
        check_len(header.len)?;
        Ok(header)
    }
}

impl ResponseHeader {
    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut out = [0u8; RESPONSE_HEADER_LEN];
        out[0] = self.status.as_u8();
        out[1..5].copy_from_slice(&self.request_id.to_be_bytes());
        out[5..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Parses the first [`RESPONSE_HEADER_LEN`] bytes of `buf`, checking the status byte and
    /// the length cap.
    pub fn decode(buf: &[u8]) -> Result<Self, FrameError> {
        let b = header_bytes::<RESPONSE_HEADER_LEN>(buf)?;
        let status = Status::from_u8(b[0]).ok_or(FrameError::UnknownStatus(b[0]))?;
        let header = Self {
            status,
            request_id: u32::from_be_bytes([b[1], b[2], b[3], b[4]]),
            len: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
        };
        check_len(header.len)?;
        Ok(header)
    }
}

impl PushHeader {
    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; PUSH_HEADER_LEN] {
        let mut out = [0u8; PUSH_HEADER_LEN];
        out[..2].copy_from_slice(&self.event.to_be_bytes());
        out[2..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Parses the first [`PUSH_HEADER_LEN`] bytes of `buf` and checks the length cap.
    pub fn decode(buf: &[u8]) -> Result<Self, FrameError> {
        let b = header_bytes::<PUSH_HEADER_LEN>(buf)?;
        let header = Self {
            event: u16::from_be_bytes([b[0], b[1]]),
            len: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
        };
        check_len(header.len)?;
        Ok(header)
    }
}

/// A whole request frame.
pub fn encode_request(method: u16, request_id: u32, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = payload_len(payload)?;
    Ok(join(&RequestHeader { method, request_id, len }.encode(), payload))
}

/// A whole response frame.
pub fn encode_response(
    status: Status,
    request_id: u32,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let len = payload_len(payload)?;
    Ok(join(&ResponseHeader { status, request_id, len }.encode(), payload))
}

/// A whole push frame.
pub fn encode_push(event: u16, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = payload_len(payload)?;
    Ok(join(&PushHeader { event, len }.encode(), payload))
}

/// Splits a complete request frame into header and payload.
pub fn decode_request(buf: &[u8]) -> Result<(RequestHeader, &[u8]), FrameError> {
    let header = RequestHeader::decode(buf)?;
    Ok((header, exact_payload(buf, REQUEST_HEADER_LEN, header.len)?))
}

/// Splits a complete response frame into header and payload.
pub fn decode_response(buf: &[u8]) -> Result<(ResponseHeader, &[u8]), FrameError> {
    let header = ResponseHeader::decode(buf)?;
    Ok((header, exact_payload(buf, RESPONSE_HEADER_LEN, header.len)?))
}

/// Splits a complete push frame into header and payload.
pub fn decode_push(buf: &[u8]) -> Result<(PushHeader, &[u8]), FrameError> {
    let header = PushHeader::decode(buf)?;
    Ok((header, exact_payload(buf, PUSH_HEADER_LEN, header.len)?))
}

fn header_bytes<const N: usize>(buf: &[u8]) -> Result<&[u8; N], FrameError> {
    buf.get(..N)
        .and_then(|b| b.try_into().ok())
        .ok_or(FrameError::Truncated { needed: N, have: buf.len() })
}

fn check_len(len: u32) -> Result<(), FrameError> {
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { len: u64::from(len), max: MAX_PAYLOAD });
    }
    Ok(())
}

fn payload_len(payload: &[u8]) -> Result<u32, FrameError> {
    match u32::try_from(payload.len()) {
        Ok(len) if len <= MAX_PAYLOAD => Ok(len),
        _ => Err(FrameError::TooLarge { len: payload.len() as u64, max: MAX_PAYLOAD }),
    }
}

fn exact_payload(buf: &[u8], header: usize, len: u32) -> Result<&[u8], FrameError> {
    let end = header + len as usize;
    if buf.len() < end {
        return Err(FrameError::Truncated { needed: end, have: buf.len() });
    }
    if buf.len() > end {
        return Err(FrameError::TrailingBytes(buf.len() - end));
    }
    Ok(&buf[header..end])
}

fn join(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + payload.len());
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests;
