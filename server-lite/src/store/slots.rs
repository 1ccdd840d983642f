//! Epoch commit slots: per-epoch, first-come lists of commit claims (methods 207, 208).
//!
//! A slot is named by a 16-byte id that only members of an MLS epoch can compute; the server
//! learns it when a member uses it. [`Store::claim_slot`] enqueues a commit for its recipients
//! (the BatchEnqueue path, [`enqueue_in`]) and appends it to the slot in the same job, so a
//! claim is in the slot exactly when some recipient's queue took the commit. The server never
//! judges a claim; clients take the first valid one as the epoch's winner.
//!
//! A slot lives while any member may still need its winner: every claim stored in it pushes
//! its expiry to at least `max_ttl_secs` after the claim, later than any queued copy of that
//! claim. The sweep closes an expired slot ([`close_slot_in`]): its claims go and their counts
//! are given back, but a tombstone stays for another `max_ttl_secs`. An expired or closed slot
//! reads as empty and refuses claims ([`ClaimOutcome::Closed`]), so an epoch's slot is never
//! started afresh with a new first claim.
//!
//! Every lookup is a point or range lookup on the slot id (or the claimer): nothing here
//! scans a whole table.

use std::sync::Arc;

use redb::{ReadableTable, WriteTransaction};

use super::delivery::{EnqueueItem, EnqueueOutcome, QueueLimits, enqueue_in};
use super::records::{Claim, ClaimUsage, SlotHeader};
use super::tables::*;
use super::{Store, StoreError, change_stored_bytes};

/// Length of a slot id.
pub const SLOT_ID_LEN: usize = 16;

/// Limits on slots and claims.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    /// Claims one slot holds at most.
    pub max_claims: u32,
    /// Claims one account may hold across the slots not yet swept.
    pub max_open_claims: u64,
    /// Payload bytes of those claims at most (each keeps a copy of its commit in the slot).
    pub max_open_claim_bytes: u64,
    /// How long a slot lives after its latest claim, ms; its tombstone lives as long again.
    pub ttl_ms: u64,
}

/// A claim as [`Store::claim_slot`] takes it.
#[derive(Debug, Clone)]
pub struct SlotClaim {
    /// The slot id.
    pub slot: [u8; SLOT_ID_LEN],
    /// Who claims (the caller's identity key).
    pub claimer: [u8; 32],
    /// The claim's idempotency key; also the message id of the enqueued copies.
    pub message_id: [u8; 16],
    /// The commit.
    pub payload: Arc<Vec<u8>>,
    /// The commit for each recipient, as BatchEnqueue would store it.
    pub items: Vec<EnqueueItem>,
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Appended at `position` (the slot now holds `total`) and enqueued; `outcomes` answer the
    /// items in order.
    Claimed {
        /// Index of the claim in the slot.
        position: u32,
        /// Claims in the slot, this one included.
        total: u32,
        /// Per recipient.
        outcomes: Vec<EnqueueOutcome>,
    },
    /// The slot expired: it takes no more claims (its epoch is over), and never starts again
    /// while its tombstone lasts.
    Closed,
    /// The claimer's claim with this message id is already in the slot; nothing was written
    /// or enqueued.
    Duplicate {
        /// Its index.
        position: u32,
        /// Claims in the slot.
        total: u32,
    },
    /// The claimer already holds a claim with another message id in the slot.
    AlreadyClaimed {
        /// Index of the claim it holds.
        position: u32,
        /// Claims in the slot.
        total: u32,
    },
    /// The slot holds [`SlotLimits::max_claims`] claims.
    SlotFull {
        /// Claims in the slot.
        total: u32,
    },
    /// The claimer holds [`SlotLimits::max_open_claims`] claims already.
    TooManyOpenClaims,
    /// The claimer's open claims and this one would hold more than
    /// [`SlotLimits::max_open_claim_bytes`] payload bytes.
    TooManyOpenClaimBytes,
    /// No recipient's queue took the commit (all outcomes are refusals); the slot is
    /// unchanged.
    NotDelivered {
        /// Claims in the slot (0: it does not exist).
        total: u32,
        /// Per recipient.
        outcomes: Vec<EnqueueOutcome>,
    },
    /// The disk budget cannot take the commit's copies; nothing was stored.
    StorageFull,
}

