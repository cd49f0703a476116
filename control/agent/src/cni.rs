//! Containers of other runtimes on the node's networks (issue 22): the daemon's side of the
//! CNI plugin. A container's interface is attached as a task of its node is: the manager
//! gives it an address (a network attachment task), the node holds the network (sandbox and
//! gossip), plugs a veth into the network's bridge, serves the container's resolver on
//! 127.0.0.11, adds its namespace to the load balancer and publishes its endpoint. What is
//! attached is kept in `<data-dir>/cni.json`: a restarted daemon adopts it, and a container
//! whose namespace is gone (no DEL came) is taken off by the watch.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use swarmnet_api::cni::{CniAttached, CniGc, CniRemoved, CniRequest, CniRoute, ContainerAttach, ContainerAttached, ContainerDetach, ContainerDetached};
use swarmnet_api::{ApiError, ApiRequest, Assignment, Attachment, ErrorKind};
use swarmnet_dataplane::cni::{self as dp, ContainerNet, NsId, CONTAINER_LINK, NODE_GATEWAY};
use swarmnet_dataplane::state::{self, StateFile};
use swarmnet_dataplane::task::host_if_name;
use swarmnet_types::{mac_for, EndpointState, Id};
use tracing::{error, info, warn};

use crate::runtime::{lock, Runtime};
use crate::session::Agent;

/// How often the watch looks for containers whose namespace went without a DEL, and
/// retries telling the manager about detaches it missed.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// One container interface on one network, as kept across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub task_id: Id,
    pub name: String,
    pub container_id: String,
    pub ifname: String,
    /// The network as the conf named it (what a DEL names it by).
    pub network_arg: String,
    pub attachment: Attachment,
    pub netns: PathBuf,
    pub ns: NsId,
    pub host_if: String,
    pub host_link: String,
    pub host_link_mac: String,
    pub container_link_mac: String,
}

impl Record {
    fn assignment(&self) -> Assignment {
        Assignment {
            task_id: self.task_id.clone(),
            name: self.name.clone(),
            service_id: None,
            service_name: None,
            ports: Vec::new(),
            command: Vec::new(),
            env: Vec::new(),
            restart: false,
            attachments: vec![self.attachment.clone()],
        }
    }

    fn container_net(&self, mtu: u32) -> ContainerNet {
        ContainerNet {
            netns: self.netns.clone(),
            host_if: self.host_if.clone(),
            ifname: self.ifname.clone(),
            address: self.attachment.address,
            prefix: self.attachment.network.subnet.prefix(),
            mac: mac_for(self.attachment.address),
            mtu,
            host_link: self.host_link.clone(),
        }
    }
}

/// What survives a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    /// By [`key`].
    attached: BTreeMap<String, Record>,
    /// Detaches the manager has not confirmed yet (it was unreachable).
    #[serde(default)]
    unconfirmed: Vec<ContainerDetach>,
}

fn key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

/// The node's attached containers.
pub struct Containers {
    rt: Arc<Runtime>,
    file: StateFile,
    saved: Mutex<Saved>,
    /// Each attached interface's resolver (served while it is held).
    resolvers: Mutex<HashMap<String, swarmnet_dns::server::Listener>>,
    /// One operation at a time per container interface.
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Requests to the manager under way: a burst of ADDs (a node starting 100 containers)
    /// must stay under 2377's cap of connections per address, beside the session's own.
    calls: tokio::sync::Semaphore,
}

/// At most this many requests of containers to the manager at once.
const MANAGER_CALLS: usize = 8;

fn err(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
    ApiError::new(kind, msg.into())
}

