//! The agent side of a node: joins with a token, keeps a session with the manager
//! (heartbeats, assignments, task reports), reconnects with backoff, and serves `run`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use swarmnet_api::replies::{LbBackendInfo, LbKind, LbPortBackend, LbPortInfo, LbServiceInfo, LbTable, MeshEntryKind, RunResult, TaskInfo};
use swarmnet_api::tls::{self, CertKey};
use swarmnet_api::token::JoinToken;
use swarmnet_api::*;
use swarmnet_dataplane::lb::BackendState;
use swarmnet_dataplane::state::{self, StateError};
use swarmnet_types::{EndpointState, Id};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tracing::{info, warn};

use crate::runtime::Runtime;

/// How long `swarm leave` waits for the tasks to stop (each has up to 10 s after its
/// SIGTERM) and the networks to be left.
const LEAVE_WITHIN: Duration = Duration::from_secs(30);
use swarmnet_dataplane::lb::VipInfo;

/// A node's identity in the cluster, in `<data-dir>/node/identity.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: Id,
    pub cluster_id: String,
    pub ca_pem: String,
    pub cert: CertKey,
    /// host:port of the manager it joined through.
    pub manager: String,
    /// Every manager it knows (`--join A,B,C`, then what each session says), to go to the
    /// next when one fails (ADR 0022).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub managers: Vec<String>,
}

impl Identity {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("node").join("identity.json")
    }

    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Identity>> {
        match state::read_json(&Self::path(data_dir)) {
            Ok(id) => Ok(id),
            Err(e @ StateError::Corrupt { .. }) => Err(anyhow!("{e}: this node cannot prove who it is; move the file away and join again with a token")),
            Err(e) => Err(e.into()),
        }
    }

    /// The managers to try, the one it joined through among them.
    pub fn manager_list(&self) -> Vec<String> {
        let mut l = self.managers.clone();
        if !l.contains(&self.manager) {
            l.push(self.manager.clone());
        }
        l
    }

    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let p = Self::path(data_dir);
        std::fs::create_dir_all(p.parent().unwrap_or(data_dir)).with_context(|| format!("create {}", p.display()))?;
        state::write_json(&p, self, 0o600)?;
        Ok(())
    }
}

async fn connect(addr: &str, cfg: rustls::ClientConfig) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to manager {addr}: timed out"))?
        .with_context(|| format!("connect to manager {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(tls::server_name(), tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake with manager {addr}: timed out"))?
        .map_err(|e| explain_tls(addr, &e.to_string()))?;
    Ok(tls)
}

/// Says what a TLS failure with the manager means. With TLS 1.3 the manager's verdict on
/// our certificate arrives as an alert on the first read, so every path uses this.
fn explain_tls(addr: &str, msg: &str) -> anyhow::Error {
    if msg.contains(tls::CA_MISMATCH) {
        anyhow!("manager {addr}: {}", tls::CA_MISMATCH)
    } else if ["UnknownCA", "BadCertificate", "CertificateRequired", "DecryptError", "CertificateExpired"].iter().any(|a| msg.contains(a)) {
        anyhow!("manager {addr} refused this node's certificate (expired, or not issued by this cluster's CA): {msg}")
    } else {
        anyhow!("TLS with manager {addr}: {msg}")
    }
}

