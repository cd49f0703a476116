//! The manager's store: the `Store` trait and its two implementations, `RedbStore` (the
//! embedded default, one file in the data directory) and `EtcdStore` (several managers on one
//! etcd cluster, ADR 0022).
//!
//! The manager commits the difference between two `ClusterState` values, so the store sees
//! puts and deletes of whole objects, one atomic commit per operation.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::model::ClusterState;
use crate::pki::CertKey;

pub mod conformance;
pub mod etcd;
pub mod log;
mod redb;

pub use self::etcd::{EtcdConfig, EtcdStore, EtcdTls};
pub use self::redb::RedbStore;

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
    /// The store cannot be reached or did not answer; the commit may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// This manager does not (or no longer) hold the leadership the store's writes are
    /// fenced with.
    #[error("{0}")]
    NotLeader(String),
}

/// What the manager keeps besides the objects: its identity and secrets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub ca: CertKey,
    pub worker_secret: String,
    /// The secret a manager presents to join a cluster it found in a shared store (ADR
    /// 0022); made by the first leader that lacks it.
    #[serde(default)]
    pub manager_secret: String,
    /// The node that created the cluster (its first manager).
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
    pub removed_nodes: BTreeMap<String, String>,
}

fn default_data_path_port() -> u16 {
    4789
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put { table: &'static str, key: String, value: Vec<u8> },
    Delete { table: &'static str, key: String },
}

impl Write {
    pub fn key(&self) -> &str {
        match self {
            Write::Put { key, .. } | Write::Delete { key, .. } => key,
        }
    }
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            Write::Put { value, .. } => Some(value),
            Write::Delete { .. } => None,
        }
    }
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<(Option<ClusterMeta>, ClusterState), StoreError>;
    /// Applies all writes atomically: all of them or none.
    fn commit(&self, writes: &[Write]) -> Result<(), StoreError>;
    /// The state to continue from, when the caller's may be behind the store's (a commit
    /// whose outcome was unknown, another writer in between); None when it is current.
    fn refresh(&self) -> Result<Option<(Option<ClusterMeta>, ClusterState)>, StoreError> {
        Ok(None)
    }
    /// Where the store is, for messages and `node inspect` (a file, `etcd://…`).
    fn describe(&self) -> String;
    /// Whether this manager may still write (an embedded store: always).
    fn leads(&self) -> bool {
        true
    }
    /// Gives the leadership up, so that another manager need not wait for it to run out.
    fn resign(&self) {}
}

pub const NODES: &str = "nodes";
pub const NETWORKS: &str = "networks";
pub const SERVICES: &str = "services";
pub const TASKS: &str = "tasks";
pub const META: &str = "meta";
/// Every table; a table's place here is its number in the log's encoding (never reorder).
pub const TABLES: [&str; 5] = [NODES, NETWORKS, SERVICES, TASKS, META];

/// The metadata and the state that objects (table, key, JSON) make.
pub fn decode_objects<'a>(objects: impl IntoIterator<Item = (&'static str, &'a str, &'a [u8])>) -> Result<(Option<ClusterMeta>, ClusterState), StoreError> {
    fn put<V: DeserializeOwned>(m: &mut BTreeMap<String, V>, table: &'static str, key: &str, v: &[u8]) -> Result<(), StoreError> {
        let val = serde_json::from_slice(v).map_err(|source| StoreError::Decode { table, key: key.to_string(), source })?;
        m.insert(key.to_string(), val);
        Ok(())
    }
    let mut st = ClusterState::default();
    let mut meta = BTreeMap::<String, ClusterMeta>::new();
    for (table, key, v) in objects {
        match table {
            NODES => put(&mut st.nodes, table, key, v)?,
            NETWORKS => put(&mut st.networks, table, key, v)?,
            SERVICES => put(&mut st.services, table, key, v)?,
            TASKS => put(&mut st.tasks, table, key, v)?,
            // Tables are only ever made from `TABLES`.
            _ => put(&mut meta, table, key, v)?,
        }
    }
    Ok((meta.remove("cluster"), st))
}

fn diff_map<V: Serialize + PartialEq>(table: &'static str, old: &BTreeMap<String, V>, new: &BTreeMap<String, V>, out: &mut Vec<Write>) -> Result<(), StoreError> {
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

/// Which store a manager keeps the cluster in (`--store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// `redb`: the embedded store, `<data-dir>/manager.redb` (one manager).
    Redb,
    /// `etcd://H1:2379,H2:2379`: the etcd cluster at those endpoints.
    Etcd { endpoints: Vec<String> },
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "redb" {
            return Ok(StoreSpec::Redb);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(format!("--store {s:?}: expected redb or etcd://HOST:PORT[,HOST:PORT…]"));
        };
        let mut endpoints = Vec::new();
        for e in rest.split(',') {
            let e = e.trim();
            let ok = match e.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            };
            if !ok {
                return Err(format!("--store {s:?}: endpoint {e:?} is not HOST:PORT"));
            }
            endpoints.push(e.to_string());
        }
        Ok(StoreSpec::Etcd { endpoints })
    }
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Redb => f.write_str("redb"),
            StoreSpec::Etcd { endpoints } => write!(f, "etcd://{}", endpoints.join(",")),
        }
    }
}

/// The store a manager opens: the embedded one in its data directory, or etcd.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    Redb,
    Etcd(EtcdConfig),
}