impl Containers {
    /// Reads what an earlier daemon attached and holds its networks at once (before the
    /// node prunes the networks nothing holds); [`Agent::adopt_containers`] plugs them back.
    pub fn open(rt: Arc<Runtime>, data_dir: &Path) -> anyhow::Result<Containers> {
        let path = data_dir.join("cni.json");
        let (saved, aside): (Saved, _) = state::read_or_set_aside(&path)?;
        if let Some(aside) = aside {
            error!(path = %path.display(), kept_as = %aside.display(), "the record of attached containers is corrupt: set aside; their interfaces stay until their runtime deletes them");
        }
        for r in saved.attached.values() {
            rt.membership().hold(&r.attachment.network, &r.task_id);
        }
        Ok(Containers {
            rt,
            file: StateFile::new(path, 0o600),
            saved: Mutex::new(saved),
            resolvers: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            calls: tokio::sync::Semaphore::new(MANAGER_CALLS),
        })
    }

    fn guard(&self, k: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.busy).entry(k.to_string()).or_default().clone()
    }

    async fn save(&self, f: impl FnOnce(&mut Saved)) {
        let pending = {
            let mut g = lock(&self.saved);
            f(&mut g);
            self.file.prepare(&*g)
        };
        if let Err(e) = match pending {
            Ok(p) => p.write().await,
            Err(e) => Err(e),
        } {
            error!(error = %e, "could not save the record of attached containers");
        }
    }

    /// Every attached container interface.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.saved).attached.values().cloned().collect()
    }

    fn attached(&self, r: &Record) -> CniAttached {
        let net = &r.attachment.network;
        let (search, options) = self.rt.dns().search_and_options();
        CniAttached {
            task_id: r.task_id.clone(),
            name: r.name.clone(),
            network: net.name.clone(),
            ifname: r.ifname.clone(),
            mac: swarmnet_dataplane::netlink::fmt_mac(&mac_for(r.attachment.address)),
            mtu: self.rt.mtu,
            address: r.attachment.address,
            prefix: net.subnet.prefix(),
            gateway: net.gateway,
            host_link: r.host_link.clone(),
            host_link_mac: r.host_link_mac.clone(),
            container_link: CONTAINER_LINK.to_string(),
            container_link_mac: r.container_link_mac.clone(),
            routes: vec![CniRoute { dst: net.subnet.to_string(), gw: None }, CniRoute { dst: "0.0.0.0/0".into(), gw: Some(NODE_GATEWAY) }],
            nameservers: vec![swarmnet_dns::resolvconf::RESOLVER_ADDR.to_string()],
            search,
            options,
        }
    }

    /// Plugs a record's interface into the node's side of its network: hold, sandbox and
    /// gossip, the bridge, the load balancer, the resolver, the endpoint.
    async fn connect(&self, r: &Record, netns: &std::fs::File) -> anyhow::Result<()> {
        let net = &r.attachment.network;
        self.rt.membership().hold(net, &r.task_id);
        self.rt.membership().settle(&net.id, true).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        self.rt.sandboxes().plug(&net.id, &r.host_if).await?;
        if let Some(lb) = self.rt.lb() {
            lb.backend.add_task(&r.task_id, netns, &[net.vni]).await.map_err(|e| anyhow::anyhow!("load balancer: add the container's namespace: {e}"))?;
        }
        let l = self.rt.dns().serve_task(&self.rt.ns, netns, &r.task_id, vec![net.id.clone()]).await?;
        lock(&self.resolvers).insert(key(&r.container_id, &r.ifname), l);
        self.rt.publish(&r.assignment(), EndpointState::Active);
        Ok(())
    }

    /// Takes a record's interface off: the endpoint, the load balancer, the resolver, the
    /// links, the hold. Whatever is gone already is fine.
    async fn disconnect(&self, r: &Record) {
        let net = &r.attachment.network;
        self.rt.withdraw(&r.assignment());
        if let Some(lb) = self.rt.lb() {
            if let Err(e) = lb.backend.remove_task(&r.task_id, None, &[net.vni]).await {
                warn!(container = %r.container_id, network = %net.name, error = %e, "load balancer: could not remove the container's namespace");
            }
        }
        lock(&self.resolvers).remove(&key(&r.container_id, &r.ifname));
        if let Err(e) = self.rt.sandboxes().unplug(&net.id, &r.host_if).await {
            warn!(container = %r.container_id, network = %net.name, error = %e, "could not unplug the container's interface");
        }
        // The namespace's link to its node goes with its last interface.
        let last = !lock(&self.saved).attached.values().any(|o| o.ns == r.ns && o.task_id != r.task_id);
        if let Err(e) = dp::detach(&self.rt.ns, r.host_if.clone(), r.attachment.address, r.host_link.clone(), last).await {
            warn!(container = %r.container_id, network = %net.name, error = %e, "could not remove the container's links");
        }
        self.rt.membership().release(&net.id, &r.task_id);
        if let Err(e) = self.rt.membership().settle(&net.id, false).await {
            warn!(network = %net.name, error = %e, "could not settle the node's presence on the network");
        }
    }
}

