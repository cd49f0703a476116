//! The node's task runtime: turns the manager's assignments into running processes in
//! their own namespaces, restarts them with backoff, reports their state, and adopts the
//! ones still running after the daemon itself restarted (tasks outlive the daemon).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use swarmnet_dataplane::netns::NsWorker;
use swarmnet_dataplane::task::{self as dp, TaskNet};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use swarmnet_gossip::server::{Cmd, GossipHandle};
use crate::model::{mac_for, Id, TaskState};
use crate::ops::TaskReport;
use crate::overlay::Overlay;
use crate::proto::{Assignment, Attachment};
use swarmnet_gossip::{Endpoint, EndpointState};

const STOP_GRACE: Duration = Duration::from_secs(10);
const RESTART_MIN: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(5);

/// What survives a daemon restart, in `<data-dir>/tasks/state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Persisted {
    assignment: Assignment,
    pid: u32,
    start_time: u64,
}

struct Local {
    assignment: Assignment,
    report: Arc<Mutex<TaskReport>>,
    stop: watch::Sender<bool>,
}

/// What the runtime plugs tasks into: the overlay, the endpoint table, and a queue of
/// networks whose remote entries need a fresh look.
pub struct Net {
    pub overlay: Arc<Overlay>,
    pub gossip: GossipHandle,
    pub dirty: mpsc::UnboundedSender<Id>,
    pub vtep: std::net::IpAddr,
    pub dns: Arc<crate::dns::NodeDns>,
}

