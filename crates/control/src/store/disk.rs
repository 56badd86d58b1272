//! The embedded store: one redb file under `--data-dir`.
//!
//! Contract: [`RedbStore::open`] creates `DIR/store.redb` (and `DIR`) when
//! missing, loads every resource into memory, and from then on each commit
//! is one redb write transaction with immediate durability: a process killed
//! at any moment leaves, on the next open, either the previous or the new
//! state, never part of a batch (redb's copy-on-write B-trees and its commit
//! slot make that so; an unclean shutdown is repaired on open).
//!
//! Layout: table `resources` maps `(kind, namespace, name)` to
//! `(resource version, resource as JSON)`; table `meta` holds `revision` and
//! `format` (the layout version, refused when newer than this binary knows).
//!
//! Non-goals: sharing the file between processes (redb locks it: a second
//! `meshwork control` on the same directory is refused with a clear error),
//! compaction, backups (copy the file while the control plane is stopped).

use std::path::{Path, PathBuf};

use api::{Kind, Resource};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::engine::{Backed, Change, Engine, Persist, State};
use super::{Items, ResourceKey, StoreError, Stored};

const RESOURCES: TableDefinition<'_, (&str, &str, &str), (u64, &str)> =
    TableDefinition::new("resources");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const FORMAT: u64 = 1;
/// redb's page cache; the whole set lives in our own memory anyway.
const CACHE_BYTES: usize = 8 << 20;

/// The file inside `--data-dir`.
pub const STORE_FILE: &str = "store.redb";

/// Resources persisted in redb (see the module docs).
pub struct RedbStore {
    engine: Engine,
    disk: Disk,
}

struct Disk {
    db: Database,
    path: PathBuf,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<RedbStore, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Storage(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join(STORE_FILE);
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Storage(format!(
                    "{} is in use by another process (is another `meshwork control` running with this --data-dir?)",
                    path.display()
                )),
                e => StoreError::Storage(format!("cannot open {}: {e}", path.display())),
            })?;
        let disk = Disk { db, path };
        let state = disk.load()?;
        Ok(RedbStore {
            engine: Engine::new(state),
            disk,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }
}

impl Disk {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Storage(format!("{}: {what}: {e}", self.path.display()))
    }

    /// Creates the tables if needed and reads everything.
    fn load(&self) -> Result<State, StoreError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| self.err("begin transaction", e))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| self.err("open table meta", e))?;
            let format = meta
                .get("format")
                .map_err(|e| self.err("read format", e))?
                .map(|g| g.value());
            match format {
                None => {
                    meta.insert("format", FORMAT)
                        .map_err(|e| self.err("write format", e))?;
                }
                Some(f) if f > FORMAT => {
                    return Err(self.err(
                        "format",
                        format!("layout version {f} was written by a newer meshwork (this one knows {FORMAT}); upgrade meshwork"),
                    ))
                }
                Some(_) => {}
            }
            txn.open_table(RESOURCES)
                .map_err(|e| self.err("open table resources", e))?;
        }
        txn.commit().map_err(|e| self.err("commit", e))?;

        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.err("begin read", e))?;
        let meta = txn
            .open_table(META)
            .map_err(|e| self.err("open table meta", e))?;
        let revision = meta
            .get("revision")
            .map_err(|e| self.err("read revision", e))?
            .map(|g| g.value())
            .unwrap_or(0);
        let table = txn
            .open_table(RESOURCES)
            .map_err(|e| self.err("open table resources", e))?;
        let mut items = Items::new();
        for entry in table.iter().map_err(|e| self.err("read resources", e))? {
            let (k, v) = entry.map_err(|e| self.err("read resources", e))?;
            let (kind, namespace, name) = k.value();
            let (version, json) = v.value();
            let stored = decode(kind, namespace, name, version, json)
                .map_err(|m| self.err(&format!("resource {kind} {namespace}/{name}"), m))?;
            items.insert(stored.key(), std::sync::Arc::new(stored));
        }
        Ok(State {
            revision,
            items,
            mesh: None,
        })
    }
}

/// A stored value back into a resource, checking it is what its key says.
fn decode(
    kind: &str,
    namespace: &str,
    name: &str,
    version: u64,
    json: &str,
) -> Result<Stored, String> {
    let mut loaded = api::load_str(super::STORE_SOURCE, json).map_err(|e| {
        format!("no longer loads ({e}); fix it with an older meshwork or delete the data dir")
    })?;
    let resource: Resource = match (loaded.pop(), loaded.is_empty()) {
        (Some(r), true) => r.value,
        _ => return Err("not exactly one resource".into()),
    };
    let key = ResourceKey::of(&resource);
    if Kind::from_name(kind) != Some(key.kind) || key.namespace != namespace || key.name != name {
        return Err(format!("holds {key} instead"));
    }
    Ok(Stored { resource, version })
}

impl Persist for Disk {
    fn commit(&self, revision: u64, changes: &[Change<'_>]) -> Result<(), StoreError> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| self.err("begin transaction", e))?;
        // Each commit is durable when it returns: an acknowledged apply
        // survives a crash.
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| self.err("set durability", e))?;
        {
            let mut table = txn
                .open_table(RESOURCES)
                .map_err(|e| self.err("open table resources", e))?;
            for change in changes {
                match change {
                    Change::Put(s) => {
                        let key = s.key();
                        let json = serde_json::to_string(&s.resource)
                            .map_err(|e| self.err(&format!("encode {key}"), e))?;
                        table
                            .insert(
                                (key.kind.as_str(), key.namespace.as_str(), key.name.as_str()),
                                (s.version, json.as_str()),
                            )
                            .map_err(|e| self.err(&format!("write {key}"), e))?;
                    }
                    Change::Delete(key) => {
                        table
                            .remove((key.kind.as_str(), key.namespace.as_str(), key.name.as_str()))
                            .map_err(|e| self.err(&format!("delete {key}"), e))?;
                    }
                }
            }
            let mut meta = txn
                .open_table(META)
                .map_err(|e| self.err("open table meta", e))?;
            meta.insert("revision", revision)
                .map_err(|e| self.err("write revision", e))?;
        }
        // Dropping an uncommitted transaction aborts it: an error above
        // writes nothing.
        txn.commit().map_err(|e| self.err("commit", e))
    }
}

impl Backed for RedbStore {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn persist(&self) -> &dyn Persist {
        &self.disk
    }
}
