//! The node's overlay sandboxes: one network namespace per network the node is on, with
//! `br0` and the VXLAN device. A sandbox namespace is held by a small holder process (the
//! daemon's own binary with the argument the daemon gives, `swarmnet sandbox-hold`), so it,
//! and the tasks' links in it, outlive a daemon restart; the restarted daemon adopts it
//! (like tasks, ADR 0004). Which networks the node is on is decided by the agent's
//! membership, not here: this only makes, removes, plugs and programs.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};

use serde::{Deserialize, Serialize};
use swarmnet_types::{Network, NetworkId, SinkError};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use super::sink::OverlayKernel;
use super::{Op, Remote, SandboxSpec, Scope};
use crate::netns::{NsError, NsWorker};
use crate::state::{self, StateError, StateFile};
use crate::task as dp;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("network {network} vni {vni}: {what}: {source}")]
    Kernel {
        network: String,
        vni: u32,
        what: &'static str,
        #[source]
        source: Box<NsError>,
    },
    #[error("network {network}: start the sandbox holder: {source}")]
    Holder {
        network: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network {0}: this node has no sandbox for it")]
    NoSandbox(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("sandbox directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    start_time: u64,
    vni: u32,
}

struct Sandbox {
    ns: File,
    holder: Holder,
    name: String,
}

pub struct Sandboxes {
    ns: NsWorker,
    dir: PathBuf,
    state: StateFile,
    /// argv of the holder process.
    holder_cmd: Vec<String>,
    local: Ipv4Addr,
    /// The cluster's data-path port, from the manager (until then the default).
    port: AtomicU16,
    mtu: u32,
    map: Mutex<HashMap<NetworkId, Sandbox>>,
}

/// Sandbox holders still running whose output goes to `<dir>/<net-id>.log` (their VNI is
/// learnt when the network is next ensured).
fn find_holders(dir: &std::path::Path) -> BTreeMap<NetworkId, Holder> {
    let mut out = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(target) = std::fs::read_link(format!("/proc/{pid}/fd/1")) else { continue };
        if target.parent() != Some(dir) || target.extension().is_none_or(|x| x != "log") {
            continue;
        }
        let Some(net) = target.file_stem().and_then(|s| s.to_str()) else { continue };
        if let Some(start_time) = dp::proc_start_time(pid) {
            out.insert(net.to_string(), Holder { pid, start_time, vni: 0 });
        }
    }
    out
}

impl Sandboxes {
    /// Adopts the sandboxes an earlier daemon left (their holders still running). A state
    /// file that does not parse is reported and set aside, never read as "no sandboxes".
    pub fn open(ns: NsWorker, data_dir: &std::path::Path, local: Ipv4Addr, task_mtu: u32, holder_cmd: Vec<String>) -> Result<Sandboxes, SandboxError> {
        let dir = data_dir.join("sandboxes");
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Dir { path: dir.clone(), source })?;
        let path = dir.join("state.json");
        let (mut saved, aside): (BTreeMap<NetworkId, Holder>, _) = state::read_or_set_aside(&path)?;
        if let Some(aside) = aside {
            // The holders still run: find them by their output file (`<net-id>.log` in
            // this directory), so their sandboxes are adopted, not built a second time.
            saved = find_holders(&dir);
            error!(path = %path.display(), kept_as = %aside.display(), found = saved.len(), "sandbox state is corrupt: set aside; the sandbox holders still running were found in /proc and are adopted");
        }
        let mut map = HashMap::new();
        for (net, h) in saved {
            if dp::proc_start_time(h.pid) != Some(h.start_time) {
                info!(network = %net, vni = h.vni, pid = h.pid, "the sandbox of an earlier daemon is gone (its holder exited)");
                continue;
            }
            match dp::netns_of(h.pid) {
                Ok(f) => {
                    info!(network = %net, vni = h.vni, pid = h.pid, "adopted the sandbox of an earlier daemon");
                    map.insert(net.clone(), Sandbox { ns: f, holder: h, name: net });
                }
                Err(e) => warn!(network = %net, vni = h.vni, pid = h.pid, error = %e, "could not adopt sandbox"),
            }
        }
        let state = StateFile::new(path, 0o644);
        Ok(Sandboxes { ns, dir, state, holder_cmd, local, port: AtomicU16::new(4789), mtu: task_mtu, map: Mutex::new(map) })
    }

    /// Called with the map locked, so saves happen in the order of the changes.
    async fn save(&self, map: &HashMap<NetworkId, Sandbox>) {
        let m: BTreeMap<&NetworkId, &Holder> = map.iter().map(|(k, v)| (k, &v.holder)).collect();
        if let Err(e) = self.state.save(&m).await {
            error!(error = %e, "could not save sandbox state");
        }
    }

    /// The cluster's data-path port, as the manager says at each session.
    pub fn set_port(&self, port: u16) {
        self.port.store(port, Ordering::Relaxed);
    }

    pub fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// Networks with a sandbox on this node.
    pub async fn networks(&self) -> Vec<NetworkId> {
        self.map.lock().await.keys().cloned().collect()
    }

    /// Makes the network's sandbox, or completes an existing (adopted) one: idempotent.
    /// Returns true if anything was made now (a new sandbox, or a missing bridge or VXLAN
    /// device: either way the network's entries must be programmed again).
    pub async fn ensure(&self, net: &Network) -> Result<bool, SandboxError> {
        let mut map = self.map.lock().await;
        let created = !map.contains_key(&net.id);
        if created {
            let kernel = |what, source| SandboxError::Kernel { network: net.name.clone(), vni: net.vni, what, source: Box::new(source) };
            let ns = self.ns.run(|ctx| ctx.new_netns()).await.and_then(|r| r).map_err(|e| kernel("new namespace", e))?;
            let log = self.dir.join(format!("{}.log", net.id));
            let child = dp::output_to_file(&log)
                .and_then(|out| dp::spawn_in_netns(&ns, &self.holder_cmd, out, &[], &[], None, None))
                .map_err(|source| SandboxError::Holder { network: net.name.clone(), source })?;
            let pid = child.id().unwrap_or(0);
            // The holder is not waited for here: it must outlive this daemon.
            drop(child);
            let holder = Holder { pid, start_time: dp::proc_start_time(pid).unwrap_or(0), vni: net.vni };
            info!(network = %net.name, vni = net.vni, holder = pid, "sandbox created");
            map.insert(net.id.clone(), Sandbox { ns, holder, name: net.name.clone() });
            self.save(&map).await;
        }
        let Some(sb) = map.get_mut(&net.id) else { return Err(SandboxError::NoSandbox(net.name.clone())) };
        sb.name = net.name.clone();
        if sb.holder.vni != net.vni {
            // Found in /proc after a corrupt state file: the VNI is known now.
            sb.holder.vni = net.vni;
            self.save(&map).await;
        }
        let Some(sb) = map.get_mut(&net.id) else { return Err(SandboxError::NoSandbox(net.name.clone())) };
        let spec =
            SandboxSpec { vni: net.vni, gateway: net.gateway, prefix: net.subnet.prefix(), local: self.local, port: self.port.load(Ordering::Relaxed), mtu: self.mtu, bridge_address: !net.ingress };
        let made = super::setup_sandbox(&self.ns, &sb.ns, spec).await.map_err(|source| SandboxError::Kernel {
            network: net.name.clone(),
            vni: net.vni,
            what: "set up bridge and vxlan",
            source: Box::new(source),
        })?;
        if made && !created {
            info!(network = %net.name, vni = net.vni, "sandbox repaired (bridge or vxlan device was missing)");
        }
        Ok(created || made)
    }

    /// Removes the network's sandbox (its VXLAN device now, its namespace with its holder).
    /// Returns false if there was none.
    pub async fn remove(&self, net: &NetworkId) -> bool {
        let mut map = self.map.lock().await;
        let Some(sb) = map.remove(net) else { return false };
        if let Err(e) = super::remove_container_bridge(&self.ns, sb.holder.vni).await {
            warn!(network = %sb.name, vni = sb.holder.vni, error = %e, "could not remove the node-side bridge of its containers");
        }
        if let Err(e) = super::remove_vxlan(&self.ns, &sb.ns, sb.holder.vni).await {
            warn!(network = %sb.name, vni = sb.holder.vni, error = %e, "could not remove the vxlan device");
        }
        let _ = dp::signal_group(sb.holder.pid, nix::sys::signal::Signal::SIGKILL);
        info!(network = %sb.name, vni = sb.holder.vni, "sandbox removed");
        self.save(&map).await;
        true
    }

    /// A handle on the network's sandbox namespace (None: the node is not on it).
    pub async fn netns(&self, net: &NetworkId) -> Option<std::fs::File> {
        self.map.lock().await.get(net).and_then(|sb| sb.ns.try_clone().ok())
    }

    /// Plugs a task's node-side veth end into the network's bridge.
    pub async fn plug(&self, net: &NetworkId, host_if: &str) -> Result<(), SandboxError> {
        let map = self.map.lock().await;
        let sb = map.get(net).ok_or_else(|| SandboxError::NoSandbox(net.clone()))?;
        super::plug(&self.ns, &sb.ns, host_if.to_string()).await.map_err(|source| SandboxError::Kernel { network: sb.name.clone(), vni: sb.holder.vni, what: "plug a task", source: Box::new(source) })
    }

    /// Plugs a container's node-side veth end (in the node's namespace) into the network's
    /// node-side bridge, making the bridge and its trunk into the sandbox if they are missing
    /// (a sandbox made again after a restart). Idempotent; an end not in the node's namespace
    /// (an older daemon put it in the sandbox, on `br0`) is left as it is.
    pub async fn plug_container(&self, net: &NetworkId, host_if: &str) -> Result<(), SandboxError> {
        let map = self.map.lock().await;
        let sb = map.get(net).ok_or_else(|| SandboxError::NoSandbox(net.clone()))?;
        let (sb_ns, vni, mtu, host_if) = (
            sb.ns.try_clone().map_err(|e| SandboxError::Kernel { network: sb.name.clone(), vni: sb.holder.vni, what: "plug a container", source: Box::new(e.into()) })?,
            sb.holder.vni,
            self.mtu,
            host_if.to_string(),
        );
        self.ns
            .run(move |ctx| -> Result<(), NsError> {
                let snl = ctx.netlink_in(&sb_ns)?;
                ctx.block_on(async {
                    let bridge = super::ensure_container_bridge(ctx.home(), &snl, crate::netns::raw(&sb_ns), vni, mtu).await?;
                    if let Some(l) = ctx.home().link(&host_if).await? {
                        if l.master != Some(bridge) {
                            ctx.home().set_master(&host_if, &super::container_bridge_name(vni)).await?;
                        }
                    }
                    Ok::<(), crate::netlink::Error>(())
                })?;
                Ok(())
            })
            .await
            .and_then(|r| r)
            .map_err(|source| SandboxError::Kernel { network: sb.name.clone(), vni: sb.holder.vni, what: "plug a container", source: Box::new(source) })
    }

    /// Removes a task's veth end from the sandbox (the task's end goes with it).
    pub async fn unplug(&self, net: &NetworkId, host_if: &str) -> Result<(), SandboxError> {
        let map = self.map.lock().await;
        let Some(sb) = map.get(net) else { return Ok(()) };
        super::unplug(&self.ns, &sb.ns, host_if.to_string()).await.map_err(|source| SandboxError::Kernel {
            network: sb.name.clone(),
            vni: sb.holder.vni,
            what: "unplug a task",
            source: Box::new(source),
        })
    }
}

#[async_trait::async_trait]
impl OverlayKernel for Sandboxes {
    async fn sync(&self, network: &NetworkId, desired: Vec<Remote>, scope: Scope) -> Result<Option<Vec<Op>>, SinkError> {
        let map = self.map.lock().await;
        let Some(sb) = map.get(network) else { return Ok(None) };
        let ops = super::sync_remotes(&self.ns, &sb.ns, sb.holder.vni, desired, scope).await.map_err(|source| SandboxError::Kernel {
            network: sb.name.clone(),
            vni: sb.holder.vni,
            what: "program remote endpoints",
            source: Box::new(source),
        })?;
        Ok(Some(ops))
    }
}
