//! The messages on TCP 2377 (inside mutual TLS) and on the local control socket.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use swarmnet_types::{Id, Network, Port};

use crate::cluster::{NetworkCreate, Role, ServiceCreate, ServiceUpdate, StandaloneCreate, TaskReport};
use crate::error::{ApiError, ErrorKind};
use crate::tls::CertKey;

/// The first message of every connection to 2377.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Hello {
    /// From a node without a certificate: join with the token's secret.
    /// With the manager secret (a manager joining a cluster on a shared store, ADR 0022):
    /// `manager_port` is where it will listen on when it leads.
    Join {
        secret: String,
        hostname: String,
        addr: IpAddr,
        underlay: Vec<IpNetwork>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manager_port: Option<u16>,
    },
    /// Opens the node's session: the full list of tasks it has now, then a stream.
    /// `hostname`: the node's display name now (it may have changed since it joined).
    Session {
        reports: Vec<TaskReport>,
        #[serde(default)]
        hostname: Option<String>,
    },
    /// One request, one reply (`service logs`: the reply, then a stream of
    /// [`crate::logs::LogFrame`]).
    Api { request: ApiRequest },
    /// A node's answer to [`FromManager::Logs`]: the stream's lines follow as
    /// [`crate::logs::LogFrame::Lines`], until the node has sent all (without `follow`) or
    /// the manager closes the connection.
    LogStream { stream: u64 },
}

/// The reply to a join.
#[derive(Debug, Serialize, Deserialize)]
pub struct Joined {
    pub node_id: Id,
    pub cluster_id: String,
    pub ca_pem: String,
    pub cert: CertKey,
}

/// The reply that opens a session.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionOpened {
    pub node_id: Id,
    pub heartbeat_ms: u64,
    /// The cluster's VXLAN UDP port.
    pub data_path_port: u16,
    /// Every manager's `host:port`, the leader first: where the agent goes when this one
    /// fails (ADR 0022).
    #[serde(default)]
    pub managers: Vec<String>,
}

/// Manager to agent, on a session.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromManager {
    /// `full`: this is every assignment of the node; otherwise changes.
    Assign { full: bool, upsert: Vec<Assignment>, remove: Vec<Id> },
    /// The ready nodes (id, underlay address): where to find gossip peers.
    Nodes { nodes: Vec<(Id, IpAddr)> },
    /// Every service VIP of the cluster (sent whole when it changes): a VIP with no task
    /// still refuses connections at once.
    Vips { vips: Vec<ServiceVip> },
    /// The cluster's ingress network and this node's own address on it (sent when either
    /// changes): published ports enter the routing mesh there. None: there is no ingress
    /// network (or no address was left for this node).
    Ingress { ingress: Option<NodeIngress> },
    /// The keys gossip is sealed with (issue 11), sent first in every session and whenever
    /// they change; the highest id is the one to send with.
    GossipKeys {
        keys: Vec<GossipKey>,
        /// The key to seal with (0: the highest). A new key is first handed out to be
        /// accepted only, and sealed with once every node had time to get it.
        #[serde(default)]
        send: u32,
    },
    /// Every manager's `host:port`, the leader first, when the list changes (a manager
    /// joined, went down, came back): where the agent goes when its manager fails.
    Managers { managers: Vec<String> },
    /// Send the output of some tasks on a new connection (`service logs`).
    Logs(LogsWanted),
}

/// A node's gossip keys: all of them open, `send` seals (0: the highest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKeySet {
    pub keys: Vec<GossipKey>,
    #[serde(default)]
    pub send: u32,
}

/// One gossip key: only the manager makes them, and only admitted nodes get them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKey {
    pub id: u32,
    /// 32 bytes, hex.
    pub key: String,
}

impl std::fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GossipKey({}, <secret>)", self.id)
    }
}

impl GossipKey {
    pub fn bytes(&self) -> Result<[u8; 32], String> {
        let v: Vec<u8> = (0..self.key.len())
            .step_by(2)
            .map(|i| self.key.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| format!("gossip key {}: not hex", self.id))?;
        v.try_into().map_err(|_| format!("gossip key {}: not 32 bytes", self.id))
    }

    pub fn from_bytes(id: u32, k: &[u8; 32]) -> GossipKey {
        GossipKey { id, key: k.iter().map(|b| format!("{b:02x}")).collect() }
    }
}

/// A node's place on the ingress network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIngress {
    pub network: Network,
    pub address: Ipv4Addr,
}

/// One VIP of a service on one network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceVip {
    pub network: Id,
    pub vip: Ipv4Addr,
    pub service: String,
}

