//! The overlay on one node, per network: a sandbox namespace holding bridge `br0` (the
//! gateway address) and a VXLAN device (created in the node namespace so that its UDP socket
//! lives on the underlay, then moved in); task veths plug into `br0`. Remote endpoints are
//! static: a permanent neighbour entry and an FDB entry each, computed by `plan` from what
//! should be and what the kernel has.
//!
//! - this module: the kernel steps (sandbox set-up, plug, unplug, entries) and the pure plan;
//! - [`sandboxes`]: the node's sandboxes, one per network it is on, held by holder processes
//!   so that they outlive a daemon restart;
//! - [`sink`]: the overlay's sink of the endpoint stream (remote endpoints → entries).

pub mod sandboxes;
pub mod sink;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::Ipv4Addr;

use crate::netlink::{Netlink, VethEnd};
use crate::netns::{raw, NsError, NsWorker};

pub use sandboxes::{SandboxError, Sandboxes};
pub use sink::{OverlayKernel, OverlaySink};

pub const BRIDGE: &str = "br0";

pub fn vxlan_name(vni: u32) -> String {
    format!("snvx{vni}")
}

/// The node-side bridge of a network that containers of other runtimes are on (issue 22):
/// their veths' node ends are its ports, in the node's namespace, where the plugins chained
/// after swarmnet's (the reference `bandwidth`) look for a container's host interface. Made
/// with the first container, it is joined to the sandbox's `br0` by the veth pair
/// [`container_trunk_name`] (both ends named so), and goes with the sandbox.
pub fn container_bridge_name(vni: u32) -> String {
    format!("sncb{vni}")
}

/// The veth pair joining [`container_bridge_name`] to the sandbox's `br0`.
pub fn container_trunk_name(vni: u32) -> String {
    format!("snct{vni}")
}

/// Makes (or completes) the network's node-side bridge for containers and its trunk into the
/// sandbox (`sb`, whose descriptor is `sb_fd`); returns the bridge's index. Idempotent; run
/// inside a namespace-worker job, whose `home` is the node's namespace.
pub(crate) async fn ensure_container_bridge(home: &Netlink, sb: &Netlink, sb_fd: std::os::fd::RawFd, vni: u32, mtu: u32) -> Result<u32, crate::netlink::Error> {
    let br = container_bridge_name(vni);
    let tr = container_trunk_name(vni);
    let bridge = match home.link(&br).await? {
        Some(l) => l,
        None => {
            home.create_bridge(&br).await?;
            home.configure_link(&br, None, None, Some(mtu)).await?;
            home.link(&br).await?.ok_or_else(|| crate::netlink::Error::NoLink(br.clone()))?
        }
    };
    let in_sandbox = sb.link(&tr).await?;
    let sb_bridge = sb.link(BRIDGE).await?.map(|l| l.index);
    match (home.link(&tr).await?, in_sandbox) {
        (Some(h), Some(s)) if s.master.is_some() && s.master == sb_bridge => {
            if h.master != Some(bridge.index) {
                home.set_master(&tr, &br).await?;
            }
        }
        (h, _) => {
            // Missing, or half of an earlier sandbox's: made again.
            if h.is_some() {
                home.delete_link(&tr).await?;
            }
            sb.delete_link(&tr).await?;
            home.create_veth_pair(
                &VethEnd { name: &tr, mtu: Some(mtu), master: Some(bridge.index), ..Default::default() },
                &VethEnd { name: &tr, netns: Some(sb_fd), mtu: Some(mtu), ..Default::default() },
            )
            .await?;
            sb.set_master(&tr, BRIDGE).await?;
        }
    }
    Ok(bridge.index)
}

/// Removes the network's node-side bridge for containers and its trunk, if there are.
pub async fn remove_container_bridge(ns: &NsWorker, vni: u32) -> Result<(), NsError> {
    ns.run(move |ctx| -> Result<(), NsError> {
        ctx.block_on(async {
            ctx.home().delete_link(&container_trunk_name(vni)).await?;
            ctx.home().delete_link(&container_bridge_name(vni)).await
        })?;
        Ok(())
    })
    .await?
}

