//! Typed replies: what the manager (and the node's daemon, for what only it knows) answers,
//! and what the CLI prints. Field names are the JSON that `--format json` and `inspect`
//! show.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use swarmnet_types::{Driver, EndpointState, Id, Port};

use crate::cluster::{DesiredState, EndpointMode, NodeStatus, Role, TaskState, UpdateConfig, UpdateStatus};

/// A node as this node's gossip failure detector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GossipView {
    Alive,
    Unreachable,
    /// This node's gossip loop is not answering: nothing can be said.
    Unknown,
}

/// `node inspect`: the node as `node ls` shows it, and for a manager where it listens and
/// where the cluster's state is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: NodeInfo,
    /// A manager's `host:port` on 2377.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_addr: Option<String>,
    /// For a manager: the cluster's store (`etcd://h:p,…/prefix`, or the embedded file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    pub underlay: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: Id,
    pub hostname: String,
    pub address: IpAddr,
    pub status: NodeStatus,
    /// Whether the scheduler places tasks on it (`node update --availability`).
    pub availability: Availability,
    /// `node update --label-add K=V`: what `--constraint node.labels.K==V` matches.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// For a manager: `Leader` (the one manager, for now); None for a worker.
    pub manager_status: Option<ManagerStatus>,
    pub role: Role,
    /// Filled in by the manager node's daemon from its own gossip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip: Option<GossipView>,
    /// The gossip keys the node said it holds (issue 11); None: it has not said since the
    /// manager started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_key: Option<KeyHolding>,
}

/// Whether the scheduler places tasks on a node (Docker's availability).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Tasks are placed on it.
    #[default]
    Active,
    /// No new task is placed on it; its tasks go on.
    Pause,
    /// No task runs on it: its service tasks move to other nodes.
    Drain,
}

impl std::str::FromStr for Availability {
    type Err = crate::ApiError;

    fn from_str(s: &str) -> Result<Availability, crate::ApiError> {
        match s {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            other => Err(crate::ApiError::invalid(format!("availability {other:?}: expected active, pause or drain"))),
        }
    }
}

impl std::fmt::Display for Availability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        })
    }
}

/// A manager's place among the managers (Docker's MANAGER STATUS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerStatus {
    Leader,
    Reachable,
    Unreachable,
}

/// Which gossip keys a node holds, against the cluster's newest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHolding {
    pub held: Vec<u32>,
    /// The cluster's newest key.
    pub current: u32,
}

impl KeyHolding {
    pub fn holds_current(&self) -> bool {
        self.held.contains(&self.current)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub id: Id,
    pub name: String,
    pub driver: Driver,
    pub scope: Scope,
    pub attachable: bool,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// The cluster's ingress network (the routing mesh's).
    #[serde(default)]
    pub ingress: bool,
}

/// Where a network exists: across the cluster (every overlay network).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Swarm,
}

/// An endpoint of a network as the manager assigned it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedEndpoint {
    pub name: String,
    pub task_id: Id,
    pub ip: Ipv4Addr,
    pub mac: String,
    /// Hostname of the task's node, if it is placed.
    pub node: Option<String>,
}

/// An endpoint as this node's gossip table holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub name: String,
    pub task_id: Id,
    pub service: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub vtep: IpAddr,
    pub state: EndpointState,
}

/// This node's resolvers (every task, every network) since its daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCounters {
    pub answered_locally: u64,
    pub forwarded: u64,
    pub upstream_failures: u64,
    pub refused_or_malformed: u64,
}

/// This node's gossip (all networks) since its daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipCounters {
    /// Messages dropped unparsed: not sealed with a key this node holds, or too old.
    pub unauthenticated: u64,
    /// Authenticated but not understood.
    pub malformed: u64,
    pub udp_sent: u64,
}

