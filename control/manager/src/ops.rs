//! Operations on the cluster state and the scheduler. Pure: they take the state and an id
//! generator, and either change the state or return an error that says why not. The manager
//! runs each one on a clone and commits the clone only on success.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::Ipv4Network;
pub use swarmnet_api::cni::{ContainerAttach, ContainerDetach};
pub use swarmnet_api::{NetworkAttach, NetworkCreate, PublishSpec, PublishedPort, ServiceCreate, ServiceUpdate, StandaloneCreate, TaskReport};

use crate::ipam;
use crate::model::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
}

fn invalid(msg: impl Into<String>) -> OpError {
    OpError::Invalid(msg.into())
}

pub type IdGen<'a> = &'a mut dyn FnMut() -> Id;

pub const FIRST_VNI: u32 = 4096;
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Docker's rule for object names (checked again here: a request may come from any client).
pub fn check_name(kind: &str, name: &str) -> Result<(), OpError> {
    swarmnet_api::check_name(kind, name).map_err(|e| OpError::Invalid(e.message))
}

/// Ports a published port is taken from when none is given (as Swarm).
pub const AUTO_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Ingress-mode ports cross nodes over the ingress network: it must exist.
fn check_ingress_exists(st: &ClusterState, service: &str, ports: &[Port]) -> Result<(), OpError> {
    if !ports.is_empty() && ingress_id(st).is_none() {
        return Err(OpError::Conflict(format!("service {service}: no ingress network to publish ports through (it was removed; make one with `network create --ingress NAME`)")));
    }
    Ok(())
}

/// The cluster's ingress network, if it has one.
pub fn ingress_id(st: &ClusterState) -> Option<Id> {
    st.networks.values().find(|n| n.ingress).map(|n| n.id.clone())
}

/// The networks a service's tasks are on: the service's, then the ingress network if it
/// publishes a port (in either mode: the node reaches its tasks there).
pub fn task_networks(st: &ClusterState, svc: &Service) -> Vec<Id> {
    let mut nets = svc.networks.clone();
    if !svc.ports.is_empty() {
        nets.extend(ingress_id(st));
    }
    nets
}

/// The ports the cluster itself uses on every node: publishing one would take the cluster's
/// own traffic. The data path's is the cluster's (`--data-path-port`, set when it is made).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnPorts {
    /// The manager's (TCP).
    pub manager: u16,
    /// Gossip (TCP and UDP).
    pub gossip: u16,
    /// The data path: VXLAN (UDP).
    pub data_path: u16,
}

impl OwnPorts {
    /// What `port`/`protocol` is to the cluster, if it is one of its own.
    pub fn owner(&self, port: u16, protocol: Protocol) -> Option<&'static str> {
        match protocol {
            _ if port == self.gossip => Some("gossip"),
            Protocol::Tcp if port == self.manager => Some("the manager's port"),
            Protocol::Udp if port == self.data_path => Some("the data path, VXLAN"),
            _ => None,
        }
    }
}

/// The service (other than `except`) whose published port `port`/`protocol` clashes with
/// one in `mode`: an ingress port is taken on every node, so it clashes with any other
/// use; two host-mode ports share the number, the scheduler keeps their tasks apart (as
/// in Swarm). With `mode` None any use counts (picking a free port).
fn publisher<'a>(st: &'a ClusterState, port: u16, protocol: Protocol, mode: Option<PublishMode>, except: Option<&Id>) -> Option<&'a Service> {
    st.services.values().find(|s| Some(&s.id) != except && s.ports.iter().any(|q| q.published == port && q.protocol == protocol && !(mode == Some(PublishMode::Host) && q.mode == PublishMode::Host)))
}

/// Turns specs into ports: a given published port must be free (the error names the
/// service that has it), a missing one is the lowest free of 30000–32767.
fn resolve_ports(st: &ClusterState, specs: &[PublishSpec], mut ports: Vec<Port>, service: Option<&Id>, own: &OwnPorts) -> Result<Vec<Port>, OpError> {
    for spec in specs {
        let taken = |p: u16, ports: &[Port]| ports.iter().any(|q| q.published == p && q.protocol == spec.protocol);
        let published = match spec.published {
            Some(p) => {
                if let Some(what) = own.owner(p, spec.protocol) {
                    return Err(invalid(format!("port {p}/{} is the cluster's own ({what}): publish another", spec.protocol)));
                }
                if let Some(other) = publisher(st, p, spec.protocol, Some(spec.mode), service) {
                    return Err(OpError::Conflict(format!("port {p}/{} is already published by service {}", spec.protocol, other.name)));
                }
                if taken(p, &ports) {
                    return Err(invalid(format!("port {p}/{} is published twice", spec.protocol)));
                }
                p
            }
            None => AUTO_PORTS
                .clone()
                .find(|p| own.owner(*p, spec.protocol).is_none() && publisher(st, *p, spec.protocol, None, service).is_none() && !taken(*p, &ports))
                .ok_or_else(|| OpError::Conflict(format!("no free port left in {}-{} for {}", AUTO_PORTS.start(), AUTO_PORTS.end(), spec.protocol)))?,
        };
        ports.push(Port { published, target: spec.target, protocol: spec.protocol, mode: spec.mode });
    }
    Ok(ports)
}

pub fn create_network(st: &mut ClusterState, req: &NetworkCreate, pool: Ipv4Network, new_id: IdGen) -> Result<Network, OpError> {
    check_name("network", &req.name)?;
    if st.network_by_name(&req.name).is_some() {
        return Err(OpError::Conflict(format!("network {} already exists", req.name)));
    }
    if req.ingress {
        if let Some(n) = st.networks.values().find(|n| n.ingress) {
            return Err(OpError::Conflict(format!("network {}: the cluster has an ingress network already ({})", req.name, n.name)));
        }
        if req.attachable {
            return Err(invalid(format!("network {}: an ingress network cannot be attachable", req.name)));
        }
    }
    let taken = ipam::taken_ranges(st);
    let subnet = match req.subnet {
        Some(subnet) => {
            ipam::check_subnet(subnet, &taken)?;
            subnet
        }
        None => ipam::pick_subnet(pool, 24, &taken)?,
    };
    let used: BTreeSet<u32> = st.networks.values().map(|n| n.vni).collect();
    let vni = (FIRST_VNI..=MAX_VNI).find(|v| !used.contains(v)).ok_or_else(|| OpError::Conflict("no free VNI left".into()))?;
    let net = Network { id: new_id(), name: req.name.clone(), driver: req.driver, attachable: req.attachable, subnet, gateway: ipam::gateway(subnet), vni, ingress: req.ingress };
    st.networks.insert(net.id.clone(), net.clone());
    if net.ingress {
        reconcile(st, new_id); // every node gets its address on it
    }
    Ok(net)
}

pub fn remove_network(st: &mut ClusterState, name: &str) -> Result<Network, OpError> {
    let net = st.network_by_name(name).cloned().ok_or_else(|| OpError::NotFound(format!("network {name} not found")))?;
    if let Some(s) = st.services.values().find(|s| s.networks.contains(&net.id)) {
        return Err(OpError::Conflict(format!("network {} is in use by service {}", net.name, s.name)));
    }
    if net.ingress {
        if let Some(s) = st.services.values().find(|s| !s.ports.is_empty()) {
            return Err(OpError::Conflict(format!("network {} is in use by service {}: it publishes ports through the routing mesh", net.name, s.name)));
        }
    }
    if let Some(t) = st.tasks.values().find(|t| t.networks.contains(&net.id)) {
        return Err(OpError::Conflict(format!("network {} is in use by task {} (still stopping)", net.name, t.name)));
    }
    st.networks.remove(&net.id);
    if net.ingress {
        st.nodes.values_mut().for_each(|n| n.ingress_ip = None);
    }
    Ok(net)
}

/// network id -> aliases asked for on it.
type Aliases = BTreeMap<Id, Vec<String>>;

/// Network ids in the order given, and the aliases asked for on each.
fn resolve_networks(st: &ClusterState, args: &[NetworkAttach]) -> Result<(Vec<Id>, Aliases), OpError> {
    let mut ids = Vec::new();
    let mut aliases = BTreeMap::new();
    for arg in args {
        for a in &arg.aliases {
            check_name("alias", a)?;
        }
        let (n, al) = (&arg.name, arg.aliases.clone());
        let net = st.network_by_name(n).ok_or_else(|| OpError::NotFound(format!("network {n} not found")))?;
        if ids.contains(&net.id) {
            return Err(invalid(format!("network {n} is given twice")));
        }
        ids.push(net.id.clone());
        if !al.is_empty() {
            aliases.insert(net.id.clone(), al);
        }
    }
    Ok((ids, aliases))
}

fn find_network<'a>(st: &'a ClusterState, n: &str) -> Result<&'a Network, OpError> {
    st.network_by_name(n).ok_or_else(|| OpError::NotFound(format!("network {n} not found")))
}

fn name_in_use(st: &ClusterState, name: &str) -> Option<String> {
    if st.service_by_name(name).is_some() {
        return Some(format!("service {name} already exists"));
    }
    if st.tasks.values().any(|t| t.service_id.is_none() && t.name == name && t.desired_state == DesiredState::Running) {
        return Some(format!("a standalone task named {name} already exists"));
    }
    None
}

/// Addresses a service will need on each of its networks beyond what it holds already.
fn check_capacity(st: &ClusterState, svc: &Service, extra_tasks: u64, need_vip: bool) -> Result<(), OpError> {
    for net_id in &task_networks(st, svc) {
        let vip = need_vip && svc.endpoint_mode == EndpointMode::Vip && svc.networks.contains(net_id);
        let need = extra_tasks + u64::from(vip);
        let free = ipam::free_count(st, net_id);
        if need > free {
            let net = &st.networks[net_id];
            return Err(OpError::Ipam(ipam::IpamError::NotEnough { network: net.name.clone(), subnet: net.subnet, service: svc.name.clone(), need, free }));
        }
    }
    Ok(())
}

fn live_tasks_of<'a>(st: &'a ClusterState, svc: &'a Id) -> impl Iterator<Item = &'a Task> {
    st.tasks.values().filter(move |t| t.service_id.as_ref() == Some(svc) && t.desired_state == DesiredState::Running)
}

