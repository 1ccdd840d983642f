//! Method ids (request frames) and push event ids (push frames).
//!
//! Ids are stable: once assigned, never reused. New ids stay in their category's range.

/// 100: start OPAQUE registration.
pub const OPAQUE_REGISTER_START: u16 = 100;
/// 101: finish OPAQUE registration and store the record with the identity key.
pub const OPAQUE_REGISTER_FINISH: u16 = 101;
/// 102: start OPAQUE login.
pub const OPAQUE_LOGIN_START: u16 = 102;
/// 103: finish OPAQUE login; binds the connection and returns a session token.
pub const OPAQUE_LOGIN_FINISH: u16 = 103;
/// 104: bind the connection to an existing session token.
pub const RESUME: u16 = 104;
/// 105: end the session bound to the connection.
pub const LOGOUT: u16 = 105;

/// 200: store one payload for one recipient.
pub const ENQUEUE: u16 = 200;
/// 201: read queued messages (they stay until acked).
pub const FETCH: u16 = 201;
/// 202: long-poll fetch.
pub const FETCH_WAIT: u16 = 202;
/// 203: read without any side effect.
pub const PEEK: u16 = 203;
/// 204: delete messages up to a seq.
pub const ACK: u16 = 204;
/// 205: one payload to many recipients in one durable transaction.
pub const BATCH_ENQUEUE: u16 = 205;
/// 206: relay an ephemeral payload to connected recipients; never stored.
pub const RELAY_EPHEMERAL: u16 = 206;
/// 207: claim an epoch's commit slot: append the commit there and enqueue it, in one durable
/// transaction.
pub const CLAIM_SLOT: u16 = 207;
/// 208: read an epoch's claims in order.
pub const FETCH_SLOT: u16 = 208;

/// 300: upload one single-use KeyPackage.
pub const UPLOAD_KEY_PACKAGE: u16 = 300;
/// 301: pop the oldest KeyPackage of an identity.
pub const FETCH_KEY_PACKAGE: u16 = 301;
/// 302: set the caller's hybrid public key.
pub const UPLOAD_HYBRID_KEY: u16 = 302;
/// 303: read one identity's hybrid public key.
pub const FETCH_HYBRID_KEY: u16 = 303;
/// 304: read several identities' hybrid public keys.
pub const FETCH_HYBRID_KEYS: u16 = 304;
/// 305: the caller's KeyPackage stock.
pub const KEY_PACKAGE_STOCK: u16 = 305;

/// 500: username to identity key.
pub const RESOLVE_USER: u16 = 500;
/// 501: identity key to username.
pub const RESOLVE_IDENTITY: u16 = 501;

/// 600: chunked, resumable blob upload.
pub const UPLOAD_BLOB: u16 = 600;
/// 601: ranged blob download.
pub const DOWNLOAD_BLOB: u16 = 601;

/// 700: register a device of the caller.
pub const REGISTER_DEVICE: u16 = 700;
/// 701: list the caller's devices.
pub const LIST_DEVICES: u16 = 701;
/// 702: revoke a device and its sessions.
pub const REVOKE_DEVICE: u16 = 702;

/// 802: liveness, version, uptime. Needs no authentication.
pub const HEALTH: u16 = 802;

/// 950: delete the caller's account and everything stored for it.
pub const DELETE_ACCOUNT: u16 = 950;

/// Push 1000: [`crate::v1::NewMessage`].
pub const PUSH_NEW_MESSAGE: u16 = 1000;
/// Push 1001: [`crate::v1::TypingIndicator`] (any ephemeral relay).
pub const PUSH_TYPING: u16 = 1001;
/// Push 1002: [`crate::v1::PresenceUpdate`].
pub const PUSH_PRESENCE: u16 = 1002;
/// Push 1003: [`crate::v1::GroupMembershipChange`] (reserved; never sent).
pub const PUSH_MEMBERSHIP: u16 = 1003;
/// Push 1004: [`crate::v1::KeyPackagesLow`].
pub const PUSH_KEY_PACKAGES_LOW: u16 = 1004;

/// Every method id this protocol version defines, with its name.
pub const METHODS: &[(u16, &str)] = &[
    (OPAQUE_REGISTER_START, "OpaqueRegisterStart"),
    (OPAQUE_REGISTER_FINISH, "OpaqueRegisterFinish"),
    (OPAQUE_LOGIN_START, "OpaqueLoginStart"),
    (OPAQUE_LOGIN_FINISH, "OpaqueLoginFinish"),
    (RESUME, "Resume"),
    (LOGOUT, "Logout"),
    (ENQUEUE, "Enqueue"),
    (FETCH, "Fetch"),
    (FETCH_WAIT, "FetchWait"),
    (PEEK, "Peek"),
    (ACK, "Ack"),
    (BATCH_ENQUEUE, "BatchEnqueue"),
    (RELAY_EPHEMERAL, "RelayEphemeral"),
    (CLAIM_SLOT, "ClaimSlot"),
    (FETCH_SLOT, "FetchSlot"),
    (UPLOAD_KEY_PACKAGE, "UploadKeyPackage"),
    (FETCH_KEY_PACKAGE, "FetchKeyPackage"),
    (UPLOAD_HYBRID_KEY, "UploadHybridKey"),
    (FETCH_HYBRID_KEY, "FetchHybridKey"),
    (FETCH_HYBRID_KEYS, "FetchHybridKeys"),
    (KEY_PACKAGE_STOCK, "KeyPackageStock"),
    (RESOLVE_USER, "ResolveUser"),
    (RESOLVE_IDENTITY, "ResolveIdentity"),
    (UPLOAD_BLOB, "UploadBlob"),
    (DOWNLOAD_BLOB, "DownloadBlob"),
    (REGISTER_DEVICE, "RegisterDevice"),
    (LIST_DEVICES, "ListDevices"),
    (REVOKE_DEVICE, "RevokeDevice"),
    (HEALTH, "Health"),
    (DELETE_ACCOUNT, "DeleteAccount"),
];

/// The name of a method id, or `None` if this protocol version does not define it.
pub fn name(method: u16) -> Option<&'static str> {
    METHODS.iter().find(|(id, _)| *id == method).map(|(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_named() {
        let mut ids: Vec<u16> = METHODS.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), METHODS.len());
        assert_eq!(name(ENQUEUE), Some("Enqueue"));
        assert_eq!(name(4242), None);
        assert!(ids.iter().all(|id| *id < PUSH_NEW_MESSAGE));
    }
}