/// `network inspect`: the manager's record, and what the asked node itself knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetail {
    #[serde(flatten)]
    pub network: NetworkInfo,
    pub endpoints: Vec<AssignedEndpoint>,
    /// The network's table as this node's gossip holds it (empty on a node that is not on
    /// the network; null if this node's gossip is not answering).
    #[serde(default)]
    pub local_endpoints: Option<Vec<LocalEndpoint>>,
    #[serde(default)]
    pub local_dns: DnsCounters,
    /// This node's gossip since its daemon started (None if its loop is not answering).
    #[serde(default)]
    pub local_gossip: Option<GossipCounters>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceModeName {
    Replicated,
    Global,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub id: Id,
    pub name: String,
    pub mode: ServiceModeName,
    /// `running/desired`.
    pub replicas: String,
    pub desired_replicas: u64,
    pub running_replicas: u64,
    /// Network names.
    pub networks: Vec<String>,
    pub endpoint_mode: EndpointMode,
    /// Network name → VIP.
    pub vips: BTreeMap<String, Ipv4Addr>,
    /// Network name → aliases of the service there.
    pub aliases: BTreeMap<String, Vec<String>>,
    pub ports: Vec<Port>,
    pub command: Vec<String>,
    /// `--constraint`s, as given (`node.labels.zone==a`).
    #[serde(default)]
    pub constraints: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `--env`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Raised by every change that replaces its tasks.
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub update_config: UpdateConfig,
    /// The rolling update under way, or the last one.
    #[serde(default)]
    pub update_status: Option<UpdateStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: Id,
    pub name: String,
    /// Hostname of its node; empty while it is not placed.
    pub node: String,
    pub node_id: Option<Id>,
    pub desired_state: DesiredState,
    pub state: TaskState,
    /// Why it is not running, if it is not.
    pub error: String,
    /// Network name → address.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// The version of its service it was made from.
    #[serde(default)]
    pub version: u64,
    /// Told to stop on a node that is down: it stops (or is forgotten) when the node comes
    /// back or is removed; nothing waits for it.
    #[serde(default)]
    pub orphaned: bool,
    /// Its service (None for a standalone task) and slot (a replicated service's).
    #[serde(default)]
    pub service_id: Option<Id>,
    #[serde(default)]
    pub slot: Option<u64>,
    /// When its state last changed (unix ms), as the manager that answers saw it.
    #[serde(default)]
    pub since_ms: u64,
}

/// `service ps`: the service's tasks, and what keeps its published ports from answering
/// fully on some node ("node <hostname>: …").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePsReply {
    pub tasks: Vec<TaskInfo>,
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenInfo {
    pub role: Role,
    pub token: String,
    /// The manager's node id.
    pub manager: Id,
}

/// `swarm rotate-gossip-key`: the new key's id (nodes seal with it from now on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKeyRotated {
    pub key: u32,
}

/// The answer to an `rm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub id: Id,
    pub name: String,
}

/// `swarm leave`: the node that left, and what of it could not be removed (empty: nothing
/// is left).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    pub node_id: Id,
    pub left_behind: Vec<String>,
}

/// `exec`: a task running on this node, where its process is (the CLI enters its
/// namespaces and cgroup).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecTarget {
    pub task_id: Id,
    pub name: String,
    pub pid: u32,
    /// The process's start time (`/proc/PID/stat`), against a reused PID.
    pub start_time: u64,
}

/// `run`: the task once it runs (`--detach`), or once it finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunResult {
    Finished { id: Id, exit_code: i32, output: String, task: TaskInfo },
    Detached(TaskInfo),
}

/// One backend of a VIP, as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbBackendInfo {
    /// The task's name, if this node knows it.
    pub task: String,
    pub ip: Ipv4Addr,
    /// `active`, or `draining` (takes no new connections).
    pub state: EndpointState,
    /// New connections and UDP flows handed to it since it was programmed.
    pub connections: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbServiceInfo {
    pub service: String,
    pub vip: Ipv4Addr,
    pub vni: u32,
    /// Why the last change of this VIP could not be programmed (the kernel still holds
    /// the set before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub backends: Vec<LbBackendInfo>,
}

