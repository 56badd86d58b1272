//! The resource store: what operators declared, versioned and always valid.
//!
//! Contract:
//! - Objects are mesh resources ([`api::Resource`]) keyed by
//!   [`ResourceKey`] (kind, namespace, name). Each carries a resource
//!   version: the store-wide revision of the commit that last changed it.
//!   The revision starts at 0 (empty store) and grows by one per commit.
//! - Every write ([`Store::apply_batch`], and `put`/`delete`, which are
//!   one-op batches) is all-or-nothing: preconditions are checked, then the
//!   whole resulting set is validated with [`api::validate`], then it is
//!   committed in one transaction. Anything wrong (a stale version, an
//!   invalid field, a dangling reference, a storage error) leaves the store
//!   exactly as it was.
//! - Reads never touch the disk: both stores keep the committed set in memory
//!   and swap it atomically after a commit, so `get`/`list` never fail and
//!   never see half a batch.
//! - [`Store::subscribe`] watches the revision: it changes after every
//!   commit, so a watcher re-reads [`Store::snapshot`] and rebuilds.
//! - Writes may block on disk (fsync): call them from `spawn_blocking` in
//!   async code.
//!
//! [`RedbStore`] persists to one redb file under `--data-dir`;
//! [`MemStore`] is the same engine without disk, for tests.
//!
//! Non-goals: history, watch of individual keys, multi-process writers
//! (redb locks the file; `--store etcd://` is another implementation).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use api::{Kind, Resource, Sourced};
use tokio::sync::watch;

mod disk;
mod engine;

pub use disk::RedbStore;
pub use engine::MemStore;

/// Source name of resources that come from the store, in validation errors.
pub const STORE_SOURCE: &str = "store";

/// Identity of a stored resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    /// The key `kind namespace/name`.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ResourceKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// The key of `resource`.
    pub fn of(resource: &Resource) -> Self {
        let m = resource.metadata();
        ResourceKey::new(resource.kind(), &m.namespace, &m.name)
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A resource as stored, with its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub resource: Resource,
    /// Revision of the commit that last changed it.
    pub version: u64,
}

impl Stored {
    /// Its key.
    pub fn key(&self) -> ResourceKey {
        ResourceKey::of(&self.resource)
    }

    /// The resource for [`api::validate`], located in [`STORE_SOURCE`].
    pub fn sourced(&self) -> Sourced<Resource> {
        Sourced::new(STORE_SOURCE, 1, self.resource.clone())
    }

    /// The resource as JSON with `metadata.resourceVersion` set (a string,
    /// as in Kubernetes).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.resource).unwrap_or(serde_json::Value::Null);
        if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.insert(
                "resourceVersion".into(),
                serde_json::Value::String(self.version.to_string()),
            );
        }
        v
    }
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Anything (create or overwrite; delete requires existence).
    Any,
    /// Nothing under this key (create only).
    MustNotExist,
    /// Exactly this resource version (optimistic concurrency).
    Version(u64),
}

impl fmt::Display for Precondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Precondition::Any => f.write_str("any version"),
            Precondition::MustNotExist => f.write_str("that it does not exist"),
            Precondition::Version(v) => write!(f, "resourceVersion {v}"),
        }
    }
}

/// One operation of a batch.
// Ops live briefly in one Vec per request: boxing the resource would only
// make every caller's code noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Op {
    /// Create or replace. The source place is used in validation errors.
    Put {
        resource: Sourced<Resource>,
        expected: Precondition,
    },
    /// Remove.
    Delete {
        key: ResourceKey,
        expected: Precondition,
    },
}

impl Op {
    /// The key the op writes.
    pub fn key(&self) -> ResourceKey {
        match self {
            Op::Put { resource, .. } => ResourceKey::of(&resource.value),
            Op::Delete { key, .. } => key.clone(),
        }
    }
}

/// What an op did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// Replaced with a different resource.
    Configured,
    /// Identical to what was stored: not written, version kept.
    Unchanged,
    Deleted,
}

impl Outcome {
    /// kubectl's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
        }
    }
}