/// A remote endpoint as the overlay needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Remote {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub vtep: Ipv4Addr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    NeighAdd(Ipv4Addr, [u8; 6]),
    NeighDel(Ipv4Addr),
    FdbAdd([u8; 6], Ipv4Addr),
    FdbDel([u8; 6], Ipv4Addr),
}

/// The changes that make the kernel's entries (`neigh`, `fdb`) match `desired`.
pub fn plan(desired: &[Remote], neigh: &[(Ipv4Addr, [u8; 6])], fdb: &[([u8; 6], Ipv4Addr)]) -> Vec<Op> {
    let want_neigh: BTreeMap<Ipv4Addr, [u8; 6]> = desired.iter().map(|r| (r.ip, r.mac)).collect();
    let want_fdb: BTreeMap<[u8; 6], Ipv4Addr> = desired.iter().map(|r| (r.mac, r.vtep)).collect();
    let mut ops = Vec::new();
    for (ip, mac) in neigh {
        if want_neigh.get(ip) != Some(mac) {
            ops.push(Op::NeighDel(*ip));
        }
    }
    for (mac, dst) in fdb {
        if want_fdb.get(mac) != Some(dst) {
            ops.push(Op::FdbDel(*mac, *dst));
        }
    }
    for (ip, mac) in &want_neigh {
        if !neigh.contains(&(*ip, *mac)) {
            ops.push(Op::NeighAdd(*ip, *mac));
        }
    }
    for (mac, dst) in &want_fdb {
        if !fdb.contains(&(*mac, *dst)) {
            ops.push(Op::FdbAdd(*mac, *dst));
        }
    }
    ops
}

/// Which of a plan's operations to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything: the kernel ends up equal to what is desired.
    All,
    /// Add and correct, remove nothing (the table may still be filling).
    AddOnly,
    /// Only operations on these addresses and MACs (the ones a batch of changes touched):
    /// entries nobody spoke of are left alone.
    Keys { ips: BTreeSet<Ipv4Addr>, macs: BTreeSet<[u8; 6]> },
}

impl Scope {
    pub fn keeps(&self, op: &Op) -> bool {
        match self {
            Scope::All => true,
            // A changed destination is still corrected: FdbAdd replaces it.
            Scope::AddOnly => !matches!(op, Op::NeighDel(_) | Op::FdbDel(..)),
            Scope::Keys { ips, macs } => match op {
                Op::NeighAdd(ip, _) | Op::NeighDel(ip) => ips.contains(ip),
                Op::FdbAdd(mac, _) | Op::FdbDel(mac, _) => macs.contains(mac),
            },
        }
    }
}

/// `plan`, narrowed to `scope`.
pub fn plan_scoped(desired: &[Remote], neigh: &[(Ipv4Addr, [u8; 6])], fdb: &[([u8; 6], Ipv4Addr)], scope: &Scope) -> Vec<Op> {
    let mut ops = plan(desired, neigh, fdb);
    ops.retain(|op| scope.keeps(op));
    ops
}

#[derive(Clone, Debug)]
pub struct SandboxSpec {
    pub vni: u32,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub local: Ipv4Addr,
    pub port: u16,
    pub mtu: u32,
    /// The bridge holds the gateway address (every network but the ingress one, whose
    /// gateway is the node's own port into it: see `ingress`).
    pub bridge_address: bool,
}

