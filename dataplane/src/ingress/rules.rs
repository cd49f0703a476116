//! The routing mesh's kernel state as typed nftables transactions (`crate::nft`, ADR 0021),
//! from the ingress network's endpoints: pure, so it is tested without root.
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
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use swarmnet_types::{is_ingress_node_endpoint, mac_for, Endpoint, EndpointState, Protocol, PublishMode};

use crate::nft::{self, eq, fib_type, field, meta, BinaryOperation, Expression, FibFlag, MetaKey, NfChainType, NfFamily, NfHook, NfListObject, Operator, SetItem, SetType, Statement, Tx};

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

/// A backend's chain (its counter is what `lb ls` reads, by this name).
fn backend_chain(p: &Published, b: &Backend) -> String {
    let o = b.ip.octets();
    format!("b_{}_{}_{}_{}_{}_{}_{}", p.protocol, p.port, o[0], o[1], o[2], o[3], b.port)
}

const FAM: NfFamily = NfFamily::IP;

fn st(x: impl Into<String>) -> Expression<'static> {
    nft::s(x)
}

/// `meta l4proto . th PORTFIELD`.
fn proto_port(port_field: &str) -> Expression<'static> {
    nft::concat(vec![meta(MetaKey::L4proto), field("th", port_field)])
}

fn ct_state(state: &str) -> Statement<'static> {
    nft::m(nft::ct("state"), Operator::IN, st(state))
}

fn rule(chain: &str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    nft::rule(FAM, TABLE, chain, expr)
}

