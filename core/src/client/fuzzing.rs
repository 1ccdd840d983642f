//! In-process harness for the `client` fuzz target in `fuzz/` (cargo feature `fuzzing`; not part
//! of the API).
//!
//! [`Harness::new`] builds, without a network, a three-member MLS group in real vaults: Alice
//! (admin) created it and added Bob and Carol. Bob is a [`Client`] whose engine handles what the
//! server sends. [`Harness::run`] feeds one input to the engine's receive paths (see [`Mode`]):
//! fetched envelopes into MLS processing and the content decoder, push frames into the push
//! handler, response frames into the response reader. Every input runs inside vault
//! transactions that are rolled back, so the group state is the same for every input.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use prost::Message as _;
use qpq_proto::frame::{self, RESPONSE_HEADER_LEN, ResponseHeader};
use qpq_proto::{method, v1};

use super::engine::Client;
use super::error::ClientError;
use super::net::{Push, read_response};
use crate::content::{Body, Content, FileOffer};
use crate::identity::Identity;
use crate::mls::{Incoming, Kind, Mls};
use crate::vault::{KdfParams, Vault, VaultError};

/// What an input is, chosen by its first byte (modulo the number of modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// The data of a fetched envelope: MLS processing, then history and conversations.
    Envelope = 0,
    /// The plaintext of an application message from Alice: the content decoder and its effects.
    Plaintext = 1,
    /// Alice encrypts the bytes; Bob processes the ciphertext (real decryption, then content).
    Encrypted = 2,
    /// A valid MLS message of this run (first byte picks it), then `(offset u16 BE, xor u8)`
    /// edits: near-valid ciphertexts, commits, a proposal and a Welcome.
    Patched = 3,
    /// A push frame: `NewMessage` carries envelope data, `Typing` goes to the push handler.
    Push = 4,
    /// A response frame to a call with request id 1, read as each response the engine uses;
    /// a Fetch response's envelopes are processed.
    Response = 5,
    /// A KeyPackage fetched for an add: Alice adds its owner to the group.
    KeyPackage = 6,
}

impl Mode {
    const ALL: [Mode; 7] = [
        Mode::Envelope,
        Mode::Plaintext,
        Mode::Encrypted,
        Mode::Patched,
        Mode::Push,
        Mode::Response,
        Mode::KeyPackage,
    ];

    /// The mode of an input's first byte.
    pub fn of(byte: u8) -> Self {
        Self::ALL[usize::from(byte) % Self::ALL.len()]
    }
}

/// Bob's engine and the group it is in. See the module docs.
pub struct Harness {
    bob: Client,
    bob_vault: Arc<Vault>,
    alice: Mls,
    alice_vault: Arc<Vault>,
    group: Vec<u8>,
    messages: Vec<Vec<u8>>,
}

impl Harness {
    /// Creates the vaults in `dir` and the group (cheap KDF parameters: nothing here is secret).
    pub fn new(dir: &Path) -> Result<Self, ClientError> {
        let kdf = KdfParams { memory_kib: 8, iterations: 1, parallelism: 1 };
        let vault = |name: &str| -> Result<Arc<Vault>, ClientError> {
            Ok(Arc::new(Vault::create(&dir.join(name), b"fuzz", kdf)?))
        };
        let alice_vault = vault("alice.qpq")?;
        let bob_vault = vault("bob.qpq")?;
        let alice = Mls::new(alice_vault.clone(), Identity::generate());
        let carol = Mls::new(vault("carol.qpq")?, Identity::generate());
        let bob_identity = Identity::generate();
        let bob_mls = Mls::new(bob_vault.clone(), Identity::from_seed(&bob_identity.seed()));
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let bob = Client::assemble(bob_vault.clone(), bob_identity, "bob".into(), server, None)?;

        let group = alice.create(Kind::Group)?;
        let added = alice.add(
            &group,
            &[bob_mls.key_package()?, carol.key_package()?],
            &[bob_mls.identity_key(), carol.identity_key()],
        )?;
        alice.confirm(&group)?;
        let welcome = added.welcome.ok_or(ClientError::Internal("add made no Welcome"))?;
        bob.state.process_one(&welcome)?;
        carol.process(&welcome)?;

        let mut messages = Vec::new();
        for body in bodies() {
            let plaintext = Content::new(body, 1).encode()?;
            messages.push(alice.encrypt(&group, &plaintext)?.0);
        }
        let hello = Content::new(Body::Text { body: "hi".into(), reply_to: None }, 1).encode()?;
        messages.push(carol.encrypt(&group, &hello)?.0);
        messages.push(carol.leave(&group)?.0);
        messages.push(alice.self_update(&group)?.commit);
        alice.abandon(&group)?;
        let dm = alice.create(Kind::Dm)?;
        let added = alice.add(&dm, &[bob_mls.key_package()?], &[bob_mls.identity_key()])?;
        alice.confirm(&dm)?;
        messages.extend(added.welcome);
        Ok(Self { bob, bob_vault, alice, alice_vault, group, messages })
    }

