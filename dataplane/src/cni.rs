//! A container of another runtime on a swarmnet network (issue 22): its kernel state. The
//! container's namespace is the runtime's (`CNI_NETNS`); swarmnet adds to it:
//! - one veth per network: the container end `ifname` (`eth0`) with the network's address,
//!   the derived MAC and the overlay's MTU; the node end (`snt…`, named as a task's) stays in
//!   the node's namespace, a port of the network's node-side bridge `sncb<vni>`, which a veth
//!   pair joins to the sandbox's `br0` (see [`crate::overlay::container_bridge_name`]): so
//!   the plugins chained after swarmnet's find the container's host interface where CNI
//!   expects it (the reference `bandwidth` shapes it);
//! - one link to its node per namespace, as Docker's `docker_gwbridge` gives a container on
//!   overlays only: container end [`CONTAINER_LINK`] (no address), node end `snh…` holding
//!   [`NODE_GATEWAY`] (/32, the same on every such link). The container's default route goes
//!   through it; the node routes each of the container's addresses (/32) back into it. So
//!   the node's own connections and its host ports (the reference `portmap` plugin's DNAT)
//!   reach the container, and its replies go back the way they came.
//!
//! Every netlink call is in [`crate::netlink`]; this module only orders them.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::netlink::{fmt_mac, Netlink, VethEnd};
use crate::netns::{raw, NsError, NsWorker};

/// The node's address on every container's link to it (link-local, never on the wire).
pub const NODE_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The container's end of its link to its node.
pub const CONTAINER_LINK: &str = "swarmnet0";

/// Which namespace a path names: (device, inode) of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// The namespace `path` names now, if it names one.
pub fn ns_id(path: &Path) -> std::io::Result<NsId> {
    let f = File::open(path)?;
    let m = f.metadata()?;
    let st = nix::sys::statfs::fstatfs(&f).map_err(std::io::Error::from)?;
    // nsfs: a plain file (a runtime's placeholder whose namespace was unmounted) is none.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a network namespace", path.display())));
    }
    // A namespace, but a network one (not a mount or PID namespace's file)?
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns the namespace's type; the
    // descriptor is open (owned by `f`) for the whole call.
    let kind = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is a namespace, but not a network namespace", path.display())));
    }
    Ok(NsId { dev: m.dev(), ino: m.ino() })
}

/// Name of the node end of a namespace's link to its node: `snh` + 11 hex digits of its id.
pub fn host_link_name(ns: NsId) -> String {
    let h = ns.ino ^ ns.dev.rotate_left(32);
    format!("snh{:011x}", h & 0xfff_ffff_ffff)
}

/// One container interface on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerNet {
    pub netns: PathBuf,
    pub vni: u32,
    /// Node end of the network's veth (`snt…`), a port of the network's node-side bridge.
    pub host_if: String,
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Node end of the namespace's link to its node.
    pub host_link: String,
}

/// The node's nftables table for containers of other runtimes (made with the first one,
/// removed when the node leaves the swarm).
pub const TABLE: &str = "swarmnet-cni";

/// [`TABLE`], whole (made or replaced atomically):
/// - `egress`: what a container sends through its link to the node (`snh…`) and the node
///   forwards elsewhere is masqueraded to the node's address, as Docker's `docker_gwbridge`
///   does: a container on overlays only reaches the world outside the cluster;
/// - `bridged`: the overlay's frames crossing a network's node-side bridge (`sncb…`), which
///   `br_netfilter` hands to the node's IPv4 hooks, are not tracked: they are the overlay's
///   own traffic (tracked, if anywhere, in the containers and tasks), not the node's to NAT,
///   and tracking them would cost every packet a conntrack lookup.
pub fn node_table() -> crate::nft::Tx {
    use crate::nft::{self, eq, meta, MetaKey, NfChainType, NfFamily, NfHook, Operator, Statement};
    let fam = NfFamily::IP;
    let mut tx = nft::Tx::new();
    tx.replace_table(fam, TABLE);
    tx.add(nft::base_chain(fam, TABLE, "bridged", NfChainType::Filter, NfHook::Prerouting, -300));
    tx.add(nft::rule(fam, TABLE, "bridged", vec![eq(meta(MetaKey::Iifname), nft::s("sncb*")), Statement::Notrack]));
    tx.add(nft::base_chain(fam, TABLE, "egress", NfChainType::NAT, NfHook::Postrouting, 100));
    tx.add(nft::rule(fam, TABLE, "egress", vec![eq(meta(MetaKey::Iifname), nft::s("snh*")), nft::m(meta(MetaKey::Oifname), Operator::NEQ, nft::s("snh*")), nft::masquerade_fully_random()]));
    tx
}

