//! The write path shared by both stores, and the in-memory store.
//!
//! Contract: [`Engine::execute`] runs one batch under the writer lock:
//! preconditions against the committed set, then [`api::validate`] over the
//! whole resulting set, then [`Persist::commit`], and only after that swaps
//! the in-memory set and bumps the watched revision. A failure at any step
//! returns before the swap, so memory never runs ahead of the disk.
//!
//! Non-goals: concurrent writers (they queue on the lock; validation of the
//! whole set is cheap next to an fsync).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use api::{Kind, Resource, Sourced};
use tokio::sync::watch;

use super::{
    Applied, Items, Op, OpResult, Outcome, Precondition, ResourceKey, Snapshot, Store, StoreError,
    Stored, STORE_SOURCE,
};

/// A committed change, handed to [`Persist`].
pub(crate) enum Change<'a> {
    Put(&'a Stored),
    Delete(&'a ResourceKey),
}

/// Where commits go.
pub(crate) trait Persist: Send + Sync {
    /// Writes `changes` and the new `revision` atomically, or nothing.
    fn commit(&self, revision: u64, changes: &[Change<'_>]) -> Result<(), StoreError>;
}

/// The committed state.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) revision: u64,
    pub(crate) items: Items,
    /// The validated mesh of `items`, kept from the commit that produced
    /// them (`None` after opening: built on first use).
    pub(crate) mesh: Option<Arc<api::Mesh>>,
}

/// Committed set in memory plus the serialized write path.
pub(crate) struct Engine {
    state: RwLock<Arc<State>>,
    writer: Mutex<()>,
    revision: watch::Sender<u64>,
}

impl Engine {
    pub(crate) fn new(state: State) -> Self {
        let (revision, _) = watch::channel(state.revision);
        Engine {
            state: RwLock::new(Arc::new(state)),
            writer: Mutex::new(()),
            revision,
        }
    }

    fn current(&self) -> Arc<State> {
        // A poisoned lock still holds a consistent Arc: the only write is a
        // single pointer swap.
        match self.state.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    pub(crate) fn get(&self, key: &ResourceKey) -> Option<Stored> {
        self.current().items.get(key).map(|s| (**s).clone())
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = self.current();
        Snapshot {
            revision: st.revision,
            items: st.items.values().map(|s| (**s).clone()).collect(),
        }
    }

    pub(crate) fn list(&self, kind: Option<Kind>) -> Vec<Stored> {
        let st = self.current();
        st.items
            .values()
            .filter(|s| kind.is_none_or(|k| s.resource.kind() == k))
            .map(|s| (**s).clone())
            .collect()
    }

    pub(crate) fn revision(&self) -> u64 {
        self.current().revision
    }

    /// The validated mesh of what is stored, with its revision: the one the
    /// last commit validated, so readers need not validate again.
    pub(crate) fn mesh(&self) -> Result<(u64, Arc<api::Mesh>), api::Errors> {
        let st = self.current();
        match &st.mesh {
            Some(m) => Ok((st.revision, m.clone())),
            None => {
                let set = st.items.values().map(|s| s.sourced()).collect();
                api::validate(set).map(|m| (st.revision, Arc::new(m)))
            }
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Runs one batch; with `persist == None` it is a dry run.
    pub(crate) fn execute(
        &self,
        ops: Vec<Op>,
        persist: Option<&dyn Persist>,
    ) -> Result<Applied, StoreError> {
        // A panic while holding the writer lock cannot leave a half-applied
        // batch (the swap is the last step), so a poisoned lock is usable.
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let next_revision = current.revision + 1;

        // Preconditions, against the committed set.
        let mut results = Vec::with_capacity(ops.len());
        let mut first_place: HashMap<ResourceKey, String> = HashMap::new();
        let mut duplicates = api::Errors::default();
        let mut puts: BTreeMap<ResourceKey, Sourced<Resource>> = BTreeMap::new();
        let mut deletes: Vec<ResourceKey> = Vec::new();
        for op in ops {
            let key = op.key();
            let place = match &op {
                Op::Put { resource, .. } => resource.place(),
                Op::Delete { .. } => "a delete in the same request".to_string(),
            };
            if let Some(first) = first_place.get(&key) {
                duplicates.0.push(api::Error {
                    file: place.clone(),
                    line: None,
                    column: None,
                    resource: Some(key.to_string()),
                    field: Some("metadata.name".into()),
                    message: format!(
                        "{key} appears twice in one request (first at {first}); send it once"
                    ),
                });
                continue;
            }
            first_place.insert(key.clone(), place);
            let stored = current.items.get(&key);
            let expected = match &op {
                Op::Put { expected, .. } | Op::Delete { expected, .. } => *expected,
            };
            check(&key, stored.map(|s| s.version), expected, &op)?;
            match op {
                Op::Put { resource, .. } => {
                    let outcome = match stored {
                        None => Outcome::Created,
                        Some(s) if s.resource == resource.value => Outcome::Unchanged,
                        Some(_) => Outcome::Configured,
                    };
                    let version = match outcome {
                        Outcome::Unchanged => stored.map(|s| s.version),
                        _ => Some(next_revision),
                    };
                    results.push(OpResult {
                        key: key.clone(),
                        outcome,
                        version,
                    });
                    if outcome != Outcome::Unchanged {
                        puts.insert(key, resource);
                    }
                }
                Op::Delete { .. } => {
                    results.push(OpResult {
                        key: key.clone(),
                        outcome: Outcome::Deleted,
                        version: None,
                    });
                    deletes.push(key);
                }
            }
        }
        if !duplicates.is_empty() {
            return Err(StoreError::Invalid(duplicates));
        }
        if puts.is_empty() && deletes.is_empty() {
            return Ok(Applied {
                revision: current.revision,
                results,
            });
        }

        // The whole resulting set must validate. The request's resources go
        // first so that their errors are listed first.
        let mut set: Vec<Sourced<Resource>> = puts.values().cloned().collect();
        for (key, stored) in &current.items {
            if !puts.contains_key(key) && !deletes.contains(key) {
                set.push(stored.sourced());
            }
        }
        let mesh = match api::validate(set) {
            Ok(m) => Arc::new(m),
            Err(errors) => return Err(StoreError::Invalid(store_errors(errors))),
        };

        let Some(persist) = persist else {
            return Ok(Applied {
                revision: current.revision,
                results,
            });
        };

        let mut items = current.items.clone();
        let mut written: Vec<Arc<Stored>> = Vec::with_capacity(puts.len());
        for (key, resource) in puts {
            let stored = Arc::new(Stored {
                resource: resource.value,
                version: next_revision,
            });
            items.insert(key, Arc::clone(&stored));
            written.push(stored);
        }
        for key in &deletes {
            items.remove(key);
        }
        let mut changes: Vec<Change<'_>> = written.iter().map(|s| Change::Put(s)).collect();
        changes.extend(deletes.iter().map(Change::Delete));
        persist.commit(next_revision, &changes)?;

        let next = Arc::new(State {
            revision: next_revision,
            items,
            mesh: Some(mesh),
        });
        match self.state.write() {
            Ok(mut g) => *g = next,
            Err(p) => *p.into_inner() = next,
        }
        self.revision.send_replace(next_revision);
        Ok(Applied {
            revision: next_revision,
            results,
        })
    }
}

/// Checks one op's precondition against the stored version.
fn check(
    key: &ResourceKey,
    current: Option<u64>,
    expected: Precondition,
    op: &Op,
) -> Result<(), StoreError> {
    let conflict = || StoreError::Conflict {
        key: key.clone(),
        current,
        expected,
    };
    match (expected, current) {
        (Precondition::Any, None) if matches!(op, Op::Delete { .. }) => {
            Err(StoreError::NotFound { key: key.clone() })
        }
        (Precondition::Any, _) => Ok(()),
        (Precondition::MustNotExist, None) => Ok(()),
        (Precondition::MustNotExist, Some(_)) => Err(conflict()),
        (Precondition::Version(want), Some(have)) if want == have => Ok(()),
        (Precondition::Version(_), _) => Err(conflict()),
    }
}

/// Stored resources have no meaningful line: drop it from their errors so
/// they read `store: Kind ns/name: field: message`.
fn store_errors(errors: api::Errors) -> api::Errors {
    api::Errors(
        errors
            .into_iter()
            .map(|mut e| {
                if e.file == STORE_SOURCE {
                    e.line = None;
                    e.column = None;
                }
                e
            })
            .collect(),
    )
}

/// The store in memory: the same engine as [`super::RedbStore`], no disk.
/// For tests, and for a throwaway control plane.
pub struct MemStore {
    engine: Engine,
}

struct NoDisk;

impl Persist for NoDisk {
    fn commit(&self, _revision: u64, _changes: &[Change<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
}

impl MemStore {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        MemStore {
            engine: Engine::new(State::default()),
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

/// A store made of an [`Engine`] and where it persists: every [`Store`]
/// method but the writes is the engine's, so both stores share one impl.
pub(crate) trait Backed: Send + Sync {
    fn engine(&self) -> &Engine;
    fn persist(&self) -> &dyn Persist;
}

impl Backed for MemStore {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn persist(&self) -> &dyn Persist {
        &NoDisk
    }
}

impl<T: Backed> Store for T {
    fn get(&self, key: &ResourceKey) -> Option<Stored> {
        self.engine().get(key)
    }

    fn list(&self, kind: Option<Kind>) -> Vec<Stored> {
        self.engine().list(kind)
    }

    fn snapshot(&self) -> Snapshot {
        self.engine().snapshot()
    }

    fn revision(&self) -> u64 {
        self.engine().revision()
    }

    fn mesh(&self) -> Result<(u64, Arc<api::Mesh>), api::Errors> {
        self.engine().mesh()
    }

    fn apply_batch(&self, ops: Vec<Op>) -> Result<Applied, StoreError> {
        self.engine().execute(ops, Some(self.persist()))
    }

    fn dry_run(&self, ops: Vec<Op>) -> Result<Applied, StoreError> {
        self.engine().execute(ops, None)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.engine().subscribe()
    }
}
