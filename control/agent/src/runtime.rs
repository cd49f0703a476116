//! The node's task runtime: turns the manager's assignments into running processes in
//! their own namespaces (one [`supervisor`](crate::supervisor) per task), reports their
//! state, and adopts the ones still running after the daemon itself restarted (tasks
//! outlive the daemon, ADR 0004). Each task holds its networks in [`Membership`] from the
//! moment it is assigned (or found running) until its links are gone; the runtime never
//! decides that the node leaves a network.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use swarmnet_api::{Assignment, Attachment, TaskReport, TaskState};
use swarmnet_dataplane::ingress::IngressHandle;
use swarmnet_dataplane::lb::{Host, LbBackend, LbSink};
use swarmnet_dataplane::netns::NsWorker;
use swarmnet_dataplane::overlay::Sandboxes;
use swarmnet_dataplane::state::{self, StateFile};
use swarmnet_dataplane::task::{self as dp, TaskNet};
use swarmnet_gossip::server::{Cmd, GossipHandle};
use swarmnet_types::{mac_for, Endpoint, EndpointState, Id, Port};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::dns::NodeDns;
use crate::membership::Membership;
use crate::supervisor::{self, Persisted};

pub(crate) struct Local {
    assignment: Assignment,
    report: Arc<Mutex<TaskReport>>,
    stop: watch::Sender<bool>,
    /// The service's published ports: `service update` changes them under a running task,
    /// whose supervisor publishes its endpoints again.
    ports: watch::Sender<Vec<Port>>,
}

/// What the runtime plugs tasks into.
pub struct Deps {
    pub sandboxes: Arc<Sandboxes>,
    pub membership: Arc<Membership>,
    pub gossip: GossipHandle,
    /// This node's VTEP (its underlay address), published with each endpoint.
    pub vtep: IpAddr,
    pub dns: Arc<NodeDns>,
    /// The load balancer (None: it could not start on this node; VIPs are not answered).
    pub lb: Option<Lb>,
    /// The routing mesh: a publishing task's replies go back through their entry node.
    pub ingress: IngressHandle,
    /// How task output is stored (issue 21).
    pub task_logs: crate::tasklog::LogConfig,
    /// What the overlay sink counts (metrics).
    pub overlay_stats: Arc<swarmnet_dataplane::overlay::sink::OverlayStats>,
}

/// The load balancer as the runtime and the session use it.
#[derive(Clone)]
pub struct Lb {
    pub sink: LbSink,
    pub backend: Arc<dyn LbBackend>,
    /// The node's cgroup and bpffs folders (eBPF only).
    pub host: Option<Host>,
    /// Why this is not the backend asked for (`lb ls` shows it).
    pub warning: Option<String>,
}

