//! Delivery queues: durable, per (recipient, channel), ordered by a server-assigned seq.

use redb::{ReadableTable, Table, WriteTransaction};

use super::records::{Queued, SenderUsage, Usage};
use super::tables::*;
use super::{Store, StoreError, change_stored_bytes, stored_bytes, usage_of};

/// One message for one recipient, as handed to [`Store::enqueue`].
#[derive(Clone, Debug)]
pub struct EnqueueItem {
    /// Recipient identity key.
    pub recipient: [u8; 32],
    /// Channel id: empty (default channel) or 16 bytes.
    pub channel: Vec<u8>,
    /// Idempotency key: empty or 16 bytes.
    pub message_id: Vec<u8>,
    /// The (end-to-end encrypted) payload.
    pub payload: std::sync::Arc<Vec<u8>>,
    /// Absolute expiry, ms since the epoch.
    pub expires_ms: u64,
    /// Who sends it (the caller's identity key).
    pub sender: [u8; 32],
    /// Labelled an MLS handshake message (commit, proposal, Welcome) by its clear header:
    /// it may use the recipient's handshake reserve.
    pub handshake: bool,
}

/// Per-recipient result of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored (or already stored under the same message id, with `duplicate` set).
    Stored {
        /// The message's seq in its queue.
        seq: u64,
        /// An earlier enqueue with this message id already stored it.
        duplicate: bool,
    },
    /// No user has this identity key.
    UnknownRecipient,
    /// The recipient's queue is at its message or byte limit (for a handshake message, its
    /// reserve too).
    QueueFull,
    /// The sender's share of the recipient's queue (or reserve) is used up.
    SenderShare,
    /// The server's disk budget cannot take the batch; nothing new of it was stored.
    StorageFull,
}

/// Limits applied while enqueueing.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Messages a recipient may have queued across all channels.
    pub max_messages: u64,
    /// Payload bytes a recipient may have queued across all channels.
    pub max_bytes: u64,
    /// Of those, what one sender may hold: messages and bytes.
    pub sender_messages: u64,
    /// Payload bytes one sender may hold in one recipient's queues.
    pub sender_bytes: u64,
    /// Handshake messages a recipient's queue takes beyond `max_messages`.
    pub reserve_messages: u64,
    /// Handshake payload bytes a recipient's queue takes beyond `max_bytes`.
    pub reserve_bytes: u64,
    /// Of the reserve, what one sender may hold: messages.
    pub sender_reserve_messages: u64,
    /// ... and bytes.
    pub sender_reserve_bytes: u64,
    /// Stored bytes (queues and blobs, server-wide) up to which any message, and a slot
    /// claim's copy of its commit, is stored.
    pub disk_bytes: u64,
    /// Stored bytes up to which a handshake message is stored (at least `disk_bytes`).
    pub disk_handshake_bytes: u64,
    /// How long a message id is remembered for deduplication, ms.
    pub dedup_window_ms: u64,
}

impl QueueLimits {
    /// Limits without shares, reserve or disk budget: a recipient's quota is all there is.
    pub const fn quota_only(max_messages: u64, max_bytes: u64, dedup_window_ms: u64) -> Self {
        Self {
            max_messages,
            max_bytes,
            sender_messages: max_messages,
            sender_bytes: max_bytes,
            reserve_messages: 0,
            reserve_bytes: 0,
            sender_reserve_messages: 0,
            sender_reserve_bytes: 0,
            disk_bytes: u64::MAX,
            disk_handshake_bytes: u64::MAX,
            dedup_window_ms,
        }
    }
}

/// A message read from a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Seq in its queue.
    pub seq: u64,
    /// Payload.
    pub payload: Vec<u8>,
    /// Idempotency key given at enqueue (may be empty).
    pub message_id: Vec<u8>,
    /// When it was stored, ms since the epoch.
    pub enqueued_ms: u64,
}

/// The key of a queue: `identity || channel`.
pub fn queue_key(identity: &[u8; 32], channel: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + channel.len());
    k.extend_from_slice(identity);
    k.extend_from_slice(channel);
    k
}

