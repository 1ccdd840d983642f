//! KeyPackages and hybrid keys (methods 300-305).

use std::time::Instant;

use qpq_core::keypackage::{self, KeyPackageError};
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
    check_key_package(&req.package, &me.identity, &l.key_package_ciphersuites)?;
    let fingerprint = Sha256::digest(&req.package).to_vec();
    if req.last_resort {
        ctx.shared.store.set_last_resort_key_package(me.identity, req.package).await?;
        let stock = ctx.shared.store.key_package_stock(&me.identity)?;
        return ok(v1::UploadKeyPackageResponse { fingerprint, stock });
    }
    match ctx.shared.store.upload_key_package(me.identity, req.package, l.max_key_packages).await? {
        Some(stock) => ok(v1::UploadKeyPackageResponse { fingerprint, stock }),
        None => Err(RpcError::new(
            Status::Conflict,
            format!("KeyPackage stock is full ({} packages)", l.max_key_packages),
        )),
    }
}

/// Refuses a KeyPackage that does not parse, is of a ciphersuite not on the allowlist, is not
/// signed by its own leaf, or whose credential does not bind it to the uploader's account.
fn check_key_package(package: &[u8], me: &[u8; 32], suites: &[u16]) -> Result<(), RpcError> {
    let refused = |e: KeyPackageError| {
        let status = match e {
            KeyPackageError::TooLarge { .. } => Status::PayloadTooLarge,
            _ => Status::BadRequest,
        };
        RpcError::new(status, format!("KeyPackage refused: {e}"))
    };
    let kp = keypackage::parse(package).map_err(refused)?;
    if !suites.contains(&kp.cipher_suite) {
        return Err(RpcError::new(
            Status::BadRequest,
            format!(
                "KeyPackage refused: ciphersuite 0x{:04X} is not accepted by this server",
                kp.cipher_suite
            ),
        ));
    }
    let binding = kp.verify().map_err(refused)?;
    if binding.account != *me {
        return Err(RpcError::new(
            Status::BadRequest,
            format!(
                "KeyPackage refused: its credential belongs to account {}..., not to yours",
                &crate::store::hex(&binding.account)[..16]
            ),
        ));
    }
    Ok(())
}

pub(super) async fn fetch_key_package(ctx: &Conn, req: v1::FetchKeyPackageRequest) -> RpcResult {
    let me = ctx.principal()?;
    let owner = key32("identity_key", &req.identity_key)?;
    limit_fetch(ctx, &me.identity, &owner)?;
    let pop = ctx.shared.store.pop_key_package(owner).await?;
    let low = ctx.shared.config.limits.key_package_low_water;
    if pop.package.is_some() && pop.remaining < low {
        let msg = v1::KeyPackagesLow { stock: pop.remaining, low_water: low };
        if let Ok(frame) = push_frame(method::PUSH_KEY_PACKAGES_LOW, &msg) {
            ctx.shared.hub.push(&owner, &frame, None);
        }
    }
    ok(v1::FetchKeyPackageResponse {
        package: pop.package.unwrap_or_default(),
        last_resort: pop.last_resort,
    })
}

/// Takes a token from the requester's and the target's fetch buckets, or neither.
fn limit_fetch(ctx: &Conn, me: &[u8; 32], owner: &[u8; 32]) -> Result<(), RpcError> {
    let now = Instant::now();
    let (by_user, by_target) =
        (&ctx.shared.key_package_fetch_per_user, &ctx.shared.key_package_fetch_per_target);
    let user = |after| {
        RpcError::retry(Status::RateLimited, "too many KeyPackage fetches from your account", after)
    };
    let target = |after| {
        RpcError::retry(
            Status::RateLimited,
            "too many KeyPackage fetches of this user's packages",
            after,
        )
    };
    by_user.allowed(me, now).map_err(user)?;
    by_target.allowed(owner, now).map_err(target)?;
    by_user.check(me, now).map_err(user)?;
    by_target.check(owner, now).map_err(target)
}

pub(super) async fn stock(ctx: &Conn, _req: v1::KeyPackageStockRequest) -> RpcResult {
    let me = ctx.principal()?;
    let stock = ctx.shared.store.key_package_stock(&me.identity)?;
    ok(v1::KeyPackageStockResponse {
        stock,
        low_water: ctx.shared.config.limits.key_package_low_water,
        last_resort: ctx.shared.store.has_fresh_last_resort(&me.identity)?,
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