pub struct Runtime {
    pub(crate) ns: NsWorker,
    pub(crate) deps: Deps,
    pub(crate) dir: PathBuf,
    state: StateFile,
    pub(crate) mtu: u32,
    /// Environment every task gets besides the daemon's own.
    pub(crate) env: Vec<(String, String)>,
    locals: Mutex<HashMap<Id, Local>>,
    /// Tasks no longer assigned whose stop is not over (draining, signalled, torn down):
    /// still reported, and never confirmed gone, so the manager keeps their addresses
    /// until they are really given back.
    stopping: Mutex<HashMap<Id, Arc<Mutex<TaskReport>>>>,
    /// What survives a restart (`tasks/state.json`); saved under this lock, so two saves
    /// never interleave and the file is never older than the last change.
    persisted: Mutex<BTreeMap<Id, Persisted>>,
    /// Entries of `persisted` not yet claimed by an assignment since this daemon started.
    adoptable: Mutex<BTreeMap<Id, Persisted>>,
    /// Live task processes found in /proc when `tasks/state.json` was corrupt (id → pid,
    /// start time): adopted when their assignment comes, stopped if none does.
    found: Mutex<BTreeMap<Id, (u32, u64)>>,
    /// Exit code of finished run-once tasks, and why, if they never ran.
    exits: Mutex<HashMap<Id, (i32, String)>>,
    reports: mpsc::UnboundedSender<TaskReport>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runtime {
    pub fn open(ns: NsWorker, deps: Deps, data_dir: &std::path::Path, task_mtu: u32) -> anyhow::Result<(Arc<Runtime>, mpsc::UnboundedReceiver<TaskReport>)> {
        let dir = data_dir.join("tasks");
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
        let path = dir.join("state.json");
        let (persisted, aside): (BTreeMap<Id, Persisted>, _) = state::read_or_set_aside(&path)?;
        // A corrupt state file must not orphan live tasks (and start them twice): find them
        // by their environment before anything touches the kernel.
        let found: BTreeMap<Id, (u32, u64)> = match aside {
            Some(aside) => {
                let found: BTreeMap<Id, (u32, u64)> = dp::find_task_processes(data_dir).into_iter().map(|(id, pid, start)| (id, (pid, start))).collect();
                error!(path = %path.display(), kept_as = %aside.display(), found = found.len(), "task state is corrupt: set aside; the task processes still running were found in /proc and are adopted (or stopped) once the manager's assignments arrive");
                found
            }
            None => BTreeMap::new(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let env = vec![("SWARMNET_NODE_DATA_DIR".to_string(), data_dir.display().to_string())];
        let rt = Runtime {
            ns,
            deps,
            dir,
            state: StateFile::new(path, 0o644),
            mtu: task_mtu,
            env,
            locals: Mutex::new(HashMap::new()),
            stopping: Mutex::new(HashMap::new()),
            adoptable: Mutex::new(persisted.clone()),
            found: Mutex::new(found),
            persisted: Mutex::new(persisted),
            exits: Mutex::new(HashMap::new()),
            reports: tx,
        };
        Ok((Arc::new(rt), rx))
    }

    /// Changes what survives a restart; returns once it is on disk. The snapshot is taken
    /// under the lock (so saves keep the order of changes), the write happens off the async
    /// workers.
    async fn persist(&self, f: impl FnOnce(&mut BTreeMap<Id, Persisted>) -> bool) {
        let pending = {
            let mut g = lock(&self.persisted);
            if !f(&mut g) {
                return;
            }
            self.state.prepare(&*g)
        };
        if let Err(e) = match pending {
            Ok(p) => p.write().await,
            Err(e) => Err(e),
        } {
            error!(error = %e, "could not save task state");
        }
    }

    pub(crate) async fn remember(&self, id: &Id, p: Persisted) {
        self.persist(|g| {
            g.insert(id.clone(), p);
            true
        })
        .await
    }

    async fn forget(&self, id: &Id) {
        self.persist(|g| g.remove(id).is_some()).await
    }

    pub fn sandboxes(&self) -> &Sandboxes {
        &self.deps.sandboxes
    }

    pub fn membership(&self) -> &crate::membership::Membership {
        &self.deps.membership
    }

    pub fn dns(&self) -> &NodeDns {
        &self.deps.dns
    }

    pub fn ingress(&self) -> &IngressHandle {
        &self.deps.ingress
    }

    pub fn lb(&self) -> Option<&Lb> {
        self.deps.lb.as_ref()
    }

    /// The task's namespace is on its networks: the load balancer translates their VIPs for
    /// its sockets.
    pub(crate) async fn add_to_lb(&self, a: &Assignment, netns: &std::fs::File) -> anyhow::Result<()> {
        if let Some(lb) = &self.deps.lb {
            let vnis: Vec<u32> = a.attachments.iter().map(|at| at.network.vni).collect();
            lb.backend.add_task(&a.task_id, netns, &vnis).await.map_err(|e| anyhow::anyhow!("load balancer: add the task's namespace: {e}"))?;
        }
        if let Some(i) = a.attachments.iter().position(|at| at.network.ingress) {
            self.deps.ingress.add_task(&a.task_id, netns, &format!("eth{i}")).await.map_err(|e| anyhow::anyhow!("routing mesh: the task's reply tables: {e}"))?;
        }
        Ok(())
    }

    pub(crate) async fn remove_from_lb(&self, a: &Assignment, netns: Option<&std::fs::File>) {
        self.deps.ingress.remove_task(&a.task_id);
        if let Some(lb) = &self.deps.lb {
            let vnis: Vec<u32> = a.attachments.iter().map(|at| at.network.vni).collect();
            if let Err(e) = lb.backend.remove_task(&a.task_id, netns, &vnis).await {
                warn!(task = %a.task_id, error = %e, "load balancer: could not remove the task's namespace");
            }
        }
    }

    /// `cgroup.procs` of the node's cgroup, for a task to join (None without a load balancer).
    pub(crate) fn cgroup_procs(&self) -> anyhow::Result<Option<std::fs::File>> {
        match self.deps.lb.as_ref().and_then(|lb| lb.host.as_ref()) {
            Some(host) => Ok(Some(host.cgroup_procs()?)),
            None => Ok(None),
        }
    }

    pub fn overlay_stats(&self) -> &swarmnet_dataplane::overlay::sink::OverlayStats {
        &self.deps.overlay_stats
    }

    /// The node's DNS counters and whether the load balancer runs.
    pub fn has_lb(&self) -> bool {
        self.deps.lb.is_some()
    }

    pub fn log_path(&self, task: &Id) -> PathBuf {
        self.dir.join(format!("{task}.log"))
    }

    /// Every task this node has, for the start of a session.
    pub fn reports(&self) -> Vec<TaskReport> {
        let mut out: Vec<TaskReport> = lock(&self.locals).values().map(|l| lock(&l.report).clone()).collect();
        out.extend(lock(&self.stopping).values().map(|r| lock(r).clone()));
        for (id, p) in lock(&self.adoptable).iter() {
            if dp::proc_start_time(p.pid) == Some(p.start_time) {
                out.push(TaskReport { task_id: id.clone(), state: TaskState::Running, error: String::new(), pid: Some(p.pid), restarts: 0 });
            }
        }
        for (id, (pid, start)) in lock(&self.found).iter() {
            if dp::proc_start_time(*pid) == Some(*start) {
                out.push(TaskReport { task_id: id.clone(), state: TaskState::Running, error: String::new(), pid: Some(*pid), restarts: 0 });
            }
        }
        out
    }

    /// The tasks assigned, stopping, or waiting to be adopted (none: the node is idle).
    pub fn busy(&self) -> Vec<Id> {
        let mut out: Vec<Id> = lock(&self.locals).keys().cloned().collect();
        out.extend(lock(&self.stopping).keys().cloned());
        out.extend(lock(&self.adoptable).keys().cloned());
        out.extend(lock(&self.found).keys().cloned());
        out
    }

    /// Reports "shutdown" for tasks the manager wants stopped that this node does not have.
    pub fn confirm_unknown(&self, removed: &[Id]) {
        for id in removed {
            let known = lock(&self.locals).contains_key(id) || lock(&self.stopping).contains_key(id) || lock(&self.adoptable).contains_key(id) || lock(&self.found).contains_key(id);
            if !known {
                self.send(TaskReport { task_id: id.clone(), state: TaskState::Shutdown, error: String::new(), pid: None, restarts: 0 });
            }
        }
    }

    pub fn report_of(&self, task: &Id) -> Option<TaskReport> {
        lock(&self.locals).get(task).map(|l| lock(&l.report).clone())
    }

    pub fn exit_code(&self, task: &Id) -> Option<(i32, String)> {
        lock(&self.exits).get(task).cloned()
    }

    pub(crate) fn record_exit(&self, task: &Id, code: i32, why: String) {
        lock(&self.exits).insert(task.clone(), (code, why));
    }

    fn hold_networks(&self, id: &Id, a: &Assignment) {
        for at in &a.attachments {
            self.deps.membership.hold(&at.network, id);
        }
    }

    /// Makes the local tasks match `desired` (all the node's assignments).
    pub fn reconcile(self: &Arc<Self>, desired: &BTreeMap<Id, Assignment>) {
        // Every task new to this daemon (adopted ones among them) holds its networks before
        // anything is stopped, so no stop can take a sandbox that a task still being adopted
        // needs. Tasks already here hold theirs from their supervisor (and a finished
        // run-once task no longer does).
        {
            let locals = lock(&self.locals);
            for (id, a) in desired.iter().filter(|(id, _)| !locals.contains_key(*id)) {
                self.hold_networks(id, a);
            }
        }
        let stale: Vec<(Id, Persisted)> = {
            let mut adoptable = lock(&self.adoptable);
            let ids: Vec<Id> = adoptable.keys().filter(|id| !desired.contains_key(*id)).cloned().collect();
            ids.into_iter().filter_map(|id| adoptable.remove(&id).map(|p| (id, p))).collect()
        };
        let mut locals = lock(&self.locals);
        locals.retain(|id, l| {
            if let Some(a) = desired.get(id) {
                l.ports.send_if_modified(|p| {
                    let changed = *p != a.ports;
                    if changed {
                        info!(task = %id, name = %a.name, "published ports changed: endpoints published again");
                        p.clone_from(&a.ports);
                    }
                    changed
                });
                return true;
            }
            info!(task = %id, name = %l.assignment.name, "task no longer assigned: stopping");
            // (A finished run-once task's supervisor is gone already: nothing to wait for.)
            if !l.stop.is_closed() {
                lock(&self.stopping).insert(id.clone(), l.report.clone());
            }
            let _ = l.stop.send(true);
            false
        });
        // Survivors of an earlier daemon that are no longer wanted: their links are in the
        // sandboxes until they are gone.
        for (id, p) in stale {
            self.hold_networks(&id, &p.assignment);
            info!(task = %id, pid = p.pid, "task left by an earlier daemon is no longer assigned: stopping");
            let running = TaskReport { task_id: id.clone(), state: TaskState::Running, error: String::new(), pid: Some(p.pid), restarts: 0 };
            lock(&self.stopping).insert(id.clone(), Arc::new(Mutex::new(running)));
            let rt = self.clone();
            tokio::spawn(async move {
                if dp::proc_start_time(p.pid) == Some(p.start_time) {
                    let netns = dp::netns_of(p.pid).ok();
                    rt.remove_from_lb(&p.assignment, netns.as_ref()).await;
                    supervisor::stop_adopted(p.pid, p.start_time).await;
                }
                rt.teardown(&id, &p.assignment).await;
                lock(&rt.stopping).remove(&id);
                rt.send(TaskReport { task_id: id, state: TaskState::Shutdown, error: String::new(), pid: None, restarts: 0 });
            });
        }
        // Processes found in /proc (the state file was corrupt) that nothing assigns: their
        // links go with their namespace.
        let unwanted: Vec<(Id, (u32, u64))> = {
            let mut found = lock(&self.found);
            let ids: Vec<Id> = found.keys().filter(|id| !desired.contains_key(*id)).cloned().collect();
            ids.into_iter().filter_map(|id| found.remove(&id).map(|f| (id, f))).collect()
        };
        for (id, (pid, start)) in unwanted {
            info!(task = %id, pid, "task process found after a corrupt state file is not assigned: stopping");
            let running = TaskReport { task_id: id.clone(), state: TaskState::Running, error: String::new(), pid: Some(pid), restarts: 0 };
            lock(&self.stopping).insert(id.clone(), Arc::new(Mutex::new(running)));
            let rt = self.clone();
            tokio::spawn(async move {
                supervisor::stop_adopted(pid, start).await;
                lock(&rt.stopping).remove(&id);
            });
        }
        for (id, a) in desired {
            if locals.contains_key(id) {
                continue;
            }
            let adopt = lock(&self.adoptable).remove(id).or_else(|| lock(&self.found).remove(id).map(|(pid, start_time)| Persisted { assignment: a.clone(), pid, start_time }));
            let report = Arc::new(Mutex::new(TaskReport { task_id: id.clone(), state: TaskState::Assigned, error: String::new(), pid: None, restarts: 0 }));
            let (stop_tx, stop_rx) = watch::channel(false);
            let (ports_tx, ports_rx) = watch::channel(a.ports.clone());
            locals.insert(id.clone(), Local { assignment: a.clone(), report: report.clone(), stop: stop_tx, ports: ports_tx });
            let rt = self.clone();
            let (id, a) = (id.clone(), a.clone());
            tokio::spawn(async move {
                supervisor::supervise(rt.clone(), a, adopt, report, stop_rx, ports_rx).await;
                lock(&rt.stopping).remove(&id);
            });
        }
        drop(locals);
        // Sandboxes nothing holds any more (adopted ones included) go. New ones are made by
        // the tasks that need them. Not in the first seconds of a daemon (membership's
        // startup grace): the node's own hold on the ingress network comes with the
        // session's `Ingress` message, just after the first assignments, and its adopted
        // sandbox must not be pruned and rebuilt in between (issue 12).
        let m = self.deps.membership.clone();
        let wait = m.grace_left();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            m.prune().await
        });
    }

    pub(crate) fn send(&self, r: TaskReport) {
        let _ = self.reports.send(r);
    }

    pub(crate) fn update(&self, report: &Arc<Mutex<TaskReport>>, f: impl FnOnce(&mut TaskReport)) {
        let r = {
            let mut g = lock(report);
            f(&mut g);
            g.clone()
        };
        self.send(r);
    }

    pub(crate) fn nets(&self, a: &Assignment) -> Vec<TaskNet> {
        a.attachments
            .iter()
            .enumerate()
            .map(|(i, at)| TaskNet {
                host_if: dp::host_if_name(&a.task_id, i),
                ifname: format!("eth{i}"),
                address: at.address,
                prefix: at.network.subnet.prefix(),
                gateway: at.network.gateway,
                mac: mac_for(at.address),
                mtu: self.mtu,
                default_route: at.network.ingress,
            })
            .collect()
    }

    fn endpoint(&self, a: &Assignment, at: &Attachment, state: EndpointState) -> Endpoint {
        Endpoint {
            network: at.network.id.clone(),
            id: a.task_id.clone(),
            task_name: a.name.clone(),
            service_name: a.service_name.clone().unwrap_or_default(),
            service_id: a.service_id.clone().unwrap_or_default(),
            aliases: at.aliases.clone(),
            ip: at.address,
            mac: mac_for(at.address),
            vtep: self.deps.vtep,
            vip: at.vip,
            ports: a.ports.clone(),
            state,
        }
    }

    /// Puts the task on its networks (the node joins them first if it is not on them yet)
    /// and publishes its endpoints in `state` (draining for a task not started yet: the
    /// overlay knows them before it takes connections).
    pub(crate) async fn connect(&self, a: &Assignment, state: EndpointState) -> anyhow::Result<()> {
        self.hold_networks(&a.task_id, a);
        for (i, at) in a.attachments.iter().enumerate() {
            self.deps.membership.settle(&at.network.id, true).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            self.deps.sandboxes.plug(&at.network.id, &dp::host_if_name(&a.task_id, i)).await?;
        }
        self.publish(a, state);
        for at in &a.attachments {
            info!(task = %a.task_id, network = %at.network.name, ip = %at.address, ?state, "endpoint published");
        }
        // Let the gossip loop send it before this task goes on to slow synchronous work
        // (starting the process): woken from here, it waits in this worker's queue.
        tokio::task::yield_now().await;
        Ok(())
    }

    pub(crate) fn publish(&self, a: &Assignment, state: EndpointState) {
        for at in &a.attachments {
            if self.deps.gossip.send(Cmd::Set(Box::new(self.endpoint(a, at, state)))).is_err() {
                error!(task = %a.task_id, network = %at.network.name, "gossip is not running: endpoint not published");
            }
        }
    }

    pub(crate) fn withdraw(&self, a: &Assignment) {
        for at in &a.attachments {
            if self.deps.gossip.send(Cmd::Remove { network: at.network.id.clone(), id: a.task_id.clone() }).is_err() {
                error!(task = %a.task_id, network = %at.network.name, "gossip is not running: endpoint not withdrawn");
            }
        }
    }

    /// Removes everything of the task but its process: its endpoints, its links, its
    /// files, its holds on networks (the node leaves a network nothing holds any more).
    pub(crate) async fn teardown(&self, id: &Id, a: &Assignment) {
        self.withdraw(a);
        self.remove_from_lb(a, None).await;
        for (i, at) in a.attachments.iter().enumerate() {
            if let Err(e) = self.deps.sandboxes.unplug(&at.network.id, &dp::host_if_name(id, i)).await {
                warn!(task = %id, network = %at.network.name, error = %e, "could not unplug");
            }
        }
        let ifs = self.nets(a).into_iter().map(|n| n.host_if).collect();
        if let Err(e) = dp::teardown_task_net(&self.ns, ifs).await {
            warn!(task = %id, error = %e, "could not remove the task's links");
        }
        NodeDns::remove_task_files(&self.dir, id);
        self.forget(id).await;
        // Ended tasks' output is kept for `service logs`, the newest few only.
        let live: std::collections::HashSet<String> = lock(&self.locals).keys().chain(lock(&self.stopping).keys()).chain(lock(&self.persisted).keys()).filter(|t| *t != id).cloned().collect();
        let dir = self.dir.clone();
        let pruned = tokio::task::spawn_blocking(move || crate::tasklog::prune(&dir, &live, crate::tasklog::ENDED_KEPT)).await;
        for e in pruned.unwrap_or_default() {
            warn!(task = %id, error = %e, "an ended task's log file could not be removed");
        }
        for at in &a.attachments {
            self.deps.membership.release(&at.network.id, id);
            if let Err(e) = self.deps.membership.settle(&at.network.id, false).await {
                warn!(network = %at.network.name, error = %e, "could not settle the node's presence on the network");
            }
        }
    }
}