pub struct Runtime {
    ns: NsWorker,
    net: Net,
    dir: PathBuf,
    mtu: u32,
    /// Environment every task gets besides the daemon's own.
    env: Vec<(String, String)>,
    locals: Mutex<HashMap<Id, Local>>,
    persisted: Mutex<BTreeMap<Id, Persisted>>,
    /// Entries of `persisted` not yet claimed by an assignment since this daemon started.
    adoptable: Mutex<BTreeMap<Id, Persisted>>,
    /// Exit code of finished run-once tasks, and why, if they never ran.
    exits: Mutex<HashMap<Id, (i32, String)>>,
    reports: mpsc::UnboundedSender<TaskReport>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runtime {
    pub fn open(ns: NsWorker, net: Net, data_dir: &std::path::Path, underlay_mtu: u32) -> anyhow::Result<(Arc<Runtime>, mpsc::UnboundedReceiver<TaskReport>)> {
        let dir = data_dir.join("tasks");
        std::fs::create_dir_all(&dir)?;
        let persisted: BTreeMap<Id, Persisted> = match std::fs::read(dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(error = %e, "tasks/state.json is not valid; starting without it");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let env = vec![("SWARMNET_NODE_DATA_DIR".to_string(), data_dir.display().to_string())];
        Ok((
            Arc::new(Runtime {
                ns,
                net,
                dir,
                mtu: underlay_mtu.saturating_sub(50),
                env,
                locals: Mutex::new(HashMap::new()),
                adoptable: Mutex::new(persisted.clone()),
                persisted: Mutex::new(persisted),
                exits: Mutex::new(HashMap::new()),
                reports: tx,
            }),
            rx,
        ))
    }

    fn save(&self) {
        let p = lock(&self.persisted).clone();
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let r = serde_json::to_vec_pretty(&p)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = r {
            warn!(error = %e, path = %path.display(), "could not save task state");
        }
    }

    pub fn overlay(&self) -> &Overlay {
        &self.net.overlay
    }

    pub fn dns(&self) -> &crate::dns::NodeDns {
        &self.net.dns
    }

    pub fn log_path(&self, task: &Id) -> PathBuf {
        self.dir.join(format!("{task}.log"))
    }

    /// Every task this node has, for the start of a session.
    pub fn reports(&self) -> Vec<TaskReport> {
        let mut out: Vec<TaskReport> = lock(&self.locals).values().map(|l| lock(&l.report).clone()).collect();
        for (id, p) in lock(&self.adoptable).iter() {
            if dp::proc_start_time(p.pid) == Some(p.start_time) {
                out.push(TaskReport { task_id: id.clone(), state: TaskState::Running, error: String::new(), pid: Some(p.pid), restarts: 0 });
            }
        }
        out
    }

    /// Reports "shutdown" for tasks the manager wants stopped that this node does not have.
    pub fn confirm_unknown(&self, removed: &[Id]) {
        for id in removed {
            let known = lock(&self.locals).contains_key(id) || lock(&self.adoptable).contains_key(id);
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

    /// Makes the local tasks match `desired` (all the node's assignments).
    pub fn reconcile(self: &Arc<Self>, desired: &BTreeMap<Id, Assignment>) {
        let mut locals = lock(&self.locals);
        locals.retain(|id, l| {
            if desired.contains_key(id) {
                return true;
            }
            info!(task = %id, name = %l.assignment.name, "task no longer assigned: stopping");
            let _ = l.stop.send(true);
            false
        });
        // Survivors of an earlier daemon that are no longer wanted.
        let stale: Vec<(Id, Persisted)> = {
            let mut adoptable = lock(&self.adoptable);
            let ids: Vec<Id> = adoptable.keys().filter(|id| !desired.contains_key(*id)).cloned().collect();
            ids.into_iter().filter_map(|id| adoptable.remove(&id).map(|p| (id, p))).collect()
        };
        for (id, p) in stale {
            info!(task = %id, pid = p.pid, "task left by an earlier daemon is no longer assigned: stopping");
            let rt = self.clone();
            tokio::spawn(async move {
                if dp::proc_start_time(p.pid) == Some(p.start_time) {
                    stop_adopted(p.pid, p.start_time).await;
                }
                rt.teardown(&id, &p.assignment).await;
                rt.send(TaskReport { task_id: id, state: TaskState::Shutdown, error: String::new(), pid: None, restarts: 0 });
            });
        }
        for (id, a) in desired {
            if locals.contains_key(id) {
                continue;
            }
            let adopt = lock(&self.adoptable).remove(id);
            let report = Arc::new(Mutex::new(TaskReport {
                task_id: id.clone(),
                state: TaskState::Assigned,
                error: String::new(),
                pid: None,
                restarts: 0,
            }));
            let (stop_tx, stop_rx) = watch::channel(false);
            locals.insert(id.clone(), Local { assignment: a.clone(), report: report.clone(), stop: stop_tx });
            let rt = self.clone();
            let a = a.clone();
            tokio::spawn(async move { rt.supervise(a, adopt, report, stop_rx).await });
        }
    }

    fn send(&self, r: TaskReport) {
        let _ = self.reports.send(r);
    }

    fn update(&self, report: &Arc<Mutex<TaskReport>>, f: impl FnOnce(&mut TaskReport)) {
        let r = {
            let mut g = lock(report);
            f(&mut g);
            g.clone()
        };
        self.send(r);
    }

    fn nets(&self, a: &Assignment) -> Vec<TaskNet> {
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
            vtep: self.net.vtep,
            vip: at.vip,
            ports: a
                .ports
                .iter()
                .map(|p| swarmnet_gossip::Port {
                    published: p.published,
                    target: p.target,
                    proto: match p.protocol {
                        crate::model::Protocol::Tcp => 6,
                        crate::model::Protocol::Udp => 17,
                    },
                })
                .collect(),
            state,
        }
    }

    /// Puts the task on its networks' overlays and publishes its endpoints.
    async fn connect(&self, a: &Assignment) -> anyhow::Result<()> {
        for (i, at) in a.attachments.iter().enumerate() {
            self.net.overlay.attach(&a.task_id, &at.network, &dp::host_if_name(&a.task_id, i)).await?;
            self.net.gossip.send(Cmd::Set(Box::new(self.endpoint(a, at, EndpointState::Active))));
            info!(task = %a.task_id, network = %at.network.name, ip = %at.address, "endpoint published");
            let _ = self.net.dirty.send(at.network.id.clone());
        }
        Ok(())
    }

    fn publish(&self, a: &Assignment, state: EndpointState) {
        for at in &a.attachments {
            self.net.gossip.send(Cmd::Set(Box::new(self.endpoint(a, at, state))));
        }
    }

    fn withdraw(&self, a: &Assignment) {
        for at in &a.attachments {
            self.net.gossip.send(Cmd::Remove { network: at.network.id.clone(), id: a.task_id.clone() });
        }
    }

    async fn teardown(&self, id: &Id, a: &Assignment) {
        self.withdraw(a);
        for (i, at) in a.attachments.iter().enumerate() {
            if self.net.overlay.detach(id, &at.network.id, &dp::host_if_name(id, i)).await {
                // No local task left on it: stop taking its entries.
                self.net.gossip.send(Cmd::Leave(at.network.id.clone()));
            }
        }
        let ifs = self.nets(a).into_iter().map(|n| n.host_if).collect();
        if let Err(e) = dp::teardown_task_net(&self.ns, ifs).await {
            warn!(task = %id, error = %e, "could not remove the task's links");
        }
        crate::dns::NodeDns::remove_task_files(&self.dir, id);
        lock(&self.persisted).remove(id);
        self.save();
    }

    /// The task's resolver on 127.0.0.11:53 in its namespace, scoped to its networks.
    async fn resolver(&self, a: &Assignment, netns: &File) -> anyhow::Result<swarmnet_dns::server::Listener> {
        let scope = a.attachments.iter().map(|at| at.network.id.clone()).collect();
        self.net.dns.serve_task(&self.ns, netns, &a.task_id, scope).await
    }

    async fn supervise(self: Arc<Self>, a: Assignment, adopt: Option<Persisted>, report: Arc<Mutex<TaskReport>>, mut stop: watch::Receiver<bool>) {
        let id = a.task_id.clone();
        let mut netns: Option<File> = None;
        let mut dns: Option<swarmnet_dns::server::Listener> = None;
        let mut proc: Option<Proc> = None;
        if let Some(p) = adopt {
            if dp::proc_start_time(p.pid) == Some(p.start_time) {
                match dp::netns_of(p.pid) {
                    Ok(f) => {
                        info!(task = %id, pid = p.pid, "adopted a task that kept running while the daemon was away");
                        if let Err(e) = self.connect(&a).await {
                            warn!(task = %id, error = %format!("{e:#}"), "adopted task: overlay");
                        }
                        match self.resolver(&a, &f).await {
                            Ok(l) => dns = Some(l),
                            Err(e) => warn!(task = %id, error = %format!("{e:#}"), "adopted task: no resolver"),
                        }
                        netns = Some(f);
                        proc = Some(Proc::Adopted { pid: p.pid, start: p.start_time });
                        self.update(&report, |r| {
                            r.state = TaskState::Running;
                            r.pid = Some(p.pid);
                            r.error.clear();
                        });
                    }
                    Err(e) => warn!(task = %id, error = %e, "could not adopt task"),
                }
            }
        }
        let mut delay = RESTART_MIN;
        let mut stopped = false;
        'life: loop {
            if netns.is_none() {
                let setup = match dp::setup_task_net(&self.ns, self.nets(&a)).await {
                    Ok(f) => match self.resolver(&a, &f).await {
                        Ok(l) => match self.connect(&a).await {
                            Ok(()) => Ok((f, l)),
                            Err(e) => Err(format!("{e:#}")),
                        },
                        Err(e) => Err(format!("{e:#}")),
                    },
                    Err(e) => Err(e.to_string()),
                };
                match setup {
                    Ok((f, l)) => {
                        netns = Some(f);
                        dns = Some(l);
                    }
                    Err(e) => {
                        warn!(task = %id, error = %e, "task network setup failed");
                        self.teardown(&id, &a).await;
                        self.update(&report, |r| {
                            r.state = TaskState::Failed;
                            r.error = format!("network setup: {e}");
                        });
                        if !a.restart {
                            lock(&self.exits).insert(id.clone(), (-1, format!("network setup: {e}")));
                            break 'life;
                        }
                        if wait_or_stop(&mut stop, delay).await {
                            stopped = true;
                            break 'life;
                        }
                        delay = (delay * 2).min(RESTART_MAX);
                        continue;
                    }
                }
            }
            if proc.is_none() {
                let Some(ns) = netns.as_ref() else { continue };
                let mut env = self.env.clone();
                env.push(("SWARMNET_TASK_ID".into(), id.clone()));
                env.push(("SWARMNET_TASK_NAME".into(), a.name.clone()));
                let addrs: Vec<std::net::Ipv4Addr> = a.attachments.iter().map(|at| at.address).collect();
                let spawned = self
                    .net
                    .dns
                    .task_files(&self.dir, &id, &a.name, &addrs)
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))
                    .and_then(|binds| dp::spawn_in_netns(ns, &a.command, &self.log_path(&id), &env, &binds));
                match spawned {
                    Ok(child) => {
                        let pid = child.id().unwrap_or(0);
                        let start = dp::proc_start_time(pid).unwrap_or(0);
                        lock(&self.persisted).insert(id.clone(), Persisted { assignment: a.clone(), pid, start_time: start });
                        self.save();
                        info!(task = %id, name = %a.name, pid, "task started");
                        if lock(&report).restarts > 0 {
                            self.publish(&a, EndpointState::Active);
                        }
                        self.update(&report, |r| {
                            r.state = TaskState::Running;
                            r.pid = Some(pid);
                            r.error.clear();
                        });
                        proc = Some(Proc::Child { child, started: Instant::now() });
                    }
                    Err(e) => {
                        warn!(task = %id, error = %e, "task failed to start");
                        self.update(&report, |r| {
                            r.state = TaskState::Failed;
                            r.pid = None;
                            r.error = format!("start {:?}: {e}", a.command.first().cloned().unwrap_or_default());
                        });
                        if !a.restart {
                            lock(&self.exits).insert(id.clone(), (-1, format!("could not start {:?}: {e}", a.command.first().cloned().unwrap_or_default())));
                            break 'life;
                        }
                        if wait_or_stop(&mut stop, delay).await {
                            stopped = true;
                            break 'life;
                        }
                        delay = (delay * 2).min(RESTART_MAX);
                        self.update(&report, |r| r.restarts += 1);
                        continue;
                    }
                }
            }
            let Some(mut p) = proc.take() else { continue };
            let ran_for_long = |p: &Proc| matches!(p, Proc::Child { started, .. } if started.elapsed() > Duration::from_secs(10));
            tokio::select! {
                code = p.wait() => {
                    if ran_for_long(&p) {
                        delay = RESTART_MIN;
                    }
                    let (state, error) = match code {
                        Some(0) => (TaskState::Complete, "exited with status 0".to_string()),
                        Some(c) => (TaskState::Failed, format!("exited with status {c}")),
                        None => (TaskState::Failed, "exited (status unknown: adopted after a daemon restart)".to_string()),
                    };
                    info!(task = %id, name = %a.name, %error, "task exited");
                    self.publish(&a, EndpointState::Draining);
                    self.update(&report, |r| {
                        r.state = state;
                        r.error = error;
                        r.pid = None;
                    });
                    if !a.restart {
                        lock(&self.exits).insert(id.clone(), (code.unwrap_or(-1), String::new()));
                        break 'life;
                    }
                    if wait_or_stop(&mut stop, delay).await {
                        stopped = true;
                        break 'life;
                    }
                    delay = (delay * 2).min(RESTART_MAX);
                    self.update(&report, |r| r.restarts += 1);
                }
                _ = stop.changed() => {
                    // Out of every table before the process goes.
                    self.withdraw(&a);
                    p.stop().await;
                    stopped = true;
                    break 'life;
                }
            }
        }
        drop(dns);
        drop(netns);
        self.teardown(&id, &a).await;
        if stopped {
            info!(task = %id, name = %a.name, "task stopped");
            self.update(&report, |r| {
                r.state = TaskState::Shutdown;
                r.pid = None;
            });
        }
    }
}

/// Sleeps `d`; true if told to stop meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

enum Proc {
    Child { child: tokio::process::Child, started: Instant },
    Adopted { pid: u32, start: u64 },
}

impl Proc {
    /// Waits for the process to end; its exit code if known.
    async fn wait(&mut self) -> Option<i32> {
        match self {
            Proc::Child { child, .. } => match child.wait().await {
                Ok(s) => Some(s.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0))),
                Err(_) => None,
            },
            Proc::Adopted { pid, start } => {
                while dp::proc_start_time(*pid) == Some(*start) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None
            }
        }
    }

    /// SIGTERM to the task's process group, SIGKILL after the grace period.
    async fn stop(&mut self) {
        match self {
            Proc::Child { child, .. } => {
                let Some(pid) = child.id() else { return };
                let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                    let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait().await;
                }
            }
            Proc::Adopted { pid, start } => stop_adopted(*pid, *start).await,
        }
    }
}

async fn stop_adopted(pid: u32, start: u64) {
    let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while dp::proc_start_time(pid) == Some(start) {
        if Instant::now() > deadline {
            let _ = dp::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
