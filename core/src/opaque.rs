//! OPAQUE (RFC 9807) with ristretto255, TripleDH over SHA-512, and Argon2id as the client's
//! key-stretching function. Passwords never leave the client.

use argon2::{Algorithm, Argon2, Params, Version};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
    Ristretto255, TripleDh,
};
use rand::rngs::OsRng;
use zeroize::Zeroizing;

#[cfg(feature = "flows")]
pub mod flow;

/// The cipher suite both sides instantiate opaque-ke with.
#[derive(Debug, Clone, Copy)]
pub struct Suite;

impl opaque_ke::CipherSuite for Suite {
    type OprfCs = Ristretto255;
    type KeyExchange = TripleDh<Ristretto255, sha2::Sha512>;
    type Ksf = Argon2<'static>;
}

/// Argon2id memory cost of the login KSF in KiB (19 MiB, OWASP's minimum for Argon2id): small
/// enough for a client on a 128 MB router.
pub const KSF_MEMORY_KIB: u32 = 19 * 1024;
/// Argon2id passes of the login KSF.
pub const KSF_ITERATIONS: u32 = 2;

/// A failed client-side OPAQUE step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpaqueClientError {
    /// The server's message did not parse.
    #[error("malformed OPAQUE message from the server")]
    PeerMalformed,
    /// Wrong password, or the server is not the one the account registered with.
    #[error("login failed: wrong username or password")]
    InvalidLogin,
    /// An opaque-ke failure that is not the peer's fault.
    #[error("OPAQUE internal error: {0}")]
    Internal(&'static str),
}

/// Client state between `OpaqueRegisterStart` and `OpaqueRegisterFinish`.
pub struct RegistrationStart {
    state: ClientRegistration<Suite>,
    /// Bytes for `OpaqueRegisterStartRequest.request`.
    pub request: Vec<u8>,
}

/// Client state between `OpaqueLoginStart` and `OpaqueLoginFinish`.
pub struct LoginStart {
    state: ClientLogin<Suite>,
    /// Bytes for `OpaqueLoginStartRequest.request`.
    pub request: Vec<u8>,
}

/// The outcome of a successful client login.
pub struct LoginFinish {
    /// Bytes for `OpaqueLoginFinishRequest.finalization`.
    pub finalization: Vec<u8>,
    /// The OPAQUE session key shared with the server.
    pub session_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for LoginFinish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginFinish").field("session_key", &"Secret(..)").finish_non_exhaustive()
    }
}

/// The Argon2id instance used as the OPAQUE KSF.
pub fn ksf() -> Result<Argon2<'static>, OpaqueClientError> {
    let params = Params::new(KSF_MEMORY_KIB, KSF_ITERATIONS, 1, None)
        .map_err(|_| OpaqueClientError::Internal("argon2 parameters"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Starts registration for `password`.
pub fn register_start(password: &[u8]) -> Result<RegistrationStart, OpaqueClientError> {
    let start = ClientRegistration::<Suite>::start(&mut OsRng, password)
        .map_err(|_| OpaqueClientError::Internal("registration start"))?;
    Ok(RegistrationStart { request: start.message.serialize().to_vec(), state: start.state })
}

/// Finishes registration with the server's response; returns the upload bytes.
pub fn register_finish(
    start: RegistrationStart,
    password: &[u8],
    response: &[u8],
) -> Result<Vec<u8>, OpaqueClientError> {
    let response = RegistrationResponse::<Suite>::deserialize(response)
        .map_err(|_| OpaqueClientError::PeerMalformed)?;
    let ksf = ksf()?;
    let params = ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf));
    let finish = start
        .state
        .finish(&mut OsRng, password, response, params)
        .map_err(|_| OpaqueClientError::PeerMalformed)?;
    Ok(finish.message.serialize().to_vec())
}

/// Starts login for `password`.
pub fn login_start(password: &[u8]) -> Result<LoginStart, OpaqueClientError> {
    let start = ClientLogin::<Suite>::start(&mut OsRng, password)
        .map_err(|_| OpaqueClientError::Internal("login start"))?;
    Ok(LoginStart { request: start.message.serialize().to_vec(), state: start.state })
}

/// Finishes login with the server's response. Fails with [`OpaqueClientError::InvalidLogin`]
/// on a wrong password or an unknown user (the server's answer for both looks the same).
pub fn login_finish(
    start: LoginStart,
    password: &[u8],
    response: &[u8],
) -> Result<LoginFinish, OpaqueClientError> {
    let response = CredentialResponse::<Suite>::deserialize(response)
        .map_err(|_| OpaqueClientError::PeerMalformed)?;
    let ksf = ksf()?;
    let params = ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf));
    let finish = start
        .state
        .finish(&mut OsRng, password, response, params)
        .map_err(|_| OpaqueClientError::InvalidLogin)?;
    Ok(LoginFinish {
        finalization: finish.message.serialize().to_vec(),
        session_key: Zeroizing::new(finish.session_key.to_vec()),
    })
}