impl Store {
    /// Stores each item (one transaction for all of them, shared with concurrent writers) and
    /// returns once durable. Outcomes are in item order. The new bytes of the whole call fit
    /// the disk budget or none are stored ([`EnqueueOutcome::StorageFull`]).
    pub async fn enqueue(
        &self,
        items: Vec<EnqueueItem>,
        limits: QueueLimits,
        now_ms: u64,
    ) -> Result<Vec<EnqueueOutcome>, StoreError> {
        self.write(move |txn| Ok(enqueue_in(txn, &items, &limits, now_ms, 0)?.outcomes)).await
    }

    /// Up to `limit` unexpired messages of a queue in seq order, stopping before their payloads
    /// would exceed `max_bytes` (at least one message is returned if any is queued).
    pub fn fetch(
        &self,
        queue_key: &[u8],
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let t = self.read()?.open_table(QUEUES)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for row in t.range((queue_key, 0u64)..=(queue_key, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let q = Queued::decode(v.value())?;
            if q.expires_ms <= now_ms {
                continue;
            }
            bytes += q.payload.len() + 64;
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(StoredEnvelope {
                seq: k.value().1,
                payload: q.payload,
                message_id: q.message_id,
                enqueued_ms: q.enqueued_ms,
            });
        }
        Ok(out)
    }

    /// Deletes every message of the queue with `seq <= seq_up_to`; returns how many.
    pub async fn ack(
        &self,
        identity: [u8; 32],
        queue_key: Vec<u8>,
        seq_up_to: u64,
    ) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut queues = txn.open_table(QUEUES)?;
            let mut gone = Vec::new();
            for row in
                queues.range((queue_key.as_slice(), 0u64)..=(queue_key.as_slice(), seq_up_to))?
            {
                let (k, v) = row?;
                let q = Queued::decode(v.value())?;
                gone.push((k.value().1, q.expires_ms, Gone::of(&q)));
            }
            if gone.is_empty() {
                return Ok(0);
            }
            let mut expiry = txn.open_table(EXPIRY)?;
            for (seq, expires, _) in &gone {
                queues.remove((queue_key.as_slice(), *seq))?;
                expiry.remove((*expires, message_ref(&queue_key, *seq).as_slice()))?;
            }
            drop((queues, expiry));
            let released: Vec<Gone> = gone.iter().map(|(_, _, g)| *g).collect();
            release(txn, &identity, &released)?;
            Ok(gone.len() as u64)
        })
        .await
    }

    /// What `sender` holds in `recipient`'s queues (messages, bytes; in the quota and in the
    /// handshake reserve).
    pub fn sender_usage(
        &self,
        recipient: &[u8; 32],
        sender: &[u8; 32],
    ) -> Result<(u64, u64, u64, u64), StoreError> {
        let t = self.read()?.open_table(SENDER_USAGE)?;
        let s = sender_usage_of(&t, &sender_key(recipient, sender))?;
        Ok((s.messages, s.bytes, s.reserve_messages, s.reserve_bytes))
    }

    /// Total messages queued for `identity` (all channels).
    pub fn queued_count(&self, identity: &[u8; 32]) -> Result<u64, StoreError> {
        let t = self.read()?.open_table(USAGE)?;
        Ok(usage_of(&t, identity)?.messages)
    }
}

/// What [`enqueue_in`] did.
pub(super) struct Enqueued {
    /// Per item, in item order.
    pub outcomes: Vec<EnqueueOutcome>,
    /// The disk budget refused the call, and nothing was written.
    pub storage_full: bool,
}