pub fn create_service(st: &mut ClusterState, req: &ServiceCreate, own: &OwnPorts, new_id: IdGen) -> Result<Service, OpError> {
    check_name("service", &req.name)?;
    if let Some(msg) = name_in_use(st, &req.name) {
        return Err(OpError::Conflict(msg));
    }
    let mode = req.mode;
    if req.command.is_empty() {
        return Err(invalid(format!("service {}: no command given (put it after --)", req.name)));
    }
    let (networks, aliases) = resolve_networks(st, &req.networks)?;
    if networks.iter().any(|n| st.networks.get(n).is_some_and(|n| n.ingress)) {
        return Err(invalid("the ingress network is the cluster's own: publish a port (--publish) instead of attaching to it"));
    }
    let specs = validated(&req.publish)?;
    let ports = resolve_ports(st, &specs, Vec::new(), None, own)?;
    check_ingress_exists(st, &req.name, &ports)?;
    for k in req.labels.keys() {
        swarmnet_api::check_label_key(k).map_err(|e| invalid(format!("service {}: {}", req.name, e.message)))?;
    }
    check_env(&req.name, &req.env)?;
    let mut svc = Service {
        id: new_id(),
        name: req.name.clone(),
        mode,
        networks,
        endpoint_mode: req.endpoint_mode,
        ports,
        command: req.command.clone(),
        vips: BTreeMap::new(),
        aliases,
        constraints: req.constraints.clone(),
        labels: req.labels.clone(),
        env: req.env.clone(),
        version: 0,
        update: req.update,
        update_status: None,
    };
    let tasks = match mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => st.ready_nodes().count() as u64,
    };
    check_capacity(st, &svc, tasks, true)?;
    if svc.endpoint_mode == EndpointMode::Vip {
        for net in svc.networks.clone() {
            let vip = ipam::allocate(st, &net)?;
            svc.vips.insert(net, vip);
        }
    }
    st.services.insert(svc.id.clone(), svc.clone());
    reconcile(st, new_id);
    Ok(svc)
}

/// The specs, checked again (they may come from any client).
fn validated(specs: &[PublishSpec]) -> Result<Vec<PublishSpec>, OpError> {
    for s in specs {
        s.validate().map_err(|e| OpError::Invalid(e.message))?;
    }
    Ok(specs.to_vec())
}

pub fn scale_service(st: &mut ClusterState, name: &str, replicas: u64, new_id: IdGen) -> Result<Service, OpError> {
    let svc = st.service_by_name(name).cloned().ok_or_else(|| OpError::NotFound(format!("service {name} not found")))?;
    let ServiceMode::Replicated { replicas: old } = svc.mode else {
        return Err(invalid(format!("service {name} is a global service; it cannot be scaled")));
    };
    if replicas > old {
        check_capacity(st, &svc, replicas - old, false)?;
    }
    let mut svc = svc;
    svc.mode = ServiceMode::Replicated { replicas };
    st.services.insert(svc.id.clone(), svc.clone());
    reconcile(st, new_id);
    Ok(svc)
}

fn check_env(service: &str, env: &BTreeMap<String, String>) -> Result<(), OpError> {
    for (k, v) in env {
        swarmnet_api::check_env_key(k).map_err(|e| invalid(format!("service {service}: environment variable {}", e.message)))?;
        if v.contains('\0') {
            return Err(invalid(format!("service {service}: environment variable {k}: the value has a NUL byte")));
        }
    }
    Ok(())
}

/// `--publish-add SPEC --publish-rm PORT[/PROTOCOL]` on `svc`: its tasks go on running
/// (their endpoints are published again with the new ports), unless they must join or
/// leave the ingress network.
fn change_ports(st: &mut ClusterState, svc: &mut Service, add: &[PublishSpec], rm: &[PublishedPort], own: &OwnPorts) -> Result<(), OpError> {
    let name = svc.name.clone();
    let mut ports = svc.ports.clone();
    for r in rm {
        let before = ports.len();
        ports.retain(|q| !(q.published == r.published && r.protocol.is_none_or(|x| x == q.protocol)));
        if ports.len() == before {
            return Err(OpError::NotFound(format!("service {name} does not publish port {r}")));
        }
    }
    let specs = validated(add)?;
    let had_ports = !svc.ports.is_empty();
    svc.ports = resolve_ports(st, &specs, ports, Some(&svc.id), own)?;
    check_ingress_exists(st, &name, &svc.ports)?;
    if had_ports == svc.ports.is_empty() {
        // Its tasks join (or leave) the ingress network: they are replaced (the only case
        // of a port change that restarts them).
        let replicas = live_tasks_of(st, &svc.id).count() as u64;
        if !had_ports {
            let mut with = svc.clone();
            with.networks.clear();
            check_capacity(st, &with, replicas, false)?;
        }
        let why = if had_ports { "replaced: it publishes no port any more" } else { "replaced: its published ports need the ingress network" };
        for t in st.tasks.values_mut().filter(|t| t.service_id.as_ref() == Some(&svc.id) && t.desired_state == DesiredState::Running) {
            t.desired_state = DesiredState::Shutdown;
            if !t.state.is_terminal() {
                t.error = why.to_string();
            }
        }
    }
    Ok(())
}

/// `service update`: every change of `spec` is checked before any is made (a refusal
/// changes nothing). A new command, environment or constraints, or `force`, raise the
/// service's version: its tasks are then replaced by [`advance_updates`], a rolling update.
pub fn update_service(st: &mut ClusterState, name: &str, spec: &ServiceUpdate, own: &OwnPorts, now_ms: u64, new_id: IdGen) -> Result<Service, OpError> {
    let mut svc = st.service_by_name(name).cloned().ok_or_else(|| OpError::NotFound(format!("service {name} not found")))?;
    let name = svc.name.clone();
    if spec.is_empty() {
        return Err(invalid(format!("service update {name}: nothing to change")));
    }
    if !spec.publish_add.is_empty() || !spec.publish_rm.is_empty() {
        change_ports(st, &mut svc, &spec.publish_add, &spec.publish_rm, own)?;
    }
    if let Some(replicas) = spec.replicas {
        let ServiceMode::Replicated { replicas: old } = svc.mode else {
            return Err(invalid(format!("service {name} is a global service: --replicas is for a replicated one")));
        };
        if replicas > old {
            check_capacity(st, &svc, replicas - old, false)?;
        }
        svc.mode = ServiceMode::Replicated { replicas };
    }
    let mut replace = spec.force;
    if let Some(cmd) = &spec.command {
        if cmd.is_empty() {
            return Err(invalid(format!("service update {name}: an empty command")));
        }
        replace |= *cmd != svc.command;
        svc.command = cmd.clone();
    }
    let env_before = svc.env.clone();
    for k in &spec.env_rm {
        if svc.env.remove(k).is_none() && !spec.env_add.contains_key(k) {
            return Err(OpError::NotFound(format!("service {name} has no environment variable {k}")));
        }
    }
    svc.env.extend(spec.env_add.clone());
    check_env(&name, &svc.env)?;
    replace |= svc.env != env_before;
    let constraints_before = svc.constraints.clone();
    for c in &spec.constraint_rm {
        let before = svc.constraints.len();
        svc.constraints.retain(|x| x != c);
        if svc.constraints.len() == before {
            return Err(OpError::NotFound(format!("service {name} has no constraint {c}")));
        }
    }
    for c in &spec.constraint_add {
        if !svc.constraints.contains(c) {
            svc.constraints.push(c.clone());
        }
    }
    replace |= svc.constraints != constraints_before;
    for k in &spec.label_rm {
        if svc.labels.remove(k).is_none() {
            return Err(OpError::NotFound(format!("service {name} has no label {k}")));
        }
    }
    for k in spec.label_add.keys() {
        swarmnet_api::check_label_key(k).map_err(|e| invalid(format!("service {name}: {}", e.message)))?;
    }
    svc.labels.extend(spec.label_add.clone());
    if let Some(p) = spec.parallelism {
        svc.update.parallelism = p;
    }
    if let Some(d) = spec.delay_ms {
        svc.update.delay_ms = d;
    }
    if replace {
        svc.version += 1;
        svc.update_status = Some(UpdateStatus { state: UpdateState::Updating, message: format!("updating its tasks to version {}", svc.version), not_before_ms: 0 });
    }
    st.services.insert(svc.id.clone(), svc.clone());
    // Scaled, or a host-mode port removed that lets a pending task start.
    reconcile(st, new_id);
    advance_updates(st, now_ms, new_id);
    Ok(st.services.get(&svc.id).cloned().unwrap_or(svc))
}

/// The rolling updates, one step (pure; the manager calls it on every change and a few
/// times a second while one is under way). For each updating service, per slot (a global
/// service: per node): an old task (made from an older version) gets a new twin, at most
/// `parallelism` at a time and not before `not_before_ms`; once the twin runs (ready), the
/// old one is told to stop (it drains first); `delay_ms` passes before the next twin. A
/// twin that fails pauses the update: it is stopped and the old tasks go on running.
/// Returns whether anything changed.
pub fn advance_updates(st: &mut ClusterState, now_ms: u64, new_id: IdGen) -> bool {
    let updating: Vec<Id> = st.services.values().filter(|s| s.updating()).map(|s| s.id.clone()).collect();
    let mut changed = false;
    for sid in updating {
        changed |= advance_update(st, &sid, now_ms, new_id);
    }
    if changed {
        reconcile(st, new_id);
    }
    changed
}

/// A new task of `svc`, pending, made from its current spec.
fn service_task(svc: &Service, id: Id, name: String, slot: Option<u64>, node_id: Option<Id>, networks: Vec<Id>) -> Task {
    Task {
        id,
        name,
        service_id: Some(svc.id.clone()),
        slot,
        node_id,
        desired_state: DesiredState::Running,
        state: TaskState::Pending,
        error: String::new(),
        addresses: BTreeMap::new(),
        networks,
        command: svc.command.clone(),
        restart: true,
        restarts: 0,
        pid: None,
        aliases: BTreeMap::new(),
        version: svc.version,
        env: svc.env.clone(),
        container: None,
    }
}

/// The tasks of one slot (or node) during an update: (made from an older version, from
/// the service's version).
type OldNew = (Vec<Id>, Vec<Id>);

