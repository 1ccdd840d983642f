//! openmls state in the vault: [`VaultStorage`] implements openmls's `StorageProvider`.
//!
//! # Layout
//!
//! Every entry lives in [`Space::Mls`]. An entry's key is
//!
//! ```text
//! storage version u16 BE || label u8 || SHA-256("qpq-mls-key" || 0 || serde_json(key))
//! ```
//!
//! `storage version` is openmls's [`CURRENT_VERSION`], `label` names the kind of entity (the
//! private `Label` enum; its numbers are part of the file format) and `key` is what openmls
//! addresses the entity by: a group id, a public key, a hash reference, or for epoch key pairs
//! the tuple `(group id, epoch, leaf index)`. Hashing the key keeps every entry key 35 bytes
//! long, whatever the size of the group id, keeps group ids and identity public keys out of the
//! file in the clear, and makes the encoding prefix-free, so a prefix scan over one group's list
//! never reaches into another group's.
//!
//! Values are the `serde_json` encoding of the openmls entity, sealed by the vault (which binds
//! each value to its key). Serialized values are zeroized after use, as many hold secrets.
//!
//! # Lists
//!
//! The lists that openmls grows and shrinks one item at a time (the proposal queue, own leaf
//! nodes) keep one entry per item: the list's entry key followed by a `u64 BE` sequence number.
//! Appending writes one entry after the last one, reading is a prefix scan (insertion order), and
//! deleting the list is a prefix delete. A proposal-queue item is `[proposal_ref, proposal]`.
//! Epoch key pairs, which openmls always writes and reads whole, are one entry holding an array.
//!
//! # Atomicity
//!
//! openmls writes a dozen entries for one operation (a commit merge rewrites the tree, the
//! context, the secrets...). Outside a transaction each write commits on its own, so a crash
//! between two of them leaves a torn group state: callers should wrap every MLS operation that
//! writes (create, join, process and merge, send) in [`Vault::atomic`], which also makes it one
//! disk sync instead of one per entry. A method here that reads before it writes (append, remove
//! an item) runs in [`Vault::atomic`] itself, so it is atomic on its own and joins the caller's
//! transaction when there is one.

use std::sync::Arc;

use openmls_traits::storage::{CURRENT_VERSION, StorageProvider, traits};
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::vault::{Space, Vault, VaultError};

/// openmls storage backed by the encrypted [`Vault`].
#[derive(Debug, Clone)]
pub struct VaultStorage {
    vault: Arc<Vault>,
}

impl VaultStorage {
    /// Stores openmls state in `vault`, in [`Space::Mls`].
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    /// The vault this storage writes to; wrap MLS operations in [`Vault::atomic`] to commit
    /// them together with the application state they produce.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }
}

/// A failure of the openmls storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The vault could not read or write.
    #[error("vault: {0}")]
    Vault(#[from] VaultError),
    /// An openmls value or key could not be encoded.
    #[error("encoding MLS {label}: {source}")]
    Encode {
        /// The kind of entity.
        label: &'static str,
        /// What serde_json reported.
        source: serde_json::Error,
    },
    /// A stored value does not decode as the entity openmls asked for.
    #[error("stored MLS {label} does not decode: {source}")]
    Decode {
        /// The kind of entity.
        label: &'static str,
        /// What serde_json reported.
        source: serde_json::Error,
    },
    /// A stored entry is not where the layout puts it (a list item without a sequence number).
    #[error("corrupt MLS storage: {0}")]
    Corrupt(&'static str),
}

/// The kinds of entity openmls stores. The numbers are part of the file format: never reuse or
/// renumber one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Label {
    JoinConfig = 1,
    OwnLeafNodes = 2,
    ProposalQueue = 3,
    Tree = 4,
    InterimTranscriptHash = 5,
    Context = 6,
    ConfirmationTag = 7,
    GroupState = 8,
    MessageSecrets = 9,
    ResumptionPskStore = 10,
    OwnLeafIndex = 11,
    EpochSecrets = 12,
    SignatureKeyPair = 13,
    EncryptionKeyPair = 14,
    EpochKeyPairs = 15,
    KeyPackage = 16,
    Psk = 17,
}

impl Label {
    fn name(self) -> &'static str {
        match self {
            Self::JoinConfig => "join config",
            Self::OwnLeafNodes => "own leaf nodes",
            Self::ProposalQueue => "proposal queue",
            Self::Tree => "tree",
            Self::InterimTranscriptHash => "interim transcript hash",
            Self::Context => "group context",
            Self::ConfirmationTag => "confirmation tag",
            Self::GroupState => "group state",
            Self::MessageSecrets => "message secrets",
            Self::ResumptionPskStore => "resumption PSK store",
            Self::OwnLeafIndex => "own leaf index",
            Self::EpochSecrets => "epoch secrets",
            Self::SignatureKeyPair => "signature key pair",
            Self::EncryptionKeyPair => "encryption key pair",
            Self::EpochKeyPairs => "epoch key pairs",
            Self::KeyPackage => "key package",
            Self::Psk => "PSK",
        }
    }
}

