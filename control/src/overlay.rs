//! The node's overlay networks: one sandbox per network with local tasks, made when the
//! first task joins and removed when the last leaves. A sandbox namespace is held by a small
//! holder process (`swarmnet sandbox-hold`), so it, and the tasks' links in it, outlive a
//! daemon restart; the restarted daemon adopts it (like tasks, ADR 0004).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use swarmnet_dataplane::netns::NsWorker;
use swarmnet_dataplane::overlay::{self as ov, Remote, SandboxSpec};
use swarmnet_dataplane::task as dp;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::model::{Id, Network};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    start_time: u64,
    vni: u32,
}

struct Sandbox {
    ns: File,
    holder: Holder,
    users: BTreeSet<Id>,
}

pub struct Overlay {
    ns: NsWorker,
    dir: PathBuf,
    local: Ipv4Addr,
    /// The cluster's data-path port, from the manager (until then the default).
    port: std::sync::atomic::AtomicU16,
    mtu: u32,
    sandboxes: Mutex<HashMap<Id, Sandbox>>,
}

impl Overlay {
    /// Adopts the sandboxes an earlier daemon left (their holders still running).
    pub fn open(ns: NsWorker, data_dir: &std::path::Path, local: Ipv4Addr, task_mtu: u32) -> anyhow::Result<Overlay> {
        let dir = data_dir.join("sandboxes");
        std::fs::create_dir_all(&dir)?;
        let mut sandboxes = HashMap::new();
        let saved: BTreeMap<Id, Holder> = std::fs::read(dir.join("state.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        for (net, h) in saved {
            if dp::proc_start_time(h.pid) == Some(h.start_time) {
                match dp::netns_of(h.pid) {
                    Ok(f) => {
                        info!(network = %net, vni = h.vni, pid = h.pid, "adopted the sandbox of an earlier daemon");
                        sandboxes.insert(net, Sandbox { ns: f, holder: h, users: BTreeSet::new() });
                    }
                    Err(e) => warn!(network = %net, error = %e, "could not adopt sandbox"),
                }
            }
        }
        let o = Overlay { ns, dir, local, port: std::sync::atomic::AtomicU16::new(4789), mtu: task_mtu, sandboxes: Mutex::new(sandboxes) };
        Ok(o)
    }

    fn save(&self, sandboxes: &HashMap<Id, Sandbox>) {
        let m: BTreeMap<&Id, &Holder> = sandboxes.iter().map(|(k, v)| (k, &v.holder)).collect();
        let r = serde_json::to_vec_pretty(&m).map_err(std::io::Error::other).and_then(|b| std::fs::write(self.dir.join("state.json"), b));
        if let Err(e) = r {
            warn!(error = %e, "could not save sandbox state");
        }
    }

    /// The cluster's data-path port, as the manager says at each session.
    pub fn set_port(&self, port: u16) {
        self.port.store(port, std::sync::atomic::Ordering::Relaxed);
    }

    /// Networks with a sandbox on this node.
    pub async fn networks(&self) -> Vec<Id> {
        self.sandboxes.lock().await.keys().cloned().collect()
    }

    /// Plugs a task's veth end into the network's sandbox, making the sandbox if needed.
    pub async fn attach(&self, task: &Id, net: &Network, host_if: &str) -> anyhow::Result<bool> {
        let mut sbs = self.sandboxes.lock().await;
        let created = !sbs.contains_key(&net.id);
        if created {
            let ns = self.ns.run(|ctx| ctx.new_netns()).await??;
            let exe = std::env::current_exe()?;
            let child = dp::spawn_in_netns(&ns, &[exe.display().to_string(), "sandbox-hold".into()], &self.dir.join(format!("{}.log", net.id)), &[], &[])?;
            let pid = child.id().unwrap_or(0);
            // The holder is not waited for here: it must outlive this daemon.
            drop(child);
            let holder = Holder { pid, start_time: dp::proc_start_time(pid).unwrap_or(0), vni: net.vni };
            info!(network = %net.name, vni = net.vni, holder = pid, "sandbox created");
            sbs.insert(net.id.clone(), Sandbox { ns, holder, users: BTreeSet::new() });
            self.save(&sbs);
        }
        let Some(sb) = sbs.get_mut(&net.id) else { anyhow::bail!("sandbox of network {} vanished", net.name) };
        let spec = SandboxSpec { vni: net.vni, gateway: net.gateway, prefix: net.subnet.prefix(), local: self.local, port: self.port.load(std::sync::atomic::Ordering::Relaxed), mtu: self.mtu };
        ov::setup_sandbox(&self.ns, &sb.ns, spec).await.map_err(|e| anyhow::anyhow!("network {} vni {}: sandbox: {e}", net.name, net.vni))?;
        ov::plug(&self.ns, &sb.ns, host_if.to_string()).await.map_err(|e| anyhow::anyhow!("network {}: plug {host_if}: {e}", net.name))?;
        sb.users.insert(task.clone());
        Ok(created)
    }

    /// Unplugs a task; the last one out removes the sandbox (then: true).
    pub async fn detach(&self, task: &Id, net: &Id, host_if: &str) -> bool {
        let mut sbs = self.sandboxes.lock().await;
        let Some(sb) = sbs.get_mut(net) else { return false };
        if let Err(e) = ov::unplug(&self.ns, &sb.ns, host_if.to_string()).await {
            warn!(network = %net, link = host_if, error = %e, "could not unplug");
        }
        sb.users.remove(task);
        if sb.users.is_empty() {
            if let Some(sb) = sbs.remove(net) {
                if let Err(e) = ov::remove_vxlan(&self.ns, &sb.ns, sb.holder.vni).await {
                    warn!(network = %net, vni = sb.holder.vni, error = %e, "could not remove the vxlan device");
                }
                let _ = dp::signal_group(sb.holder.pid, nix::sys::signal::Signal::SIGKILL);
                info!(network = %net, "last task left: sandbox removed");
            }
            self.save(&sbs);
            return true;
        }
        false
    }

    /// Programs the network's remote endpoints (no-op without a local sandbox); with
    /// `keep_stale`, adds and corrects only.
    pub async fn sync(&self, net: &Id, remotes: Vec<Remote>, keep_stale: bool) -> anyhow::Result<usize> {
        let sbs = self.sandboxes.lock().await;
        let Some(sb) = sbs.get(net) else { return Ok(0) };
        let ops = ov::sync_remotes(&self.ns, &sb.ns, sb.holder.vni, remotes, keep_stale)
            .await
            .map_err(|e| anyhow::anyhow!("network {net} vni {}: program remote endpoints: {e}", sb.holder.vni))?;
        Ok(ops.len())
    }
}

/// How long after start the table is taken as still filling: entries are added but none
/// removed, so a restarted agent does not cut traffic that its kernel state still carries.
const WARMUP: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps every local sandbox's remote entries equal to the endpoint table: on every change
/// of a network, on request (`dirty`), once when the warm-up ends, and every 30 s against
/// drift.
pub async fn follow(overlay: std::sync::Arc<Overlay>, gossip: swarmnet_gossip::server::GossipHandle, mut dirty: tokio::sync::mpsc::UnboundedReceiver<Id>) {
    use swarmnet_gossip::Event;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut events = gossip.subscribe();
    let mut resync = tokio::time::interval(std::time::Duration::from_secs(30));
    let local = gossip.me.addr.ip();
    let warm_until = tokio::time::Instant::now() + WARMUP;
    let mut warm = false;
    loop {
        let mut nets: BTreeSet<Id> = BTreeSet::new();
        let mut all = false;
        tokio::select! {
            _ = tokio::time::sleep_until(warm_until), if !warm => {
                warm = true;
                all = true;
            }
            e = events.recv() => match e {
                Ok(Event::Endpoint(c)) => { nets.insert(c.network); }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => all = true,
                Err(RecvError::Closed) => return,
            },
            n = dirty.recv() => match n {
                Some(n) => { nets.insert(n); }
                None => return,
            },
            _ = resync.tick() => all = true,
        }
        loop {
            match events.try_recv() {
                Ok(Event::Endpoint(c)) => {
                    nets.insert(c.network);
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(_)) => all = true,
                Err(_) => break,
            }
        }
        while let Ok(n) = dirty.try_recv() {
            nets.insert(n);
        }
        if all {
            nets.extend(overlay.networks().await);
        }
        for net in nets {
            let remotes: Vec<Remote> = gossip
                .endpoints(&net)
                .await
                .into_iter()
                .filter(|e| e.vtep != local)
                .filter_map(|e| match e.vtep {
                    std::net::IpAddr::V4(v) => Some(Remote { ip: e.ip, mac: e.mac, vtep: v }),
                    std::net::IpAddr::V6(_) => None,
                })
                .collect();
            match overlay.sync(&net, remotes, !warm).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(network = %net, changes = n, "overlay entries updated"),
                Err(e) => warn!(network = %net, error = %format!("{e:#}"), "overlay sync failed"),
            }
        }
    }
}
