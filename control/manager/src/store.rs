//! The manager's store. `Store` is the seam for other backends (etcd); `RedbStore` is the
//! embedded default, one file in the data directory.
//!
//! The manager commits the difference between two `ClusterState` values, so the store sees
//! puts and deletes of whole objects, one transaction per operation.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::model::ClusterState;
use crate::pki::CertKey;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {msg}")]
    Backend { path: String, msg: String },
    #[error("store: object {table}/{key} is not valid: {source}")]
    Decode {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("store: encode: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What the manager keeps besides the objects: its identity and secrets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub ca: CertKey,
    pub worker_secret: String,
    pub manager_node_id: String,
    /// The manager's own certificate as a TLS server (and as a node).
    pub manager_cert: CertKey,
    /// UDP port of the VXLAN data path, cluster-wide (set when the cluster is created).
    #[serde(default = "default_data_path_port")]
    pub data_path_port: u16,
    /// The keys gossip is sealed with (made with the cluster, or at the first start of a
    /// manager whose cluster predates them).
    #[serde(default)]
    pub gossip_keys: Vec<swarmnet_api::GossipKey>,
    /// The key gossip is sealed with (0: the highest).
    #[serde(default)]
    pub gossip_send: u32,
    /// Certificates of removed nodes (SHA-256 of the DER) → "node id (hostname)": refused on
    /// 2377 with that reason.
    #[serde(default)]
    pub removed_nodes: std::collections::BTreeMap<String, String>,
}

fn default_data_path_port() -> u16 {
    4789
}

#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Put { table: &'static str, key: String, value: Vec<u8> },
    Delete { table: &'static str, key: String },
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<(Option<ClusterMeta>, ClusterState), StoreError>;
    /// Applies all writes atomically.
    fn commit(&self, writes: &[Write]) -> Result<(), StoreError>;
}

pub const NODES: &str = "nodes";
pub const NETWORKS: &str = "networks";
pub const SERVICES: &str = "services";
pub const TASKS: &str = "tasks";
pub const META: &str = "meta";
const TABLES: [&str; 5] = [NODES, NETWORKS, SERVICES, TASKS, META];

fn diff_map<V: Serialize + PartialEq>(table: &'static str, old: &std::collections::BTreeMap<String, V>, new: &std::collections::BTreeMap<String, V>, out: &mut Vec<Write>) -> Result<(), StoreError> {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.push(Write::Put { table, key: k.clone(), value: serde_json::to_vec(v)? });
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(Write::Delete { table, key: k.clone() });
        }
    }
    Ok(())
}

/// The writes that turn `old` into `new`.
pub fn diff(old: &ClusterState, new: &ClusterState) -> Result<Vec<Write>, StoreError> {
    let mut out = Vec::new();
    diff_map(NODES, &old.nodes, &new.nodes, &mut out)?;
    diff_map(NETWORKS, &old.networks, &new.networks, &mut out)?;
    diff_map(SERVICES, &old.services, &new.services, &mut out)?;
    diff_map(TASKS, &old.tasks, &new.tasks, &mut out)?;
    Ok(out)
}

pub fn meta_write(meta: &ClusterMeta) -> Result<Write, StoreError> {
    Ok(Write::Put { table: META, key: "cluster".into(), value: serde_json::to_vec(meta)? })
}

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

    fn read_table<V: DeserializeOwned>(&self, txn: &redb::ReadTransaction, table: &'static str) -> Result<std::collections::BTreeMap<String, V>, StoreError> {
        let t = txn.open_table(def(table)).map_err(|e| self.err(e))?;
        let mut out = std::collections::BTreeMap::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let key = k.value().to_string();
            let val = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode { table, key: key.clone(), source })?;
            out.insert(key, val);
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<(Option<ClusterMeta>, ClusterState), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut meta: std::collections::BTreeMap<String, ClusterMeta> = self.read_table(&txn, META)?;
        let state = ClusterState { nodes: self.read_table(&txn, NODES)?, networks: self.read_table(&txn, NETWORKS)?, services: self.read_table(&txn, SERVICES)?, tasks: self.read_table(&txn, TASKS)? };
        Ok((meta.remove("cluster"), state))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    #[test]
    fn redb_round_trip_with_deletes() {
        let dir = std::env::temp_dir().join(format!("swarmnet-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("m.redb");
        let _ = std::fs::remove_file(&path);
        let store = RedbStore::open(&path).expect("open");
        let empty = ClusterState::default();
        let mut st = ClusterState::default();
        let subnet: ipnetwork::Ipv4Network = "10.0.0.0/24".parse().expect("net");
        st.networks.insert(
            "n1".into(),
            Network { id: "n1".into(), name: "a".into(), driver: swarmnet_types::Driver::Overlay, attachable: true, subnet, gateway: crate::ipam::gateway(subnet), vni: 4096, ingress: false },
        );
        let mut st2 = st.clone();
        st2.networks.get_mut("n1").expect("n1").name = "b".into();
        store.commit(&diff(&empty, &st).expect("diff")).expect("commit");
        store.commit(&diff(&st, &st2).expect("diff")).expect("commit");
        drop(store);
        let store = RedbStore::open(&path).expect("reopen");
        let (meta, loaded) = store.load().expect("load");
        assert!(meta.is_none());
        assert_eq!(loaded, st2);
        store.commit(&diff(&st2, &empty).expect("diff")).expect("delete");
        assert_eq!(store.load().expect("load").1, empty);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