fn advance_update(st: &mut ClusterState, sid: &Id, now_ms: u64, new_id: IdGen) -> bool {
    let Some(svc) = st.services.get(sid).cloned() else { return false };
    let Some(mut status) = svc.update_status.clone() else { return false };
    // Slot (or node) → (old tasks, new tasks), among those meant to run.
    let mut groups: BTreeMap<(Option<u64>, Option<Id>), OldNew> = BTreeMap::new();
    for t in live_tasks_of(st, sid) {
        let key = match svc.mode {
            ServiceMode::Replicated { .. } => (t.slot, None),
            ServiceMode::Global => (None, t.node_id.clone()),
        };
        let g = groups.entry(key).or_default();
        if t.version < svc.version {
            g.0.push(t.id.clone());
        } else {
            g.1.push(t.id.clone());
        }
    }
    let mut changed = false;
    let mut in_flight = 0u64;
    let mut todo: Vec<Id> = Vec::new();
    // A new task that failed pauses the update: every slot whose new task does not run yet
    // keeps its old one (the new one is stopped); a slot whose new one runs is done.
    // A new task that cannot be placed (no node meets the constraints, a host-mode port
    // taken on every node, no free address) pauses it too: it would wait for ever.
    let failed = groups
        .values()
        .flat_map(|(_, new)| new)
        .filter_map(|id| st.tasks.get(id))
        .find(|t| matches!(t.state, TaskState::Failed | TaskState::Complete) || t.restarts > 0 || (t.state == TaskState::Pending && !t.error.is_empty()))
        .cloned();
    if let Some(bad) = &failed {
        let why = if bad.error.is_empty() { "it failed".to_string() } else { bad.error.clone() };
        let what = if bad.state == TaskState::Pending { "cannot be placed" } else { "failed" };
        status.state = UpdateState::Paused;
        status.message = format!("paused: the new task {} {what} ({why}); the old tasks go on running (`service update --force {}` tries again)", bad.name, svc.name);
    }
    for (old, new) in groups.values() {
        if old.is_empty() {
            continue;
        }
        if new.is_empty() {
            // One new task per slot. Several old ones: a new task of an update that a later
            // one superseded before it ran is stopped; the one that runs is replaced.
            let keep = old.iter().find(|id| st.tasks.get(*id).is_some_and(|t| t.state == TaskState::Running)).unwrap_or(&old[0]).clone();
            for id in old.iter().filter(|id| **id != keep) {
                if let Some(t) = st.tasks.get_mut(id) {
                    t.desired_state = DesiredState::Shutdown;
                    t.error = format!("superseded by version {}", svc.version);
                    changed = true;
                }
            }
            todo.push(keep);
            continue;
        }
        let twin_runs = new.iter().filter_map(|id| st.tasks.get(id)).any(|t| t.state == TaskState::Running && t.restarts == 0);
        let (stop, why) = if twin_runs {
            status.not_before_ms = now_ms.saturating_add(svc.update.delay_ms);
            (old, format!("replaced by an update to version {}", svc.version))
        } else if failed.is_some() {
            (new, "stopped: the update was paused".to_string())
        } else {
            in_flight += 1;
            continue;
        };
        for id in stop {
            if let Some(t) = st.tasks.get_mut(id) {
                t.desired_state = DesiredState::Shutdown;
                if !t.state.is_terminal() || failed.is_some() {
                    t.error = why.clone();
                }
            }
        }
        changed = true;
    }
    if status.state == UpdateState::Updating {
        let total = groups.len() as u64;
        if todo.is_empty() && in_flight == 0 && !changed {
            status.state = UpdateState::Completed;
            status.message = format!("{total} task(s) at version {}", svc.version);
            changed = true;
        } else if now_ms >= status.not_before_ms {
            let room = if svc.update.parallelism == 0 { u64::MAX } else { svc.update.parallelism.saturating_sub(in_flight) };
            for old in todo.iter().take(usize::try_from(room).unwrap_or(usize::MAX)) {
                let Some(o) = st.tasks.get(old).cloned() else { continue };
                // A global service's twin goes to the same node; a replica's anywhere.
                let node = if svc.mode == ServiceMode::Global { o.node_id.clone() } else { None };
                let twin = service_task(&svc, new_id(), o.name.clone(), o.slot, node, task_networks(st, &svc));
                st.tasks.insert(twin.id.clone(), twin);
                changed = true;
            }
            let done = total.saturating_sub(todo.len() as u64 + in_flight);
            status.message = format!("updating to version {}: {done} of {total} task(s) replaced", svc.version);
        }
    }
    if let Some(s) = st.services.get_mut(sid) {
        if s.update_status.as_ref() != Some(&status) {
            s.update_status = Some(status);
            changed = true;
        }
    }
    changed
}

/// The cluster's ingress network, made with the cluster: `subnet`, or the last /24 of the
/// pool (networks are given /24s from the start of the pool, so it is the last one reached).
pub fn make_ingress(st: &mut ClusterState, pool: Ipv4Network, subnet: Option<Ipv4Network>, new_id: IdGen) -> Result<Network, OpError> {
    let subnet = match subnet {
        Some(s) => s,
        None => {
            let taken = ipam::taken_ranges(st);
            let last = Ipv4Network::new(std::net::Ipv4Addr::from(u32::from(pool.broadcast()) & !0xff), 24.max(pool.prefix())).map_err(|e| invalid(format!("ingress subnet from pool {pool}: {e}")))?;
            if ipam::check_subnet(last, &taken).is_ok() {
                last
            } else {
                ipam::pick_subnet(pool, 24, &taken)?
            }
        }
    };
    let req = NetworkCreate { name: "ingress".into(), driver: Driver::Overlay, attachable: false, subnet: Some(subnet), ingress: true };
    create_network(st, &req, pool, new_id)
}

pub fn remove_service(st: &mut ClusterState, name: &str, new_id: IdGen) -> Result<Service, OpError> {
    let svc = st.service_by_name(name).cloned().ok_or_else(|| OpError::NotFound(format!("service {name} not found")))?;
    st.services.remove(&svc.id);
    reconcile(st, new_id);
    Ok(svc)
}

pub fn create_standalone(st: &mut ClusterState, req: &StandaloneCreate, node_id: &Id, new_id: IdGen) -> Result<Task, OpError> {
    check_name("task", &req.name)?;
    if let Some(msg) = name_in_use(st, &req.name) {
        return Err(OpError::Conflict(msg));
    }
    if req.command.is_empty() {
        return Err(invalid("no command given (put it after --)"));
    }
    if req.networks.is_empty() {
        return Err(invalid("run needs --network"));
    }
    let (networks, aliases) = resolve_networks(st, &req.networks)?;
    for id in &networks {
        let net = &st.networks[id];
        if !net.attachable {
            return Err(invalid(format!("network {} is not attachable: create it with --attachable to run standalone tasks on it", net.name)));
        }
    }
    let mut task = Task { aliases, ..node_task(new_id(), &req.name, node_id, TaskState::Assigned, networks.clone(), req.command.clone()) };
    for id in &networks {
        let a = ipam::allocate(st, id)?;
        task.addresses.insert(id.clone(), a);
        // Hold it while allocating on the next network.
        st.tasks.insert(task.id.clone(), task.clone());
    }
    st.tasks.insert(task.id.clone(), task.clone());
    Ok(task)
}

/// A task of node `node_id` that is no service's (a standalone task, a container's
/// attachment), wanted running, without addresses yet.
fn node_task(id: Id, name: &str, node_id: &Id, state: TaskState, networks: Vec<Id>, command: Vec<String>) -> Task {
    Task {
        id,
        name: name.to_string(),
        service_id: None,
        slot: None,
        node_id: Some(node_id.clone()),
        desired_state: DesiredState::Running,
        state,
        error: String::new(),
        addresses: BTreeMap::new(),
        networks,
        command,
        restart: false,
        restarts: 0,
        pid: None,
        aliases: BTreeMap::new(),
        version: 0,
        env: BTreeMap::new(),
        container: None,
    }
}

/// A container of node `node_id` joins an attachable network (CNI ADD, issue 22): a task
/// standing for it, with an address, running at once (the node plumbs it when it has the
/// answer). The same container, interface and network again: the same task.
pub fn attach_container(st: &mut ClusterState, req: &ContainerAttach, node_id: &Id, new_id: IdGen) -> Result<Task, OpError> {
    check_name("container", &req.name)?;
    if req.container_id.is_empty() || req.ifname.is_empty() {
        return Err(invalid("a container attachment needs a container id and an interface name"));
    }
    let net = find_network(st, &req.network)?.clone();
    if net.ingress || !net.attachable {
        return Err(invalid(format!("network {} is not attachable: create it with --attachable to attach containers to it", net.name)));
    }
    let same = |t: &&Task| t.node_id.as_ref() == Some(node_id) && t.container.as_ref().is_some_and(|c| c.id == req.container_id && c.ifname == req.ifname) && t.networks.first() == Some(&net.id);
    if let Some(t) = st.tasks.values().find(same) {
        return Ok(t.clone());
    }
    let mut task = Task {
        container: Some(ContainerRef { id: req.container_id.clone(), ifname: req.ifname.clone() }),
        ..node_task(new_id(), &req.name, node_id, TaskState::Running, vec![net.id.clone()], Vec::new())
    };
    let a = ipam::allocate(st, &net.id)?;
    task.addresses.insert(net.id.clone(), a);
    st.tasks.insert(task.id.clone(), task.clone());
    Ok(task)
}

/// A container of node `node_id` leaves a network (CNI DEL): its task goes, its address is
/// free. None: it had none (a DEL repeated, or an ADD that never reached the manager).
pub fn detach_container(st: &mut ClusterState, req: &ContainerDetach, node_id: &Id) -> Result<Option<Task>, OpError> {
    let net = match find_network(st, &req.network) {
        Ok(n) => Some(n.id.clone()),
        // The network went: its containers went before it (network rm refuses one in use).
        Err(OpError::NotFound(_)) => None,
        Err(e) => return Err(e),
    };
    let id = st
        .tasks
        .values()
        .find(|t| {
            t.node_id.as_ref() == Some(node_id)
                && t.container.as_ref().is_some_and(|c| c.id == req.container_id && c.ifname == req.ifname)
                && net.as_ref().is_none_or(|n| t.networks.first() == Some(n))
                && req.task_id.as_ref().is_none_or(|id| *id == t.id)
        })
        .map(|t| t.id.clone());
    Ok(id.and_then(|id| st.tasks.remove(&id)))
}

/// Applies an agent's reports. With `full`, the report lists every task the node has, so a
/// task that should be gone and is not listed is gone.
pub fn apply_reports(st: &mut ClusterState, node: &Id, reports: &[TaskReport], full: bool, new_id: IdGen) {
    for r in reports {
        let Some(t) = st.tasks.get_mut(&r.task_id) else { continue };
        if t.node_id.as_ref() != Some(node) {
            continue;
        }
        t.state = r.state;
        t.error = r.error.clone();
        t.pid = r.pid;
        t.restarts = r.restarts;
    }
    if full {
        let listed: BTreeSet<&Id> = reports.iter().map(|r| &r.task_id).collect();
        let gone: Vec<Id> = st.tasks.values().filter(|t| t.node_id.as_ref() == Some(node) && t.desired_state == DesiredState::Shutdown && !listed.contains(&t.id)).map(|t| t.id.clone()).collect();
        for id in gone {
            st.tasks.remove(&id);
        }
    }
    reconcile(st, new_id);
}

/// `node rm NODE` (id or hostname): refused for the manager's own node, and for a node
/// that is up unless `force`. Its tasks leave the state (replicas are started elsewhere;
/// processes still running on a forced-out node are that node's business).
pub fn remove_node(st: &mut ClusterState, name: &str, force: bool, manager: &Id, new_id: IdGen) -> Result<Node, OpError> {
    let node = st.nodes.values().find(|n| n.id == name || n.hostname == name).cloned().ok_or_else(|| OpError::NotFound(format!("node {name} not found")))?;
    if node.role == Role::Manager {
        return Err(invalid(format!("node {name} is a manager: demote it first (swarmnet node demote {name})")));
    }
    if &node.id == manager {
        return Err(invalid(format!("node {name} is the manager: it cannot be removed")));
    }
    if node.status == NodeStatus::Ready && !force {
        return Err(OpError::Conflict(format!("node {name} is up: stop it first, or remove it with --force")));
    }
    st.nodes.remove(&node.id);
    st.tasks.retain(|_, t| t.node_id.as_ref() != Some(&node.id));
    reconcile(st, new_id);
    Ok(node)
}

