//! The message content model sealed inside MLS application messages, with length padding.
//!
//! `qpq_proto::v1::Content` is the wire form; [`Body`] is what the rest of the client uses.

use prost::Message as _;
use qpq_proto::v1;

use crate::ids::MessageId;

/// Largest encoded content (before MLS framing); well below the 4 MiB frame cap.
pub const MAX_CONTENT: usize = 256 * 1024;

/// A message's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    /// Text, optionally replying to another message.
    Text {
        /// The text.
        body: String,
        /// Message id replied to.
        reply_to: Option<MessageId>,
    },
    /// A reaction to a message (or its removal).
    Reaction {
        /// Message id reacted to.
        target: MessageId,
        /// The emoji.
        emoji: String,
        /// Whether this takes the reaction back.
        remove: bool,
    },
    /// A new text for one of the sender's messages.
    Edit {
        /// Message id edited.
        target: MessageId,
        /// New text.
        body: String,
    },
    /// Deletes one of the sender's messages.
    Delete {
        /// Message id deleted.
        target: MessageId,
    },
    /// Everything up to `up_to` was read.
    Receipt {
        /// Last message id read.
        up_to: MessageId,
    },
    /// Typing started or stopped.
    Typing {
        /// Whether typing.
        active: bool,
    },
    /// A file to download.
    File(FileOffer),
    /// Group name and topic.
    Meta {
        /// Name.
        name: String,
        /// Topic.
        topic: String,
    },
}

/// An encrypted file stored on the server (also what history keeps of a file message).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileOffer {
    /// Blob id: SHA-256 of the ciphertext.
    pub blob_id: [u8; 32],
    /// Plaintext size.
    pub size: u64,
    /// Ciphertext size.
    pub ciphertext_size: u64,
    /// File name (no directories).
    pub name: String,
    /// Media type.
    pub media_type: String,
    /// Content key (ChaCha20-Poly1305).
    pub key: [u8; 32],
    /// SHA-256 of the plaintext.
    pub sha256: [u8; 32],
}

/// A message: id, sender time and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Random id chosen by the sender.
    pub message_id: MessageId,
    /// Sender clock, ms.
    pub sent_at_ms: u64,
    /// What it says.
    pub body: Body,
}

/// Content that did not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// Not a protobuf `Content`, or a field has the wrong size.
    #[error("malformed message content: {0}")]
    Malformed(String),
    /// Too large.
    #[error("message content larger than {MAX_CONTENT} bytes")]
    TooLarge,
}

impl Content {
    /// A new message with a random id.
    pub fn new(body: Body, now_ms: u64) -> Self {
        Self { message_id: MessageId::random(), sent_at_ms: now_ms, body }
    }

    /// Encodes and pads to the next size bucket: the protobuf bytes, a 0x80 marker, then
    /// zeros (ISO/IEC 7816-4 padding), so every message of a bucket has the same length.
    pub fn encode(&self) -> Result<Vec<u8>, ContentError> {
        let mut out = self.to_wire().encode_to_vec();
        let target = bucket(out.len() + 1);
        if target > MAX_CONTENT {
            return Err(ContentError::TooLarge);
        }
        out.push(0x80);
        out.resize(target, 0);
        Ok(out)
    }

