//! Group changes over the network: DMs, groups, members and admins, and the delivery of our
//! commits through their epoch's slot (PROTOCOL.md §6.9). The decisions (what a commit does,
//! which claim wins, what to redo) are the state's; this is the sequence of calls around them.

use qpq_proto::{Status, method, v1};

use super::engine::{Client, batch_request};
use super::error::ClientError;
use super::event::{Event, GroupInfo};
use super::history::ConvKind;
use super::net::NetError;
use super::records::{Intent, PendingCommit};
use super::state::{MAX_REDO, Resolution};
use crate::content::Body;
use crate::identity::{hex, safety_number};
use crate::ids::{GroupId, MessageId};
use crate::mls::{GroupError, Kind};

/// At most this many epochs are applied by one catch-up (a guard, far above real gaps).
const MAX_CATCH_UP: usize = 100_000;
/// Claims read from one slot at most: the server's `max_slot_claims` default.
const MAX_SLOT_CLAIMS: u32 = 1024;

impl Client {
    /// The DM with `username`, created (and the peer invited) if there is none.
    pub async fn dm(&mut self, username: &str) -> Result<GroupId, ClientError> {
        let peer = self.resolve(username).await?;
        if peer == self.identity_key() {
            return Err(ClientError::SelfConversation);
        }
        if let Some(c) = self
            .conversations()?
            .into_iter()
            .find(|c| c.kind == ConvKind::Dm && c.peer == Some(peer))
        {
            return Ok(c.id);
        }
        let kp = self.fetch_key_package(&peer, username).await?;
        // The group, its conversation and the pending add of the peer land together: a crash
        // leaves no DM that the peer was never added to.
        let (id, pending) = self.state.store.atomic(|| -> Result<_, ClientError> {
            let id = self.state.mls.create(Kind::Dm)?;
            self.state.new_conversation(
                id.clone(),
                ConvKind::Dm,
                username.to_string(),
                Some(peer.to_bytes()),
            )?;
            let intent = Intent::Add { kps: vec![kp], ids: vec![peer.to_bytes()] };
            let out = self.state.build(&id, &intent)?.ok_or(GroupError::NotMember)?;
            let pending = self.state.stage_commit(&id, out, false, None, intent, 0)?;
            Ok((id, pending))
        })?;
        self.deliver_commit(pending).await?;
        Ok(id.into())
    }

    /// Creates a group named `name` with us as admin.
    pub async fn create_group(&mut self, name: &str) -> Result<GroupId, ClientError> {
        if self.conversations()?.iter().any(|c| c.name == name) {
            return Err(ClientError::NameTaken(name.to_string()));
        }
        self.state.store.atomic(|| -> Result<_, ClientError> {
            let id = self.state.mls.create(Kind::Group)?;
            self.state.new_conversation(id.clone(), ConvKind::Group, name.to_string(), None)?;
            Ok(GroupId::from(id))
        })
    }

    /// Adds users to a group (admins only); they get a Welcome, everyone else the commit.
    pub async fn add_members(
        &mut self,
        conv: &GroupId,
        usernames: &[String],
    ) -> Result<(), ClientError> {
        let (mut kps, mut ids) = (Vec::new(), Vec::new());
        for u in usernames {
            let id = self.resolve(u).await?;
            kps.push(self.fetch_key_package(&id, u).await?);
            ids.push(id.to_bytes());
        }
        let system = format!("{} added {}", self.state.username(), usernames.join(", "));
        // Once merged, the newcomers are told the group's name and topic.
        self.commit_change(conv, Intent::Add { kps, ids }, true, Some(system)).await
    }

    /// Removes a user (admins only).
    pub async fn remove_member(
        &mut self,
        conv: &GroupId,
        username: &str,
    ) -> Result<(), ClientError> {
        let id = self.resolve(username).await?;
        let system = format!("{} removed {username}", self.state.username());
        self.commit_change(conv, Intent::Remove { ids: vec![id.to_bytes()] }, false, Some(system))
            .await
    }

