//! Users, devices, health and account deletion (methods 500-501, 700-702, 802, 950).

use qpq_proto::{Status, v1};

use super::{Conn, RpcError, RpcResult, key32, ok};
use crate::hub::Which;
use crate::store::now_ms;

pub(super) async fn resolve_user(ctx: &Conn, req: v1::ResolveUserRequest) -> RpcResult {
    let _me = ctx.principal()?;
    if req.username.len() > 64 {
        return Err(RpcError::new(Status::BadRequest, "username too long"));
    }
    match ctx.shared.store.login_record(&req.username)? {
        Some(r) => ok(v1::ResolveUserResponse { identity_key: r.identity.to_vec() }),
        None => Err(RpcError::new(Status::NotFound, "no such user")),
    }
}

pub(super) async fn resolve_identity(ctx: &Conn, req: v1::ResolveIdentityRequest) -> RpcResult {
    let _me = ctx.principal()?;
    let id = key32("identity_key", &req.identity_key)?;
    match ctx.shared.store.username_of(&id)? {
        Some(username) => ok(v1::ResolveIdentityResponse { username }),
        None => Err(RpcError::new(Status::NotFound, "no user has this identity key")),
    }
}

pub(super) async fn register_device(ctx: &Conn, req: v1::RegisterDeviceRequest) -> RpcResult {
    let me = ctx.principal()?;
    if req.device_id.is_empty() || req.device_id.len() > 16 {
        return Err(RpcError::new(Status::BadRequest, "device_id must be 1-16 bytes"));
    }
    if req.name.len() > 64 {
        return Err(RpcError::new(Status::BadRequest, "device name is longer than 64 bytes"));
    }
    let max = ctx.shared.config.limits.max_devices as usize;
    let added = ctx
        .shared
        .store
        .register_device(me.identity, req.device_id, req.name, max, now_ms())
        .await?;
    if !added {
        return Err(RpcError::new(Status::Forbidden, format!("at most {max} devices per account")));
    }
    ok(v1::RegisterDeviceResponse { success: true })
}

pub(super) async fn list_devices(ctx: &Conn, _req: v1::ListDevicesRequest) -> RpcResult {
    let me = ctx.principal()?;
    let devices = ctx
        .shared
        .store
        .devices(&me.identity)?
        .into_iter()
        .map(|(device_id, name, registered_at_ms)| v1::Device { device_id, name, registered_at_ms })
        .collect();
    ok(v1::ListDevicesResponse { devices })
}

pub(super) async fn revoke_device(ctx: &Conn, req: v1::RevokeDeviceRequest) -> RpcResult {
    let me = ctx.principal()?;
    let removed = ctx.shared.store.revoke_device(me.identity, req.device_id.clone()).await?;
    if !removed {
        return Err(RpcError::new(Status::NotFound, "no such device"));
    }
    ctx.shared.hub.disconnect(
        &me.identity,
        Which::Device(&req.device_id),
        Some(ctx.id),
        "device revoked",
    );
    if me.device_id == req.device_id {
        // The caller revoked the device it is using: its session is gone, so is its login.
        ctx.unbind();
    }
    ok(v1::RevokeDeviceResponse { success: true })
}

pub(super) async fn health(ctx: &Conn, _req: v1::HealthRequest) -> RpcResult {
    ok(v1::HealthResponse {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: ctx.shared.started.elapsed().as_secs(),
        registration: ctx.shared.config.registration.as_str().into(),
    })
}

pub(super) async fn delete_account(ctx: &Conn, _req: v1::DeleteAccountRequest) -> RpcResult {
    let me = ctx.principal()?;
    ctx.shared.store.delete_account(me.identity).await?;
    ctx.unbind();
    ctx.shared.hub.disconnect(&me.identity, Which::All, Some(ctx.id), "account deleted");
    tracing::info!(username = %me.username, "account deleted");
    ok(v1::DeleteAccountResponse { success: true })
}
