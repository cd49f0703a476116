//! Address management: overlay subnets out of the default pool, gateways, task addresses
//! and VIPs. Pure functions over the cluster state; no I/O.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};

use crate::model::{ClusterState, Id};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("subnet {0}: host bits are set (did you mean {1}?)")]
    HostBitsSet(Ipv4Network, Ipv4Network),
    #[error("subnet {0}: prefix /{1} is too small for an overlay network (at most /30)")]
    TooSmall(Ipv4Network, u8),
    #[error("subnet {subnet} overlaps {what} {other}")]
    Overlap { subnet: Ipv4Network, what: String, other: IpNetwork },
    #[error("address pool {pool} has no free /{prefix} left")]
    PoolExhausted { pool: Ipv4Network, prefix: u8 },
    #[error("network {network} ({subnet}) has no free address left")]
    NetworkExhausted { network: String, subnet: Ipv4Network },
    #[error("network {network} ({subnet}) has no free address left for service {service}: {need} needed, {free} free")]
    NotEnough { network: String, subnet: Ipv4Network, service: String, need: u64, free: u64 },
}

/// A range that an overlay subnet must not overlap, with a word saying whose it is.
#[derive(Clone, Debug)]
pub struct Taken {
    pub range: IpNetwork,
    pub what: String,
}

fn overlaps(a: Ipv4Network, b: IpNetwork) -> bool {
    match b {
        IpNetwork::V4(b) => a.contains(b.network()) || b.contains(a.network()),
        IpNetwork::V6(_) => false,
    }
}

/// Everything an overlay subnet must avoid: other networks' subnets and every node's
/// underlay prefixes.
pub fn taken_ranges(state: &ClusterState) -> Vec<Taken> {
    let mut out: Vec<Taken> = state.networks.values().map(|n| Taken { range: IpNetwork::V4(n.subnet), what: format!("network {}", n.name) }).collect();
    for node in state.nodes.values() {
        for r in &node.underlay {
            out.push(Taken { range: *r, what: format!("the underlay of node {}", node.hostname) });
        }
    }
    out
}

/// Checks a user-given subnet: canonical, not too small, overlapping nothing taken.
pub fn check_subnet(subnet: Ipv4Network, taken: &[Taken]) -> Result<(), IpamError> {
    let canonical = Ipv4Network::new(subnet.network(), subnet.prefix()).map_err(|_| IpamError::TooSmall(subnet, subnet.prefix()))?;
    if canonical.ip() != subnet.ip() {
        return Err(IpamError::HostBitsSet(subnet, canonical));
    }
    if subnet.prefix() > 30 {
        return Err(IpamError::TooSmall(subnet, subnet.prefix()));
    }
    for t in taken {
        if overlaps(subnet, t.range) {
            return Err(IpamError::Overlap { subnet, what: t.what.clone(), other: t.range });
        }
    }
    Ok(())
}

/// The first /`prefix` inside `pool` that overlaps nothing taken.
pub fn pick_subnet(pool: Ipv4Network, prefix: u8, taken: &[Taken]) -> Result<Ipv4Network, IpamError> {
    let exhausted = IpamError::PoolExhausted { pool, prefix };
    if prefix < pool.prefix() || prefix > 30 {
        return Err(exhausted);
    }
    let step: u64 = 1u64 << (32 - u32::from(prefix));
    let start = u64::from(u32::from(pool.network()));
    let end = start + (1u64 << (32 - u32::from(pool.prefix())));
    let mut base = start;
    while base < end {
        let addr = Ipv4Addr::from(u32::try_from(base).map_err(|_| exhausted.clone())?);
        let candidate = Ipv4Network::new(addr, prefix).map_err(|_| exhausted.clone())?;
        if !taken.iter().any(|t| overlaps(candidate, t.range)) {
            return Ok(candidate);
        }
        base += step;
    }
    Err(exhausted)
}

/// The gateway of a subnet: its first host address.
pub fn gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

/// Addresses of `network` in use: the gateway, service VIPs and every task's address.
pub fn used_addresses(state: &ClusterState, network: &Id) -> BTreeSet<Ipv4Addr> {
    let mut used = BTreeSet::new();
    if let Some(n) = state.networks.get(network) {
        used.insert(n.gateway);
    }
    for s in state.services.values() {
        if let Some(vip) = s.vips.get(network) {
            used.insert(*vip);
        }
    }
    for t in state.tasks.values() {
        if let Some(a) = t.addresses.get(network) {
            used.insert(*a);
        }
    }
    if state.networks.get(network).is_some_and(|n| n.ingress) {
        used.extend(state.nodes.values().filter_map(|n| n.ingress_ip));
    }
    used
}

