//! The cluster's objects as the manager stores them. Plain data, no I/O. The enums and the
//! network it shares with the API and the agents come from `swarmnet-api` and
//! `swarmnet-types`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

pub use swarmnet_api::replies::Availability;
pub use swarmnet_api::{Constraint, DesiredState, EndpointMode, NodeStatus, Role, ServiceMode, TaskState, UpdateConfig, UpdateState, UpdateStatus};
pub use swarmnet_types::{format_mac, mac_for, Driver, Id, Network, Port, Protocol, PublishMode};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: Id,
    pub hostname: String,
    /// The address other nodes reach this node on (its underlay address).
    pub addr: std::net::IpAddr,
    pub role: Role,
    pub status: NodeStatus,
    /// Prefixes configured on the node's interfaces; overlay subnets never overlap them.
    pub underlay: Vec<IpNetwork>,
    /// SHA-256 of the node certificate's DER, hex. A client certificate that is not
    /// recorded here is refused even if the CA signed it.
    pub cert_sha256: String,
    /// The node's own address on the ingress network (where published ports enter the
    /// mesh and replies return); None while there is no ingress network.
    #[serde(default)]
    pub ingress_ip: Option<std::net::Ipv4Addr>,
    /// A manager's port on its address (2377): where agents and other managers reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_port: Option<u16>,
    /// Whether tasks are placed on it (`node update --availability`).
    #[serde(default)]
    pub availability: Availability,
    /// `node update --label-add K=V`: what placement constraints match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: Id,
    pub name: String,
    pub mode: ServiceMode,
    /// Network ids, in the order given.
    pub networks: Vec<Id>,
    pub endpoint_mode: EndpointMode,
    pub ports: Vec<Port>,
    pub command: Vec<String>,
    /// network id -> VIP (endpoint mode vip only).
    pub vips: BTreeMap<Id, Ipv4Addr>,
    /// network id -> extra names of the service there (`--network name=…,alias=…`).
    #[serde(default)]
    pub aliases: BTreeMap<Id, Vec<String>>,
    /// Where its tasks may run: every one must hold on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `--env`: the tasks' environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Raised by every change that replaces the tasks (command, env, constraints, `--force`);
    /// a task made from an older one is replaced by the rolling update.
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub update: UpdateConfig,
    /// The rolling update under way, or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatus>,
}

#[cfg(test)]
impl Node {
    /// A ready worker with nothing else set, for tests.
    pub(crate) fn test(id: &str, hostname: &str) -> Node {
        Node {
            id: id.into(),
            hostname: hostname.into(),
            addr: "10.210.0.1".parse().expect("addr"),
            role: Role::Worker,
            status: NodeStatus::Ready,
            underlay: vec![],
            cert_sha256: String::new(),
            ingress_ip: None,
            manager_port: None,
            availability: Default::default(),
            labels: Default::default(),
        }
    }
}

impl Service {
    pub fn updating(&self) -> bool {
        self.update_status.as_ref().is_some_and(|u| u.state == UpdateState::Updating)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: Id,
    /// `web.1`, `agent.<node id>`, or the name of a standalone task.
    pub name: String,
    /// None for a standalone (`run`) task.
    pub service_id: Option<Id>,
    pub slot: Option<u64>,
    /// None while pending.
    pub node_id: Option<Id>,
    pub desired_state: DesiredState,
    pub state: TaskState,
    /// Why the task is not running, if it is not.
    pub error: String,
    /// network id -> address.
    pub addresses: BTreeMap<Id, Ipv4Addr>,
    pub networks: Vec<Id>,
    pub command: Vec<String>,
    /// Restart the process when it exits (services); standalone tasks run once.
    pub restart: bool,
    pub restarts: u32,
    pub pid: Option<u32>,
    /// network id -> extra names of a standalone task there (a service's are on the service).
    #[serde(default)]
    pub aliases: BTreeMap<Id, Vec<String>>,
    /// The version of its service it was made from.
    #[serde(default)]
    pub version: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A container of another runtime on the node (its CNI ADD; Docker's network
    /// attachment task): no process of swarmnet's, only its address on one network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
}

/// Which container interface a network attachment task stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    pub id: String,
    pub ifname: String,
}

/// Everything the manager knows, as one value: operations clone it, change the clone
/// and commit the difference, so a failed operation leaves nothing behind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<Id, Node>,
    pub networks: BTreeMap<Id, Network>,
    pub services: BTreeMap<Id, Service>,
    pub tasks: BTreeMap<Id, Task>,
}

impl ClusterState {
    pub fn network_by_name(&self, name: &str) -> Option<&Network> {
        self.networks.values().find(|n| n.name == name || n.id == name)
    }

    pub fn service_by_name(&self, name: &str) -> Option<&Service> {
        self.services.values().find(|s| s.name == name || s.id == name)
    }

    pub fn ready_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.status == NodeStatus::Ready)
    }
}
