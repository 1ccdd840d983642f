//! Groups and DMs on openmls with the X-Wing ciphersuite, and the admin roles every member
//! enforces.
//!
//! Roles live in the MLS group context, in a qpq extension (type [`QPQ_GROUP_EXTENSION`])
//! holding the conversation kind and the admins' identity keys. Because it is part of the
//! group context, every member has the same view of it at every epoch, and changing it takes
//! a commit. When a member processes a commit it checks the committer against the admins of
//! the epoch the commit was made in: only an admin may add members, remove others, or change
//! the extension. Only admins commit at all (in a DM both members are admins): a member's own
//! removal is a proposal an admin commits by value. Every commit carries its proposals by
//! value, so it means the same to every member whatever proposals each has stored. A commit
//! that breaks a rule is rejected by every member alike and never merged.

use std::sync::Arc;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_traits::OpenMlsProvider;

use super::QpqProvider;
use crate::credential;
use crate::identity::Identity;
use crate::vault::Vault;

/// The ciphersuite of every qpq group: X-Wing (X25519 + ML-KEM-768) HPKE, AES-128-GCM,
/// SHA-256, Ed25519.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519;

/// Group context extension holding the conversation kind and the admins.
pub const QPQ_GROUP_EXTENSION: u16 = 0xF0A1;

/// A failed MLS operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// No group with this id is stored.
    #[error("unknown group")]
    UnknownGroup,
    /// The caller is not an admin of the group.
    #[error("only group admins can do this")]
    NotAdmin,
    /// A commit broke the admin rule; it was rejected.
    #[error("rejected a commit from a non-admin that changes membership or roles")]
    UnauthorizedCommit,
    /// The identity is not a member.
    #[error("not a member of this group")]
    NotMember,
    /// A KeyPackage from the server was invalid or of another ciphersuite.
    #[error("invalid KeyPackage: {0}")]
    BadKeyPackage(String),
    /// A KeyPackage belongs to another account than the one asked for: the server (or whoever
    /// uploaded it) substituted a peer. Nothing was added.
    #[error(
        "KEY MISMATCH: the KeyPackage the server returned belongs to account {found}, not to \
         {expected} that was asked for; nothing was added. The server may be substituting a peer."
    )]
    IdentityMismatch {
        /// The account asked for (hex).
        expected: String,
        /// The account in the KeyPackage's credential (hex).
        found: String,
    },
    /// A member's credential does not bind its signature key to an account.
    #[error("invalid member credential: {0}")]
    BadCredential(String),
    /// A proposal broke the admin rule, or is of a kind qpq does not use; it was rejected.
    #[error("rejected an unauthorized proposal: {0}")]
    UnauthorizedProposal(String),
    /// A message could not be parsed or processed (tampered, wrong epoch, not for us).
    #[error("rejected MLS message: {0}")]
    Rejected(String),
    /// A message was made in our epoch on another branch of the group: its epoch tag (a hash
    /// of the epoch authenticator in its authenticated data) differs from ours. Someone, most
    /// likely the server, gave members different commits.
    #[error(
        "FORK (or tampering): a message of this group claims epoch {epoch} of another branch \
         than ours (members may no longer share one group state; compare verification codes)"
    )]
    Forked {
        /// The epoch both branches call by the same number.
        epoch: u64,
    },
    /// A commit passed every public check but its private part (the path secret encrypted to
    /// us, or the confirmation tag that depends on it) failed here: we cannot follow the group
    /// into the next epoch. Other members may well have.
    #[error("cannot follow this group's change ({0}); ask an admin to remove and re-add you")]
    CannotFollow(String),
    /// openmls or the storage failed.
    #[error("MLS error: {0}")]
    Mls(String),
}

impl From<crate::vault::VaultError> for GroupError {
    fn from(e: crate::vault::VaultError) -> Self {
        Self::Mls(e.to_string())
    }
}

fn mls<E: std::fmt::Display>(e: E) -> GroupError {
    GroupError::Mls(e.to_string())
}

/// Sorts a failed `process_message`: a failure only this member can have (the path secret
/// encrypted to it, or the confirmation tag computed from it) is [`GroupError::CannotFollow`];
/// everything else is a check every member makes identically from what it shares with the
/// others, so the message is [`GroupError::Rejected`] for all of them.
fn classify<S: std::error::Error>(e: ProcessMessageError<S>) -> GroupError {
    let private = matches!(
        &e,
        ProcessMessageError::InvalidCommit(
            StageCommitError::ConfirmationTagMismatch
                | StageCommitError::UpdatePathError(
                    ApplyUpdatePathError::UnableToDecrypt | ApplyUpdatePathError::PathMismatch
                )
        )
    );
    // Our own storage or openmls failing is neither: the caller stops and tries again later.
    let local =
        matches!(&e, ProcessMessageError::StorageError(_) | ProcessMessageError::LibraryError(_));
    if private {
        GroupError::CannotFollow(e.to_string())
    } else if local {
        GroupError::Mls(e.to_string())
    } else {
        GroupError::Rejected(e.to_string())
    }
}

/// Exporter label of an epoch's commit slot (PROTOCOL.md §6.9).
const SLOT_LABEL: &str = "qpq commit slot v1";
/// Version byte of the epoch tag qpq puts in every application message's authenticated data.
const EPOCH_TAG_V1: u8 = 1;
/// Length of an epoch tag: the version byte and 16 bytes of hash.
pub const EPOCH_TAG_LEN: usize = 17;

/// The epoch tag of a group's current epoch: `0x01 ‖ SHA-256("qpq epoch tag v1" ‖ epoch
/// authenticator)[..16]`. Every member of the same epoch on the same branch computes the same
/// tag; members of another branch at the same epoch number do not.
fn epoch_tag(group: &MlsGroup) -> Vec<u8> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"qpq epoch tag v1");
    h.update(group.epoch_authenticator().as_slice());
    let digest = h.finalize();
    let mut tag = Vec::with_capacity(EPOCH_TAG_LEN);
    tag.push(EPOCH_TAG_V1);
    tag.extend_from_slice(&digest[..EPOCH_TAG_LEN - 1]);
    tag
}

/// What kind of conversation a group is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A two-member conversation.
    Dm,
    /// A group.
    Group,
}

/// The qpq group extension's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPolicy {
    /// DM or group.
    pub kind: Kind,
    /// Identity keys of the admins.
    pub admins: Vec<[u8; 32]>,
}

impl GroupPolicy {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![match self.kind {
            Kind::Dm => 1,
            Kind::Group => 0,
        }];
        for a in &self.admins {
            out.extend_from_slice(a);
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let (kind, rest) = b.split_first()?;
        if rest.len() % 32 != 0 {
            return None;
        }
        let kind = match kind {
            1 => Kind::Dm,
            0 => Kind::Group,
            _ => return None,
        };
        let admins = rest.chunks(32).filter_map(|c| c.try_into().ok()).collect();
        Some(Self { kind, admins })
    }

    /// Whether `who` may change membership and roles: any member of a DM, the admins of a
    /// group.
    pub fn is_admin(&self, who: &[u8; 32]) -> bool {
        self.kind == Kind::Dm || self.admins.contains(who)
    }