/// Domain separator of the key hash.
const KEY_DOMAIN: &[u8] = b"qpq-mls-key";
/// Length of an entry key: version, label, SHA-256.
const ENTRY_KEY_LEN: usize = 2 + 1 + 32;
/// Length of a list item key: entry key and sequence number.
const ITEM_KEY_LEN: usize = ENTRY_KEY_LEN + 8;

/// The vault key of the entity `label` addressed by `key`.
fn entry_key(label: Label, key: &impl Serialize) -> Result<Vec<u8>, StorageError> {
    let json = encode(label, key)?;
    let mut h = Sha256::new();
    h.update(KEY_DOMAIN);
    h.update([0]);
    h.update(json.as_slice());
    let mut out = Vec::with_capacity(ITEM_KEY_LEN);
    out.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    out.push(label as u8);
    out.extend_from_slice(&h.finalize());
    Ok(out)
}

fn encode(
    label: Label,
    value: &(impl Serialize + ?Sized),
) -> Result<Zeroizing<Vec<u8>>, StorageError> {
    serde_json::to_vec(value)
        .map(Zeroizing::new)
        .map_err(|source| StorageError::Encode { label: label.name(), source })
}

fn decode<V: DeserializeOwned>(label: Label, bytes: &[u8]) -> Result<V, StorageError> {
    serde_json::from_slice(bytes)
        .map_err(|source| StorageError::Decode { label: label.name(), source })
}

/// One item of a list: its vault key and its sealed-then-opened value.
type Item = (Vec<u8>, Zeroizing<Vec<u8>>);

impl VaultStorage {
    fn write(
        &self,
        label: Label,
        key: &impl Serialize,
        value: &(impl Serialize + ?Sized),
    ) -> Result<(), StorageError> {
        let k = entry_key(label, key)?;
        let v = encode(label, value)?;
        Ok(self.vault.put(Space::Mls, &k, &v)?)
    }

    fn read<V: DeserializeOwned>(
        &self,
        label: Label,
        key: &impl Serialize,
    ) -> Result<Option<V>, StorageError> {
        let k = entry_key(label, key)?;
        self.vault.get(Space::Mls, &k)?.map(|v| decode(label, &v)).transpose()
    }

    fn remove(&self, label: Label, key: &impl Serialize) -> Result<(), StorageError> {
        let k = entry_key(label, key)?;
        self.vault.delete(Space::Mls, &k)?;
        Ok(())
    }

    /// The items of a list in insertion order.
    fn items(&self, label: Label, key: &impl Serialize) -> Result<Vec<Item>, StorageError> {
        let prefix = entry_key(label, key)?;
        let items = self.vault.scan(Space::Mls, &prefix)?;
        if items.iter().any(|(k, _)| k.len() != ITEM_KEY_LEN) {
            return Err(StorageError::Corrupt("list item key without a sequence number"));
        }
        Ok(items)
    }

    /// The key of a new item after every item of `items`.
    fn next_item_key(
        label: Label,
        key: &impl Serialize,
        items: &[Item],
    ) -> Result<Vec<u8>, StorageError> {
        let next = match items.last() {
            None => 0,
            Some((k, _)) => {
                let seq = k
                    .get(ENTRY_KEY_LEN..)
                    .and_then(|s| <[u8; 8]>::try_from(s).ok())
                    .map(u64::from_be_bytes)
                    .ok_or(StorageError::Corrupt("list item key without a sequence number"))?;
                seq.checked_add(1).ok_or(StorageError::Corrupt("list sequence number exhausted"))?
            }
        };
        let mut k = entry_key(label, key)?;
        k.extend_from_slice(&next.to_be_bytes());
        Ok(k)
    }

    fn append(
        &self,
        label: Label,
        key: &impl Serialize,
        value: &impl Serialize,
    ) -> Result<(), StorageError> {
        let v = encode(label, value)?;
        self.vault.atomic(|| {
            let items = self.items(label, key)?;
            let k = Self::next_item_key(label, key, &items)?;
            Ok(self.vault.put(Space::Mls, &k, &v)?)
        })
    }

    fn read_list<V: DeserializeOwned>(
        &self,
        label: Label,
        key: &impl Serialize,
    ) -> Result<Vec<V>, StorageError> {
        self.items(label, key)?.iter().map(|(_, v)| decode(label, v)).collect()
    }

    fn clear_list(&self, label: Label, key: &impl Serialize) -> Result<(), StorageError> {
        let prefix = entry_key(label, key)?;
        self.vault.delete_prefix(Space::Mls, &prefix)?;
        Ok(())
    }

    /// The vault key of the queued proposal `proposal_ref` of a group, if it is queued.
    fn find_proposal(
        &self,
        items: &[Item],
        proposal_ref: &impl Serialize,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let wanted = serde_json::to_value(proposal_ref).map_err(|source| StorageError::Encode {
            label: Label::ProposalQueue.name(),
            source,
        })?;
        for (k, v) in items {
            let (stored, _): (serde_json::Value, IgnoredAny) = decode(Label::ProposalQueue, v)?;
            if stored == wanted {
                return Ok(Some(k.clone()));
            }
        }
        Ok(None)
    }
}