    /// Runs one input (first byte: [`Mode::of`]); its effects are rolled back. Returns the
    /// engine's verdict on it, for callers that want to look.
    pub fn run(&mut self, input: &[u8]) -> Result<(), ClientError> {
        let Some((&mode, data)) = input.split_first() else { return Ok(()) };
        let Self { bob, bob_vault, alice, alice_vault, group, messages } = self;
        let mut outcome = Ok(());
        let _ = alice_vault.atomic(|| -> Result<(), Rollback> {
            bob_vault.atomic(|| -> Result<(), Rollback> {
                outcome = match Mode::of(mode) {
                    Mode::Envelope => bob.state.process_one(data).map(drop),
                    Mode::Plaintext => bob
                        .state
                        .apply_incoming(Incoming::Application {
                            group_id: group.clone(),
                            sender: alice.identity_key(),
                            plaintext: data.to_vec(),
                        })
                        .map(drop),
                    Mode::Encrypted => match alice.encrypt(group, data) {
                        Ok((ciphertext, _)) => bob.state.process_one(&ciphertext).map(drop),
                        Err(e) => Err(e.into()),
                    },
                    Mode::Patched => bob.state.process_one(&patched(messages, data)).map(drop),
                    Mode::Push => push(bob, data),
                    Mode::Response => response(bob, alice, group, data),
                    Mode::KeyPackage => {
                        let who = alice.key_package_account(data).unwrap_or_default();
                        alice.add(group, &[data.to_vec()], &[who]).map(drop).map_err(Into::into)
                    }
                };
                Err(Rollback)
            })
        });
        outcome
    }

    /// Seed inputs for the corpus: one or more per mode. They do not depend on this run's keys.
    pub fn seeds() -> Vec<(String, Vec<u8>)> {
        let mut seeds = Vec::new();
        let mut add = |name: String, mode: Mode, data: Vec<u8>| {
            seeds.push((name, [vec![mode as u8], data].concat()));
        };
        for (i, body) in bodies().into_iter().enumerate() {
            if let Ok(plaintext) = Content::new(body, 1).encode() {
                add(format!("plaintext-{i}"), Mode::Plaintext, plaintext.clone());
                add(format!("encrypted-{i}"), Mode::Encrypted, plaintext);
            }
        }
        for k in 0..12u8 {
            add(format!("patched-{k}"), Mode::Patched, vec![k]);
        }
        add("envelope-junk".into(), Mode::Envelope, vec![0, 1, 0, 1, 0, 0x4f]);
        let envelope = v1::Envelope { seq: 7, data: vec![0, 1, 0, 2], ..Default::default() };
        let new_message =
            v1::NewMessage { channel_id: Vec::new(), envelope: Some(envelope.clone()) };
        let typing = v1::TypingIndicator { payload: vec![0, 1, 0, 2], ..Default::default() };
        for (name, event, payload) in [
            ("push-new-message", method::PUSH_NEW_MESSAGE, new_message.encode_to_vec()),
            ("push-typing", method::PUSH_TYPING, typing.encode_to_vec()),
        ] {
            if let Ok(f) = frame::encode_push(event, &payload) {
                add(name.into(), Mode::Push, f);
            }
        }
        let fetch = v1::FetchResponse { payloads: vec![envelope] }.encode_to_vec();
        let error = v1::Error { code: 4, message: "no such user".into(), retry_after_ms: 0 };
        for (name, status, payload) in [
            ("response-fetch", qpq_proto::Status::Ok, fetch),
            ("response-error", qpq_proto::Status::NotFound, error.encode_to_vec()),
        ] {
            if let Ok(f) = frame::encode_response(status, 1, &payload) {
                add(name.into(), Mode::Response, f);
            }
        }
        add("key-package-junk".into(), Mode::KeyPackage, vec![0, 1, 0, 5, 0, 1, 0, 0x4f]);
        seeds
    }
}

/// Returned to roll a vault transaction back.
struct Rollback;

impl From<VaultError> for Rollback {
    fn from(_: VaultError) -> Self {
        Rollback
    }
}