/// Makes (or completes) the sandbox's bridge and VXLAN device. Idempotent: what exists is
/// kept, so a restarted agent reconciles instead of tearing down. True if it made anything
/// (a new VXLAN device has no entries yet).
pub async fn setup_sandbox(ns: &NsWorker, sandbox: &File, spec: SandboxSpec) -> Result<bool, NsError> {
    let sb = sandbox.try_clone()?;
    ns.run(move |ctx| -> Result<bool, NsError> {
        let nl = ctx.netlink_in(&sb)?;
        let vx = vxlan_name(spec.vni);
        let made = ctx.block_on(async {
            let mut made = false;
            nl.configure_link("lo", None, None, None).await?;
            if nl.link(BRIDGE).await?.is_none() {
                nl.create_bridge(BRIDGE).await?;
                nl.configure_link(BRIDGE, None, None, Some(spec.mtu)).await?;
                if spec.bridge_address {
                    nl.add_address(BRIDGE, spec.gateway.into(), spec.prefix).await?;
                }
                made = true;
            }
            if nl.link(&vx).await?.is_none() {
                ctx.home().delete_link(&vx).await?;
                ctx.home().create_vxlan(&vx, spec.vni, spec.local, spec.port, spec.mtu).await?;
                ctx.home().move_to_netns(&vx, raw(&sb)).await?;
                made = true;
            }
            nl.set_master(&vx, BRIDGE).await?;
            Ok::<bool, crate::netlink::Error>(made)
        })?;
        Ok(made)
    })
    .await?
}

/// Moves a task's node-side veth end into the sandbox and onto the bridge. Idempotent.
pub async fn plug(ns: &NsWorker, sandbox: &File, host_if: String) -> Result<(), NsError> {
    let sb = sandbox.try_clone()?;
    ns.run(move |ctx| -> Result<(), NsError> {
        let nl = ctx.netlink_in(&sb)?;
        ctx.block_on(async {
            if ctx.home().link(&host_if).await?.is_some() {
                ctx.home().move_to_netns(&host_if, raw(&sb)).await?;
            }
            nl.set_master(&host_if, BRIDGE).await
        })?;
        Ok(())
    })
    .await?
}

/// Removes a task's veth end from the sandbox (the task's end goes with it).
pub async fn unplug(ns: &NsWorker, sandbox: &File, host_if: String) -> Result<(), NsError> {
    let sb = sandbox.try_clone()?;
    ns.run(move |ctx| -> Result<(), NsError> {
        let nl = ctx.netlink_in(&sb)?;
        ctx.block_on(nl.delete_link(&host_if))?;
        Ok(())
    })
    .await?
}

/// Deletes the sandbox's VXLAN device now. A namespace is torn down asynchronously after its
/// last holder goes, and until then its VXLAN device keeps the VNI and port busy.
pub async fn remove_vxlan(ns: &NsWorker, sandbox: &File, vni: u32) -> Result<(), NsError> {
    let sb = sandbox.try_clone()?;
    ns.run(move |ctx| -> Result<(), NsError> {
        let nl = ctx.netlink_in(&sb)?;
        ctx.block_on(nl.delete_link(&vxlan_name(vni)))?;
        Ok(())
    })
    .await?
}