/// Reads one message from the manager, explaining a TLS alert if that is what came.
async fn read_reply<R: tokio::io::AsyncRead + Unpin, T: serde::de::DeserializeOwned>(r: &mut R, addr: &str) -> anyhow::Result<T> {
    match read_msg::<_, T>(r).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(anyhow!("manager {addr} closed the connection")),
        Err(FrameError::Io(e)) => Err(explain_tls(addr, &e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Joins the cluster: checks the manager's CA against the token, presents the secret, and
/// stores the node certificate it receives. `managers`: tried in turn until one answers
/// (a refusal stops at once). `manager_port`: a manager joining (with the manager secret)
/// says where it will listen.
pub async fn join(data_dir: &Path, managers: &[String], token: &JoinToken, hostname: &str, addr: IpAddr, underlay: Vec<IpNetwork>, manager_port: Option<u16>) -> anyhow::Result<Identity> {
    let mut last = anyhow!("no manager to join through");
    for manager in managers {
        let cfg = tls::join_client_config(&token.ca_digest)?;
        let mut tls = match connect(manager, cfg).await {
            Ok(t) => t,
            Err(e) => {
                warn!(manager, error = %format!("{e:#}"), "join: this manager does not answer; trying the next");
                last = e;
                continue;
            }
        };
        let hello = Hello::Join { secret: token.secret.clone(), hostname: hostname.to_string(), addr, underlay: underlay.clone(), manager_port };
        write_msg(&mut tls, &hello).await?;
        let reply: Reply = read_reply(&mut tls, manager).await.context("join")?;
        let j: Joined = match reply.into_data() {
            Ok(j) => j,
            // A manager that does not lead (several managers): the next may.
            Err(e) if e.kind() == ErrorKind::NotLeader || e.kind() == ErrorKind::Unavailable => {
                last = anyhow!("manager {manager}: {e}");
                continue;
            }
            Err(e) => return Err(anyhow!("{e}")),
        };
        let id = Identity { node_id: j.node_id, cluster_id: j.cluster_id, ca_pem: j.ca_pem, cert: j.cert, manager: manager.to_string(), managers: managers.to_vec() };
        id.save(data_dir)?;
        info!(node = %id.node_id, cluster = %id.cluster_id, manager, "joined the cluster");
        return Ok(id);
    }
    Err(last.context("join"))
}

/// The agent's settings from the daemon's flags.
pub struct AgentConfig {
    pub gossip_port: u16,
    /// Where the gossip keys are kept.
    pub data_dir: std::path::PathBuf,
    /// The node's display name (`--hostname`).
    pub hostname: String,
}

pub struct Agent {
    pub id: Identity,
    /// The managers it knows and the one it uses now (an index into them).
    managers: std::sync::Mutex<(Vec<String>, usize)>,
    pub gossip: swarmnet_gossip::server::GossipHandle,
    gossip_port: u16,
    tls: rustls::ClientConfig,
    pub runtime: Arc<Runtime>,
    reports: Mutex<mpsc::UnboundedReceiver<TaskReport>>,
    assigned: Mutex<BTreeMap<Id, Assignment>>,
    /// The cluster's VIP list, handed to the load balancer by a task of its own: programming
    /// may wait for a long resync, and the session must go on meanwhile (heartbeats).
    vips: tokio::sync::watch::Sender<Option<Vec<VipInfo>>>,
    /// The node's place on the ingress network, followed by `ingress::run`.
    ingress: tokio::sync::watch::Sender<Option<swarmnet_api::NodeIngress>>,
    /// The node's display name, sent with every session (it may have changed since the join).
    hostname: String,
    /// Where the gossip keys are kept.
    pub data_dir: std::path::PathBuf,
    gossip_keys: Mutex<swarmnet_api::GossipKeySet>,
    /// Set by `swarm leave`: the session ends and is not opened again.
    leaving: tokio::sync::watch::Sender<bool>,
    /// Containers of other runtimes attached by the CNI plugin (issue 22).
    pub(crate) containers: crate::cni::Containers,
}

impl Agent {
    /// Must be called inside the runtime (it starts the load balancer's VIP feeder).
    pub fn new(
        id: Identity,
        runtime: Arc<Runtime>,
        reports: mpsc::UnboundedReceiver<TaskReport>,
        gossip: swarmnet_gossip::server::GossipHandle,
        ingress: tokio::sync::watch::Sender<Option<swarmnet_api::NodeIngress>>,
        cfg: AgentConfig,
    ) -> anyhow::Result<Arc<Agent>> {
        let AgentConfig { gossip_port, data_dir, hostname } = cfg;
        let tls = tls::client_config(&id.ca_pem, &id.cert)?;
        let (vips, mut rx) = tokio::sync::watch::channel(None::<Vec<VipInfo>>);
        if let Some(lb) = runtime.lb() {
            let sink = lb.sink.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let Some(list) = rx.borrow_and_update().clone() else { continue };
                    if let Err(e) = sink.set_vips(list).await {
                        warn!(error = %e, "load balancer: could not program the cluster's VIPs");
                    }
                }
            });
        }
        let managers = std::sync::Mutex::new((id.manager_list(), 0));
        let containers = crate::cni::Containers::open(runtime.clone(), &data_dir)?;
        Ok(Arc::new(Agent {
            id,
            managers,
            gossip,
            gossip_port,
            tls,
            runtime,
            reports: Mutex::new(reports),
            assigned: Mutex::new(BTreeMap::new()),
            vips,
            ingress,
            hostname,
            data_dir,
            gossip_keys: Mutex::new(swarmnet_api::GossipKeySet::default()),
            leaving: tokio::sync::watch::channel(false).0,
            containers,
        }))
    }

    fn managers(&self) -> std::sync::MutexGuard<'_, (Vec<String>, usize)> {
        self.managers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The manager the agent uses now (`host:port`).
    pub fn manager(&self) -> String {
        let m = self.managers();
        m.0.get(m.1).cloned().unwrap_or_else(|| self.id.manager.clone())
    }

    /// The managers it knows (`host:port`), as the last session named them.
    pub fn known_managers(&self) -> Vec<String> {
        self.managers().0.clone()
    }

    /// Moves on to the next manager; true when the list starts over.
    fn next_manager(&self) -> bool {
        let mut m = self.managers();
        m.1 = (m.1 + 1) % m.0.len().max(1);
        m.1 == 0
    }

    /// Takes the managers a session named (the leader first, the one in use), and keeps them
    /// with the node's identity for its next start.
    fn learn_managers(&self, list: Vec<String>, using: &str) {
        if list.is_empty() {
            return;
        }
        let mut m = self.managers();
        if m.0 == list {
            return;
        }
        m.1 = list.iter().position(|a| a == using).unwrap_or(0);
        m.0.clone_from(&list);
        drop(m);
        info!(managers = %list.join(","), "the cluster's managers");
        let id = Identity { managers: list, ..self.id.clone() };
        if let Err(e) = id.save(&self.data_dir) {
            warn!(error = %format!("{e:#}"), "could not keep the managers' list with the node's identity");
        }
    }

    /// The node's display name.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The managers to try, the one in use first.
    fn managers_in_turn(&self) -> Vec<String> {
        let m = self.managers();
        let mut l = m.0.clone();
        let at = m.1.min(l.len());
        l.rotate_left(at);
        if l.is_empty() {
            l.push(self.id.manager.clone());
        }
        l
    }

    /// One request to the manager, on a connection of its own: the one in use, else the
    /// others it knows, in turn, until one takes the connection.
    pub async fn call(&self, request: ApiRequest) -> anyhow::Result<Reply> {
        let mut last = anyhow!("no manager known");
        for manager in &self.managers_in_turn() {
            match connect(manager, self.tls.clone()).await {
                Ok(mut tls) => {
                    write_msg(&mut tls, &Hello::Api { request }).await?;
                    return read_reply(&mut tls, manager).await;
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// [`Agent::call`], its reply read straight into `T` (a large answer: no JSON tree).
    pub async fn call_typed<T: serde::de::DeserializeOwned>(&self, request: ApiRequest) -> anyhow::Result<Result<T, ApiError>> {
        let mut last = anyhow!("no manager known");
        for manager in self.managers_in_turn() {
            match connect(&manager, self.tls.clone()).await {
                Ok(mut tls) => {
                    write_msg(&mut tls, &Hello::Api { request }).await?;
                    let r: TypedReply<T> = read_reply(&mut tls, &manager).await?;
                    return Ok(r.into_result());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A request whose answer is a stream (`service logs`): the manager's reply and every
    /// frame after it are copied to `out` as they come, until either side ends. An error:
    /// no manager could be reached (nothing was written to `out`).
    pub async fn call_stream<W: tokio::io::AsyncWrite + Unpin>(&self, request: ApiRequest, out: &mut W) -> anyhow::Result<()> {
        let mut last = anyhow!("no manager known");
        for manager in self.managers_in_turn() {
            match connect(&manager, self.tls.clone()).await {
                Ok(mut tls) => {
                    write_msg(&mut tls, &Hello::Api { request }).await?;
                    // Once the stream has begun, its end (either side leaving) is no error
                    // to tell the client.
                    if let Err(e) = tokio::io::copy(&mut tls, out).await {
                        info!(manager = %manager, error = %e, "stream ended");
                    }
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Keeps a session with a manager for as long as the daemon runs: when one fails the
    /// next is tried at once, and after a round of them all the agent waits (backoff).
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut leaving = self.leaving.subscribe();
        loop {
            let started = Instant::now();
            let manager = self.manager();
            let ended = tokio::select! {
                r = self.session(&manager) => r,
                _ = leaving.wait_for(|l| *l) => {
                    info!(manager = %manager, "leaving the swarm: session closed");
                    return;
                }
            };
            match ended {
                Ok(()) => info!(manager = %manager, "session ended"),
                Err(e) => warn!(manager = %manager, error = %format!("{e:#}"), "session failed; tasks keep running, retrying"),
            }
            if started.elapsed() > Duration::from_secs(5) {
                backoff = Duration::from_millis(100);
            }
            if self.next_manager() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }

    async fn session(self: &Arc<Self>, manager: &str) -> anyhow::Result<()> {
        let mut tls = connect(manager, self.tls.clone()).await?;
        let mut reports = self.reports.lock().await;
        while reports.try_recv().is_ok() {}
        write_msg(&mut tls, &Hello::Session { reports: self.runtime.reports(), hostname: Some(self.hostname.clone()) }).await?;
        let reply: Reply = read_reply(&mut tls, manager).await?;
        let opened: SessionOpened = reply.into_data().map_err(|e| anyhow!("manager refused the session: {e}"))?;
        let hb_ms = opened.heartbeat_ms.max(50);
        // A manager cut off from the network never closes the session: the heartbeats it
        // does not acknowledge end it (three intervals, at least 2 s), and the agent moves to
        // the next manager instead of waiting for TCP's retransmissions (minutes).
        let unacked = Duration::from_millis(hb_ms.saturating_mul(3)).max(Duration::from_secs(2));
        if let Err(e) = socket2::SockRef::from(tls.get_ref().0).set_tcp_user_timeout(Some(unacked)) {
            warn!(manager = %manager, error = %e, "cannot bound the session's unacknowledged time (TCP_USER_TIMEOUT)");
        }
        let (mut r, mut w) = tokio::io::split(tls);
        self.runtime.sandboxes().set_port(opened.data_path_port);
        info!(manager = %manager, node = %self.id.node_id, heartbeat_ms = hb_ms, "session open");
        self.learn_managers(opened.managers, manager);
        let (msg_tx, mut msg_rx) = mpsc::channel::<anyhow::Result<Option<FromManager>>>(16);
        let reader = tokio::spawn(async move {
            loop {
                let m = read_msg::<_, FromManager>(&mut r).await.map_err(anyhow::Error::from);
                let end = !matches!(m, Ok(Some(_)));
                if msg_tx.send(m).await.is_err() || end {
                    return;
                }
            }
        });
        let mut hb = tokio::time::interval(Duration::from_millis(hb_ms));
        // The node's routing-mesh problems: now, then as they change (`service ps`).
        let mut mesh = self.runtime.ingress().warnings();
        mesh.mark_changed();
        let mut mesh_open = true;
        let result = loop {
            tokio::select! {
                _ = hb.tick() => {
                    if let Err(e) = write_msg(&mut w, &FromAgent::Heartbeat).await { break Err(e.into()); }
                }
                r = mesh.changed(), if mesh_open => {
                    if r.is_err() {
                        mesh_open = false;
                        continue;
                    }
                    let warnings = mesh.borrow_and_update().iter().map(|(port, message)| MeshWarning { port: *port, message: message.clone() }).collect();
                    if let Err(e) = write_msg(&mut w, &FromAgent::MeshWarnings { warnings }).await { break Err(e.into()); }
                }
                m = msg_rx.recv() => match m {
                    Some(Ok(Some(FromManager::Assign { full, upsert, remove }))) => {
                        let mut assigned = self.assigned.lock().await;
                        if full {
                            assigned.clear();
                        }
                        for id in &remove {
                            assigned.remove(id);
                        }
                        for a in upsert {
                            assigned.insert(a.task_id.clone(), a);
                        }
                        // After `swarm leave` (it holds this lock as it stops everything),
                        // nothing starts again.
                        if *self.leaving.borrow() {
                            assigned.clear();
                            continue;
                        }
                        self.runtime.reconcile(&assigned);
                        self.runtime.confirm_unknown(&remove);
                    }
                    Some(Ok(Some(FromManager::Nodes { nodes }))) => {
                        let seeds = nodes
                            .into_iter()
                            .filter(|(id, _)| *id != self.id.node_id)
                            .map(|(_, ip)| std::net::SocketAddr::new(ip, self.gossip_port))
                            .collect();
                        if self.gossip.send(swarmnet_gossip::server::Cmd::Nodes(seeds)).is_err() {
                            warn!("gossip is not running: the new node list is not used");
                        }
                    }
                    Some(Ok(Some(FromManager::Vips { vips }))) => {
                        // Only the newest list matters; the feeder takes it when it can.
                        let _ = self.vips.send(Some(vips.into_iter().map(|v| VipInfo { network: v.network, vip: v.vip, service: v.service }).collect()));
                    }
                    Some(Ok(Some(FromManager::GossipKeys { keys, send }))) => {
                        let keys = swarmnet_api::GossipKeySet { keys, send };
                        let mut have = self.gossip_keys.lock().await;
                        if *have != keys && crate::gossip_keys::update(&self.gossip, &self.data_dir, &keys).await {
                            *have = keys;
                        }
                        // Tell the manager what gossip holds now (`node ls`).
                        let ids = have.keys.iter().map(|k| k.id).collect();
                        drop(have);
                        if let Err(e) = write_msg(&mut w, &FromAgent::GossipKeysHeld { ids }).await { break Err(e.into()); }
                    }
                    Some(Ok(Some(FromManager::Managers { managers }))) => self.learn_managers(managers, manager),
                    Some(Ok(Some(FromManager::Logs(wanted)))) => {
                        let me = self.clone();
                        let manager = manager.to_string();
                        tokio::spawn(async move {
                            let stream = wanted.stream;
                            if let Err(e) = me.send_logs(&manager, wanted).await {
                                info!(manager = %manager, stream, error = %format!("{e:#}"), "log stream ended");
                            }
                        });
                    }
                    Some(Ok(Some(FromManager::Ingress { ingress }))) => {
                        if *self.leaving.borrow() {
                            continue;
                        }
                        self.ingress.send_if_modified(|cur| {
                            let changed = *cur != ingress;
                            cur.clone_from(&ingress);
                            changed
                        });
                    }
                    Some(Ok(None)) | None => break Ok(()),
                    Some(Err(e)) => break Err(e),
                },
                r = reports.recv() => {
                    let Some(first) = r else { break Ok(()) };
                    let mut batch = vec![first];
                    while let Ok(more) = reports.try_recv() {
                        batch.push(more);
                    }
                    if let Err(e) = write_msg(&mut w, &FromAgent::Reports { reports: batch }).await { break Err(e.into()); }
                }
            }
        };
        reader.abort();
        result
    }

    /// `service logs`: the output of the tasks the manager asked for, on a connection of its
    /// own; with `follow`, what they write next, until the manager closes it.
    async fn send_logs(&self, manager: &str, w: LogsWanted) -> anyhow::Result<()> {
        use swarmnet_api::logs::{frames, LogFrame, LogLine, KEEPALIVE};
        // What is there is read before the stream opens: the manager waits for frames
        // within a deadline once it is.
        let sel = crate::tasklog::Select { since_ns: w.since_ns, tail: w.tail };
        let mut all: Vec<LogLine> = Vec::new();
        let mut followers = Vec::new();
        let mut warnings = Vec::new();
        for t in &w.tasks {
            let path = self.runtime.log_path(t);
            let task = t.clone();
            match tokio::task::spawn_blocking(move || crate::tasklog::read_all(&task, &path, sel)).await? {
                Ok((lines, f)) => {
                    all.extend(lines);
                    followers.extend(f);
                }
                Err(e) => warnings.push(LogFrame::Warning { message: format!("node {}: task {t}: its log cannot be read: {e}", self.hostname) }),
            }
        }
        // The node's tasks' lines in the order they were written.
        all.sort_by_key(|l| l.ts_ns);
        let mut tls = connect(manager, self.tls.clone()).await?;
        // A manager cut off from the network: what it does not acknowledge ends the stream.
        let _ = socket2::SockRef::from(tls.get_ref().0).set_tcp_user_timeout(Some(KEEPALIVE * 3));
        write_msg(&mut tls, &Hello::LogStream { stream: w.stream }).await?;
        for f in warnings {
            write_msg(&mut tls, &f).await?;
        }
        for lines in frames(all) {
            write_msg(&mut tls, &LogFrame::Lines { lines }).await?;
        }
        if !w.follow {
            tokio::io::AsyncWriteExt::shutdown(&mut tls).await?;
            // Closed only once the manager has read everything and closed its side: a
            // socket closed with unread bytes (TLS session tickets) resets the connection,
            // and the manager would lose the last frames.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(KEEPALIVE, tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut rest)).await;
            return Ok(());
        }
        let mut last_sent = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut batch = Vec::new();
            for f in &mut followers {
                // Up to a frame's worth per task per turn; more at the next turn, at once.
                match tokio::task::block_in_place(|| f.poll(swarmnet_api::logs::LINES_PER_FRAME * 4)) {
                    Ok(lines) => batch.extend(lines),
                    Err(e) => warn!(stream = w.stream, error = %e, "service logs: a task's log cannot be read"),
                }
            }
            if batch.is_empty() {
                if last_sent.elapsed() >= KEEPALIVE {
                    write_msg(&mut tls, &LogFrame::Lines { lines: Vec::new() }).await?;
                    last_sent = Instant::now();
                }
                continue;
            }
            batch.sort_by_key(|l| l.ts_ns);
            for lines in frames(batch) {
                write_msg(&mut tls, &LogFrame::Lines { lines }).await?;
            }
            last_sent = Instant::now();
        }
    }

    /// `lb ls`: this node's load balancer, read back from the kernel.
    /// `swarm leave`: the session closes (nothing is assigned any more), every task stops
    /// (draining first), the node leaves every network and the ingress network (their
    /// sandboxes, links, FDB and neighbour entries and the mesh's nftables table go with
    /// them), and the node's cgroup and bpffs folders go (its load balancer's and mesh
    /// entry's programs are detached when this process, which holds them, exits). Returns
    /// what could not be removed. The daemon erases its data dir and exits after.
    pub async fn leave(&self) -> Vec<String> {
        {
            // Under the lock the session applies assignments with: one it applied before
            // is undone here, and it applies none after (it looks at `leaving`).
            let mut assigned = self.assigned.lock().await;
            let _ = self.leaving.send(true);
            assigned.clear();
            self.runtime.reconcile(&BTreeMap::new());
            let _ = self.ingress.send(None);
        }
        self.leave_containers().await;
        let mut left = Vec::new();
        let deadline = Instant::now() + LEAVE_WITHIN;
        loop {
            let nets = self.runtime.sandboxes().networks().await;
            let busy = self.runtime.busy();
            if busy.is_empty() && nets.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                if !busy.is_empty() {
                    left.push(format!("tasks {busy:?} still stopping after {}s", LEAVE_WITHIN.as_secs()));
                }
                if !nets.is_empty() {
                    left.push(format!("the sandboxes of networks {nets:?}"));
                }
                break;
            }
            // What no task holds any more (the grace after a start no longer matters).
            self.runtime.membership().prune().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Err(e) = swarmnet_dataplane::lb::host::remove_nodes(std::slice::from_ref(&self.id.node_id)) {
            left.push(format!("the node's cgroup and bpffs folders: {e}"));
        }
        info!(node = %self.id.node_id, left_behind = ?left, "left the swarm");
        left
    }

    pub async fn lb_table(&self) -> Reply {
        let mesh_entry = if self.runtime.ingress().has_ebpf_entry() { MeshEntryKind::Ebpf } else { MeshEntryKind::Nftables };
        let (ports, ports_warning) = match self.runtime.ingress().read().await {
            Ok((rows, failed)) => (
                rows.into_iter()
                    .map(|r| LbPortInfo {
                        service: r.service,
                        published: r.port,
                        protocol: r.protocol,
                        mode: r.mode,
                        backends: r
                            .backends
                            .into_iter()
                            .map(|(task, ip, target, active, connections)| LbPortBackend { task, ip, target, state: if active { EndpointState::Active } else { EndpointState::Draining }, connections })
                            .collect(),
                    })
                    .collect(),
                failed,
            ),
            Err(e) => (vec![], Some(format!("routing mesh: read the kernel's table: {e}"))),
        };
        let Some(lb) = self.runtime.lb() else {
            return Reply::ok(&LbTable {
                backend: None,
                warning: Some("the load balancer could not start on this node (see the daemon's log): VIPs are not answered".into()),
                services: vec![],
                ports,
                ports_warning,
                mesh_entry,
            });
        };
        let rows = match lb.backend.read().await {
            Ok(r) => r,
            Err(e) => return Reply::err(ApiError::unavailable(format!("load balancer: read the kernel's table: {e}"))),
        };
        let names = lb.sink.names().await;
        let (services, tasks) = (&names.services, &names.tasks);
        let mut services: Vec<LbServiceInfo> = rows
            .into_iter()
            .map(|r| LbServiceInfo {
                service: services.get(&r.vip).cloned().unwrap_or_default(),
                vip: r.vip,
                vni: r.vni,
                error: names.failed.get(&r.vip).cloned(),
                backends: r
                    .backends
                    .into_iter()
                    .map(|b| LbBackendInfo {
                        task: tasks.get(&b.ip).cloned().unwrap_or_default(),
                        ip: b.ip,
                        state: match b.state {
                            BackendState::Active => EndpointState::Active,
                            BackendState::Draining => EndpointState::Draining,
                        },
                        connections: b.connections,
                    })
                    .collect(),
            })
            .collect();
        // A VIP that could not be programmed at all is not in the kernel: say so.
        for (vip, why) in &names.failed {
            if !services.iter().any(|s| &s.vip == vip) {
                services.push(LbServiceInfo { service: names.services.get(vip).cloned().unwrap_or_default(), vip: *vip, vni: 0, error: Some(why.clone()), backends: vec![] });
            }
        }
        let mut warnings: Vec<String> = lb.warning.iter().cloned().collect();
        if !names.failed.is_empty() {
            warnings.push(format!("{} VIP(s) could not be programmed (see error)", names.failed.len()));
        }
        let warning = (!warnings.is_empty()).then(|| warnings.join("; "));
        let backend = match lb.backend.kind() {
            swarmnet_dataplane::lb::Kind::Ebpf => LbKind::Ebpf,
            swarmnet_dataplane::lb::Kind::Nftables => LbKind::Nftables,
        };
        Reply::ok(&LbTable { backend: Some(backend), warning, services, ports, ports_warning, mesh_entry })
    }

    /// `run` on this node: asks the manager for a standalone task here, then waits for it to
    /// be running (`detach`) or to finish, and returns its output and exit code.
    /// `exec`: the running task `task` of this node (its name, id, or an id's unique
    /// prefix), and where its process is.
    pub async fn exec_target(&self, task: &str) -> Result<swarmnet_api::replies::ExecTarget, ApiError> {
        let found: Vec<(Id, String)> = {
            let assigned = self.assigned.lock().await;
            let exact: Vec<(Id, String)> = assigned.values().filter(|a| a.task_id == task || a.name == task).map(|a| (a.task_id.clone(), a.name.clone())).collect();
            if exact.is_empty() && task.len() >= 4 {
                assigned.values().filter(|a| a.task_id.starts_with(task)).map(|a| (a.task_id.clone(), a.name.clone())).collect()
            } else {
                exact
            }
        };
        let (id, name) = match found.as_slice() {
            [] => {
                return Err(ApiError::new(ErrorKind::NotFound, format!("task {task} is not on this node ({}): `swarmnet service ps SERVICE` shows the node it runs on; run exec there", self.hostname)))
            }
            [one] => one.clone(),
            many => {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    format!("task {task}: {} tasks match ({}): give more of the id", many.len(), many.iter().map(|m| m.1.as_str()).collect::<Vec<_>>().join(", ")),
                ))
            }
        };
        let report = self.runtime.report_of(&id);
        let pid = match report.as_ref() {
            Some(r) if matches!(r.state, TaskState::Running | TaskState::Starting) => r.pid,
            Some(r) => return Err(ApiError::new(ErrorKind::Conflict, format!("task {name} is {}, not running: nothing to exec into", format!("{:?}", r.state).to_lowercase()))),
            None => None,
        };
        let Some(pid) = pid else { return Err(ApiError::new(ErrorKind::Conflict, format!("task {name} has no running process on this node"))) };
        let Some(start_time) = swarmnet_dataplane::task::proc_start_time(pid) else { return Err(ApiError::new(ErrorKind::Conflict, format!("task {name}: its process {pid} is gone"))) };
        Ok(swarmnet_api::replies::ExecTarget { task_id: id, name, pid, start_time })
    }

    pub async fn run_local(&self, spec: StandaloneCreate, detach: bool) -> Reply {
        Reply::from_result(self.run_local_inner(spec, detach).await)
    }

    async fn run_local_inner(&self, spec: StandaloneCreate, detach: bool) -> Result<RunResult, ApiError> {
        let reply = self.call(ApiRequest::Run { spec }).await.map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
        let task: TaskInfo = reply.into_data().map_err(|e| e.into_api())?;
        let task_id = task.id.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((code, why)) = self.runtime.exit_code(&task_id) {
                if !why.is_empty() {
                    return Err(ApiError::internal(format!("task {task_id} did not run: {why}")));
                }
                let log = self.runtime.log_path(&task_id);
                let (id, path) = (task_id.clone(), log.clone());
                let read = tokio::task::spawn_blocking(move || crate::tasklog::read_all(&id, &path, crate::tasklog::Select::default())).await;
                let output = match read {
                    Ok(Ok((lines, _))) => lines.iter().map(|l| format!("{}\n", l.text)).collect(),
                    Ok(Err(e)) => {
                        warn!(task = %task_id, path = %log.display(), error = %e, "run: the task's output cannot be read");
                        String::new()
                    }
                    Err(e) => {
                        warn!(task = %task_id, error = %e, "run: reading the task's output failed");
                        String::new()
                    }
                };
                for e in crate::tasklog::remove(&log) {
                    warn!(task = %task_id, error = %e, "run: the task's log file could not be removed");
                }
                return Ok(RunResult::Finished { id: task_id, exit_code: code, output, task });
            }
            let rep = self.runtime.report_of(&task_id);
            if detach && rep.as_ref().is_some_and(|r| r.state == TaskState::Running) {
                return Ok(RunResult::Detached(task));
            }
            if rep.is_none() && Instant::now() > deadline {
                return Err(ApiError::unavailable(format!("task {task_id} was not started on this node within 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
