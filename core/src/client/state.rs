//! The client's protocol state, synchronous and without network I/O.
//!
//! [`State`] is the middle of the client, the way quinn-proto is the middle of quinn: the
//! driver ([`super::engine`]) feeds it what arrives (`handle_envelope`, slot claims) and what
//! the user asks (`record_send`, group changes), and takes out what to do next: the durable
//! outbox is the transmit queue, [`State::poll_event`] the UI's events, and each handled
//! envelope returns its [`Effect`]s (acknowledge, learn a name, commit proposals). Nothing here
//! awaits, spawns, sleeps or opens a socket; storage goes through [`LocalStore`], group state
//! through [`Mls`], and each change that must be durable is one vault transaction.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;

use super::error::ClientError;
use super::event::Event;
use super::history::{ConvKind, Conversation, HistoryEntry};
use super::local::{Contact, LocalStore, Recent};
use super::records::{Intent, OutboxItem, PendingCommit};
use crate::content::{Body, Content};
use crate::identity::hex;
use crate::ids::{GroupId, IdentityKey, MessageId};
use crate::keypackage::{self, ClearHeader};
use crate::mls::{GroupError, Incoming, Kind, Mls, Outgoing};
use crate::vault::VaultError;

/// How many times a change of ours is made again after losing its slot.
pub(crate) const MAX_REDO: u8 = 4;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    id
}

/// What the driver must do after an envelope was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Learn the username of this identity (a sender we may not know).
    LearnName([u8; 32]),
    /// Members proposed changes (leaving) in this group: as an admin, commit them.
    CommitProposals(GroupId),
}

/// Where a queued message goes before MLS sees it (PROTOCOL.md §6.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Not a framed message of a group we are in: straight to [`State::handle_envelope`].
    Direct,
    /// A message of a later epoch than ours: catch the group up to `epoch` from its slots
    /// first, then route it again.
    CatchUp { conv: Vec<u8>, epoch: u64 },
    /// A commit of our current epoch: the epoch's slot decides, not the queue.
    Slot { conv: Vec<u8>, slot: [u8; 16] },
    /// A commit of an earlier epoch: a losing claim, or the winner we took from the slot.
    Settled,
}

/// How a slot was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// The slot's first valid claim is our pending commit, now merged.
    Won,
    /// Another member's claim won and was applied (our commit, if any, staged again).
    Applied,
    /// The winner's private part failed here: we cannot follow the group (warned).
    Lost,
    /// The slot holds no claim.
    Empty,
    /// The server has no slots (older than 0.3).
    Unsupported,
    /// Claims, none valid.
    NoWinner,
}

/// Why trying a claim failed.
enum ClaimError {
    /// It fails a check every member makes alike: skip it.
    Invalid(String),
    /// Its private part fails for us: we cannot follow the group.
    CannotFollow(String),
    /// Our own storage or state failed: stop, roll back, try again later.
    Local(ClientError),
}

impl From<ClientError> for ClaimError {
    fn from(e: ClientError) -> Self {
        Self::Local(e)
    }
}

impl From<VaultError> for ClaimError {
    fn from(e: VaultError) -> Self {
        Self::Local(e.into())
    }
}

/// One account's protocol state.
pub(crate) struct State {
    pub(crate) store: LocalStore,
    pub(crate) mls: Mls,
    username: String,
    /// Usernames by identity: a cache of the store's `name/` records.
    names: Mutex<HashMap<[u8; 32], String>>,
    /// The last queue seq stored or rejected for good.
    last_seq: u64,
    events: Mutex<VecDeque<Event>>,
    /// Something was queued by resolving a slot (messages sent again, a change redone): the
    /// driver flushes the outbox.
    queued: AtomicBool,
    /// Slots resolved during the current sync: not read again (nor their junk reported twice).
    pub(crate) resolved: HashSet<[u8; 16]>,
    /// Members whose leave proposal came while a commit of ours was pending in their group.
    deferred_leaves: Mutex<HashMap<Vec<u8>, Vec<[u8; 32]>>>,
}