/// Makes [`TABLE`] in the node's namespace and turns on forwarding there (what a
/// container's packets to the outside need, as Docker turns it on).
pub async fn apply_node_table() -> Result<(), NsError> {
    crate::nft::apply(None, &node_table()).await.map_err(|e| NsError::Io(std::io::Error::other(format!("nftables table {TABLE}: {e}"))))?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io("turn on forwarding (/proc/sys/net/ipv4/ip_forward)".into()))?;
    Ok(())
}

/// Removes [`TABLE`] from the node's namespace, if it is there.
pub async fn remove_node_table() -> Result<(), NsError> {
    let mut tx = crate::nft::Tx::new();
    tx.remove_table(crate::nft::NfFamily::IP, TABLE);
    crate::nft::apply(None, &tx).await.map_err(|e| NsError::Io(std::io::Error::other(format!("remove nftables table {TABLE}: {e}"))))
}

/// The link group of every link swarmnet makes in a container's namespace: DEL deletes
/// them (and so their node ends) in one request, with one RCU grace period.
pub const LINK_GROUP: u32 = 0x534e;

/// What [`attach`] made: the namespace (a handle on it: held while it is attached, so its
/// inode is never another namespace's meanwhile), its cookie and the links' MACs.
#[derive(Debug)]
pub struct Attached {
    pub netns: File,
    pub ns: NsId,
    pub cookie: u64,
    pub host_link_mac: String,
    pub container_link_mac: String,
    pub host_if_mac: String,
    /// Whether its default route is ours (a namespace that had one keeps it).
    pub default_route: bool,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> NsError {
    move |e| NsError::Io(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Puts the container of namespace `c.netns` on a network whose sandbox is `sandbox`: its
/// veth (node end born a port of the network's node-side bridge, made with the first
/// container), its link to the node,
/// their addresses and routes; every link born where it belongs (no moves between
/// namespaces). Refused if the namespace has `ifname` or a link to its node already (one
/// swarmnet network per namespace). On failure, removes what it made.
pub async fn attach(ns: &NsWorker, c: ContainerNet, sandbox: File) -> Result<Attached, NsError> {
    ns.run(move |ctx| -> Result<Attached, NsError> {
        let netns = File::open(&c.netns).map_err(io(format!("open the container's namespace {}", c.netns.display())))?;
        let id = ns_id(&c.netns).map_err(io(format!("container namespace {}", c.netns.display())))?;
        let cookie = ctx.netns_cookie(&netns)?;
        let tnl = ctx.netlink_in(&netns)?;
        let snl = ctx.netlink_in(&sandbox)?;
        let (cfd, sfd) = (raw(&netns), raw(&sandbox));
        let made = ctx.block_on(async {
            for name in [c.ifname.as_str(), CONTAINER_LINK] {
                if tnl.link(name).await?.is_some() {
                    return Err(crate::netlink::Error::Exists(format!("interface {name} in namespace {} (one swarmnet network per container namespace)", c.netns.display())));
                }
            }
            tnl.configure_link("lo", None, None, None).await?;
            let home = ctx.home();
            let bridge = crate::overlay::ensure_container_bridge(home, &snl, sfd, c.vni, c.mtu).await?;
            // Node ends an earlier daemon left behind (it crashed between the two).
            home.delete_link(&c.host_link).await?;
            home.delete_link(&c.host_if).await?;
            let group = Some(LINK_GROUP);
            home.create_veth_pair(
                &VethEnd { name: &c.host_if, mtu: Some(c.mtu), master: Some(bridge), ..Default::default() },
                &VethEnd { name: &c.ifname, netns: Some(cfd), mtu: Some(c.mtu), mac: Some(c.mac), group, ..Default::default() },
            )
            .await?;
            tnl.configure_link(&c.ifname, None, None, None).await?;
            tnl.add_address(&c.ifname, c.address.into(), c.prefix).await?;
            home.create_veth_pair(&VethEnd { name: &c.host_link, ..Default::default() }, &VethEnd { name: CONTAINER_LINK, netns: Some(cfd), group, ..Default::default() }).await?;
            tnl.configure_link(CONTAINER_LINK, None, None, None).await?;
            home.add_address(&c.host_link, NODE_GATEWAY.into(), 32).await?;
            tnl.add_route_v4(CONTAINER_LINK, NODE_GATEWAY, 32, None).await?;
            let default_route = !tnl.routes_v4().await?.iter().any(|r| r.prefix == 0);
            if default_route {
                tnl.add_route_v4(CONTAINER_LINK, Ipv4Addr::UNSPECIFIED, 0, Some(NODE_GATEWAY)).await?;
            }
            home.add_route_v4(&c.host_link, c.address, 32, None).await?;
            let hl = home.link(&c.host_link).await?.map(|l| fmt_mac(&l.mac)).unwrap_or_default();
            let cl = tnl.link(CONTAINER_LINK).await?.map(|l| fmt_mac(&l.mac)).unwrap_or_default();
            let hi = home.link(&c.host_if).await?.map(|l| fmt_mac(&l.mac)).unwrap_or_default();
            Ok((hl, cl, hi, default_route))
        });
        match made {
            Ok((host_link_mac, container_link_mac, host_if_mac, default_route)) => Ok(Attached { netns, ns: id, cookie, host_link_mac, container_link_mac, host_if_mac, default_route }),
            Err(e) => {
                // Unless it was refused for what is there already: only ours carry the group.
                if !matches!(e, crate::netlink::Error::Exists(_)) {
                    ctx.block_on(async {
                        let _ = tnl.delete_group(LINK_GROUP).await;
                        let _ = ctx.home().delete_link(&c.host_link).await;
                        let _ = ctx.home().delete_link(&c.host_if).await;
                    });
                }
                Err(e.into())
            }
        }
    })
    .await?
}

/// Takes a container interface off its network: with its namespace (`netns`, a handle
/// held since ADD), every link of ours in it at once (their other ends and the node's route
/// go with them); without, from the node's side: the link to the node and the veth's node
/// end (in the node's namespace, or in the network's sandbox where an older daemon put it).
/// Gone already is fine. Not on the namespace worker: a link's
/// deletion waits for the kernel (an RCU barrier, ~15 ms here), and DELs of many containers
/// at once wait side by side, each on a thread of its own in its container's namespace.
pub async fn detach(ns: &NsWorker, netns: Option<File>, host_link: String, host_if: String, sandbox: Option<File>) -> Result<(), NsError> {
    match netns {
        Some(netns) => group_op(netns, GroupOp::Delete).await,
        None => {
            ns.run(move |ctx| -> Result<(), NsError> {
                ctx.block_on(ctx.home().delete_link(&host_link))?;
                ctx.block_on(ctx.home().delete_link(&host_if))?;
                if let Some(sb) = sandbox {
                    let snl = ctx.netlink_in(&sb)?;
                    ctx.block_on(snl.delete_link(&host_if))?;
                }
                Ok(())
            })
            .await?
        }
    }
}

/// Takes a container's links out of its namespace's way at once, without deleting them
/// (that waits for the kernel: [`detach`] does it later): down, so their routes go, and
/// renamed, so that `ifname` is free for whatever the runtime adds next. What DEL does
/// before it answers.
pub async fn retire(netns: &File) -> Result<(), NsError> {
    group_op(netns.try_clone()?, GroupOp::Retire).await
}

/// What to do with the links of [`LINK_GROUP`] in a container's namespace.
#[derive(Clone, Copy, Debug)]
enum GroupOp {
    Retire,
    Delete,
}

/// `op` on the links of [`LINK_GROUP`] in namespace `netns`, in one request, on a thread of
/// its own inside that namespace (not the namespace worker: a deletion waits for the
/// kernel, and many containers' wait side by side).
async fn group_op(netns: File, op: GroupOp) -> Result<(), NsError> {
    tokio::task::spawn_blocking(move || {
        crate::netns::in_netns(&netns, || -> Result<(), NsError> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let (nl, conn) = Netlink::open()?;
                tokio::spawn(conn);
                match op {
                    GroupOp::Retire => nl.retire_group(LINK_GROUP).await,
                    GroupOp::Delete => nl.delete_group(LINK_GROUP).await,
                }
            })?;
            Ok(())
        })
    })
    .await
    .map_err(|e| NsError::Io(std::io::Error::other(format!("{op:?} the container's links: {e}"))))??
}

