//! Newtypes for the ids the client passes around, so that a group id given where an account
//! key is wanted (or the other way round) is a compile error, not a silent mismatch.
//!
//! Each is `#[serde(transparent)]`: stored and sent exactly as the bare bytes were before
//! (records of earlier versions decode unchanged). Each dereferences to its bytes, for the
//! code that only reads them (hex, keys of the store, protobuf fields).

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::identity::hex;

/// An MLS group's id, which is also its conversation's id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct GroupId(Vec<u8>);

/// An account's identity key (Ed25519 public key): who a member or a sender is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct IdentityKey([u8; 32]);

/// A message's id: random, chosen by its sender, the same in every member's history.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct MessageId([u8; 16]);

impl GroupId {
    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The id's bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The first bytes in hex: how a group is told apart in lists and messages.
    pub fn short(&self) -> String {
        hex(&self.0[..self.0.len().min(4)])
    }
}

impl IdentityKey {
    /// The key's bytes.
    pub const fn to_bytes(self) -> [u8; 32] {
        self.0
    }

    /// A key from bytes of any length: `None` unless exactly 32.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The first six bytes in hex: a stand-in name for an account whose username is unknown.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }
}

impl MessageId {
    /// The id's bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// An id from bytes of any length: `None` unless exactly 16.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// A fresh random id.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        Self(id)
    }
}

macro_rules! bytes_newtype {
    ($name:ident, $inner:ty, $target:ty) => {
        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }

        impl From<$name> for $inner {
            fn from(v: $name) -> Self {
                v.0
            }
        }

        impl Deref for $name {
            type Target = $target;
            fn deref(&self) -> &$target {
                &self.0
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0[..]
            }
        }

        impl PartialEq<$inner> for $name {
            fn eq(&self, other: &$inner) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for $inner {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), hex(&self.0[..]))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex(&self.0[..]))
            }
        }
    };
}

bytes_newtype!(GroupId, Vec<u8>, [u8]);
bytes_newtype!(IdentityKey, [u8; 32], [u8; 32]);
bytes_newtype!(MessageId, [u8; 16], [u8; 16]);

impl From<&[u8]> for GroupId {
    fn from(v: &[u8]) -> Self {
        Self(v.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_forms_are_the_bare_bytes() {
        let g = GroupId::from(vec![1, 2, 3]);
        assert_eq!(serde_json::to_string(&g).unwrap(), "[1,2,3]");
        let k = IdentityKey::from([7u8; 32]);
        assert_eq!(serde_json::to_vec(&k).unwrap(), serde_json::to_vec(&[7u8; 32]).unwrap());
        let m = MessageId::from([9u8; 16]);
        let back: MessageId =
            serde_json::from_slice(&serde_json::to_vec(&[9u8; 16]).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(IdentityKey::from_slice(&[0; 31]), None);
        assert_eq!(
            format!("{:?}", MessageId::from([0xab; 16])),
            format!("MessageId({})", "ab".repeat(16))
        );
    }
}