    fn of(group: &MlsGroup) -> Option<Self> {
        group.extensions().unknown(QPQ_GROUP_EXTENSION).and_then(|u| Self::decode(&u.0))
    }

    /// The group context extensions carrying this policy (and requiring members to
    /// understand it), as a GroupContextExtensions proposal or a new group sets them.
    pub fn extensions(&self) -> Result<Extensions<GroupContext>, GroupError> {
        // Every member must understand the qpq extension, so the group requires it.
        let required = RequiredCapabilitiesExtension::new(
            &[ExtensionType::Unknown(QPQ_GROUP_EXTENSION)],
            &[],
            &[],
        );
        Extensions::from_vec(vec![
            Extension::RequiredCapabilities(required),
            Extension::Unknown(QPQ_GROUP_EXTENSION, UnknownExtension(self.encode())),
        ])
        .map_err(mls)
    }
}

/// A group member as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Identity key.
    pub identity: [u8; 32],
    /// Whether the member is an admin.
    pub admin: bool,
}

/// Messages to send after a membership operation.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The commit, for every member other than the committer (as before the commit).
    pub commit: Vec<u8>,
    /// Who gets the commit.
    pub commit_to: Vec<[u8; 32]>,
    /// The Welcome, if members were added.
    pub welcome: Option<Vec<u8>>,
    /// Who gets the Welcome.
    pub welcome_to: Vec<[u8; 32]>,
}

/// The [`Outgoing`] of a commit that adds nobody: the commit alone, for `commit_to`.
fn commit_only(commit: &MlsMessageOut, commit_to: Vec<[u8; 32]>) -> Result<Outgoing, GroupError> {
    Ok(Outgoing {
        commit: commit.tls_serialize_detached().map_err(mls)?,
        commit_to,
        welcome: None,
        welcome_to: Vec::new(),
    })
}

/// What processing one incoming MLS message produced.
#[derive(Debug)]
#[non_exhaustive]
pub enum Incoming {
    /// We joined a group from a Welcome.
    Joined {
        /// The group.
        group_id: Vec<u8>,
        /// DM or group.
        kind: Kind,
        /// Who added us (the committer is not in the Welcome; the first admin is a good guess).
        members: Vec<MemberInfo>,
    },
    /// An application message.
    Application {
        /// The group.
        group_id: Vec<u8>,
        /// Sender identity key.
        sender: [u8; 32],
        /// The decrypted bytes (an encoded `Content`).
        plaintext: Vec<u8>,
    },
    /// A commit was merged.
    Commit {
        /// The group.
        group_id: Vec<u8>,
        /// Who committed.
        committer: [u8; 32],
        /// Identities added.
        added: Vec<[u8; 32]>,
        /// Identities removed.
        removed: Vec<[u8; 32]>,
        /// Whether the admin list or kind changed.
        policy_changed: bool,
        /// Whether this member was removed (the group is gone locally).
        removed_us: bool,
    },
    /// A proposal was stored for a later commit (e.g. a member leaving).
    Proposal {
        /// The group.
        group_id: Vec<u8>,
        /// Who proposed.
        sender: [u8; 32],
    },
}

/// The MLS side of one device: its identity, provider and groups.
pub struct Mls {
    provider: QpqProvider,
    identity: Identity,
    credential: CredentialWithKey,
}

