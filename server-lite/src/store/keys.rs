//! KeyPackages (single-use, FIFO per identity, plus one last-resort package each) and hybrid
//! public keys (one per identity).

use redb::ReadableTable;

use super::records::LastResort;
use super::tables::*;
use super::{Store, StoreError};

/// Result of [`Store::pop_key_package`].
#[derive(Debug)]
pub struct KeyPackagePop {
    /// The oldest package, now deleted from the server; when the stock is empty, the
    /// last-resort package (kept); `None` when there is neither.
    pub package: Option<Vec<u8>>,
    /// The package is the owner's last resort.
    pub last_resort: bool,
    /// Packages left after this pop (the last resort not counted).
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
                // The stock is empty: hand out the last resort, and keep it. Mark it handed
                // out (one write the first time only) so its owner learns to replace it.
                let mut lr = txn.open_table(LAST_RESORT)?;
                let found = lr.get(id)?.map(|v| LastResort::decode(v.value())).transpose()?;
                let Some(mut last) = found else {
                    return Ok(KeyPackagePop { package: None, last_resort: false, remaining: 0 });
                };
                if !last.handed_out {
                    last.handed_out = true;
                    lr.insert(id, last.encode().as_slice())?;
                }
                return Ok(KeyPackagePop {
                    package: Some(last.package),
                    last_resort: true,
                    remaining: 0,
                });
            };
            kps.remove((id, n))?;
            let remaining = kps.range((id, 0u64)..=(id, u64::MAX))?.count() as u32;
            Ok(KeyPackagePop { package: Some(package), last_resort: false, remaining })
        })
        .await
    }

    /// Stores `package` as the last resort of `identity`, replacing any earlier one.
    pub async fn set_last_resort_key_package(
        &self,
        identity: [u8; 32],
        package: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.write(move |txn| {
            let last = LastResort { handed_out: false, package };
            txn.open_table(LAST_RESORT)?.insert(identity.as_slice(), last.encode().as_slice())?;
            Ok(())
        })
        .await
    }

    /// Whether `identity` has a last-resort package that has not been handed out since its
    /// upload.
    pub fn has_fresh_last_resort(&self, identity: &[u8; 32]) -> Result<bool, StoreError> {
        let t = self.read()?.open_table(LAST_RESORT)?;
        let found = t.get(identity.as_slice())?.map(|v| LastResort::decode(v.value()));
        Ok(found.transpose()?.is_some_and(|l| !l.handed_out))
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