/// The node's table, whole, as one transaction (made or replaced atomically). `me` is the
/// node's ingress address, `subnet` the ingress network's. `vteps`: every node's underlay
/// address (a task's direct reply to a client that entered by a node's eBPF entry has one
/// as its source, ADR 0015).
pub fn node_table(published: &[Published], me: Ipv4Addr, subnet: Ipv4Network, vxlan_port: u16, vteps: &[Ipv4Addr]) -> Tx {
    let mut tx = Tx::new();
    tx.replace_table(FAM, TABLE);
    let key = |p: &Published| nft::concat(vec![st(p.protocol.as_str()), nft::n(u32::from(p.port))]);
    tx.add(nft::named_set(FAM, TABLE, "ports", &[SetType::InetProto, SetType::InetService], published.iter().map(key).collect()));
    // Chains exist before anything jumps to them (a JSON transaction is taken in order).
    for p in published {
        tx.add(nft::chain(FAM, TABLE, &chain_name(p)));
        for b in p.backends.iter().filter(|b| b.active) {
            tx.add(nft::chain(FAM, TABLE, &backend_chain(p, b)));
        }
    }
    tx.verdict_map(FAM, TABLE, "published", &["inet_proto", "inet_service"], published.iter().map(|p| (key(p), chain_name(p))).collect());
    tx.add(nft::named_set(FAM, TABLE, "vteps", &[SetType::Ipv4Addr], vteps.iter().map(|v| st(v.to_string())).collect()));
    // A task's direct reply (ADR 0015) starts its connection's life here in the reply
    // direction: connection tracking would call it invalid. It is routed to the client as
    // it is. (A reply to this node itself is one to a connection it tracks: a task's
    // connection to another node's published port, masqueraded on its way out.)
    tx.add(nft::base_chain(FAM, TABLE, "direct", NfChainType::Filter, NfHook::Prerouting, -300));
    tx.add(rule(
        "direct",
        vec![
            eq(meta(MetaKey::Iifname), st(NODE_IF)),
            eq(field("ip", "saddr"), st("@vteps")),
            eq(proto_port("sport"), st("@ports")),
            nft::m(fib_type(FibFlag::Daddr), Operator::NEQ, st("local")),
            Statement::Notrack,
        ],
    ));
    // VXLAN packets (of every overlay) need no connection tracking, which this table's
    // rules would otherwise turn on for them: the inner packets are tracked where it counts.
    for (name, hook) in [("vxlan_in", NfHook::Prerouting), ("vxlan_out", NfHook::Output)] {
        tx.add(nft::base_chain(FAM, TABLE, name, NfChainType::Filter, hook, -300));
        tx.add(rule(name, vec![eq(field("udp", "dport"), nft::n(u32::from(vxlan_port))), Statement::Notrack]));
    }
    // Packets conntrack calls invalid (out of window, stray) never reach the node's own
    // stack, whose reset would kill a good connection (k8s #74839); nor are they forwarded.
    tx.add(nft::base_chain(FAM, TABLE, "guard", NfChainType::Filter, NfHook::Prerouting, -150));
    tx.add(rule("guard", vec![ct_state("invalid"), eq(fib_type(FibFlag::Daddr), st("local")), eq(proto_port("dport"), st("@ports")), Statement::Drop(None)]));
    for (name, hook) in [("pre", NfHook::Prerouting), ("out", NfHook::Output)] {
        tx.add(nft::base_chain(FAM, TABLE, name, NfChainType::NAT, hook, -100));
        tx.add(rule(name, vec![eq(fib_type(FibFlag::Daddr), st("local")), Statement::VerdictMap(nft::VerdictMap { key: proto_port("dport"), data: st("@published") })]));
    }
    let dnat_status = || nft::m(nft::ct("status"), Operator::IN, st("dnat"));
    tx.add(nft::base_chain(FAM, TABLE, "post", NfChainType::NAT, NfHook::Postrouting, 100));
    tx.add(rule("post", vec![eq(meta(MetaKey::Oifname), st(NODE_IF)), dnat_status(), eq(fib_type(FibFlag::Saddr), st("local")), nft::snat_fully_random(me.to_string())]));
    tx.add(rule("post", vec![eq(meta(MetaKey::Oifname), st(NODE_IF)), eq(meta(MetaKey::Iifname), st(NODE_IF)), dnat_status(), nft::snat_fully_random(me.to_string())]));
    let net = Expression::Named(nft::NamedExpression::Prefix(nft::Prefix { addr: Box::new(st(subnet.network().to_string())), len: u32::from(subnet.prefix()) }));
    tx.add(rule("post", vec![eq(meta(MetaKey::Iifname), st(NODE_IF)), nft::m(meta(MetaKey::Oifname), Operator::NEQ, st(NODE_IF)), eq(field("ip", "saddr"), net), nft::masquerade_fully_random()]));
    tx.add(nft::base_chain(FAM, TABLE, "through", NfChainType::Filter, NfHook::Forward, 0));
    tx.add(rule("through", vec![eq(meta(MetaKey::Iifname), st(NODE_IF)), ct_state("invalid"), Statement::Drop(None)]));
    tx.add(rule("through", vec![eq(meta(MetaKey::Oifname), st(NODE_IF)), ct_state("invalid"), Statement::Drop(None)]));
    for p in published {
        let active: Vec<&Backend> = p.backends.iter().filter(|b| b.active).collect();
        let c = chain_name(p);
        if active.is_empty() {
            // Nothing to take it: refused at once, as a closed port.
            let refuse = match p.protocol {
                Protocol::Tcp => nft::reject_tcp_reset(),
                Protocol::Udp => Statement::Reject(None),
            };
            tx.add(rule(&c, vec![refuse]));
        } else {
            let arms = active.iter().enumerate().map(|(i, b)| SetItem::Mapping(nft::n(u32::try_from(i).unwrap_or(u32::MAX)), nft::goto(&backend_chain(p, b)))).collect();
            tx.add(rule(&c, vec![Statement::VerdictMap(nft::VerdictMap { key: nft::numgen_inc(u32::try_from(active.len()).unwrap_or(u32::MAX)), data: nft::set(arms) })]));
        }
        for b in &active {
            let bc = backend_chain(p, b);
            tx.add(rule(&bc, vec![eq(meta(MetaKey::L4proto), st(p.protocol.as_str())), nft::counter(), nft::dnat(b.ip.to_string(), Some(b.port))]));
        }
    }
    tx
}

