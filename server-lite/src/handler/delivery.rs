//! Delivery (methods 200-206): durable queues, long poll, push, ephemeral relay.

use std::sync::Arc;
use std::time::Duration;

use qpq_core::keypackage;
use qpq_proto::{MAX_PAYLOAD, Message, Status, frame, method, v1};

use super::{Bound, Conn, RpcError, RpcResult, id16, key32, ok};
use crate::hub::PushFrame;
use crate::store::{EnqueueItem, EnqueueOutcome, QueueLimits, StoredEnvelope, now_ms, queue_key};

/// Largest stored payload: leaves room for the envelope so a message always fits in one
/// response or push frame.
pub const MAX_MESSAGE: usize = MAX_PAYLOAD as usize - 4096;
/// Payloads up to this size ride inside the `NewMessage` push; larger ones are announced
/// without data and fetched.
pub const PUSH_INLINE_MAX: usize = 64 * 1024;
/// Largest ephemeral (typing) payload.
pub const MAX_EPHEMERAL: usize = 4096;
/// Messages per Fetch when the client asks for 0, and the most it may ask for.
const DEFAULT_FETCH: usize = 100;
const MAX_FETCH: usize = 500;
/// Payload bytes per Fetch response.
pub(super) const FETCH_BYTES: usize = MAX_PAYLOAD as usize - 64 * 1024;
/// Retry hint when a recipient's queue, the caller's share of it, or the disk budget is full.
pub(super) const QUEUE_FULL_RETRY: Duration = Duration::from_secs(60);
/// The share of the disk budget application messages and blobs may use; the rest takes only
/// handshake messages, so a full disk still carries the group changes that keep members in.
pub const DISK_APPLICATION_PERCENT: u64 = 90;

pub(super) async fn enqueue(ctx: &Conn, req: v1::EnqueueRequest) -> RpcResult {
    let me = ctx.principal()?;
    let recipient = key32("recipient_key", &req.recipient_key)?;
    let item = item(
        ctx,
        me.identity,
        recipient,
        &req.channel_id,
        &req.message_id,
        Arc::new(req.payload),
        req.ttl_secs,
    )?;
    let now = now_ms();
    let outcomes = ctx.shared.store.enqueue(vec![item.clone()], limits(ctx), now).await?;
    match outcomes.first() {
        Some(EnqueueOutcome::Stored { seq, duplicate }) => {
            if !duplicate {
                announce(ctx, &item, *seq, now);
            }
            ok(v1::EnqueueResponse { seq: *seq, delivery_proof: Vec::new(), duplicate: *duplicate })
        }
        Some(EnqueueOutcome::UnknownRecipient) => {
            Err(RpcError::new(Status::NotFound, "no user has this recipient key"))
        }
        Some(EnqueueOutcome::SenderShare) => {
            Err(RpcError::retry(Status::RateLimited, sender_share_message(ctx), QUEUE_FULL_RETRY))
        }
        Some(EnqueueOutcome::StorageFull) => Err(storage_full()),
        Some(EnqueueOutcome::QueueFull) | None => Err(RpcError::retry(
            Status::Unavailable,
            "the recipient's queue is full",
            QUEUE_FULL_RETRY,
        )),
    }
}

fn sender_share_message(ctx: &Conn) -> String {
    format!(
        "you already hold your share ({} %) of the recipient's queue; they have to fetch first",
        ctx.shared.config.limits.queue_sender_share_percent
    )
}

pub(super) fn storage_full() -> RpcError {
    RpcError::retry(
        Status::Unavailable,
        "the server's storage budget is used up; try again later",
        QUEUE_FULL_RETRY,
    )
}

