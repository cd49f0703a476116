//! The manager: owns the cluster state, serves TCP 2377 (join, node sessions, API) inside
//! mutual TLS, runs the scheduler and watches heartbeats. It never touches a packet.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};
use swarmnet_api::replies::*;
use swarmnet_api::tls;
use swarmnet_api::token::{self, JoinToken};
use swarmnet_api::*;
use swarmnet_types::admission::{self, Admission, Limits, Names};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::ipam;
use crate::model::*;
use crate::ops::{self, OpError};
use crate::pki::{self, Ca, CertKey};
use crate::store::{self, ClusterMeta, EtcdStore, RedbStore, Store, StoreChoice, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Op(#[from] OpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot encode the reply: {0}")]
    Encode(#[from] serde_json::Error),
}

impl ManagerError {
    /// The refusal a client gets: its kind, and the message.
    pub fn to_api(&self) -> ApiError {
        match self {
            ManagerError::Op(OpError::Invalid(m)) => ApiError::invalid(m),
            ManagerError::Op(OpError::NotFound(m)) => ApiError::not_found(m),
            ManagerError::Op(OpError::Conflict(m)) => ApiError::conflict(m),
            ManagerError::Op(OpError::Ipam(e @ (ipam::IpamError::HostBitsSet(..) | ipam::IpamError::TooSmall(..)))) => ApiError::invalid(e),
            ManagerError::Op(OpError::Ipam(e)) => ApiError::conflict(e),
            ManagerError::Store(StoreError::NotLeader(m)) => ApiError::new(ErrorKind::NotLeader, m),
            ManagerError::Store(e @ StoreError::Unavailable(_)) => ApiError::unavailable(format!("{e}; the cluster takes no change until the store answers (try again)")),
            ManagerError::Store(e) => ApiError::unavailable(format!("the manager's store: {e}")),
            e @ (ManagerError::Pki(_) | ManagerError::Tls(_) | ManagerError::Encode(_)) => ApiError::internal(e),
        }
    }
}

pub struct ManagerConfig {
    pub advertise: IpAddr,
    pub pool: Ipv4Network,
    pub heartbeat: Duration,
    pub hostname: String,
    pub underlay: Vec<IpNetwork>,
    /// Used when the cluster is created; later starts keep the stored one.
    pub data_path_port: u16,
    /// The ingress network's subnet, used when it is created (default: the last /24 of the pool).
    pub ingress_subnet: Option<Ipv4Network>,
    /// How often the gossip key is replaced (as Swarm's 12 h).
    pub gossip_key_rotation: Duration,
    /// The cluster this node belongs to (from its identity), if it has joined one: a store
    /// without it is damaged or lost, never a reason to make a new cluster.
    pub expect_cluster: Option<String>,
    /// Start over: a damaged, empty or missing store is set aside and a new cluster made
    /// (as `docker swarm init --force-new-cluster`; every other node must join again).
    pub force_new_cluster: bool,
    /// The manager's listening port and the nodes' gossip port: with the cluster's data-path
    /// port, no service may publish them.
    pub listen_port: u16,
    pub gossip_port: u16,
    /// Where the cluster's state is kept (`--store`).
    pub store: StoreChoice,
    /// This node's id and certificate, if it has joined: a manager that joined a cluster on
    /// a shared store leads as itself (ADR 0022). None: the cluster's first manager's.
    pub me: Option<(Id, CertKey)>,
}

/// The store of a read-only view: every change refused, saying why.
/// Why it refuses, and where the state came from.
struct ReadOnly(String, String);

impl Store for ReadOnly {
    fn load(&self) -> Result<(Option<ClusterMeta>, ClusterState), StoreError> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
    fn commit(&self, _: &[store::Write]) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
    fn describe(&self) -> String {
        self.1.clone()
    }
    fn leads(&self) -> bool {
        false
    }
}

/// How to recover, for the errors that refuse to open the store.
const RECOVER: &str = "restore it from a backup, or start the manager with --force-new-cluster to set it aside and make a new cluster (every other node must then join again)";

pub(crate) struct Inner {
    pub(crate) state: ClusterState,
    pub(crate) last_seen: HashMap<Id, Instant>,
    /// The gossip key ids each node last said it holds (not stored: nodes say it again in
    /// every session).
    pub(crate) keys_held: HashMap<Id, Vec<u32>>,
    /// What each node last said keeps its routing mesh from working fully (not stored:
    /// nodes say it again in every session).
    pub(crate) mesh_warnings: HashMap<Id, Vec<MeshWarning>>,
    /// When each task's state last changed, as this manager saw it (unix ms; not stored: a
    /// task this manager has not seen change reads as changed when it started leading).
    pub(crate) task_since: HashMap<Id, u64>,
}

pub struct Manager {
    pub(crate) store: Box<dyn Store>,
    /// This manager's node, and its certificate (the TLS server's on 2377).
    pub node_id: Id,
    pub(crate) cert: CertKey,
    /// Becomes true, for good, when this manager no longer leads (ADR 0022).
    pub(crate) stepped_down: tokio::sync::watch::Sender<bool>,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) changed: tokio::sync::watch::Sender<u64>,
    pub meta: ClusterMeta,
    /// What changes in the metadata after the start: the gossip keys (rotations) and the
    /// removed nodes' certificates. `meta` has them as they were at the start.
    pub(crate) gossip: Mutex<GossipKeySet>,
    pub(crate) removed: Mutex<std::collections::BTreeMap<String, String>>,
    pub(crate) gossip_key_rotation: Duration,
    pub(crate) pool: Ipv4Network,
    pub(crate) heartbeat: Duration,
    pub(crate) started: Instant,
    /// Unix ms of `started`.
    pub(crate) started_ms: u64,
    /// The TLS side of 2377, made at the first connection.
    acceptor: std::sync::OnceLock<tokio_rustls::TlsAcceptor>,
    /// Ports no service may publish.
    pub(crate) own_ports: ops::OwnPorts,
    /// `service logs`: the streams asked of nodes and not yet opened, by stream id.
    pub(crate) log_streams: Mutex<HashMap<u64, crate::logs::Pending>>,
    pub(crate) next_log_stream: std::sync::atomic::AtomicU64,
    /// Each node's open session, for what is sent beside its state (a log request).
    pub(crate) sessions_out: Mutex<HashMap<Id, tokio::sync::mpsc::Sender<FromManager>>>,
    /// How long API requests take to answer (metrics).
    pub api_latency: swarmnet_types::metrics::Histogram,
}

fn gen_id() -> Id {
    // The system RNG failing is not recoverable in any useful way; an id from the clock
    // and a counter is still unique within this manager.
    pki::new_id().unwrap_or_else(|_| {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        format!("{t:x}{n:x}")
    })
}

impl Manager {
    /// Opens `path` and checks it holds the cluster this node belongs to: an empty file, a
    /// store without a cluster while the node has joined one, or another cluster's store is
    /// an error that names the file and how to recover, never a silent new cluster.
    fn open_store(path: &Path, cfg: &ManagerConfig) -> Result<RedbStore, ManagerError> {
        let shown = path.display();
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(OpError::Invalid(format!("the manager's store {shown} is empty (damaged?): {RECOVER}")).into());
        }
        let store = RedbStore::open(path).map_err(|e| OpError::Invalid(format!("the manager's store {shown} cannot be opened ({e}): {RECOVER}")))?;
        let (meta, _) = store.load().map_err(|e| OpError::Invalid(format!("the manager's store {shown} cannot be read ({e}): {RECOVER}")))?;
        match (&meta, &cfg.expect_cluster) {
            (None, Some(want)) => Err(OpError::Invalid(format!("this node belongs to cluster {want}, but the manager's store {shown} holds no cluster (lost or replaced?): {RECOVER}")).into()),
            (Some(m), Some(want)) if m.cluster_id != *want => {
                Err(OpError::Invalid(format!("this node belongs to cluster {want}, but the manager's store {shown} holds cluster {}: {RECOVER}", m.cluster_id)).into())
            }
            _ => Ok(store),
        }
    }

    /// Connects to etcd and checks it holds this node's cluster (or none yet). The caller
    /// campaigns with the store, then [`Manager::lead`]s.
    pub fn connect_etcd(ec: &store::EtcdConfig, cfg: &ManagerConfig) -> Result<EtcdStore, ManagerError> {
        Self::connect_etcd_expecting(ec, cfg, cfg.expect_cluster.as_deref())
    }

    /// [`Manager::connect_etcd`] with the cluster the store must hold (`--import` expects
    /// none yet, or the imported one: it checks itself).
    pub fn connect_etcd_expecting(ec: &store::EtcdConfig, cfg: &ManagerConfig, expect: Option<&str>) -> Result<EtcdStore, ManagerError> {
        if cfg.force_new_cluster {
            return Err(OpError::Invalid(format!("--force-new-cluster sets aside the embedded store; with --store {} start on another --store-prefix instead", ec.shown())).into());
        }
        let s = EtcdStore::connect(ec.clone())?;
        match (s.cluster_id()?, expect) {
            (Some(have), Some(want)) if have != want => {
                return Err(OpError::Invalid(format!("this node belongs to cluster {want}, but {} holds cluster {have}: start with the --store-prefix of this node's cluster, or with another data directory to join that one", ec.shown())).into())
            }
            (None, Some(want)) => {
                return Err(OpError::Invalid(format!("this node belongs to cluster {want}, but {} holds no cluster (another --store-prefix? etcd's data lost?): start with the store of this node's cluster, or with another data directory to make a new one", ec.shown())).into())
            }
            _ => {}
        }
        Ok(s)
    }

    /// A view of `state` that answers reads and refuses every change with `why` (a standby
    /// manager's answer, from the store's copy, when no manager leads). No manager shows as
    /// the leader in it.
    pub fn read_only(meta: ClusterMeta, state: ClusterState, cfg: &ManagerConfig, why: String, store: String) -> Arc<Manager> {
        let cert = meta.manager_cert.clone();
        Arc::new(Self::assemble(Box::new(ReadOnly(why, store)), String::new(), cert, true, meta, state, cfg))
    }

    /// The manager of `store`, as the node `node_id` with `cert`, from `meta` and `state`.
    fn assemble(store: Box<dyn Store>, node_id: Id, cert: CertKey, stepped_down: bool, meta: ClusterMeta, state: ClusterState, cfg: &ManagerConfig) -> Manager {
        let (changed, _) = tokio::sync::watch::channel(0);
        let (stepped_down, _) = tokio::sync::watch::channel(stepped_down);
        Manager {
            store,
            node_id,
            cert,
            stepped_down,
            inner: Mutex::new(Inner { state, last_seen: HashMap::new(), keys_held: HashMap::new(), mesh_warnings: HashMap::new(), task_since: HashMap::new() }),
            changed,
            gossip: Mutex::new(GossipKeySet { keys: meta.gossip_keys.clone(), send: meta.gossip_send }),
            removed: Mutex::new(meta.removed_nodes.clone()),
            gossip_key_rotation: cfg.gossip_key_rotation,
            own_ports: ops::OwnPorts { manager: cfg.listen_port, gossip: cfg.gossip_port, data_path: meta.data_path_port },
            meta,
            pool: cfg.pool,
            heartbeat: cfg.heartbeat,
            started: Instant::now(),
            started_ms: now_ms(),
            acceptor: std::sync::OnceLock::new(),
            log_streams: Mutex::new(HashMap::new()),
            next_log_stream: std::sync::atomic::AtomicU64::new(1),
            sessions_out: Mutex::new(HashMap::new()),
            api_latency: Default::default(),
        }
    }

    /// `--import PATH`: copies the cluster in the embedded store at `path` (a one-manager
    /// cluster) into `store`, whose election this manager has won, as one commit. The prefix
    /// must be empty, or hold that same cluster already (imported before: nothing to do).
    /// Returns the cluster's id and whether it was copied now.
    pub fn import(store: &EtcdStore, path: &Path) -> Result<(String, bool), ManagerError> {
        let shown = path.display();
        if !std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0) {
            return Err(OpError::Invalid(format!("--import {shown}: no such store (expected the manager.redb of a one-manager cluster)")).into());
        }
        let (meta, state) = {
            let src = RedbStore::open(path).map_err(|e| OpError::Invalid(format!("--import {shown}: cannot open it ({e})")))?;
            src.load().map_err(|e| OpError::Invalid(format!("--import {shown}: cannot read it ({e})")))?
        };
        let Some(meta) = meta else { return Err(OpError::Invalid(format!("--import {shown}: it holds no cluster")).into()) };
        match store.cluster_id()? {
            Some(c) if c == meta.cluster_id => return Ok((c, false)),
            Some(c) => {
                return Err(OpError::Invalid(format!("--import {shown} (cluster {}): {} already holds cluster {c}; import into an empty --store-prefix", meta.cluster_id, store.describe())).into())
            }
            None => {}
        }
        let mut writes = vec![store::meta_write(&meta)?];
        writes.extend(store::diff(&ClusterState::default(), &state)?);
        store.commit(&writes)?;
        info!(cluster = %meta.cluster_id, from = %shown, to = %store.describe(), nodes = state.nodes.len(), services = state.services.len(), tasks = state.tasks.len(), "imported the cluster");
        Ok((meta.cluster_id, true))
    }

    /// What a manager says of itself in the election: its hostname and `addr:port`.
    pub fn campaign_value(cfg: &ManagerConfig) -> String {
        // (An IPv6 address in brackets: the last word parses as a socket address.)
        format!("{} {}", cfg.hostname, SocketAddr::new(cfg.advertise, cfg.listen_port))
    }

    /// The `host:port` on 2377 in a [`Manager::campaign_value`] (the leader's, as the
    /// election names it).
    pub fn campaign_addr(value: &str) -> &str {
        value.rsplit(' ').next().unwrap_or(value)
    }

    /// Leads the cluster in `store`, whose election this manager has won: reads the state
    /// (on an empty prefix: creates the cluster).
    pub fn lead(store: EtcdStore, cfg: &ManagerConfig) -> Result<Arc<Manager>, ManagerError> {
        Self::open_with(Box::new(store), cfg)
    }

    /// Opens the embedded store in `data_dir`; on first start creates the cluster (id, root
    /// CA, join secret, the manager's own node). With etcd, see [`Manager::connect_etcd`].
    pub fn open(data_dir: &Path, cfg: &ManagerConfig) -> Result<Arc<Manager>, ManagerError> {
        match &cfg.store {
            StoreChoice::Redb => Self::open_with(Box::new(Self::open_redb(data_dir, cfg)?), cfg),
            StoreChoice::Etcd(ec) => {
                let s = Self::connect_etcd(ec, cfg)?;
                s.campaign(&Self::campaign_value(cfg), ec.lease_ttl * 3 + Duration::from_secs(5))?;
                Self::lead(s, cfg)
            }
        }
    }

    fn open_redb(data_dir: &Path, cfg: &ManagerConfig) -> Result<RedbStore, ManagerError> {
        let path = data_dir.join("manager.redb");
        let store = match Self::open_store(&path, cfg) {
            Ok(s) => s,
            Err(e) if cfg.force_new_cluster => {
                let aside = path.with_extension(format!("redb.damaged-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)));
                warn!(path = %path.display(), error = %e, aside = %aside.display(), "--force-new-cluster: setting the store aside and making a new cluster");
                std::fs::rename(&path, &aside).map_err(|e| OpError::Invalid(format!("cannot set {} aside: {e}", path.display())))?;
                RedbStore::open(&path)?
            }
            Err(e) => return Err(e),
        };
        Ok(store)
    }

    fn open_with(store: Box<dyn Store>, cfg: &ManagerConfig) -> Result<Arc<Manager>, ManagerError> {
        let (meta, mut state) = store.load()?;
        let created = meta.is_none();
        let meta = match meta {
            Some(m) => {
                info!(cluster = %m.cluster_id, nodes = state.nodes.len(), services = state.services.len(), "loaded cluster state");
                if m.data_path_port != cfg.data_path_port {
                    warn!(stored = m.data_path_port, given = cfg.data_path_port, "--data-path-port is set when the cluster is created; keeping the stored one");
                }
                m
            }
            None => {
                let cluster_id = pki::new_id()?;
                let ca = Ca::generate(&cluster_id)?;
                let node_id = pki::new_id()?;
                let cert = ca.issue_node(&node_id, &Role::Manager, Some(cfg.advertise))?;
                let meta = ClusterMeta {
                    cluster_id: cluster_id.clone(),
                    ca: ca.cert.clone(),
                    worker_secret: pki::random_base36(token::SECRET_LEN)?,
                    manager_secret: pki::random_base36(token::SECRET_LEN)?,
                    manager_node_id: node_id,
                    manager_cert: cert,
                    data_path_port: cfg.data_path_port,
                    gossip_keys: vec![new_gossip_key(1)?],
                    gossip_send: 1,
                    removed_nodes: Default::default(),
                };
                store.commit(&[store::meta_write(&meta)?])?;
                info!(cluster = %cluster_id, "created a new cluster");
                meta
            }
        };
        let mut meta = meta;
        if meta.gossip_keys.is_empty() {
            meta.gossip_keys.push(new_gossip_key(1)?);
            meta.gossip_send = 1;
            store.commit(&[store::meta_write(&meta)?])?;
            info!("made the cluster's first gossip key");
        }
        if meta.manager_secret.is_empty() {
            meta.manager_secret = pki::random_base36(token::SECRET_LEN)?;
            store.commit(&[store::meta_write(&meta)?])?;
            info!("made the cluster's manager secret");
        }
        // Who this manager is: the node it joined as (a manager of the cluster), else the
        // cluster's first manager (a data dir of another cluster, set aside by
        // --force-new-cluster, is not it).
        let (node_id, cert) = match &cfg.me {
            Some((id, cert)) if *id == meta.manager_node_id || state.nodes.contains_key(id) => (id.clone(), cert.clone()),
            _ => (meta.manager_node_id.clone(), meta.manager_cert.clone()),
        };
        if state.nodes.get(&node_id).is_some_and(|n| n.role == Role::Worker) {
            store.resign();
            return Err(OpError::Conflict(format!("node {node_id} was demoted to a worker: it does not lead (run it as `swarmnet agent`)")).into());
        }
        // The manager's own node, kept in step with how it was started this time.
        let old = state.clone();
        let me = Node {
            id: node_id.clone(),
            hostname: cfg.hostname.clone(),
            addr: cfg.advertise,
            role: Role::Manager,
            status: state.nodes.get(&node_id).map_or(NodeStatus::Ready, |n| n.status),
            underlay: cfg.underlay.clone(),
            cert_sha256: tls::sha256_hex(cert.cert_der()?.as_ref()),
            // Its address on the ingress network stays what it was.
            ingress_ip: state.nodes.get(&node_id).and_then(|n| n.ingress_ip),
            manager_port: Some(cfg.listen_port),
            // What an operator set stays.
            availability: state.nodes.get(&node_id).map(|n| n.availability).unwrap_or_default(),
            labels: state.nodes.get(&node_id).map(|n| n.labels.clone()).unwrap_or_default(),
        };
        state.nodes.insert(me.id.clone(), me);
        if created {
            // The ingress network is made with the cluster (as `docker swarm init`); a user who
            // removes it later makes another with `network create --ingress`.
            let mut ids = gen_id;
            let n = ops::make_ingress(&mut state, cfg.pool, cfg.ingress_subnet, &mut ids).map_err(|e| OpError::Invalid(format!("cannot create the ingress network: {e}")))?;
            info!(network = %n.name, subnet = %n.subnet, vni = n.vni, "created the ingress network");
        } else if cfg.ingress_subnet.is_some() {
            warn!("--ingress-subnet is used when the cluster is created; keeping the stored ingress network");
        }
        store.commit(&store::diff(&old, &state)?)?;
        // Checked when a port is published; a manager started later with another listening
        // or gossip port can find one of them taken by a service.
        let own_ports = ops::OwnPorts { manager: cfg.listen_port, gossip: cfg.gossip_port, data_path: meta.data_path_port };
        for s in state.services.values() {
            for p in &s.ports {
                if let Some(what) = own_ports.owner(p.published, p.protocol) {
                    warn!(service = %s.name, port = p.published, protocol = %p.protocol, "service publishes one of the cluster's own ports ({what}): move it with service update --publish-rm/--publish-add");
                }
            }
        }
        Ok(Arc::new(Self::assemble(store, node_id, cert, false, meta, state, cfg)))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> ClusterState {
        self.lock().state.clone()
    }

    pub fn join_token(&self) -> Result<String, ManagerError> {
        let ca = Ca::load(&self.meta.cluster_id, self.meta.ca.clone())?;
        Ok(JoinToken { ca_digest: ca.digest()?, secret: self.meta.worker_secret.clone() }.to_string())
    }

    /// Runs `f` on a copy of the state; commits the copy only if `f` succeeds and the store
    /// takes the writes. A failed operation leaves state and store as they were.
    pub fn mutate<R>(&self, f: impl FnOnce(&mut ClusterState, ops::IdGen) -> Result<R, OpError>) -> Result<R, ManagerError> {
        let mut inner = self.lock();
        // A commit whose answer was lost may have landed after all: continue from the
        // store's state, never from a guess.
        if let Some((_, st)) = self.store.refresh()? {
            warn!(store = %self.store.describe(), "continuing from the store's state");
            inner.state = st;
            self.changed.send_modify(|v| *v += 1);
        }
        let mut next = inner.state.clone();
        let mut ids = gen_id;
        let r = f(&mut next, &mut ids)?;
        let writes = store::diff(&inner.state, &next)?;
        if !writes.is_empty() {
            self.store.commit(&writes)?;
            let now = now_ms();
            let Inner { state: old, task_since, .. } = &mut *inner;
            for t in next.tasks.values() {
                if old.tasks.get(&t.id).is_none_or(|o| o.state != t.state) {
                    task_since.insert(t.id.clone(), now);
                }
            }
            task_since.retain(|id, _| next.tasks.contains_key(id));
            inner.state = next;
            drop(inner);
            self.changed.send_modify(|v| *v += 1);
        }
        Ok(r)
    }

    pub(crate) fn touch(&self, node: &Id) {
        let down = {
            let mut inner = self.lock();
            inner.last_seen.insert(node.clone(), Instant::now());
            inner.state.nodes.get(node).is_some_and(|n| n.status == NodeStatus::Down)
        };
        if down {
            info!(node = %node, "heartbeat from a node that was down: ready again");
            if let Err(e) = self.mutate(|st, g| Ok(ops::set_node_status(st, node, NodeStatus::Ready, g))) {
                warn!(node = %node, error = %e, "could not mark node ready");
            }
        }
    }

    /// Resolves when this manager no longer leads (its store says so; checked every 100 ms),
    /// having told its sessions to end. For good: a new term is a new `Manager`.
    pub async fn lost_leadership(&self) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while self.store.leads() {
            tick.tick().await;
        }
        self.stepped_down.send_replace(true);
        warn!(store = %self.store.describe(), node = %self.node_id, "this manager no longer leads the cluster");
    }

    /// Whether this manager leads now: it has not stepped down or resigned, and its store
    /// says it holds the leadership.
    pub fn leads(&self) -> bool {
        !*self.stepped_down.borrow() && self.store.leads()
    }

    /// Gives the leadership up (on the daemon's stop), so another manager takes over at once.
    pub fn resign(&self) {
        self.stepped_down.send_replace(true);
        self.store.resign();
    }

    /// Where the cluster's state is kept.
    pub fn store_description(&self) -> String {
        self.store.describe()
    }

    /// Moves the rolling updates on (`ops::advance_updates`) while one is under way: a new
    /// task's report or the end of an `--update-delay` lets the next step go.
    pub async fn drive_updates(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if !self.leads() || !self.lock().state.services.values().any(|s| s.updating()) {
                continue;
            }
            if let Err(e) = self.mutate(|st, g| Ok(ops::advance_updates(st, now_ms(), g))) {
                warn!(error = %e, "could not move a rolling update on");
            }
        }
    }

    /// Marks nodes down that missed three heartbeats.
    pub async fn watch_heartbeats(self: Arc<Self>) {
        let limit = self.heartbeat * 3;
        let mut tick = tokio::time::interval(self.heartbeat / 2);
        loop {
            tick.tick().await;
            let stale: Vec<Id> = {
                let inner = self.lock();
                inner
                    .state
                    .nodes
                    .values()
                    .filter(|n| n.status == NodeStatus::Ready)
                    .filter(|n| match inner.last_seen.get(&n.id) {
                        Some(t) => t.elapsed() > limit,
                        // A manager that just started (or took over) gives nodes a few
                        // seconds more to find it.
                        None => self.started.elapsed() > limit + Duration::from_secs(5),
                    })
                    .map(|n| n.id.clone())
                    .collect()
            };
            for id in stale {
                warn!(node = %id, "missed 3 heartbeats: marking it down and rescheduling its tasks");
                if let Err(e) = self.mutate(|st, g| Ok(ops::set_node_status(st, &id, NodeStatus::Down, g))) {
                    warn!(node = %id, error = %e, "could not mark node down");
                }
            }
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        self.tls_acceptor()?;
        // Bounded (issues 12 and 19, the shared loop): a connection holds a slot until it
        // closes; accept failures (EMFILE, ENFILE) back off and never end the listener.
        let names = Names { what: "2377", conns: "connections", conn: "connection" };
        admission::serve(listener, names, Admission::new(Self::LIMITS_2377), |tcp, peer| self.clone().serve_conn(tcp, peer)).await;
        Ok(())
    }

    /// The caps of 2377: in all, and per address (ADR 0019).
    pub const LIMITS_2377: Limits = Limits { total: 1024, per_peer: 32 };

    /// Serves one connection accepted on 2377 (by [`Manager::serve`], or by the listener of
    /// a manager of several, which outlives its terms).
    pub async fn serve_conn(self: Arc<Self>, tcp: TcpStream, peer: Option<SocketAddr>) {
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let acceptor = match self.tls_acceptor() {
            Ok(a) => a,
            Err(e) => {
                warn!(peer = %peer, error = %format!("{e:#}"), "2377: no TLS server configuration");
                return;
            }
        };
        if let Err(e) = self.handle(acceptor, tcp, peer).await {
            info!(peer = %peer, error = %e, "connection on 2377 closed");
        }
    }

    fn tls_acceptor(&self) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        if let Some(a) = self.acceptor.get() {
            return Ok(a.clone());
        }
        let cfg = tls::server_config(&self.meta.ca.cert_pem, &self.cert)?;
        Ok(self.acceptor.get_or_init(|| tokio_rustls::TlsAcceptor::from(Arc::new(cfg))).clone())
    }

    /// Whether `ip` is the address of a manager of the cluster (a standby relays its
    /// agents' connections from it).
    pub fn is_manager_addr(&self, ip: std::net::IpAddr) -> bool {
        self.lock().state.nodes.values().any(|n| n.role == Role::Manager && n.addr == ip)
    }

    async fn handle(self: Arc<Self>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await.map_err(|_| anyhow::anyhow!("TLS handshake timed out"))??;
        let cert_fp = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| tls::sha256_hex(c.as_ref()));
        let (mut r, mut w) = tokio::io::split(tls);
        let Some(hello) = tokio::time::timeout(Duration::from_secs(10), read_msg_within::<_, Hello>(&mut r, MAX_FIRST_FRAME)).await.map_err(|_| anyhow::anyhow!("no request within 10 s"))?? else {
            return Ok(());
        };
        let node = match &cert_fp {
            None => None,
            Some(fp) => {
                let found = self.lock().state.nodes.values().find(|n| &n.cert_sha256 == fp).map(|n| n.id.clone());
                let removed = self.removed.lock().unwrap_or_else(|p| p.into_inner()).get(fp).cloned();
                if let Some(who) = removed {
                    warn!(peer = %peer, node = %who, "refused a removed node");
                    write_msg(
                        &mut w,
                        &Reply::err(ApiError::new(
                            ErrorKind::Refused,
                            format!("refused: node {who} was removed from this cluster (swarmnet node rm); to come back it must join again with a new data dir and a join token"),
                        )),
                    )
                    .await?;
                    return Ok(());
                }
                if found.is_none() && !matches!(hello, Hello::Join { .. }) {
                    write_msg(
                        &mut w,
                        &Reply::err(ApiError::new(ErrorKind::Refused, "refused: this node's certificate is not known to this cluster (was the node removed, or did it join another cluster?)")),
                    )
                    .await?;
                    return Ok(());
                }
                found
            }
        };
        match hello {
            Hello::Join { secret, hostname, addr, underlay, manager_port } => {
                let reply = self.join(&secret, hostname, addr, underlay, manager_port, peer);
                write_msg(&mut w, &reply).await?;
            }
            Hello::Api { request: ApiRequest::ServiceLogs { spec } } => {
                if node.is_none() {
                    write_msg(&mut w, &Reply::err(ApiError::new(ErrorKind::Refused, "refused: a client certificate of this cluster is required (join first)"))).await?;
                    return Ok(());
                }
                // The client leaving shows as a failed write (frames flow at least every
                // few seconds); what it sends is not read.
                drop(r);
                self.serve_logs(&spec, &mut w).await;
            }
            Hello::LogStream { stream } => {
                let Some(node) = node else { return Ok(()) };
                if let Err(e) = self.node_log_stream(&node, stream, &mut r).await {
                    info!(peer = %peer, node = %node, error = %e, "log stream ended");
                }
            }
            // Every task (the Docker API's /tasks on another node): written straight from
            // the list.
            Hello::Api { request: ApiRequest::TaskLs } if node.is_some() => {
                let tasks = self.task_list();
                write_msg(&mut w, &DataReply { ok: true, data: &tasks }).await?;
            }
            Hello::Api { request } => {
                let Some(node) = node else {
                    write_msg(&mut w, &Reply::err(ApiError::new(ErrorKind::Refused, "refused: a client certificate of this cluster is required (join first)"))).await?;
                    return Ok(());
                };
                // Workers read, and run standalone tasks and attach containers on
                // themselves; changes come from
                // managers (a standby's CLI, forwarded).
                let role = self.lock().state.nodes.get(&node).map(|n| n.role);
                let reply = if role != Some(Role::Manager) && !request.is_read() && !matches!(request, ApiRequest::Run { .. } | ApiRequest::Attach { .. } | ApiRequest::Detach { .. }) {
                    Reply::err(ApiError::new(ErrorKind::NotManager, "refused: only a manager node may change the cluster over 2377"))
                } else {
                    self.api_async(request, Some(&node)).await
                };
                write_msg(&mut w, &reply).await?;
            }
            Hello::Session { reports, hostname } => {
                let Some(node) = node else {
                    write_msg(&mut w, &Reply::err(ApiError::new(ErrorKind::Refused, "refused: a client certificate of this cluster is required (join first)"))).await?;
                    return Ok(());
                };
                self.session(node, reports, hostname, r, w).await?;
            }
        }
        Ok(())
    }

    fn join(&self, secret: &str, hostname: String, addr: IpAddr, underlay: Vec<IpNetwork>, manager_port: Option<u16>, peer: SocketAddr) -> Reply {
        // The manager secret is only in the store: a manager that can read the store joins
        // as a manager (ADR 0022).
        let role = if !self.meta.manager_secret.is_empty() && token::secrets_equal(secret, &self.meta.manager_secret) {
            Role::Manager
        } else if token::secrets_equal(secret, &self.meta.worker_secret) {
            Role::Worker
        } else {
            warn!(peer = %peer, "join refused: wrong token secret");
            return Reply::err(ApiError::new(ErrorKind::Refused, "join refused: the token's secret is not valid for this cluster"));
        };
        let result = (|| -> Result<Joined, ManagerError> {
            let ca = Ca::load(&self.meta.cluster_id, self.meta.ca.clone())?;
            let node_id = pki::new_id()?;
            let (server_ip, manager_port) = match role {
                Role::Manager => (Some(addr), Some(manager_port.unwrap_or(2377))),
                Role::Worker => (None, None),
            };
            let cert = ca.issue_node(&node_id, &role, server_ip)?;
            let node = Node {
                id: node_id.clone(),
                hostname,
                addr,
                role,
                status: NodeStatus::Ready,
                underlay,
                cert_sha256: tls::sha256_hex(cert.cert_der()?.as_ref()),
                ingress_ip: None,
                manager_port,
                availability: Availability::Active,
                labels: BTreeMap::new(),
            };
            self.mutate(|st, g| {
                st.nodes.insert(node.id.clone(), node.clone());
                ops::reconcile(st, g);
                Ok(())
            })?;
            self.lock().last_seen.insert(node_id.clone(), Instant::now());
            info!(node = %node_id, hostname = %node.hostname, addr = %node.addr, role = %role, "node joined");
            Ok(Joined { node_id, cluster_id: self.meta.cluster_id.clone(), ca_pem: self.meta.ca.cert_pem.clone(), cert })
        })();
        match result {
            Ok(j) => Reply::ok(&j),
            Err(e) => Reply::err(e.to_api().context("join failed")),
        }
    }

    pub fn gossip_keys(&self) -> GossipKeySet {
        self.gossip.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The metadata as it stands now.
    fn current_meta(&self) -> ClusterMeta {
        let mut meta = self.meta.clone();
        let set = self.gossip_keys();
        meta.gossip_keys = set.keys;
        meta.gossip_send = set.send;
        meta.removed_nodes = self.removed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        meta
    }

    /// Stores a new key set and tells every session.
    fn set_gossip_keys(&self, set: GossipKeySet) -> Result<(), ManagerError> {
        let mut meta = self.current_meta();
        meta.gossip_keys = set.keys.clone();
        meta.gossip_send = set.send;
        self.store.commit(&[store::meta_write(&meta)?])?;
        *self.gossip.lock().unwrap_or_else(|p| p.into_inner()) = set;
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// `node rm`: the node leaves the state (its tasks are replaced elsewhere), its
    /// certificate is refused from now on with the reason, and the gossip key is replaced
    /// with no key before it left accepted: the node can neither read nor write gossip.
    pub async fn remove_node(&self, name: &str, force: bool) -> Result<Removed, ManagerError> {
        let node = self.mutate(|st, g| ops::remove_node(st, name, force, &self.node_id, g))?;
        {
            let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            removed.insert(node.cert_sha256.clone(), format!("{} ({})", node.id, node.hostname));
        }
        self.store.commit(&[store::meta_write(&self.current_meta())?])?;
        self.lock().last_seen.remove(&node.id);
        info!(node = %node.id, hostname = %node.hostname, "node removed; replacing the gossip key");
        self.rotate_gossip_key_inner(self.key_switch_delay(), true).await?;
        Ok(Removed { id: node.id, name: node.hostname })
    }

    /// Replaces the gossip key, in two steps so that no message is lost: the new key is
    /// handed out to be accepted, and after `switch_after` (every node has had it: a session
    /// gets it within milliseconds) it becomes the one to seal with; the key before it stays
    /// accepted until the next rotation, older ones go. Returns the new key's id.
    pub async fn rotate_gossip_key(&self, switch_after: Duration) -> Result<u32, ManagerError> {
        self.rotate_gossip_key_inner(switch_after, false).await
    }

    /// With `retire`, the keys before the new one stop being accepted once it seals (a node
    /// was removed: what it holds must open nothing and be refused).
    async fn rotate_gossip_key_inner(&self, switch_after: Duration, retire: bool) -> Result<u32, ManagerError> {
        let mut set = self.gossip_keys();
        let id = set.keys.iter().map(|k| k.id).max().unwrap_or(0) + 1;
        let sending = if set.send == 0 { id - 1 } else { set.send };
        set.keys.retain(|k| k.id >= sending);
        set.keys.push(new_gossip_key(id)?);
        set.send = sending;
        self.set_gossip_keys(set)?;
        info!(key = id, "gossip key rotation: new key handed out");
        tokio::time::sleep(switch_after).await;
        let mut set = self.gossip_keys();
        if set.keys.iter().any(|k| k.id == id) && set.send < id {
            set.send = id;
            set.keys.retain(|k| k.id >= if retire { id } else { sending });
            self.set_gossip_keys(set)?;
            info!(key = id, "gossip key rotation: nodes seal with the new key");
        }
        Ok(id)
    }

    /// Rotates the gossip key every `--gossip-key-rotation`.
    pub async fn rotate_gossip_keys_periodically(self: Arc<Self>) {
        let every = self.gossip_key_rotation;
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.rotate_gossip_key(self.key_switch_delay()).await {
                warn!(error = %e, "gossip key rotation failed; the current key stays");
            }
        }
    }

    /// How long a new gossip key is only accepted before it seals: a few heartbeats, at
    /// least 2 s.
    pub fn key_switch_delay(&self) -> Duration {
        (self.heartbeat * 2).max(Duration::from_secs(2))
    }
}

/// A gossip key of 32 random bytes.
fn new_gossip_key(id: u32) -> Result<GossipKey, ManagerError> {
    let mut k = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k).map_err(|_| OpError::Invalid("no randomness for a gossip key".into()))?;
    Ok(GossipKey::from_bytes(id, &k))
}

/// Unix time in ms (the rolling updates' delays; managers' clocks are kept in step by NTP,
/// and a skew only moves a delay).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
