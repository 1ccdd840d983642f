//! The two vault records that carry MLS ciphertexts, and their stored form.
//!
//! [`OutboxItem`] (`outbox`: counter u64 BE) and [`PendingCommit`] (`state`: `commit/‖group
//! id`) were stored as serde_json up to v0.3, which writes every ciphertext byte as a decimal
//! number in a JSON array: three to four times the size, and slow to write and read. They are now
//! stored in a binary form; the JSON form is still read (a lazy migration: a legacy record is
//! rewritten in the new form only when it is written again), and always will be.
//!
//! **Formats are forever.** Both forms below must open in every later build. The fixtures in
//! `core/tests/fixtures/records/` are legacy records as the v0.1–v0.3 clients wrote them; they
//! are never regenerated. A change to a stored form gets a new tag byte (the old tags stay
//! readable) and a new fixture.
//!
//! - **Legacy (v0.1–v0.3):** the serde_json of the whole struct. It starts with `{`.
//! - **Binary, tag `0x01`:** `0x01 ‖ len ‖ metadata ‖ ciphertexts`, where `len` is a u32
//!   big-endian byte count, the metadata is the serde_json of every field except the
//!   ciphertexts, and each ciphertext is `len ‖ bytes`:
//!   - `OutboxItem`: metadata `{conv, to, message_id}`, then `payload`.
//!   - `PendingCommit`: metadata `{conv, commit_to, message_id, welcome_to, welcome_id,
//!     announce, system, slot, intent, attempt}`, then `commit`, then the Welcome as `0x00`
//!     (none) or `0x01 ‖ len ‖ welcome`.
//!
//!   Nothing may follow the last ciphertext. Metadata and each ciphertext are at most
//!   [`MAX_METADATA`] and [`MAX_CIPHERTEXT`] bytes; a record with a larger part (none can be
//!   sent: the server takes at most 4 MiB per message) is written in the legacy form, which
//!   has no limit, so that `encode` never writes what `decode` refuses.
//!
//! Decoding never panics and never allocates more than its input: every length is checked
//! against the limit and against the bytes that remain before anything is copied.

use serde::{Deserialize, Serialize};

use crate::ids::{GroupId, MessageId};

/// The first byte of a legacy record: a JSON object.
const LEGACY_JSON: u8 = b'{';
/// The first byte of a record in the binary form. Never `{`, nor JSON whitespace.
const BINARY_V1: u8 = 0x01;
/// A `PendingCommit` without a Welcome.
const NO_WELCOME: u8 = 0x00;
/// A `PendingCommit` with a Welcome.
const WELCOME: u8 = 0x01;

/// The largest metadata the binary form holds (KeyPackages of an `Intent::Add` are in it).
pub(crate) const MAX_METADATA: usize = 16 << 20;
/// The largest ciphertext the binary form holds: four times the largest message the server
/// accepts (`qpq_proto::MAX_PAYLOAD`).
pub(crate) const MAX_CIPHERTEXT: usize = 16 << 20;
const _: () = assert!(MAX_CIPHERTEXT >= qpq_proto::MAX_PAYLOAD as usize);
const _: () = assert!(MAX_METADATA <= u32::MAX as usize && MAX_CIPHERTEXT <= u32::MAX as usize);

/// A stored record that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RecordError {
    /// The record starts with a byte that starts no known form (a newer build wrote it, or
    /// it is damaged).
    #[error("stored record: unknown format tag {0:#04x}")]
    UnknownTag(u8),
    /// The record ends before `field` is complete.
    #[error("stored record: truncated in {field}")]
    Truncated {
        /// The part that is cut short.
        field: &'static str,
    },
    /// A length prefix is above the limit of its part.
    #[error("stored record: {field} is {len} bytes, over the limit of {limit}")]
    TooLong {
        /// The part whose length is too large.
        field: &'static str,
        /// The length the record gives.
        len: u32,
        /// The most that part may hold.
        limit: usize,
    },
    /// The metadata (or the whole legacy record) is not JSON of the expected shape.
    #[error("stored record: bad metadata: {0}")]
    Json(#[source] serde_json::Error),
    /// The Welcome's presence byte is neither 0 nor 1.
    #[error("stored record: bad Welcome marker {0:#04x}")]
    BadMarker(u8),
    /// Bytes follow the last part of the record.
    #[error("stored record: {0} bytes after the end")]
    TrailingBytes(usize),
}

