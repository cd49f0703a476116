//! Containers of other runtimes on swarmnet's networks (issue 22): what the CNI plugin asks
//! the node's daemon, what the daemon asks the manager, and what they answer. The CNI
//! protocol itself (environment, stdin, result and error JSON) is the plugin's
//! (`control/src/cni.rs`); these are swarmnet's own messages.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use swarmnet_types::Id;

use crate::messages::Attachment;

/// Agent to manager: container `container_id`'s interface `ifname` on this node joins
/// `network` (an attachable network's name or id) as `name`. The manager records it as a
/// task of the node (Docker's network attachment task) and gives it an address. Asked again
/// for the same container, interface and network, it answers with the same attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerAttach {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub name: String,
}

/// The manager's answer to [`ContainerAttach`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerAttached {
    pub task_id: Id,
    pub name: String,
    pub attachment: Attachment,
}

/// Agent to manager: the attachment of this node's container `container_id` (interface
/// `ifname`) to `network` is over; its address is free again. Done also when there is none.
/// With `task_id`, only that task goes (a detach retried late must not take a newer
/// attachment of the same container).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDetach {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<Id>,
}

/// The manager's answer to [`ContainerDetach`]: the task it removed, if there was one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDetached {
    pub task_id: Option<Id>,
}

/// The CNI plugin to its node's daemon: one container's interface on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    /// The network's name or id (the conf's `network`, else its `name`).
    pub network: String,
    /// The conf's `name` (what GC names the attachments by).
    #[serde(default)]
    pub conf_name: String,
    pub container_id: String,
    /// `CNI_NETNS`: a path to the container's network namespace (None for a DEL whose
    /// runtime no longer has one).
    pub netns: Option<String>,
    pub ifname: String,
    /// Its name in the cluster's DNS (the runtime's name for it, else the container id).
    pub name: String,
}

/// How a container is attached: what the plugin turns into the CNI result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttached {
    pub task_id: Id,
    pub name: String,
    pub network: String,
    pub ifname: String,
    pub mac: String,
    pub mtu: u32,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// The node end of the container's link to its node (the way in for its node's own
    /// connections and host ports), and the container's end.
    pub host_link: String,
    pub host_link_mac: String,
    pub container_link: String,
    pub container_link_mac: String,
    /// The node end of `ifname`'s veth, in the node's namespace (a port of the network's
    /// node-side bridge): the host interface the plugins chained after look for.
    #[serde(default)]
    pub host_if: String,
    #[serde(default)]
    pub host_if_mac: String,
    /// The container's routes: the network's subnet on `ifname` (its gateway), everything else
    /// through its node.
    pub routes: Vec<CniRoute>,
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRoute {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

/// CNI GC: every attachment made through conf `conf_name` on this node that is not in
/// `valid` (container id, interface) goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniGc {
    pub conf_name: String,
    pub valid: Vec<(String, String)>,
}

/// What a DEL or GC removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRemoved {
    pub removed: Vec<Id>,
}