/// `node demote NODE`: a manager becomes a worker (it stops campaigning for the leadership;
/// the leader demoting itself hands the leadership on). Refused for a worker, and for the
/// last manager: the cluster would have nobody to lead it.
pub fn demote_node(st: &mut ClusterState, name: &str) -> Result<Node, OpError> {
    let node = st.nodes.values().find(|n| n.id == name || n.hostname == name).cloned().ok_or_else(|| OpError::NotFound(format!("node {name} not found")))?;
    if node.role != Role::Manager {
        return Err(OpError::Conflict(format!("node {name} is not a manager")));
    }
    if st.nodes.values().filter(|n| n.role == Role::Manager).count() < 2 {
        return Err(OpError::Conflict(format!("node {name} is the last manager: the cluster would have nobody to lead it")));
    }
    let n = st.nodes.get_mut(&node.id).ok_or_else(|| OpError::NotFound(format!("node {name} not found")))?;
    // Its manager port stays: its daemon (`swarmnet manager`) still listens there, and a
    // promotion makes it a candidate again.
    n.role = Role::Worker;
    Ok(n.clone())
}

/// `node promote NODE`: a demoted manager whose daemon runs `swarmnet manager` (it has a
/// manager port) becomes a manager again and campaigns. A node that joined as a worker runs
/// `swarmnet agent`, which cannot lead: refused, saying how to make it a manager.
pub fn promote_node(st: &mut ClusterState, name: &str) -> Result<Node, OpError> {
    let node = st.nodes.values().find(|n| n.id == name || n.hostname == name).cloned().ok_or_else(|| OpError::NotFound(format!("node {name} not found")))?;
    if node.role == Role::Manager {
        return Err(OpError::Conflict(format!("node {name} is a manager already")));
    }
    if node.manager_port.is_none() {
        return Err(OpError::Invalid(format!(
            "node {name} runs `swarmnet agent`, which cannot lead: to make it a manager, start it as `swarmnet manager --store etcd://…` with the cluster's store instead (it joins as a manager)"
        )));
    }
    let n = st.nodes.get_mut(&node.id).ok_or_else(|| OpError::NotFound(format!("node {name} not found")))?;
    n.role = Role::Manager;
    Ok(n.clone())
}

pub fn set_node_status(st: &mut ClusterState, node: &Id, status: NodeStatus, new_id: IdGen) -> bool {
    let Some(n) = st.nodes.get_mut(node) else { return false };
    if n.status == status {
        return false;
    }
    n.status = status;
    reconcile(st, new_id);
    true
}

/// The scheduler: makes the tasks match the services and the ready nodes.
pub fn reconcile(st: &mut ClusterState, new_id: IdGen) {
    let ready: BTreeSet<Id> = st.ready_nodes().map(|n| n.id.clone()).collect();

    // 0. Every node has an address on the ingress network while there is one.
    match ingress_id(st) {
        None => st.nodes.values_mut().for_each(|n| n.ingress_ip = None),
        Some(ing) => {
            let ids: Vec<Id> = st.nodes.values().filter(|n| n.ingress_ip.is_none()).map(|n| n.id.clone()).collect();
            for id in ids {
                // A full ingress network leaves the node without one: its published ports
                // do not answer (the agent says so).
                if let Ok(a) = ipam::allocate(st, &ing) {
                    if let Some(n) = st.nodes.get_mut(&id) {
                        n.ingress_ip = Some(a);
                    }
                }
            }
        }
    }

    // 1. Tasks that should no longer run.
    for t in st.tasks.values_mut() {
        if t.desired_state != DesiredState::Running {
            continue;
        }
        let Some(sid) = &t.service_id else {
            continue; // standalone tasks live and die with their node
        };
        let reason = match st.services.get(sid) {
            None => Some("service removed".to_string()),
            Some(s) => match (s.mode, t.slot) {
                (ServiceMode::Replicated { replicas }, Some(slot)) if slot > replicas => Some("scaled down".to_string()),
                _ => match &t.node_id {
                    Some(n) if !ready.contains(n) => Some(format!("node {n} is down")),
                    Some(n) if st.nodes.get(n).is_some_and(|n| n.availability == Availability::Drain) => Some(format!("node {n} is drained")),
                    _ => None,
                },
            },
        };
        if let Some(reason) = reason {
            t.desired_state = DesiredState::Shutdown;
            if !t.state.is_terminal() {
                t.error = reason;
            }
        }
    }

    // 2. Tasks that are finished and need no more bookkeeping.
    st.tasks.retain(|_, t| {
        let unplaced = t.node_id.is_none();
        let done = t.state.is_terminal();
        !((t.desired_state == DesiredState::Shutdown && (done || unplaced)) || (t.service_id.is_none() && done))
    });

    // 3. Missing tasks.
    let services: Vec<Service> = st.services.values().cloned().collect();
    for svc in &services {
        let networks = task_networks(st, svc);
        let live: Vec<Task> = live_tasks_of(st, &svc.id).cloned().collect();
        let mut wanted: Vec<(String, Option<u64>, Option<Id>)> = Vec::new();
        match svc.mode {
            ServiceMode::Replicated { replicas } => {
                for slot in 1..=replicas {
                    if !live.iter().any(|t| t.slot == Some(slot)) {
                        wanted.push((format!("{}.{slot}", svc.name), Some(slot), None));
                    }
                }
            }
            ServiceMode::Global => {
                for node in eligible_nodes(st, svc, &ready).0 {
                    if !live.iter().any(|t| t.node_id.as_ref() == Some(&node)) {
                        wanted.push((format!("{}.{node}", svc.name), None, Some(node)));
                    }
                }
            }
        }
        for (name, slot, node_id) in wanted {
            let t = service_task(svc, new_id(), name, slot, node_id, networks.clone());
            st.tasks.insert(t.id.clone(), t);
        }
    }

    // 4. Give pending tasks their addresses and a node.
    let mut pending: Vec<Id> = st.tasks.values().filter(|t| t.desired_state == DesiredState::Running && t.state == TaskState::Pending).map(|t| t.id.clone()).collect();
    pending.sort_by_key(|id| {
        let t = &st.tasks[id];
        (t.service_id.clone(), t.slot, t.name.clone())
    });
    for id in pending {
        let svc = st.tasks.get(&id).and_then(|t| st.services.get(t.service_id.as_ref()?)).cloned();
        let (nodes, why) = match &svc {
            Some(svc) => eligible_nodes(st, svc, &ready),
            // A standalone task is placed by its node (`run`).
            None => (ready.clone(), String::new()),
        };
        place(st, &id, &nodes, &why);
    }
}

/// The ready nodes a service's tasks may be placed on: `active` ones whose attributes meet
/// every constraint; and, when that leaves none, why (for `service ps`).
pub fn eligible_nodes(st: &ClusterState, svc: &Service, ready: &BTreeSet<Id>) -> (BTreeSet<Id>, String) {
    let mut unavailable = 0;
    let mut unmet = 0;
    let mut out = BTreeSet::new();
    for id in ready {
        let Some(n) = st.nodes.get(id) else { continue };
        if n.availability != Availability::Active {
            unavailable += 1;
        } else if !svc.constraints.iter().all(|c| c.holds(&n.id, &n.hostname, n.role, &n.labels)) {
            unmet += 1;
        } else {
            out.insert(id.clone());
        }
    }
    let why = if !out.is_empty() || ready.is_empty() {
        String::new()
    } else {
        let mut parts = Vec::new();
        if unavailable > 0 {
            parts.push(format!("{unavailable} paused or drained"));
        }
        if unmet > 0 {
            let cs: Vec<String> = svc.constraints.iter().map(ToString::to_string).collect();
            parts.push(format!("{unmet} not meeting the constraints [{}]", cs.join(", ")));
        }
        format!("no suitable node: of {} ready nodes, {}", ready.len(), parts.join(", "))
    };
    (out, why)
}

/// `node update`: availability and labels (what is given). A drained node's service tasks
/// are moved (stopped there, placed again elsewhere); a paused node takes no new task.
pub fn update_node(st: &mut ClusterState, name: &str, availability: Option<Availability>, label_add: &BTreeMap<String, String>, label_rm: &[String], new_id: IdGen) -> Result<Node, OpError> {
    let id = st.nodes.values().find(|n| n.id == name || n.hostname == name).map(|n| n.id.clone()).ok_or_else(|| OpError::NotFound(format!("node {name} not found")))?;
    for k in label_add.keys().chain(label_rm) {
        swarmnet_api::check_label_key(k).map_err(|e| invalid(format!("node {name}: {}", e.message)))?;
    }
    let n = st.nodes.get_mut(&id).ok_or_else(|| OpError::NotFound(format!("node {name} not found")))?;
    if let Some(a) = availability {
        n.availability = a;
    }
    for k in label_rm {
        n.labels.remove(k);
    }
    n.labels.extend(label_add.iter().map(|(k, v)| (k.clone(), v.clone())));
    let n = n.clone();
    reconcile(st, new_id);
    Ok(n)
}