/// The result of one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpResult {
    pub key: ResourceKey,
    pub outcome: Outcome,
    /// The resource version after the op (`None` once deleted).
    pub version: Option<u64>,
}

/// The result of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The store revision after the batch (unchanged when nothing changed,
    /// and in a dry run).
    pub revision: u64,
    /// One per op, in order.
    pub results: Vec<OpResult>,
}

/// A consistent view of the whole store.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: u64,
    /// Sorted by key.
    pub items: Vec<Stored>,
}

impl Snapshot {
    /// The items as [`api::validate`] input.
    pub fn sourced(&self) -> Vec<Sourced<Resource>> {
        self.items.iter().map(Stored::sourced).collect()
    }
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition does not hold: someone else changed the resource.
    #[error("{key}: {}; re-read and retry", conflict_text(.current, .expected))]
    Conflict {
        key: ResourceKey,
        /// Its current version, `None` when it does not exist.
        current: Option<u64>,
        expected: Precondition,
    },
    /// Delete (or update by version) of something that is not there.
    #[error("{key} not found")]
    NotFound { key: ResourceKey },
    /// The resulting set would not validate; every problem is listed.
    #[error("{0}")]
    Invalid(api::Errors),
    /// The database failed; nothing was written. Retrying may help.
    #[error("store: {0}")]
    Storage(String),
}

fn conflict_text(current: &Option<u64>, expected: &Precondition) -> String {
    match current {
        Some(v) => format!("current resourceVersion is {v}, the request expected {expected}"),
        None => format!("it does not exist (any more), the request expected {expected}"),
    }
}

impl StoreError {
    /// True for [`StoreError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// True for [`StoreError::Invalid`].
    pub fn is_invalid(&self) -> bool {
        matches!(self, StoreError::Invalid(_))
    }

    /// True for [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// The store seam: a redb file in production, memory in tests.
pub trait Store: Send + Sync {
    /// The resource under `key`.
    fn get(&self, key: &ResourceKey) -> Option<Stored>;

    /// Every resource (of `kind`, when given), sorted by key.
    fn list(&self, kind: Option<Kind>) -> Vec<Stored> {
        let snap = self.snapshot();
        match kind {
            None => snap.items,
            Some(k) => snap
                .items
                .into_iter()
                .filter(|s| s.resource.kind() == k)
                .collect(),
        }
    }

    /// Everything, with the revision it was read at.
    fn snapshot(&self) -> Snapshot;

    /// The current revision.
    fn revision(&self) -> u64;

    /// The validated mesh of everything stored (the one the last commit
    /// validated), with its revision.
    fn mesh(&self) -> Result<(u64, Arc<api::Mesh>), api::Errors>;

    /// Applies every op or none (see the module docs).
    fn apply_batch(&self, ops: Vec<Op>) -> Result<Applied, StoreError>;

    /// Checks `ops` exactly like [`Store::apply_batch`] without writing.
    fn dry_run(&self, ops: Vec<Op>) -> Result<Applied, StoreError>;

    /// The revision, updated after each commit.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Creates or replaces one resource.
    fn put(
        &self,
        resource: Sourced<Resource>,
        expected: Precondition,
    ) -> Result<Stored, StoreError> {
        let key = ResourceKey::of(&resource.value);
        self.apply_batch(vec![Op::Put { resource, expected }])?;
        // The write just committed; a concurrent delete could have removed it
        // again, which is a conflict from the caller's point of view.
        self.get(&key).ok_or(StoreError::Conflict {
            key,
            current: None,
            expected,
        })
    }

    /// Removes one resource, returning what was stored.
    fn delete(&self, key: &ResourceKey, expected: Precondition) -> Result<Stored, StoreError> {
        let before = self
            .get(key)
            .ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
        self.apply_batch(vec![Op::Delete {
            key: key.clone(),
            expected,
        }])?;
        Ok(before)
    }
}

/// Items by key, shared by both stores.
pub(crate) type Items = BTreeMap<ResourceKey, Arc<Stored>>;

#[cfg(test)]
mod tests;
