//! An overlay network as the manager defines it and hands it to agents.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::NetworkId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: NetworkId,
    pub name: String,
    pub driver: String,
    pub attachable: bool,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// The cluster's own ingress network (the routing mesh crosses nodes over it).
    #[serde(default)]
    pub ingress: bool,
}