/// Gives task `id` its addresses and one of `ready` (the nodes it may go to; `why`: why
/// there are none, if so).
fn place(st: &mut ClusterState, id: &Id, ready: &BTreeSet<Id>, why: &str) {
    let task = st.tasks[id].clone();
    // Addresses first, all or nothing.
    let mut addrs = task.addresses.clone();
    for net in &task.networks {
        if addrs.contains_key(net) {
            continue;
        }
        match ipam::allocate(st, net) {
            Ok(a) => {
                addrs.insert(net.clone(), a);
                if let Some(t) = st.tasks.get_mut(id) {
                    t.addresses = addrs.clone();
                }
            }
            Err(e) => {
                if let Some(t) = st.tasks.get_mut(id) {
                    t.addresses = task.addresses.clone();
                    t.error = e.to_string();
                }
                return;
            }
        }
    }
    // Host-mode ports: one task per node may hold each.
    let host_ports: Vec<(u16, Protocol)> =
        task.service_id.as_ref().and_then(|s| st.services.get(s)).map(|s| s.ports.iter().filter(|p| p.mode == PublishMode::Host).map(|p| (p.published, p.protocol)).collect()).unwrap_or_default();
    let holder = |node: &Id| -> Option<(u16, Protocol, String)> {
        st.tasks.values().filter(|t| t.id != task.id && t.node_id.as_ref() == Some(node) && t.state != TaskState::Pending && !t.state.is_terminal()).find_map(|t| {
            let svc = st.services.get(t.service_id.as_ref()?)?;
            svc.ports.iter().find(|p| p.mode == PublishMode::Host && host_ports.contains(&(p.published, p.protocol))).map(|p| (p.published, p.protocol, t.name.clone()))
        })
    };
    let node = match &task.node_id {
        Some(n) => match holder(n) {
            Some((port, proto, other)) => {
                if let Some(t) = st.tasks.get_mut(id) {
                    t.error = format!("no suitable node: host-mode port {port}/{proto} on node {n} is held by task {other}");
                }
                return;
            }
            None => Some(n.clone()),
        },
        None => {
            let count = |node: &Id, svc_only: bool| {
                st.tasks.values().filter(|t| t.desired_state == DesiredState::Running && t.node_id.as_ref() == Some(node) && (!svc_only || t.service_id == task.service_id)).count()
            };
            let free: Vec<&Id> = ready.iter().filter(|n| host_ports.is_empty() || holder(n).is_none()).collect();
            if free.is_empty() && !ready.is_empty() {
                let (port, proto) = host_ports.first().copied().unwrap_or((0, Protocol::Tcp));
                if let Some(t) = st.tasks.get_mut(id) {
                    t.error = format!("no suitable node: host-mode port {port}/{proto} is taken on all {} ready nodes (one task per node)", ready.len());
                }
                return;
            }
            free.into_iter().min_by_key(|n| (count(n, true), count(n, false), (*n).clone())).cloned()
        }
    };
    let Some(t) = st.tasks.get_mut(id) else { return };
    match node {
        Some(n) => {
            t.node_id = Some(n);
            t.state = TaskState::Assigned;
            t.error.clear();
        }
        None if !why.is_empty() => t.error = why.to_string(),
        None => {
            t.error = "no suitable node: no node is ready".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cluster's own ports as a cluster with the default flags has them.
    const OWN: OwnPorts = OwnPorts { manager: 2377, gossip: 7946, data_path: 4789 };

    fn ids() -> impl FnMut() -> Id {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n:03}")
        }
    }

    fn node(id: &str) -> Node {
        Node { underlay: vec!["10.210.0.0/24".parse().expect("net")], ..Node::test(id, id) }
    }

    fn cluster(nodes: &[&str]) -> (ClusterState, impl FnMut() -> Id) {
        let mut st = ClusterState::default();
        for n in nodes {
            st.nodes.insert((*n).into(), node(n));
        }
        let mut g = ids();
        create_network(&mut st, &NetworkCreate { name: "appnet".into(), driver: Driver::Overlay, attachable: true, subnet: None, ingress: false }, "10.0.0.0/8".parse().expect("pool"), &mut g)
            .expect("network");
        (st, g)
    }

    fn net(name: &str) -> NetworkAttach {
        NetworkAttach { name: name.into(), aliases: vec![] }
    }

    fn svc(name: &str, replicas: u64) -> ServiceCreate {
        ServiceCreate {
            name: name.into(),
            mode: ServiceMode::Replicated { replicas },
            networks: vec![NetworkAttach { name: "appnet".into(), aliases: vec![] }],
            endpoint_mode: EndpointMode::Vip,
            publish: vec![],
            command: vec!["sleep".into(), "infinity".into()],
            constraints: vec![],
            labels: Default::default(),
            env: Default::default(),
            update: Default::default(),
        }
    }

    fn update_service_ports(st: &mut ClusterState, name: &str, add: &[PublishSpec], rm: &[PublishedPort], own: &OwnPorts, g: IdGen) -> Result<Service, OpError> {
        update_service(st, name, &ServiceUpdate { publish_add: add.to_vec(), publish_rm: rm.to_vec(), ..Default::default() }, own, 0, g)
    }

    fn running(st: &ClusterState) -> Vec<&Task> {
        st.tasks.values().filter(|t| t.desired_state == DesiredState::Running).collect()
    }

    fn per_node(st: &ClusterState) -> BTreeMap<Id, usize> {
        let mut m = BTreeMap::new();
        for t in running(st) {
            *m.entry(t.node_id.clone().unwrap_or_default()).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn replicas_spread_over_nodes_with_addresses() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        let s = create_service(&mut st, &svc("web", 3), &OWN, &mut g).expect("service");
        let net = st.network_by_name("appnet").expect("net").clone();
        assert_eq!(net.subnet.to_string(), "10.0.0.0/24");
        assert_eq!(s.vips.get(&net.id).map(|v| v.to_string()), Some("10.0.0.2".into()));
        assert_eq!(per_node(&st).values().copied().collect::<Vec<_>>(), vec![1, 1, 1]);
        let mut addrs: Vec<String> = running(&st).iter().map(|t| t.addresses[&net.id].to_string()).collect();
        addrs.sort();
        assert_eq!(addrs, vec!["10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        assert!(running(&st).iter().all(|t| t.state == TaskState::Assigned));
        let mut names: Vec<&str> = running(&st).iter().map(|t| t.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["web.1", "web.2", "web.3"]);
    }

    #[test]
    fn drain_moves_tasks_pause_places_none_and_constraints_choose_the_nodes() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        create_service(&mut st, &svc("web", 3), &OWN, &mut g).expect("service");
        // Drained: b's task stops ("node b is drained") and its slot goes to a or c.
        let none = BTreeMap::new();
        update_node(&mut st, "b", Some(Availability::Drain), &none, &[], &mut g).expect("drain");
        let pn = per_node(&st);
        assert_eq!((pn.get("b"), pn.values().sum::<usize>()), (None, 3), "{pn:?}");
        assert!(st.tasks.values().any(|t| t.desired_state == DesiredState::Shutdown && t.error == "node b is drained"));
        // Paused: its tasks stay, no new one comes.
        update_node(&mut st, "b", Some(Availability::Active), &none, &[], &mut g).expect("active");
        update_node(&mut st, "a", Some(Availability::Pause), &none, &[], &mut g).expect("pause");
        let on_a = per_node(&st).get("a").copied();
        scale_service(&mut st, "web", 6, &mut g).expect("scale");
        assert_eq!(per_node(&st).get("a").copied(), on_a, "a paused: nothing new on it");
        // Constraints: a label, a hostname, a role; all must hold.
        let zone: BTreeMap<String, String> = [("zone".to_string(), "x".to_string())].into();
        update_node(&mut st, "c", None, &zone, &[], &mut g).expect("label");
        let mut s = svc("pinned", 2);
        s.constraints = vec!["node.labels.zone==x".parse().expect("c"), "node.role==worker".parse().expect("c")];
        create_service(&mut st, &s, &OWN, &mut g).expect("constrained");
        let pinned: Vec<&Task> = running(&st).into_iter().filter(|t| t.name.starts_with("pinned.")).collect();
        assert!(pinned.iter().all(|t| t.node_id.as_deref() == Some("c")), "only c has zone=x");
        // None can: pending, saying why; a label removed does not move running tasks.
        let mut s = svc("nowhere", 1);
        s.constraints = vec!["node.hostname==zz".parse().expect("c")];
        create_service(&mut st, &s, &OWN, &mut g).expect("unplaceable is created");
        let t = running(&st).into_iter().find(|t| t.name == "nowhere.1").cloned().expect("task");
        assert_eq!(t.state, TaskState::Pending);
        assert!(t.error.contains("no suitable node") && t.error.contains("node.hostname==zz"), "{}", t.error);
        update_node(&mut st, "c", None, &none, &["zone".to_string()], &mut g).expect("label rm");
        assert!(running(&st).iter().filter(|t| t.name.starts_with("pinned.")).all(|t| t.node_id.as_deref() == Some("c")));
        // Draining the only node a service may run on: its task waits, saying so.
        update_node(&mut st, "c", None, &zone, &[], &mut g).expect("label again");
        update_node(&mut st, "c", Some(Availability::Drain), &none, &[], &mut g).expect("drain c");
        let p: Vec<&Task> = running(&st).into_iter().filter(|t| t.name.starts_with("pinned.")).collect();
        assert!(p.iter().all(|t| t.state == TaskState::Pending && t.error.contains("paused or drained")), "{p:?}");
        // Bad input changes nothing.
        let bad: BTreeMap<String, String> = [("a b".to_string(), "x".to_string())].into();
        assert!(matches!(update_node(&mut st, "c", None, &bad, &[], &mut g), Err(OpError::Invalid(_))));
        assert!(matches!(update_node(&mut st, "zz", Some(Availability::Active), &none, &[], &mut g), Err(OpError::NotFound(_))));
        assert_eq!(st.nodes["c"].availability, Availability::Drain);
    }

    #[test]
    fn global_services_run_on_the_eligible_nodes_only() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        let mut s = svc("agent", 0);
        s.mode = ServiceMode::Global;
        s.constraints = vec!["node.hostname!=b".parse().expect("c")];
        create_service(&mut st, &s, &OWN, &mut g).expect("global");
        assert_eq!(per_node(&st).keys().cloned().collect::<Vec<_>>(), vec!["a".to_string(), "c".to_string()]);
        update_node(&mut st, "c", Some(Availability::Drain), &BTreeMap::new(), &[], &mut g).expect("drain");
        assert_eq!(per_node(&st).keys().cloned().collect::<Vec<_>>(), vec!["a".to_string()]);
        let info = crate::views::service_info(&st.services.values().next().cloned().expect("svc"), &st);
        assert_eq!(info.desired_replicas, 1, "desired: the eligible nodes");
    }

    /// Marks every placed task meant to run as running, as their nodes would report.
    fn all_run(st: &mut ClusterState) {
        for t in st.tasks.values_mut().filter(|t| t.desired_state == DesiredState::Running && t.node_id.is_some()) {
            t.state = TaskState::Running;
        }
    }

    fn serving(st: &ClusterState, svc: &str) -> usize {
        st.tasks.values().filter(|t| t.name.starts_with(&format!("{svc}.")) && t.desired_state == DesiredState::Running && t.state == TaskState::Running).count()
    }

    fn status(st: &ClusterState, svc: &str) -> UpdateStatus {
        st.service_by_name(svc).and_then(|s| s.update_status.clone()).expect("an update status")
    }

    #[test]
    fn a_rolling_update_replaces_one_task_at_a_time_never_serving_fewer() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        create_service(&mut st, &svc("web", 3), &OWN, &mut g).expect("service");
        all_run(&mut st);
        let old: BTreeSet<Id> = running(&st).iter().map(|t| t.id.clone()).collect();
        let change = ServiceUpdate { command: Some(vec!["sleep".into(), "1000".into()]), env_add: BTreeMap::from([("V".into(), "2".into())]), ..Default::default() };
        let s = update_service(&mut st, "web", &change, &OWN, 1000, &mut g).expect("update");
        assert_eq!((s.version, s.update_status.as_ref().map(|u| u.state)), (1, Some(UpdateState::Updating)));
        let mut now = 1000;
        for step in 0..3 {
            // One new task at a time, placed, made from the new spec.
            let new: Vec<&Task> = running(&st).into_iter().filter(|t| t.version == 1 && t.state != TaskState::Running).collect();
            assert_eq!(new.len(), 1, "step {step}: {:?}", running(&st));
            assert!(new[0].node_id.is_some() && new[0].command == ["sleep", "1000"] && new[0].env["V"] == "2", "{:?}", new[0]);
            // Nothing moves until it runs; the old ones all serve meanwhile.
            assert!(!advance_updates(&mut st, now, &mut g));
            assert_eq!(serving(&st, "web"), 3);
            all_run(&mut st);
            now += 100;
            assert!(advance_updates(&mut st, now, &mut g));
            assert!(serving(&st, "web") >= 3, "step {step}: never fewer than 3 serving");
        }
        assert!(advance_updates(&mut st, now, &mut g), "the last step completes it");
        assert_eq!(status(&st, "web").state, UpdateState::Completed);
        let now_running: BTreeSet<Id> = running(&st).iter().map(|t| t.id.clone()).collect();
        assert_eq!(now_running.len(), 3);
        assert!(now_running.is_disjoint(&old), "every task replaced");
        let mut slots: Vec<Option<u64>> = running(&st).iter().map(|t| t.slot).collect();
        slots.sort();
        assert_eq!(slots, vec![Some(1), Some(2), Some(3)], "the same slots");
        assert!(st.tasks.values().filter(|t| old.contains(&t.id)).all(|t| t.desired_state == DesiredState::Shutdown && t.error == "replaced by an update to version 1"));
        assert!(!advance_updates(&mut st, now + 1000, &mut g), "nothing more to do");
    }

    #[test]
    fn the_delay_parallelism_and_a_failed_task_pause() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        let mut spec = svc("web", 4);
        spec.update = UpdateConfig { parallelism: 2, delay_ms: 5000 };
        create_service(&mut st, &spec, &OWN, &mut g).expect("service");
        all_run(&mut st);
        update_service(&mut st, "web", &ServiceUpdate { force: true, ..Default::default() }, &OWN, 0, &mut g).expect("force");
        let pending_new = |st: &ClusterState| running(st).into_iter().filter(|t| t.version == 1 && t.state != TaskState::Running).count();
        assert_eq!(pending_new(&st), 2, "two at a time");
        all_run(&mut st);
        advance_updates(&mut st, 1000, &mut g);
        assert_eq!(pending_new(&st), 0, "the delay holds the next ones");
        assert_eq!(status(&st, "web").not_before_ms, 6000);
        advance_updates(&mut st, 5999, &mut g);
        assert_eq!(pending_new(&st), 0);
        advance_updates(&mut st, 6000, &mut g);
        assert_eq!(pending_new(&st), 2, "after the delay");
        // One of them fails: paused, the failed ones stopped, the old ones still serve.
        let twin = running(&st).into_iter().find(|t| t.version == 1 && t.state != TaskState::Running).map(|t| t.id.clone()).expect("a twin");
        if let Some(t) = st.tasks.get_mut(&twin) {
            t.state = TaskState::Failed;
            t.error = "exited with status 1".into();
        }
        assert!(advance_updates(&mut st, 6100, &mut g));
        let u = status(&st, "web");
        assert_eq!(u.state, UpdateState::Paused);
        assert!(u.message.contains("exited with status 1") && u.message.contains("--force web"), "{}", u.message);
        assert!(st.tasks.get(&twin).is_none_or(|t| t.desired_state == DesiredState::Shutdown), "the failed one stopped (and, finished, forgotten)");
        assert_eq!(serving(&st, "web"), 4, "two new and two old serve");
        assert_eq!(pending_new(&st), 0, "the other new task not yet running is stopped too");
        assert_eq!(running(&st).len(), 4);
        assert!(!advance_updates(&mut st, 99_000, &mut g), "a paused update does not move");
    }

    #[test]
    fn an_update_on_an_update_and_one_that_cannot_be_placed() {
        let (mut st, mut g) = cluster(&["a", "b"]);
        let mut spec = svc("web", 2);
        spec.update = UpdateConfig { parallelism: 0, delay_ms: 0 };
        create_service(&mut st, &spec, &OWN, &mut g).expect("service");
        all_run(&mut st);
        update_service(&mut st, "web", &ServiceUpdate { force: true, ..Default::default() }, &OWN, 0, &mut g).expect("v1");
        assert_eq!(running(&st).len(), 4, "two old, two new of version 1 starting");
        // Version 2 before those run: one new task per slot, the version-1 ones stopped.
        update_service(&mut st, "web", &ServiceUpdate { force: true, ..Default::default() }, &OWN, 0, &mut g).expect("v2");
        let meant = running(&st);
        assert_eq!(meant.len(), 4, "{meant:?}");
        assert_eq!(meant.iter().filter(|t| t.version == 2).count(), 2);
        assert_eq!(meant.iter().filter(|t| t.version == 0 && t.state == TaskState::Running).count(), 2);
        all_run(&mut st);
        advance_updates(&mut st, 0, &mut g);
        advance_updates(&mut st, 0, &mut g);
        assert_eq!(status(&st, "web").state, UpdateState::Completed);
        assert!(running(&st).iter().all(|t| t.version == 2) && running(&st).len() == 2);
        // A constraint no node meets: the new task cannot be placed, the update pauses and
        // the old ones serve on.
        let c: Constraint = "node.labels.zone==nowhere".parse().expect("constraint");
        update_service(&mut st, "web", &ServiceUpdate { constraint_add: vec![c], ..Default::default() }, &OWN, 0, &mut g).expect("constraint");
        advance_updates(&mut st, 0, &mut g);
        let u = status(&st, "web");
        assert!(u.state == UpdateState::Paused && u.message.contains("cannot be placed") && u.message.contains("no suitable node"), "{u:?}");
        assert_eq!(serving(&st, "web"), 2);
        assert_eq!(running(&st).len(), 2, "the unplaceable ones stopped");
    }

    #[test]
    fn update_changes_what_it_is_asked_and_refuses_what_it_cannot() {
        let (mut st, mut g) = cluster(&["a", "b"]);
        create_service(&mut st, &svc("web", 2), &OWN, &mut g).expect("service");
        all_run(&mut st);
        // Labels, replicas and update settings: no task replaced.
        let spec = ServiceUpdate { label_add: BTreeMap::from([("tier".into(), "front".into())]), replicas: Some(3), parallelism: Some(0), delay_ms: Some(10), ..Default::default() };
        let s = update_service(&mut st, "web", &spec, &OWN, 0, &mut g).expect("update");
        assert_eq!((s.version, s.update_status.clone(), s.labels["tier"].as_str()), (0, None, "front"));
        assert_eq!((s.mode, s.update), (ServiceMode::Replicated { replicas: 3 }, UpdateConfig { parallelism: 0, delay_ms: 10 }));
        assert_eq!(running(&st).len(), 3);
        // The same command again changes nothing either.
        let s = update_service(&mut st, "web", &ServiceUpdate { command: Some(vec!["sleep".into(), "infinity".into()]), ..Default::default() }, &OWN, 0, &mut g).expect("same");
        assert_eq!(s.version, 0);
        // A constraint: a rolling update, parallelism 0 = all at once.
        let c: Constraint = "node.hostname==a".parse().expect("constraint");
        let s = update_service(&mut st, "web", &ServiceUpdate { constraint_add: vec![c.clone()], ..Default::default() }, &OWN, 0, &mut g).expect("constraint");
        assert_eq!(s.version, 1);
        let twins: Vec<&Task> = running(&st).into_iter().filter(|t| t.version == 1).collect();
        assert!(twins.len() == 3 && twins.iter().all(|t| t.node_id.as_deref() == Some("a")), "{twins:?}");
        // Refusals: each says what, nothing changed (the manager commits only on success).
        let bad = [
            (ServiceUpdate::default(), "nothing to change"),
            (ServiceUpdate { env_rm: vec!["NOPE".into()], ..Default::default() }, "has no environment variable NOPE"),
            (ServiceUpdate { label_rm: vec!["nope".into()], ..Default::default() }, "has no label nope"),
            (ServiceUpdate { constraint_rm: vec!["node.hostname==b".parse().expect("c")], ..Default::default() }, "has no constraint node.hostname==b"),
            (ServiceUpdate { command: Some(vec![]), ..Default::default() }, "an empty command"),
            (ServiceUpdate { env_add: BTreeMap::from([("1X".into(), "v".into())]), ..Default::default() }, "letters, digits and _"),
        ];
        for (spec, want) in bad {
            let mut copy = st.clone();
            let e = update_service(&mut copy, "web", &spec, &OWN, 0, &mut g).expect_err(want);
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
        assert!(matches!(update_service(&mut st, "nope", &ServiceUpdate { force: true, ..Default::default() }, &OWN, 0, &mut g), Err(OpError::NotFound(_))));
        let (mut st, mut g) = cluster(&["a"]);
        let mut global = svc("g", 0);
        global.mode = ServiceMode::Global;
        create_service(&mut st, &global, &OWN, &mut g).expect("global");
        let e = update_service(&mut st, "g", &ServiceUpdate { replicas: Some(2), ..Default::default() }, &OWN, 0, &mut g).expect_err("global");
        assert!(e.to_string().contains("global service"), "{e}");
    }

    #[test]
    fn scale_up_and_down() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        create_service(&mut st, &svc("web", 3), &OWN, &mut g).expect("service");
        scale_service(&mut st, "web", 6, &mut g).expect("scale up");
        assert_eq!(per_node(&st).values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        scale_service(&mut st, "web", 1, &mut g).expect("scale down");
        assert_eq!(running(&st).len(), 1);
        assert_eq!(running(&st)[0].slot, Some(1));
        // The 5 removed tasks wait for their nodes to confirm they stopped.
        assert_eq!(st.tasks.len(), 6);
    }

    #[test]
    fn node_down_reschedules_and_full_report_cleans_up() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        create_service(&mut st, &svc("web", 3), &OWN, &mut g).expect("service");
        assert!(set_node_status(&mut st, &"b".into(), NodeStatus::Down, &mut g));
        let pn = per_node(&st);
        assert_eq!(pn.get("b"), None);
        assert_eq!(pn.values().sum::<usize>(), 3);
        // b comes back and reports nothing: its old task is dropped, freeing its address.
        set_node_status(&mut st, &"b".into(), NodeStatus::Ready, &mut g);
        apply_reports(&mut st, &"b".into(), &[], true, &mut g);
        assert_eq!(st.tasks.len(), 3);
    }

    #[test]
    fn global_mode_follows_nodes() {
        let (mut st, mut g) = cluster(&["a", "b"]);
        let mut req = svc("agent", 0);
        req.mode = ServiceMode::Global;
        create_service(&mut st, &req, &OWN, &mut g).expect("global");
        assert_eq!(running(&st).len(), 2);
        st.nodes.insert("c".into(), node("c"));
        reconcile(&mut st, &mut g);
        assert_eq!(per_node(&st).len(), 3);
        assert!(running(&st).iter().any(|t| t.name == "agent.c"));
        assert!(matches!(scale_service(&mut st, "agent", 3, &mut g), Err(OpError::Invalid(_))));
    }

    #[test]
    fn exhaustion_is_refused_up_front_and_state_is_unchanged() {
        let (mut st, mut g) = cluster(&["a"]);
        create_network(
            &mut st,
            &NetworkCreate { name: "tiny".into(), driver: Driver::Overlay, attachable: false, subnet: Some("10.9.9.0/29".parse().expect("subnet")), ingress: false },
            "10.0.0.0/8".parse().expect("pool"),
            &mut g,
        )
        .expect("tiny");
        // /29: 6 hosts, gateway takes one: 5 free. VIP + 5 tasks do not fit.
        let mut req = svc("big", 5);
        req.networks = vec![net("tiny")];
        let before = st.clone();
        let e = create_service(&mut st, &req, &OWN, &mut g).expect_err("exhausted");
        assert!(e.to_string().contains("tiny"), "{e}");
        assert!(e.to_string().contains("no free address"), "{e}");
        // The manager works on a clone; here we check create_service fails before changing anything.
        assert_eq!(st, before);
        req.mode = ServiceMode::Replicated { replicas: 4 };
        create_service(&mut st, &req, &OWN, &mut g).expect("fits");
        let e = scale_service(&mut st, "big", 5, &mut g).expect_err("scale past capacity");
        assert!(e.to_string().contains("no free address"), "{e}");
    }

    #[test]
    fn bad_input() {
        let (mut st, mut g) = cluster(&["a"]);
        create_service(&mut st, &svc("web", 1), &OWN, &mut g).expect("web");
        assert!(matches!(create_service(&mut st, &svc("web", 1), &OWN, &mut g), Err(OpError::Conflict(_))));
        let mut r = svc("x", 1);
        r.networks = vec![net("nope")];
        assert_eq!(create_service(&mut st, &r, &OWN, &mut g), Err(OpError::NotFound("network nope not found".into())));
        assert!(matches!(create_service(&mut st, &svc("-bad", 1), &OWN, &mut g), Err(OpError::Invalid(_))));
        let mut r = svc("p", 1);
        // A spec no CLI would send (the manager checks what any client sends).
        r.publish = vec![PublishSpec { published: Some(0), target: 80, protocol: Protocol::Tcp, mode: PublishMode::Ingress }];
        assert!(matches!(create_service(&mut st, &r, &OWN, &mut g), Err(OpError::Invalid(_))));
        let dup = NetworkCreate { name: "appnet".into(), driver: Driver::Overlay, attachable: false, subnet: None, ingress: false };
        assert!(matches!(create_network(&mut st, &dup, "10.0.0.0/8".parse().expect("p"), &mut g), Err(OpError::Conflict(_))));
        let overlap = NetworkCreate { name: "o".into(), driver: Driver::Overlay, attachable: false, subnet: Some("10.0.0.128/25".parse().expect("subnet")), ingress: false };
        let e = create_network(&mut st, &overlap, "10.0.0.0/8".parse().expect("p"), &mut g).expect_err("overlap");
        assert!(e.to_string().contains("overlaps network appnet"), "{e}");
        let e = remove_network(&mut st, "appnet").expect_err("in use");
        assert!(e.to_string().contains("in use by service web"), "{e}");
    }

    #[test]
    fn vnis_are_unique_from_4096() {
        let (mut st, mut g) = cluster(&["a"]);
        let n2 =
            create_network(&mut st, &NetworkCreate { name: "second".into(), driver: Driver::Overlay, attachable: false, subnet: None, ingress: false }, "10.0.0.0/8".parse().expect("pool"), &mut g)
                .expect("second");
        assert_eq!(st.network_by_name("appnet").map(|n| n.vni), Some(4096));
        assert_eq!(n2.vni, 4097);
        assert_eq!(n2.subnet.to_string(), "10.0.1.0/24");
    }

    #[test]
    fn standalone_needs_attachable() {
        let (mut st, mut g) = cluster(&["a"]);
        create_network(&mut st, &NetworkCreate { name: "closed".into(), driver: Driver::Overlay, attachable: false, subnet: None, ingress: false }, "10.0.0.0/8".parse().expect("pool"), &mut g)
            .expect("closed");
        let req = StandaloneCreate { name: "probe".into(), networks: vec![net("closed")], command: vec!["true".into()] };
        let e = create_standalone(&mut st, &req, &"a".into(), &mut g).expect_err("not attachable");
        assert!(e.to_string().contains("not attachable"), "{e}");
        let req = StandaloneCreate { networks: vec![net("appnet")], ..req };
        let t = create_standalone(&mut st, &req, &"a".into(), &mut g).expect("attachable");
        assert_eq!(t.addresses.len(), 1);
        // It finished: it is dropped and its address freed.
        apply_reports(&mut st, &"a".into(), &[TaskReport { task_id: t.id.clone(), state: TaskState::Complete, error: String::new(), pid: None, restarts: 0 }], false, &mut g);
        assert!(!st.tasks.contains_key(&t.id));
    }

    #[test]
    fn a_container_attaches_once_per_interface_and_detaches_freeing_its_address() {
        let (mut st, mut g) = cluster(&["a", "b"]);
        create_network(&mut st, &NetworkCreate { name: "closed".into(), driver: Driver::Overlay, attachable: false, subnet: None, ingress: false }, "10.0.0.0/8".parse().expect("pool"), &mut g)
            .expect("closed");
        let req = ContainerAttach { network: "appnet".into(), container_id: "c1".into(), ifname: "eth0".into(), name: "pod-a".into() };
        let t = attach_container(&mut st, &req, &"a".into(), &mut g).expect("attached");
        assert_eq!((t.state, t.container.as_ref().map(|c| c.id.as_str())), (TaskState::Running, Some("c1")));
        let again = attach_container(&mut st, &req, &"a".into(), &mut g).expect("again");
        assert_eq!(again.id, t.id, "the same container interface: the same task and address");
        let other = attach_container(&mut st, &ContainerAttach { ifname: "eth1".into(), ..req.clone() }, &"a".into(), &mut g).expect("second interface");
        assert_ne!(other.addresses, t.addresses);
        let on_b = attach_container(&mut st, &req, &"b".into(), &mut g).expect("another node's container of that id");
        assert_ne!(on_b.id, t.id);
        assert!(crate::session::assignments(&st, &"a".into()).is_empty(), "nothing for the node's runtime to run");
        // The node's full report (it lists no container) leaves them alone.
        apply_reports(&mut st, &"a".into(), &[], true, &mut g);
        assert!(st.tasks.contains_key(&t.id));
        let closed = ContainerAttach { network: "closed".into(), ..req.clone() };
        assert!(attach_container(&mut st, &closed, &"a".into(), &mut g).expect_err("closed").to_string().contains("not attachable"));
        let nowhere = ContainerAttach { network: "nope".into(), ..req.clone() };
        assert!(matches!(attach_container(&mut st, &nowhere, &"a".into(), &mut g), Err(OpError::NotFound(_))));
        let bad = ContainerAttach { name: "no spaces".into(), ..req.clone() };
        assert!(matches!(attach_container(&mut st, &bad, &"a".into(), &mut g), Err(OpError::Invalid(_))));
        let del = ContainerDetach { network: "appnet".into(), container_id: "c1".into(), ifname: "eth0".into(), task_id: None };
        let late = ContainerDetach { task_id: Some("an-older-task".into()), ..del.clone() };
        assert!(detach_container(&mut st, &late, &"a".into()).expect("late").is_none(), "a late detach of an older task leaves the newer one");
        assert_eq!(detach_container(&mut st, &del, &"a".into()).expect("detached").map(|t| t.id), Some(t.id.clone()));
        assert!(detach_container(&mut st, &del, &"a".into()).expect("again").is_none(), "a DEL repeated finds nothing");
        assert!(st.tasks.contains_key(&on_b.id), "node b's container stays");
        let reused = attach_container(&mut st, &ContainerAttach { container_id: "c9".into(), ..req }, &"a".into(), &mut g).expect("reattach");
        assert_eq!(reused.addresses, t.addresses, "the freed address is given again (lowest free)");
    }

    fn with_ingress(nodes: &[&str]) -> (ClusterState, impl FnMut() -> Id) {
        let (mut st, mut g) = cluster(nodes);
        make_ingress(&mut st, "10.0.0.0/8".parse().expect("pool"), None, &mut g).expect("ingress");
        (st, g)
    }

    fn publishing(name: &str, replicas: u64, publish: &[&str]) -> ServiceCreate {
        let mut r = svc(name, replicas);
        r.publish = publish.iter().map(|p| p.parse().expect("publish spec")).collect();
        r
    }

    fn specs(s: &[&str]) -> Vec<PublishSpec> {
        s.iter().map(|p| p.parse().expect("publish spec")).collect()
    }

    fn ports(s: &[&str]) -> Vec<PublishedPort> {
        s.iter().map(|p| p.parse().expect("published port")).collect()
    }

    #[test]
    fn ingress_network_is_made_with_the_cluster_and_kept_while_used() {
        let (mut st, mut g) = with_ingress(&["a"]);
        let ing = st.networks.values().find(|n| n.ingress).expect("ingress").clone();
        assert_eq!((ing.name.as_str(), ing.subnet.to_string().as_str()), ("ingress", "10.255.255.0/24"));
        // Networks are handed out from the start of the pool and never get its subnet.
        let over = NetworkCreate { name: "over".into(), driver: Driver::Overlay, attachable: false, subnet: Some("10.255.0.0/16".parse().expect("subnet")), ingress: false };
        let e = create_network(&mut st, &over, "10.0.0.0/8".parse().expect("p"), &mut g).expect_err("overlap");
        assert!(e.to_string().contains("overlaps network ingress"), "{e}");
        let again = NetworkCreate { name: "ing2".into(), driver: Driver::Overlay, attachable: false, subnet: None, ingress: true };
        let e = create_network(&mut st, &again, "10.0.0.0/8".parse().expect("p"), &mut g).expect_err("second ingress");
        assert!(e.to_string().contains("has an ingress network already (ingress)"), "{e}");
        let mut r = svc("x", 1);
        r.networks = vec![net("ingress")];
        assert!(create_service(&mut st, &r, &OWN, &mut g).expect_err("attach").to_string().contains("the cluster's own"));
        create_service(&mut st, &publishing("web", 1, &["8080:80"]), &OWN, &mut g).expect("web");
        let e = remove_network(&mut st, "ingress").expect_err("in use");
        assert!(e.to_string().contains("in use by service web"), "{e}");
        assert!(st.nodes.values().all(|n| n.ingress_ip.is_some()), "every node has an ingress address");
        let e = create_service(&mut st, &publishing("own", 1, &["7946:80/udp"]), &OWN, &mut g).expect_err("gossip port");
        assert!(e.to_string().contains("port 7946/udp is the cluster's own (gossip)"), "{e}");
        let web = st.service_by_name("web").expect("web").id.clone();
        let t = running(&st).into_iter().find(|t| t.service_id.as_ref() == Some(&web)).expect("task").clone();
        assert_eq!(t.networks.last(), Some(&ing.id), "a publishing service's tasks are on the ingress network, last");
        assert_eq!(t.addresses.len(), t.networks.len());
        remove_service(&mut st, "web", &mut g).expect("rm web");
        let e = remove_network(&mut st, "ingress").expect_err("task still stopping");
        assert!(e.to_string().contains("still stopping"), "{e}");
        apply_reports(&mut st, &"a".to_string(), &[], true, &mut g);
        remove_network(&mut st, "ingress").expect("unused: removable");
        assert!(st.nodes.values().all(|n| n.ingress_ip.is_none()), "ingress addresses go with the network");
        let e = create_service(&mut st, &publishing("web", 1, &["8080:80"]), &OWN, &mut g).expect_err("no ingress");
        assert!(e.to_string().contains("no ingress network"), "{e}");
        let e = create_service(&mut st, &publishing("hostonly", 1, &["published=8080,target=80,mode=host"]), &OWN, &mut g).expect_err("host mode needs it too");
        assert!(e.to_string().contains("no ingress network"), "{e}");
        let given: Ipv4Network = "192.168.77.0/24".parse().expect("net");
        let n = make_ingress(&mut st, "10.0.0.0/8".parse().expect("p"), Some(given), &mut g).expect("given subnet");
        assert_eq!(n.subnet, given);
    }

    #[test]
    fn ports_auto_conflicts_and_updates() {
        let (mut st, mut g) = with_ingress(&["a", "b"]);
        let web = create_service(&mut st, &publishing("web", 2, &["8080:80", "80", "53/udp"]), &OWN, &mut g).expect("web");
        let got: Vec<(u16, u16, Protocol)> = web.ports.iter().map(|p| (p.published, p.target, p.protocol)).collect();
        assert_eq!(got, vec![(8080, 80, Protocol::Tcp), (30000, 80, Protocol::Tcp), (30000, 53, Protocol::Udp)]);
        let e = create_service(&mut st, &publishing("api", 1, &["8080:9000"]), &OWN, &mut g).expect_err("taken");
        assert_eq!(e.to_string(), "port 8080/tcp is already published by service web");
        let e = create_service(&mut st, &publishing("api", 1, &["9000:1", "9000:2"]), &OWN, &mut g).expect_err("twice");
        assert!(e.to_string().contains("published twice"), "{e}");
        let api = create_service(&mut st, &publishing("api", 1, &["8080:80/udp", "443"]), &OWN, &mut g).expect("udp 8080 is free");
        assert_eq!(api.ports[1].published, 30001);

        let tasks_before: BTreeSet<Id> = st.tasks.keys().cloned().collect();
        let web = update_service_ports(&mut st, "web", &specs(&["9000:80"]), &ports(&["8080", "30000/udp"]), &OWN, &mut g).expect("update");
        let got: Vec<(u16, Protocol)> = web.ports.iter().map(|p| (p.published, p.protocol)).collect();
        assert_eq!(got, vec![(30000, Protocol::Tcp), (9000, Protocol::Tcp)]);
        assert_eq!(st.tasks.keys().cloned().collect::<BTreeSet<_>>(), tasks_before, "no task replaced");
        // What was freed can be taken, what is held cannot.
        create_service(&mut st, &publishing("other", 1, &["8080:80"]), &OWN, &mut g).expect("8080 freed");
        let e = update_service_ports(&mut st, "api", &specs(&["9000:80"]), &[], &OWN, &mut g).expect_err("held");
        assert_eq!(e.to_string(), "port 9000/tcp is already published by service web");
        assert_eq!(st.service_by_name("api").expect("api").ports.len(), 2, "a refused update changes nothing");
        let e = update_service_ports(&mut st, "web", &[], &ports(&["1234"]), &OWN, &mut g).expect_err("not published");
        assert!(e.to_string().contains("does not publish port 1234"), "{e}");
        assert!(matches!(update_service_ports(&mut st, "nope", &[], &ports(&["1"]), &OWN, &mut g), Err(OpError::NotFound(_))));
    }

    #[test]
    fn the_clusters_own_ports_follow_its_settings() {
        let (mut st, mut g) = with_ingress(&["a"]);
        let own = OwnPorts { manager: 3377, gossip: 8946, data_path: 30000 };
        for (spec, what) in [
            ("30000:80/udp", "30000/udp is the cluster's own (the data path, VXLAN)"),
            ("3377:80", "3377/tcp is the cluster's own (the manager's port)"),
            ("8946:80", "8946/tcp is the cluster's own (gossip)"),
            ("8946:80/udp", "8946/udp is the cluster's own (gossip)"),
        ] {
            let e = create_service(&mut st, &publishing("own", 1, &[spec]), &own, &mut g).expect_err(spec);
            assert!(e.to_string().contains(what), "{spec}: {e}");
        }
        // The defaults are free once the cluster uses others.
        create_service(&mut st, &publishing("free", 1, &["4789:80/udp", "2377:80", "7946:80"]), &own, &mut g).expect("default ports are free here");
        // A port picked for the user is never the cluster's own either.
        let s = create_service(&mut st, &publishing("auto", 1, &["80/udp"]), &own, &mut g).expect("auto");
        assert_eq!(s.ports[0].published, 30001, "30000/udp is the data path's");
        let e = update_service_ports(&mut st, "auto", &specs(&["30000:53/udp"]), &[], &own, &mut g).expect_err("update to the data path port");
        assert!(e.to_string().contains("the data path"), "{e}");
    }

    #[test]
    fn auto_ports_run_out() {
        let (mut st, mut g) = with_ingress(&["a"]);
        let all: Vec<PublishSpec> = AUTO_PORTS.map(|p| format!("{p}:80").parse().expect("spec")).collect();
        let mut r = svc("all", 0);
        r.publish = all;
        create_service(&mut st, &r, &OWN, &mut g).expect("all auto ports by hand");
        let e = create_service(&mut st, &publishing("one", 0, &["80"]), &OWN, &mut g).expect_err("none left");
        assert!(e.to_string().contains("no free port left in 30000-32767"), "{e}");
    }

    #[test]
    fn host_mode_port_one_task_per_node() {
        let (mut st, mut g) = with_ingress(&["a", "b"]);
        create_service(&mut st, &publishing("web", 3, &["published=8080,target=80,mode=host"]), &OWN, &mut g).expect("web");
        assert_eq!(per_node(&st).get("a"), Some(&1));
        assert_eq!(per_node(&st).get("b"), Some(&1));
        let stuck: Vec<&Task> = running(&st).into_iter().filter(|t| t.node_id.is_none()).collect();
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].state, TaskState::Pending);
        assert!(stuck[0].error.contains("host-mode port 8080/tcp is taken on all 2 ready nodes"), "{}", stuck[0].error);
        // Another service with the same host port has no node left either; with another port it runs.
        create_service(&mut st, &publishing("copy", 1, &["published=8080,target=81,mode=host"]), &OWN, &mut g).expect("copy");
        let copy = st.service_by_name("copy").expect("copy").id.clone();
        assert!(running(&st).iter().any(|t| t.service_id.as_ref() == Some(&copy) && t.node_id.is_none()));
        // An ingress port takes the number on every node: it clashes with a host-mode one.
        let e = create_service(&mut st, &publishing("mesh", 1, &["8080:80"]), &OWN, &mut g).expect_err("ingress over host");
        assert!(e.to_string().contains("already published by service"), "{e}");
        // Withdrawing the host port lets the pending task start.
        update_service_ports(&mut st, "web", &specs(&["published=8081,target=80,mode=ingress"]), &ports(&["8080"]), &OWN, &mut g).expect("update");
        assert_eq!(running(&st).iter().filter(|t| t.node_id.is_none()).count(), 0, "{:?}", running(&st));
    }

    #[test]
    fn the_first_port_moves_tasks_onto_ingress_later_ones_do_not() {
        let (mut st, mut g) = with_ingress(&["a"]);
        let ing = ingress_id(&st).expect("ingress");
        create_service(&mut st, &publishing("web", 2, &[]), &OWN, &mut g).expect("web");
        let ids = |st: &ClusterState| -> BTreeSet<Id> { running(st).iter().map(|t| t.id.clone()).collect() };
        let before = ids(&st);
        assert!(running(&st).iter().all(|t| !t.networks.contains(&ing)));
        update_service_ports(&mut st, "web", &specs(&["8080:80"]), &[], &OWN, &mut g).expect("first port");
        let after = ids(&st);
        assert_eq!(after.len(), 2);
        assert!(after.is_disjoint(&before), "replaced");
        assert!(running(&st).iter().all(|t| t.networks.contains(&ing) && t.addresses.contains_key(&ing)));
        assert!(st.tasks.values().filter(|t| before.contains(&t.id)).all(|t| t.desired_state == DesiredState::Shutdown && t.error.contains("ingress network")));
        update_service_ports(&mut st, "web", &specs(&["9090:80"]), &ports(&["8080"]), &OWN, &mut g).expect("another port");
        assert_eq!(ids(&st), after, "not restarted");
    }

    #[test]
    fn a_manager_is_demoted_unless_it_is_the_last_and_removed_only_once_demoted() {
        let (mut st, mut g) = cluster(&["a", "b", "c"]);
        for id in ["a", "b"] {
            if let Some(n) = st.nodes.get_mut(id) {
                n.role = Role::Manager;
                n.manager_port = Some(2377);
            }
        }
        assert!(matches!(demote_node(&mut st, "c"), Err(OpError::Conflict(m)) if m.contains("not a manager")));
        assert!(remove_node(&mut st, "b", true, &"a".to_string(), &mut g).expect_err("a manager").to_string().contains("demote it first"));
        let n = demote_node(&mut st, "b").expect("one of two managers");
        assert_eq!((n.role, n.manager_port), (Role::Worker, Some(2377)), "its daemon still listens there");
        assert!(matches!(demote_node(&mut st, "a"), Err(OpError::Conflict(m)) if m.contains("last manager")));
        assert_eq!(st.nodes["a"].role, Role::Manager, "refused: nothing changed");
        // Promoted back, and demoted again; a node that joined as a worker cannot lead.
        assert_eq!(promote_node(&mut st, "b").expect("a demoted manager").role, Role::Manager);
        assert!(matches!(promote_node(&mut st, "a"), Err(OpError::Conflict(m)) if m.contains("already")));
        assert!(matches!(promote_node(&mut st, "c"), Err(OpError::Invalid(m)) if m.contains("swarmnet manager --store")));
        assert_eq!(st.nodes["c"].role, Role::Worker, "refused: nothing changed");
        demote_node(&mut st, "b").expect("demoted again");
        remove_node(&mut st, "b", true, &"a".to_string(), &mut g).expect("demoted: removable");
    }

    #[test]
    fn a_node_is_removed_only_when_down_or_forced_and_its_tasks_move() {
        let (mut st, mut g) = cluster(&["a", "b"]);
        create_service(&mut st, &svc("web", 2), &OWN, &mut g).expect("web");
        let e = remove_node(&mut st, "b", false, &"a".to_string(), &mut g).expect_err("up");
        assert!(e.to_string().contains("node b is up: stop it first, or remove it with --force"), "{e}");
        assert!(remove_node(&mut st, "a", true, &"a".to_string(), &mut g).expect_err("manager").to_string().contains("is the manager"));
        assert!(matches!(remove_node(&mut st, "zz", true, &"a".to_string(), &mut g), Err(OpError::NotFound(_))));
        set_node_status(&mut st, &"b".to_string(), NodeStatus::Down, &mut g);
        let n = remove_node(&mut st, "b", false, &"a".to_string(), &mut g).expect("down: removable");
        assert_eq!(n.id, "b");
        assert!(!st.nodes.contains_key("b"));
        assert!(st.tasks.values().all(|t| t.node_id.as_deref() != Some("b")));
        assert_eq!(per_node(&st).get("a"), Some(&2), "both replicas on the node that is left");
    }
}