/// Stores each item in the caller's transaction: the body of [`Store::enqueue`], shared with
/// the slot claims (`slots.rs`), which store one more copy of the payload in the same job.
/// `slot_copy_bytes` is that copy: it is counted against the disk budget with the items, so
/// the call's new bytes fit whole or none are stored. The caller charges (and writes) the
/// slot copy itself.
///
/// The slot copy is a group change like the queued copies of a commit and is counted at the
/// handshake ceiling (`disk_handshake_bytes`, 100 %): a disk full of chat and files must still
/// carry group changes (PROTOCOL.md 6.8). What one account can keep in slots is bounded by
/// `max_open_claims` and `max_open_claim_bytes` instead.
pub(super) fn enqueue_in(
    txn: &WriteTransaction,
    items: &[EnqueueItem],
    limits: &QueueLimits,
    now_ms: u64,
    slot_copy_bytes: u64,
) -> Result<Enqueued, StoreError> {
    // Tables are opened once per job: opening and closing a table costs a lookup and a
    // write to redb's table of tables, which dominated a 100-recipient batch.
    let mut t = EnqueueTables {
        identities: txn.open_table(IDENTITIES)?,
        dedup: txn.open_table(DEDUP)?,
        usage: txn.open_table(USAGE)?,
        senders: txn.open_table(SENDER_USAGE)?,
        next: txn.open_table(QUEUE_NEXT)?,
        queues: txn.open_table(QUEUES)?,
        expiry: txn.open_table(EXPIRY)?,
    };
    let stored = stored_bytes(&txn.open_table(META)?)?;
    let mut seen = std::collections::HashSet::new();
    let pre = items.iter().map(|i| precheck(&t, i, &mut seen)).collect::<Result<Vec<_>, _>>()?;
    // The disk budget: the call's new bytes fit whole, or nothing new is stored.
    let mut total = stored;
    let mut over = false;
    if slot_copy_bytes > 0 {
        total = total.saturating_add(slot_copy_bytes);
        over |= total > limits.disk_handshake_bytes;
    }
    for (item, p) in items.iter().zip(&pre) {
        if matches!(p, Pre::Fresh) {
            total = total.saturating_add(item.payload.len() as u64);
            let cap = if item.handshake { limits.disk_handshake_bytes } else { limits.disk_bytes };
            over |= total > cap;
        }
    }
    if over {
        let outcomes = pre
            .iter()
            .map(|p| match p {
                Pre::Unknown => EnqueueOutcome::UnknownRecipient,
                Pre::Duplicate(seq) => EnqueueOutcome::Stored { seq: *seq, duplicate: true },
                Pre::Fresh | Pre::Again => EnqueueOutcome::StorageFull,
            })
            .collect();
        return Ok(Enqueued { outcomes, storage_full: true });
    }
    let mut added = 0u64;
    let mut outcomes = Vec::with_capacity(items.len());
    for (item, p) in items.iter().zip(pre) {
        let outcome = enqueue_one(&mut t, item, p, limits, now_ms)?;
        if matches!(outcome, EnqueueOutcome::Stored { duplicate: false, .. }) {
            added += item.payload.len() as u64;
        }
        outcomes.push(outcome);
    }
    drop(t);
    change_stored_bytes(txn, added, 0)?;
    Ok(Enqueued { outcomes, storage_full: false })
}

/// The EXPIRY reference of a queued message.
pub(super) fn message_ref(queue_key: &[u8], seq: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(1 + queue_key.len() + 8);
    r.push(EXPIRE_MESSAGE);
    r.extend_from_slice(queue_key);
    r.extend_from_slice(&seq.to_be_bytes());
    r
}

/// A message that left a queue, as the counters saw it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Gone {
    sender: Option<[u8; 32]>,
    reserve: bool,
    cost: u64,
}

impl Gone {
    pub(super) fn of(q: &Queued) -> Self {
        Self { sender: q.sender, reserve: q.reserve, cost: q.cost() }
    }
}

