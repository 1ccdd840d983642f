//! Epoch commit slots (methods 207, 208): a commit is claimed in its epoch's slot and
//! enqueued for the group in one durable transaction; members read the claims in order and
//! take the first valid one. The server never judges a claim.

use std::sync::Arc;

use qpq_core::keypackage;
use qpq_proto::{Status, v1};

use super::delivery::{
    FETCH_BYTES, QUEUE_FULL_RETRY, batch_results, check_payload, item, limits, recipients,
    storage_full,
};
use super::{Conn, RpcError, RpcResult, ok};
use crate::store::{ClaimOutcome, SLOT_ID_LEN, SlotClaim, SlotLimits, now_ms};

/// Claims per FetchSlot response at most.
pub const MAX_SLOT_FETCH: usize = 100;

/// A 16-byte slot id, or BadRequest.
fn slot_id(bytes: &[u8]) -> Result<[u8; SLOT_ID_LEN], RpcError> {
    bytes.try_into().map_err(|_| {
        RpcError::bad(format!("slot must be {SLOT_ID_LEN} bytes, got {}", bytes.len()))
    })
}

pub(super) async fn claim_slot(ctx: &Conn, req: v1::ClaimSlotRequest) -> RpcResult {
    let me = ctx.principal()?;
    let slot = slot_id(&req.slot)?;
    let message_id: [u8; 16] = req.message_id.as_slice().try_into().map_err(|_| {
        RpcError::bad(format!("message_id must be 16 bytes, got {}", req.message_id.len()))
    })?;
    let recipients = recipients(ctx, &req.recipient_keys, req.payload.len())?;
    // The committer applies its own commit; a copy in its own queue would only let an account
    // keep a claim (and its slot copy) while giving back the queued bytes by acking them.
    if recipients.contains(&me.identity) {
        return Err(RpcError::bad("a commit is not sent to its own committer"));
    }
    check_payload(&req.payload)?;
    if !keypackage::is_commit(&req.payload) {
        return Err(RpcError::bad("a slot claim must be an MLS commit"));
    }
    let payload = Arc::new(req.payload);
    // The commit goes to the default channel with the default lifetime, as a client's commits
    // through BatchEnqueue do.
    let items = recipients
        .iter()
        .map(|r| item(ctx, me.identity, *r, &[], &message_id, payload.clone(), 0))
        .collect::<Result<Vec<_>, _>>()?;
    let l = &ctx.shared.config.limits;
    let slot_limits = SlotLimits {
        max_claims: l.max_slot_claims,
        max_open_claims: u64::from(l.max_open_claims),
        max_open_claim_bytes: l.max_open_claim_bytes,
        ttl_ms: l.max_ttl_secs.saturating_mul(1000),
    };
    let claim = SlotClaim { slot, claimer: me.identity, message_id, payload, items: items.clone() };
    let now = now_ms();
    let outcome = ctx.shared.store.claim_slot(claim, limits(ctx), slot_limits, now).await?;
    let refused = |refusal: v1::SlotRefusal, position, total| v1::ClaimSlotResponse {
        stored: false,
        position,
        total,
        refusal: refusal.into(),
        ..Default::default()
    };
    let resp = match outcome {
        ClaimOutcome::Claimed { position, total, outcomes } => {
            let (seqs, _, refusals) = batch_results(ctx, &items, &outcomes, now);
            v1::ClaimSlotResponse {
                stored: true,
                position,
                duplicate: false,
                total,
                seqs,
                refusals,
                refusal: v1::SlotRefusal::None.into(),
            }
        }
        ClaimOutcome::Duplicate { position, total } => v1::ClaimSlotResponse {
            stored: true,
            position,
            duplicate: true,
            total,
            ..Default::default()
        },
        ClaimOutcome::AlreadyClaimed { position, total } => {
            refused(v1::SlotRefusal::AlreadyClaimed, position, total)
        }
        ClaimOutcome::SlotFull { total } => refused(v1::SlotRefusal::SlotFull, 0, total),
        ClaimOutcome::NotDelivered { total, outcomes } => {
            let (seqs, _, refusals) = batch_results(ctx, &items, &outcomes, now);
            v1::ClaimSlotResponse {
                seqs,
                refusals,
                ..refused(v1::SlotRefusal::NotDelivered, 0, total)
            }
        }
        ClaimOutcome::Closed => refused(v1::SlotRefusal::Closed, 0, 0),
        ClaimOutcome::TooManyOpenClaims => {
            return Err(RpcError::retry(
                Status::RateLimited,
                "too many open commit claims",
                QUEUE_FULL_RETRY,
            ));
        }
        ClaimOutcome::TooManyOpenClaimBytes => {
            return Err(RpcError::retry(
                Status::RateLimited,
                "too many open commit claim bytes",
                QUEUE_FULL_RETRY,
            ));
        }
        ClaimOutcome::StorageFull => return Err(storage_full()),
    };
    ok(resp)
}

pub(super) async fn fetch_slot(ctx: &Conn, req: v1::FetchSlotRequest) -> RpcResult {
    ctx.principal()?;
    let slot = slot_id(&req.slot)?;
    let r = ctx.shared.store.fetch_slot(&slot, req.from, MAX_SLOT_FETCH, FETCH_BYTES, now_ms())?;
    ok(v1::FetchSlotResponse { claims: r.claims, total: r.total })
}

#[cfg(test)]
mod tests;