/// Claims read from a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotClaims {
    /// The payloads of claims `from`, `from + 1`, ...
    pub claims: Vec<Vec<u8>>,
    /// Claims in the slot (0: it does not exist, has expired or is closed).
    pub total: u32,
}

impl Store {
    /// Claims a place in a slot for `claim.payload`, enqueueing it to `claim.items`'
    /// recipients in the same job (see [`ClaimOutcome`] for the order of the checks). Returns
    /// once durable.
    pub async fn claim_slot(
        &self,
        claim: SlotClaim,
        queue: QueueLimits,
        limits: SlotLimits,
        now_ms: u64,
    ) -> Result<ClaimOutcome, StoreError> {
        self.write(move |txn| claim_in(txn, &claim, &queue, &limits, now_ms)).await
    }

    /// Up to `limit` claims of a live slot from index `from`, stopping before their payloads
    /// (plus 64 bytes each) would exceed `max_bytes`; at least one if any exists at or after
    /// `from`.
    pub fn fetch_slot(
        &self,
        slot: &[u8; SLOT_ID_LEN],
        from: u32,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<SlotClaims, StoreError> {
        let txn = self.read()?;
        let header = match txn.open_table(SLOTS)?.get(slot.as_slice())? {
            Some(v) => SlotHeader::decode(v.value())?,
            None => return Ok(SlotClaims { claims: Vec::new(), total: 0 }),
        };
        if !header.is_live(now_ms) {
            return Ok(SlotClaims { claims: Vec::new(), total: 0 });
        }
        let mut claims = Vec::new();
        if from < header.count && limit > 0 {
            let t = txn.open_table(SLOT_CLAIMS)?;
            let mut bytes = 0usize;
            for row in t.range((slot.as_slice(), from)..(slot.as_slice(), header.count))? {
                let (_, v) = row?;
                let c = Claim::decode(v.value())?;
                bytes = bytes.saturating_add(c.payload.len()).saturating_add(64);
                if bytes > max_bytes && !claims.is_empty() {
                    break;
                }
                claims.push(c.payload);
                if claims.len() >= limit {
                    break;
                }
            }
        }
        Ok(SlotClaims { claims, total: header.count })
    }

    /// Claims `identity` holds in slots not yet swept, and their payload bytes.
    pub fn open_claims(&self, identity: &[u8; 32]) -> Result<(u64, u64), StoreError> {
        let t = self.read()?.open_table(CLAIM_USAGE)?;
        let u = claim_usage_of(&t, identity)?;
        Ok((u.claims, u.bytes))
    }
}

impl SlotHeader {
    /// Whether the slot takes claims and shows them at `now_ms`.
    fn is_live(&self, now_ms: u64) -> bool {
        !self.closed && self.expires_ms > now_ms
    }
}

fn claim_usage_of(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    identity: &[u8],
) -> Result<ClaimUsage, StoreError> {
    t.get(identity)?.map_or(Ok(ClaimUsage::default()), |v| ClaimUsage::decode(v.value()))
}

/// The [`SLOT_CLAIMERS`] key.
fn claimer_key(slot: &[u8], claimer: &[u8; 32]) -> Vec<u8> {
    [slot, claimer.as_slice()].concat()
}

/// The [`EXPIRY`] reference of a slot.
fn slot_ref(slot: &[u8]) -> Vec<u8> {
    [&[EXPIRE_SLOT][..], slot].concat()
}

fn claim_in(
    txn: &WriteTransaction,
    claim: &SlotClaim,
    queue: &QueueLimits,
    limits: &SlotLimits,
    now_ms: u64,
) -> Result<ClaimOutcome, StoreError> {
    let slot = claim.slot.as_slice();
    let stored = txn.open_table(SLOTS)?.get(slot)?.map(|v| SlotHeader::decode(v.value()));
    let header = stored.transpose()?;
    // Expired (swept into a tombstone or not yet): the epoch's slot is over for good.
    if header.is_some_and(|h| !h.is_live(now_ms)) {
        return Ok(ClaimOutcome::Closed);
    }
    let total = header.map_or(0, |h| h.count);
    if header.is_some() {
        let own = txn
            .open_table(SLOT_CLAIMERS)?
            .get(claimer_key(slot, &claim.claimer).as_slice())?
            .map(|v| v.value());
        if let Some(position) = own {
            let c = txn.open_table(SLOT_CLAIMS)?.get((slot, position))?.map(|v| v.value().to_vec());
            let c = Claim::decode(&c.ok_or(StoreError::Corrupt("slot claim missing"))?)?;
            return Ok(if c.message_id == claim.message_id {
                ClaimOutcome::Duplicate { position, total }
            } else {
                ClaimOutcome::AlreadyClaimed { position, total }
            });
        }
    }
    if total >= limits.max_claims {
        return Ok(ClaimOutcome::SlotFull { total });
    }
    let open = claim_usage_of(&txn.open_table(CLAIM_USAGE)?, claim.claimer.as_slice())?;
    if open.claims >= limits.max_open_claims {
        return Ok(ClaimOutcome::TooManyOpenClaims);
    }
    let cost = claim.payload.len() as u64;
    if open.bytes.saturating_add(cost) > limits.max_open_claim_bytes {
        return Ok(ClaimOutcome::TooManyOpenClaimBytes);
    }
    let enqueued = enqueue_in(txn, &claim.items, queue, now_ms, cost)?;
    if enqueued.storage_full {
        return Ok(ClaimOutcome::StorageFull);
    }
    let outcomes = enqueued.outcomes;
    if !outcomes.iter().any(|o| matches!(o, EnqueueOutcome::Stored { .. })) {
        return Ok(ClaimOutcome::NotDelivered { total, outcomes });
    }
    let position = total;
    let Some(total) = total.checked_add(1) else {
        // Unreachable below `max_claims` (a u32); kept so no count can wrap.
        return Ok(ClaimOutcome::SlotFull { total });
    };
    // The slot outlives this claim's queued copies (they live `max_ttl_secs` at most): its
    // expiry moves to `ttl_ms` from now if that is later, and its EXPIRY entry with it.
    let at = now_ms.saturating_add(limits.ttl_ms);
    let expires_ms = header.map_or(at, |h| h.expires_ms.max(at));
    if header.is_none_or(|h| h.expires_ms != expires_ms) {
        let mut expiry = txn.open_table(EXPIRY)?;
        if let Some(h) = header {
            expiry.remove((h.expires_ms, slot_ref(slot).as_slice()))?;
        }
        expiry.insert((expires_ms, slot_ref(slot).as_slice()), ())?;
    }
    let record = Claim {
        claimer: claim.claimer,
        message_id: claim.message_id.to_vec(),
        payload: claim.payload.to_vec(),
    };
    txn.open_table(SLOT_CLAIMS)?.insert((slot, position), record.encode().as_slice())?;
    txn.open_table(SLOT_CLAIMERS)?
        .insert(claimer_key(slot, &claim.claimer).as_slice(), position)?;
    txn.open_table(SLOTS)?
        .insert(slot, SlotHeader { count: total, expires_ms, closed: false }.encode().as_slice())?;
    let open = ClaimUsage {
        claims: open.claims.saturating_add(1),
        bytes: open.bytes.saturating_add(cost),
    };
    txn.open_table(CLAIM_USAGE)?.insert(claim.claimer.as_slice(), open.encode().as_slice())?;
    change_stored_bytes(txn, cost, 0)?;
    Ok(ClaimOutcome::Claimed { position, total, outcomes })
}

/// What the sweep did to a slot whose [`EXPIRY`] entry came due.
pub(super) enum Swept {
    /// An open slot closed: its claims (this many) were deleted, a tombstone stays.
    Closed(u64),
    /// A tombstone was removed.
    Forgotten,
}

/// Sweeps the slot whose current expiry is `at` (`header`): an open slot loses its claims and
/// gives back what they counted (each claimer's open claims and bytes, the server's stored
/// bytes), and becomes a tombstone until `at + tombstone_ms`; a tombstone is deleted.
pub(super) fn sweep_slot_in(
    txn: &WriteTransaction,
    slot: &[u8],
    header: &SlotHeader,
    tombstone_ms: u64,
) -> Result<Swept, StoreError> {
    txn.open_table(EXPIRY)?.remove((header.expires_ms, slot_ref(slot).as_slice()))?;
    if header.closed {
        txn.open_table(SLOTS)?.remove(slot)?;
        return Ok(Swept::Forgotten);
    }
    let gone = close_slot_in(txn, slot)?;
    // Strictly later, so the sweep that closed it cannot find the tombstone due again.
    let until = header.expires_ms.saturating_add(tombstone_ms.max(1));
    let tombstone = SlotHeader { count: 0, expires_ms: until, closed: true };
    txn.open_table(SLOTS)?.insert(slot, tombstone.encode().as_slice())?;
    txn.open_table(EXPIRY)?.insert((until, slot_ref(slot).as_slice()), ())?;
    Ok(Swept::Closed(gone))
}

/// Deletes a slot's claims and claimer rows, and gives back what they counted: each claimer's
/// open claims and bytes, and the server's stored bytes. Returns the number of claims removed.
fn close_slot_in(txn: &WriteTransaction, slot: &[u8]) -> Result<u64, StoreError> {
    let mut gone = Vec::new();
    {
        let t = txn.open_table(SLOT_CLAIMS)?;
        for row in t.range((slot, 0u32)..=(slot, u32::MAX))? {
            let (k, v) = row?;
            let c = Claim::decode(v.value())?;
            gone.push((k.value().1, c.claimer, c.payload.len() as u64));
        }
    }
    let mut per_claimer = std::collections::BTreeMap::<[u8; 32], ClaimUsage>::new();
    let mut freed = 0u64;
    {
        let mut claims = txn.open_table(SLOT_CLAIMS)?;
        let mut claimers = txn.open_table(SLOT_CLAIMERS)?;
        for (index, claimer, bytes) in &gone {
            claims.remove((slot, *index))?;
            claimers.remove(claimer_key(slot, claimer).as_slice())?;
            let u = per_claimer.entry(*claimer).or_default();
            u.claims += 1;
            u.bytes = u.bytes.saturating_add(*bytes);
            freed = freed.saturating_add(*bytes);
        }
    }
    {
        let mut usage = txn.open_table(CLAIM_USAGE)?;
        for (claimer, n) in per_claimer {
            let open = claim_usage_of(&usage, claimer.as_slice())?;
            // Rows of the count-only layout hold no bytes: those give back what there is.
            let left = ClaimUsage {
                claims: open.claims.saturating_sub(n.claims),
                bytes: open.bytes.saturating_sub(n.bytes),
            };
            if left.claims == 0 {
                usage.remove(claimer.as_slice())?;
            } else {
                usage.insert(claimer.as_slice(), left.encode().as_slice())?;
            }
        }
    }
    change_stored_bytes(txn, 0, freed)?;
    Ok(gone.len() as u64)
}

/// The header of the slot an [`EXPIRY`] entry at `at` names, if that entry is the slot's
/// current one (a stale entry must not take a newer slot of the same id with it).
pub(super) fn expiring_slot(
    slots: &impl ReadableTable<&'static [u8], &'static [u8]>,
    slot: &[u8],
    at: u64,
) -> Result<Option<SlotHeader>, StoreError> {
    let header = slots.get(slot)?.map(|v| SlotHeader::decode(v.value())).transpose()?;
    Ok(header.filter(|h| h.expires_ms == at))
}
