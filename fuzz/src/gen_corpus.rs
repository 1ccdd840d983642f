//! Writes the seed corpora under `fuzz/seeds/<target>/`: valid request frames for `handlers`
//! (one per method, unauthenticated and as alice), the client harness's seeds for `client`,
//! and local socket frames for `ipc`.
//! Run: `cargo run --manifest-path fuzz/Cargo.toml --bin gen_corpus [target...]`; without
//! targets it writes all of them. (The OPAQUE messages in the `handlers` and `frame_decode`
//! seeds are random, so regenerating those rewrites every such file.)

use std::path::Path;
use std::sync::Arc;

use qpq_core::client::fuzzing::Harness as ClientHarness;
use qpq_core::identity::Identity;
use qpq_core::mls::Mls;
use qpq_core::opaque;
use qpq_core::vault::{KdfParams, Vault};
use qpq_proto::{Message, frame, method, v1};
use qpq_server_lite::fuzzing::Harness;
use qpq_tui::ipc;
use serde_json::json;

fn main() -> std::io::Result<()> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    if let Some(t) = only.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        return Err(std::io::Error::other(format!("unknown target {t}; targets: {TARGETS:?}")));
    }
    let wanted = |t: &str| only.is_empty() || only.iter().any(|a| a == t);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    if wanted("handlers") || wanted("frame_decode") {
        let opaque = opaque_messages()?;
        if wanted("handlers") {
            handlers_seeds(&root.join("handlers"), &opaque)?;
        }
        if wanted("frame_decode") {
            frame_decode_seeds(&root.join("frame_decode"), &opaque)?;
        }
    }
    if wanted("client") {
        let client = root.join("client");
        std::fs::create_dir_all(&client)?;
        for (name, input) in ClientHarness::seeds() {
            std::fs::write(client.join(name), input)?;
        }
    }
    if wanted("ipc") {
        ipc_seeds(&root.join("ipc"))?;
    }
    Ok(())
}

/// The targets that have seeds here.
const TARGETS: [&str; 4] = ["handlers", "client", "frame_decode", "ipc"];

fn handlers_seeds(dir: &Path, opaque: &Opaque) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (id, name, payload) in requests(opaque) {
        for flags in [0u8, 1] {
            let input = [&[flags][..], &id.to_be_bytes(), &payload].concat();
            std::fs::write(dir.join(format!("{name}-{flags}")), input)?;
        }
    }
    Ok(())
}

fn frame_decode_seeds(frames: &Path, opaque: &Opaque) -> std::io::Result<()> {
    std::fs::create_dir_all(frames)?;
    for (id, name, payload) in requests(opaque) {
        if let Ok(f) = frame::encode_request(id, 1, &payload) {
            std::fs::write(frames.join(format!("request-{name}")), f)?;
        }
    }
    let err = v1::Error { code: 1, message: "bad".into(), retry_after_ms: 0 }.encode_to_vec();
    if let Ok(f) = frame::encode_response(qpq_proto::Status::BadRequest, 1, &err) {
        std::fs::write(frames.join("response-error"), f)?;
    }
    let push = v1::NewMessage {
        channel_id: Vec::new(),
        envelope: Some(v1::Envelope { seq: 1, data: vec![1, 2, 3], ..Default::default() }),
    };
    if let Ok(f) = frame::encode_push(method::PUSH_NEW_MESSAGE, &push.encode_to_vec()) {
        std::fs::write(frames.join("push-new-message"), f)?;
    }
    Ok(())
}

/// Local socket frames (`qpq_tui::ipc`): JSON values of the shapes serde gives enums and
/// structs, numbers that change when written again, and a header with no payload after it.
fn ipc_seeds(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let values = [
        ("unit-variant", json!("Bye")),
        ("struct-variant", json!({ "Hello": { "name": "alice", "device": 7 } })),
        ("array", json!([1, -2.5, 1e15, null, true, "caf\u{e9}\u{1}", [], {}])),
        ("nested", json!({ "Data": [[[[{ "a": [0, 255] }]]]] })),
    ];
    for (name, v) in values {
        let f = ipc::encode(&v).map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::write(dir.join(name), f)?;
    }
    let mut header_only = ipc::MAGIC.to_vec();
    header_only.extend_from_slice(&ipc::IPC_VERSION.to_be_bytes());
    header_only.extend_from_slice(&16u32.to_be_bytes());
    std::fs::write(dir.join("header-only"), header_only)
}

