//! OPAQUE registration and login, Resume and Logout (methods 100-105).
//!
//! Login state lives on the connection between LoginStart and LoginFinish, and a successful
//! finish binds the connection. An unknown username gets a login response built from a dummy
//! record, indistinguishable from a real one; the failure shows only at LoginFinish, exactly as
//! for a wrong password.

use std::time::Instant;

use opaque_ke::{
    CredentialFinalization, CredentialRequest, RegistrationRequest, RegistrationUpload,
    ServerLogin, ServerLoginParameters, ServerRegistration,
};
use qpq_core::opaque::Suite;
use qpq_proto::{Status, v1};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{Bound, Conn, RpcError, RpcResult, key32, lock, ok};
use crate::config::Registration;
use crate::hub::Which;
use crate::store::{RegisterOutcome, ResumeOutcome, SessionInfo, now_ms};

/// Longest username.
pub const MAX_USERNAME: usize = 32;
/// Longest device id.
pub const MAX_DEVICE_ID: usize = 16;

pub(super) async fn register_start(ctx: &Conn, req: v1::OpaqueRegisterStartRequest) -> RpcResult {
    limit_ip(ctx)?;
    check_username(&req.username)?;
    check_policy(ctx, &req.invite_code)?;
    let request = RegistrationRequest::<Suite>::deserialize(&req.request)
        .map_err(|_| RpcError::bad("malformed OPAQUE registration request"))?;
    let start =
        ServerRegistration::<Suite>::start(&ctx.shared.opaque, request, req.username.as_bytes())
            .map_err(|_| RpcError::bad("OPAQUE registration start failed"))?;
    ok(v1::OpaqueRegisterStartResponse { response: start.message.serialize().to_vec() })
}

pub(super) async fn register_finish(ctx: &Conn, req: v1::OpaqueRegisterFinishRequest) -> RpcResult {
    limit_ip(ctx)?;
    check_username(&req.username)?;
    let invite = check_policy(ctx, &req.invite_code)?;
    let identity = key32("identity_key", &req.identity_key)?;
    let upload = RegistrationUpload::<Suite>::deserialize(&req.upload)
        .map_err(|_| RpcError::bad("malformed OPAQUE registration upload"))?;
    let record = ServerRegistration::<Suite>::finish(upload).serialize().to_vec();
    let outcome =
        ctx.shared.store.register(req.username.clone(), identity, record, invite, now_ms()).await?;
    match outcome {
        RegisterOutcome::Created => {
            tracing::info!(username = %req.username, "user registered");
            ok(v1::OpaqueRegisterFinishResponse { success: true })
        }
        RegisterOutcome::UsernameTaken => Err(RpcError::new(Status::Conflict, "username is taken")),
        RegisterOutcome::IdentityTaken => {
            Err(RpcError::new(Status::Conflict, "identity key is already registered"))
        }
        RegisterOutcome::InviteInvalid => {
            Err(RpcError::new(Status::Forbidden, "invite code is unknown, used up or expired"))
        }
    }
}

pub(super) async fn login_start(ctx: &Conn, req: v1::OpaqueLoginStartRequest) -> RpcResult {
    limit_ip(ctx)?;
    check_username(&req.username)?;
    limit_user(ctx, &req.username)?;
    let request = CredentialRequest::<Suite>::deserialize(&req.request)
        .map_err(|_| RpcError::bad("malformed OPAQUE credential request"))?;
    let password_file = match ctx.shared.store.login_record(&req.username)? {
        Some(r) => Some(
            ServerRegistration::<Suite>::deserialize(&r.opaque_record)
                .map_err(|_| RpcError::new(Status::Internal, "stored password file is corrupt"))?,
        ),
        None => None,
    };
    let start = ServerLogin::start(
        &mut rand::rngs::OsRng,
        &ctx.shared.opaque,
        password_file,
        request,
        req.username.as_bytes(),
        ServerLoginParameters::default(),
    )
    .map_err(|_| RpcError::bad("OPAQUE login start failed"))?;
    *lock(&ctx.pending_login) = Some((req.username, start.state));
    ok(v1::OpaqueLoginStartResponse { response: start.message.serialize().to_vec() })
}

pub(super) async fn login_finish(ctx: &Conn, req: v1::OpaqueLoginFinishRequest) -> RpcResult {
    limit_ip(ctx)?;
    if req.device_id.len() > MAX_DEVICE_ID {
        return Err(RpcError::bad("device_id is longer than 16 bytes"));
    }
    let identity = key32("identity_key", &req.identity_key)?;
    let (username, state) = lock(&ctx.pending_login).take().ok_or_else(|| {
        RpcError::new(Status::BadRequest, "no login in progress on this connection")
    })?;
    if username != req.username {
        return Err(RpcError::bad("username differs from the one given at login start"));
    }
    let denied = || RpcError::new(Status::Unauthorized, "wrong username or password");
    let finalization = CredentialFinalization::<Suite>::deserialize(&req.finalization)
        .map_err(|_| RpcError::bad("malformed OPAQUE finalization"))?;
    state.finish(finalization, ServerLoginParameters::default()).map_err(|_| denied())?;
    // The password was right, so the user exists (a dummy record cannot verify).
    let record = ctx.shared.store.login_record(&username)?.ok_or_else(denied)?;
    if record.identity != identity {
        return Err(RpcError::new(Status::Unauthorized, "identity key does not match the account"));
    }
    let mut token = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut token);
    let hash: [u8; 32] = Sha256::digest(token).into();
    let info = SessionInfo {
        identity,
        username: username.clone(),
        device_id: req.device_id.clone(),
        last_used_ms: now_ms(),
    };
    ctx.shared.store.create_session(hash, info, now_ms()).await?;
    ctx.bind(Bound {
        identity,
        username: username.clone(),
        device_id: req.device_id,
        session: hash,
    });
    tracing::info!(%username, "logged in");
    ok(v1::OpaqueLoginFinishResponse {
        session_token: token.to_vec(),
        expires_at_ms: now_ms().saturating_add(session_idle_ms(ctx)),
    })
}