    /// Makes a member an admin or not (admins only).
    pub async fn set_admin(
        &mut self,
        conv: &GroupId,
        username: &str,
        admin: bool,
    ) -> Result<(), ClientError> {
        let id = self.resolve(username).await?;
        if !self.state.mls.members(conv)?.iter().any(|m| m.identity == id) {
            return Err(GroupError::NotMember.into());
        }
        let verb = if admin { "promoted" } else { "demoted" };
        let system = format!("{} {verb} {username}", self.state.username());
        self.commit_change(conv, Intent::Admin { id: id.to_bytes(), admin }, false, Some(system))
            .await
    }

    /// Rotates our keys in a conversation.
    pub async fn rotate_keys(&mut self, conv: &GroupId) -> Result<(), ClientError> {
        self.commit_change(conv, Intent::Rotate, false, None).await
    }

    /// Makes a commit for `intent` (nothing if there is nothing left to change), records it
    /// as pending in the same vault transaction, and delivers it.
    pub(crate) async fn commit_change(
        &mut self,
        conv: &[u8],
        intent: Intent,
        announce: bool,
        system: Option<String>,
    ) -> Result<(), ClientError> {
        self.settle_commits(conv).await?;
        match self.state.stage_change(conv, intent, announce, system)? {
            Some(pending) => self.deliver_commit(pending).await,
            None => Ok(()),
        }
    }

    /// Renames a group and sets its topic (sent to all members).
    pub async fn rename(
        &mut self,
        conv: &GroupId,
        name: &str,
        topic: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut c =
            self.conversation(conv)?.ok_or_else(|| ClientError::UnknownConversation(hex(conv)))?;
        if c.kind != ConvKind::Group {
            return Err(ClientError::NotAGroup);
        }
        if !self
            .state
            .mls
            .members(conv)?
            .iter()
            .any(|m| m.identity == self.identity_key() && m.admin)
        {
            return Err(GroupError::NotAdmin.into());
        }
        c.name = name.to_string();
        if let Some(t) = topic {
            c.topic = t.to_string();
        }
        self.state.store.save_conversation(&c)?;
        self.send(conv, Body::Meta { name: c.name, topic: c.topic }).await?;
        Ok(())
    }

    /// Leaves a conversation: proposes our removal to the others and forgets it locally.
    pub async fn leave(&mut self, conv: &GroupId) -> Result<(), ClientError> {
        // Only admins commit, so a group's last admin hands the role on before leaving (to
        // the first member in the tree), or nobody could carry out its leave or any change.
        let me = self.identity_key();
        let members = self.state.mls.members(conv)?;
        let mine = members.iter().any(|m| m.identity == me && m.admin);
        let others: Vec<_> = members.iter().filter(|m| m.identity != me).collect();
        if mine
            && !others.is_empty()
            && !others.iter().any(|m| m.admin)
            && self.state.mls.kind(conv)? == Kind::Group
        {
            let heir = others[0].identity;
            let name = self.name_of(&heir.into()).await;
            let system = format!("{} made {name} an admin before leaving", self.state.username());
            self.commit_change(conv, Intent::Admin { id: heir, admin: true }, false, Some(system))
                .await?;
        }
        let (proposal, to) = self.state.mls.leave(conv)?;
        if !to.is_empty() {
            self.batch_enqueue(&to, proposal, MessageId::random()).await?;
        }
        self.state.store.atomic(|| -> Result<(), ClientError> {
            self.state.mls.forget(conv)?;
            Ok(self.state.store.forget_conversation(conv)?)
        })
    }

