//! Durable backend on redb: every commit is fsynced before the write is acknowledged.

use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};
use serde_json::Value;

use super::memory::{Kv, KvStore};
use super::{DEFAULT_WINDOW, Result, Rv, StoreError};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub struct RedbKv {
    db: Database,
}

fn be<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbKv {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(be)?;
        let tx = db.begin_write().map_err(be)?;
        tx.open_table(OBJECTS).map_err(be)?;
        tx.open_table(META).map_err(be)?;
        tx.commit().map_err(be)?;
        Ok(RedbKv { db })
    }
}

impl Kv for RedbKv {
    fn get(&self, key: &str) -> Result<Option<Value>> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(OBJECTS).map_err(be)?;
        match t.get(key).map_err(be)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(be)?)),
            None => Ok(None),
        }
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Value)>> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(OBJECTS).map_err(be)?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(be)? {
            let (k, v) = item.map_err(be)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), serde_json::from_slice(v.value()).map_err(be)?));
        }
        Ok(out)
    }

    fn commit(&self, key: &str, value: Option<&Value>, rv: Rv) -> Result<()> {
        let tx = self.db.begin_write().map_err(be)?;
        {
            let mut t = tx.open_table(OBJECTS).map_err(be)?;
            match value {
                Some(v) => {
                    let bytes = serde_json::to_vec(v).map_err(be)?;
                    t.insert(key, bytes.as_slice()).map_err(be)?;
                }
                None => {
                    t.remove(key).map_err(be)?;
                }
            }
            tx.open_table(META).map_err(be)?.insert("rv", rv).map_err(be)?;
        }
        tx.commit().map_err(be)
    }

    fn load_rv(&self) -> Result<Rv> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(META).map_err(be)?;
        Ok(t.get("rv").map_err(be)?.map(|v| v.value()).unwrap_or(0))
    }
}

pub type RedbStore = KvStore<RedbKv>;

impl RedbStore {
    /// Opens (or creates) the database file. Recovery after a crash is redb's.
    pub fn open(path: &Path) -> Result<Self> {
        KvStore::with_backend(RedbKv::open(path)?, DEFAULT_WINDOW)
    }
}