    /// Strips the padding and decodes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ContentError> {
        if bytes.len() > MAX_CONTENT {
            return Err(ContentError::TooLarge);
        }
        let end = bytes
            .iter()
            .rposition(|b| *b != 0)
            .ok_or_else(|| ContentError::Malformed("all padding".into()))?;
        if bytes[end] != 0x80 {
            return Err(ContentError::Malformed("bad padding".into()));
        }
        let m = v1::Content::decode(&bytes[..end])
            .map_err(|e| ContentError::Malformed(e.to_string()))?;
        Self::from_wire(m)
    }

    fn to_wire(&self) -> v1::Content {
        use v1::content::Body as W;
        let body = match &self.body {
            Body::Text { body, reply_to } => W::Text(v1::Text {
                body: body.clone(),
                reply_to: reply_to.map(|r| r.to_vec()).unwrap_or_default(),
            }),
            Body::Reaction { target, emoji, remove } => W::Reaction(v1::Reaction {
                target: target.to_vec(),
                emoji: emoji.clone(),
                remove: *remove,
            }),
            Body::Edit { target, body } => {
                W::Edit(v1::Edit { target: target.to_vec(), body: body.clone() })
            }
            Body::Delete { target } => W::Delete(v1::Delete { target: target.to_vec() }),
            Body::Receipt { up_to } => W::Receipt(v1::ReadReceipt { up_to: up_to.to_vec() }),
            Body::Typing { active } => W::Typing(v1::Typing { active: *active }),
            Body::File(f) => W::File(v1::FileOffer {
                blob_id: f.blob_id.to_vec(),
                size: f.size,
                name: f.name.clone(),
                media_type: f.media_type.clone(),
                key: f.key.to_vec(),
                sha256: f.sha256.to_vec(),
                ciphertext_size: f.ciphertext_size,
            }),
            Body::Meta { name, topic } => {
                W::Meta(v1::GroupMeta { name: name.clone(), topic: topic.clone() })
            }
        };
        v1::Content {
            message_id: self.message_id.to_vec(),
            sent_at_ms: self.sent_at_ms,
            body: Some(body),
        }
    }

    fn from_wire(m: v1::Content) -> Result<Self, ContentError> {
        use v1::content::Body as W;
        let id16 = |b: &[u8], what: &str| -> Result<MessageId, ContentError> {
            MessageId::from_slice(b)
                .ok_or_else(|| ContentError::Malformed(format!("{what} must be 16 bytes")))
        };
        let id32 = |b: &[u8], what: &str| -> Result<[u8; 32], ContentError> {
            b.try_into().map_err(|_| ContentError::Malformed(format!("{what} must be 32 bytes")))
        };
        let body = match m.body.ok_or_else(|| ContentError::Malformed("no body".into()))? {
            W::Text(t) => Body::Text {
                body: t.body,
                reply_to: if t.reply_to.is_empty() {
                    None
                } else {
                    Some(id16(&t.reply_to, "reply_to")?)
                },
            },
            W::Reaction(r) => Body::Reaction {
                target: id16(&r.target, "target")?,
                emoji: r.emoji,
                remove: r.remove,
            },
            W::Edit(e) => Body::Edit { target: id16(&e.target, "target")?, body: e.body },
            W::Delete(d) => Body::Delete { target: id16(&d.target, "target")? },
            W::Receipt(r) => Body::Receipt { up_to: id16(&r.up_to, "up_to")? },
            W::Typing(t) => Body::Typing { active: t.active },
            W::File(f) => Body::File(FileOffer {
                blob_id: id32(&f.blob_id, "blob_id")?,
                size: f.size,
                ciphertext_size: f.ciphertext_size,
                name: f.name,
                media_type: f.media_type,
                key: id32(&f.key, "key")?,
                sha256: id32(&f.sha256, "sha256")?,
            }),
            W::Meta(g) => Body::Meta { name: g.name, topic: g.topic },
        };
        Ok(Self { message_id: id16(&m.message_id, "message_id")?, sent_at_ms: m.sent_at_ms, body })
    }
}

/// Padded sizes: powers of two from 128 bytes to 4 KiB, then multiples of 4 KiB.
pub fn bucket(len: usize) -> usize {
    if len <= 128 {
        128
    } else if len <= 4096 {
        len.next_power_of_two()
    } else {
        len.div_ceil(4096) * 4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_round_trips_and_sizes_are_bucketed() {
        let bodies = vec![
            Body::Text { body: "hi".into(), reply_to: Some([3; 16].into()) },
            Body::Text { body: "x".repeat(300), reply_to: None },
            Body::Reaction { target: [1; 16].into(), emoji: "👍".into(), remove: false },
            Body::Edit { target: [1; 16].into(), body: "fixed".into() },
            Body::Delete { target: [2; 16].into() },
            Body::Receipt { up_to: [4; 16].into() },
            Body::Typing { active: true },
            Body::File(FileOffer {
                blob_id: [5; 32],
                size: 10,
                ciphertext_size: 26,
                name: "a.txt".into(),
                media_type: "text/plain".into(),
                key: [6; 32],
                sha256: [7; 32],
            }),
            Body::Meta { name: "team".into(), topic: "launch".into() },
        ];
        for body in bodies {
            let c = Content::new(body, 42);
            let bytes = c.encode().unwrap();
            assert_eq!(bytes.len(), bucket(bytes.len()), "{:?} -> {}", c.body, bytes.len());
            assert_eq!(Content::decode(&bytes).unwrap(), c);
        }
        // Short texts of different lengths are indistinguishable by size.
        let a =
            Content::new(Body::Text { body: "yes".into(), reply_to: None }, 1).encode().unwrap();
        let b = Content::new(Body::Text { body: "no, absolutely not".into(), reply_to: None }, 1)
            .encode()
            .unwrap();
        assert_eq!(a.len(), b.len());
    }

    #[test]
    fn bad_content_is_an_error_not_a_panic() {
        assert!(Content::decode(b"\xff\xff\xff").is_err());
        assert!(Content::decode(&[0, 0, 0]).is_err());
        let mut no_body =
            v1::Content { message_id: vec![1; 16], ..Default::default() }.encode_to_vec();
        no_body.push(0x80);
        assert!(Content::decode(&no_body).is_err());
        let short_id = v1::Content {
            message_id: vec![1; 3],
            body: Some(v1::content::Body::Typing(v1::Typing { active: true })),
            ..Default::default()
        };
        let mut short_id = short_id.encode_to_vec();
        short_id.push(0x80);
        assert!(Content::decode(&short_id).is_err());
        let big = Content::new(Body::Text { body: "x".repeat(MAX_CONTENT), reply_to: None }, 0);
        assert!(matches!(big.encode(), Err(ContentError::TooLarge)));
    }
}