impl Mls {
    /// MLS state for `identity`, stored in `vault`.
    ///
    /// New leaves carry the short v1 [`credential`](crate::credential) of an account's own
    /// device (its key is the account key); for now an account has no other device.
    pub fn new(vault: Arc<Vault>, identity: Identity) -> Self {
        let account = identity.public_key();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(credential::encode_v1_own(&account)).into(),
            signature_key: account.to_vec().into(),
        };
        Self { provider: QpqProvider::new(vault), identity, credential }
    }

    /// Our identity key.
    pub fn identity_key(&self) -> [u8; 32] {
        self.identity.public_key()
    }

    /// The identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A fresh single-use KeyPackage, its private keys kept in the store; returns the
    /// serialized `MLSMessage` for upload.
    pub fn key_package(&self) -> Result<Vec<u8>, GroupError> {
        self.atomic(|| {
            let bundle = KeyPackage::builder()
                .leaf_node_capabilities(capabilities())
                .build(CIPHERSUITE, &self.provider, &self.identity, self.credential.clone())
                .map_err(mls)?;
            MlsMessageOut::from(bundle.key_package().clone()).tls_serialize_detached().map_err(mls)
        })
    }

    /// A last-resort KeyPackage (RFC 9420 §16.8): the server hands it out only when the
    /// stock of single-use ones is empty, and may hand it out more than once, so its private
    /// keys stay in the store after a Welcome uses it (until a fresh one replaces it).
    pub fn last_resort_key_package(&self) -> Result<Vec<u8>, GroupError> {
        self.atomic(|| {
            let bundle = KeyPackage::builder()
                .leaf_node_capabilities(capabilities())
                .mark_as_last_resort()
                .build(CIPHERSUITE, &self.provider, &self.identity, self.credential.clone())
                .map_err(mls)?;
            MlsMessageOut::from(bundle.key_package().clone()).tls_serialize_detached().map_err(mls)
        })
    }

    /// Creates a group (or DM) with us as its only member and admin.
    pub fn create(&self, kind: Kind) -> Result<Vec<u8>, GroupError> {
        self.atomic(|| {
            let policy = GroupPolicy { kind, admins: vec![self.identity_key()] };
            let config = MlsGroupCreateConfig::builder()
                .ciphersuite(CIPHERSUITE)
                .use_ratchet_tree_extension(true)
                .capabilities(capabilities())
                .with_group_context_extensions(policy.extensions()?)
                .build();
            let group =
                MlsGroup::new(&self.provider, &self.identity, &config, self.credential.clone())
                    .map_err(mls)?;
            Ok(group.group_id().as_slice().to_vec())
        })
    }

    /// Adds the owners of `key_packages` (serialized `MLSMessage`s as the server returns them).
    /// Admins only (in a DM, every member counts as an admin).
    ///
    /// `expected` names, for each KeyPackage, the account the user meant (the identity key the
    /// server resolved the username to, checked against what we remember of it). A KeyPackage
    /// whose credential does not bind its leaf to exactly that account is refused with
    /// [`GroupError::IdentityMismatch`] and nothing is added.
    pub fn add(
        &self,
        group_id: &[u8],
        key_packages: &[Vec<u8>],
        expected: &[[u8; 32]],
    ) -> Result<Outgoing, GroupError> {
        if key_packages.len() != expected.len() {
            return Err(GroupError::BadKeyPackage("one expected account per KeyPackage".into()));
        }
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            self.require_admin(&group)?;
            let mut kps = Vec::with_capacity(key_packages.len());
            for (bytes, expected) in key_packages.iter().zip(expected) {
                let kp = self.validated_key_package(bytes)?;
                if kp.ciphersuite() != CIPHERSUITE {
                    return Err(GroupError::BadKeyPackage("wrong ciphersuite".into()));
                }
                let account = bound_account(kp.leaf_node())?;
                if account != *expected {
                    return Err(GroupError::IdentityMismatch {
                        expected: crate::identity::hex(expected),
                        found: crate::identity::hex(&account),
                    });
                }
                kps.push(kp);
            }
            let commit_to = self.others(&group);
            let welcome_to: Vec<[u8; 32]> =
                kps.iter().filter_map(|kp| identity_of(kp.leaf_node().credential())).collect();
            let (commit, welcome, _) = self.without_stored_proposals(&mut group, |g| {
                g.add_members(&self.provider, &self.identity, &kps).map_err(mls)
            })?;
            Ok(Outgoing {
                commit: commit.tls_serialize_detached().map_err(mls)?,
                commit_to,
                welcome: Some(welcome.tls_serialize_detached().map_err(mls)?),
                welcome_to,
            })
        })
    }

    /// The account a serialized KeyPackage's credential binds it to, checked (signatures,
    /// binding). For callers whose KeyPackages come from themselves (benchmarks, fuzzing);
    /// the client checks a fetched one against the account it resolved instead.
    pub fn key_package_account(&self, bytes: &[u8]) -> Result<[u8; 32], GroupError> {
        bound_account(self.validated_key_package(bytes)?.leaf_node())
    }

    /// A serialized KeyPackage (an `MLSMessage`), parsed and checked by openmls
    /// (`KeyPackageIn::validate`); its ciphersuite and credential binding are the caller's.
    fn validated_key_package(&self, bytes: &[u8]) -> Result<KeyPackage, GroupError> {
        let msg = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|e| GroupError::BadKeyPackage(e.to_string()))?;
        match msg.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp
                .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|e| GroupError::BadKeyPackage(e.to_string())),
            _ => Err(GroupError::BadKeyPackage("not a KeyPackage".into())),
        }
    }

    /// Removes members by identity key. Admins only.
    pub fn remove(&self, group_id: &[u8], who: &[[u8; 32]]) -> Result<Outgoing, GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            self.require_admin(&group)?;
            let mut leaves = Vec::new();
            for id in who {
                let leaf = group
                    .members()
                    .find(|m| identity_of(&m.credential).as_ref() == Some(id))
                    .ok_or(GroupError::NotMember)?;
                leaves.push(leaf.index);
            }
            let commit_to = self.others(&group);
            let (commit, _, _) = self.without_stored_proposals(&mut group, |g| {
                g.remove_members(&self.provider, &self.identity, &leaves).map_err(mls)
            })?;
            commit_only(&commit, commit_to)
        })
    }

    /// Sets the admin list (promote/demote). Admins only; the list may not be empty.
    pub fn set_admins(
        &self,
        group_id: &[u8],
        admins: Vec<[u8; 32]>,
    ) -> Result<Outgoing, GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            self.require_admin(&group)?;
            if admins.is_empty() {
                return Err(GroupError::Rejected("a group needs at least one admin".into()));
            }
            let kind = GroupPolicy::of(&group).map_or(Kind::Group, |p| p.kind);
            let policy = GroupPolicy { kind, admins };
            let commit_to = self.others(&group);
            let extensions = policy.extensions()?;
            let (commit, _, _) = self.without_stored_proposals(&mut group, |g| {
                g.update_group_context_extensions(&self.provider, extensions, &self.identity)
                    .map_err(mls)
            })?;
            commit_only(&commit, commit_to)
        })
    }

    /// Rotates our leaf keys (post-compromise security). Any member may.
    pub fn self_update(&self, group_id: &[u8]) -> Result<Outgoing, GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            self.require_admin(&group)?;
            let commit_to = self.others(&group);
            let bundle = self.without_stored_proposals(&mut group, |g| {
                g.self_update(&self.provider, &self.identity, LeafNodeParameters::default())
                    .map_err(mls)
            })?;
            commit_only(bundle.commit(), commit_to)
        })
    }

    /// A proposal to remove ourselves, for an admin to commit. The caller forgets the group
    /// locally after sending it.
    pub fn leave(&self, group_id: &[u8]) -> Result<(Vec<u8>, Vec<[u8; 32]>), GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            let to = self.others(&group);
            let msg = group.leave_group(&self.provider, &self.identity).map_err(mls)?;
            Ok((msg.tls_serialize_detached().map_err(mls)?, to))
        })
    }

    /// Carries out the members' pending self-removals (a member leaving proposes its own
    /// removal) as one admin's removal of them by value. To keep admins from racing, one does
    /// it: the admin with the lowest leaf index among those staying. `None` if that is not us,
    /// no admin stays, or nobody is leaving.
    pub fn commit_pending(&self, group_id: &[u8]) -> Result<Option<Outgoing>, GroupError> {
        self.atomic(|| {
            let group = self.load(group_id)?;
            let leaving: Vec<LeafNodeIndex> = group
                .pending_proposals()
                .filter_map(|p| match p.proposal() {
                    Proposal::Remove(r) => Some(r.removed()),
                    _ => None,
                })
                .collect();
            if leaving.is_empty() {
                return Ok(None);
            }
            let policy = GroupPolicy::of(&group);
            let chosen = group
                .members()
                .filter(|m| !leaving.contains(&m.index))
                .filter(|m| {
                    identity_of(&m.credential)
                        .is_some_and(|id| policy.as_ref().is_some_and(|p| p.is_admin(&id)))
                })
                .map(|m| m.index)
                .min();
            if chosen != Some(group.own_leaf_index()) {
                return Ok(None);
            }
            let ids: Vec<[u8; 32]> =
                leaving.iter().filter_map(|i| group.member(*i).and_then(identity_of)).collect();
            drop(group);
            self.remove(group_id, &ids).map(Some)
        })
    }

    /// The accounts whose own removal waits in the group's proposal store.
    pub fn leaving(&self, group_id: &[u8]) -> Result<Vec<[u8; 32]>, GroupError> {
        let group = self.load(group_id)?;
        Ok(group
            .pending_proposals()
            .filter_map(|p| match p.proposal() {
                Proposal::Remove(r) => group.member(r.removed()).and_then(identity_of),
                _ => None,
            })
            .collect())
    }

    /// Merges our own pending commit once the server has accepted it.
    pub fn confirm(&self, group_id: &[u8]) -> Result<(), GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            group.merge_pending_commit(&self.provider).map_err(mls)
        })
    }

    /// Whether we have a commit of our own waiting for the server's answer.
    pub fn has_pending_commit(&self, group_id: &[u8]) -> Result<bool, GroupError> {
        Ok(self.load(group_id)?.pending_commit().is_some())
    }

    /// Drops our own pending commit (the server refused it).
    pub fn abandon(&self, group_id: &[u8]) -> Result<(), GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            group.clear_pending_commit(self.provider.storage()).map_err(mls)
        })
    }

    /// Deletes a group's local state.
    pub fn forget(&self, group_id: &[u8]) -> Result<(), GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            group.delete(self.provider.storage()).map_err(mls)
        })
    }

    /// Encrypts an application message; returns the `MLSMessage` and its recipients.
    pub fn encrypt(
        &self,
        group_id: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, Vec<[u8; 32]>), GroupError> {
        self.atomic(|| {
            let mut group = self.load(group_id)?;
            let to = self.others(&group);
            // openmls refuses to send while proposals wait for a commit; a member's pending
            // self-removal must not silence the group.
            let msg = self.without_stored_proposals(&mut group, |g| {
                // The epoch tag lets a member on another branch see the fork (`Forked`).
                g.set_aad(epoch_tag(g));
                g.create_message(&self.provider, &self.identity, plaintext).map_err(mls)
            })?;
            Ok((msg.tls_serialize_detached().map_err(mls)?, to))
        })
    }

    /// Processes one incoming `MLSMessage` (Welcome, commit, proposal or application).
    pub fn process(&self, bytes: &[u8]) -> Result<Incoming, GroupError> {
        self.atomic(|| {
            let msg = MlsMessageIn::tls_deserialize_exact(bytes)
                .map_err(|e| GroupError::Rejected(format!("not an MLS message: {e}")))?;
            match msg.extract() {
                MlsMessageBodyIn::Welcome(welcome) => self.join(welcome),
                MlsMessageBodyIn::PrivateMessage(m) => self.process_protocol(m.into()),
                MlsMessageBodyIn::PublicMessage(m) => self.process_protocol(m.into()),
                _ => Err(GroupError::Rejected("unexpected MLS message type".into())),
            }
        })
    }

    /// The id of the current epoch's commit slot: 16 bytes of the epoch's MLS exporter, so
    /// only members of this epoch can compute it, and slots of different epochs are unlinkable.
    /// While a commit of ours is pending the epoch is still the one it commits from.
    pub fn slot(&self, group_id: &[u8]) -> Result<[u8; 16], GroupError> {
        let group = self.load(group_id)?;
        let v = group.export_secret(self.provider.crypto(), SLOT_LABEL, b"", 16).map_err(mls)?;
        v.try_into().map_err(|_| GroupError::Mls("exporter returned a short value".into()))
    }

    /// Processes a message from the ephemeral channel (typing indicators): only an application
    /// message is accepted there. Commits, proposals and Welcomes travel only through the
    /// durable queue, where they are processed in order and acknowledged once stored.
    pub fn process_ephemeral(&self, bytes: &[u8]) -> Result<Incoming, GroupError> {
        self.atomic(|| {
            let msg = MlsMessageIn::tls_deserialize_exact(bytes)
                .map_err(|e| GroupError::Rejected(format!("not an MLS message: {e}")))?;
            let MlsMessageBodyIn::PrivateMessage(m) = msg.extract() else {
                return Err(GroupError::Rejected("not an application message".into()));
            };
            let msg: ProtocolMessage = m.into();
            if msg.content_type() != ContentType::Application {
                return Err(GroupError::Rejected("not an application message".into()));
            }
            match self.process_protocol(msg)? {
                app @ Incoming::Application { .. } => Ok(app),
                _ => Err(GroupError::Rejected("not an application message".into())),
            }
        })
    }

    /// Members of a group with their roles.
    pub fn members(&self, group_id: &[u8]) -> Result<Vec<MemberInfo>, GroupError> {
        let group = self.load(group_id)?;
        let policy = GroupPolicy::of(&group);
        Ok(group
            .members()
            .filter_map(|m| identity_of(&m.credential))
            .map(|identity| MemberInfo {
                identity,
                admin: policy.as_ref().is_some_and(|p| p.is_admin(&identity)),
            })
            .collect())
    }

    /// DM or group.
    pub fn kind(&self, group_id: &[u8]) -> Result<Kind, GroupError> {
        Ok(GroupPolicy::of(&self.load(group_id)?).map_or(Kind::Group, |p| p.kind))
    }

    /// The group's epoch.
    ///
    /// Reads only the stored group context, not the whole group (the ratchet tree of a large
    /// group is megabytes): the receive path asks this for every message.
    pub fn epoch(&self, group_id: &[u8]) -> Result<u64, GroupError> {
        use openmls_traits::storage::StorageProvider as _;
        let context: Option<GroupContext> =
            self.provider.storage().group_context(&GroupId::from_slice(group_id)).map_err(mls)?;
        Ok(context.ok_or(GroupError::UnknownGroup)?.epoch().as_u64())
    }

    /// A short code all members see identically in the same epoch: compare it out of band to
    /// detect a split view of the group. Five groups of four hex digits from the epoch
    /// authenticator.
    pub fn verification_code(&self, group_id: &[u8]) -> Result<String, GroupError> {
        let group = self.load(group_id)?;
        let auth = group.epoch_authenticator().as_slice();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(auth);
        Ok(digest[..10]
            .chunks(2)
            .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
            .collect::<Vec<_>>()
            .join("-"))
    }

    fn join(&self, welcome: Welcome) -> Result<Incoming, GroupError> {
        let config = MlsGroupJoinConfig::builder().use_ratchet_tree_extension(true).build();
        let staged = StagedWelcome::new_from_welcome(&self.provider, &config, welcome, None)
            .map_err(|e| GroupError::Rejected(format!("welcome: {e}")))?;
        let group = staged.into_group(&self.provider).map_err(mls)?;
        // Every leaf must bind its signature key to its account (the caller's transaction
        // rolls the join back otherwise).
        for m in group.members() {
            bound_account_of(&m.credential, &m.signature_key)?;
        }
        let group_id = group.group_id().as_slice().to_vec();
        let kind = GroupPolicy::of(&group).map_or(Kind::Group, |p| p.kind);
        let members = self.members(&group_id)?;
        Ok(Incoming::Joined { group_id, kind, members })
    }

    fn process_protocol(&self, msg: ProtocolMessage) -> Result<Incoming, GroupError> {
        let group_id = msg.group_id().as_slice().to_vec();
        let mut group = self.load(&group_id)?;
        // A message made in our epoch with an epoch tag that is not ours comes from another
        // branch of the group. Messages without a tag (clients before 0.3) and messages of
        // other epochs are left to MLS. The tag is authenticated only once the message
        // decrypts, so a mismatch means a fork or tampering, and MLS would refuse either.
        if let ProtocolMessage::PrivateMessage(m) = &msg {
            let (epoch, aad) = (m.epoch().as_u64(), m.aad());
            if aad.len() == EPOCH_TAG_LEN
                && aad.first() == Some(&EPOCH_TAG_V1)
                && group.epoch().as_u64() == epoch
                && epoch_tag(&group) != aad
            {
                return Err(GroupError::Forked { epoch });
            }
        }
        let processed = group.process_message(&self.provider, msg).map_err(classify)?;
        let sender = identity_of(processed.credential()).ok_or(GroupError::NotMember)?;
        let processed_sender = processed.sender().clone();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                Ok(Incoming::Application { group_id, sender, plaintext: app.into_bytes() })
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                // The only proposal qpq members send is their own removal (`leave`); anything
                // else would wait for an admin's client to commit it on the proposer's behalf.
                let own_removal = match (p.sender(), p.proposal()) {
                    (Sender::Member(from), Proposal::Remove(r)) => r.removed() == *from,
                    _ => false,
                };
                if !own_removal {
                    return Err(GroupError::UnauthorizedProposal(
                        "a member may only propose its own removal".into(),
                    ));
                }
                group.store_pending_proposal(self.provider.storage(), *p).map_err(mls)?;
                Ok(Incoming::Proposal { group_id, sender })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let before = GroupPolicy::of(&group);
                let committer = match processed_sender {
                    Sender::Member(i) => i,
                    _ => return Err(GroupError::UnauthorizedCommit),
                };
                authorize_commit(&group, before.as_ref(), committer, &staged)?;
                let removed: Vec<[u8; 32]> = staged
                    .remove_proposals()
                    .filter_map(|r| {
                        group.member(r.remove_proposal().removed()).and_then(identity_of)
                    })
                    .collect();
                let added: Vec<[u8; 32]> = staged
                    .add_proposals()
                    .filter_map(|a| {
                        identity_of(a.add_proposal().key_package().leaf_node().credential())
                    })
                    .collect();
                let self_removals_only = staged.remove_proposals().all(|r| match r.sender() {
                    Sender::Member(idx) => *idx == r.remove_proposal().removed(),
                    _ => false,
                });
                let policy_changed = GroupPolicy::decode(
                    &staged
                        .group_context()
                        .extensions()
                        .unknown(QPQ_GROUP_EXTENSION)
                        .map(|u| u.0.clone())
                        .unwrap_or_default(),
                ) != before;
                // Belt and braces over the per-proposal checks above.
                let privileged = !added.is_empty() || policy_changed || !self_removals_only;
                if privileged && !before.as_ref().is_some_and(|p| p.is_admin(&sender)) {
                    // Not merged: the commit never takes effect here.
                    return Err(GroupError::UnauthorizedCommit);
                }
                let removed_us = staged.self_removed();
                group.merge_staged_commit(&self.provider, *staged).map_err(mls)?;
                // Another member's commit won this epoch: a commit of ours from the same epoch
                // can never be merged now (the caller redoes its change in the new epoch).
                if group.pending_commit().is_some() {
                    group.clear_pending_commit(self.provider.storage()).map_err(mls)?;
                }
                if removed_us {
                    let _ = group.delete(self.provider.storage());
                }
                Ok(Incoming::Commit {
                    group_id,
                    committer: sender,
                    added,
                    removed,
                    policy_changed,
                    removed_us,
                })
            }
            // Our own commit handed back to us: it is applied by merging the pending commit,
            // never by processing (the engine compares a claim with its record first).
            ProcessedMessageContent::OwnPendingCommit => {
                Err(GroupError::Rejected("a commit of our own that we no longer hold".into()))
            }
            _ => Err(GroupError::Rejected("external proposals are not used".into())),
        }
    }

    /// Runs `f` (which makes a commit, or a message) with the group's proposal store set aside
    /// and puts it back after, in the caller's transaction: a commit never refers to stored
    /// proposals, which members hold differently (a proposal a member's queue refused, or one
    /// sent to some members only), and openmls refuses to send while proposals wait.
    fn without_stored_proposals<T>(
        &self,
        group: &mut MlsGroup,
        f: impl FnOnce(&mut MlsGroup) -> Result<T, GroupError>,
    ) -> Result<T, GroupError> {
        let waiting: Vec<QueuedProposal> = group.pending_proposals().cloned().collect();
        if !waiting.is_empty() {
            group.clear_pending_proposals(self.provider.storage()).map_err(mls)?;
        }
        let out = f(group)?;
        for p in waiting {
            group.store_pending_proposal(self.provider.storage(), p).map_err(mls)?;
        }
        Ok(out)
    }

    /// Runs `f` in one vault transaction: an MLS operation's dozen storage writes land
    /// together or not at all (groups are always reloaded from storage, so a rollback leaves
    /// no stale in-memory state behind).
    fn atomic<T>(&self, f: impl FnOnce() -> Result<T, GroupError>) -> Result<T, GroupError> {
        self.provider.vault().atomic(f)
    }

    fn load(&self, group_id: &[u8]) -> Result<MlsGroup, GroupError> {
        MlsGroup::load(self.provider.storage(), &GroupId::from_slice(group_id))
            .map_err(mls)?
            .ok_or(GroupError::UnknownGroup)
    }

    fn require_admin(&self, group: &MlsGroup) -> Result<(), GroupError> {
        match GroupPolicy::of(group) {
            Some(p) if p.is_admin(&self.identity_key()) => Ok(()),
            _ => Err(GroupError::NotAdmin),
        }
    }

    fn others(&self, group: &MlsGroup) -> Vec<[u8; 32]> {
        let me = self.identity_key();
        group.members().filter_map(|m| identity_of(&m.credential)).filter(|id| *id != me).collect()
    }

    /// The provider (storage and crypto), for callers that batch vault writes.
    pub fn provider(&self) -> &QpqProvider {
        &self.provider
    }
}