/// The identity key of the fuzz user with this seed byte (as `fuzz_targets/handlers.rs`).
fn identity(seed: u8) -> Vec<u8> {
    Identity::from_seed(&[seed; 32]).public_key().to_vec()
}

/// A KeyPackage alice's client makes: the server accepts it from alice.
fn alice_key_package() -> std::io::Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let kdf = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
    let vault = Vault::create(&dir.path().join("alice"), b"fuzz", kdf)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mls = Mls::new(Arc::new(vault), Identity::from_seed(&[0xA1; 32]));
    mls.key_package().map_err(|e| std::io::Error::other(e.to_string()))
}

/// One valid request per method, with plausible field values.
fn requests(opaque: &Opaque) -> Vec<(u16, &'static str, Vec<u8>)> {
    let alice = identity(0xA1);
    let bob = identity(0xB0);
    let id16 = vec![5; 16];
    let kp = opaque.key_package.clone();
    vec![
        (
            method::OPAQUE_REGISTER_START,
            "register-start",
            v1::OpaqueRegisterStartRequest {
                username: "carol".into(),
                request: opaque.register_request.clone(),
                invite_code: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            method::OPAQUE_REGISTER_FINISH,
            "register-finish",
            v1::OpaqueRegisterFinishRequest {
                username: "carol".into(),
                upload: opaque.upload.clone(),
                identity_key: vec![0xC0; 32],
                invite_code: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            method::OPAQUE_LOGIN_START,
            "login-start",
            v1::OpaqueLoginStartRequest {
                username: "alice".into(),
                request: opaque.login_request.clone(),
            }
            .encode_to_vec(),
        ),
        (
            method::OPAQUE_LOGIN_FINISH,
            "login-finish",
            v1::OpaqueLoginFinishRequest {
                username: "alice".into(),
                finalization: vec![7; 64],
                identity_key: alice.clone(),
                device_id: id16.clone(),
            }
            .encode_to_vec(),
        ),
        (
            method::RESUME,
            "resume",
            v1::ResumeRequest { session_token: vec![3; 32] }.encode_to_vec(),
        ),
        (method::LOGOUT, "logout", Vec::new()),
        (
            method::ENQUEUE,
            "enqueue",
            v1::EnqueueRequest {
                recipient_key: bob.clone(),
                payload: b"ciphertext".to_vec(),
                message_id: id16.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            method::FETCH,
            "fetch",
            v1::FetchRequest { limit: 10, ..Default::default() }.encode_to_vec(),
        ),
        (
            method::FETCH_WAIT,
            "fetch-wait",
            v1::FetchWaitRequest { timeout_ms: 5, ..Default::default() }.encode_to_vec(),
        ),
        (
            method::PEEK,
            "peek",
            v1::PeekRequest { recipient_key: alice.clone(), ..Default::default() }.encode_to_vec(),
        ),
        (method::ACK, "ack", v1::AckRequest { seq_up_to: 3, ..Default::default() }.encode_to_vec()),
        (
            method::BATCH_ENQUEUE,
            "batch-enqueue",
            v1::BatchEnqueueRequest {
                recipient_keys: vec![bob.clone(), alice.clone()],
                payload: b"commit".to_vec(),
                message_id: id16.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            method::RELAY_EPHEMERAL,
            "relay",
            v1::RelayEphemeralRequest {
                recipient_keys: vec![bob.clone()],
                payload: b"typing".to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            method::CLAIM_SLOT,
            "claim-slot",
            v1::ClaimSlotRequest {
                slot: vec![6; 16],
                payload: commit(),
                recipient_keys: vec![bob.clone()],
                message_id: id16.clone(),
            }
            .encode_to_vec(),
        ),
        (
            method::FETCH_SLOT,
            "fetch-slot",
            v1::FetchSlotRequest { slot: vec![6; 16], from: 0 }.encode_to_vec(),
        ),
        (
            method::UPLOAD_KEY_PACKAGE,
            "upload-key-package",
            v1::UploadKeyPackageRequest {
                identity_key: Vec::new(),
                package: kp.clone(),
                last_resort: false,
            }
            .encode_to_vec(),
        ),
        (
            method::FETCH_KEY_PACKAGE,
            "fetch-key-package",
            v1::FetchKeyPackageRequest { identity_key: alice.clone() }.encode_to_vec(),
        ),
        (
            method::UPLOAD_HYBRID_KEY,
            "upload-hybrid-key",
            v1::UploadHybridKeyRequest {
                identity_key: Vec::new(),
                hybrid_public_key: vec![4; 1216],
            }
            .encode_to_vec(),
        ),
        (
            method::FETCH_HYBRID_KEY,
            "fetch-hybrid-key",
            v1::FetchHybridKeyRequest { identity_key: alice.clone() }.encode_to_vec(),
        ),
        (
            method::FETCH_HYBRID_KEYS,
            "fetch-hybrid-keys",
            v1::FetchHybridKeysRequest { identity_keys: vec![alice.clone(), bob.clone()] }
                .encode_to_vec(),
        ),
        (method::KEY_PACKAGE_STOCK, "key-package-stock", Vec::new()),
        (
            method::RESOLVE_USER,
            "resolve-user",
            v1::ResolveUserRequest { username: "bob".into() }.encode_to_vec(),
        ),
        (
            method::RESOLVE_IDENTITY,
            "resolve-identity",
            v1::ResolveIdentityRequest { identity_key: bob.clone() }.encode_to_vec(),
        ),
        (
            method::UPLOAD_BLOB,
            "upload-blob",
            v1::UploadBlobRequest {
                blob_id: hello_blob_id(),
                total_size: 5,
                offset: 0,
                chunk: b"hello".to_vec(),
                media_type: "text/plain".into(),
            }
            .encode_to_vec(),
        ),
        (
            method::DOWNLOAD_BLOB,
            "download-blob",
            v1::DownloadBlobRequest { blob_id: hello_blob_id(), offset: 0, max_len: 3 }
                .encode_to_vec(),
        ),
        (
            method::REGISTER_DEVICE,
            "register-device",
            v1::RegisterDeviceRequest { device_id: id16.clone(), name: "laptop".into() }
                .encode_to_vec(),
        ),
        (method::LIST_DEVICES, "list-devices", Vec::new()),
        (
            method::REVOKE_DEVICE,
            "revoke-device",
            v1::RevokeDeviceRequest { device_id: id16.clone() }.encode_to_vec(),
        ),
        (method::HEALTH, "health", Vec::new()),
        (method::DELETE_ACCOUNT, "delete-account", Vec::new()),
    ]
}

/// Real OPAQUE messages for the registration and login seeds.
struct Opaque {
    register_request: Vec<u8>,
    upload: Vec<u8>,
    login_request: Vec<u8>,
    /// Not OPAQUE, but made once like those: alice's KeyPackage.
    key_package: Vec<u8>,
}

/// Runs the registration of `carol` against an in-process server to get a valid upload.
fn opaque_messages() -> std::io::Result<Opaque> {
    let err = |e: String| std::io::Error::other(e);
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let h = Harness::open(dir.path()).await.map_err(|e| err(e.to_string()))?;
        let start = opaque::register_start(b"carol-pw").map_err(|e| err(e.to_string()))?;
        let register_request = start.request.clone();
        let req = v1::OpaqueRegisterStartRequest {
            username: "carol".into(),
            request: register_request.clone(),
            invite_code: String::new(),
        };
        let resp: v1::OpaqueRegisterStartResponse = h
            .connection()
            .call(method::OPAQUE_REGISTER_START, &req)
            .await
            .map_err(|e| err(e.message))?;
        let upload = opaque::register_finish(start, b"carol-pw", &resp.response)
            .map_err(|e| err(e.to_string()))?;
        let login_request =
            opaque::login_start(b"alice-pw").map_err(|e| err(e.to_string()))?.request;
        Ok(Opaque { register_request, upload, login_request, key_package: alice_key_package()? })
    })
}

/// A payload whose clear MLS header says commit (what ClaimSlot takes): an `MLSMessage` v1
/// `PrivateMessage` of group "g", epoch 7, content type 3, empty authenticated data.
fn commit() -> Vec<u8> {
    let mut p = vec![0, 1, 0, 2, 1, b'g'];
    p.extend_from_slice(&7u64.to_be_bytes());
    p.extend_from_slice(&[3, 0]);
    p.extend_from_slice(b"sender data and ciphertext");
    p
}

/// SHA-256("hello").
fn hello_blob_id() -> Vec<u8> {
    let hex = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0)).collect()
}
