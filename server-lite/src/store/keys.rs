//! KeyPackages (single-use, FIFO per identity) and hybrid public keys (one per identity).

use redb::ReadableTable;

use super::tables::*;
use super::{Store, StoreError};

/// Result of [`Store::pop_key_package`].
#[derive(Debug)]
pub struct KeyPackagePop {
    /// The oldest package, now deleted from the server; `None` when the stock is empty.
    pub package: Option<Vec<u8>>,
    /// Packages left after this pop.
    pub remaining: u32,
}

impl Store {
    /// Appends a KeyPackage; returns the new stock, or `None` if the stock is at `max`.
    pub async fn upload_key_package(
        &self,
        identity: [u8; 32],
        package: Vec<u8>,
        max: u32,
    ) -> Result<Option<u32>, StoreError> {
        self.write(move |txn| {
            let mut kps = txn.open_table(KEY_PACKAGES)?;
            let id = identity.as_slice();
            let stock = kps.range((id, 0u64)..=(id, u64::MAX))?.count() as u32;
            if stock >= max {
                return Ok(None);
            }
            let mut next = txn.open_table(KEY_PACKAGE_NEXT)?;
            let n = next.get(id)?.map_or(0, |v| v.value());
            next.insert(id, n + 1)?;
            kps.insert((id, n), package.as_slice())?;
            Ok(Some(stock + 1))
        })
        .await
    }

    /// Removes and returns the oldest KeyPackage of `identity` (atomic pop).
    pub async fn pop_key_package(&self, identity: [u8; 32]) -> Result<KeyPackagePop, StoreError> {
        self.write(move |txn| {
            let mut kps = txn.open_table(KEY_PACKAGES)?;
            let id = identity.as_slice();
            let first = match kps.range((id, 0u64)..=(id, u64::MAX))?.next() {
                Some(row) => {
                    let (k, v) = row?;
                    Some((k.value().1, v.value().to_vec()))
                }
                None => None,
            };
            let Some((n, package)) = first else {
                return Ok(KeyPackagePop { package: None, remaining: 0 });
            };
            kps.remove((id, n))?;
            let remaining = kps.range((id, 0u64)..=(id, u64::MAX))?.count() as u32;
            Ok(KeyPackagePop { package: Some(package), remaining })
        })
        .await
    }

    /// KeyPackages held for `identity`.
    pub fn key_package_stock(&self, identity: &[u8; 32]) -> Result<u32, StoreError> {
        let t = self.read()?.open_table(KEY_PACKAGES)?;
        let id = identity.as_slice();
        Ok(t.range((id, 0u64)..=(id, u64::MAX))?.count() as u32)
    }

    /// Sets (overwrites) the hybrid public key of `identity`.
    pub async fn set_hybrid_key(&self, identity: [u8; 32], key: Vec<u8>) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.open_table(HYBRID_KEYS)?.insert(identity.as_slice(), key.as_slice())?;
            Ok(())
        })
        .await
    }

    /// The hybrid public key of `identity`.
    pub fn hybrid_key(&self, identity: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.read()?.open_table(HYBRID_KEYS)?;
        Ok(t.get(identity)?.map(|v| v.value().to_vec()))
    }
}
