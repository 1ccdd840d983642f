//! [`QpqProvider`]: the openmls provider of a qpq client.

use std::sync::Arc;

use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;

use super::storage::VaultStorage;
use crate::vault::Vault;

/// The openmls provider of a qpq client: RustCrypto for cryptography and randomness (it
/// implements the X-Wing ciphersuite), and the encrypted vault for storage.
#[derive(Debug)]
pub struct QpqProvider {
    crypto: RustCrypto,
    storage: VaultStorage,
}

impl QpqProvider {
    /// A provider that keeps its MLS state in `vault`.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { crypto: RustCrypto::default(), storage: VaultStorage::new(vault) }
    }

    /// The vault behind the storage; wrap MLS operations in [`Vault::atomic`] to commit them
    /// together with the application state they produce.
    pub fn vault(&self) -> &Arc<Vault> {
        self.storage.vault()
    }
}

impl OpenMlsProvider for QpqProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = VaultStorage;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}
