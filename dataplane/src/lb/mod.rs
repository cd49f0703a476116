//! The service-VIP load balancer (issue 9, ADR 0009): `VIP:port` of a service, asked by a
//! task on one of the service's networks, reaches one of the service's active tasks; new
//! connections and new UDP flows go round-robin; a draining task takes no new ones.
//!
//! - [`sink`]: the load balancer's sink of the endpoint stream: endpoints with a VIP → one
//!   backend set per VIP, handed to a [`LbBackend`] (pure bookkeeping, tested without root);
//! - [`ebpf`]: the eBPF backend (cgroup sock_addr programs from `ebpf/`, translated at
//!   `connect()`/`sendmsg()`, so no packet is rewritten), with pinned maps and links that
//!   outlive the agent;
//! - [`host`]: the node's cgroup (its tasks run in it; the programs are attached to it) and
//!   its bpffs folder.

pub mod ebpf;
pub mod host;
pub mod nft;
pub mod sink;

use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use swarmnet_types::{NetworkId, SinkError, TaskId};

pub use sink::LbSink;

/// Whether a backend takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    /// Takes no new connections; its established ones go on.
    Draining,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendLb {
    pub task: TaskId,
    pub ip: Ipv4Addr,
    pub state: BackendState,
}

/// What the kernel must hold for one VIP: made visible in one step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLb {
    pub vip: Ipv4Addr,
    pub network: NetworkId,
    /// The network's VNI: the gate (only its tasks' sockets are translated).
    pub vni: u32,
    pub service: String,
    /// Sorted by task id.
    pub backends: Vec<BackendLb>,
}

/// Which backend programs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ebpf,
    Nftables,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Ebpf => "ebpf",
            Kind::Nftables => "nftables",
        })
    }
}

/// One backend of one VIP as read back from the kernel (`swarmnet lb ls`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    pub ip: Ipv4Addr,
    pub state: BackendState,
    /// New connections and UDP flows handed to it since it was programmed.
    pub connections: u64,
}

/// One VIP as read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    pub vip: Ipv4Addr,
    pub vni: u32,
    pub backends: Vec<BackendRow>,
}

/// A backend of the load balancer: holds one backend set per VIP, and which task network
/// namespaces are on which network.
#[async_trait::async_trait]
pub trait LbBackend: Send + Sync {
    fn kind(&self) -> Kind;

    /// Makes each of `svcs` its VIP's backend set, each in one step visible to new
    /// connections; one result per service, in order (a batch costs one hand-off).
    async fn set(&self, svcs: &[ServiceLb]) -> Vec<Result<(), SinkError>>;

    /// Removes the VIPs: new connections to them are no longer translated. One result per
    /// VIP, in order.
    async fn remove(&self, vips: &[Ipv4Addr]) -> Vec<Result<(), SinkError>>;

    /// Every VIP the kernel holds now, with its backends (after a restart, what an earlier
    /// agent left).
    async fn read(&self) -> Result<Vec<ServiceRow>, SinkError>;

    /// The task's network namespace is on these networks (their VNIs): VIPs of those
    /// networks are translated for its sockets.
    async fn add_task(&self, task: &TaskId, netns: &File, vnis: &[u32]) -> Result<(), SinkError>;

    /// The task is gone (or leaving): its namespace is translated for no network any more.
    /// `netns`, if the namespace still exists, finds it when this agent did not add it.
    async fn remove_task(&self, task: &TaskId, netns: Option<&File>, vnis: &[u32]) -> Result<(), SinkError>;
}

pub use ebpf::{EbpfError, EbpfLb};
pub use host::Host;
pub use nft::NftLb;
pub use sink::{Names, VipInfo, VniOf};
