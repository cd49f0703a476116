//! The routing mesh's kernel state as text, from the ingress network's endpoints: pure, so
//! it is tested without root.
//!
//! - the node's table (`ip swarmnet-ingress` in the node's namespace): a published port
//!   (TCP or UDP, to any of the node's addresses, from outside or from the node itself) is
//!   DNATed round robin (`numgen inc`, exact per node) to one of the service's active
//!   tasks on the ingress network, on any node (ingress mode) or on this one (host mode).
//!   The client's address is kept: no source NAT for traffic that enters from outside.
//!   Only what starts on the node itself (`curl localhost:8080`) or comes back in from a
//!   task (a task to a node's published port, a task to the underlay) is source-NATed, to
//!   the node's own ingress address (`fully-random`).
//! - a task's tables (`ip` and `netdev swarmnet-ingress` in its namespace): a connection
//!   that came in on its ingress interface is marked with the entry node (its ingress
//!   address, read from the source MAC, which is `02:42` + that address), and every reply
//!   of it leaves with that node's MAC as destination: it goes back through the entry node,
//!   whose connection tracking undoes the DNAT.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use swarmnet_types::{is_ingress_node_endpoint, mac_for, Endpoint, EndpointState, Protocol, PublishMode};

pub const TABLE: &str = "swarmnet-ingress";
/// The node's port into the ingress network (node namespace side).
pub const NODE_IF: &str = "sning0";
/// Its peer, on the ingress sandbox's bridge.
pub const NODE_PEER_IF: &str = "sningp";

/// One task behind a published port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub task: String,
    pub local: bool,
    pub active: bool,
    /// Its node's underlay address.
    pub vtep: IpAddr,
}

/// One published port as this node answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub port: u16,
    pub protocol: Protocol,
    pub mode: PublishMode,
    pub service: String,
    /// Sorted; only active ones take new connections.
    pub backends: Vec<Backend>,
}

/// The published ports this node answers, from the ingress network's endpoints: ingress
/// mode over every task, host mode over this node's (a host-mode port without a task here
/// is not answered here at all). A port that two services claim (a change in flight) goes
/// to the first by service name.
pub fn plan(endpoints: &[Endpoint], local_vtep: IpAddr) -> Vec<Published> {
    let mut out: BTreeMap<(Protocol, u16), Published> = BTreeMap::new();
    let mut sorted: Vec<&Endpoint> = endpoints.iter().filter(|e| !is_ingress_node_endpoint(&e.id)).collect();
    sorted.sort_by(|a, b| (&a.service_name, &a.id).cmp(&(&b.service_name, &b.id)));
    for e in sorted {
        let local = e.vtep == local_vtep;
        for p in &e.ports {
            if p.mode == PublishMode::Host && !local {
                continue;
            }
            let entry =
                out.entry((p.protocol, p.published)).or_insert_with(|| Published { port: p.published, protocol: p.protocol, mode: p.mode, service: e.service_name.clone(), backends: Vec::new() });
            if entry.service != e.service_name {
                continue;
            }
            entry.backends.push(Backend { ip: e.ip, port: p.target, task: e.task_name.clone(), local, active: e.state == EndpointState::Active, vtep: e.vtep });
        }
    }
    let mut v: Vec<Published> = out.into_values().collect();
    for p in &mut v {
        p.backends.sort();
        p.backends.dedup();
    }
    v
}

/// The ingress addresses of every node on the ingress network (the entry points a reply
/// may have to go back to).
pub fn entry_nodes(endpoints: &[Endpoint]) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = endpoints.iter().filter(|e| is_ingress_node_endpoint(&e.id)).map(|e| e.ip).collect();
    v.sort();
    v.dedup();
    v
}

fn chain_name(p: &Published) -> String {
    format!("p_{}_{}", p.protocol, p.port)
}

/// A backend's chain: its name says what it is (read back by `lb ls`).
fn backend_chain(p: &Published, b: &Backend) -> String {
    let o = b.ip.octets();
    format!("b_{}_{}_{}_{}_{}_{}_{}", p.protocol, p.port, o[0], o[1], o[2], o[3], b.port)
}

