//! The TTL sweep: expired messages, dedup records, blobs, commit slots and idle sessions.
//!
//! It first looks with a read transaction and writes only when something is due, so an idle
//! server writes nothing to flash.

use redb::{ReadableTable, WriteTransaction};

use super::accounts::delete_session_in;
use super::blobs::remove_blob_in;
use super::delivery::{Gone, release};
use super::records::{Blob, Queued, Session};
use super::slots::{Swept, expiring_slot, sweep_slot_in};
use super::tables::*;
use super::{Store, StoreError};

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired queued messages.
    pub messages: u64,
    /// Expired dedup records.
    pub dedup: u64,
    /// Expired blobs (complete or abandoned uploads).
    pub blobs: u64,
    /// Sessions idle for longer than the session lifetime.
    pub sessions: u64,
    /// Expired epoch commit slots, closed (a tombstone stays) ...
    pub slots: u64,
    /// ... and the claims they held.
    pub claims: u64,
    /// Tombstones of closed slots, removed after their own lifetime.
    pub slot_tombstones: u64,
}

/// Entries removed per write transaction, so one sweep never holds the writer for long (a
/// slot counts once plus once per claim it holds; one slot may go over).
const SWEEP_BATCH: usize = 1000;

impl Store {
    /// Removes everything that expired at or before `now_ms`, and sessions unused for
    /// `session_idle_ms`. An expired commit slot is closed and leaves a tombstone that the
    /// sweep removes `slot_tombstone_ms` after the slot's expiry (`max_ttl_secs`).
    pub async fn sweep(
        &self,
        now_ms: u64,
        session_idle_ms: u64,
        slot_tombstone_ms: u64,
    ) -> Result<SweepReport, StoreError> {
        let mut total = SweepReport::default();
        loop {
            let due = {
                let txn = self.read()?;
                let t = txn.open_table(EXPIRY)?;
                let slots = txn.open_table(SLOTS)?;
                let mut due = Vec::new();
                let mut weight = 0usize;
                for row in t.range((0u64, &[][..])..=(now_ms, &[0xffu8; 64][..]))? {
                    let (k, _) = row?;
                    let (at, r) = k.value();
                    if at > now_ms {
                        break;
                    }
                    // A slot takes its claims with it: they count towards the batch.
                    if let Some((&EXPIRE_SLOT, slot)) = r.split_first()
                        && let Some(h) = expiring_slot(&slots, slot, at)?
                    {
                        weight = weight.saturating_add(h.count as usize);
                    }
                    weight = weight.saturating_add(1);
                    due.push((at, r.to_vec()));
                    if weight >= SWEEP_BATCH {
                        break;
                    }
                }
                due
            };
            if due.is_empty() {
                break;
            }
            let (report, files) =
                self.write(move |txn| expire_in(txn, &due, slot_tombstone_ms)).await?;
            for id in &files {
                self.remove_blob_files(id);
            }
            total.messages += report.messages;
            total.dedup += report.dedup;
            total.blobs += report.blobs;
            total.slots += report.slots;
            total.claims += report.claims;
            total.slot_tombstones += report.slot_tombstones;
        }
        let idle: Vec<Vec<u8>> = {
            let t = self.read()?.open_table(SESSIONS)?;
            let mut v = Vec::new();
            for row in t.iter()? {
                let (k, s) = row?;
                let s = Session::decode(s.value())?;
                if s.last_used_ms.saturating_add(session_idle_ms) <= now_ms {
                    v.push(k.value().to_vec());
                }
            }
            v
        };
        if !idle.is_empty() {
            total.sessions = idle.len() as u64;
            self.write(move |txn| {
                for h in &idle {
                    delete_session_in(txn, h)?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(total)
    }
}

fn expire_in(
    txn: &WriteTransaction,
    due: &[(u64, Vec<u8>)],
    slot_tombstone_ms: u64,
) -> Result<(SweepReport, Vec<Vec<u8>>), StoreError> {
    let mut report = SweepReport::default();
    let mut files = Vec::new();
    for (at, r) in due {
        txn.open_table(EXPIRY)?.remove((*at, r.as_slice()))?;
        let Some((&kind, rest)) = r.split_first() else { continue };
        match kind {
            EXPIRE_MESSAGE if rest.len() >= 40 => {
                let (qk, seq) = rest.split_at(rest.len() - 8);
                let mut s = [0u8; 8];
                s.copy_from_slice(seq);
                let seq = u64::from_be_bytes(s);
                let removed =
                    txn.open_table(QUEUES)?.remove((qk, seq))?.map(|v| Queued::decode(v.value()));
                if let Some(q) = removed.transpose()? {
                    release(txn, &qk[..32], &[Gone::of(&q)])?;
                    report.messages += 1;
                }
            }
            EXPIRE_DEDUP if txn.open_table(DEDUP)?.remove(rest)?.is_some() => report.dedup += 1,
            EXPIRE_BLOB => {
                let meta = txn.open_table(BLOBS)?.get(rest)?.map(|v| Blob::decode(v.value()));
                // Only the entry that matches the blob's current expiry removes it: a stale
                // entry must not take a later upload of the same content with it.
                if let Some(b) = meta.transpose()?.filter(|b| b.expires_ms == *at) {
                    remove_blob_in(txn, rest, &b.owner, b.total_size)?;
                    files.push(rest.to_vec());
                    report.blobs += 1;
                }
            }
            EXPIRE_SLOT => {
                let header = expiring_slot(&txn.open_table(SLOTS)?, rest, *at)?;
                if let Some(h) = header {
                    match sweep_slot_in(txn, rest, &h, slot_tombstone_ms)? {
                        Swept::Closed(claims) => {
                            report.claims += claims;
                            report.slots += 1;
                        }
                        Swept::Forgotten => report.slot_tombstones += 1,
                    }
                }
            }
            _ => {}
        }
    }
    Ok((report, files))
}