impl Agent {
    /// A request of the containers' to the manager, at most [`MANAGER_CALLS`] at once.
    async fn manager_call<T: serde::de::DeserializeOwned>(&self, request: ApiRequest) -> anyhow::Result<Result<T, ApiError>> {
        let _permit = self.containers.calls.acquire().await?;
        self.call_typed(request).await
    }

    /// CNI ADD.
    pub async fn cni_add(&self, req: CniRequest) -> Result<CniAttached, ApiError> {
        let c = &self.containers;
        let Some(netns) = req.netns.clone() else { return Err(err(ErrorKind::Invalid, "CNI_NETNS is not set: ADD needs the container's network namespace")) };
        let netns = PathBuf::from(netns);
        let ns = dp::ns_id(&netns).map_err(|e| err(ErrorKind::Invalid, format!("CNI_NETNS {}: {e}", netns.display())))?;
        let k = key(&req.container_id, &req.ifname);
        let g = c.guard(&k);
        let _held = g.lock().await;
        if let Some(r) = lock(&c.saved).attached.get(&k).cloned() {
            if r.ns == ns {
                // The same ADD again (a runtime's retry): the same answer.
                return Ok(c.attached(&r));
            }
            return Err(err(
                ErrorKind::Conflict,
                format!("container {} interface {} is attached to network {} already, in namespace {}: DEL it first", req.container_id, req.ifname, r.attachment.network.name, r.netns.display()),
            ));
        }
        let spec = ContainerAttach { network: req.network.clone(), container_id: req.container_id.clone(), ifname: req.ifname.clone(), name: req.name.clone() };
        let given: ContainerAttached =
            self.manager_call(ApiRequest::Attach { spec }).await.map_err(|e| err(ErrorKind::Unavailable, format!("the swarm's manager cannot be reached from this node: {e:#}")))??;
        let at = given.attachment;
        let host_if = host_if_name(&given.task_id, 0);
        let host_link = dp::host_link_name(ns);
        let spec = ContainerNet {
            netns: netns.clone(),
            host_if: host_if.clone(),
            ifname: req.ifname.clone(),
            address: at.address,
            prefix: at.network.subnet.prefix(),
            mac: mac_for(at.address),
            mtu: c.rt.mtu,
            host_link: host_link.clone(),
        };
        let made = match dp::attach(&c.rt.ns, spec).await {
            Ok(m) => m,
            Err(e) => {
                self.detach_at_manager(&req.network, &req.container_id, &req.ifname).await;
                return Err(err(ErrorKind::Conflict, format!("container {} network {} vni {}: {e}", req.container_id, at.network.name, at.network.vni)));
            }
        };
        let r = Record {
            task_id: given.task_id,
            name: given.name,
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            network_arg: req.network.clone(),
            attachment: at,
            netns,
            ns: made.ns,
            host_if,
            host_link,
            host_link_mac: made.host_link_mac,
            container_link_mac: made.container_link_mac,
        };
        // Recorded before it is plugged: a crash from here on leaves something to clean up.
        c.save(|s| {
            s.attached.insert(k.clone(), r.clone());
        })
        .await;
        if let Err(e) = c.connect(&r, &made.netns).await {
            c.disconnect(&r).await;
            c.save(|s| {
                s.attached.remove(&k);
            })
            .await;
            self.detach_at_manager(&req.network, &req.container_id, &req.ifname).await;
            return Err(err(ErrorKind::Unavailable, format!("container {} network {} vni {}: {e:#}", req.container_id, r.attachment.network.name, r.attachment.network.vni)));
        }
        info!(container = %r.container_id, ifname = %r.ifname, network = %r.attachment.network.name, ip = %r.attachment.address, name = %r.name, task = %r.task_id, "container attached");
        Ok(c.attached(&r))
    }

