//! The one place that speaks rtnetlink. A `Netlink` is bound to the network namespace of
//! the thread that opened it (see `netns::NsCtx::netlink_in`); nothing else in swarmnet
//! builds netlink messages.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
#[error("netlink: {op}: {source}")]
pub struct NetlinkError {
    pub op: String,
    #[source]
    pub source: rtnetlink::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("netlink: open socket: {0}")]
    Open(#[source] std::io::Error),
    #[error("link {0} not found")]
    NoLink(String),
    #[error("{0} exists already")]
    Exists(String),
}

fn ctx(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let op = op.into();
    move |source| Error::Netlink(NetlinkError { op, source })
}

/// errno of a netlink error reply, positive.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

pub fn fmt_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Vec<u8>,
    /// Its link group.
    pub group: u32,
    /// The index of its bridge, if it is a bridge port.
    pub master: Option<u32>,
}

fn link_info(m: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo { index: m.header.index, name: String::new(), mtu: 0, mac: Vec::new(), group: 0, master: None };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Group(g) => info.group = *g,
            LinkAttribute::Controller(i) => info.master = Some(*i),
            LinkAttribute::Mtu(v) => info.mtu = *v,
            LinkAttribute::Address(mac) => info.mac = mac.clone(),
            _ => {}
        }
    }
    info
}

/// One end of a veth pair to make: its name, its namespace (a descriptor; None: the
/// socket's), MTU, MAC and link group.
#[derive(Clone, Copy, Debug, Default)]
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub netns: Option<RawFd>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub group: Option<u32>,
    /// The index of the bridge it is born a port of (in its namespace).
    pub master: Option<u32>,
}

/// One IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteV4 {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// The output link's index.
    pub oif: u32,
}

/// A handle on one namespace's rtnetlink socket.
pub struct Netlink {
    h: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace. The returned future drives
    /// the socket and must be spawned on a runtime.
    pub fn open() -> Result<(Netlink, impl std::future::Future<Output = ()> + Send), Error> {
        let (conn, h, _) = rtnetlink::new_connection().map_err(Error::Open)?;
        Ok((Netlink { h }, conn))
    }

