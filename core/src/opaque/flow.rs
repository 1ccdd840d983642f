//! The client's OPAQUE flows (registration, login) over a small call trait, so the engine,
//! the test harness and the server's fuzzing harness run the same steps in the same order
//! over their own transports.

use std::future::Future;

use qpq_proto::{method, v1};

use super::{OpaqueClientError, login_finish, login_start, register_finish, register_start};

/// One request-response call of the protocol, over whatever carries it.
pub trait Call {
    /// What a failed call (or a failed OPAQUE step) is.
    type Error: From<OpaqueClientError>;

    /// Sends `req` as `method` and decodes the answer.
    fn call<Req, Resp>(
        &self,
        method: u16,
        req: &Req,
    ) -> impl Future<Output = Result<Resp, Self::Error>> + Send
    where
        Req: prost::Message + Sync,
        Resp: prost::Message + Default;
}

/// Registers `username` (an account bound to `identity`): `OpaqueRegisterStart`, then
/// `OpaqueRegisterFinish` with the upload. The password never leaves this function.
pub async fn register<C: Call + Sync>(
    c: &C,
    username: &str,
    password: &str,
    identity: &[u8; 32],
    invite: &str,
) -> Result<(), C::Error> {
    let start = register_start(password.as_bytes())?;
    let resp: v1::OpaqueRegisterStartResponse = c
        .call(
            method::OPAQUE_REGISTER_START,
            &v1::OpaqueRegisterStartRequest {
                username: username.into(),
                request: start.request.clone(),
                invite_code: invite.into(),
            },
        )
        .await?;
    let upload = register_finish(start, password.as_bytes(), &resp.response)?;
    let _: v1::OpaqueRegisterFinishResponse = c
        .call(
            method::OPAQUE_REGISTER_FINISH,
            &v1::OpaqueRegisterFinishRequest {
                username: username.into(),
                upload,
                identity_key: identity.to_vec(),
                invite_code: invite.into(),
            },
        )
        .await?;
    Ok(())
}

/// Logs `username` in: `OpaqueLoginStart`, then `OpaqueLoginFinish`. Returns the session
/// token. A wrong password fails here ([`OpaqueClientError::InvalidLogin`]), before
/// `OpaqueLoginFinish` is sent, as OPAQUE intends.
pub async fn login<C: Call + Sync>(
    c: &C,
    username: &str,
    password: &str,
    identity: &[u8; 32],
) -> Result<Vec<u8>, C::Error> {
    let start = login_start(password.as_bytes())?;
    let resp: v1::OpaqueLoginStartResponse = c
        .call(
            method::OPAQUE_LOGIN_START,
            &v1::OpaqueLoginStartRequest {
                username: username.into(),
                request: start.request.clone(),
            },
        )
        .await?;
    let finish = login_finish(start, password.as_bytes(), &resp.response)?;
    let done: v1::OpaqueLoginFinishResponse = c
        .call(
            method::OPAQUE_LOGIN_FINISH,
            &v1::OpaqueLoginFinishRequest {
                username: username.into(),
                finalization: finish.finalization,
                identity_key: identity.to_vec(),
                device_id: Vec::new(),
            },
        )
        .await?;
    Ok(done.session_token)
}