/// Removes the node's table (no ingress network any more).
pub fn node_table_delete() -> Tx {
    let mut tx = Tx::new();
    tx.remove_table(FAM, TABLE);
    tx
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
pub fn task_tables(ifname: &str, entries: &[Ipv4Addr], own: &DirectReturn) -> Tx {
    let mut tx = Tx::new();
    tx.replace_table(FAM, TABLE);
    tx.add(nft::base_chain(FAM, TABLE, "pre", NfChainType::Filter, NfHook::Prerouting, -150));
    let mac_prefix = Expression::BinaryOperation(Box::new(BinaryOperation::AND(field("ether", "saddr"), st("ff:ff:00:00:00:00"))));
    let from_ll = Expression::Named(nft::NamedExpression::Payload(nft::Payload::PayloadRaw(nft::PayloadRaw { base: nft::PayloadBase::LL, offset: 64, len: 32 })));
    tx.add(rule(
        "pre",
        vec![
            eq(meta(MetaKey::Iifname), st(ifname)),
            ct_state("new"),
            eq(fib_type(FibFlag::Daddr), st("local")),
            eq(mac_prefix, st("02:42:00:00:00:00")),
            Statement::Mangle(nft::Mangle { key: nft::ct("mark"), value: from_ll }),
        ],
    ));
    if let (Some(ip), false) = (own.ip, own.ports.is_empty()) {
        tx.add(nft::base_chain(FAM, TABLE, "direct", NfChainType::NAT, NfHook::Prerouting, -100));
        for (proto, published, target) in &own.ports {
            tx.add(rule(
                "direct",
                vec![
                    eq(meta(MetaKey::Iifname), st(ifname)),
                    nft::m(fib_type(FibFlag::Daddr), Operator::NEQ, st("local")),
                    eq(field(proto.as_str(), "dport"), nft::n(u32::from(*published))),
                    nft::dnat(ip.to_string(), Some(*target)),
                ],
            ));
        }
    }
    // A filter chain, not a route one: the mark only picks the MAC at egress, and a route
    // chain would look the route up again for every packet whose mark it sets.
    tx.add(nft::base_chain(FAM, TABLE, "out", NfChainType::Filter, NfHook::Output, -150));
    tx.add(rule("out", vec![nft::m(nft::ct("mark"), Operator::NEQ, nft::n(0)), Statement::Mangle(nft::Mangle { key: meta(MetaKey::Mark), value: nft::ct("mark") })]));
    tx.replace_table(NfFamily::NetDev, TABLE);
    let elems: Vec<Expression<'static>> = entries.iter().map(|ip| Expression::List(vec![nft::n(entry_mark(*ip)), st(swarmnet_types::format_mac(mac_for(*ip)))])).collect();
    tx.add(NfListObject::Map(Box::new(nft::Map {
        family: NfFamily::NetDev,
        table: TABLE.into(),
        name: "entry".into(),
        set_type: nft::SetTypeValue::Single(SetType::Mark),
        map: nft::SetTypeValue::Single(SetType::EtherAddr),
        elem: (!elems.is_empty()).then(|| elems.into()),
        ..Default::default()
    })));
    tx.add(NfListObject::Chain(nft::Chain {
        family: NfFamily::NetDev,
        table: TABLE.into(),
        name: "eg".into(),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Egress),
        prio: Some(0),
        dev: Some(ifname.to_string().into()),
        policy: Some(nft::NfChainPolicy::Accept),
        ..Default::default()
    }));
    let to_entry = Expression::Named(nft::NamedExpression::Map(Box::new(nftables::expr::Map { key: meta(MetaKey::Mark), data: st("@entry") })));
    tx.add(nft::rule(NfFamily::NetDev, TABLE, "eg", vec![nft::m(meta(MetaKey::Mark), Operator::NEQ, nft::n(0)), Statement::Mangle(nft::Mangle { key: field("ether", "daddr"), value: to_entry })]));
    tx
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

/// What the node's table (read back) counted for each backend of `published`, by the chain
/// names the plan gives.
pub fn counts(objs: &[NfListObject<'_>], published: &[Published]) -> Vec<BackendCount> {
    let packets = nft::chain_packets(objs);
    let mut out = Vec::new();
    for p in published {
        for b in p.backends.iter().filter(|b| b.active) {
            if let Some(n) = packets.get(&backend_chain(p, b)) {
                out.push(BackendCount { protocol: p.protocol, port: p.port, ip: b.ip, target: b.port, connections: *n });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::summary as cmds;
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
        let (c, json) = cmds(&node_table(&p, "10.255.255.9".parse().expect("me"), "10.255.255.0/24".parse().expect("net"), 4789, &node_vteps(&eps)));
        assert_eq!(&c[..3], &["add table swarmnet-ingress", "delete table swarmnet-ingress", "add table swarmnet-ingress"], "replaced whole");
        assert!(json.contains(r#""elem":[{"concat":["tcp",8080]},{"concat":["tcp",9100]},{"concat":["udp",53]}]"#), "{json}");
        assert!(json.contains(r#""elem":["10.210.0.2"]"#), "{json}");
        // Every chain comes before whatever jumps to it (nft takes the transaction in order).
        let first = |what: &str| c.iter().position(|x| x == what).unwrap_or(usize::MAX);
        assert!(first("add chain p_tcp_8080") < first("add map published") && first("add chain b_tcp_8080_10_255_255_3_80") < first("add rule p_tcp_8080"), "{c:?}");
        // The direct return's sources skip connection tracking; so does VXLAN.
        assert!(json.contains(r#"{"match":{"left":{"concat":[{"meta":{"key":"l4proto"}},{"payload":{"field":"sport","protocol":"th"}}]},"op":"==","right":"@ports"}},{"match":{"left":{"fib":{"flags":["daddr"],"result":"type"}},"op":"!=","right":"local"}},{"notrack":null}"#), "{json}");
        assert!(json.contains(r#""right":4789}},{"notrack":null}"#), "{json}");
        let want = entry_ports(&p);
        let keys: Vec<(u32, u32, usize)> = want.iter().map(|(k, v)| (k.proto, k.port, v.len())).collect();
        // Host mode is not the entry's; the draining task takes no new flow.
        assert_eq!(keys, vec![(6, 8080, 1), (17, 53, 1)]);
        // The draining task takes no new connection; the active one takes them all.
        assert!(json.contains(r#""chain":"p_tcp_8080","expr":[{"vmap":{"data":{"set":[[0,{"goto":{"target":"b_tcp_8080_10_255_255_3_80"}}]]},"key":{"numgen":{"mod":1,"mode":"inc"}}}}]"#), "{json}");
        assert!(!json.contains("b_tcp_8080_10_255_255_4_80"), "{json}");
        assert!(json.contains(r#"{"counter":null},{"dnat":{"addr":"10.255.255.6","port":91}}"#), "{json}");
        assert!(json.contains(r#"{"snat":{"addr":"10.255.255.9","flags":["fully-random"]}}"#), "{json}");
        assert!(json.contains(r#""right":{"prefix":{"addr":"10.255.255.0","len":24}}}},{"masquerade":{"flags":["fully-random"]}}"#), "{json}");
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
        let (_, json) = cmds(&node_table(&p, "10.255.255.9".parse().expect("me"), "10.255.255.0/24".parse().expect("net"), 4789, &[]));
        assert!(
            json.contains(r#""chain":"p_tcp_8080","expr":[{"reject":{"type":"tcp reset"}}]"#) || json.contains(r#""chain":"p_tcp_8080","expr":[{"reject":{"type":"tcp reset","expr":null}}]"#),
            "{json}"
        );
        // A port without an active task stays with the entry, with none to pick.
        assert_eq!(entry_ports(&p).values().map(|v| v.len()).collect::<Vec<_>>(), vec![0, 0]);
        assert!(json.contains(r#""chain":"p_udp_5000","expr":[{"reject":null}]"#), "{json}");
        assert!(cmds(&node_table_delete()).0 == vec!["add table swarmnet-ingress", "delete table swarmnet-ingress"]);
    }

    #[test]
    fn task_tables_mark_the_entry_and_send_replies_back_to_it() {
        let me = ep("a", "web", "10.255.255.3", "10.210.0.1", &[(8080, 80, Protocol::Tcp, ING), (53, 5353, Protocol::Udp, ING), (9000, 90, Protocol::Tcp, HOST)], EndpointState::Active);
        let own = direct_return(&me);
        let (c, t) = cmds(&task_tables("eth1", &["10.255.255.2".parse().expect("ip"), "10.255.255.10".parse().expect("ip")], &own));
        assert!(t.contains(r#"{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":8080}},{"dnat":{"addr":"10.255.255.3","port":80}}"#), "{t}");
        assert!(t.contains(r#"{"match":{"left":{"payload":{"field":"dport","protocol":"udp"}},"op":"==","right":53}},{"dnat":{"addr":"10.255.255.3","port":5353}}"#), "{t}");
        assert!(!t.contains("9000"), "host mode has no direct return: {t}");
        assert!(t.contains(r#"{"match":{"left":{"&":[{"payload":{"field":"saddr","protocol":"ether"}},"ff:ff:00:00:00:00"]},"op":"==","right":"02:42:00:00:00:00"}},{"mangle":{"key":{"ct":{"key":"mark"}},"value":{"payload":{"base":"ll","len":32,"offset":64}}}}"#), "{t}");
        let (a, b) = (entry_mark("10.255.255.2".parse().expect("ip")), entry_mark("10.255.255.10".parse().expect("ip")));
        assert!(t.contains(&format!(r#""elem":[[{a},"02:42:0a:ff:ff:02"],[{b},"02:42:0a:ff:ff:0a"]]"#)), "{t}");
        assert!(t.contains(r#""dev":"eth1","family":"netdev","hook":"egress""#), "{t}");
        assert!(c.contains(&"add table swarmnet-ingress".to_string()));
        let (c, t) = cmds(&task_tables("eth1", &[], &DirectReturn::default()));
        assert!(!t.contains("elem") && !c.contains(&"add chain direct".to_string()), "{t}");
    }

    #[test]
    fn bound_ports_are_read_from_proc() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2\n";
        let udp = "   sl  local_address rem_address   st\n  1: 00000000:0035 00000000:0000 07 00000000:00000000\n";
        assert_eq!(bound_ports(tcp, udp), vec![(Protocol::Tcp, 8080), (Protocol::Udp, 53)]);
        assert!(bound_ports("", "").is_empty());
    }

    #[test]
    fn counts_are_read_from_the_planned_backends_chains() {
        let json = br#"{"nftables":[{"metainfo":{}},{"rule":{"family":"ip","table":"swarmnet-ingress","chain":"b_tcp_8080_10_255_255_3_80","handle":9,"expr":[{"counter":{"packets":7,"bytes":420}},{"dnat":{"addr":"10.255.255.3","port":80}}]}},{"rule":{"family":"ip","table":"swarmnet-ingress","chain":"b_tcp_8080_9_9_9_9_80","handle":10,"expr":[{"counter":{"packets":3,"bytes":1}}]}}]}"#;
        let objs = nft::parse_objects(json).expect("parse");
        let me = "10.210.0.1";
        let p = plan(&[ep("a", "web", "10.255.255.3", me, &[(8080, 80, Protocol::Tcp, ING)], EndpointState::Active)], me.parse().expect("me"));
        let c = counts(&objs, &p);
        assert_eq!(
            c,
            vec![BackendCount { protocol: Protocol::Tcp, port: 8080, ip: "10.255.255.3".parse().expect("ip"), target: 80, connections: 7 }],
            "only what the plan names; no name is read as data"
        );
        let mut counts = c.clone();
        let ip = u32::from_ne_bytes([10, 255, 255, 3]);
        let handed = BTreeMap::from([(swarmnet_ebpf_common::IngHandKey { proto: 6, port: 8080, ip }, 5u64), (swarmnet_ebpf_common::IngHandKey { proto: 6, port: 9999, ip }, 1u64)]);
        add_entry_counts(&mut counts, &p, &handed);
        assert_eq!(counts[0].connections, 12);
        assert_eq!(counts.len(), 1, "a port not published is not counted");
    }
}