    /// Members, epoch and verification code of a conversation.
    pub async fn group_info(&mut self, conv: &GroupId) -> Result<GroupInfo, ClientError> {
        let conversation =
            self.conversation(conv)?.ok_or_else(|| ClientError::UnknownConversation(hex(conv)))?;
        let mut members = Vec::new();
        for m in self.state.mls.members(conv)? {
            let id = m.identity.into();
            let name = self.name_of(&id).await;
            members.push((id, name, m.admin));
        }
        Ok(GroupInfo {
            conversation,
            members,
            epoch: self.state.mls.epoch(conv)?,
            verification_code: self.state.mls.verification_code(conv)?,
        })
    }

    /// The safety number shared with `username`.
    ///
    /// The key that counts is the one in the MLS tree: if we share a DM with `username`, its
    /// other member's account key, which must be the one remembered for the name.
    pub async fn safety_number(&mut self, username: &str) -> Result<String, ClientError> {
        let peer = self.resolve(username).await?;
        let me = self.identity_key();
        if let Some(dm) = self
            .conversations()?
            .into_iter()
            .find(|c| c.kind == ConvKind::Dm && c.peer == Some(peer))
        {
            let members = self.state.mls.members(&dm.id)?;
            if let Some(other) = members.iter().find(|m| m.identity != me)
                && other.identity != peer
            {
                return Err(ClientError::KeyChanged {
                    username: username.into(),
                    pinned: peer.to_string(),
                    presented: hex(&other.identity),
                });
            }
        }
        Ok(safety_number(&me, &peer))
    }

    pub(crate) async fn fetch_key_package(
        &mut self,
        id: &[u8; 32],
        username: &str,
    ) -> Result<Vec<u8>, ClientError> {
        let r: v1::FetchKeyPackageResponse = self
            .call(
                method::FETCH_KEY_PACKAGE,
                &v1::FetchKeyPackageRequest { identity_key: id.to_vec() },
            )
            .await?;
        if r.package.is_empty() {
            return Err(ClientError::NoKeyPackage(username.into()));
        }
        Ok(r.package)
    }

    /// Delivers a staged commit after whatever the outbox already holds (those messages were
    /// encrypted in the epoch the commit ends), merges it once it has won its slot, then sends
    /// the Welcome. If another member's commit won, ours is redone in the next epoch, up to
    /// [`MAX_REDO`] times. A network failure leaves it pending for the next flush, never
    /// abandoned: the server may hold it.
    pub(crate) async fn deliver_commit(
        &mut self,
        pending: PendingCommit,
    ) -> Result<(), ClientError> {
        self.flush_items().await?;
        let conv = pending.conv.clone();
        let sent = self.send_with_redo(pending).await;
        self.publish(); // what merging it wrote (its system line) shows now
        sent?;
        match self.flush_items().await {
            Ok(_) | Err(ClientError::Net(_)) => {}
            Err(e) => return Err(e),
        }
        self.emit(Event::Conversation { conv });
        Ok(())
    }

    /// Sends a pending commit, then the redo our change gets each time another member's
    /// commit wins (each try is a claim on a new slot).
    pub(crate) async fn send_with_redo(
        &mut self,
        pending: PendingCommit,
    ) -> Result<(), ClientError> {
        let conv = pending.conv.clone();
        self.send_commit(pending).await?;
        for _ in 0..MAX_REDO {
            let Some(next) = self.state.store.pending_commit(&conv)? else { break };
            self.send_commit(next).await?;
        }
        Ok(())
    }

    /// Resolves any commit of ours still pending in `conv` before we make another one there.
    pub(crate) async fn settle_commits(&mut self, conv: &[u8]) -> Result<(), ClientError> {
        if self.state.store.has_pending_commit(conv)? {
            self.flush_outbox().await?;
        }
        Ok(())
    }