    pub async fn links(&self) -> Result<Vec<LinkInfo>, Error> {
        let msgs: Vec<LinkMessage> = self.h.link().get().execute().try_collect().await.map_err(ctx("list links"))?;
        Ok(msgs.iter().map(link_info).collect())
    }

    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>, Error> {
        let mut s = self.h.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(link_info(&m))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(ctx(format!("get link {name}"))(e)),
        }
    }

    async fn index(&self, name: &str) -> Result<u32, Error> {
        self.link(name).await?.map(|l| l.index).ok_or_else(|| Error::NoLink(name.to_string()))
    }

    pub async fn create_veth(&self, name: &str, peer: &str) -> Result<(), Error> {
        self.h.link().add(LinkVeth::new(name, peer).build()).execute().await.map_err(ctx(format!("create veth {name} peer {peer}")))
    }

    /// Makes a veth pair whose two ends are born where they belong (a namespace each, None:
    /// this socket's), named, with their MTU, MAC and link group: no move between namespaces
    /// afterwards (each costs an RCU grace period, about 15 ms here). `end` is up; `peer` is
    /// not (the kernel refuses a peer made up: ENOTCONN), its namespace's socket sets it up.
    pub async fn create_veth_pair(&self, end: &VethEnd<'_>, peer: &VethEnd<'_>) -> Result<(), Error> {
        use netlink_packet_route::link::{InfoData, InfoVeth};
        let side = |mut b: rtnetlink::LinkMessageBuilder<LinkUnspec>, e: &VethEnd<'_>| {
            if let Some(fd) = e.netns {
                b = b.setns_by_fd(fd);
            }
            if let Some(m) = e.mtu {
                b = b.mtu(m);
            }
            if let Some(mac) = e.mac {
                b = b.address(mac.to_vec());
            }
            if let Some(g) = e.group {
                b = b.link_group(g);
            }
            if let Some(m) = e.master {
                b = b.controller(m);
            }
            b
        };
        let peer_msg = side(LinkUnspec::new_with_name(peer.name), peer).build();
        let mut b = LinkVeth::new(end.name, peer.name).set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)));
        if let Some(fd) = end.netns {
            b = b.setns_by_fd(fd);
        }
        if let Some(m) = end.mtu {
            b = b.mtu(m);
        }
        if let Some(g) = end.group {
            b = b.link_group(g);
        }
        if let Some(m) = end.master {
            b = b.controller(m);
        }
        self.h.link().add(b.up().build()).execute().await.map_err(ctx(format!("create veth {} peer {}", end.name, peer.name)))
    }

    /// Deletes every link of link group `group` in this socket's namespace at once (one RCU
    /// grace period for all of them).
    pub async fn delete_group(&self, group: u32) -> Result<(), Error> {
        let mut req = self.h.link().del(0);
        req.message_mut().attributes.push(LinkAttribute::Group(group));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(ctx(format!("delete the links of group {group}"))(e)),
        }
    }

    /// Takes the links of link group `group` out of the way without deleting them (what
    /// costs an RCU barrier): each down (its routes go), then renamed `snr<index>` (its name
    /// is free again). They keep their group, for [`Netlink::delete_group`] later.
    pub async fn retire_group(&self, group: u32) -> Result<(), Error> {
        for l in self.links().await?.into_iter().filter(|l| l.group == group && !l.name.starts_with("snr")) {
            self.h.link().set(LinkUnspec::new_with_index(l.index).down().build()).execute().await.map_err(ctx(format!("set link {} down", l.name)))?;
            let to = format!("snr{}", l.index);
            self.h.link().set(LinkUnspec::new_with_index(l.index).name(to.clone()).build()).execute().await.map_err(ctx(format!("rename link {} to {to}", l.name)))?;
        }
        Ok(())
    }

    /// Moves a link into the namespace of `netns_fd`.
    pub async fn move_to_netns(&self, name: &str, netns_fd: RawFd) -> Result<(), Error> {
        let idx = self.index(name).await?;
        self.h.link().set(LinkUnspec::new_with_index(idx).setns_by_fd(netns_fd).build()).execute().await.map_err(ctx(format!("move link {name} to another namespace")))
    }

    /// Renames, sets MAC and MTU (each if given) while the link is down, then brings it up.
    pub async fn configure_link(&self, name: &str, rename: Option<&str>, mac: Option<[u8; 6]>, mtu: Option<u32>) -> Result<(), Error> {
        let idx = self.index(name).await?;
        let mut b = LinkUnspec::new_with_index(idx);
        if let Some(n) = rename {
            b = b.name(n.to_string());
        }
        if let Some(m) = mac {
            b = b.address(m.to_vec());
        }
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        self.h.link().set(b.build()).execute().await.map_err(ctx(format!("configure link {name}")))?;
        self.h.link().set(LinkUnspec::new_with_index(idx).up().build()).execute().await.map_err(ctx(format!("set link {} up", rename.unwrap_or(name))))
    }

    pub async fn add_address(&self, link: &str, addr: IpAddr, prefix: u8) -> Result<(), Error> {
        let idx = self.index(link).await?;
        self.h.address().add(idx, addr, prefix).replace().execute().await.map_err(ctx(format!("add address {addr}/{prefix} on {link}")))
    }

    pub async fn add_default_route_v4(&self, link: &str, gateway: Ipv4Addr) -> Result<(), Error> {
        let idx = self.index(link).await?;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(idx).build();
        self.h.route().add(msg).replace().execute().await.map_err(ctx(format!("add default route via {gateway} dev {link}")))
    }

    /// A route to `dst/prefix` out of `link`: through `gateway`, or on the link itself
    /// (scope link) without one. Replaces one to the same destination.
    pub async fn add_route_v4(&self, link: &str, dst: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>) -> Result<(), Error> {
        let idx = self.index(link).await?;
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, prefix).output_interface(idx);
        b = match gateway {
            Some(g) => b.gateway(g),
            None => b.scope(netlink_packet_route::route::RouteScope::Link),
        };
        self.h.route().add(b.build()).replace().execute().await.map_err(ctx(format!("add route {dst}/{prefix} dev {link}")))
    }

    /// Deletes the route to `dst/prefix` of the main table; `Ok(false)` if there was none.
    pub async fn del_route_v4(&self, dst: Ipv4Addr, prefix: u8) -> Result<bool, Error> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, prefix).build();
        match self.h.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(ctx(format!("delete route {dst}/{prefix}"))(e)),
        }
    }

    /// The IPv4 routes of the main table.
    pub async fn routes_v4(&self) -> Result<Vec<RouteV4>, Error> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let msgs: Vec<_> = self.h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute().try_collect().await.map_err(ctx("list routes"))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.table != 254 {
                continue;
            }
            let mut r = RouteV4 { dst: Ipv4Addr::UNSPECIFIED, prefix: m.header.destination_prefix_length, gateway: None, oif: 0 };
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => r.dst = *ip,
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.gateway = Some(*ip),
                    RouteAttribute::Oif(i) => r.oif = *i,
                    _ => {}
                }
            }
            out.push(r);
        }
        Ok(out)
    }

    pub async fn create_bridge(&self, name: &str) -> Result<(), Error> {
        self.h.link().add(LinkBridge::new(name).build()).execute().await.map_err(ctx(format!("create bridge {name}")))
    }

    /// A VXLAN device for `vni` on UDP `port`, sourced from `local`; no learning (entries are
    /// programmed), ARP answered from the neighbour table (proxy), no multicast group.
    pub async fn create_vxlan(&self, name: &str, vni: u32, local: Ipv4Addr, port: u16, mtu: u32) -> Result<(), Error> {
        self.h
            .link()
            .add(LinkVxlan::new(name, vni).port(port).local(local).learning(false).proxy(true).mtu(mtu).build())
            .execute()
            .await
            .map_err(ctx(format!("create vxlan {name} vni {vni} local {local} dstport {port}")))
    }

    /// Plugs `name` into bridge `bridge` and brings it up.
    pub async fn set_master(&self, name: &str, bridge: &str) -> Result<(), Error> {
        let idx = self.index(name).await?;
        let br = self.index(bridge).await?;
        self.h.link().set(LinkUnspec::new_with_index(idx).controller(br).up().build()).execute().await.map_err(ctx(format!("attach {name} to bridge {bridge}")))
    }

    /// A permanent neighbour entry `ip` -> `mac` on `link`.
    pub async fn neigh_add(&self, link: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<(), Error> {
        let idx = self.index(link).await?;
        self.h.neighbours().add(idx, IpAddr::V4(ip)).link_layer_address(&mac).replace().execute().await.map_err(ctx(format!("neighbour {ip} lladdr {} dev {link}", fmt_mac(&mac))))
    }

    pub async fn neigh_del(&self, link: &str, ip: Ipv4Addr) -> Result<(), Error> {
        let idx = self.index(link).await?;
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = idx;
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.h.neighbours().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(ctx(format!("delete neighbour {ip} dev {link}"))(e)),
        }
    }

    /// A VXLAN forwarding entry: frames for `mac` go to the VTEP `dst`.
    pub async fn fdb_add(&self, link: &str, mac: [u8; 6], dst: Ipv4Addr) -> Result<(), Error> {
        let idx = self.index(link).await?;
        self.h.neighbours().add_bridge(idx, &mac).flags(NeighbourFlags::Own).destination(IpAddr::V4(dst)).replace().execute().await.map_err(ctx(format!("fdb {} dst {dst} dev {link}", fmt_mac(&mac))))
    }

    pub async fn fdb_del(&self, link: &str, mac: [u8; 6]) -> Result<(), Error> {
        let idx = self.index(link).await?;
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = idx;
        m.header.flags = NeighbourFlags::Own;
        m.header.state = NeighbourState::Permanent;
        // By MAC alone: the whole entry goes (we keep one destination per MAC).
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        match self.h.neighbours().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(ctx(format!("delete fdb {} dev {link}", fmt_mac(&mac)))(e)),
        }
    }

    /// Permanent IPv4 neighbour entries and FDB entries with a destination on `link`.
    pub async fn neigh_and_fdb(&self, link: &str) -> Result<(Vec<(Ipv4Addr, [u8; 6])>, Vec<([u8; 6], Ipv4Addr)>), Error> {
        let idx = self.index(link).await?;
        let mut neigh = Vec::new();
        let mut fdb = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Bridge] {
            let msgs: Vec<NeighbourMessage> = self.h.neighbours().get().set_address_family(family).execute().try_collect().await.map_err(ctx(format!("list neighbours of {link}")))?;
            for m in msgs.iter().filter(|m| m.header.ifindex == idx) {
                let mut dst = None;
                let mut mac = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                        // In AF_BRIDGE (FDB) messages the destination is not decoded.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                            dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
                        }
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                            let mut b = [0u8; 6];
                            b.copy_from_slice(l);
                            mac = Some(b);
                        }
                        _ => {}
                    }
                }
                match (family, dst, mac) {
                    (AddressFamily::Inet, Some(ip), Some(mac)) if m.header.state == NeighbourState::Permanent => neigh.push((ip, mac)),
                    (AddressFamily::Bridge, Some(ip), Some(mac)) => fdb.push((mac, ip)),
                    _ => {}
                }
            }
        }
        Ok((neigh, fdb))
    }

    /// Deletes a link; `Ok(false)` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool, Error> {
        let Some(l) = self.link(name).await? else { return Ok(false) };
        match self.h.link().del(l.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(ctx(format!("delete link {name}"))(e)),
        }
    }

    /// Every address on every link but loopback, with its prefix, and the link index.
    pub async fn addresses(&self) -> Result<Vec<(u32, IpNetwork)>, Error> {
        let msgs: Vec<_> = self.h.address().get().execute().try_collect().await.map_err(ctx("list addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    if ip.is_loopback() {
                        continue;
                    }
                    if let Ok(n) = IpNetwork::new(*ip, m.header.prefix_len) {
                        out.push((m.header.index, n));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// sock_diag (NETLINK_SOCK_DIAG): closes every UDP socket of the calling thread's network
/// namespace that is connected to `dst` (what a connected UDP socket to a VIP points at after
/// the load balancer translated it). The application sees ECONNABORTED on its next call
/// instead of sending into a task that is gone. Returns how many were closed.
pub fn destroy_udp_connected_to(dst: Ipv4Addr) -> Result<usize, Error> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const SOCK_DESTROY: u16 = 21;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_ERROR: u16 = 2;
    /// inet_diag_sockid: sport, dport, src[4], dst[4], if, cookie[2].
    const SOCKID: usize = 48;
    let open = |e: std::io::Error| Error::Open(e);
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG).map_err(open)?;
    sock.bind_auto().map_err(open)?;
    let kernel = netlink_sys::SocketAddr::new(0, 0);
    // nlmsghdr (16) + inet_diag_req_v2 (family, protocol, ext, pad, states: 8) + sockid (48).
    let request = |kind: u16, flags: u16, seq: u32, sockid: &[u8]| -> Vec<u8> {
        let mut m = Vec::with_capacity(16 + 8 + SOCKID);
        m.extend_from_slice(&((16 + 8 + SOCKID) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_UDP as u8, 0, 0]);
        m.extend_from_slice(&u32::MAX.to_ne_bytes());
        m.extend_from_slice(sockid);
        m
    };
    let sockid_of = |msg: &[u8]| -> Option<[u8; SOCKID]> {
        // inet_diag_msg: family, state, timer, retrans, then the sockid.
        msg.get(4..4 + SOCKID)?.try_into().ok()
    };
    let ctx = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| Error::Open(std::io::Error::new(e.kind(), format!("sock_diag {what}: {e}")))
    };
    sock.send_to(&request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, &[0u8; SOCKID]), &kernel, 0).map_err(ctx("dump"))?;
    let mut victims = Vec::new();
    'dump: loop {
        let (buf, _) = sock.recv_from_full().map_err(ctx("read"))?;
        let mut at = 0;
        while at + 16 <= buf.len() {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > buf.len() {
                break;
            }
            match kind {
                NLMSG_DONE => break 'dump,
                NLMSG_ERROR => return Err(Error::Open(std::io::Error::other("sock_diag dump refused by the kernel"))),
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(id) = sockid_of(&buf[at + 16..at + len]) {
                        // sockid: sport(2) dport(2) src(16) dst(16): dst's first word.
                        if id[20..24] == dst.octets() {
                            victims.push(id);
                        }
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
        if buf.is_empty() {
            break;
        }
    }
    let mut closed = 0;
    for (i, id) in victims.iter().enumerate() {
        let seq = 2 + i as u32;
        sock.send_to(&request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, id), &kernel, 0).map_err(ctx("destroy"))?;
        let (ack, _) = sock.recv_from_full().map_err(ctx("read the ack"))?;
        // nlmsgerr: error code 0 is success; ENOENT: it closed meanwhile.
        let code = ack.get(16..20).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
        if code == 0 {
            closed += 1;
        } else if code != -libc::ENOENT {
            return Err(Error::Open(std::io::Error::from_raw_os_error(-code)));
        }
    }
    Ok(closed)
}

