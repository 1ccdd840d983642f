//! MLS on openmls: the provider a client hands to openmls, with its state in the vault.
//!
//! [`QpqProvider`] pairs RustCrypto (which implements the X-Wing ciphersuite
//! `MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519`) with [`VaultStorage`], openmls's storage
//! trait over [`Space::Mls`](crate::vault::Space::Mls) of the encrypted vault.

mod group;
mod provider;
mod storage;

pub use group::{
    CIPHERSUITE, GroupError, GroupPolicy, Incoming, Kind, MemberInfo, Mls, Outgoing,
    QPQ_GROUP_EXTENSION,
};
pub use provider::QpqProvider;
pub use storage::{StorageError, VaultStorage};