/// Manager to agent, beside a session's state: asks for the output of some of its tasks
/// (`service logs`), to be sent on a connection of its own ([`Hello::LogStream`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsWanted {
    pub stream: u64,
    pub tasks: Vec<Id>,
    pub follow: bool,
    #[serde(default)]
    pub tail: Option<u64>,
    #[serde(default)]
    pub since_ns: Option<u64>,
}

/// Agent to manager, on a session.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    Heartbeat,
    Reports {
        reports: Vec<TaskReport>,
    },
    /// The gossip keys this node's gossip loop holds now (ids), sent after every
    /// `FromManager::GossipKeys`: `node ls` shows who holds the current key.
    GossipKeysHeld {
        ids: Vec<u32>,
    },
    /// What keeps the routing mesh from working fully on this node now (a local process
    /// bound to a published port, a table that cannot be written, no eBPF entry), sent when
    /// it changes and at the start of a session: `service ps` shows it.
    MeshWarnings {
        warnings: Vec<MeshWarning>,
    },
}

/// One routing-mesh problem of a node: about one published port, or all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshWarning {
    /// `(protocol, published port)`; None: every published port of the node.
    pub port: Option<(swarmnet_types::Protocol, u16)>,
    pub message: String,
}

/// What a node needs to run one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: Id,
    pub name: String,
    pub service_id: Option<Id>,
    #[serde(default)]
    pub service_name: Option<String>,
    /// The service's published ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    pub command: Vec<String>,
    /// The service's `--env`.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub restart: bool,
    pub attachments: Vec<Attachment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: Network,
    pub address: Ipv4Addr,
    /// The service's VIP on this network (endpoint mode vip).
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// Extra names on this network (`--network name=…,alias=…`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// A request of the CLI (or of an agent, for `run`). The reply's `data` is the type named
/// on each variant (`crate::replies`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum ApiRequest {
    /// `Vec<NodeInfo>`
    NodeLs,
    /// `JoinTokenInfo`
    JoinToken { role: Role },
    /// `NetworkInfo`
    NetworkCreate { spec: NetworkCreate },
    /// `Vec<NetworkInfo>`
    NetworkLs,
    /// `NetworkDetail`
    NetworkInspect { name: String },
    /// `Removed`
    NetworkRm { name: String },
    /// `ServiceInfo`
    ServiceCreate { spec: ServiceCreate },
    /// `Vec<ServiceInfo>`
    ServiceLs,
    /// `Vec<TaskInfo>`
    ServicePs { name: String },
    /// Every task of the cluster (the Docker API's `/tasks`). `Vec<TaskInfo>`
    TaskLs,
    /// `ServiceInfo`
    ServiceInspect { name: String },
    /// `ServiceInfo`
    ServiceScale { name: String, replicas: u64 },
    /// `ServiceInfo`: the change made; a rolling update of its tasks begun if it needs one.
    ServiceUpdate { name: String, spec: Box<ServiceUpdate> },
    /// `Removed`
    ServiceRm { name: String },
    /// `LogsOpened`, then a stream of `LogFrame`s on the same connection.
    ServiceLogs { spec: crate::logs::LogsRequest },
    /// A new gossip key, handed out now and sealed with shortly after. `GossipKeyRotated`
    RotateGossipKey,
    /// Removes a node (refused for one that is up, unless `force`). `Removed`
    NodeRm { node: String, force: bool },
    /// Makes a manager a worker (refused for the last manager): it no longer campaigns for
    /// the leadership. `Removed` (the node)
    NodeDemote { node: String },
    /// Makes a demoted manager a manager again: a node whose daemon runs `swarmnet manager`
    /// on the cluster's etcd (it campaigns again). `Removed` (the node)
    NodePromote { node: String },
    /// A node's availability and labels (only what is given changes). `NodeInfo`
    NodeUpdate {
        node: String,
        availability: Option<crate::replies::Availability>,
        #[serde(default)]
        label_add: BTreeMap<String, String>,
        #[serde(default)]
        label_rm: Vec<String>,
    },
    /// One node, with its store if it is a manager. `NodeDetail`
    NodeInspect { node: String },
    /// From an agent: a standalone task on the calling node. `TaskInfo`
    Run { spec: StandaloneCreate },
    /// From an agent: a container of the calling node joins an attachable network (its CNI
    /// ADD). `ContainerAttached`
    Attach { spec: crate::cni::ContainerAttach },
    /// From an agent: a container of the calling node leaves a network (its CNI DEL, or
    /// the agent found its namespace gone). `ContainerDetached`
    Detach { spec: crate::cni::ContainerDetach },
    /// From the CNI plugin to its node's daemon: ADD. `CniAttached`
    CniAdd { req: crate::cni::CniRequest },
    /// From the CNI plugin to its node's daemon: CHECK (an error names what drifted). `CniAttached`
    CniCheck { req: crate::cni::CniRequest },
    /// From the CNI plugin to its node's daemon: DEL (done also when nothing is attached). `CniRemoved`
    CniDel { req: crate::cni::CniRequest },
    /// From the CNI plugin to its node's daemon: GC. `CniRemoved`
    CniGc { spec: crate::cni::CniGc },
    /// From the CLI to its local daemon: where task `task` (a name such as `web.1`, an id or
    /// an id's unique prefix) runs on this node, for `exec`. `ExecTarget`
    ExecLocate { task: String },
    /// From the CLI to its local daemon: run here, wait unless `detach`. `RunResult`
    RunLocal { spec: StandaloneCreate, detach: bool },
    /// From the CLI to its local daemon: this node's load-balancer table as read back from
    /// the kernel. `LbTable`
    LbLs,
    /// From the CLI to its local daemon: the node leaves the swarm (its tasks stop, every
    /// kernel object it made goes, its state is erased, the daemon exits); refused on a
    /// manager unless `force`. `Left`
    SwarmLeave { force: bool },
}