/// Lowers the usage counters of `recipient`, of each sender in its queues, and the server's
/// stored bytes, after messages left its queues.
pub(super) fn release(
    txn: &WriteTransaction,
    recipient: &[u8],
    gone: &[Gone],
) -> Result<(), StoreError> {
    let mut usage = txn.open_table(USAGE)?;
    let mut u = usage_of(&usage, recipient)?;
    let mut freed = 0u64;
    // What each sender gets back, summed first: an ack often covers many of one sender's.
    let mut per_sender = std::collections::BTreeMap::<[u8; 32], SenderUsage>::new();
    for g in gone {
        freed = freed.saturating_add(g.cost);
        let (messages, bytes) = if g.reserve {
            (&mut u.reserve_messages, &mut u.reserve_bytes)
        } else {
            (&mut u.messages, &mut u.message_bytes)
        };
        *messages = messages.saturating_sub(1);
        *bytes = bytes.saturating_sub(g.cost);
        // Messages stored by schema 1 have no sender, and no share was counted for them.
        let Some(sender) = g.sender else { continue };
        let d = per_sender.entry(sender).or_default();
        if g.reserve {
            d.reserve_messages += 1;
            d.reserve_bytes += g.cost;
        } else {
            d.messages += 1;
            d.bytes += g.cost;
        }
    }
    usage.insert(recipient, u.encode().as_slice())?;
    let mut senders = txn.open_table(SENDER_USAGE)?;
    for (sender, d) in per_sender {
        let key = [recipient, sender.as_slice()].concat();
        let s = sender_usage_of(&senders, &key)?;
        let s = SenderUsage {
            messages: s.messages.saturating_sub(d.messages),
            bytes: s.bytes.saturating_sub(d.bytes),
            reserve_messages: s.reserve_messages.saturating_sub(d.reserve_messages),
            reserve_bytes: s.reserve_bytes.saturating_sub(d.reserve_bytes),
        };
        if s.is_zero() {
            senders.remove(key.as_slice())?;
        } else {
            senders.insert(key.as_slice(), s.encode().as_slice())?;
        }
    }
    drop((usage, senders));
    change_stored_bytes(txn, 0, freed)
}

fn sender_key(recipient: &[u8; 32], sender: &[u8; 32]) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(recipient);
    k[32..].copy_from_slice(sender);
    k
}

fn sender_usage_of(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<SenderUsage, StoreError> {
    match t.get(key)? {
        Some(v) => SenderUsage::decode(v.value()),
        None => Ok(SenderUsage::default()),
    }
}

/// The tables one enqueue job writes, open for the whole job.
struct EnqueueTables<'t> {
    identities: Table<'t, &'static [u8], &'static str>,
    dedup: Table<'t, &'static [u8], u64>,
    usage: Table<'t, &'static [u8], &'static [u8]>,
    senders: Table<'t, &'static [u8], &'static [u8]>,
    next: Table<'t, &'static [u8], u64>,
    queues: Table<'t, (&'static [u8], u64), &'static [u8]>,
    expiry: Table<'t, (u64, &'static [u8]), ()>,
}

/// What an item is before quotas: for nobody, already stored, new, or a repeat of an earlier
/// item of the same job (a duplicate once that one is stored).
enum Pre {
    Unknown,
    Duplicate(u64),
    Fresh,
    Again,
}

fn precheck(
    t: &EnqueueTables<'_>,
    item: &EnqueueItem,
    seen: &mut std::collections::HashSet<Vec<u8>>,
) -> Result<Pre, StoreError> {
    if t.identities.get(item.recipient.as_slice())?.is_none() {
        return Ok(Pre::Unknown);
    }
    if !item.message_id.is_empty() {
        let dk = [queue_key(&item.recipient, &item.channel).as_slice(), &item.message_id].concat();
        if let Some(seq) = t.dedup.get(dk.as_slice())? {
            return Ok(Pre::Duplicate(seq.value()));
        }
        if !seen.insert(dk) {
            return Ok(Pre::Again);
        }
    }
    Ok(Pre::Fresh)
}

/// Where a new message goes: the queue's quota, the handshake reserve, or nowhere (and why).
fn place(
    u: &Usage,
    s: &SenderUsage,
    cost: u64,
    handshake: bool,
    l: &QueueLimits,
) -> Result<bool, EnqueueOutcome> {
    let queue_ok =
        u.messages < l.max_messages && u.message_bytes.saturating_add(cost) <= l.max_bytes;
    let share_ok = s.messages < l.sender_messages && s.bytes.saturating_add(cost) <= l.sender_bytes;
    if queue_ok && share_ok {
        return Ok(false);
    }
    if !handshake {
        return Err(if queue_ok { EnqueueOutcome::SenderShare } else { EnqueueOutcome::QueueFull });
    }
    let reserve_ok = u.reserve_messages < l.reserve_messages
        && u.reserve_bytes.saturating_add(cost) <= l.reserve_bytes;
    let reserve_share_ok = s.reserve_messages < l.sender_reserve_messages
        && s.reserve_bytes.saturating_add(cost) <= l.sender_reserve_bytes;
    match (reserve_ok, reserve_share_ok) {
        (true, true) => Ok(true),
        (true, false) => Err(EnqueueOutcome::SenderShare),
        // The reserve is full too: it is the queue that cannot take more, unless it was only
        // this sender's share of the quota that stopped the message.
        (false, _) if queue_ok => Err(EnqueueOutcome::SenderShare),
        (false, _) => Err(EnqueueOutcome::QueueFull),
    }
}