/// Conntrack over netfilter netlink (NETLINK_NETFILTER, ctnetlink; no `conntrack` binary):
/// deletes the UDP flows of the calling thread's network namespace whose original
/// destination is `vip` and whose reply comes from `backend` (a VIP's UDP flows to a task
/// that left: the next datagram is steered again). A dump filtered by the kernel
/// (`CTA_FILTER`, Linux ≥ 5.8), then one delete per flow by its original tuple; a flow
/// gone meanwhile (ENOENT) counts as done. Returns how many were deleted.
pub fn delete_udp_flows(vip: Ipv4Addr, backend: Ipv4Addr) -> Result<usize, Error> {
    use netlink_packet_core::{DefaultNla, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple};
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
    const CTA_TUPLE_ORIG: u16 = 1;
    const CTA_TUPLE_REPLY: u16 = 2;
    const CTA_FILTER: u16 = 25;
    const IPCTNL_MSG_CT_GET: u8 = 1;
    const F_IP_SRC: u32 = 1 << 0;
    const F_IP_DST: u32 = 1 << 1;
    const F_PROTO_NUM: u32 = 1 << 3;
    let io = |what: &'static str| move |e: std::io::Error| Error::Open(std::io::Error::new(e.kind(), format!("ctnetlink {what}: {e}")));
    // A nested attribute that keeps NLA_F_NESTED (the crate drops it for `Other`, and the
    // kernel's strict parsing of CTA_FILTER wants it).
    let nested = |kind: u16, items: &[Tuple]| {
        let mut v = vec![0u8; items.iter().map(|i| i.buffer_len()).sum()];
        let mut at = 0;
        for i in items {
            i.emit(&mut v[at..]);
            at += i.buffer_len();
        }
        DefaultNla::new(kind | NLA_F_NESTED, v)
    };
    // CTA_FILTER { ORIG_FLAGS, REPLY_FLAGS }, u32 in host order.
    let mut filter = Vec::new();
    for (kind, flags) in [(1u16, F_IP_DST | F_PROTO_NUM), (2u16, F_IP_SRC | F_PROTO_NUM)] {
        filter.extend_from_slice(&8u16.to_ne_bytes());
        filter.extend_from_slice(&kind.to_ne_bytes());
        filter.extend_from_slice(&flags.to_ne_bytes());
    }
    let udp = || ProtoTuple::Protocol(CtProtocol::Udp);
    let attrs = vec![
        nested(CTA_TUPLE_ORIG, &[Tuple::Ip(vec![IPTuple::DestinationAddress(vip.into())]), Tuple::Proto(vec![udp()])]),
        nested(CTA_TUPLE_REPLY, &[Tuple::Ip(vec![IPTuple::SourceAddress(backend.into())]), Tuple::Proto(vec![udp()])]),
        DefaultNla::new(CTA_FILTER | NLA_F_NESTED, filter),
    ];
    let request = |flags: u16, seq: u32, msg: ConntrackMessage| {
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | flags;
        hdr.sequence_number = seq;
        let mut m = NetlinkMessage::new(hdr, NetlinkPayload::from(NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0), msg)));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    };
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).map_err(io("open"))?;
    sock.bind_auto().map_err(io("bind"))?;
    let kernel = netlink_sys::SocketAddr::new(0, 0);
    // Sends one request; the messages that answer it, and the errno of its end (0: done).
    let talk = |req: &[u8]| -> Result<(Vec<ConntrackMessage>, i32), Error> {
        sock.send_to(req, &kernel, 0).map_err(io("send"))?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = sock.recv_from_full().map_err(io("read"))?;
            let mut at = 0;
            while at < buf.len() {
                let m = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..]).map_err(|e| Error::Open(std::io::Error::other(format!("ctnetlink: a reply that does not parse: {e}"))))?;
                let len = m.header.length as usize;
                match m.payload {
                    NetlinkPayload::Error(e) => return Ok((out, e.code.map_or(0, |c| -c.get()))),
                    NetlinkPayload::Done(_) => return Ok((out, 0)),
                    NetlinkPayload::InnerMessage(NetfilterMessage { inner: NetfilterMessageInner::Conntrack(c), .. }) => out.push(c),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
            }
        }
    };
    let (flows, e) = talk(&request(NLM_F_DUMP, 1, ConntrackMessage::Other { message_type: IPCTNL_MSG_CT_GET, attributes: attrs }))?;
    if e != 0 {
        return Err(Error::Open(std::io::Error::from_raw_os_error(e)));
    }
    let mut deleted = 0;
    for (i, flow) in flows.into_iter().enumerate() {
        let ConntrackMessage::New(attrs) = flow else { continue };
        let Some(orig) = attrs.into_iter().find(|a| matches!(a, ConntrackAttribute::CtaTupleOrig(_))) else { continue };
        let seq = u32::try_from(i).unwrap_or(u32::MAX).saturating_add(2);
        match talk(&request(NLM_F_ACK, seq, ConntrackMessage::Delete(vec![orig])))?.1 {
            0 => deleted += 1,
            libc::ENOENT => {}
            e => return Err(Error::Open(std::io::Error::from_raw_os_error(e))),
        }
    }
    Ok(deleted)
}