/// Every reply: `ok` and `data`, or an error with its kind.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default)]
    pub data: serde_json::Value,
    /// Set when the data may be out of date (no manager leads: a standby manager answered
    /// from its store's copy), saying why. The CLI prints it as a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

/// A reply written straight from its data, without a JSON tree: the same shape as [`Reply`]
/// (a large answer, such as every task, costs one encoding instead of three).
#[derive(Debug, Serialize)]
pub struct DataReply<'a, T: Serialize> {
    pub ok: bool,
    pub data: &'a T,
}

/// A [`Reply`] read straight into its data's type.
#[derive(Debug, Deserialize)]
pub struct TypedReply<T> {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<ApiError>,
    #[serde(default = "Option::default")]
    pub data: Option<T>,
    #[serde(default)]
    pub stale: Option<String>,
}

impl<T> TypedReply<T> {
    pub fn into_result(self) -> Result<T, ApiError> {
        match (self.ok, self.data) {
            (true, Some(d)) => Ok(d),
            (true, None) => Err(ApiError::internal("a reply without its data")),
            (false, _) => Err(self.error.unwrap_or_else(|| ApiError::internal("refused without a reason"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The other side refused, with the kind and its reason.
    #[error("{0}")]
    Refused(ApiError),
    #[error("unexpected reply (a daemon of another version?): {0}")]
    Shape(#[from] serde_json::Error),
}

impl ReplyError {
    /// The refusal's kind (a reply of another shape is `Internal`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReplyError::Refused(e) => e.kind,
            ReplyError::Shape(_) => ErrorKind::Internal,
        }
    }

    /// As an error to hand on (a reply of another shape becomes `Internal`).
    pub fn into_api(self) -> ApiError {
        match self {
            ReplyError::Refused(e) => e,
            e @ ReplyError::Shape(_) => ApiError::internal(e),
        }
    }
}

impl ApiRequest {
    /// Whether the request only reads the cluster's state (a standby manager may answer it
    /// from its store's copy when no manager leads).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            ApiRequest::NodeLs
                | ApiRequest::NodeInspect { .. }
                | ApiRequest::NetworkLs
                | ApiRequest::NetworkInspect { .. }
                | ApiRequest::ServiceLs
                | ApiRequest::ServicePs { .. }
                | ApiRequest::TaskLs
                | ApiRequest::ServiceInspect { .. }
                | ApiRequest::ServiceLogs { .. }
                | ApiRequest::LbLs
        )
    }
}

impl Reply {
    /// A successful reply carrying `data`.
    pub fn ok<T: Serialize>(data: &T) -> Reply {
        match serde_json::to_value(data) {
            Ok(data) => Reply { ok: true, error: None, data, stale: None },
            Err(e) => Reply::err(ApiError::internal(format!("cannot encode the reply: {e}"))),
        }
    }

    pub fn err(e: ApiError) -> Reply {
        Reply { ok: false, error: Some(e), data: serde_json::Value::Null, stale: None }
    }

    /// The reply for a result.
    pub fn from_result<T: Serialize>(r: Result<T, ApiError>) -> Reply {
        match r {
            Ok(v) => Reply::ok(&v),
            Err(e) => Reply::err(e),
        }
    }

    /// The reply's data as `T`, or why not.
    pub fn into_data<T: DeserializeOwned>(self) -> Result<T, ReplyError> {
        if !self.ok {
            return Err(ReplyError::Refused(self.error.unwrap_or_else(|| ApiError::internal("refused without a reason"))));
        }
        Ok(serde_json::from_value(self.data)?)
    }
}