/// `lb ls`: this node's load balancer, read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbTable {
    /// None if the load balancer could not start on this node.
    pub backend: Option<LbKind>,
    /// Why there is no load balancer, or what is wrong with it.
    pub warning: Option<String>,
    pub services: Vec<LbServiceInfo>,
    /// This node's published ports (the routing mesh), read back from the kernel.
    #[serde(default)]
    pub ports: Vec<LbPortInfo>,
    /// Why the routing mesh is not (fully) working on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports_warning: Option<String>,
    /// How clients from outside enter the mesh here.
    pub mesh_entry: MeshEntryKind,
}

/// Which backend programs a node's VIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbKind {
    Ebpf,
    Nftables,
}

impl std::fmt::Display for LbKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LbKind::Ebpf => "ebpf",
            LbKind::Nftables => "nftables",
        })
    }
}

/// How clients from outside enter the routing mesh on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshEntryKind {
    /// The eBPF program on the underlay interface; replies go straight from the task's node
    /// (ADR 0015).
    Ebpf,
    /// The node's nftables table; replies go back through the entry node (ADR 0011).
    Nftables,
}

impl std::fmt::Display for MeshEntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MeshEntryKind::Ebpf => "ebpf (direct return)",
            MeshEntryKind::Nftables => "nftables (return through the entry node)",
        })
    }
}

/// One published port as this node answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbPortInfo {
    pub service: String,
    pub published: u16,
    pub protocol: swarmnet_types::Protocol,
    /// `ingress` (every task of the service) or `host` (this node's tasks only).
    pub mode: swarmnet_types::PublishMode,
    pub backends: Vec<LbPortBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbPortBackend {
    pub task: String,
    pub ip: Ipv4Addr,
    pub target: u16,
    /// `active` (in the kernel's rotation) or `draining` (takes no new connections).
    pub state: EndpointState,
    /// New connections and UDP flows handed to it since it was programmed.
    pub connections: u64,
}

/// `*:8080->80/tcp` (ingress: every node), `:8080->80/tcp (host)`, as `service ls` shows a
/// published port.
pub fn format_port(p: &Port) -> String {
    match p.mode {
        swarmnet_types::PublishMode::Ingress => format!("*:{}->{}/{}", p.published, p.target, p.protocol),
        swarmnet_types::PublishMode::Host => format!(":{}->{}/{} (host)", p.published, p.target, p.protocol),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmnet_types::Protocol;

    #[test]
    fn run_results_decode_to_the_right_variant() {
        let t = TaskInfo {
            id: "t".into(),
            name: "probe".into(),
            node: "n1".into(),
            node_id: Some("a".into()),
            desired_state: DesiredState::Running,
            state: TaskState::Running,
            error: String::new(),
            addresses: BTreeMap::new(),
            pid: Some(7),
            restarts: 0,
            version: 0,
            orphaned: false,
            service_id: None,
            slot: None,
            since_ms: 0,
        };
        let done = RunResult::Finished { id: "t".into(), exit_code: 3, output: "hi\n".into(), task: t.clone() };
        let back: RunResult = serde_json::from_value(serde_json::to_value(&done).expect("encode")).expect("decode");
        assert_eq!(back, done);
        let det = RunResult::Detached(t);
        let back: RunResult = serde_json::from_value(serde_json::to_value(&det).expect("encode")).expect("decode");
        assert_eq!(back, det);
    }

    #[test]
    fn ports_print_like_docker() {
        assert_eq!(format_port(&Port { published: 8080, target: 80, protocol: Protocol::Udp, mode: Default::default() }), "*:8080->80/udp");
        assert_eq!(format_port(&Port { published: 8080, target: 80, protocol: Protocol::Tcp, mode: swarmnet_types::PublishMode::Host }), ":8080->80/tcp (host)");
    }
}