/// Parses a backend chain's name: (protocol, published port, task address, target port).
pub fn parse_backend_chain(name: &str) -> Option<(Protocol, u16, Ipv4Addr, u16)> {
    let parts: Vec<&str> = name.strip_prefix("b_")?.split('_').collect();
    let [proto, port, a, b, c, d, target] = parts.as_slice() else { return None };
    let proto = match *proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let ip = Ipv4Addr::new(a.parse().ok()?, b.parse().ok()?, c.parse().ok()?, d.parse().ok()?);
    Some((proto, port.parse().ok()?, ip, target.parse().ok()?))
}

/// The node's table, whole, as one `nft -f` transaction (made or replaced atomically).
/// `me` is the node's ingress address, `subnet` the ingress network's.
/// `vteps`: every node's underlay address (a task's direct reply to a client that entered by
/// a node's eBPF entry has one as its source, ADR 0015).
pub fn node_table(published: &[Published], me: Ipv4Addr, subnet: Ipv4Network, vxlan_port: u16, vteps: &[Ipv4Addr]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{");
    let answered: Vec<&Published> = published.iter().collect();
    let elems = |f: &dyn Fn(&Published) -> String| answered.iter().map(|p| f(p)).collect::<Vec<_>>().join(", ");
    let _ = writeln!(s, "  set ports {{\n    type inet_proto . inet_service");
    if !answered.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", elems(&|p| format!("{} . {}", p.protocol, p.port)));
    }
    let _ = writeln!(s, "  }}\n  map published {{\n    type inet_proto . inet_service : verdict");
    if !answered.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", elems(&|p| format!("{} . {} : goto {}", p.protocol, p.port, chain_name(p))));
    }
    let _ = writeln!(s, "  }}\n  set vteps {{\n    type ipv4_addr");
    if !vteps.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", vteps.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "));
    }
    let _ = writeln!(s, "  }}");
    // A task's direct reply (ADR 0015) starts its connection's life here in the reply
    // direction: connection tracking would call it invalid. It is routed to the client as
    // it is. (A reply to this node itself is one to a connection it tracks: a task's
    // connection to another node's published port, masqueraded on its way out.)
    let _ = writeln!(
        s,
        "  chain direct {{\n    type filter hook prerouting priority raw; policy accept;\n    iifname \"{NODE_IF}\" ip saddr @vteps meta l4proto . th sport @ports fib daddr type != local notrack\n  }}"
    );
    // VXLAN packets (of every overlay) need no connection tracking, which this table's
    // rules would otherwise turn on for them: the inner packets are tracked where it counts.
    for (name, hook) in [("vxlan_in", "prerouting"), ("vxlan_out", "output")] {
        let _ = writeln!(s, "  chain {name} {{\n    type filter hook {hook} priority raw; policy accept;\n    udp dport {vxlan_port} notrack\n  }}");
    }
    // Packets conntrack calls invalid (out of window, stray) never reach the node's own
    // stack, whose reset would kill a good connection (k8s #74839); nor are they forwarded.
    let _ = writeln!(s, "  chain guard {{\n    type filter hook prerouting priority -150; policy accept;\n    ct state invalid fib daddr type local meta l4proto . th dport @ports drop\n  }}");
    for (name, hook) in [("pre", "prerouting"), ("out", "output")] {
        let _ = writeln!(s, "  chain {name} {{\n    type nat hook {hook} priority -100; policy accept;\n    fib daddr type local meta l4proto . th dport vmap @published\n  }}");
    }
    let _ = writeln!(
        s,
        "  chain post {{\n    type nat hook postrouting priority 100; policy accept;\n    oifname \"{NODE_IF}\" ct status dnat fib saddr type local snat to {me} fully-random\n    oifname \"{NODE_IF}\" iifname \"{NODE_IF}\" ct status dnat snat to {me} fully-random\n    iifname \"{NODE_IF}\" oifname != \"{NODE_IF}\" ip saddr {subnet} masquerade fully-random\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain through {{\n    type filter hook forward priority filter; policy accept;\n    iifname \"{NODE_IF}\" ct state invalid drop\n    oifname \"{NODE_IF}\" ct state invalid drop\n  }}"
    );
    for p in &answered {
        let active: Vec<&Backend> = p.backends.iter().filter(|b| b.active).collect();
        let _ = writeln!(s, "  chain {} {{", chain_name(p));
        if active.is_empty() {
            // Nothing to take it: refused at once, as a closed port.
            let verdict = match p.protocol {
                Protocol::Tcp => "reject with tcp reset",
                Protocol::Udp => "reject",
            };
            let _ = writeln!(s, "    {verdict}");
        } else {
            let arms: Vec<String> = active.iter().enumerate().map(|(i, b)| format!("{i} : goto {}", backend_chain(p, b))).collect();
            let _ = writeln!(s, "    numgen inc mod {} vmap {{ {} }}", active.len(), arms.join(", "));
        }
        let _ = writeln!(s, "  }}");
        for b in &active {
            let _ = writeln!(s, "  chain {} {{\n    meta l4proto {} counter dnat to {}:{}\n  }}", backend_chain(p, b), p.protocol, b.ip, b.port);
        }
    }
    let _ = writeln!(s, "}}");
    s
}