/// A commit of ours that the server may or may not hold yet. Stored under
/// `state/commit/‖group id` in the vault transaction that creates the commit and removed in
/// the one that merges or drops it, so a crash at any point leaves either nothing or this
/// record; the next flush sends it again under the same message id (the server recognises the
/// repeat) and merges it.
#[derive(serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(Debug, Clone, PartialEq, Eq))]
pub(crate) struct PendingCommit {
    pub(crate) conv: GroupId,
    pub(crate) commit: Vec<u8>,
    pub(crate) commit_to: Vec<Vec<u8>>,
    pub(crate) message_id: MessageId,
    pub(crate) welcome: Option<Vec<u8>>,
    pub(crate) welcome_to: Vec<Vec<u8>>,
    pub(crate) welcome_id: MessageId,
    /// Tell newcomers the group's name and topic once merged.
    #[serde(default)]
    pub(crate) announce: bool,
    /// The system line our history gets once merged.
    #[serde(default)]
    pub(crate) system: Option<String>,
    /// The slot this commit claims: its epoch's (PROTOCOL.md §6.9). Absent in 0.2 records,
    /// whose epoch is still the group's.
    #[serde(default)]
    pub(crate) slot: Option<[u8; 16]>,
    /// What the commit does, to make it again if another member's commit wins the slot.
    #[serde(default)]
    pub(crate) intent: Option<Intent>,
    /// How many times the change was already redone.
    #[serde(default)]
    pub(crate) attempt: u8,
}

/// What a commit of ours is for, so that it can be made again in the next epoch when another
/// member's commit wins the epoch's slot.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq, Eq))]
pub(crate) enum Intent {
    /// Add these accounts with these KeyPackages (kept: a commit that lost had its Welcome
    /// never sent, so the packages were used for nothing).
    Add { kps: Vec<Vec<u8>>, ids: Vec<[u8; 32]> },
    /// Remove these accounts.
    Remove { ids: Vec<[u8; 32]> },
    /// Make an account an admin or not.
    Admin { id: [u8; 32], admin: bool },
    /// Update our own keys.
    Rotate,
    /// Commit the pending self-removals of these members.
    Leave { ids: Vec<[u8; 32]> },
}

/// A message waiting for the server.
#[derive(serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(Debug, Clone, PartialEq, Eq))]
pub(crate) struct OutboxItem {
    pub(crate) conv: GroupId,
    pub(crate) to: Vec<Vec<u8>>,
    pub(crate) payload: Vec<u8>,
    pub(crate) message_id: MessageId,
}

/// The metadata of an [`OutboxItem`] in the binary form, as written.
#[derive(Serialize)]
struct OutboxMetaRef<'a> {
    conv: &'a GroupId,
    to: &'a [Vec<u8>],
    message_id: &'a MessageId,
}

/// The metadata of an [`OutboxItem`] in the binary form, as read.
#[derive(Deserialize)]
struct OutboxMeta {
    conv: GroupId,
    to: Vec<Vec<u8>>,
    message_id: MessageId,
}

/// The metadata of a [`PendingCommit`] in the binary form, as written.
#[derive(Serialize)]
struct CommitMetaRef<'a> {
    conv: &'a GroupId,
    commit_to: &'a [Vec<u8>],
    message_id: &'a MessageId,
    welcome_to: &'a [Vec<u8>],
    welcome_id: &'a MessageId,
    announce: bool,
    system: &'a Option<String>,
    slot: &'a Option<[u8; 16]>,
    intent: &'a Option<Intent>,
    attempt: u8,
}

/// The metadata of a [`PendingCommit`] in the binary form, as read. Fields added later get
/// `#[serde(default)]`, as in the legacy form.
#[derive(Deserialize)]
struct CommitMeta {
    conv: GroupId,
    commit_to: Vec<Vec<u8>>,
    message_id: MessageId,
    welcome_to: Vec<Vec<u8>>,
    welcome_id: MessageId,
    #[serde(default)]
    announce: bool,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    slot: Option<[u8; 16]>,
    #[serde(default)]
    intent: Option<Intent>,
    #[serde(default)]
    attempt: u8,
}

