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
    /// The conf's name (what GC names it by).
    #[serde(default)]
    pub conf_name: String,
    pub attachment: Attachment,
    pub netns: PathBuf,
    pub ns: NsId,
    /// The namespace's cookie: a namespace made later at the same path, whose inode number
    /// may be the old one's again, is another one.
    #[serde(default)]
    pub cookie: u64,
    pub host_link_mac: String,
    pub container_link_mac: String,
    #[serde(default)]
    pub host_if_mac: String,
    /// Its default route is ours.
    #[serde(default = "yes")]
    pub default_route: bool,
    /// Its links were made (false: recorded before they were: a crash left it half made).
    #[serde(default = "yes")]
    pub complete: bool,
    /// A DEL was answered: its links and the manager's record of it go in the background
    /// (a daemon that stopped meanwhile finishes it when it starts).
    #[serde(default)]
    pub leaving: bool,
}

fn yes() -> bool {
    true
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
            vni: self.attachment.network.vni,
            host_if: self.host_if(),
            ifname: self.ifname.clone(),
            address: self.attachment.address,
            prefix: self.attachment.network.subnet.prefix(),
            mac: mac_for(self.attachment.address),
            mtu,
            host_link: self.host_link(),
        }
    }

    /// The node's end of its veth (in the node's namespace, a port of the network's
    /// node-side bridge), named as a task's.
    fn host_if(&self) -> String {
        host_if_name(&self.task_id, 0)
    }

    /// The node's end of its namespace's link to the node.
    fn host_link(&self) -> String {
        dp::host_link_name(self.ns)
    }

    fn detach_spec(&self) -> ContainerDetach {
        ContainerDetach { network: self.network_arg.clone(), container_id: self.container_id.clone(), ifname: self.ifname.clone(), task_id: Some(self.task_id.clone()) }
    }

    /// Whether a request naming network `n` means this record's network.
    fn on(&self, n: &str) -> bool {
        self.network_arg == n || self.attachment.network.name == n || self.attachment.network.id == n
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

/// The guard of a container namespace: held while an interface's links in it are being
/// deleted, so that an ADD into the same namespace waits for them to be gone.
fn ns_key(ns: NsId) -> String {
    format!("netns {}:{}", ns.dev, ns.ino)
}

/// What an attached container has while this daemon runs: its resolver, and a handle on its
/// namespace (so DEL finds its links even after the runtime removed the namespace's path).
struct Live {
    _resolver: swarmnet_dns::server::Listener,
    netns: std::fs::File,
}

/// The node's attached containers.
pub struct Containers {
    rt: Arc<Runtime>,
    file: StateFile,
    saved: Mutex<Saved>,
    live: Mutex<HashMap<String, Live>>,
    /// One operation at a time per container interface.
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Requests to the manager under way: a burst of ADDs (a node starting 100 containers)
    /// must stay under 2377's cap of connections per address, beside the session's own.
    calls: tokio::sync::Semaphore,
    /// Whether this daemon made the node's table for containers (egress, bridged frames).
    table: tokio::sync::Mutex<bool>,
}

/// At most this many requests of containers to the manager at once.
const MANAGER_CALLS: usize = 8;

/// Whether [`Agent::remove_container`] returns after the whole removal, or once the
/// container is off the network and the rest (links, manager) goes on in the background.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Finish {
    Now,
    Later,
}

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
            live: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            calls: tokio::sync::Semaphore::new(MANAGER_CALLS),
            table: tokio::sync::Mutex::new(false),
        })
    }

    fn guard(&self, k: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut busy = lock(&self.busy);
        // Those nobody holds any more go (only the map has them).
        busy.retain(|_, g| Arc::strong_count(g) > 1);
        busy.entry(k.to_string()).or_default().clone()
    }

    /// Changes the record and writes it; an error: it is not on disk.
    async fn save(&self, f: impl FnOnce(&mut Saved)) -> anyhow::Result<()> {
        let pending = {
            let mut g = lock(&self.saved);
            f(&mut g);
            self.file.prepare(&*g)
        };
        match pending {
            Ok(p) => p.write().await,
            Err(e) => Err(e),
        }
        .map_err(|e| anyhow::anyhow!("save the record of attached containers ({}): {e}", self.file.path().display()))
    }

    /// [`Containers::save`], an error only logged (the change is made in memory, and the
    /// next save writes it).
    async fn save_or_log(&self, f: impl FnOnce(&mut Saved)) {
        if let Err(e) = self.save(f).await {
            error!(error = %format!("{e:#}"), "could not save the record of attached containers");
        }
    }

    fn record(&self, k: &str) -> Option<Record> {
        lock(&self.saved).attached.get(k).cloned()
    }

    /// Every attached container interface (not those a DEL took off already).
    pub fn records(&self) -> Vec<Record> {
        lock(&self.saved).attached.values().filter(|r| !r.leaving).cloned().collect()
    }

    /// Every record, those being taken off included.
    fn all_records(&self) -> Vec<Record> {
        lock(&self.saved).attached.values().cloned().collect()
    }

    fn attached(&self, r: &Record) -> CniAttached {
        let net = &r.attachment.network;
        let (search, options) = self.rt.dns().search_and_options();
        let mut routes = vec![CniRoute { dst: net.subnet.to_string(), gw: None }];
        if r.default_route {
            routes.push(CniRoute { dst: "0.0.0.0/0".into(), gw: Some(NODE_GATEWAY) });
        }
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
            host_link: r.host_link(),
            host_link_mac: r.host_link_mac.clone(),
            container_link: CONTAINER_LINK.to_string(),
            container_link_mac: r.container_link_mac.clone(),
            host_if: r.host_if(),
            host_if_mac: r.host_if_mac.clone(),
            routes,
            nameservers: vec![swarmnet_dns::resolvconf::RESOLVER_ADDR.to_string()],
            search,
            options,
        }
    }

    /// Makes the node's nftables table for containers, once per daemon (the first ADD or
    /// adoption): their egress masqueraded, the bridged overlay frames untracked.
    async fn ensure_table(&self) -> anyhow::Result<()> {
        let mut made = self.table.lock().await;
        if !*made {
            dp::apply_node_table().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            *made = true;
        }
        Ok(())
    }

    /// Puts the node on a record's network for it (hold; sandbox and gossip): the sandbox's
    /// namespace, where the veth's other end belongs.
    async fn join(&self, r: &Record) -> anyhow::Result<std::fs::File> {
        let net = &r.attachment.network;
        self.rt.membership().hold(net, &r.task_id);
        self.rt.membership().settle(&net.id, true).await.map_err(|e| anyhow::anyhow!("the node could not join the network: {e}"))?;
        self.rt.sandboxes().netns(&net.id).await.ok_or_else(|| anyhow::anyhow!("the network's sandbox is gone"))
    }

    /// Gives back a record's hold on its network (the node leaves a network nothing holds
    /// any more) and forgets the record: what a failed ADD undoes before it plugged anything.
    async fn abandon(&self, k: &str, r: &Record) {
        let net = &r.attachment.network;
        self.rt.membership().release(&net.id, &r.task_id);
        if let Err(e) = self.rt.membership().settle(&net.id, false).await {
            warn!(network = %net.name, error = %e, "could not settle the node's presence on the network");
        }
        self.save_or_log(|s| {
            s.attached.remove(k);
        })
        .await;
    }

    /// Plugs a record's interface (its links made, the node on its network) into the node's
    /// side of it: the bridge (`adopted`: made by an earlier daemon; a fresh one is born a
    /// port of it), the load balancer, the resolver, the endpoint.
    async fn connect(&self, r: &Record, netns: std::fs::File, adopted: bool) -> anyhow::Result<()> {
        let net = &r.attachment.network;
        self.ensure_table().await?;
        if adopted {
            self.rt.sandboxes().plug_container(&net.id, &r.host_if()).await?;
        }
        if let Some(lb) = self.rt.lb() {
            lb.backend.add_task(&r.task_id, &netns, &[net.vni]).await.map_err(|e| anyhow::anyhow!("load balancer: add the container's namespace: {e}"))?;
        }
        let resolver = self.rt.dns().serve_task(&self.rt.ns, &netns, &r.task_id, vec![net.id.clone()]).await?;
        lock(&self.live).insert(key(&r.container_id, &r.ifname), Live { _resolver: resolver, netns });
        self.rt.publish(&r.assignment(), EndpointState::Active);
        Ok(())
    }

    /// Takes a record's interface off: the endpoint, the load balancer, the resolver, its
    /// links, the hold. Whatever is gone already is fine.
    async fn disconnect(&self, r: &Record) {
        let netns = self.unplug(r).await;
        self.unlink(r, netns).await;
    }

    /// The first half of [`Containers::disconnect`], what the rest of the cluster and the
    /// container see: its endpoint withdrawn, its namespace out of the load balancer, its
    /// resolver stopped. Gives back the handle on its namespace, if the daemon had one.
    async fn unplug(&self, r: &Record) -> Option<std::fs::File> {
        let net = &r.attachment.network;
        self.rt.withdraw(&r.assignment());
        let live = lock(&self.live).remove(&key(&r.container_id, &r.ifname));
        if let Some(lb) = self.rt.lb() {
            if let Err(e) = lb.backend.remove_task(&r.task_id, live.as_ref().map(|l| &l.netns), &[net.vni]).await {
                warn!(container = %r.container_id, ifname = %r.ifname, network = %net.name, error = %e, "load balancer: could not remove the container's namespace");
            }
        }
        live.map(|l| l.netns)
    }

    /// The second half of [`Containers::disconnect`]: the links (in one request, through
    /// the namespace handle `netns` if there is one) and the record's hold on its network.
    async fn unlink(&self, r: &Record, netns: Option<std::fs::File>) {
        let net = &r.attachment.network;
        let t0 = std::time::Instant::now();
        // Without a handle on the namespace (a record adopted without one), from the node's
        // side: the veth's end is in the network's sandbox.
        let sandbox = match netns {
            Some(_) => None,
            None => self.rt.sandboxes().netns(&net.id).await,
        };
        if let Err(e) = dp::detach(&self.rt.ns, netns, r.host_link(), r.host_if(), sandbox).await {
            warn!(container = %r.container_id, ifname = %r.ifname, network = %net.name, error = %e, "could not remove the container's links");
        }
        let t_links = t0.elapsed();
        self.rt.membership().release(&net.id, &r.task_id);
        if let Err(e) = self.rt.membership().settle(&net.id, false).await {
            warn!(network = %net.name, error = %e, "could not settle the node's presence on the network");
        }
        tracing::debug!(container = %r.container_id, links_us = t_links.as_micros() as u64, settle_us = (t0.elapsed() - t_links).as_micros() as u64, "container unlinked");
    }

    /// Makes a recorded interface's links and plugs it in; on failure, undoes it all (the
    /// record included) and says why.
    async fn make(&self, k: &str, mut r: Record) -> Result<Record, ApiError> {
        let net = r.attachment.network.clone();
        let what = |e: &dyn std::fmt::Display| format!("container {} interface {} network {} vni {} ({}): {e}", r.container_id, r.ifname, net.name, net.vni, r.attachment.address);
        let sandbox = match self.join(&r).await {
            Ok(sb) => sb,
            Err(e) => {
                self.abandon(k, &r).await;
                return Err(err(ErrorKind::Unavailable, what(&format!("{e:#}"))));
            }
        };
        let made = match dp::attach(&self.rt.ns, r.container_net(self.rt.mtu), sandbox).await {
            Ok(m) => m,
            Err(e) => {
                self.abandon(k, &r).await;
                return Err(err(ErrorKind::Conflict, what(&e)));
            }
        };
        r.cookie = made.cookie;
        r.host_link_mac = made.host_link_mac;
        r.container_link_mac = made.container_link_mac;
        r.host_if_mac = made.host_if_mac;
        r.default_route = made.default_route;
        r.complete = true;
        let done = r.clone();
        let saved = self.save(|s| {
            s.attached.insert(k.to_string(), done);
        });
        let connected = async {
            saved.await?;
            self.connect(&r, made.netns, false).await
        };
        if let Err(e) = connected.await {
            self.disconnect(&r).await;
            self.save_or_log(|s| {
                s.attached.remove(k);
            })
            .await;
            return Err(err(ErrorKind::Unavailable, what(&format!("{e:#}"))));
        }
        Ok(r)
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
        let t0 = std::time::Instant::now();
        let Some(netns) = req.netns.clone() else { return Err(err(ErrorKind::Invalid, "CNI_NETNS is not set: ADD needs the container's network namespace")) };
        let netns = PathBuf::from(netns);
        let ns = dp::ns_id(&netns).map_err(|e| err(ErrorKind::Invalid, format!("CNI_NETNS {}: {e}", netns.display())))?;
        let k = key(&req.container_id, &req.ifname);
        let g = c.guard(&k);
        let _held = g.lock().await;
        // Links a DEL is still deleting in this namespace (another container id's) go first.
        drop(c.guard(&ns_key(ns)).lock().await);
        if let Some(r) = c.record(&k) {
            if r.complete && r.ns == ns && r.on(&req.network) {
                // The same ADD again (a runtime's retry): the same answer.
                return Ok(c.attached(&r));
            }
            if r.complete {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("container {} interface {} is attached to network {} already, in namespace {}: DEL it first", req.container_id, req.ifname, r.attachment.network.name, r.netns.display()),
                ));
            }
            // Half made by a daemon that crashed: undone, then made again.
            c.disconnect(&r).await;
            c.save_or_log(|s| {
                s.attached.remove(&k);
            })
            .await;
        }
        let spec = ContainerAttach { network: req.network.clone(), container_id: req.container_id.clone(), ifname: req.ifname.clone(), name: req.name.clone() };
        let given: ContainerAttached =
            self.manager_call(ApiRequest::Attach { spec }).await.map_err(|e| err(ErrorKind::Unavailable, format!("the swarm's manager cannot be reached from this node: {e:#}")))??;
        let t_manager = t0.elapsed();
        let at = given.attachment;
        let r = Record {
            task_id: given.task_id,
            name: given.name,
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            network_arg: req.network.clone(),
            conf_name: req.conf_name.clone(),
            attachment: at,
            netns,
            ns,
            cookie: 0,
            host_link_mac: String::new(),
            container_link_mac: String::new(),
            host_if_mac: String::new(),
            default_route: true,
            complete: false,
            leaving: false,
        };
        // Recorded before anything is made (a crash from here on leaves it to undo), and a
        // late detach of this same task (a DEL the manager missed) is no longer wanted.
        let pending = r.clone();
        let recorded = c
            .save(|s| {
                s.unconfirmed.retain(|u| u.task_id.as_ref() != Some(&pending.task_id));
                s.attached.insert(k.clone(), pending);
            })
            .await;
        if let Err(e) = recorded {
            c.save_or_log(|s| {
                s.attached.remove(&k);
            })
            .await;
            self.detach_at_manager(r.detach_spec()).await;
            return Err(err(ErrorKind::Internal, format!("container {}: {e:#}", req.container_id)));
        }
        let r = match c.make(&k, r.clone()).await {
            Ok(r) => r,
            Err(e) => {
                self.detach_at_manager(r.detach_spec()).await;
                return Err(e);
            }
        };
        info!(container = %r.container_id, ifname = %r.ifname, network = %r.attachment.network.name, ip = %r.attachment.address, name = %r.name, task = %r.task_id, manager_ms = t_manager.as_millis() as u64, total_ms = t0.elapsed().as_millis() as u64, "container attached");
        Ok(c.attached(&r))
    }

    /// CNI CHECK: the container's interface is as ADD made it, and the node still serves it.
    pub async fn cni_check(&self, req: CniRequest) -> Result<CniAttached, ApiError> {
        let c = &self.containers;
        let k = key(&req.container_id, &req.ifname);
        let Some(r) = c.record(&k).filter(|r| r.complete && !r.leaving) else {
            return Err(err(ErrorKind::NotFound, format!("container {} interface {} is not attached on this node", req.container_id, req.ifname)));
        };
        let mut drift =
            dp::check(&c.rt.ns, r.container_net(c.rt.mtu), r.ns, r.default_route).await.map_err(|e| err(ErrorKind::Internal, format!("container {}: read its interfaces: {e}", req.container_id)))?;
        if let Some(p) = &req.netns {
            if dp::ns_id(Path::new(p)).ok() != Some(r.ns) {
                drift.push(format!("CNI_NETNS {p} is not the namespace attached ({})", r.netns.display()));
            }
        }
        if !r.on(&req.network) {
            drift.push(format!("it is attached to network {}, not {}", r.attachment.network.name, req.network));
        }
        if !lock(&c.live).contains_key(&k) {
            drift.push("its resolver on 127.0.0.11 is not served".into());
        }
        if !c.rt.membership().wanted().contains(&r.attachment.network.id) {
            drift.push(format!("the node does not hold network {}", r.attachment.network.name));
        }
        if !drift.is_empty() {
            return Err(err(ErrorKind::Conflict, format!("container {} interface {} network {}: {}", req.container_id, req.ifname, r.attachment.network.name, drift.join("; "))));
        }
        Ok(c.attached(&r))
    }

    /// CNI DEL: done also for a container this node does not know (a DEL repeated), and for
    /// one whose namespace is gone.
    pub async fn cni_del(self: &Arc<Self>, req: CniRequest) -> Result<CniRemoved, ApiError> {
        let k = key(&req.container_id, &req.ifname);
        let removed = self.remove_container(&k, None, Some(&req.network), Finish::Later).await;
        Ok(CniRemoved { removed: removed.into_iter().collect() })
    }

    /// CNI GC: what was attached through conf `spec.conf_name` here and is not in
    /// `spec.valid` goes.
    pub async fn cni_gc(self: &Arc<Self>, spec: CniGc) -> Result<CniRemoved, ApiError> {
        let stale: Vec<Record> = self.containers.records().into_iter().filter(|r| r.conf_name == spec.conf_name && !spec.valid.iter().any(|(c, i)| *c == r.container_id && *i == r.ifname)).collect();
        let mut removed = Vec::new();
        for r in stale {
            removed.extend(self.remove_container(&key(&r.container_id, &r.ifname), Some(&r.task_id), None, Finish::Now).await);
        }
        Ok(CniRemoved { removed })
    }

    /// Takes container interface `k` off its network and frees its address at the manager
    /// (later, if the manager cannot be reached now). `task`: only if it is still that
    /// attachment (a watch or GC acting on what it saw before). `network`: the network a DEL
    /// names, for an interface this node has no record of. With [`Finish::Later`], it returns
    /// once the container is off the network for everyone (endpoint, load balancer,
    /// resolver) and its record says so; its links, then the manager, follow in the
    /// background, still holding the interface's guard and its namespace's.
    async fn remove_container(self: &Arc<Self>, k: &str, task: Option<&Id>, network: Option<&str>, finish: Finish) -> Option<Id> {
        let c = &self.containers;
        let held = c.guard(k).lock_owned().await;
        let r = c.record(k);
        if task.is_some() && r.as_ref().map(|r| &r.task_id) != task {
            return None;
        }
        let Some(r) = r else {
            // No record (a DEL repeated, or of an interface this node lost): the manager is
            // told all the same.
            if let Some(n) = network.filter(|n| !n.is_empty()) {
                let (cid, ifname) = k.rsplit_once('/').unwrap_or((k, ""));
                let spec = ContainerDetach { network: n.to_string(), container_id: cid.to_string(), ifname: ifname.to_string(), task_id: None };
                if !self.tell_manager(&spec).await {
                    c.save_or_log(|s| {
                        if !s.unconfirmed.contains(&spec) {
                            s.unconfirmed.push(spec);
                        }
                    })
                    .await;
                }
            }
            return None;
        };
        let t0 = std::time::Instant::now();
        let ns_held = c.guard(&ns_key(r.ns)).lock_owned().await;
        let netns = c.unplug(&r).await;
        // Answered before the links are deleted: they are taken down and out of the way
        // first (`ifname` free, no route of ours left).
        if let (Finish::Later, Some(f)) = (finish, &netns) {
            if let Err(e) = dp::retire(f).await {
                warn!(container = %r.container_id, ifname = %r.ifname, network = %r.attachment.network.name, error = %e, "could not take the container's links down");
            }
        }
        // Recorded as leaving, its detach as owed: a daemon that stops from here on leaves
        // the rest to the next one.
        let spec = r.detach_spec();
        let owed = spec.clone();
        c.save_or_log(|s| {
            if let Some(x) = s.attached.get_mut(k) {
                x.leaving = true;
            }
            if !s.unconfirmed.contains(&owed) {
                s.unconfirmed.push(owed);
            }
        })
        .await;
        let t_off = t0.elapsed();
        let me = self.clone();
        let k = k.to_string();
        let id = r.task_id.clone();
        let rest = async move {
            let _held = (held, ns_held);
            let c = &me.containers;
            c.unlink(&r, netns).await;
            // Only once its links are gone: the manager may give the address again at once.
            let told = me.tell_manager(&spec).await;
            c.save_or_log(|s| {
                s.attached.remove(&k);
                if told {
                    s.unconfirmed.retain(|u| *u != spec);
                }
            })
            .await;
            info!(container = %r.container_id, ifname = %r.ifname, network = %r.attachment.network.name, ip = %r.attachment.address, off_ms = t_off.as_millis() as u64, total_ms = t0.elapsed().as_millis() as u64, manager_told = told, "container detached");
        };
        match finish {
            Finish::Now => rest.await,
            Finish::Later => {
                tokio::spawn(rest);
            }
        }
        Some(id)
    }

    /// Frees a container's address at the manager; if it cannot be reached, the detach is
    /// kept and retried by the watch.
    async fn detach_at_manager(&self, spec: ContainerDetach) {
        if !self.tell_manager(&spec).await {
            self.containers
                .save_or_log(|s| {
                    if !s.unconfirmed.contains(&spec) {
                        s.unconfirmed.push(spec);
                    }
                })
                .await;
        }
    }

    /// Asks the manager to free a container's address: whether it did (or had nothing to
    /// free).
    async fn tell_manager(&self, spec: &ContainerDetach) -> bool {
        match self.manager_call::<ContainerDetached>(ApiRequest::Detach { spec: spec.clone() }).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) if e.kind == ErrorKind::NotFound || e.kind == ErrorKind::Invalid => true,
            failed => {
                warn!(container = %spec.container_id, ifname = %spec.ifname, network = %spec.network, error = ?failed.err().map(|e| format!("{e:#}")), "the manager could not be told that a container left: retried later");
                false
            }
        }
    }

    /// Plugs back what an earlier daemon attached (its namespace still the same one), and
    /// takes off what lost its namespace meanwhile, or was left half made.
    pub async fn adopt_containers(self: &Arc<Self>) {
        let c = &self.containers;
        for seen in c.all_records() {
            let k = key(&seen.container_id, &seen.ifname);
            let adopted = {
                let g = c.guard(&k);
                let _held = g.lock().await;
                // A DEL may have come first.
                let Some(r) = c.record(&k).filter(|r| r.task_id == seen.task_id) else { continue };
                match self.still_there(&r).await {
                    Some(f) if r.complete && !r.leaving => match async {
                        c.join(&r).await.map(drop)?;
                        c.connect(&r, f, true).await
                    }
                    .await
                    {
                        Ok(()) => true,
                        Err(e) => {
                            error!(container = %r.container_id, ifname = %r.ifname, network = %r.attachment.network.name, error = %format!("{e:#}"), "an attached container could not be adopted: CHECK reports it");
                            continue;
                        }
                    },
                    _ => false,
                }
            };
            if adopted {
                info!(container = %seen.container_id, network = %seen.attachment.network.name, ip = %seen.attachment.address, "attached container adopted");
            } else {
                info!(container = %seen.container_id, network = %seen.attachment.network.name, netns = %seen.netns.display(), complete = seen.complete, leaving = seen.leaving, "an attached container's namespace went while the daemon was away (or it was left half made, or half deleted): detached");
                self.remove_container(&k, Some(&seen.task_id), None, Finish::Now).await;
            }
        }
    }

    /// The record's namespace, if its path still names the same one (device, inode, and
    /// cookie: an inode number is given again once its namespace is gone).
    async fn still_there(&self, r: &Record) -> Option<std::fs::File> {
        if dp::ns_id(&r.netns).ok() != Some(r.ns) {
            return None;
        }
        let f = std::fs::File::open(&r.netns).ok()?;
        let probe = f.try_clone().ok()?;
        let cookie = self.runtime.ns.run(move |ctx| ctx.netns_cookie(&probe)).await.ok()?.ok()?;
        (r.cookie == 0 || cookie == r.cookie).then_some(f)
    }

    /// Runs for the daemon's life: takes off containers whose namespace went without a DEL
    /// (the runtime crashed, or has no DEL to give), and retries detaches the manager missed.
    pub async fn watch_containers(self: Arc<Self>) {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            for r in self.containers.records() {
                // While attached, the daemon holds the namespace: its inode is its own.
                if r.complete && dp::ns_id(&r.netns).ok() != Some(r.ns) {
                    info!(container = %r.container_id, network = %r.attachment.network.name, netns = %r.netns.display(), "an attached container's namespace is gone without a DEL: detached");
                    self.remove_container(&key(&r.container_id, &r.ifname), Some(&r.task_id), None, Finish::Now).await;
                }
            }
            // Not those of interfaces still being taken off: their links go first.
            let unconfirmed: Vec<ContainerDetach> = {
                let s = lock(&self.containers.saved);
                s.unconfirmed.iter().filter(|u| !s.attached.values().any(|r| Some(&r.task_id) == u.task_id.as_ref())).cloned().collect()
            };
            for spec in unconfirmed {
                if self.tell_manager(&spec).await {
                    self.containers.save_or_log(|s| s.unconfirmed.retain(|u| *u != spec)).await;
                }
            }
        }
    }

    /// `swarm leave`: every container's interface goes (the node leaves the swarm; the
    /// manager forgets the node's tasks with it).
    pub async fn leave_containers(&self) {
        let c = &self.containers;
        for seen in c.all_records() {
            let k = key(&seen.container_id, &seen.ifname);
            let g = c.guard(&k);
            let _held = g.lock().await;
            // A DEL's deletion may have finished meanwhile.
            if let Some(r) = c.record(&k) {
                c.disconnect(&r).await;
            }
        }
        let mut made = c.table.lock().await;
        if let Err(e) = dp::remove_node_table().await {
            warn!(error = %e, "could not remove the node's table for containers");
        }
        *made = false;
        c.save_or_log(|s| *s = Saved::default()).await;
    }
}