    /// CNI CHECK: the container's interface is as ADD made it, and the node still serves it.
    pub async fn cni_check(&self, req: CniRequest) -> Result<CniAttached, ApiError> {
        let c = &self.containers;
        let k = key(&req.container_id, &req.ifname);
        let Some(r) = lock(&c.saved).attached.get(&k).cloned() else {
            return Err(err(ErrorKind::NotFound, format!("container {} interface {} is not attached on this node", req.container_id, req.ifname)));
        };
        let mut drift = dp::check(&c.rt.ns, r.container_net(c.rt.mtu), r.ns).await.map_err(|e| err(ErrorKind::Internal, format!("container {}: read its interfaces: {e}", req.container_id)))?;
        if !lock(&c.resolvers).contains_key(&k) {
            drift.push("its resolver on 127.0.0.11 is not served".into());
        }
        if !c.rt.membership().wanted().contains(&r.attachment.network.id) {
            drift.push(format!("the node does not hold network {}", r.attachment.network.name));
        }
        if !drift.is_empty() {
            return Err(err(ErrorKind::Conflict, format!("container {} network {}: {}", req.container_id, r.attachment.network.name, drift.join("; "))));
        }
        Ok(c.attached(&r))
    }

    /// CNI DEL: done also for a container this node does not know (a DEL repeated), and for
    /// one whose namespace is gone.
    pub async fn cni_del(&self, req: CniRequest) -> Result<CniRemoved, ApiError> {
        let k = key(&req.container_id, &req.ifname);
        let removed = self.remove_container(&k, Some(&req.network)).await;
        Ok(CniRemoved { removed: removed.into_iter().collect() })
    }

    /// CNI GC: what is attached to `spec.network` here and not in `spec.valid` goes.
    pub async fn cni_gc(&self, spec: CniGc) -> Result<CniRemoved, ApiError> {
        let stale: Vec<String> = self
            .containers
            .records()
            .into_iter()
            .filter(|r| {
                (r.network_arg == spec.network || r.attachment.network.name == spec.network || r.attachment.network.id == spec.network)
                    && !spec.valid.iter().any(|(c, i)| *c == r.container_id && *i == r.ifname)
            })
            .map(|r| key(&r.container_id, &r.ifname))
            .collect();
        let mut removed = Vec::new();
        for k in stale {
            removed.extend(self.remove_container(&k, None).await);
        }
        Ok(CniRemoved { removed })
    }

    /// Takes container interface `k` off its network and frees its address at the manager
    /// (later, if the manager cannot be reached now). `network`: the network a DEL names, for
    /// an interface this node has no record of.
    async fn remove_container(&self, k: &str, network: Option<&str>) -> Option<Id> {
        let c = &self.containers;
        let g = c.guard(k);
        let _held = g.lock().await;
        let r = lock(&c.saved).attached.get(k).cloned();
        let (network, container_id, ifname) = match &r {
            Some(r) => (r.network_arg.clone(), r.container_id.clone(), r.ifname.clone()),
            None => {
                let (cid, ifname) = k.rsplit_once('/').unwrap_or((k, ""));
                (network.unwrap_or_default().to_string(), cid.to_string(), ifname.to_string())
            }
        };
        if let Some(r) = &r {
            c.disconnect(r).await;
            c.save(|s| {
                s.attached.remove(k);
            })
            .await;
            info!(container = %r.container_id, ifname = %r.ifname, network = %r.attachment.network.name, ip = %r.attachment.address, "container detached");
        }
        if !network.is_empty() {
            self.detach_at_manager(&network, &container_id, &ifname).await;
        }
        r.map(|r| r.task_id)
    }