    /// Sends one pending commit as a claim on its epoch's slot, under its message id (a repeat
    /// is a duplicate the server recognises). If it is the slot's first claim, or every claim
    /// before it fails the public checks, it won: merge it. Otherwise the first valid claim is
    /// applied instead and our change is staged again for the next epoch. A refusal for good
    /// drops the commit; a transient failure keeps it.
    pub(crate) async fn send_commit(&mut self, pending: PendingCommit) -> Result<(), ClientError> {
        let conv = pending.conv.clone();
        match self.state.mls.has_pending_commit(&conv) {
            Ok(true) => {}
            // Left, or superseded by a commit we processed from someone else.
            Ok(false) | Err(GroupError::UnknownGroup) => {
                self.state.store.forget_commit(&conv)?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        // Alone in the group (a new DM or group): nobody to race, nobody to tell.
        if pending.commit_to.is_empty() {
            return self.state.finish_commit(&pending);
        }
        if !self.session.is_online() {
            return Err(ClientError::Net(NetError::Connection("offline".into())));
        }
        let slot = match pending.slot {
            Some(s) => s,
            None => self.state.mls.slot(&conv)?, // a record from 0.2: same epoch, same slot
        };
        let req = v1::ClaimSlotRequest {
            slot: slot.to_vec(),
            payload: pending.commit.clone(),
            recipient_keys: pending.commit_to.clone(),
            message_id: pending.message_id.to_vec(),
        };
        let r: Result<v1::ClaimSlotResponse, NetError> =
            self.session.call_once(method::CLAIM_SLOT, &req).await;
        let resp = match r {
            Ok(resp) => resp,
            // A server from before slots: deliver without ordering (no fork protection).
            Err(e) if e.status() == Some(Status::UnknownMethod) => {
                return self.send_commit_unordered(pending).await;
            }
            Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                self.session.lose();
                return Err(e.into());
            }
            Err(e) if e.is_transient() || e.status() == Some(Status::Unauthorized) => {
                return Err(e.into());
            }
            // Refused for good (malformed, too large): the server holds nothing of it.
            Err(e) => {
                self.state.drop_commit(&conv)?;
                return Err(e.into());
            }
        };
        self.report_refusals("group change", &pending.commit_to, &resp.seqs, &resp.refusals);
        if resp.stored && resp.position == 0 {
            return self.state.finish_commit(&pending);
        }
        let refusal = v1::SlotRefusal::try_from(resp.refusal).unwrap_or(v1::SlotRefusal::None);
        if !resp.stored && refusal == v1::SlotRefusal::NotDelivered {
            // Nobody took it: merging would put us alone in an epoch no other member reaches.
            self.state.drop_commit(&conv)?;
            return Err(ClientError::ChangeNotDelivered);
        }
        // Someone claimed the slot first (or it is full): its first valid claim decides.
        match self.resolve_slot(&conv, slot).await? {
            Resolution::Won | Resolution::Applied | Resolution::Lost => Ok(()),
            Resolution::Empty | Resolution::NoWinner | Resolution::Unsupported if resp.stored => {
                // Our claim is in the slot and valid, so the list cannot lack a winner: the
                // server answers inconsistently. Keep the commit; the next flush asks again.
                Err(ClientError::PeerInvalid(
                    "the server's commit slot does not list the claim it just stored",
                ))
            }
            Resolution::Empty | Resolution::NoWinner | Resolution::Unsupported => {
                self.state.drop_commit(&conv)?;
                Err(ClientError::ChangeRefused(match refusal {
                    v1::SlotRefusal::SlotFull => "this epoch's commit slot is full",
                    v1::SlotRefusal::AlreadyClaimed => "another commit of ours holds the slot",
                    _ => "the server did not store it",
                }))
            }
        }
    }

    /// Tells the user which recipients' queues did not store a message, and why.
    pub(crate) fn report_refusals(
        &self,
        what: &str,
        to: &[impl AsRef<[u8]>],
        seqs: &[u64],
        refusals: &[i32],
    ) {
        for (i, k) in to.iter().enumerate() {
            if seqs.get(i) != Some(&0) {
                continue;
            }
            let k = k.as_ref();
            let who = self.cached_name(k).unwrap_or_else(|| hex(&k[..k.len().min(8)]));
            let why = match refusals.get(i).map(|r| v1::EnqueueRefusal::try_from(*r)) {
                Some(Ok(r)) if r != v1::EnqueueRefusal::None => r.describe(),
                _ => "the server did not store it",
            };
            self.emit(Event::Rejected { reason: format!("{what} not delivered to {who}: {why}") });
        }
    }

    /// The 0.2 delivery, for a server without commit slots: enqueue and merge.
    pub(crate) async fn send_commit_unordered(
        &mut self,
        pending: PendingCommit,
    ) -> Result<(), ClientError> {
        let req =
            batch_request(pending.commit_to.clone(), pending.commit.clone(), pending.message_id);
        let r: Result<v1::BatchEnqueueResponse, NetError> =
            self.session.call_once(method::BATCH_ENQUEUE, &req).await;
        match r {
            Ok(resp) => {
                self.report_refusals(
                    "group change",
                    &pending.commit_to,
                    &resp.seqs,
                    &resp.refusals,
                );
                if !resp.seqs.is_empty() && resp.seqs.iter().all(|s| *s == 0) {
                    self.state.drop_commit(&pending.conv)?;
                    return Err(ClientError::ChangeNotDelivered);
                }
                self.state.finish_commit(&pending)
            }
            Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                self.session.lose();
                Err(e.into())
            }
            Err(e) if e.is_transient() || e.status() == Some(Status::Unauthorized) => Err(e.into()),
            Err(e) => {
                self.state.drop_commit(&pending.conv)?;
                Err(e.into())
            }
        }
    }