/// Makes the sandbox's neighbour and FDB entries match `desired`, within `scope`; returns
/// the changes made. One dump and the operations, in one job on the namespace thread.
pub async fn sync_remotes(ns: &NsWorker, sandbox: &File, vni: u32, desired: Vec<Remote>, scope: Scope) -> Result<Vec<Op>, NsError> {
    let sb = sandbox.try_clone()?;
    ns.run(move |ctx| -> Result<Vec<Op>, NsError> {
        let nl = ctx.netlink_in(&sb)?;
        let vx = vxlan_name(vni);
        let ops = ctx.block_on(async {
            let (neigh, fdb) = nl.neigh_and_fdb(&vx).await?;
            let ops = plan_scoped(&desired, &neigh, &fdb, &scope);
            for op in &ops {
                match *op {
                    Op::NeighAdd(ip, mac) => nl.neigh_add(&vx, ip, mac).await?,
                    Op::NeighDel(ip) => nl.neigh_del(&vx, ip).await?,
                    Op::FdbAdd(mac, dst) => nl.fdb_add(&vx, mac, dst).await?,
                    Op::FdbDel(mac, _) => nl.fdb_del(&vx, mac).await?,
                }
            }
            Ok::<_, crate::netlink::Error>(ops)
        })?;
        Ok(ops)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(last: u8, vtep: u8) -> Remote {
        Remote { ip: Ipv4Addr::new(10, 0, 0, last), mac: [2, 0x42, 10, 0, 0, last], vtep: Ipv4Addr::new(10, 210, 0, vtep) }
    }

    #[test]
    fn plan_adds_missing_removes_stale_and_moves_changed() {
        let desired = [r(3, 2), r(4, 3)];
        let neigh = vec![(Ipv4Addr::new(10, 0, 0, 3), [2, 0x42, 10, 0, 0, 3]), (Ipv4Addr::new(10, 0, 0, 9), [2, 0x42, 10, 0, 0, 9])];
        // 10.0.0.3 moved from VTEP .3 to .2; 10.0.0.9 is gone.
        let fdb = vec![([2, 0x42, 10, 0, 0, 3], Ipv4Addr::new(10, 210, 0, 3)), ([2, 0x42, 10, 0, 0, 9], Ipv4Addr::new(10, 210, 0, 2))];
        let ops = plan(&desired, &neigh, &fdb);
        assert_eq!(
            ops,
            vec![
                Op::NeighDel(Ipv4Addr::new(10, 0, 0, 9)),
                Op::FdbDel([2, 0x42, 10, 0, 0, 3], Ipv4Addr::new(10, 210, 0, 3)),
                Op::FdbDel([2, 0x42, 10, 0, 0, 9], Ipv4Addr::new(10, 210, 0, 2)),
                Op::NeighAdd(Ipv4Addr::new(10, 0, 0, 4), [2, 0x42, 10, 0, 0, 4]),
                Op::FdbAdd([2, 0x42, 10, 0, 0, 3], Ipv4Addr::new(10, 210, 0, 2)),
                Op::FdbAdd([2, 0x42, 10, 0, 0, 4], Ipv4Addr::new(10, 210, 0, 3)),
            ]
        );
    }

    #[test]
    fn scopes_narrow_the_plan() {
        let desired = [r(4, 2)];
        let neigh = vec![(Ipv4Addr::new(10, 0, 0, 9), [2, 0x42, 10, 0, 0, 9])];
        let fdb = vec![([2, 0x42, 10, 0, 0, 9], Ipv4Addr::new(10, 210, 0, 2))];
        assert_eq!(plan_scoped(&desired, &neigh, &fdb, &Scope::All).len(), 4);
        let add = plan_scoped(&desired, &neigh, &fdb, &Scope::AddOnly);
        assert_eq!(add, vec![Op::NeighAdd(Ipv4Addr::new(10, 0, 0, 4), [2, 0x42, 10, 0, 0, 4]), Op::FdbAdd([2, 0x42, 10, 0, 0, 4], Ipv4Addr::new(10, 210, 0, 2))]);
        // Only .4 was spoken of: the stale .9 stays.
        let keys = Scope::Keys { ips: [Ipv4Addr::new(10, 0, 0, 4)].into(), macs: [[2, 0x42, 10, 0, 0, 4]].into() };
        assert_eq!(plan_scoped(&desired, &neigh, &fdb, &keys), add);
    }

    #[test]
    fn plan_of_a_matching_kernel_is_empty() {
        let desired = [r(3, 2)];
        let neigh = vec![(Ipv4Addr::new(10, 0, 0, 3), [2, 0x42, 10, 0, 0, 3])];
        let fdb = vec![([2, 0x42, 10, 0, 0, 3], Ipv4Addr::new(10, 210, 0, 2))];
        assert!(plan(&desired, &neigh, &fdb).is_empty());
    }
}