impl State {
    pub fn new(store: LocalStore, mls: Mls, username: String) -> Result<Self, ClientError> {
        let last_seq = store.last_seq()?;
        Ok(Self {
            store,
            mls,
            username,
            names: Mutex::default(),
            last_seq,
            events: Mutex::default(),
            queued: AtomicBool::new(false),
            resolved: HashSet::new(),
            deferred_leaves: Mutex::default(),
        })
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn identity_key(&self) -> [u8; 32] {
        self.mls.identity_key()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Queues an event for the UI.
    pub fn emit(&self, e: Event) {
        if let Ok(mut q) = self.events.lock() {
            q.push_back(e);
        }
    }

    /// The next event for the UI.
    pub fn poll_event(&self) -> Option<Event> {
        self.events.lock().ok()?.pop_front()
    }

    /// Whether resolving a slot queued something since the last call.
    pub fn take_queued(&self) -> bool {
        self.queued.swap(false, Ordering::Relaxed)
    }

    /// The username remembered for an identity, from the cache or the store.
    pub fn known_name(&self, id: &[u8; 32]) -> Option<String> {
        if let Some(n) = self.names.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Some(n);
        }
        let n = self.store.name(id).ok().flatten()?;
        if let Ok(mut m) = self.names.lock() {
            m.insert(*id, n.clone());
        }
        Some(n)
    }

    /// Marks a contact verified (its safety number was compared out of band).
    pub fn mark_verified(&self, username: &str, verified: bool) -> Result<(), ClientError> {
        let mut c = self
            .store
            .contact(username)?
            .ok_or_else(|| ClientError::UnknownUser(username.into()))?;
        c.verified = verified;
        self.store.save_contact(username, &c)
    }

    /// Remembers the first key seen for a username, or says it changed.
    pub fn check_contact(&self, username: &str, id: [u8; 32]) -> Result<(), ClientError> {
        match self.store.contact(username)? {
            Some(c) if c.key != id => Err(ClientError::KeyChanged {
                username: username.into(),
                pinned: c.key.to_string(),
                presented: hex(&id),
            }),
            Some(_) => Ok(()),
            None => self.store.save_contact(
                username,
                &Contact { key: id.into(), verified: false, since_ms: now_ms() },
            ),
        }
    }

    /// Marks an outbox item delivered: out of the outbox, its entry no longer pending.
    /// One transaction; the UI hears of it once it is stored.
    pub fn delivered(&self, key: &[u8], item: &OutboxItem) -> Result<(), ClientError> {
        let conv = self.store.atomic(|| -> Result<_, ClientError> {
            self.store.unqueue(key)?;
            self.store.update_entry(&item.message_id, |e| e.pending = false)
        })?;
        if let Some(conv) = conv {
            self.emit(Event::Updated { conv, message_id: item.message_id });
        }
        Ok(())
    }

    /// The cached username of an identity, without asking the server.
    pub fn cached_name(&self, id: &[u8]) -> Option<String> {
        let id: [u8; 32] = id.try_into().ok()?;
        if id == self.identity_key() {
            return Some(self.username.clone());
        }
        self.known_name(&id)
    }

    /// Remembers the server's name for an identity.
    pub fn remember_name(&self, id: [u8; 32], name: &str) -> Result<(), ClientError> {
        // The server's reverse answer never overrides a name remembered for another key.
        if self.store.contact(name)?.is_some_and(|c| c.key != id) {
            return Ok(());
        }
        self.store.set_name(&id, name)?;
        if let Ok(mut m) = self.names.lock() {
            m.insert(id, name.to_string());
        }
        Ok(())
    }

    /// Every conversation, most recent first.
    pub fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        let mut out = self.store.conversations()?;
        let verified: Vec<IdentityKey> = self
            .store
            .contacts()?
            .into_iter()
            .filter(|(_, c)| c.verified)
            .map(|(_, c)| c.key)
            .collect();
        for c in &mut out {
            c.verified = c.kind == ConvKind::Dm && c.peer.is_some_and(|p| verified.contains(&p));
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.last_activity_ms));
        Ok(out)
    }

    /// Finds a conversation by its address: `@name` is the direct conversation with that user,
    /// `#name` a group of that name, and a bare `name` either, but only when exactly one
    /// conversation has that name. Whoever runs a group chooses its name, so a group may be
    /// named like a contact: more than one match is [`ClientError::AmbiguousConversation`],
    /// never a guess. Where no name matches, a hex id prefix (4 digits or more, after the
    /// sigil or alone) names a conversation: the way to tell two groups of one name apart.
    pub fn find_conversation(&self, address: &str) -> Result<Conversation, ClientError> {
        let (kind, name) = if let Some(n) = address.strip_prefix('@') {
            (Some(ConvKind::Dm), n)
        } else if let Some(n) = address.strip_prefix('#') {
            (Some(ConvKind::Group), n)
        } else {
            (None, address)
        };
        let all: Vec<Conversation> = self
            .conversations()?
            .into_iter()
            .filter(|c| kind.is_none_or(|k| c.kind == k))
            .collect();
        let mut found: Vec<&Conversation> = all.iter().filter(|c| c.name == name).collect();
        if found.is_empty() && name.len() >= 4 {
            let prefix = name.to_ascii_lowercase();
            found = all.iter().filter(|c| hex(&c.id).starts_with(&prefix)).collect();
        }
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ClientError::UnknownConversation(address.into())),
            many => Err(ClientError::AmbiguousConversation {
                name: name.into(),
                matches: many
                    .iter()
                    // Names come from peers: escaped, so an error never drives a terminal.
                    .map(|c| match c.kind {
                        ConvKind::Dm => format!("@{}", c.name.escape_debug()),
                        ConvKind::Group => format!(
                            "#{} (id {})",
                            c.name.escape_debug(),
                            hex(&c.id[..4.min(c.id.len())])
                        ),
                    })
                    .collect(),
            }),
        }
    }

    /// How a conversation is written in lists and output, as [`Client::find_conversation`]
    /// takes it: `@name` for the direct conversation with that user, `#name` for a group. A
    /// group whose name is also a person's here (ours, a DM peer's, a remembered contact's)
    /// says so, since its name was chosen by whoever runs it.
    pub fn conversation_label(&self, c: &Conversation) -> Result<String, ClientError> {
        if c.kind == ConvKind::Dm {
            return Ok(format!("@{}", c.name));
        }
        let personal = c.name == self.username
            || self.store.contact(&c.name)?.is_some()
            || self.conversations()?.iter().any(|d| d.kind == ConvKind::Dm && d.name == c.name);
        Ok(if personal {
            format!("#{} (a group, named like the person @{})", c.name, c.name)
        } else {
            format!("#{}", c.name)
        })
    }

    /// Marks a conversation read; returns the last message id, for a read receipt.
    pub fn mark_read(&self, conv: &[u8]) -> Result<Option<MessageId>, ClientError> {
        if let Some(mut c) = self.store.conversation(conv)? {
            c.unread = 0;
            c.mentions = 0;
            self.store.save_conversation(&c)?;
        }
        Ok(self.store.history(conv, 1)?.last().filter(|e| !e.system).map(|e| e.message_id))
    }

    pub(crate) fn append(
        &self,
        conv: &[u8],
        make: impl FnOnce(u64) -> HistoryEntry,
        from_peer: bool,
    ) -> Result<HistoryEntry, ClientError> {
        let mut c = self
            .store
            .conversation(conv)?
            .ok_or_else(|| ClientError::UnknownConversation(hex(conv)))?;
        let seq = c.next_seq;
        let entry = make(seq);
        c.next_seq += 1;
        c.last_activity_ms = now_ms();
        if from_peer && !entry.system {
            c.unread += 1;
            if entry.mentions(&self.username) {
                c.mentions += 1;
            }
        }
        self.store.put_entry(&c, &entry)?;
        Ok(entry)
    }

    pub(crate) fn new_conversation(
        &self,
        id: impl Into<GroupId>,
        kind: ConvKind,
        name: String,
        peer: Option<[u8; 32]>,
    ) -> Result<Conversation, ClientError> {
        let c = Conversation {
            id: id.into(),
            kind,
            name,
            topic: String::new(),
            peer: peer.map(IdentityKey::from),
            last_activity_ms: now_ms(),
            unread: 0,
            mentions: 0,
            next_seq: 0,
            verified: false,
            warning: String::new(),
        };
        self.store.save_conversation(&c)?;
        Ok(c)
    }

    /// Encrypts `content` and records it: its history entry (pending), its own effect, its
    /// outbox item. Runs inside the caller's vault transaction, with the MLS state it spends.
    pub(crate) fn record_send(
        &self,
        conv: &[u8],
        me: &[u8; 32],
        content: &Content,
    ) -> Result<Option<HistoryEntry>, ClientError> {
        let bytes = content.encode()?;
        if let Body::Meta { name, topic } = &content.body
            && let Some(mut c) = self.store.conversation(conv)?
        {
            c.name = name.clone();
            c.topic = topic.clone();
            self.store.save_conversation(&c)?;
        }
        let epoch = self.mls.epoch(conv)?;
        let (ciphertext, to) = self.mls.encrypt(conv, &bytes)?;
        let entry = match HistoryEntry::from_content(0, me, content, now_ms()) {
            Some(_) => Some(self.append(
                conv,
                |seq| {
                    let mut e = HistoryEntry::from_content(seq, me, content, now_ms())
                        .unwrap_or_else(|| HistoryEntry::system(seq, String::new(), 0));
                    e.pending = !to.is_empty();
                    e
                },
                false,
            )?),
            None => None,
        };
        self.apply_own(conv, content)?;
        if !to.is_empty() {
            let counter = self.store.send_counter()?;
            self.queue(conv, &to, ciphertext, content.message_id)?;
            // Kept until its epoch is settled: see `resend_superseded`.
            self.store.remember_sent(conv, &Recent { epoch, counter, content: bytes })?;
        }
        Ok(entry)
    }

    /// Applies our own edits, deletes and reactions to local history.
    pub(crate) fn apply_own(&self, _conv: &[u8], content: &Content) -> Result<(), ClientError> {
        let me = self.identity_key();
        self.apply_effect(&me, content)?;
        Ok(())
    }

    /// Applies a non-text body from `sender` to history; returns the changed conversation.
    pub(crate) fn apply_effect(
        &self,
        sender: &[u8; 32],
        content: &Content,
    ) -> Result<Option<GroupId>, ClientError> {
        Ok(match &content.body {
            Body::Edit { target, body } => self.store.update_entry(target, |e| {
                if e.sender == sender {
                    e.text = body.clone();
                    e.edited = true;
                }
            })?,
            Body::Delete { target } => self.store.update_entry(target, |e| {
                if e.sender == sender {
                    e.text.clear();
                    e.file = None;
                    e.deleted = true;
                }
            })?,
            Body::Reaction { target, emoji, remove } => self.store.update_entry(target, |e| {
                e.reactions.retain(|(em, who)| !(em == emoji && who == sender));
                if !remove {
                    e.reactions.push((emoji.clone(), sender.to_vec()));
                }
            })?,
            Body::Receipt { up_to } => self.mark_read_by(sender, up_to)?,
            _ => None,
        })
    }

    /// Records that `reader` has read everything up to `up_to` (the recent history of that
    /// conversation; older entries were read long ago).
    pub(crate) fn mark_read_by(
        &self,
        reader: &[u8; 32],
        up_to: &[u8; 16],
    ) -> Result<Option<GroupId>, ClientError> {
        let Some((conv, last)) = self.store.locate(up_to)? else { return Ok(None) };
        self.store.update_recent_entries(&conv, 200, |e| {
            let unread = e.seq <= last
                && !e.system
                && e.sender != reader
                && !e.read_by.iter().any(|w| w == reader);
            if unread {
                e.read_by.push(reader.to_vec());
            }
            unread
        })?;
        Ok(Some(conv))
    }

    /// Sends again, in the group's new epoch, what we sent in `epoch` before another member's
    /// commit of that epoch won: members that applied the commit before our message reached
    /// them can no longer decrypt it (openmls keeps no past epochs' keys). Those that did read
    /// it recognise the repeat by its message id. Runs in the transaction that applied the
    /// winner; returns how many messages went out again.
    pub(crate) fn resend_superseded(
        &self,
        conv: &[u8],
        epoch: u64,
        readers: &[[u8; 32]],
    ) -> Result<usize, ClientError> {
        let mut mine = self.store.recent(conv)?;
        if mine.is_empty() || self.mls.epoch(conv).is_err() {
            return Ok(0);
        }
        // The ring is not in send order.
        mine.retain(|r| r.epoch == epoch);
        mine.sort_by_key(|r| r.counter);
        let mut sent = 0;
        for recent in mine {
            let (ciphertext, mut to) = self.mls.encrypt(conv, &recent.content)?;
            // Only to those who were members when it was first sent: not to newcomers.
            to.retain(|k| readers.contains(k));
            if !to.is_empty() {
                // A new transport id: the server still holds the first one for dedup.
                self.queue(conv, &to, ciphertext, MessageId::random())?;
                sent += 1;
            }
        }
        self.store.forget_recent(conv)?;
        if sent > 0 {
            self.queued.store(true, Ordering::Relaxed);
        }
        Ok(sent)
    }

    /// Puts a payload in the outbox (inside the caller's vault transaction, if any).
    pub(crate) fn queue(
        &self,
        conv: &[u8],
        to: &[[u8; 32]],
        payload: Vec<u8>,
        message_id: MessageId,
    ) -> Result<(), ClientError> {
        self.store.queue(&OutboxItem {
            conv: conv.into(),
            to: to.iter().map(|t| t.to_vec()).collect(),
            payload,
            message_id,
        })
    }

    /// Puts a lasting warning on a conversation (shown in its info and as a system line), once.
    pub(crate) fn warn_conversation(&self, conv: &[u8], text: &str) -> Result<(), ClientError> {
        let Some(mut c) = self.store.conversation(conv)? else { return Ok(()) };
        if c.warning == text {
            return Ok(());
        }
        let entry = self.store.atomic(|| -> Result<HistoryEntry, ClientError> {
            c.warning = text.to_string();
            self.store.save_conversation(&c)?;
            self.append(conv, |seq| HistoryEntry::system(seq, format!("⚠ {text}"), now_ms()), false)
        })?;
        self.emit(Event::Message { conv: conv.into(), entry });
        self.emit(Event::Conversation { conv: conv.into() });
        Ok(())
    }

    /// Processes one fetched envelope's data: MLS, then its effect on conversations and history.
    pub(crate) fn process_one(&self, data: &[u8]) -> Result<Vec<Event>, ClientError> {
        let incoming = self.mls.process(data)?;
        self.apply_incoming(incoming)
    }

    /// Applies what MLS made of an envelope: content decoding, history, conversations.
    pub(crate) fn apply_incoming(&self, incoming: Incoming) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        match incoming {
            Incoming::Joined { group_id, kind, members } => {
                let group_id = GroupId::from(group_id);
                let me = self.identity_key();
                let peer = members.iter().map(|m| m.identity).find(|id| *id != me);
                let (kind, name) = match kind {
                    Kind::Dm => (
                        ConvKind::Dm,
                        peer.and_then(|p| self.cached_name(&p))
                            .unwrap_or_else(|| peer.map(|p| hex(&p[..6])).unwrap_or_default()),
                    ),
                    _ => (
                        ConvKind::Group,
                        format!("group-{}", hex(&group_id[..4.min(group_id.len())])),
                    ),
                };
                self.new_conversation(
                    group_id.clone(),
                    kind,
                    name,
                    if kind == ConvKind::Dm { peer } else { None },
                )?;
                events.push(Event::Conversation { conv: group_id });
            }
            Incoming::Application { group_id, sender, plaintext } => {
                let group_id = GroupId::from(group_id);
                let content = Content::decode(&plaintext)?;
                match &content.body {
                    // A message sent again after its epoch was superseded
                    // (`resend_superseded`), which we had read the first time.
                    Body::Text { .. } | Body::File(_)
                        if self.store.knows_message(&content.message_id)? => {}
                    Body::Text { .. } | Body::File(_) => {
                        let entry = self.append(
                            &group_id,
                            |seq| {
                                HistoryEntry::from_content(seq, &sender, &content, now_ms())
                                    .unwrap_or_else(|| HistoryEntry::system(seq, String::new(), 0))
                            },
                            true,
                        )?;
                        events.push(Event::Message { conv: group_id, entry });
                    }
                    Body::Meta { name, topic } => {
                        // A group's name and topic are set by its admins; a DM has none to set.
                        let group = self
                            .store
                            .conversation(&group_id)?
                            .filter(|c| c.kind == ConvKind::Group);
                        let by_admin = self
                            .mls
                            .members(&group_id)?
                            .iter()
                            .any(|m| m.identity == sender && m.admin);
                        match group {
                            Some(mut c) if by_admin => {
                                c.name = name.clone();
                                c.topic = topic.clone();
                                self.store.save_conversation(&c)?;
                                events.push(Event::Conversation { conv: group_id });
                            }
                            _ => {
                                let who =
                                    self.cached_name(&sender).unwrap_or_else(|| hex(&sender[..6]));
                                let reason = match group {
                                    Some(_) => {
                                        format!("{who} tried to rename the group, not an admin")
                                    }
                                    None => format!("{who} tried to rename a direct conversation"),
                                };
                                events.push(Event::Rejected { reason });
                            }
                        }
                    }
                    Body::Typing { active } => events.push(Event::Typing {
                        conv: group_id,
                        who: sender.into(),
                        active: *active,
                    }),
                    _ => {
                        if let Some(conv) = self.apply_effect(&sender, &content)? {
                            events.push(Event::Updated {
                                conv,
                                message_id: target_of(&content.body),
                            });
                        }
                    }
                }
            }
            Incoming::Commit { group_id, committer, added, removed, removed_us, .. } => {
                // Whoever this commit removed has left: a leave of theirs we put off is done
                // (and must not remove them again if they are invited back).
                if !removed.is_empty()
                    && let Ok(mut deferred) = self.deferred_leaves.lock()
                    && let Some(waiting) = deferred.get_mut(&group_id)
                {
                    waiting.retain(|id| !removed.contains(id));
                }
                let group_id = GroupId::from(group_id);
                let who = |id: &[u8; 32]| self.cached_name(id).unwrap_or_else(|| hex(&id[..6]));
                let mut lines = Vec::new();
                if !added.is_empty() {
                    lines.push(format!(
                        "{} added {}",
                        who(&committer),
                        added.iter().map(who).collect::<Vec<_>>().join(", ")
                    ));
                }
                if !removed.is_empty() {
                    lines.push(format!(
                        "{} removed {}",
                        who(&committer),
                        removed.iter().map(who).collect::<Vec<_>>().join(", ")
                    ));
                }
                if removed_us && let Some(mut c) = self.store.conversation(&group_id)? {
                    c.topic = "you were removed from this group".into();
                    self.store.save_conversation(&c)?;
                }
                for line in lines {
                    let entry = self.append(
                        &group_id,
                        |seq| HistoryEntry::system(seq, line, now_ms()),
                        false,
                    )?;
                    events.push(Event::Message { conv: group_id.clone(), entry });
                }
                events.push(Event::Conversation { conv: group_id });
            }
            Incoming::Proposal { group_id, .. } => {
                let group_id = GroupId::from(group_id);
                events.push(Event::Proposal { conv: group_id.clone() });
                events.push(Event::Conversation { conv: group_id });
            }
        }
        Ok(events)
    }

    /// The commit that carries out `intent` in the group's current epoch, or `None` if the
    /// group already is as asked (another admin's commit did it first).
    pub(crate) fn build(
        &self,
        conv: &[u8],
        intent: &Intent,
    ) -> Result<Option<Outgoing>, ClientError> {
        let members = self.mls.members(conv)?;
        let member = |id: &[u8; 32]| members.iter().any(|m| m.identity == *id);
        Ok(match intent {
            Intent::Add { kps, ids } => {
                let (kps, ids): (Vec<Vec<u8>>, Vec<[u8; 32]>) = kps
                    .iter()
                    .cloned()
                    .zip(ids.iter().copied())
                    .filter(|(_, id)| !member(id))
                    .unzip();
                if ids.is_empty() { None } else { Some(self.mls.add(conv, &kps, &ids)?) }
            }
            Intent::Remove { ids } => {
                let ids: Vec<[u8; 32]> = ids.iter().copied().filter(|id| member(id)).collect();
                if ids.is_empty() { None } else { Some(self.mls.remove(conv, &ids)?) }
            }
            Intent::Admin { id, admin } => {
                let Some(target) = members.iter().find(|m| m.identity == *id) else {
                    return Ok(None);
                };
                if target.admin == *admin {
                    return Ok(None);
                }
                let mut admins: Vec<[u8; 32]> =
                    members.iter().filter(|m| m.admin).map(|m| m.identity).collect();
                admins.retain(|a| a != id);
                if *admin {
                    admins.push(*id);
                }
                Some(self.mls.set_admins(conv, admins)?)
            }
            Intent::Rotate => Some(self.mls.self_update(conv)?),
            // The members' own removal proposals, or, once another commit made them stale,
            // their removal by us as an admin (the proposals were authenticated; leaving must
            // not depend on winning a race).
            Intent::Leave { ids } => match self.mls.commit_pending(conv)? {
                Some(out) => Some(out),
                None => {
                    let me = self.identity_key();
                    let ids: Vec<[u8; 32]> = ids.iter().copied().filter(|id| member(id)).collect();
                    let admin = members.iter().any(|m| m.identity == me && m.admin);
                    if ids.is_empty() || !admin { None } else { Some(self.mls.remove(conv, &ids)?) }
                }
            },
        })
    }

    /// Records a commit we just made as pending, in the caller's vault transaction (the one
    /// that made it): from here on a crash leaves the record, and the next flush delivers it
    /// under the same message id, as a claim on the same slot.
    pub(crate) fn stage_commit(
        &self,
        conv: &[u8],
        out: Outgoing,
        announce: bool,
        system: Option<String>,
        intent: Intent,
        attempt: u8,
    ) -> Result<PendingCommit, ClientError> {
        let keys = |v: &[[u8; 32]]| v.iter().map(|k| k.to_vec()).collect();
        let pending = PendingCommit {
            conv: conv.into(),
            commit: out.commit,
            commit_to: keys(&out.commit_to),
            message_id: MessageId::random(),
            welcome: out.welcome,
            welcome_to: keys(&out.welcome_to),
            welcome_id: MessageId::random(),
            announce,
            system,
            // While the commit is pending the group is still in the epoch it commits from.
            slot: Some(self.mls.slot(conv)?),
            intent: Some(intent),
            attempt,
        };
        self.store.put_commit(&pending)?;
        Ok(pending)
    }

    /// Drops our pending commit in `conv` and its record: the server holds none of it.
    pub(crate) fn drop_commit(&self, conv: &[u8]) -> Result<(), ClientError> {
        self.store.atomic(|| -> Result<(), ClientError> {
            if self.mls.has_pending_commit(conv)? {
                self.mls.abandon(conv)?;
            }
            self.store.forget_commit(conv)?;
            Ok(())
        })
    }

    /// Our commit won its slot (or nobody else is in the group): merge it, and queue the
    /// Welcome (and the group's name for newcomers) in the same vault transaction, so a crash
    /// now delays them instead of losing them.
    pub(crate) fn finish_commit(&self, pending: &PendingCommit) -> Result<(), ClientError> {
        let conv = &pending.conv;
        let me = self.identity_key();
        let entry = self.store.atomic(|| -> Result<Option<HistoryEntry>, ClientError> {
            self.mls.confirm(conv)?;
            if let (Some(welcome), false) = (&pending.welcome, pending.welcome_to.is_empty()) {
                self.queue(
                    conv,
                    &keys32(&pending.welcome_to),
                    welcome.clone(),
                    pending.welcome_id,
                )?;
            }
            if pending.announce
                && let Some(c) = self.store.conversation(conv)?
                && c.kind == ConvKind::Group
            {
                let meta = Content::new(Body::Meta { name: c.name, topic: c.topic }, now_ms());
                self.record_send(conv, &me, &meta)?;
            }
            self.store.forget_commit(conv)?;
            pending
                .system
                .as_ref()
                .map(|text| {
                    self.append(
                        conv,
                        |seq| HistoryEntry::system(seq, text.clone(), now_ms()),
                        false,
                    )
                })
                .transpose()
        })?;
        if let Some(entry) = entry {
            self.emit(Event::Message { conv: conv.clone(), entry });
        }
        Ok(())
    }

    /// Tries one claim of `conv`'s current slot. `None`: it fails a public check (every member
    /// skips it alike), try the next.
    pub(crate) fn try_claim(
        &self,
        conv: &[u8],
        claim: &[u8],
    ) -> Result<Option<Resolution>, ClientError> {
        let pending = self.store.pending_commit(conv)?;
        if let Some(p) = &pending
            && p.commit == claim
        {
            self.finish_commit(p)?;
            return Ok(Some(Resolution::Won));
        }
        // A claim must be a commit of this group made in our epoch: anything else (a commit of
        // another group we are in, a replay from an earlier epoch) is junk here.
        let epoch = self.mls.epoch(conv)?;
        let fits = matches!(
            keypackage::clear_header(claim),
            Some(ClearHeader::Framed { group_id, epoch: e, content_type: keypackage::CONTENT_COMMIT, .. })
                if group_id == conv && e == epoch
        );
        if !fits {
            self.emit(Event::Rejected {
                reason: "ignored a commit claim that is not a commit of this group's epoch".into(),
            });
            return Ok(None);
        }
        // Who could read our messages of this epoch: they get what we send again.
        let before: Vec<[u8; 32]> = self.mls.members(conv)?.iter().map(|m| m.identity).collect();
        let result = self.store.atomic(|| -> Result<(Vec<Event>, bool), ClaimError> {
            // Only what MLS says of the claim itself decides between skipping it and stopping;
            // any failure after that is ours, and ends this try (rolled back, tried again).
            let incoming = match self.mls.process(claim) {
                Ok(i @ Incoming::Commit { .. }) => i,
                Ok(_) => return Err(ClaimError::Invalid("not a commit".into())),
                Err(GroupError::CannotFollow(why)) => return Err(ClaimError::CannotFollow(why)),
                Err(e @ GroupError::Mls(_)) => return Err(ClaimError::Local(e.into())),
                Err(e) => return Err(ClaimError::Invalid(e.to_string())),
            };
            let mut events = self.apply_incoming(incoming)?;
            self.resend_superseded(conv, epoch, &before)?;
            // Our own commit of the same epoch lost: make the change again on top of the
            // winner, in this same transaction.
            let redone = match pending {
                Some(p) => {
                    self.store.forget_commit(conv)?;
                    self.restage(p, &mut events)?
                }
                None => false,
            };
            Ok((events, redone))
        });
        match result {
            Ok((events, redone)) => {
                for e in events {
                    self.emit(e);
                }
                if redone {
                    self.emit(Event::Rejected {
                        reason: "another admin changed the group at the same time: your change \
                                 was made again on top of theirs"
                            .into(),
                    });
                }
                Ok(Some(Resolution::Applied))
            }
            Err(ClaimError::CannotFollow(why)) => {
                self.drop_commit(conv)?;
                self.warn_conversation(
                    conv,
                    &format!(
                        "you can no longer follow this group: a change could not be decrypted \
                         for you ({why}). Ask an admin to remove and re-add you."
                    ),
                )?;
                Ok(Some(Resolution::Lost))
            }
            Err(ClaimError::Local(e)) => Err(e),
            Err(ClaimError::Invalid(why)) => {
                self.emit(Event::Rejected {
                    reason: format!("ignored an invalid commit claim: {why}"),
                });
                Ok(None)
            }
        }
    }

    /// Stages our change again after another member's commit won the epoch. Returns whether
    /// there was still something to change. Called in the transaction that applied the winner.
    /// What the user should hear goes to `events`, published once the transaction commits.
    pub(crate) fn restage(
        &self,
        lost: PendingCommit,
        events: &mut Vec<Event>,
    ) -> Result<bool, ClientError> {
        let Some(intent) = lost.intent else { return Ok(false) };
        if lost.attempt >= MAX_REDO {
            events.push(Event::Rejected {
                reason: "a group change lost to other admins' changes too often and was given up"
                    .into(),
            });
            return Ok(false);
        }
        let out = match self.build(&lost.conv, &intent) {
            Ok(Some(out)) => out,
            Ok(None) => return Ok(false),
            // No longer possible (we were demoted, or removed): say so, keep the winner.
            Err(ClientError::Group(e)) => {
                events.push(Event::Rejected {
                    reason: format!("a group change could not be redone: {e}"),
                });
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        self.stage_commit(&lost.conv, out, lost.announce, lost.system, intent, lost.attempt + 1)?;
        self.queued.store(true, Ordering::Relaxed);
        Ok(true)
    }

    // ----- receiving -------------------------------------------------------------------

    /// Whether `seq` comes after a gap in the queue (messages expired on the server before we
    /// fetched them); says so to the UI.
    pub fn check_gap(&self, seq: u64) -> bool {
        let gap = self.last_seq > 0 && seq > self.last_seq.saturating_add(1);
        if gap {
            self.emit(Event::Gap { after: self.last_seq, next: seq });
        }
        gap
    }

    /// Where a queued message goes first. `caught_up`: the driver already caught its group up
    /// as far as the slots allowed.
    pub fn route(&self, data: &[u8], caught_up: bool) -> Result<Route, ClientError> {
        let Some(ClearHeader::Framed { group_id, epoch, content_type, .. }) =
            keypackage::clear_header(data)
        else {
            return Ok(Route::Direct);
        };
        let conv = group_id.to_vec();
        let is_commit = content_type == keypackage::CONTENT_COMMIT;
        let Ok(ours) = self.mls.epoch(&conv) else {
            // Removed while catching up: the commit is done with; anything else goes to MLS,
            // which says why it is refused.
            return Ok(if caught_up && is_commit { Route::Settled } else { Route::Direct });
        };
        if epoch > ours && !caught_up {
            return Ok(Route::CatchUp { conv, epoch });
        }
        if !is_commit {
            return Ok(Route::Direct);
        }
        if epoch < ours {
            return Ok(Route::Settled);
        }
        if epoch > ours {
            return Ok(Route::Direct); // could not catch up: MLS rejects it, the user hears why
        }
        let slot = self.mls.slot(&conv)?;
        Ok(Route::Slot { conv, slot })
    }

    /// Moves the cursor past a queued message its slot settled.
    pub fn skip(&mut self, seq: u64) -> Result<(), ClientError> {
        self.store.set_last_seq(seq)?;
        self.last_seq = seq;
        Ok(())
    }

    /// Handles queued message `seq`: MLS, then its effect on conversations and history, stored
    /// with the new cursor in one transaction. A message that is bad in itself (tampered, not
    /// for us, an unauthorized commit) is rejected for good and counts as handled. A failure of
    /// our own storage is returned with nothing stored: the message is fetched again.
    pub fn handle_envelope(&mut self, seq: u64, data: &[u8]) -> Result<Vec<Effect>, ClientError> {
        if seq <= self.last_seq {
            return Ok(Vec::new()); // already stored; the ack was lost
        }
        let result = self.store.atomic(|| -> Result<Vec<Event>, ClientError> {
            let events = self.process_one(data)?;
            self.store.set_last_seq(seq)?;
            Ok(events)
        });
        let mut effects = Vec::new();
        match result {
            Ok(events) => {
                for e in events {
                    match &e {
                        Event::Proposal { conv } => {
                            let effect = Effect::CommitProposals(conv.clone());
                            if !effects.contains(&effect) {
                                effects.push(effect);
                            }
                            continue;
                        }
                        Event::Message { entry, .. } => {
                            if let Ok(id) = <[u8; 32]>::try_from(entry.sender.as_slice()) {
                                effects.push(Effect::LearnName(id));
                            }
                        }
                        _ => {}
                    }
                    self.emit(e);
                }
            }
            Err(e @ (ClientError::Vault(_) | ClientError::Io(_))) => {
                return Err(e);
            }
            Err(e) => {
                self.store.set_last_seq(seq)?;
                if let ClientError::Group(g @ GroupError::Forked { .. }) = &e
                    && let Some(ClearHeader::Framed { group_id, .. }) =
                        keypackage::clear_header(data)
                {
                    self.warn_conversation(group_id, &g.to_string())?;
                }
                self.emit(Event::Rejected { reason: e.to_string() });
            }
        }
        self.last_seq = seq;
        Ok(effects)
    }

    /// The commit that carries out the pending proposals of `conv` (members leaving), staged;
    /// `None` if there is nothing to commit. With a commit of ours already pending there (one
    /// at a time), who is leaving is remembered for [`State::take_deferred_leaves`]: merging
    /// our commit drops the proposals, and the leavers must still go.
    pub fn stage_proposals(&self, conv: &[u8]) -> Result<Option<PendingCommit>, ClientError> {
        // Read-only first: most groups have nobody leaving, and a write transaction costs an
        // fsync even when it writes nothing (this runs for every group at each session start).
        let leaving = self.mls.leaving(conv)?;
        if leaving.is_empty() {
            return Ok(None);
        }
        if self.store.has_pending_commit(conv)? {
            self.defer_leaves(conv.to_vec(), leaving);
            return Ok(None);
        }
        self.store.atomic(|| -> Result<_, ClientError> {
            let intent = Intent::Leave { ids: leaving };
            match self.mls.commit_pending(conv)? {
                Some(out) => Ok(Some(self.stage_commit(conv, out, false, None, intent, 0)?)),
                None => Ok(None),
            }
        })
    }

    /// The leaves [`State::stage_proposals`] put off, by group.
    pub fn take_deferred_leaves(&self) -> Vec<(Vec<u8>, Vec<[u8; 32]>)> {
        self.deferred_leaves.lock().map(|mut d| d.drain().collect()).unwrap_or_default()
    }

    /// Puts a leave back for later (our commit there is still pending).
    pub fn defer_leaves(&self, conv: Vec<u8>, ids: Vec<[u8; 32]>) {
        if let Ok(mut d) = self.deferred_leaves.lock() {
            let waiting = d.entry(conv).or_default();
            for id in ids {
                if !waiting.contains(&id) {
                    waiting.push(id);
                }
            }
        }
    }

    /// Stages the commit for `intent`, or `None` if the group already is as asked.
    pub fn stage_change(
        &self,
        conv: &[u8],
        intent: Intent,
        announce: bool,
        system: Option<String>,
    ) -> Result<Option<PendingCommit>, ClientError> {
        self.store.atomic(|| -> Result<_, ClientError> {
            match self.build(conv, &intent)? {
                Some(out) => Ok(Some(self.stage_commit(conv, out, announce, system, intent, 0)?)),
                None => Ok(None),
            }
        })
    }
}

/// The message an edit, delete, reaction or receipt is about.
fn target_of(body: &Body) -> MessageId {
    match body {
        Body::Edit { target, .. } | Body::Delete { target } | Body::Reaction { target, .. } => {
            *target
        }
        Body::Receipt { up_to } => *up_to,
        _ => MessageId::default(),
    }
}

fn keys32(keys: &[Vec<u8>]) -> Vec<[u8; 32]> {
    keys.iter().filter_map(|k| k.as_slice().try_into().ok()).collect()
}
