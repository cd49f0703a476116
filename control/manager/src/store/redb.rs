//! The embedded store: one redb file in the manager's data directory, a table per kind of
//! object, one write transaction per commit.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{decode_objects, ClusterMeta, Store, StoreError, Write, TABLES};
use crate::model::ClusterState;

pub struct RedbStore {
    db: redb::Database,
    path: String,
}

fn def(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| StoreError::Backend { path: p.clone(), msg: e.to_string() };
        let db = redb::Database::create(path).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        for t in TABLES {
            txn.open_table(def(t)).map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(RedbStore { db, path: p })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend { path: self.path.clone(), msg: e.to_string() }
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<(Option<ClusterMeta>, ClusterState), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut objects: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
        for table in TABLES {
            let t = txn.open_table(def(table)).map_err(|e| self.err(e))?;
            for item in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                objects.push((table, k.value().to_string(), v.value().to_vec()));
            }
        }
        decode_objects(objects.iter().map(|(t, k, v)| (*t, k.as_str(), v.as_slice())))
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        for w in writes {
            match w {
                Write::Put { table, key, value } => {
                    let mut t = txn.open_table(def(table)).map_err(|e| self.err(e))?;
                    t.insert(key.as_str(), value.as_slice()).map_err(|e| self.err(e))?;
                }
                Write::Delete { table, key } => {
                    let mut t = txn.open_table(def(table)).map_err(|e| self.err(e))?;
                    t.remove(key.as_str()).map_err(|e| self.err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_passes_the_conformance_suite() {
        let dir = std::env::temp_dir().join(format!("swarmnet-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("m.redb");
        crate::store::conformance::run(&mut || Box::new(RedbStore::open(&path).expect("open")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