    /// Reads `slot`'s claims in order and applies the first valid one (PROTOCOL.md §6.9):
    /// ours if it comes first among the valid, else another member's, after which our own
    /// change (if any) is staged again for the next epoch.
    pub(crate) async fn resolve_slot(
        &mut self,
        conv: &[u8],
        slot: [u8; 16],
    ) -> Result<Resolution, ClientError> {
        let r = self.read_slot(conv, slot).await;
        self.publish();
        let r = r?;
        // A slot whose claims were all junk, or whose winner we cannot follow, is not read
        // again in this sync (nor its junk reported twice); an empty one may fill meanwhile.
        if matches!(r, Resolution::NoWinner | Resolution::Lost) {
            self.state.resolved.insert(slot);
        }
        Ok(r)
    }

    pub(crate) async fn read_slot(
        &mut self,
        conv: &[u8],
        slot: [u8; 16],
    ) -> Result<Resolution, ClientError> {
        let mut from = 0u32;
        loop {
            let req = v1::FetchSlotRequest { slot: slot.to_vec(), from };
            // On the current connection only (this runs inside the outbox flush that
            // connecting does): a failure ends the flush and the next one asks again.
            let r: Result<v1::FetchSlotResponse, NetError> =
                self.session.call_once(method::FETCH_SLOT, &req).await;
            let r = match r {
                Ok(r) => r,
                Err(e) if e.status() == Some(Status::UnknownMethod) => {
                    return Ok(Resolution::Unsupported);
                }
                Err(e @ (NetError::Connection(_) | NetError::Timeout)) => {
                    self.session.lose();
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            if r.claims.is_empty() {
                return Ok(if from == 0 { Resolution::Empty } else { Resolution::NoWinner });
            }
            // Bounded by the server's slot size, and we never go back.
            from = from.saturating_add(r.claims.len() as u32);
            for claim in r.claims {
                if let Some(done) = self.state.try_claim(conv, &claim)? {
                    return Ok(done);
                }
            }
            // `total` is the server's word: read no more than a slot can hold.
            if from >= r.total || from >= MAX_SLOT_CLAIMS {
                return Ok(Resolution::NoWinner);
            }
        }
    }

    /// Brings `conv` up to `target` (an epoch seen in a message) by applying each missed
    /// epoch's winning claim from its slot, at most [`MAX_CATCH_UP`] epochs per call.
    pub(crate) async fn catch_up(&mut self, conv: &[u8], target: u64) -> Result<(), ClientError> {
        // Each round applies a real commit of the group, so the rounds are as many as the
        // epochs we missed (the cap only guards against a runaway), and a slot this sync
        // already found without a winner is not read again.
        for _ in 0..MAX_CATCH_UP {
            let Ok(epoch) = self.state.mls.epoch(conv) else { return Ok(()) };
            if epoch >= target {
                break;
            }
            let slot = self.state.mls.slot(conv)?;
            if self.state.resolved.contains(&slot) {
                break;
            }
            if !matches!(
                self.resolve_slot(conv, slot).await?,
                Resolution::Applied | Resolution::Won
            ) {
                break;
            }
        }
        Ok(())
    }

    /// Looks at the current slot of every group: a commit our queue never got (it was full,
    /// or the server dropped it) is applied from there. Done at the first sync of a session
    /// and after a gap in our queue.
    pub(crate) async fn catch_up_all(&mut self) -> Result<(), ClientError> {
        for c in self.conversations()? {
            if self.state.mls.epoch(&c.id).is_err() {
                continue;
            }
            let slot = self.state.mls.slot(&c.id)?;
            if self.state.resolved.contains(&slot) {
                continue; // settled by this sync already
            }
            if matches!(
                self.resolve_slot(&c.id, slot).await?,
                Resolution::Applied | Resolution::Won
            ) {
                self.catch_up(&c.id, u64::MAX).await?;
            }
        }
        Ok(())
    }

    /// Commits, in every group, the leave proposals waiting in MLS (as the admin chosen to).
    /// A group where it fails is reported and skipped, so one group cannot stop the others
    /// (or the sync); `Err` only for a network failure, after which the next sync tries again.
    pub(crate) async fn commit_all_proposals(&mut self) -> Result<(), ClientError> {
        for c in self.state.conversations()? {
            if self.state.mls.epoch(&c.id).is_err() {
                continue;
            }
            let committed = match self.state.stage_proposals(&c.id) {
                Ok(Some(pending)) => self.deliver_commit(pending).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match committed {
                Ok(()) => {}
                Err(e @ (ClientError::Net(_) | ClientError::NeedLogin)) => return Err(e),
                Err(e) => self.emit(Event::Rejected {
                    reason: format!("members' leaving could not be committed: {e}"),
                }),
            }
        }
        Ok(())
    }

    /// Removes the members whose leave waited for a commit of ours to settle.
    /// On a failure, what was not committed yet waits for the next sync.
    pub(crate) async fn commit_deferred_leaves(&mut self) -> Result<(), ClientError> {
        let mut waiting = self.state.take_deferred_leaves().into_iter();
        while let Some((conv, ids)) = waiting.next() {
            let done = self.commit_leaves(&conv, &ids).await;
            if let Err(e) = done {
                self.state.defer_leaves(conv, ids);
                for (conv, ids) in waiting {
                    self.state.defer_leaves(conv, ids);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    async fn commit_leaves(&mut self, conv: &[u8], ids: &[[u8; 32]]) -> Result<(), ClientError> {
        if self.state.mls.epoch(conv).is_err() {
            return Ok(()); // we left, or were removed
        }
        if self.state.store.has_pending_commit(conv)? {
            self.state.defer_leaves(conv.to_vec(), ids.to_vec());
            return Ok(());
        }
        let leave = Intent::Leave { ids: ids.to_vec() };
        if let Some(pending) = self.state.stage_change(conv, leave, false, None)? {
            self.deliver_commit(pending).await?;
        }
        Ok(())
    }

    pub(crate) async fn batch_enqueue(
        &mut self,
        to: &[[u8; 32]],
        payload: Vec<u8>,
        message_id: MessageId,
    ) -> Result<(), ClientError> {
        let req = batch_request(to.iter().map(|k| k.to_vec()).collect(), payload, message_id);
        let _: v1::BatchEnqueueResponse = self.call(method::BATCH_ENQUEUE, &req).await?;
        Ok(())
    }
}