fn enqueue_one(
    t: &mut EnqueueTables<'_>,
    item: &EnqueueItem,
    pre: Pre,
    limits: &QueueLimits,
    now_ms: u64,
) -> Result<EnqueueOutcome, StoreError> {
    let qk = queue_key(&item.recipient, &item.channel);
    match pre {
        Pre::Unknown => return Ok(EnqueueOutcome::UnknownRecipient),
        Pre::Duplicate(seq) => return Ok(EnqueueOutcome::Stored { seq, duplicate: true }),
        Pre::Again => {
            let dk = [qk.as_slice(), &item.message_id].concat();
            if let Some(seq) = t.dedup.get(dk.as_slice())? {
                return Ok(EnqueueOutcome::Stored { seq: seq.value(), duplicate: true });
            }
        }
        Pre::Fresh => {}
    }
    let u = usage_of(&t.usage, &item.recipient)?;
    // Per-sender counts matter only once a queue holds half a sender's share: below that no
    // sender can be over its share. Not counting there keeps the common case (queues their
    // owners drain) free of a second counter per recipient and message, which cost fan-out
    // about 13 %. A sender can so hold its share plus part of the uncounted first half-share
    // (at most 1.5 shares). Handshake messages (rare, and the only ones the reserve takes) are
    // always counted.
    let counted = item.handshake
        || u.messages.saturating_mul(2) >= limits.sender_messages
        || u.message_bytes.saturating_mul(2) >= limits.sender_bytes;
    let skey = sender_key(&item.recipient, &item.sender);
    let s = if counted { sender_usage_of(&t.senders, &skey)? } else { SenderUsage::default() };
    let cost = item.payload.len() as u64;
    let reserve = match place(&u, &s, cost, item.handshake, limits) {
        Ok(reserve) => reserve,
        Err(refused) => return Ok(refused),
    };
    let seq = t.next.get(qk.as_slice())?.map_or(1, |v| v.value());
    t.next.insert(qk.as_slice(), seq + 1)?;
    let q = Queued {
        expires_ms: item.expires_ms,
        enqueued_ms: now_ms,
        message_id: item.message_id.clone(),
        payload: item.payload.to_vec(),
        // Only a counted message gives its sender's count back when it leaves.
        sender: counted.then_some(item.sender),
        reserve,
    };
    t.queues.insert((qk.as_slice(), seq), q.encode().as_slice())?;
    t.expiry.insert((item.expires_ms, message_ref(&qk, seq).as_slice()), ())?;
    if !item.message_id.is_empty() {
        let dk = [qk.as_slice(), &item.message_id].concat();
        t.dedup.insert(dk.as_slice(), seq)?;
        let mut r = vec![EXPIRE_DEDUP];
        r.extend_from_slice(&dk);
        t.expiry.insert((now_ms.saturating_add(limits.dedup_window_ms), r.as_slice()), ())?;
    }
    let (u, s) = if reserve {
        (
            Usage {
                reserve_messages: u.reserve_messages + 1,
                reserve_bytes: u.reserve_bytes + cost,
                ..u
            },
            SenderUsage {
                reserve_messages: s.reserve_messages + 1,
                reserve_bytes: s.reserve_bytes + cost,
                ..s
            },
        )
    } else {
        (
            Usage { messages: u.messages + 1, message_bytes: u.message_bytes + cost, ..u },
            SenderUsage { messages: s.messages + 1, bytes: s.bytes + cost, ..s },
        )
    };
    t.usage.insert(item.recipient.as_slice(), u.encode().as_slice())?;
    if counted {
        t.senders.insert(skey.as_slice(), s.encode().as_slice())?;
    }
    Ok(EnqueueOutcome::Stored { seq, duplicate: false })
}