pub(super) async fn batch_enqueue(ctx: &Conn, req: v1::BatchEnqueueRequest) -> RpcResult {
    let me = ctx.principal()?;
    let recipients = recipients(ctx, &req.recipient_keys, req.payload.len())?;
    let payload = Arc::new(req.payload);
    let items = recipients
        .iter()
        .map(|r| {
            item(
                ctx,
                me.identity,
                *r,
                &req.channel_id,
                &req.message_id,
                payload.clone(),
                req.ttl_secs,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let now = now_ms();
    let outcomes = ctx.shared.store.enqueue(items.clone(), limits(ctx), now).await?;
    // The disk budget refuses the whole batch (nothing new of it was stored): a retry later,
    // with the same message id, stores it or finds the duplicates.
    if outcomes.contains(&EnqueueOutcome::StorageFull) {
        return Err(storage_full());
    }
    let (seqs, duplicates, refusals) = batch_results(ctx, &items, &outcomes, now);
    ok(v1::BatchEnqueueResponse { seqs, duplicates, refusals })
}

/// The recipients of a batch (BatchEnqueue, ClaimSlot): 1 to `max_batch_recipients`, each 32
/// bytes, none twice, and `payload_len` times their number within `max_batch_bytes` (the
/// batch is one write transaction).
pub(super) fn recipients(
    ctx: &Conn,
    keys: &[Vec<u8>],
    payload_len: usize,
) -> Result<Vec<[u8; 32]>, RpcError> {
    let max = ctx.shared.config.limits.max_batch_recipients as usize;
    if keys.is_empty() {
        return Err(RpcError::new(Status::BadRequest, "no recipients"));
    }
    if keys.len() > max {
        return Err(RpcError::new(Status::PayloadTooLarge, format!("more than {max} recipients")));
    }
    let mut recipients = Vec::with_capacity(keys.len());
    for k in keys {
        let r = key32("recipient_keys[]", k)?;
        if recipients.contains(&r) {
            return Err(RpcError::new(Status::BadRequest, "a recipient is listed twice"));
        }
        recipients.push(r);
    }
    let batch_bytes = payload_len.saturating_mul(recipients.len()) as u64;
    let max_bytes = ctx.shared.config.limits.max_batch_bytes;
    if batch_bytes > max_bytes {
        return Err(RpcError::new(
            Status::PayloadTooLarge,
            format!("payload x recipients is {batch_bytes} bytes, more than {max_bytes}"),
        ));
    }
    Ok(recipients)
}

/// A batch's per-recipient answer (`seqs`, `duplicates`, `refusals`; seq 0 = not stored), after
/// announcing each newly stored message. The caller has ruled out a disk-budget refusal.
pub(super) fn batch_results(
    ctx: &Conn,
    items: &[EnqueueItem],
    outcomes: &[EnqueueOutcome],
    now: u64,
) -> (Vec<u64>, Vec<bool>, Vec<i32>) {
    let mut seqs = Vec::with_capacity(outcomes.len());
    let mut duplicates = Vec::with_capacity(outcomes.len());
    let mut refusals = Vec::with_capacity(outcomes.len());
    for (item, outcome) in items.iter().zip(outcomes) {
        let refusal = match outcome {
            EnqueueOutcome::Stored { seq, duplicate } => {
                if !duplicate {
                    announce(ctx, item, *seq, now);
                }
                seqs.push(*seq);
                duplicates.push(*duplicate);
                refusals.push(v1::EnqueueRefusal::None.into());
                continue;
            }
            EnqueueOutcome::UnknownRecipient => v1::EnqueueRefusal::UnknownRecipient,
            EnqueueOutcome::QueueFull | EnqueueOutcome::StorageFull => {
                v1::EnqueueRefusal::QueueFull
            }
            EnqueueOutcome::SenderShare => v1::EnqueueRefusal::SenderShare,
        };
        seqs.push(0);
        duplicates.push(false);
        refusals.push(refusal.into());
    }
    (seqs, duplicates, refusals)
}

pub(super) async fn fetch(ctx: &Conn, req: v1::FetchRequest) -> RpcResult {
    let me = ctx.principal()?;
    let qk = own_queue(&me, &req.recipient_key, &req.channel_id, &req.device_id)?;
    let envs = ctx.shared.store.fetch(&qk, fetch_limit(req.limit), FETCH_BYTES, now_ms())?;
    ok(v1::FetchResponse { payloads: envelopes(envs) })
}

pub(super) async fn peek(ctx: &Conn, req: v1::PeekRequest) -> RpcResult {
    let me = ctx.principal()?;
    let qk = own_queue(&me, &req.recipient_key, &req.channel_id, &req.device_id)?;
    let envs = ctx.shared.store.fetch(&qk, fetch_limit(req.limit), FETCH_BYTES, now_ms())?;
    ok(v1::PeekResponse { payloads: envelopes(envs) })
}

pub(super) async fn fetch_wait(
    ctx: &Conn,
    req: v1::FetchWaitRequest,
) -> (RpcResult, Option<tokio::sync::OwnedSemaphorePermit>) {
    let me = match ctx.principal() {
        Ok(me) => me,
        Err(e) => return (Err(e), None),
    };
    let qk = match own_queue(&me, &req.recipient_key, &req.channel_id, &req.device_id) {
        Ok(qk) => qk,
        Err(e) => return (Err(e), None),
    };
    let limit = fetch_limit(req.limit);
    let wait = req.timeout_ms.min(ctx.shared.config.limits.fetch_wait_max_ms);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
    let notify = ctx.shared.hub.waiter(&me.identity);
    let mut slot = None;
    let result = loop {
        // Register for the wake-up before looking, so an enqueue between the look and the wait
        // is not missed.
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let drain = ctx.shared.drain_started();
        tokio::pin!(drain);
        drain.as_mut().enable();
        // Look cheaply (one message at most); load the full batch only with a slot held.
        let any = match ctx.shared.store.fetch(&qk, 1, 0, now_ms()) {
            Ok(e) => !e.is_empty(),
            Err(e) => break Err(e.into()),
        };
        if any {
            match ctx.large_responses.clone().acquire_owned().await {
                Ok(p) => slot = Some(p),
                Err(_) => break Err(RpcError::new(Status::Unavailable, "connection closing")),
            }
            break match ctx.shared.store.fetch(&qk, limit, FETCH_BYTES, now_ms()) {
                Ok(envs) => ok(v1::FetchWaitResponse { payloads: envelopes(envs) }),
                Err(e) => Err(e.into()),
            };
        }
        if wait == 0 || ctx.shared.is_draining() {
            break ok(v1::FetchWaitResponse { payloads: Vec::new() });
        }
        tokio::select! {
            () = &mut woken => {}
            // Shutdown: answer now (empty) instead of holding the drain for the whole wait.
            () = &mut drain => break ok(v1::FetchWaitResponse { payloads: Vec::new() }),
            () = tokio::time::sleep_until(deadline) => {
                break ok(v1::FetchWaitResponse { payloads: Vec::new() });
            }
        }
    };
    ctx.shared.hub.release_waiter(&me.identity, notify);
    (result, slot)
}

pub(super) async fn ack(ctx: &Conn, req: v1::AckRequest) -> RpcResult {
    let me = ctx.principal()?;
    let qk = own_queue(&me, &req.recipient_key, &req.channel_id, &req.device_id)?;
    let removed = ctx.shared.store.ack(me.identity, qk, req.seq_up_to).await?;
    ok(v1::AckResponse { removed })
}

pub(super) async fn relay(ctx: &Conn, req: v1::RelayEphemeralRequest) -> RpcResult {
    let me = ctx.principal()?;
    id16("channel_id", &req.channel_id)?;
    if req.payload.len() > MAX_EPHEMERAL {
        return Err(RpcError::new(
            Status::PayloadTooLarge,
            format!("ephemeral payloads are at most {MAX_EPHEMERAL} bytes"),
        ));
    }
    let max = ctx.shared.config.limits.max_batch_recipients as usize;
    if req.recipient_keys.len() > max {
        return Err(RpcError::new(Status::PayloadTooLarge, format!("more than {max} recipients")));
    }
    let recipients = req
        .recipient_keys
        .iter()
        .map(|k| key32("recipient_keys[]", k))
        .collect::<Result<Vec<_>, _>>()?;
    let msg = v1::TypingIndicator {
        sender_key: me.identity.to_vec(),
        channel_id: req.channel_id,
        payload: req.payload,
    };
    let frame = push_frame(method::PUSH_TYPING, &msg)?;
    let mut delivered = 0u32;
    for r in &recipients {
        delivered += ctx.shared.hub.push(r, &frame, Some(ctx.id)) as u32;
    }
    ok(v1::RelayEphemeralResponse { delivered })
}

/// A stored message's payload: 1 to [`MAX_MESSAGE`] bytes.
pub(super) fn check_payload(payload: &[u8]) -> Result<(), RpcError> {
    if payload.is_empty() {
        return Err(RpcError::new(Status::BadRequest, "empty payload"));
    }
    if payload.len() > MAX_MESSAGE {
        return Err(RpcError::new(
            Status::PayloadTooLarge,
            format!("payloads are at most {MAX_MESSAGE} bytes"),
        ));
    }
    Ok(())
}

/// Builds a validated queue item.
pub(super) fn item(
    ctx: &Conn,
    sender: [u8; 32],
    recipient: [u8; 32],
    channel: &[u8],
    message_id: &[u8],
    payload: Arc<Vec<u8>>,
    ttl_secs: u32,
) -> Result<EnqueueItem, RpcError> {
    id16("channel_id", channel)?;
    id16("message_id", message_id)?;
    check_payload(&payload)?;
    let l = &ctx.shared.config.limits;
    let ttl =
        if ttl_secs == 0 { l.default_ttl_secs } else { u64::from(ttl_secs).min(l.max_ttl_secs) };
    Ok(EnqueueItem {
        recipient,
        channel: channel.to_vec(),
        message_id: message_id.to_vec(),
        handshake: keypackage::is_handshake(&payload),
        payload,
        expires_ms: now_ms().saturating_add(ttl.saturating_mul(1000)),
        sender,
    })
}

pub(super) fn limits(ctx: &Conn) -> QueueLimits {
    let l = &ctx.shared.config.limits;
    let share = |n: u64| (u128::from(n) * u128::from(l.queue_sender_share_percent) / 100) as u64;
    QueueLimits {
        max_messages: l.max_queue_messages,
        max_bytes: l.max_queue_bytes,
        // At least one message each, however small the queue.
        sender_messages: share(l.max_queue_messages).max(1),
        sender_bytes: share(l.max_queue_bytes),
        reserve_messages: l.handshake_reserve_messages,
        reserve_bytes: l.handshake_reserve_bytes,
        sender_reserve_messages: share(l.handshake_reserve_messages).max(1),
        sender_reserve_bytes: share(l.handshake_reserve_bytes),
        disk_bytes: disk_application_bytes(l.disk_budget_bytes),
        disk_handshake_bytes: l.disk_budget_bytes,
        dedup_window_ms: l.dedup_window_secs.saturating_mul(1000),
    }
}

/// The stored bytes up to which application messages and blobs are taken.
pub(super) fn disk_application_bytes(budget: u64) -> u64 {
    (u128::from(budget) * u128::from(DISK_APPLICATION_PERCENT) / 100) as u64
}

/// Wakes long polls and pushes `NewMessage` to the recipient's connections.
fn announce(ctx: &Conn, item: &EnqueueItem, seq: u64, enqueued_ms: u64) {
    ctx.shared.hub.notify(&item.recipient);
    let inline = item.payload.len() <= PUSH_INLINE_MAX;
    let msg = v1::NewMessage {
        channel_id: item.channel.clone(),
        envelope: Some(v1::Envelope {
            seq,
            data: if inline { item.payload.to_vec() } else { Vec::new() },
            message_id: item.message_id.clone(),
            enqueued_at_ms: enqueued_ms,
        }),
    };
    if let Ok(frame) = push_frame(method::PUSH_NEW_MESSAGE, &msg) {
        ctx.shared.hub.push(&item.recipient, &frame, None);
    }
}

/// The caller's queue named by a request: the recipient key must be empty or the caller's own.
fn own_queue(
    me: &Bound,
    recipient: &[u8],
    channel: &[u8],
    device: &[u8],
) -> Result<Vec<u8>, RpcError> {
    if !recipient.is_empty() && recipient != me.identity {
        return Err(RpcError::new(Status::Forbidden, "you can only read and ack your own queues"));
    }
    id16("channel_id", channel)?;
    if device.len() > 16 {
        return Err(RpcError::new(Status::BadRequest, "device_id is longer than 16 bytes"));
    }
    Ok(queue_key(&me.identity, channel))
}

fn fetch_limit(limit: u32) -> usize {
    match limit as usize {
        0 => DEFAULT_FETCH,
        n => n.min(MAX_FETCH),
    }
}

fn envelopes(envs: Vec<StoredEnvelope>) -> Vec<v1::Envelope> {
    envs.into_iter()
        .map(|e| v1::Envelope {
            seq: e.seq,
            data: e.payload,
            message_id: e.message_id,
            enqueued_at_ms: e.enqueued_ms,
        })
        .collect()
}

/// Encodes a push frame once, to be shared by every recipient connection.
pub(super) fn push_frame<M: Message>(event: u16, msg: &M) -> Result<PushFrame, RpcError> {
    frame::encode_push(event, &msg.encode_to_vec())
        .map(Arc::new)
        .map_err(|_| RpcError::new(Status::Internal, "push too large"))
}