/// Everything that differs from what [`attach`] made of `e` in namespace `id` (empty:
/// nothing drifted).
pub async fn check(ns: &NsWorker, e: ContainerNet, id: NsId, default_route: bool) -> Result<Vec<String>, NsError> {
    ns.run(move |ctx| -> Result<Vec<String>, NsError> {
        let mut drift = Vec::new();
        match ns_id(&e.netns) {
            Ok(now) if now == id => {}
            Ok(_) => return Ok(vec![format!("{} is another namespace than the one attached", e.netns.display())]),
            Err(err) => return Ok(vec![format!("the container's namespace {}: {err}", e.netns.display())]),
        }
        let netns = File::open(&e.netns).map_err(io(format!("open {}", e.netns.display())))?;
        let tnl = ctx.netlink_in(&netns)?;
        ctx.block_on(async {
            inside(&tnl, &e, default_route, &mut drift).await?;
            let bridge = ctx.home().link(&crate::overlay::container_bridge_name(e.vni)).await?;
            match (ctx.home().link(&e.host_if).await?, bridge) {
                (None, _) => drift.push(format!("the node's end of {}, {}, is gone", e.ifname, e.host_if)),
                (Some(_), None) => drift.push(format!("the network's node-side bridge {} is gone", crate::overlay::container_bridge_name(e.vni))),
                (Some(h), Some(b)) if h.master != Some(b.index) => drift.push(format!("{} is not a port of {}", e.host_if, b.name)),
                _ => {}
            }
            match ctx.home().link(&e.host_link).await? {
                None => drift.push(format!("the node's end of the container's link, {}, is gone", e.host_link)),
                Some(l) => {
                    let routes = ctx.home().routes_v4().await?;
                    if !routes.iter().any(|r| r.dst == e.address && r.prefix == 32 && r.oif == l.index) {
                        drift.push(format!("the node has no route to {} through {}", e.address, e.host_link));
                    }
                }
            }
            Ok::<(), crate::netlink::Error>(())
        })?;
        Ok(drift)
    })
    .await?
}

