//! KeyPackages and hybrid keys (methods 300-305).

use qpq_proto::{Status, method, v1};
use sha2::{Digest, Sha256};

use super::delivery::push_frame;
use super::{Conn, RpcError, RpcResult, key32, ok};

/// Size of a hybrid public key: X25519 (32) || ML-KEM-768 encapsulation key (1184).
pub const HYBRID_KEY_LEN: usize = 32 + 1184;

pub(super) async fn upload_key_package(ctx: &Conn, req: v1::UploadKeyPackageRequest) -> RpcResult {
    let me = ctx.principal()?;
    own_key(&me.identity, &req.identity_key)?;
    let l = &ctx.shared.config.limits;
    if req.package.is_empty() {
        return Err(RpcError::new(Status::BadRequest, "empty KeyPackage"));
    }
    if req.package.len() > l.max_key_package_bytes as usize {
        return Err(RpcError::new(Status::PayloadTooLarge, "KeyPackage too large"));
    }
    match ciphersuite(&req.package) {
        Some(cs) if l.key_package_ciphersuites.contains(&cs) => {}
        Some(cs) => {
            return Err(RpcError::new(
                Status::BadRequest,
                format!("KeyPackage ciphersuite 0x{cs:04X} is not accepted by this server"),
            ));
        }
        None => return Err(RpcError::new(Status::BadRequest, "not an MLS 1.0 KeyPackage")),
    }
    let fingerprint = Sha256::digest(&req.package).to_vec();
    match ctx.shared.store.upload_key_package(me.identity, req.package, l.max_key_packages).await? {
        Some(stock) => ok(v1::UploadKeyPackageResponse { fingerprint, stock }),
        None => Err(RpcError::new(
            Status::Conflict,
            format!("KeyPackage stock is full ({} packages)", l.max_key_packages),
        )),
    }
}

pub(super) async fn fetch_key_package(ctx: &Conn, req: v1::FetchKeyPackageRequest) -> RpcResult {
    let _me = ctx.principal()?;
    let owner = key32("identity_key", &req.identity_key)?;
    let pop = ctx.shared.store.pop_key_package(owner).await?;
    let low = ctx.shared.config.limits.key_package_low_water;
    if pop.package.is_some() && pop.remaining < low {
        let msg = v1::KeyPackagesLow { stock: pop.remaining, low_water: low };
        if let Ok(frame) = push_frame(method::PUSH_KEY_PACKAGES_LOW, &msg) {
            ctx.shared.hub.push(&owner, &frame, None);
        }
    }
    ok(v1::FetchKeyPackageResponse { package: pop.package.unwrap_or_default() })
}

pub(super) async fn stock(ctx: &Conn, _req: v1::KeyPackageStockRequest) -> RpcResult {
    let me = ctx.principal()?;
    let stock = ctx.shared.store.key_package_stock(&me.identity)?;
    ok(v1::KeyPackageStockResponse {
        stock,
        low_water: ctx.shared.config.limits.key_package_low_water,
    })
}

pub(super) async fn upload_hybrid_key(ctx: &Conn, req: v1::UploadHybridKeyRequest) -> RpcResult {
    let me = ctx.principal()?;
    own_key(&me.identity, &req.identity_key)?;
    if req.hybrid_public_key.len() != HYBRID_KEY_LEN {
        return Err(RpcError::new(
            Status::BadRequest,
            format!("hybrid public key must be {HYBRID_KEY_LEN} bytes"),
        ));
    }
    ctx.shared.store.set_hybrid_key(me.identity, req.hybrid_public_key).await?;
    ok(v1::UploadHybridKeyResponse {})
}

pub(super) async fn fetch_hybrid_key(ctx: &Conn, req: v1::FetchHybridKeyRequest) -> RpcResult {
    let _me = ctx.principal()?;
    let id = key32("identity_key", &req.identity_key)?;
    let key = ctx.shared.store.hybrid_key(&id)?.unwrap_or_default();
    ok(v1::FetchHybridKeyResponse { hybrid_public_key: key })
}

pub(super) async fn fetch_hybrid_keys(ctx: &Conn, req: v1::FetchHybridKeysRequest) -> RpcResult {
    let _me = ctx.principal()?;
    let max = ctx.shared.config.limits.max_batch_recipients as usize;
    if req.identity_keys.len() > max {
        return Err(RpcError::new(
            Status::PayloadTooLarge,
            format!("more than {max} identity keys"),
        ));
    }
    let mut keys = Vec::with_capacity(req.identity_keys.len());
    for k in &req.identity_keys {
        let id = key32("identity_keys[]", k)?;
        keys.push(ctx.shared.store.hybrid_key(&id)?.unwrap_or_default());
    }
    ok(v1::FetchHybridKeysResponse { keys })
}

/// The identity field of an upload must be empty (meaning the caller) or the caller's key.
fn own_key(me: &[u8; 32], field: &[u8]) -> Result<(), RpcError> {
    if field.is_empty() || field == me {
        Ok(())
    } else {
        Err(RpcError::new(Status::Forbidden, "you can only upload your own keys"))
    }
}

/// The ciphersuite of a TLS-serialized MLS 1.0 KeyPackage, bare or wrapped in an MLSMessage.
pub fn ciphersuite(kp: &[u8]) -> Option<u16> {
    // MLSMessage { version = mls10 (1), wire_format = mls_key_package (5), KeyPackage }
    let body = match kp {
        [0, 1, 0, 5, rest @ ..] if rest.starts_with(&[0, 1]) => rest,
        _ => kp,
    };
    match body {
        [0, 1, a, b, _, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::ciphersuite;

    #[test]
    fn ciphersuite_of_bare_and_wrapped_packages() {
        assert_eq!(ciphersuite(&[0, 1, 0xF0, 0x01, 9, 9]), Some(0xF001));
        assert_eq!(ciphersuite(&[0, 1, 0, 5, 0, 1, 0x00, 0x01, 9]), Some(1));
        assert_eq!(ciphersuite(&[0, 2, 0, 1, 9]), None);
        assert_eq!(ciphersuite(&[0, 1]), None);
        assert_eq!(ciphersuite(&[]), None);
    }
}