/// Removes the node's table (no ingress network any more).
pub fn node_table_delete() -> String {
    format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
}

/// The mark a connection from entry node `ip` gets: the four bytes of the address copied
/// from the source MAC into the mark as they are, so read in this machine's byte order.
pub fn entry_mark(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// What a task DNATs to itself: the client's packets that a node's eBPF entry sent it
/// unchanged (still to that node's address and published port, ADR 0015).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectReturn {
    /// The task's ingress address.
    pub ip: Option<Ipv4Addr>,
    /// (protocol, published port, target port) of its ingress-mode ports.
    pub ports: Vec<(Protocol, u16, u16)>,
}

/// A task's direct-return rules, from its own endpoint on the ingress network.
pub fn direct_return(e: &Endpoint) -> DirectReturn {
    let mut ports: Vec<(Protocol, u16, u16)> = e.ports.iter().filter(|p| p.mode == PublishMode::Ingress).map(|p| (p.protocol, p.published, p.target)).collect();
    ports.sort();
    ports.dedup();
    DirectReturn { ip: Some(e.ip), ports }
}

/// Every node's underlay address (IPv4), from the nodes' ingress endpoints.
pub fn node_vteps(endpoints: &[Endpoint]) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = endpoints
        .iter()
        .filter(|e| is_ingress_node_endpoint(&e.id))
        .filter_map(|e| match e.vtep {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// What the eBPF entry takes: each ingress-mode port → its active tasks (address, node's
/// underlay address), in order. A port with none stays (its established flows go on; new
/// ones go to the table, which refuses). A task on an IPv6 underlay is not the entry's.
pub fn entry_ports(published: &[Published]) -> BTreeMap<swarmnet_ebpf_common::IngPortKey, Vec<(Ipv4Addr, Ipv4Addr)>> {
    published
        .iter()
        .filter(|p| p.mode == PublishMode::Ingress)
        .map(|p| {
            let proto = match p.protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
            };
            (
                swarmnet_ebpf_common::IngPortKey { proto, port: u32::from(p.port) },
                p.backends
                    .iter()
                    .filter(|b| b.active)
                    .filter_map(|b| match b.vtep {
                        IpAddr::V4(v) => Some((b.ip, v)),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
            )
        })
        .collect()
}

/// Adds the flows the eBPF entry handed out (per protocol, port, task address) to the
/// table's counts.
pub fn add_entry_counts(counts: &mut Vec<BackendCount>, published: &[Published], handed: &BTreeMap<swarmnet_ebpf_common::IngHandKey, u64>) {
    for (k, n) in handed {
        let protocol = if k.proto == 6 { Protocol::Tcp } else { Protocol::Udp };
        let ip = Ipv4Addr::from(k.ip.to_ne_bytes());
        let Ok(port) = u16::try_from(k.port) else { continue };
        let Some(target) = published.iter().find(|p| p.protocol == protocol && p.port == port).and_then(|p| p.backends.iter().find(|b| b.ip == ip)).map(|b| b.port) else { continue };
        match counts.iter_mut().find(|c| c.protocol == protocol && c.port == port && c.ip == ip && c.target == target) {
            Some(c) => c.connections += n,
            None => counts.push(BackendCount { protocol, port, ip, target, connections: *n }),
        }
    }
}

/// A task's tables: the entry node of each incoming connection is remembered (conntrack
/// mark = its ingress address, from the `02:42:<address>` source MAC), and replies leave
/// `ifname` towards that node's MAC. `entries` are the nodes' ingress addresses. A client's
/// packet sent unchanged by a node's eBPF entry (to that node's address, not the task's) is
/// DNATed to the task by `own`, not marked: its reply leaves by the task's own node, with
/// the address the client asked for as its source.
pub fn task_tables(ifname: &str, entries: &[Ipv4Addr], own: &DirectReturn) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{");
    let _ = writeln!(
        s,
        "  chain pre {{\n    type filter hook prerouting priority mangle; policy accept;\n    iifname \"{ifname}\" ct state new fib daddr type local ether saddr & ff:ff:00:00:00:00 == 02:42:00:00:00:00 ct mark set @ll,64,32\n  }}"
    );
    if let (Some(ip), false) = (own.ip, own.ports.is_empty()) {
        let _ = writeln!(s, "  chain direct {{\n    type nat hook prerouting priority dstnat; policy accept;");
        for (proto, published, target) in &own.ports {
            let _ = writeln!(s, "    iifname \"{ifname}\" fib daddr type != local {proto} dport {published} dnat to {ip}:{target}");
        }
        let _ = writeln!(s, "  }}");
    }
    // A filter chain, not a route one: the mark only picks the MAC at egress, and a route
    // chain would look the route up again for every packet whose mark it sets.
    let _ = writeln!(s, "  chain out {{\n    type filter hook output priority mangle; policy accept;\n    ct mark != 0 meta mark set ct mark\n  }}\n}}");
    let _ = writeln!(s, "table netdev {TABLE} {{}}\ndelete table netdev {TABLE}\ntable netdev {TABLE} {{");
    let _ = writeln!(s, "  map entry {{\n    type mark : ether_addr");
    if !entries.is_empty() {
        let elems: Vec<String> = entries.iter().map(|ip| format!("0x{:08x} : {}", entry_mark(*ip), swarmnet_types::format_mac(mac_for(*ip)))).collect();
        let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain eg {{\n    type filter hook egress device \"{ifname}\" priority filter; policy accept;\n    meta mark != 0 ether daddr set meta mark map @entry\n  }}\n}}");
    s
}

/// Ports bound on the node, from `/proc/net/tcp` (listening sockets) and `/proc/net/udp`
/// (bound ones) as text; IPv6 files parse the same way.
pub fn bound_ports(tcp: &str, udp: &str) -> Vec<(Protocol, u16)> {
    let mut out = Vec::new();
    for (proto, text, state) in [(Protocol::Tcp, tcp, "0A"), (Protocol::Udp, udp, "07")] {
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(st)) = (f.get(1), f.get(3)) else { continue };
            if *st != state {
                continue;
            }
            if let Some(port) = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) {
                out.push((proto, port));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// One backend as read back from the node's table: connections handed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCount {
    pub protocol: Protocol,
    pub port: u16,
    pub ip: Ipv4Addr,
    pub target: u16,
    pub connections: u64,
}

/// Reads `nft -j list table ip swarmnet-ingress`: the counter of every backend chain.
pub fn parse_counts(json: &[u8]) -> Result<Vec<BackendCount>, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("nft -j output: {e}"))?;
    let items = v.get("nftables").and_then(|n| n.as_array()).ok_or("nft -j output: no nftables array")?;
    let mut out = Vec::new();
    for it in items {
        let Some(rule) = it.get("rule") else { continue };
        let Some(chain) = rule.get("chain").and_then(|c| c.as_str()) else { continue };
        let Some((protocol, port, ip, target)) = parse_backend_chain(chain) else { continue };
        let packets = rule.get("expr").and_then(|e| e.as_array()).and_then(|e| e.iter().find_map(|x| x.get("counter").and_then(|c| c.get("packets")).and_then(|p| p.as_u64()))).unwrap_or(0);
        out.push(BackendCount { protocol, port, ip, target, connections: packets });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmnet_types::Port;

    fn ep(id: &str, svc: &str, ip: &str, vtep: &str, ports: &[(u16, u16, Protocol, PublishMode)], state: EndpointState) -> Endpoint {
        let ip: Ipv4Addr = ip.parse().expect("ip");
        Endpoint {
            network: "ing".into(),
            id: id.into(),
            task_name: format!("{svc}.{id}"),
            service_name: svc.into(),
            service_id: format!("s-{svc}"),
            aliases: vec![],
            ip,
            mac: mac_for(ip),
            vtep: vtep.parse().expect("vtep"),
            vip: None,
            ports: ports.iter().map(|&(published, target, protocol, mode)| Port { published, target, protocol, mode }).collect(),
            state,
        }
    }

    const ING: PublishMode = PublishMode::Ingress;
    const HOST: PublishMode = PublishMode::Host;

    #[test]
    fn ingress_ports_take_every_task_host_ports_only_local_ones() {
        let me = "10.210.0.1";
        let eps = vec![
            ep("a", "web", "10.255.255.3", me, &[(8080, 80, Protocol::Tcp, ING), (53, 53, Protocol::Udp, ING)], EndpointState::Active),
            ep("b", "web", "10.255.255.4", "10.210.0.2", &[(8080, 80, Protocol::Tcp, ING), (53, 53, Protocol::Udp, ING)], EndpointState::Draining),
            ep("c", "hw", "10.255.255.5", "10.210.0.2", &[(9000, 90, Protocol::Tcp, HOST)], EndpointState::Active),
            ep("d", "hl", "10.255.255.6", me, &[(9100, 91, Protocol::Tcp, HOST)], EndpointState::Active),
            ep("ingress-node-n2", "", "10.255.255.2", "10.210.0.2", &[], EndpointState::Active),
        ];
        let p = plan(&eps, me.parse().expect("me"));
        let keys: Vec<(Protocol, u16, usize)> = p.iter().map(|p| (p.protocol, p.port, p.backends.len())).collect();
        assert_eq!(keys, vec![(Protocol::Tcp, 8080, 2), (Protocol::Tcp, 9100, 1), (Protocol::Udp, 53, 2)]);
        assert!(p[0].backends.iter().any(|b| !b.active), "the draining task is listed");
        assert_eq!(entry_nodes(&eps), vec!["10.255.255.2".parse::<Ipv4Addr>().expect("ip")]);
        let text = node_table(&p, "10.255.255.9".parse().expect("me"), "10.255.255.0/24".parse().expect("net"), 4789, &node_vteps(&eps));
        assert!(text.contains("elements = { tcp . 8080, tcp . 9100, udp . 53 }"), "{text}");
        assert!(text.contains("elements = { 10.210.0.2 }"), "{text}");
        assert!(text.contains("iifname \"sning0\" ip saddr @vteps meta l4proto . th sport @ports fib daddr type != local notrack"), "{text}");
        let want = entry_ports(&p);
        let keys: Vec<(u32, u32, usize)> = want.iter().map(|(k, v)| (k.proto, k.port, v.len())).collect();
        // Host mode is not the entry's; the draining task takes no new flow.
        assert_eq!(keys, vec![(6, 8080, 1), (17, 53, 1)]);
        assert!(text.contains("udp dport 4789 notrack"), "{text}");
        // The draining task takes no new connection; the active one takes them all.
        assert!(text.contains("chain p_tcp_8080 {\n    numgen inc mod 1 vmap { 0 : goto b_tcp_8080_10_255_255_3_80 }"), "{text}");
        assert!(!text.contains("b_tcp_8080_10_255_255_4_80"), "{text}");
        assert!(text.contains("counter dnat to 10.255.255.6:91"), "{text}");
        assert!(text.contains("snat to 10.255.255.9 fully-random"), "{text}");
        assert!(text.contains("ip saddr 10.255.255.0/24 masquerade fully-random"), "{text}");
        assert_eq!(parse_backend_chain("b_udp_53_10_255_255_3_5353"), Some((Protocol::Udp, 53, "10.255.255.3".parse().expect("ip"), 5353)));
        assert_eq!(parse_backend_chain("b_sctp_53_1_2_3_4_5"), None);
        assert_eq!(parse_backend_chain("p_tcp_80"), None);
    }

    #[test]
    fn a_port_with_no_active_task_refuses_and_a_claimed_port_keeps_its_owner() {
        let me = "10.210.0.1";
        let eps = vec![
            ep("a", "api", "10.255.255.3", me, &[(8080, 80, Protocol::Tcp, ING), (5000, 50, Protocol::Udp, ING)], EndpointState::Draining),
            ep("b", "web", "10.255.255.4", me, &[(8080, 81, Protocol::Tcp, ING)], EndpointState::Active),
        ];
        let p = plan(&eps, me.parse().expect("me"));
        assert_eq!(p[0].service, "api");
        assert_eq!(p[0].backends.len(), 1);
        let text = node_table(&p, "10.255.255.9".parse().expect("me"), "10.255.255.0/24".parse().expect("net"), 4789, &[]);
        assert!(text.contains("chain p_tcp_8080 {\n    reject with tcp reset"), "{text}");
        // A port without an active task stays with the entry, with none to pick.
        assert_eq!(entry_ports(&p).values().map(|v| v.len()).collect::<Vec<_>>(), vec![0, 0]);
        assert!(text.contains("chain p_udp_5000 {\n    reject\n"), "{text}");
    }

    #[test]
    fn task_tables_mark_the_entry_and_send_replies_back_to_it() {
        let me = ep("a", "web", "10.255.255.3", "10.210.0.1", &[(8080, 80, Protocol::Tcp, ING), (53, 5353, Protocol::Udp, ING), (9000, 90, Protocol::Tcp, HOST)], EndpointState::Active);
        let own = direct_return(&me);
        let t = task_tables("eth1", &["10.255.255.2".parse().expect("ip"), "10.255.255.10".parse().expect("ip")], &own);
        assert!(t.contains("iifname \"eth1\" fib daddr type != local tcp dport 8080 dnat to 10.255.255.3:80"), "{t}");
        assert!(t.contains("iifname \"eth1\" fib daddr type != local udp dport 53 dnat to 10.255.255.3:5353"), "{t}");
        assert!(!t.contains("dport 9000"), "host mode has no direct return: {t}");
        assert!(t.contains("iifname \"eth1\" ct state new fib daddr type local ether saddr & ff:ff:00:00:00:00 == 02:42:00:00:00:00 ct mark set @ll,64,32"), "{t}");
        let (a, b) = (entry_mark("10.255.255.2".parse().expect("ip")), entry_mark("10.255.255.10".parse().expect("ip")));
        assert!(t.contains(&format!("elements = {{ 0x{a:08x} : 02:42:0a:ff:ff:02, 0x{b:08x} : 02:42:0a:ff:ff:0a }}")), "{t}");
        assert!(t.contains("type filter hook egress device \"eth1\""), "{t}");
        assert!(!task_tables("eth1", &[], &DirectReturn::default()).contains("elements"));
        assert!(!task_tables("eth1", &[], &DirectReturn::default()).contains("chain direct"));
    }

    #[test]
    fn bound_ports_are_read_from_proc() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2\n";
        let udp = "   sl  local_address rem_address   st\n  1: 00000000:0035 00000000:0000 07 00000000:00000000\n";
        assert_eq!(bound_ports(tcp, udp), vec![(Protocol::Tcp, 8080), (Protocol::Udp, 53)]);
        assert!(bound_ports("", "").is_empty());
    }

    #[test]
    fn counts_are_read_from_backend_chains() {
        let json = br#"{"nftables":[{"metainfo":{}},{"rule":{"family":"ip","table":"swarmnet-ingress","chain":"b_tcp_8080_10_255_255_3_80","handle":9,"expr":[{"counter":{"packets":7,"bytes":420}},{"dnat":{"addr":"10.255.255.3","port":80}}]}},{"rule":{"chain":"pre","expr":[]}}]}"#;
        let c = parse_counts(json).expect("parse");
        assert_eq!(c, vec![BackendCount { protocol: Protocol::Tcp, port: 8080, ip: "10.255.255.3".parse().expect("ip"), target: 80, connections: 7 }]);
        assert!(parse_counts(b"garbage").is_err());
        let me = "10.210.0.1";
        let p = plan(&[ep("a", "web", "10.255.255.3", me, &[(8080, 80, Protocol::Tcp, ING)], EndpointState::Active)], me.parse().expect("me"));
        let mut counts = c.clone();
        let ip = u32::from_ne_bytes([10, 255, 255, 3]);
        let handed = BTreeMap::from([(swarmnet_ebpf_common::IngHandKey { proto: 6, port: 8080, ip }, 5u64), (swarmnet_ebpf_common::IngHandKey { proto: 6, port: 9999, ip }, 1u64)]);
        add_entry_counts(&mut counts, &p, &handed);
        assert_eq!(counts[0].connections, 12);
        assert_eq!(counts.len(), 1, "a port not published is not counted");
    }
}