impl StorageProvider<CURRENT_VERSION> for VaultStorage {
    type Error = StorageError;

    // --- group state: writers ---

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.write(Label::JoinConfig, group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.append(Label::OwnLeafNodes, group_id, leaf_node)
    }

    /// Queues `proposal` at the end of the group's queue. Queuing a reference that is already
    /// queued replaces its proposal in place: the queue holds each reference once, as openmls's
    /// own in-memory proposal queue does.
    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        let v = encode(Label::ProposalQueue, &(proposal_ref, proposal))?;
        self.vault.atomic(|| {
            let items = self.items(Label::ProposalQueue, group_id)?;
            let k = match self.find_proposal(&items, proposal_ref)? {
                Some(k) => k,
                None => Self::next_item_key(Label::ProposalQueue, group_id, &items)?,
            };
            Ok(self.vault.put(Space::Mls, &k, &v)?)
        })
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.write(Label::Tree, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.write(Label::InterimTranscriptHash, group_id, interim_transcript_hash)
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.write(Label::Context, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.write(Label::ConfirmationTag, group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.write(Label::GroupState, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.write(Label::MessageSecrets, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.write(Label::ResumptionPskStore, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.write(Label::OwnLeafIndex, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.write(Label::EpochSecrets, group_id, group_epoch_secrets)
    }

    // --- crypto objects: writers ---

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(Label::SignatureKeyPair, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(Label::EncryptionKeyPair, public_key, key_pair)
    }

    /// Replaces the key pairs stored for `(group_id, epoch, leaf_index)` with `key_pairs`.
    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.write(Label::EpochKeyPairs, &(group_id, epoch, leaf_index), key_pairs)
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.write(Label::KeyPackage, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.write(Label::Psk, psk_id, psk)
    }

    // --- group state: readers ---

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.read(Label::JoinConfig, group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.read_list(Label::OwnLeafNodes, group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.items(Label::ProposalQueue, group_id)?
            .iter()
            .map(|(_, v)| {
                decode::<(ProposalRef, IgnoredAny)>(Label::ProposalQueue, v).map(|(r, _)| r)
            })
            .collect()
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        self.read_list(Label::ProposalQueue, group_id)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.read(Label::Tree, group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.read(Label::Context, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.read(Label::InterimTranscriptHash, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.read(Label::ConfirmationTag, group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.read(Label::GroupState, group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.read(Label::MessageSecrets, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.read(Label::ResumptionPskStore, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.read(Label::OwnLeafIndex, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.read(Label::EpochSecrets, group_id)
    }

    // --- crypto objects: readers ---

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.read(Label::SignatureKeyPair, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.read(Label::EncryptionKeyPair, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        Ok(self.read(Label::EpochKeyPairs, &(group_id, epoch, leaf_index))?.unwrap_or_default())
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.read(Label::KeyPackage, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.read(Label::Psk, psk_id)
    }

    // --- group state: deleters ---

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.vault.atomic(|| {
            let items = self.items(Label::ProposalQueue, group_id)?;
            if let Some(k) = self.find_proposal(&items, proposal_ref)? {
                self.vault.delete(Space::Mls, &k)?;
            }
            Ok(())
        })
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.clear_list(Label::OwnLeafNodes, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::JoinConfig, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::Tree, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::ConfirmationTag, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::GroupState, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::Context, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::InterimTranscriptHash, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::MessageSecrets, group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::ResumptionPskStore, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::OwnLeafIndex, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(Label::EpochSecrets, group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.clear_list(Label::ProposalQueue, group_id)
    }

    // --- crypto objects: deleters ---

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.remove(Label::SignatureKeyPair, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.remove(Label::EncryptionKeyPair, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.remove(Label::EpochKeyPairs, &(group_id, epoch, leaf_index))
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.remove(Label::KeyPackage, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.remove(Label::Psk, psk_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_are_fixed_length_and_separate_labels_and_keys() {
        let a = entry_key(Label::Tree, &"group-a").unwrap();
        assert_eq!(a.len(), ENTRY_KEY_LEN);
        assert_eq!(&a[..3], &[0, 1, Label::Tree as u8]);
        assert_eq!(a, entry_key(Label::Tree, &"group-a").unwrap(), "deterministic");
        assert_ne!(a, entry_key(Label::Context, &"group-a").unwrap());
        assert_ne!(a, entry_key(Label::Tree, &"group-ab").unwrap());
    }

    #[test]
    fn labels_are_distinct() {
        let all = [
            Label::JoinConfig,
            Label::OwnLeafNodes,
            Label::ProposalQueue,
            Label::Tree,
            Label::InterimTranscriptHash,
            Label::Context,
            Label::ConfirmationTag,
            Label::GroupState,
            Label::MessageSecrets,
            Label::ResumptionPskStore,
            Label::OwnLeafIndex,
            Label::EpochSecrets,
            Label::SignatureKeyPair,
            Label::EncryptionKeyPair,
            Label::EpochKeyPairs,
            Label::KeyPackage,
            Label::Psk,
        ];
        let mut tags: Vec<u8> = all.iter().map(|l| *l as u8).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), all.len());
    }
}