impl OutboxItem {
    /// The stored form (binary; legacy JSON if a part is over its limit).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let meta =
            json(&OutboxMetaRef { conv: &self.conv, to: &self.to, message_id: &self.message_id });
        if meta.len() > MAX_METADATA || self.payload.len() > MAX_CIPHERTEXT {
            return json(self);
        }
        let mut out = Vec::with_capacity(1 + 4 + meta.len() + 4 + self.payload.len());
        out.push(BINARY_V1);
        put(&mut out, &meta);
        put(&mut out, &self.payload);
        out
    }

    /// Reads a stored record in either form.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = match form(bytes)? {
            Form::Legacy => return serde_json::from_slice(bytes).map_err(RecordError::Json),
            Form::Binary(r) => r,
        };
        let meta: OutboxMeta = r.metadata()?;
        let payload = r.ciphertext("payload")?.to_vec();
        r.finish()?;
        Ok(Self { conv: meta.conv, to: meta.to, payload, message_id: meta.message_id })
    }
}

impl PendingCommit {
    /// The stored form (binary; legacy JSON if a part is over its limit).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let meta = json(&CommitMetaRef {
            conv: &self.conv,
            commit_to: &self.commit_to,
            message_id: &self.message_id,
            welcome_to: &self.welcome_to,
            welcome_id: &self.welcome_id,
            announce: self.announce,
            system: &self.system,
            slot: &self.slot,
            intent: &self.intent,
            attempt: self.attempt,
        });
        let welcome_len = self.welcome.as_ref().map_or(0, Vec::len);
        if meta.len() > MAX_METADATA
            || self.commit.len() > MAX_CIPHERTEXT
            || welcome_len > MAX_CIPHERTEXT
        {
            return json(self);
        }
        let mut out =
            Vec::with_capacity(1 + 4 + meta.len() + 4 + self.commit.len() + 1 + 4 + welcome_len);
        out.push(BINARY_V1);
        put(&mut out, &meta);
        put(&mut out, &self.commit);
        match &self.welcome {
            None => out.push(NO_WELCOME),
            Some(w) => {
                out.push(WELCOME);
                put(&mut out, w);
            }
        }
        out
    }

    /// Reads a stored record in either form (legacy records of v0.2 have no slot, intent or
    /// attempt: `None`, `None`, 0).
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = match form(bytes)? {
            Form::Legacy => return serde_json::from_slice(bytes).map_err(RecordError::Json),
            Form::Binary(r) => r,
        };
        let meta: CommitMeta = r.metadata()?;
        let commit = r.ciphertext("commit")?.to_vec();
        let welcome = match r.byte("welcome marker")? {
            NO_WELCOME => None,
            WELCOME => Some(r.ciphertext("welcome")?.to_vec()),
            other => return Err(RecordError::BadMarker(other)),
        };
        r.finish()?;
        Ok(Self {
            conv: meta.conv,
            commit,
            commit_to: meta.commit_to,
            message_id: meta.message_id,
            welcome,
            welcome_to: meta.welcome_to,
            welcome_id: meta.welcome_id,
            announce: meta.announce,
            system: meta.system,
            slot: meta.slot,
            intent: meta.intent,
            attempt: meta.attempt,
        })
    }
}

/// serde_json of a record or its metadata.
fn json(v: &impl Serialize) -> Vec<u8> {
    // serde_json fails only for maps with non-string keys and for `Serialize` impls that
    // return errors; these records have neither (every shape is covered by the tests), so
    // this cannot fail, and a failure would be a bug to stop at rather than an unreadable
    // record to store.
    serde_json::to_vec(v).expect("records serialize to JSON")
}

/// Appends `len u32 BE ‖ bytes`. The caller has checked the length against its limit.
fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Which form a stored record is in.
enum Form<'a> {
    Legacy,
    /// The binary form, positioned after its tag.
    Binary(Reader<'a>),
}

fn form(bytes: &[u8]) -> Result<Form<'_>, RecordError> {
    match bytes.split_first() {
        None => Err(RecordError::Truncated { field: "tag" }),
        Some((&LEGACY_JSON, _)) => Ok(Form::Legacy),
        Some((&BINARY_V1, rest)) => Ok(Form::Binary(Reader { rest })),
        Some((&tag, _)) => Err(RecordError::UnknownTag(tag)),
    }
}