pub(super) async fn resume(ctx: &Conn, req: v1::ResumeRequest) -> RpcResult {
    // A valid token costs nothing against the address's auth budget (every reconnect resumes,
    // and a household shares one address); each failed attempt does, so guessing is bounded.
    ctx.shared.auth_per_ip.allowed(&ctx.ip, Instant::now()).map_err(|after| {
        RpcError::retry(
            Status::RateLimited,
            "too many failed authentication attempts from this address",
            after,
        )
    })?;
    let result = resume_checked(ctx, req).await;
    if result
        .as_ref()
        .is_err_and(|e| e.status == Status::Unauthorized || e.status == Status::BadRequest)
    {
        let _ = ctx.shared.auth_per_ip.check(&ctx.ip, Instant::now());
    }
    result
}

async fn resume_checked(ctx: &Conn, req: v1::ResumeRequest) -> RpcResult {
    let token = key32("session_token", &req.session_token)?;
    let hash: [u8; 32] = Sha256::digest(token).into();
    let now = now_ms();
    let expired = RpcError::new(Status::Unauthorized, "session expired or unknown; log in again");
    let info = match ctx.shared.store.session(&hash)? {
        ResumeOutcome::Valid(info) => info,
        ResumeOutcome::Unknown => return Err(expired),
    };
    if info.last_used_ms.saturating_add(session_idle_ms(ctx)) <= now {
        ctx.shared.store.delete_session(hash).await?;
        return Err(expired);
    }
    // Refresh the idle clock at most hourly: a reconnecting client must not cost a flash write
    // every time.
    if now.saturating_sub(info.last_used_ms) > 3_600_000 {
        ctx.shared.store.touch_session(hash, now).await?;
    }
    ctx.bind(Bound {
        identity: info.identity,
        username: info.username.clone(),
        device_id: info.device_id.clone(),
        session: hash,
    });
    ok(v1::ResumeResponse {
        username: info.username,
        identity_key: info.identity.to_vec(),
        expires_at_ms: now.saturating_add(session_idle_ms(ctx)),
    })
}

pub(super) async fn logout(ctx: &Conn, _req: v1::LogoutRequest) -> RpcResult {
    let me = ctx.principal()?;
    ctx.shared.store.delete_session(me.session).await?;
    ctx.unbind();
    ctx.shared.hub.disconnect(
        &me.identity,
        Which::Session(&me.session),
        Some(ctx.id),
        "logged out",
    );
    ok(v1::LogoutResponse {})
}

fn session_idle_ms(ctx: &Conn) -> u64 {
    ctx.shared.config.limits.session_idle_days.saturating_mul(86_400_000)
}

/// Usernames: 1-32 characters of `a-z 0-9 . _ -`, starting with a letter or digit.
fn check_username(name: &str) -> Result<(), RpcError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_USERNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        Err(RpcError::bad(
            "username must be 1-32 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        ))
    }
}

/// Applies the registration policy; returns the invite code to consume, if any.
fn check_policy(ctx: &Conn, code: &str) -> Result<Option<String>, RpcError> {
    match ctx.shared.config.registration {
        Registration::Open => Ok(None),
        Registration::Closed => {
            Err(RpcError::new(Status::Forbidden, "registration is closed on this server"))
        }
        Registration::Invite => {
            if code.is_empty() {
                return Err(RpcError::new(
                    Status::Forbidden,
                    "this server needs an invite code to register",
                ));
            }
            if code.len() > 64 || !ctx.shared.store.invite_usable(code, now_ms())? {
                return Err(RpcError::new(
                    Status::Forbidden,
                    "invite code is unknown, used up or expired",
                ));
            }
            Ok(Some(code.to_owned()))
        }
    }
}

fn limit_ip(ctx: &Conn) -> Result<(), RpcError> {
    ctx.shared.auth_per_ip.check(&ctx.ip, Instant::now()).map_err(|after| {
        RpcError::retry(
            Status::RateLimited,
            "too many authentication attempts from this address",
            after,
        )
    })
}

fn limit_user(ctx: &Conn, username: &str) -> Result<(), RpcError> {
    ctx.shared.auth_per_user.check(&username.to_owned(), Instant::now()).map_err(|after| {
        RpcError::retry(Status::RateLimited, "too many login attempts for this user", after)
    })
}