    /// Frees a container's address at the manager; if it cannot be reached, the detach is
    /// kept and retried by the watch.
    async fn detach_at_manager(&self, network: &str, container_id: &str, ifname: &str) {
        let spec = ContainerDetach { network: network.to_string(), container_id: container_id.to_string(), ifname: ifname.to_string() };
        match self.manager_call::<ContainerDetached>(ApiRequest::Detach { spec: spec.clone() }).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind == ErrorKind::NotFound => {}
            failed => {
                warn!(container = %container_id, network = %network, error = ?failed.err().map(|e| format!("{e:#}")), "the manager could not be told that a container left: retried later");
                self.containers
                    .save(|s| {
                        if !s.unconfirmed.contains(&spec) {
                            s.unconfirmed.push(spec);
                        }
                    })
                    .await;
            }
        }
    }

    /// Plugs back what an earlier daemon attached (its namespace still there), and takes off
    /// what lost its namespace meanwhile.
    pub async fn adopt_containers(&self) {
        for r in self.containers.records() {
            let k = key(&r.container_id, &r.ifname);
            let alive = dp::ns_id(&r.netns).ok() == Some(r.ns);
            let netns = std::fs::File::open(&r.netns);
            match (alive, netns) {
                (true, Ok(f)) => {
                    if let Err(e) = self.containers.connect(&r, &f).await {
                        error!(container = %r.container_id, network = %r.attachment.network.name, error = %format!("{e:#}"), "an attached container could not be adopted: CHECK reports it");
                    } else {
                        info!(container = %r.container_id, network = %r.attachment.network.name, ip = %r.attachment.address, "attached container adopted");
                    }
                }
                _ => {
                    info!(container = %r.container_id, network = %r.attachment.network.name, netns = %r.netns.display(), "an attached container's namespace went while the daemon was away: detached");
                    self.remove_container(&k, None).await;
                }
            }
        }
    }

    /// Runs for the daemon's life: takes off containers whose namespace went without a DEL
    /// (the runtime crashed, or has no DEL to give), and retries detaches the manager missed.
    pub async fn watch_containers(self: Arc<Self>) {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            for r in self.containers.records() {
                if dp::ns_id(&r.netns).ok() != Some(r.ns) {
                    info!(container = %r.container_id, network = %r.attachment.network.name, netns = %r.netns.display(), "an attached container's namespace is gone without a DEL: detached");
                    self.remove_container(&key(&r.container_id, &r.ifname), None).await;
                }
            }
            let unconfirmed = lock(&self.containers.saved).unconfirmed.clone();
            for spec in unconfirmed {
                let done = match self.manager_call::<ContainerDetached>(ApiRequest::Detach { spec: spec.clone() }).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => e.kind == ErrorKind::NotFound || e.kind == ErrorKind::Invalid,
                    Err(_) => false,
                };
                if done {
                    self.containers.save(|s| s.unconfirmed.retain(|u| *u != spec)).await;
                }
            }
        }
    }

    /// `swarm leave`: every container's interface goes (the node leaves the swarm; the
    /// manager forgets the node's tasks with it).
    pub async fn leave_containers(&self) {
        for r in self.containers.records() {
            let c = &self.containers;
            c.disconnect(&r).await;
            c.save(|s| {
                s.attached.remove(&key(&r.container_id, &r.ifname));
            })
            .await;
        }
    }
}
