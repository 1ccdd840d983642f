//! Delivery queues: durable, per (recipient, channel), ordered by a server-assigned seq.

use redb::{ReadableTable, Table, WriteTransaction};

use super::records::{Queued, Usage};
use super::tables::*;
use super::{Store, StoreError, usage_of};

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
    /// The recipient's queue is at its message or byte limit.
    QueueFull,
}

/// Limits applied while enqueueing.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Messages a recipient may have queued across all channels.
    pub max_messages: u64,
    /// Payload bytes a recipient may have queued across all channels.
    pub max_bytes: u64,
    /// How long a message id is remembered for deduplication, ms.
    pub dedup_window_ms: u64,
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
    /// returns once durable. Outcomes are in item order.
    pub async fn enqueue(
        &self,
        items: Vec<EnqueueItem>,
        limits: QueueLimits,
        now_ms: u64,
    ) -> Result<Vec<EnqueueOutcome>, StoreError> {
        self.write(move |txn| {
            // Tables are opened once per job: opening and closing a table costs a lookup and a
            // write to redb's table of tables, which dominated a 100-recipient batch.
            let mut t = EnqueueTables {
                identities: txn.open_table(IDENTITIES)?,
                dedup: txn.open_table(DEDUP)?,
                usage: txn.open_table(USAGE)?,
                next: txn.open_table(QUEUE_NEXT)?,
                queues: txn.open_table(QUEUES)?,
                expiry: txn.open_table(EXPIRY)?,
            };
            items.iter().map(|item| enqueue_one(&mut t, item, &limits, now_ms)).collect()
        })
        .await
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
                gone.push((k.value().1, q.expires_ms, q.cost()));
            }
            if gone.is_empty() {
                return Ok(0);
            }
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut freed = 0u64;
            for (seq, expires, cost) in &gone {
                queues.remove((queue_key.as_slice(), *seq))?;
                expiry.remove((*expires, message_ref(&queue_key, *seq).as_slice()))?;
                freed += cost;
            }
            release(txn, &identity, gone.len() as u64, freed)?;
            Ok(gone.len() as u64)
        })
        .await
    }

    /// Total messages queued for `identity` (all channels).
    pub fn queued_count(&self, identity: &[u8; 32]) -> Result<u64, StoreError> {
        let t = self.read()?.open_table(USAGE)?;
        Ok(usage_of(&t, identity)?.messages)
    }
}

/// The EXPIRY reference of a queued message.
pub(super) fn message_ref(queue_key: &[u8], seq: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(1 + queue_key.len() + 8);
    r.push(EXPIRE_MESSAGE);
    r.extend_from_slice(queue_key);
    r.extend_from_slice(&seq.to_be_bytes());
    r
}

/// Lowers the usage counters of `identity` after messages left its queues.
pub(super) fn release(
    txn: &WriteTransaction,
    identity: &[u8],
    messages: u64,
    bytes: u64,
) -> Result<(), StoreError> {
    let mut usage = txn.open_table(USAGE)?;
    let u = usage_of(&usage, identity)?;
    let u = Usage {
        messages: u.messages.saturating_sub(messages),
        message_bytes: u.message_bytes.saturating_sub(bytes),
        ..u
    };
    usage.insert(identity, u.encode().as_slice())?;
    Ok(())
}

/// The tables one enqueue job writes, open for the whole job.
struct EnqueueTables<'t> {
    identities: Table<'t, &'static [u8], &'static str>,
    dedup: Table<'t, &'static [u8], u64>,
    usage: Table<'t, &'static [u8], &'static [u8]>,
    next: Table<'t, &'static [u8], u64>,
    queues: Table<'t, (&'static [u8], u64), &'static [u8]>,
    expiry: Table<'t, (u64, &'static [u8]), ()>,
}

fn enqueue_one(
    t: &mut EnqueueTables<'_>,
    item: &EnqueueItem,
    limits: &QueueLimits,
    now_ms: u64,
) -> Result<EnqueueOutcome, StoreError> {
    if t.identities.get(item.recipient.as_slice())?.is_none() {
        return Ok(EnqueueOutcome::UnknownRecipient);
    }
    let qk = queue_key(&item.recipient, &item.channel);
    let dedup_key =
        (!item.message_id.is_empty()).then(|| [qk.as_slice(), &item.message_id].concat());
    if let Some(dk) = &dedup_key
        && let Some(seq) = t.dedup.get(dk.as_slice())?
    {
        return Ok(EnqueueOutcome::Stored { seq: seq.value(), duplicate: true });
    }
    let u = usage_of(&t.usage, &item.recipient)?;
    let cost = item.payload.len() as u64;
    if u.messages + 1 > limits.max_messages || u.message_bytes + cost > limits.max_bytes {
        return Ok(EnqueueOutcome::QueueFull);
    }
    let seq = t.next.get(qk.as_slice())?.map_or(1, |v| v.value());
    t.next.insert(qk.as_slice(), seq + 1)?;
    let q = Queued {
        expires_ms: item.expires_ms,
        enqueued_ms: now_ms,
        message_id: item.message_id.clone(),
        payload: item.payload.to_vec(),
    };
    t.queues.insert((qk.as_slice(), seq), q.encode().as_slice())?;
    t.expiry.insert((item.expires_ms, message_ref(&qk, seq).as_slice()), ())?;
    if let Some(dk) = dedup_key {
        t.dedup.insert(dk.as_slice(), seq)?;
        let mut r = vec![EXPIRE_DEDUP];
        r.extend_from_slice(&dk);
        t.expiry.insert((now_ms.saturating_add(limits.dedup_window_ms), r.as_slice()), ())?;
    }
    let u = Usage { messages: u.messages + 1, message_bytes: u.message_bytes + cost, ..u };
    t.usage.insert(item.recipient.as_slice(), u.encode().as_slice())?;
    Ok(EnqueueOutcome::Stored { seq, duplicate: false })
}