/// Leaf capabilities: our ciphersuite, the qpq group extension, and the last-resort
/// KeyPackage extension (a leaf must list every extension its KeyPackage carries).
fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[ExtensionType::Unknown(QPQ_GROUP_EXTENSION), ExtensionType::LastResort]),
        None,
        None,
    )
}

/// The account a leaf's credential names (legacy or v1). Leaves are checked with
/// [`bound_account`] when they enter a group, so this only parses.
fn identity_of(credential: &Credential) -> Option<[u8; 32]> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    credential::parse(basic.identity()).ok().map(|b| b.account)
}

/// The account a leaf's credential binds its signature key to, checked.
fn bound_account(leaf: &LeafNode) -> Result<[u8; 32], GroupError> {
    bound_account_of(leaf.credential(), leaf.signature_key().as_slice())
}

fn bound_account_of(cred: &Credential, signature_key: &[u8]) -> Result<[u8; 32], GroupError> {
    let basic = BasicCredential::try_from(cred.clone())
        .map_err(|_| GroupError::BadCredential("not a basic credential".into()))?;
    credential::verify(basic.identity(), signature_key)
        .map(|b| b.account)
        .map_err(|e| GroupError::BadCredential(e.to_string()))
}

/// Checks every proposal a commit carries, by value or by reference, against the admin policy
/// of the epoch it was made in, by its original sender: adds and group context changes only
/// from an admin; a removal from an admin, or of the proposer itself (which any member may
/// then commit); no other kinds. Leaves entering or changing must bind their keys to their
/// accounts, and a member's update may not change its account.
fn authorize_commit(
    group: &MlsGroup,
    policy: Option<&GroupPolicy>,
    committer: LeafNodeIndex,
    staged: &StagedCommit,
) -> Result<(), GroupError> {
    let account_at = |i: LeafNodeIndex| group.member(i).and_then(identity_of);
    let is_admin =
        |i: LeafNodeIndex| account_at(i).is_some_and(|id| policy.is_some_and(|p| p.is_admin(&id)));
    let deny = |why: &str| Err(GroupError::UnauthorizedProposal(why.to_string()));
    // Only admins commit (both members of a DM are): a non-admin's commit, whatever it
    // carries, could be made to fail for everyone in its private part and would then freeze
    // the epoch's slot (PROTOCOL.md 6.9).
    if !is_admin(committer) {
        return Err(GroupError::UnauthorizedCommit);
    }
    for q in staged.queued_proposals() {
        // By reference, a commit would mean different things to members holding different
        // proposals.
        if q.proposal_or_ref_type() == ProposalOrRefType::Reference {
            return deny("a commit must carry its proposals by value");
        }
        let Sender::Member(from) = *q.sender() else {
            return deny("proposals from outside the group are not accepted");
        };
        match q.proposal() {
            Proposal::Add(a) => {
                if !is_admin(from) {
                    return deny("a non-admin may not add members");
                }
                bound_account(a.key_package().leaf_node())?;
            }
            Proposal::Remove(r) => {
                if r.removed() != from && !is_admin(from) {
                    return deny("a non-admin may only remove itself");
                }
            }
            Proposal::GroupContextExtensions(_) => {
                if !is_admin(from) {
                    return deny("a non-admin may not change the group's roles or extensions");
                }
            }
            Proposal::Update(u) => {
                if bound_account(u.leaf_node())? != account_at(from).unwrap_or_default() {
                    return deny("an update may not change a member's account");
                }
            }
            _ => return deny("a kind of proposal qpq does not use"),
        }
    }
    if let Some(leaf) = staged.update_path_leaf_node()
        && Some(bound_account(leaf)?) != account_at(committer)
    {
        return deny("a commit may not change the committer's account");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::KdfParams;

    const FAST: KdfParams = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };

    fn member(dir: &std::path::Path, name: &str) -> Mls {
        let vault = Vault::create(&dir.join(name), b"p", FAST).unwrap();
        Mls::new(Arc::new(vault), Identity::generate())
    }

    /// alice (admin) with bob and carol in a group; returns the group id.
    fn trio(alice: &Mls, bob: &Mls, carol: &Mls) -> Vec<u8> {
        let gid = alice.create(Kind::Group).unwrap();
        let out = alice
            .add(
                &gid,
                &[bob.key_package().unwrap(), carol.key_package().unwrap()],
                &[bob.identity_key(), carol.identity_key()],
            )
            .unwrap();
        assert!(out.commit_to.is_empty(), "alice was alone");
        assert_eq!(out.welcome_to.len(), 2);
        alice.confirm(&gid).unwrap();
        let welcome = out.welcome.unwrap();
        for m in [bob, carol] {
            assert!(matches!(
                m.process(&welcome).unwrap(),
                Incoming::Joined { kind: Kind::Group, .. }
            ));
        }
        gid
    }

    #[test]
    fn slots_and_epoch_tags_follow_the_branch_and_a_message_from_another_branch_is_a_fork() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "c"));
        let gid = trio(&alice, &bob, &carol);
        // carol becomes an admin too: only admins commit.
        let out = alice.set_admins(&gid, vec![alice.identity_key(), carol.identity_key()]).unwrap();
        alice.confirm(&gid).unwrap();
        for m in [&bob, &carol] {
            assert!(matches!(m.process(&out.commit).unwrap(), Incoming::Commit { .. }));
        }
        // One epoch, one slot for everyone.
        let slot = alice.slot(&gid).unwrap();
        assert_eq!(bob.slot(&gid).unwrap(), slot);
        assert_eq!(carol.slot(&gid).unwrap(), slot);
        // Two commits from the same epoch (two admins, or a server that shows members different
        // claims): bob takes alice's, carol merges her own.
        let from_alice = alice.self_update(&gid).unwrap();
        let from_carol = carol.self_update(&gid).unwrap();
        assert!(matches!(bob.process(&from_alice.commit).unwrap(), Incoming::Commit { .. }));
        alice.confirm(&gid).unwrap();
        carol.confirm(&gid).unwrap();
        let epoch = alice.epoch(&gid).unwrap();
        assert_eq!((bob.epoch(&gid).unwrap(), carol.epoch(&gid).unwrap()), (epoch, epoch));
        // The next slot is new, the same on one branch and different across branches.
        let next = alice.slot(&gid).unwrap();
        assert_ne!(next, slot);
        assert_eq!(bob.slot(&gid).unwrap(), next);
        assert_ne!(carol.slot(&gid).unwrap(), next);
        // Same epoch number, other branch: a fork, named as such, and nothing changes.
        let (from_carol_msg, _) = carol.encrypt(&gid, b"on my branch").unwrap();
        assert!(matches!(
            bob.process(&from_carol_msg),
            Err(GroupError::Forked { epoch: e }) if e == epoch
        ));
        let (from_alice_msg, _) = alice.encrypt(&gid, b"on ours").unwrap();
        assert!(matches!(
            bob.process(&from_alice_msg).unwrap(),
            Incoming::Application { plaintext, .. } if plaintext == b"on ours"
        ));
        assert!(matches!(carol.process(&from_alice_msg), Err(GroupError::Forked { .. })));
        // The losing commit, replayed to a member who moved on, is of an earlier epoch.
        assert!(matches!(bob.process(&from_carol.commit), Err(GroupError::Rejected(_))));
        // The header reader the client routes by sees the epoch tag and the epoch.
        match crate::keypackage::clear_header(&from_alice_msg) {
            Some(crate::keypackage::ClearHeader::Framed {
                group_id,
                epoch: e,
                content_type: 1,
                authenticated_data,
            }) => {
                assert_eq!((group_id, e), (gid.as_slice(), epoch));
                assert_eq!(authenticated_data.len(), EPOCH_TAG_LEN);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A stored HPKE key pair as raw JSON, to damage it.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(transparent)]
    struct RawKeyPair(serde_json::Value);
    impl openmls_traits::storage::Entity<{ openmls_traits::storage::CURRENT_VERSION }> for RawKeyPair {}
    impl openmls_traits::storage::traits::HpkeKeyPair<{ openmls_traits::storage::CURRENT_VERSION }>
        for RawKeyPair
    {
    }

    /// Flips one byte of every byte array inside `v`.
    fn damage(v: &mut serde_json::Value) -> bool {
        match v {
            serde_json::Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_u64()) => {
                let b = a[0].as_u64().unwrap_or(0) ^ 0x55;
                a[0] = b.into();
                true
            }
            serde_json::Value::Array(a) => a.iter_mut().fold(false, |d, x| damage(x) | d),
            serde_json::Value::Object(o) => o.values_mut().fold(false, |d, x| damage(x) | d),
            _ => false,
        }
    }

    #[test]
    fn a_commit_whose_path_we_cannot_decrypt_is_cannot_follow_not_a_skip() {
        use openmls_traits::storage::StorageProvider as _;
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "c"));
        let gid = trio(&alice, &bob, &carol);
        // bob's leaf private key no longer matches what alice encrypts to: the path secret of
        // her next commit fails for bob alone (as garbage encrypted to him would).
        // A member that joined from a Welcome keeps its leaf and path keys per epoch.
        let group = bob.load(&gid).unwrap();
        let (epoch, leaf) = (group.epoch(), group.own_leaf_index().u32());
        let storage = bob.provider.storage();
        let mut pairs: Vec<RawKeyPair> =
            storage.encryption_epoch_key_pairs(group.group_id(), &epoch, leaf).unwrap();
        assert!(!pairs.is_empty(), "bob holds no key pairs for this epoch");
        for pair in &mut pairs {
            let private = pair.0.get_mut("private_key").expect("a private_key field");
            assert!(damage(private));
        }
        storage.write_encryption_epoch_key_pairs(group.group_id(), &epoch, leaf, &pairs).unwrap();

        let out = alice.self_update(&gid).unwrap();
        alice.confirm(&gid).unwrap();
        let before = bob.epoch(&gid).unwrap();
        match bob.process(&out.commit) {
            Err(GroupError::CannotFollow(_)) => {}
            other => panic!("expected CannotFollow, got {other:?}"),
        }
        // Nothing of it was applied for bob; carol, whose key is fine, follows.
        assert_eq!(bob.epoch(&gid).unwrap(), before);
        assert!(matches!(carol.process(&out.commit).unwrap(), Incoming::Commit { .. }));
        assert_eq!(carol.verification_code(&gid).unwrap(), alice.verification_code(&gid).unwrap());
    }

    #[test]
    fn a_non_admin_commit_that_adds_a_member_is_rejected_by_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol, dave) = (
            member(dir.path(), "a"),
            member(dir.path(), "b"),
            member(dir.path(), "c"),
            member(dir.path(), "d"),
        );
        let gid = trio(&alice, &bob, &carol);
        assert!(matches!(
            bob.add(&gid, &[dave.key_package().unwrap()], &[dave.identity_key()]),
            Err(GroupError::NotAdmin)
        ));

        // Bob bypasses his own client's check and commits an Add with raw openmls.
        let dave_kp =
            match MlsMessageIn::tls_deserialize_exact(dave.key_package().unwrap().as_slice())
                .unwrap()
                .extract()
            {
                MlsMessageBodyIn::KeyPackage(kp) => {
                    kp.validate(bob.provider.crypto(), ProtocolVersion::Mls10).unwrap()
                }
                _ => unreachable!(),
            };
        let mut bobs = bob.load(&gid).unwrap();
        let (forged, _, _) = bobs.add_members(&bob.provider, &bob.identity, &[dave_kp]).unwrap();
        let forged = forged.tls_serialize_detached().unwrap();
        let epoch = alice.epoch(&gid).unwrap();
        for m in [&alice, &carol] {
            assert!(matches!(m.process(&forged), Err(GroupError::UnauthorizedCommit)));
            assert_eq!(m.epoch(&gid).unwrap(), epoch, "not merged");
            assert_eq!(m.members(&gid).unwrap().len(), 3);
        }
        // The group still works for the honest members.
        let (ct, to) = alice.encrypt(&gid, b"still here").unwrap();
        assert_eq!(to.len(), 2);
        match carol.process(&ct).unwrap() {
            Incoming::Application { plaintext, sender, .. } => {
                assert_eq!(plaintext, b"still here");
                assert_eq!(sender, alice.identity_key());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn roles_removal_and_self_update() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "c"));
        let gid = trio(&alice, &bob, &carol);

        // Only admins commit, key updates included: carol's client refuses, and an update
        // commit her device makes anyway (a modified client) is refused by everyone.
        assert!(matches!(carol.self_update(&gid), Err(GroupError::NotAdmin)));
        let mut carols = carol.load(&gid).unwrap();
        let forged = carols
            .self_update(&carol.provider, &carol.identity, LeafNodeParameters::default())
            .unwrap()
            .commit()
            .tls_serialize_detached()
            .unwrap();
        for m in [&alice, &bob] {
            assert!(matches!(m.process(&forged), Err(GroupError::UnauthorizedCommit)));
        }
        carols.clear_pending_commit(carol.provider.storage()).unwrap();
        // The admin's update goes through.
        let out = alice.self_update(&gid).unwrap();
        assert_eq!(out.commit_to.len(), 2);
        alice.confirm(&gid).unwrap();
        for m in [&bob, &carol] {
            assert!(matches!(
                m.process(&out.commit).unwrap(),
                Incoming::Commit { policy_changed: false, .. }
            ));
        }

        // Alice promotes bob; then bob may remove carol.
        let out = alice.set_admins(&gid, vec![alice.identity_key(), bob.identity_key()]).unwrap();
        alice.confirm(&gid).unwrap();
        for m in [&bob, &carol] {
            assert!(matches!(
                m.process(&out.commit).unwrap(),
                Incoming::Commit { policy_changed: true, .. }
            ));
        }
        assert!(
            bob.members(&gid).unwrap().iter().any(|m| m.identity == bob.identity_key() && m.admin)
        );
        let out = bob.remove(&gid, &[carol.identity_key()]).unwrap();
        bob.confirm(&gid).unwrap();
        assert!(
            matches!(alice.process(&out.commit).unwrap(), Incoming::Commit { ref removed, .. } if removed == &[carol.identity_key()])
        );
        assert!(matches!(
            carol.process(&out.commit).unwrap(),
            Incoming::Commit { removed_us: true, .. }
        ));
        // Carol cannot read what follows.
        let (ct, to) = alice.encrypt(&gid, b"after carol").unwrap();
        assert_eq!(to, vec![bob.identity_key()]);
        assert!(carol.process(&ct).is_err());
        assert!(matches!(bob.process(&ct).unwrap(), Incoming::Application { .. }));
        // Everyone left in the group sees the same verification code.
        assert_eq!(alice.verification_code(&gid).unwrap(), bob.verification_code(&gid).unwrap());
        // An admin cannot demote everyone.
        assert!(alice.set_admins(&gid, Vec::new()).is_err());
    }

    fn leaf_of(m: &Mls, gid: &[u8], who: &Mls) -> LeafNodeIndex {
        m.load(gid)
            .unwrap()
            .members()
            .find(|x| identity_of(&x.credential) == Some(who.identity_key()))
            .unwrap()
            .index
    }

    #[test]
    fn forged_proposals_by_value_and_by_reference_and_extension_changes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "c"));
        let gid = trio(&alice, &bob, &carol);
        let epoch = alice.epoch(&gid).unwrap();
        let bob_only = GroupPolicy { kind: Kind::Group, admins: vec![bob.identity_key()] };

        // By reference: bob (not an admin) proposes himself as the only admin, then carol's
        // removal, hoping an admin's client commits them. Nobody stores either.
        let mut bobs = bob.load(&gid).unwrap();
        let (take_over, _) = bobs
            .propose_group_context_extensions(
                &bob.provider,
                bob_only.extensions().unwrap(),
                &bob.identity,
            )
            .unwrap();
        let carol_leaf = leaf_of(&bob, &gid, &carol);
        let (kick, _) =
            bobs.propose_remove_member(&bob.provider, &bob.identity, carol_leaf).unwrap();
        for forged in [take_over, kick] {
            let forged = forged.tls_serialize_detached().unwrap();
            for m in [&alice, &carol] {
                assert!(
                    matches!(m.process(&forged), Err(GroupError::UnauthorizedProposal(_))),
                    "a non-admin's proposal was accepted"
                );
            }
        }
        assert!(alice.commit_pending(&gid).unwrap().is_none(), "nothing for an admin to commit");
        assert!(alice.load(&gid).unwrap().pending_proposals().next().is_none());

        // By value: bob commits the same change himself.
        let mut bobs = bob.load(&gid).unwrap();
        bobs.clear_pending_proposals(bob.provider.storage()).unwrap();
        let (forged, _, _) = bobs
            .update_group_context_extensions(
                &bob.provider,
                bob_only.extensions().unwrap(),
                &bob.identity,
            )
            .unwrap();
        let forged = forged.tls_serialize_detached().unwrap();
        for m in [&alice, &carol] {
            assert!(matches!(m.process(&forged), Err(GroupError::UnauthorizedCommit)));
            assert_eq!(m.epoch(&gid).unwrap(), epoch, "not merged");
        }

        // Another extension, with the admin list left as it is: still an admin's call.
        let mut bobs = bob.load(&gid).unwrap();
        bobs.clear_pending_commit(bob.provider.storage()).unwrap();
        let same = GroupPolicy::of(&bobs).unwrap();
        let required = RequiredCapabilitiesExtension::new(
            &[ExtensionType::Unknown(QPQ_GROUP_EXTENSION)],
            &[],
            &[],
        );
        let sneaky = Extensions::from_vec(vec![
            Extension::RequiredCapabilities(required),
            Extension::Unknown(QPQ_GROUP_EXTENSION, UnknownExtension(same.encode())),
            Extension::Unknown(0xF0B0, UnknownExtension(b"mine".to_vec())),
        ])
        .unwrap();
        if let Ok((forged, _, _)) =
            bobs.update_group_context_extensions(&bob.provider, sneaky, &bob.identity)
        {
            let forged = forged.tls_serialize_detached().unwrap();
            for m in [&alice, &carol] {
                assert!(m.process(&forged).is_err(), "a non-admin changed an extension");
                assert_eq!(m.epoch(&gid).unwrap(), epoch);
            }
        }

        // The group still works for the honest members.
        let (ct, _) = alice.encrypt(&gid, b"still ours").unwrap();
        assert!(matches!(carol.process(&ct).unwrap(), Incoming::Application { .. }));
    }

    #[test]
    fn the_typing_channel_takes_only_application_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "c"));
        let gid = trio(&alice, &bob, &carol);
        let epoch = carol.epoch(&gid).unwrap();
        // A real commit and a real self-removal proposal, sent where typing goes.
        let commit = alice.self_update(&gid).unwrap().commit;
        let (proposal, _) = bob.leave(&gid).unwrap();
        for m in [&commit, &proposal] {
            assert!(matches!(carol.process_ephemeral(m), Err(GroupError::Rejected(_))));
        }
        assert_eq!(carol.epoch(&gid).unwrap(), epoch, "nothing merged from the typing channel");
        assert!(carol.load(&gid).unwrap().pending_proposals().next().is_none());
        // The durable queue takes the commit; typing still works.
        alice.confirm(&gid).unwrap();
        assert!(matches!(carol.process(&commit).unwrap(), Incoming::Commit { .. }));
        let (typing, _) = alice.encrypt(&gid, b"typing").unwrap();
        assert!(matches!(carol.process_ephemeral(&typing).unwrap(), Incoming::Application { .. }));
    }

    #[test]
    fn a_pending_self_removal_never_blocks_sending_and_one_admin_carries_it_out() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "c"));
        let gid = trio(&alice, &bob, &carol);
        // bob becomes an admin too (leaf 1, after alice's 0).
        let out = alice.set_admins(&gid, vec![alice.identity_key(), bob.identity_key()]).unwrap();
        alice.confirm(&gid).unwrap();
        for m in [&bob, &carol] {
            assert!(matches!(m.process(&out.commit).unwrap(), Incoming::Commit { .. }));
        }
        // carol leaves.
        let (proposal, _) = carol.leave(&gid).unwrap();
        for m in [&alice, &bob] {
            assert!(matches!(m.process(&proposal).unwrap(), Incoming::Proposal { .. }));
            assert_eq!(m.leaving(&gid).unwrap(), [carol.identity_key()]);
        }
        // Sending goes on while it waits.
        let (ct, _) = bob.encrypt(&gid, b"bye carol").unwrap();
        assert!(matches!(alice.process(&ct).unwrap(), Incoming::Application { .. }));
        // One admin does it (the lowest leaf staying: alice), by value; bob does not race her.
        assert!(bob.commit_pending(&gid).unwrap().is_none());
        let out = alice.commit_pending(&gid).unwrap().expect("alice removes carol");
        alice.confirm(&gid).unwrap();
        let group = alice.load(&gid).unwrap();
        assert!(group.pending_proposals().next().is_none(), "merging dropped the proposal");
        // The commit carries the removal by value: bob applies it even without the proposal
        // (as a member whose queue refused it would).
        let mut bobs = bob.load(&gid).unwrap();
        bobs.clear_pending_proposals(bob.provider.storage()).unwrap();
        assert!(matches!(
            bob.process(&out.commit).unwrap(),
            Incoming::Commit { ref removed, .. } if removed == &[carol.identity_key()]
        ));
        assert_eq!(alice.verification_code(&gid).unwrap(), bob.verification_code(&gid).unwrap());
        assert_eq!(bob.members(&gid).unwrap().len(), 2);
        // No admin staying: nobody commits (a non-admin cannot).
        let gid2 = trio(&alice, &bob, &carol);
        let (proposal, _) = alice.leave(&gid2).unwrap();
        for m in [&bob, &carol] {
            m.process(&proposal).unwrap();
            assert!(m.commit_pending(&gid2).unwrap().is_none());
        }
    }

    #[test]
    fn a_substituted_or_forged_key_package_is_refused_at_add() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, mallory) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "m"));
        let gid = alice.create(Kind::Group).unwrap();
        // The server hands out mallory's KeyPackage when alice asks for bob's.
        let err = alice.add(&gid, &[mallory.key_package().unwrap()], &[bob.identity_key()]);
        assert!(matches!(err, Err(GroupError::IdentityMismatch { .. })), "{err:?}");
        // mallory's leaf wearing bob's credential (bob's key, mallory's signature key).
        let forged_cred = CredentialWithKey {
            credential: BasicCredential::new(credential::encode_v1(
                &bob.identity_key(),
                &bob.identity_key(),
                &[0; 64],
            ))
            .into(),
            signature_key: mallory.identity_key().to_vec().into(),
        };
        let forged = KeyPackage::builder()
            .leaf_node_capabilities(capabilities())
            .build(CIPHERSUITE, &mallory.provider, &mallory.identity, forged_cred)
            .unwrap();
        let forged =
            MlsMessageOut::from(forged.key_package().clone()).tls_serialize_detached().unwrap();
        let err = alice.add(&gid, &[forged], &[bob.identity_key()]);
        assert!(matches!(err, Err(GroupError::BadCredential(_))), "{err:?}");
        assert_eq!(alice.members(&gid).unwrap().len(), 1, "nobody was added");
        // The real one works.
        alice.add(&gid, &[bob.key_package().unwrap()], &[bob.identity_key()]).unwrap();
    }

    #[test]
    fn garbage_and_tampered_messages_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) =
            (member(dir.path(), "a"), member(dir.path(), "b"), member(dir.path(), "c"));
        let gid = trio(&alice, &bob, &carol);
        assert!(bob.process(b"not mls").is_err());
        assert!(bob.process(&[]).is_err());
        let (mut ct, _) = alice.encrypt(&gid, b"secret").unwrap();
        let last = ct.len() - 1;
        ct[last] ^= 0x40;
        assert!(matches!(bob.process(&ct), Err(GroupError::Rejected(_))));
        let (ct, _) = alice.encrypt(&gid, b"next").unwrap();
        assert!(matches!(bob.process(&ct).unwrap(), Incoming::Application { .. }));
    }
}
