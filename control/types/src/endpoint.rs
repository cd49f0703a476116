//! One task's presence on one network, as its node publishes it by gossip, and a change of
//! the endpoint table.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{NetworkId, TaskId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (6, 17), as the kernel's tables use it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a published port answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every node, spread over all the service's tasks (the routing mesh).
    #[default]
    Ingress,
    /// Only on nodes that run a task, straight to that node's task.
    Host,
}

impl fmt::Display for PublishMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        })
    }
}

/// A published port of a service: `published` on every node (ingress) or on the task's node
/// (host), `target` in the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Port {
    pub published: u16,
    pub target: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: PublishMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    Active,
    /// Takes no new connections and leaves DNS answers, but still exists.
    Draining,
}

/// What every consumer (overlay, load balancer, DNS) needs to know of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network: NetworkId,
    /// Endpoint id (the task id).
    pub id: TaskId,
    pub task_name: String,
    pub service_name: String,
    pub service_id: String,
    pub aliases: Vec<String>,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The owner node's VTEP (its underlay address).
    pub vtep: IpAddr,
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<Port>,
    pub state: EndpointState,
}

/// One endpoint appearing (`old` None), changing, or going away (`new` None). The endpoint
/// is shared: the gossip table and every sink that keeps it hold the same copy (issue 23:
/// four copies per endpoint were most of an agent's memory at 10,000 services).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub network: NetworkId,
    pub id: TaskId,
    pub old: Option<Arc<Endpoint>>,
    pub new: Option<Arc<Endpoint>>,
}

/// MAC address of a task interface: `02:42:` + the four bytes of its IPv4 address.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// Id of a node's own endpoint on the ingress network: its port into the routing mesh
/// (published ports enter there, and replies go back to it).
pub fn ingress_node_endpoint_id(node: &str) -> TaskId {
    format!("ingress-node-{node}")
}

pub fn is_ingress_node_endpoint(id: &str) -> bool {
    id.starts_with("ingress-node-")
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_derived_from_ip() {
        assert_eq!(format_mac(mac_for(Ipv4Addr::new(10, 0, 1, 7))), "02:42:0a:00:01:07");
    }

    #[test]
    fn protocol_numbers_and_names() {
        assert_eq!((Protocol::Tcp.number(), Protocol::Udp.number()), (6, 17));
        assert_eq!(Protocol::Udp.to_string(), "udp");
    }
}