async fn inside(tnl: &Netlink, e: &ContainerNet, default_route: bool, drift: &mut Vec<String>) -> Result<(), crate::netlink::Error> {
    let Some(l) = tnl.link(&e.ifname).await? else {
        drift.push(format!("interface {} is gone from the container", e.ifname));
        return Ok(());
    };
    if l.mac != e.mac {
        drift.push(format!("{}: MAC {} instead of {}", e.ifname, fmt_mac(&l.mac), fmt_mac(&e.mac)));
    }
    if l.mtu != e.mtu {
        drift.push(format!("{}: MTU {} instead of {}", e.ifname, l.mtu, e.mtu));
    }
    let addrs = tnl.addresses().await?;
    if !addrs.iter().any(|(i, n)| *i == l.index && n.ip() == std::net::IpAddr::V4(e.address) && n.prefix() == e.prefix) {
        drift.push(format!("{}: address {}/{} is missing", e.ifname, e.address, e.prefix));
    }
    let routes = tnl.routes_v4().await?;
    let subnet = ipnetwork::Ipv4Network::new(e.address, e.prefix).map(|n| n.network()).unwrap_or(e.address);
    if !routes.iter().any(|r| r.dst == subnet && r.prefix == e.prefix && r.oif == l.index) {
        drift.push(format!("no route to {subnet}/{} on {}", e.prefix, e.ifname));
    }
    match tnl.link(CONTAINER_LINK).await? {
        None => drift.push(format!("the container's link to its node, {CONTAINER_LINK}, is gone")),
        Some(cl) => {
            if default_route && !routes.iter().any(|r| r.prefix == 0 && r.gateway == Some(NODE_GATEWAY) && r.oif == cl.index) {
                drift.push(format!("no default route via {NODE_GATEWAY} on {CONTAINER_LINK}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_table_masquerades_container_egress_and_leaves_bridged_frames_untracked() {
        let v: serde_json::Value = serde_json::from_str(&node_table().json()).expect("nft JSON");
        let adds: Vec<&serde_json::Value> = v["nftables"].as_array().expect("a list").iter().filter_map(|o| o.get("add")).collect();
        let chain = |name: &str| adds.iter().find_map(|a| a.get("chain").filter(|c| c["name"] == name)).unwrap_or_else(|| panic!("chain {name}: {v}"));
        let rule = |name: &str| adds.iter().find_map(|a| a.get("rule").filter(|r| r["chain"] == name)).unwrap_or_else(|| panic!("rule of {name}: {v}"));
        let matches = |r: &serde_json::Value, key: &str, op: &str, right: &str| {
            r["expr"].as_array().is_some_and(|e| e.iter().any(|x| x["match"]["left"]["meta"]["key"] == key && x["match"]["op"] == op && x["match"]["right"] == right))
        };
        assert_eq!((chain("egress")["type"].as_str(), chain("egress")["hook"].as_str()), (Some("nat"), Some("postrouting")));
        let egress = rule("egress");
        assert!(matches(egress, "iifname", "==", "snh*") && matches(egress, "oifname", "!=", "snh*"), "{egress}");
        assert!(egress["expr"].as_array().is_some_and(|e| e.iter().any(|x| x.get("masquerade").is_some())), "{egress}");
        assert_eq!((chain("bridged")["hook"].as_str(), chain("bridged")["prio"].as_i64()), (Some("prerouting"), Some(-300)));
        let bridged = rule("bridged");
        assert!(matches(bridged, "iifname", "==", "sncb*"), "{bridged}");
        assert!(bridged["expr"].as_array().is_some_and(|e| e.iter().any(|x| x.get("notrack").is_some())), "{bridged}");
    }

    #[test]
    fn host_link_names_fit_and_differ() {
        let a = host_link_name(NsId { dev: 4, ino: 4026532000 });
        let b = host_link_name(NsId { dev: 4, ino: 4026532001 });
        assert!(a.len() <= 15 && a.starts_with("snh"), "{a}");
        assert_ne!(a, b);
    }
}
