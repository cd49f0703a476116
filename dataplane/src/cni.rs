//! A container of another runtime on a swarmnet network (issue 22): its kernel state. The
//! container's namespace is the runtime's (`CNI_NETNS`); swarmnet adds to it:
//! - one veth per network: the container end `ifname` (`eth0`) with the network's address,
//!   the derived MAC and the overlay's MTU; the node end (`snt…`, as a task's) goes onto the
//!   network's bridge in its sandbox;
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

use crate::netlink::{fmt_mac, Netlink};
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
    let m = std::fs::metadata(path)?;
    let st = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    // nsfs: a plain file (a runtime's placeholder whose namespace was unmounted) is none.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a network namespace", path.display())));
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
    /// Node end of the network's veth (`snt…`): plugged into the sandbox's bridge after.
    pub host_if: String,
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Node end of the namespace's link to its node.
    pub host_link: String,
}

/// What [`attach`] made: the namespace (a handle on it) and the links' MACs.
#[derive(Debug)]
pub struct Attached {
    pub netns: File,
    pub ns: NsId,
    pub host_link_mac: String,
    pub container_link_mac: String,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> NsError {
    move |e| NsError::Io(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Puts the container of namespace `c.netns` on a network: its veth, its link to the node
/// (made once per namespace), their addresses and routes. `ifname` must not exist in the
/// namespace yet. On failure, removes what it made.
pub async fn attach(ns: &NsWorker, c: ContainerNet) -> Result<Attached, NsError> {
    ns.run(move |ctx| -> Result<Attached, NsError> {
        let netns = File::open(&c.netns).map_err(io(format!("open the container's namespace {}", c.netns.display())))?;
        let id = ns_id(&c.netns).map_err(io(format!("container namespace {}", c.netns.display())))?;
        let tnl = ctx.netlink_in(&netns)?;
        let fd = raw(&netns);
        let peer = format!("snp{}", &c.host_if[3..]);
        let link_peer = format!("snk{}", &c.host_link[3..]);
        let made = ctx.block_on(async {
            if tnl.link(&c.ifname).await?.is_some() {
                return Err(crate::netlink::Error::Exists(format!("interface {} in namespace {}", c.ifname, c.netns.display())));
            }
            tnl.configure_link("lo", None, None, None).await?;
            let home = ctx.home();
            home.delete_link(&c.host_if).await?;
            home.delete_link(&peer).await?;
            home.create_veth(&c.host_if, &peer).await?;
            home.move_to_netns(&peer, fd).await?;
            home.configure_link(&c.host_if, None, None, Some(c.mtu)).await?;
            tnl.configure_link(&peer, Some(&c.ifname), Some(c.mac), Some(c.mtu)).await?;
            tnl.add_address(&c.ifname, c.address.into(), c.prefix).await?;
            // The namespace's link to its node, once.
            if tnl.link(CONTAINER_LINK).await?.is_none() || home.link(&c.host_link).await?.is_none() {
                tnl.delete_link(CONTAINER_LINK).await?;
                home.delete_link(&c.host_link).await?;
                home.delete_link(&link_peer).await?;
                home.create_veth(&c.host_link, &link_peer).await?;
                home.move_to_netns(&link_peer, fd).await?;
                tnl.configure_link(&link_peer, Some(CONTAINER_LINK), None, None).await?;
                home.configure_link(&c.host_link, None, None, None).await?;
                home.add_address(&c.host_link, NODE_GATEWAY.into(), 32).await?;
                tnl.add_route_v4(CONTAINER_LINK, NODE_GATEWAY, 32, None).await?;
                tnl.add_route_v4(CONTAINER_LINK, Ipv4Addr::UNSPECIFIED, 0, Some(NODE_GATEWAY)).await?;
            }
            home.add_route_v4(&c.host_link, c.address, 32, None).await?;
            let hl = home.link(&c.host_link).await?.map(|l| fmt_mac(&l.mac)).unwrap_or_default();
            let cl = tnl.link(CONTAINER_LINK).await?.map(|l| fmt_mac(&l.mac)).unwrap_or_default();
            Ok((hl, cl))
        });
        match made {
            Ok((host_link_mac, container_link_mac)) => Ok(Attached { netns, ns: id, host_link_mac, container_link_mac }),
            Err(e) => {
                ctx.block_on(async {
                    let _ = ctx.home().delete_link(&c.host_if).await;
                    let _ = ctx.home().delete_link(&peer).await;
                    let _ = ctx.home().del_route_v4(c.address, 32).await;
                });
                Err(e.into())
            }
        }
    })
    .await?
}

/// Takes a container interface off its network (its veth's node end must be back in the
/// node's namespace or gone): the node's route to `address`, the veth, and with `last` the
/// namespace's link to its node. Gone already is fine.
pub async fn detach(ns: &NsWorker, host_if: String, address: Ipv4Addr, host_link: String, last: bool) -> Result<(), NsError> {
    ns.run(move |ctx| -> Result<(), NsError> {
        ctx.block_on(async {
            let home = ctx.home();
            if last {
                home.delete_link(&host_link).await?;
            } else {
                home.del_route_v4(address, 32).await?;
            }
            home.delete_link(&host_if).await?;
            Ok::<(), crate::netlink::Error>(())
        })?;
        Ok(())
    })
    .await?
}

/// Everything that differs from what [`attach`] made of `e` in namespace `id` (empty:
/// nothing drifted).
pub async fn check(ns: &NsWorker, e: ContainerNet, id: NsId) -> Result<Vec<String>, NsError> {
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
            inside(&tnl, &e, &mut drift).await?;
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

async fn inside(tnl: &Netlink, e: &ContainerNet, drift: &mut Vec<String>) -> Result<(), crate::netlink::Error> {
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
            if !routes.iter().any(|r| r.prefix == 0 && r.gateway == Some(NODE_GATEWAY) && r.oif == cl.index) {
                drift.push(format!("no default route via {NODE_GATEWAY} on {CONTAINER_LINK}"));
            }
        }
    }
    Ok(())
}