/// Reads the binary form front to back; every length is checked before it is used.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self, field: &'static str) -> Result<u8, RecordError> {
        let (&b, rest) = self.rest.split_first().ok_or(RecordError::Truncated { field })?;
        self.rest = rest;
        Ok(b)
    }

    /// `len u32 BE ‖ bytes`, with `len` at most `limit` and at most what remains.
    fn prefixed(&mut self, field: &'static str, limit: usize) -> Result<&'a [u8], RecordError> {
        let (len, rest) =
            self.rest.split_first_chunk::<4>().ok_or(RecordError::Truncated { field })?;
        let len = u32::from_be_bytes(*len);
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        if n > limit {
            return Err(RecordError::TooLong { field, len, limit });
        }
        let (bytes, rest) = rest.split_at_checked(n).ok_or(RecordError::Truncated { field })?;
        self.rest = rest;
        Ok(bytes)
    }

    fn metadata<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, RecordError> {
        let bytes = self.prefixed("metadata", MAX_METADATA)?;
        serde_json::from_slice(bytes).map_err(RecordError::Json)
    }

    fn ciphertext(&mut self, field: &'static str) -> Result<&'a [u8], RecordError> {
        self.prefixed(field, MAX_CIPHERTEXT)
    }

    fn finish(self) -> Result<(), RecordError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(RecordError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Legacy records as v0.1–v0.3 clients wrote them (see the README beside them).
    const OUTBOX_V03: &[u8] = include_bytes!("../../tests/fixtures/records/outbox-v0.3.json");
    const COMMIT_V02: &[u8] =
        include_bytes!("../../tests/fixtures/records/pending-commit-v0.2.json");
    const COMMIT_V03: &[u8] =
        include_bytes!("../../tests/fixtures/records/pending-commit-v0.3.json");
    const COMMIT_V03_ROTATE: &[u8] =
        include_bytes!("../../tests/fixtures/records/pending-commit-v0.3-rotate.json");

    /// `n` bytes counting up from `start`: every field distinct, so a mix-up shows.
    fn bytes(start: u8, n: usize) -> Vec<u8> {
        (0..n).map(|i| start.wrapping_add(i as u8)).collect()
    }

    fn arr<const N: usize>(start: u8) -> [u8; N] {
        bytes(start, N).try_into().unwrap()
    }

    /// What the outbox fixture holds.
    fn outbox_fixture() -> OutboxItem {
        OutboxItem {
            conv: bytes(0x10, 16).into(),
            to: vec![bytes(0x20, 32), bytes(0x40, 32)],
            payload: bytes(0x80, 48),
            message_id: arr(0x60).into(),
        }
    }

    /// What the v0.3 commit fixture holds (an add, with its Welcome).
    fn commit_v03_fixture() -> PendingCommit {
        PendingCommit {
            conv: bytes(0x10, 16).into(),
            commit: bytes(0x80, 40),
            commit_to: vec![bytes(0x20, 32)],
            message_id: arr(0x60).into(),
            welcome: Some(bytes(0xc0, 24)),
            welcome_to: vec![bytes(0x40, 32)],
            welcome_id: arr(0x70).into(),
            announce: true,
            system: Some("alice added carol · café ✓".into()),
            slot: Some(arr(0x90)),
            intent: Some(Intent::Add { kps: vec![bytes(0xa0, 20)], ids: vec![arr(0x40)] }),
            attempt: 1,
        }
    }

    /// What the v0.3 rotation fixture holds (no Welcome, a unit intent).
    fn commit_v03_rotate_fixture() -> PendingCommit {
        PendingCommit {
            conv: bytes(0x10, 16).into(),
            commit: bytes(0x80, 40),
            commit_to: vec![bytes(0x20, 32), bytes(0x40, 32)],
            message_id: arr(0x60).into(),
            welcome: None,
            welcome_to: vec![],
            welcome_id: arr(0x70).into(),
            announce: false,
            system: None,
            slot: Some(arr(0x90)),
            intent: Some(Intent::Rotate),
            attempt: 0,
        }
    }

    /// What the v0.2 commit fixture holds: no slot, intent or attempt in the record.
    fn commit_v02_fixture() -> PendingCommit {
        PendingCommit {
            conv: bytes(0x10, 16).into(),
            commit: bytes(0x80, 40),
            commit_to: vec![bytes(0x20, 32)],
            message_id: arr(0x60).into(),
            welcome: Some(bytes(0xc0, 24)),
            welcome_to: vec![bytes(0x40, 32)],
            welcome_id: arr(0x70).into(),
            announce: true,
            system: Some("alice added bob".into()),
            slot: None,
            intent: None,
            attempt: 0,
        }
    }

    /// Every shape of pending commit: each intent, with and without a Welcome and the
    /// optional fields.
    fn commits() -> Vec<PendingCommit> {
        let intents = [
            None,
            Some(Intent::Add { kps: vec![bytes(1, 300), vec![]], ids: vec![arr(2), arr(3)] }),
            Some(Intent::Remove { ids: vec![arr(4)] }),
            Some(Intent::Admin { id: arr(5), admin: true }),
            Some(Intent::Admin { id: arr(5), admin: false }),
            Some(Intent::Rotate),
            Some(Intent::Leave { ids: vec![] }),
        ];
        let mut out = vec![commit_v02_fixture(), commit_v03_fixture()];
        for (i, intent) in intents.into_iter().enumerate() {
            let mut c = commit_v03_rotate_fixture();
            c.intent = intent;
            c.attempt = i as u8;
            c.welcome = (i % 2 == 0).then(|| bytes(i as u8, i * 7));
            c.commit = bytes(9, i * 13);
            c.system = (i % 3 == 0).then(|| format!("line {i}"));
            out.push(c);
        }
        out
    }

    #[test]
    fn records_round_trip_in_the_binary_form() {
        for c in commits() {
            let enc = c.encode();
            assert_eq!(enc[0], BINARY_V1);
            assert_eq!(PendingCommit::decode(&enc).unwrap(), c);
        }
        let mut item = outbox_fixture();
        for payload in [vec![], bytes(7, 1), bytes(7, 5000)] {
            item.payload = payload;
            let enc = item.encode();
            assert_eq!(enc[0], BINARY_V1);
            assert_eq!(OutboxItem::decode(&enc).unwrap(), item);
        }
    }

    #[test]
    fn legacy_records_of_earlier_releases_still_decode() {
        assert_eq!(OutboxItem::decode(OUTBOX_V03).unwrap(), outbox_fixture());
        assert_eq!(PendingCommit::decode(COMMIT_V02).unwrap(), commit_v02_fixture());
        assert_eq!(PendingCommit::decode(COMMIT_V03).unwrap(), commit_v03_fixture());
        assert_eq!(PendingCommit::decode(COMMIT_V03_ROTATE).unwrap(), commit_v03_rotate_fixture());
        // The fixtures are what serde_json writes for these records (the legacy form is also
        // what `encode` falls back to): they were not edited by hand.
        assert_eq!(json(&outbox_fixture()), OUTBOX_V03);
        assert_eq!(json(&commit_v03_fixture()), COMMIT_V03);
        assert_eq!(json(&commit_v03_rotate_fixture()), COMMIT_V03_ROTATE);
        // Migrated: written again, they take the binary form and read back the same.
        for (legacy, c) in [(COMMIT_V02, commit_v02_fixture()), (COMMIT_V03, commit_v03_fixture())]
        {
            let again = PendingCommit::decode(legacy).unwrap().encode();
            assert_eq!(again[0], BINARY_V1);
            assert_eq!(PendingCommit::decode(&again).unwrap(), c);
        }
    }

    #[test]
    fn the_binary_form_is_smaller_than_json() {
        let mut item = outbox_fixture();
        item.payload = (0..1024u32).map(|i| (i * 131 % 251) as u8).collect();
        let (binary, legacy) = (item.encode().len(), json(&item).len());
        assert!(binary < legacy, "binary {binary} bytes, JSON {legacy} bytes");
        // The payload is stored as itself: only the ids' metadata comes on top.
        assert!(binary < 1024 + 400, "binary {binary} bytes");
        let mut commit = commit_v03_fixture();
        commit.commit = item.payload.clone();
        commit.welcome = Some(item.payload.clone());
        assert!(commit.encode().len() < json(&commit).len());
    }

    #[test]
    fn records_over_a_limit_fall_back_to_the_legacy_form() {
        let mut item = outbox_fixture();
        item.payload = vec![7; MAX_CIPHERTEXT + 1];
        let enc = item.encode();
        assert_eq!(enc[0], LEGACY_JSON);
        assert_eq!(OutboxItem::decode(&enc).unwrap(), item);
    }

    #[test]
    fn every_prefix_of_a_record_is_an_error() {
        let mut encodings: Vec<Vec<u8>> = commits().iter().map(PendingCommit::encode).collect();
        encodings.push(outbox_fixture().encode());
        for enc in &encodings {
            for n in 0..enc.len() {
                assert!(PendingCommit::decode(&enc[..n]).is_err(), "prefix {n} of {enc:?}");
                assert!(OutboxItem::decode(&enc[..n]).is_err(), "prefix {n} of {enc:?}");
            }
        }
        for legacy in [OUTBOX_V03, COMMIT_V02, COMMIT_V03] {
            for n in 0..legacy.len() {
                assert!(matches!(
                    (PendingCommit::decode(&legacy[..n]), OutboxItem::decode(&legacy[..n])),
                    (Err(_), Err(_))
                ));
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let item = outbox_fixture().encode();
        let commit = commit_v03_fixture().encode();
        // Every other first byte.
        for tag in 0..=u8::MAX {
            if tag != BINARY_V1 && tag != LEGACY_JSON {
                assert!(matches!(
                    OutboxItem::decode(&[tag, 0, 0, 0, 0]),
                    Err(RecordError::UnknownTag(t)) if t == tag
                ));
            }
        }
        // Lengths over the limit, or over what remains, before any allocation.
        let huge = [BINARY_V1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            OutboxItem::decode(&huge),
            Err(RecordError::TooLong { field: "metadata", len: u32::MAX, .. })
        ));
        let mut over = item.clone();
        over.truncate(over.len() - 48 - 4);
        over.extend_from_slice(&(MAX_CIPHERTEXT as u32 + 1).to_be_bytes());
        assert!(matches!(
            OutboxItem::decode(&over),
            Err(RecordError::TooLong { field: "payload", .. })
        ));
        let short = [BINARY_V1, 0, 0, 0, 9, b'{', b'}'];
        assert!(matches!(
            OutboxItem::decode(&short),
            Err(RecordError::Truncated { field: "metadata" })
        ));
        // Bad JSON in the metadata, or a legacy record of the wrong shape.
        assert!(matches!(
            OutboxItem::decode(&[BINARY_V1, 0, 0, 0, 2, b'{', b'x']),
            Err(RecordError::Json(_))
        ));
        assert!(matches!(OutboxItem::decode(b"{\"conv\":1}"), Err(RecordError::Json(_))));
        assert!(matches!(OutboxItem::decode(COMMIT_V03), Err(RecordError::Json(_))));
        assert!(matches!(OutboxItem::decode(&commit), Err(RecordError::Json(_))));
        // Trailing bytes; a bad Welcome marker.
        let mut trailing = item.clone();
        trailing.push(0);
        assert!(matches!(OutboxItem::decode(&trailing), Err(RecordError::TrailingBytes(1))));
        let mut marker = commit_v03_rotate_fixture().encode();
        *marker.last_mut().unwrap() = 2;
        assert!(matches!(PendingCommit::decode(&marker), Err(RecordError::BadMarker(2))));
        // Every byte of valid records flipped, and pseudo-random inputs: never a panic.
        for enc in [&item, &commit] {
            for i in 0..enc.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = enc.clone();
                    bad[i] ^= flip;
                    let _ = OutboxItem::decode(&bad);
                    let _ = PendingCommit::decode(&bad);
                }
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for n in 0..2000 {
            let mut input = vec![if n % 2 == 0 { BINARY_V1 } else { LEGACY_JSON }];
            for _ in 0..n % 64 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.push(state as u8);
            }
            let _ = OutboxItem::decode(&input);
            let _ = PendingCommit::decode(&input);
        }
    }
}