/// The lowest free host address of the network.
pub fn allocate(state: &ClusterState, network: &Id) -> Result<Ipv4Addr, IpamError> {
    let Some(net) = state.networks.get(network) else {
        return Err(IpamError::NetworkExhausted { network: network.clone(), subnet: Ipv4Network::from(Ipv4Addr::UNSPECIFIED) });
    };
    let used = used_addresses(state, network);
    let first = u32::from(net.subnet.network()).saturating_add(1);
    let last = u32::from(net.subnet.broadcast()).saturating_sub(1);
    (first..=last).map(Ipv4Addr::from).find(|a| !used.contains(a)).ok_or_else(|| IpamError::NetworkExhausted { network: net.name.clone(), subnet: net.subnet })
}

/// How many host addresses of the network are still free.
pub fn free_count(state: &ClusterState, network: &Id) -> u64 {
    let Some(net) = state.networks.get(network) else {
        return 0;
    };
    let hosts = u64::from(net.subnet.size()).saturating_sub(2);
    hosts.saturating_sub(used_addresses(state, network).len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Network;

    fn net(id: &str, cidr: &str) -> Network {
        let subnet: Ipv4Network = cidr.parse().expect("cidr");
        Network { id: id.into(), name: id.into(), driver: swarmnet_types::Driver::Overlay, attachable: false, subnet, gateway: gateway(subnet), vni: 4096, ingress: false }
    }

    #[test]
    fn picks_first_free_24_and_skips_taken() {
        let pool: Ipv4Network = "10.0.0.0/8".parse().expect("pool");
        let taken = vec![Taken { range: "10.0.0.0/24".parse().expect("r"), what: "network a".into() }, Taken { range: "10.0.1.0/16".parse().expect("r"), what: "underlay".into() }];
        // 10.0.1.0/16 covers 10.0.0.0 - 10.0.255.255.
        assert_eq!(pick_subnet(pool, 24, &taken), Ok("10.1.0.0/24".parse().expect("n")));
    }

    #[test]
    fn pool_exhaustion_is_an_error() {
        let pool: Ipv4Network = "10.9.0.0/23".parse().expect("pool");
        let taken = vec![Taken { range: "10.9.0.0/24".parse().expect("r"), what: "x".into() }, Taken { range: "10.9.1.0/24".parse().expect("r"), what: "y".into() }];
        assert!(matches!(pick_subnet(pool, 24, &taken), Err(IpamError::PoolExhausted { .. })));
    }

    #[test]
    fn check_subnet_rejects_host_bits_small_and_overlap() {
        let taken = vec![Taken { range: "10.210.0.0/24".parse().expect("r"), what: "the underlay of node n1".into() }];
        assert!(matches!(check_subnet("10.1.2.5/24".parse().expect("s"), &taken), Err(IpamError::HostBitsSet(..))));
        assert!(matches!(check_subnet("10.1.2.0/31".parse().expect("s"), &taken), Err(IpamError::TooSmall(..))));
        let e = check_subnet("10.210.0.0/16".parse().expect("s"), &taken).expect_err("overlap");
        assert!(e.to_string().contains("underlay of node n1"), "{e}");
        assert_eq!(check_subnet("10.1.2.0/30".parse().expect("s"), &taken), Ok(()));
    }

    #[test]
    fn allocation_skips_gateway_and_used_and_exhausts() {
        let mut st = ClusterState::default();
        st.networks.insert("n".into(), net("n", "10.5.0.0/30"));
        // /30: hosts .1 (gateway) and .2.
        assert_eq!(free_count(&st, &"n".to_string()), 1);
        let a = allocate(&st, &"n".to_string()).expect("one address");
        assert_eq!(a, Ipv4Addr::new(10, 5, 0, 2));
        let mut svc = crate::model::Service {
            id: "s".into(),
            name: "s".into(),
            mode: crate::model::ServiceMode::Replicated { replicas: 0 },
            networks: vec!["n".into()],
            endpoint_mode: crate::model::EndpointMode::Vip,
            ports: vec![],
            command: vec![],
            vips: Default::default(),
            aliases: Default::default(),
            constraints: vec![],
            labels: Default::default(),
            env: Default::default(),
            version: 0,
            update: Default::default(),
            update_status: None,
        };
        svc.vips.insert("n".into(), a);
        st.services.insert("s".into(), svc);
        let e = allocate(&st, &"n".to_string()).expect_err("full");
        assert_eq!(e.to_string(), "network n (10.5.0.0/30) has no free address left");
        assert_eq!(free_count(&st, &"n".to_string()), 0);
    }
}
