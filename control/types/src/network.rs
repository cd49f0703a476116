//! An overlay network as the manager defines it and hands it to agents.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::NetworkId;

/// A network's driver: only `overlay` (VXLAN across nodes) is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    #[default]
    Overlay,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Overlay => "overlay",
        }
    }
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Driver {
    type Err = String;

    fn from_str(s: &str) -> Result<Driver, String> {
        match s {
            "overlay" => Ok(Driver::Overlay),
            other => Err(format!("driver {other:?} is not supported (only overlay)")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: NetworkId,
    pub name: String,
    pub driver: Driver,
    pub attachable: bool,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// The cluster's own ingress network (the routing mesh crosses nodes over it).
    #[serde(default)]
    pub ingress: bool,
}