/// One message body of each kind.
fn bodies() -> Vec<Body> {
    let target = crate::ids::MessageId::from([7u8; 16]);
    vec![
        Body::Text { body: "hello".into(), reply_to: Some(target) },
        Body::Reaction { target, emoji: "+1".into(), remove: false },
        Body::Edit { target, body: "edited".into() },
        Body::Delete { target },
        Body::Receipt { up_to: target },
        Body::Typing { active: true },
        Body::File(FileOffer {
            blob_id: [1; 32],
            size: 5,
            ciphertext_size: 21,
            name: "a.txt".into(),
            media_type: "text/plain".into(),
            key: [2; 32],
            sha256: [3; 32],
        }),
        Body::Meta { name: "room".into(), topic: "talk".into() },
    ]
}

/// `messages[data[0]]` with the `(offset u16 BE, xor u8)` edits in the rest of `data`.
fn patched(messages: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    let Some((&pick, edits)) = data.split_first() else { return Vec::new() };
    let Some(mut msg) = messages.get(usize::from(pick) % messages.len().max(1)).cloned() else {
        return Vec::new();
    };
    for e in edits.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([e[0], e[1]]));
        let len = msg.len();
        if let Some(b) = msg.get_mut(at % len.max(1)) {
            *b ^= e[2];
        }
    }
    msg
}

/// A push frame as the connection's push reader decodes it, then what the engine does with it.
/// `NewMessage` only makes the engine fetch, so its envelope is processed as a fetch would;
/// `KeyPackagesLow` makes it call the server, so it stops at decoding.
fn push(bob: &mut Client, bytes: &[u8]) -> Result<(), ClientError> {
    let Ok((head, payload)) = frame::decode_push(bytes) else { return Ok(()) };
    let p = Push { event: head.event, payload: payload.to_vec() };
    match p.event {
        method::PUSH_NEW_MESSAGE => {
            let m = v1::NewMessage::decode(payload)
                .map_err(|_| ClientError::PeerInvalid("an undecodable push"))?;
            match m.envelope {
                Some(env) => bob.state.process_one(&env.data).map(drop),
                None => Ok(()),
            }
        }
        method::PUSH_KEY_PACKAGES_LOW => Ok(()),
        _ => now(bob.handle_push(p)),
    }
}

/// A response frame as `Connection::call` reads it, as each response type the engine uses.
fn response(bob: &Client, alice: &Mls, group: &[u8], bytes: &[u8]) -> Result<(), ClientError> {
    let Some(head) = bytes.get(..RESPONSE_HEADER_LEN) else { return Ok(()) };
    let Ok(header) = ResponseHeader::decode(head) else { return Ok(()) };
    let Some(body) = bytes[RESPONSE_HEADER_LEN..].get(..header.len as usize) else { return Ok(()) };
    if let Ok(r) = read_response::<v1::FetchResponse>(1, &header, body) {
        for env in r.payloads {
            let _ = bob.state.process_one(&env.data);
        }
    }
    if let Ok(r) = read_response::<v1::FetchKeyPackageResponse>(1, &header, body) {
        let who = alice.key_package_account(&r.package).unwrap_or_default();
        let _ = alice.add(group, &[r.package], &[who]);
    }
    let _ = read_response::<v1::ResolveUserResponse>(1, &header, body);
    let _ = read_response::<v1::ResolveIdentityResponse>(1, &header, body);
    let _ = read_response::<v1::KeyPackageStockResponse>(1, &header, body);
    let _ = read_response::<v1::DownloadBlobResponse>(1, &header, body);
    let _ = read_response::<v1::BatchEnqueueResponse>(1, &header, body);
    read_response::<v1::AckResponse>(1, &header, body).map(drop).map_err(Into::into)
}

/// Runs a future that never waits (the engine's push handler on a typing push) to completion.
fn now<F: Future<Output = Result<(), ClientError>>>(f: F) -> Result<(), ClientError> {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(ClientError::Internal("push handler waited")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(dir.path()).unwrap();
        // Valid ciphertexts of every kind of body are accepted, and again after the rollback.
        for k in 0..h.messages.len() as u8 {
            let r = h.run(&[Mode::Patched as u8, k]);
            assert!(r.is_ok(), "message {k}: {r:?}");
        }
        assert!(h.run(&[Mode::Patched as u8, 0]).is_ok());
        for (name, seed) in Harness::seeds() {
            let _ = h.run(&seed);
            let _ = name;
        }
        let text = Content::new(Body::Text { body: "x".into(), reply_to: None }, 1).encode();
        assert!(h.run(&[[Mode::Encrypted as u8].as_slice(), &text.unwrap()].concat()).is_ok());
        assert!(h.run(&[Mode::Envelope as u8, 1, 2, 3]).is_err());
    }
}
