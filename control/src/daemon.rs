//! The two daemons (`swarmnet manager`, `swarmnet agent`), composed of the manager's and the
//! agent's crates, and the local control socket the CLI talks to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ipnetwork::Ipv4Network;
use swarmnet_agent::node::{self, Claim, NodeBase, NodeConfig};
use swarmnet_agent::{Agent, AgentConfig, Identity};
use swarmnet_api::replies::{DnsCounters, GossipView, LocalEndpoint, NetworkDetail, NodeInfo};
use swarmnet_api::token::JoinToken;
use swarmnet_api::{read_msg_within, write_msg, ApiError, ApiRequest, ErrorKind, Reply, MAX_FIRST_FRAME};
use swarmnet_manager::store::{EtcdConfig, EtcdStore, Store, StoreChoice};
use swarmnet_manager::{Manager, ManagerConfig};
use swarmnet_types::admission::{self, Admission, Limits, Names};
use swarmnet_types::format_mac;
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

/// The machine's hostname (the default display name of its node).
pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

/// The argv that holds a sandbox namespace: this binary, `sandbox-hold`.
pub fn holder_cmd() -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("find this binary (for the sandbox holder)")?;
    Ok(vec![exe.display().to_string(), "sandbox-hold".into()])
}

/// The argv of a task's log writer: this binary, `task-log`.
pub fn log_writer_cmd() -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("find this binary (for the task log writer)")?;
    Ok(vec![exe.display().to_string(), "task-log".into()])
}

/// Starts the node's parts and its agent; the claim on the node's id must be held for as
/// long as the daemon runs.
async fn start_agent(cfg: &NodeConfig, base: NodeBase, id: Identity) -> anyhow::Result<(Arc<Agent>, Claim)> {
    let n = node::start(cfg, base, &id.node_id).await?;
    let agent = Agent::new(id, n.runtime, n.reports, n.gossip, n.ingress, AgentConfig { gossip_port: cfg.gossip_port, data_dir: cfg.data_dir.clone(), hostname: cfg.hostname.clone() })?;
    tokio::spawn(agent.clone().run());
    let a = agent.clone();
    tokio::spawn(async move {
        a.adopt_containers().await;
        a.watch_containers().await
    });
    Ok((agent, n.claim))
}

#[allow(clippy::too_many_arguments)]
pub async fn run_manager(
    cfg: NodeConfig,
    listen: SocketAddr,
    pool: Ipv4Network,
    heartbeat: Duration,
    data_path_port: u16,
    ingress_subnet: Option<Ipv4Network>,
    gossip_key_rotation: Duration,
    force_new_cluster: bool,
    store: StoreChoice,
) -> anyhow::Result<()> {
    let base = NodeBase::read(&cfg).await?;
    let identity = Identity::load(&cfg.data_dir)?;
    let mcfg = ManagerConfig {
        advertise: cfg.advertise,
        pool,
        heartbeat,
        hostname: cfg.hostname.clone(),
        underlay: base.underlay.clone(),
        data_path_port,
        ingress_subnet,
        gossip_key_rotation,
        expect_cluster: identity.as_ref().map(|i| i.cluster_id.clone()),
        force_new_cluster,
        listen_port: listen.port(),
        gossip_port: cfg.gossip_port,
        store: store.clone(),
        me: identity.as_ref().map(|i| (i.node_id.clone(), i.cert.clone())),
    };
    if let StoreChoice::Etcd(ec) = store {
        return run_manager_on_etcd(cfg, base, identity, mcfg, ec, listen).await;
    }
    let manager = Manager::open(&cfg.data_dir, &mcfg)?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
    info!(%listen, cluster = %manager.meta.cluster_id, "manager listening");
    let id = manager_identity(&manager, &cfg, listen, identity.as_ref())?;
    tokio::spawn(manager.clone().serve(listener));
    tokio::spawn(manager.clone().watch_heartbeats());
    tokio::spawn(manager.clone().rotate_gossip_keys_periodically());
    tokio::spawn(manager.clone().drive_updates());
    let (agent, _claim) = start_agent(&cfg, base, id).await?;
    let (_tx, slot) = tokio::sync::watch::channel(Some(manager));
    serve_control(&cfg, Some(slot), None, agent).await
}

/// The identity of the manager's own node (saved in its data dir), printing the worker's
/// join command at the cluster's first start.
fn manager_identity(manager: &Manager, cfg: &NodeConfig, listen: SocketAddr, had: Option<&Identity>) -> anyhow::Result<Identity> {
    let addr = SocketAddr::new(cfg.advertise, listen.port()).to_string();
    let id = match had {
        Some(i) if i.node_id == manager.node_id && i.cluster_id == manager.meta.cluster_id => Identity { manager: addr, ..i.clone() },
        _ => Identity {
            node_id: manager.meta.manager_node_id.clone(),
            cluster_id: manager.meta.cluster_id.clone(),
            ca_pem: manager.meta.ca.cert_pem.clone(),
            cert: manager.meta.manager_cert.clone(),
            manager: addr,
            managers: vec![],
        },
    };
    id.save(&cfg.data_dir)?;
    if had.is_none_or(|i| i.cluster_id != id.cluster_id) {
        let token = manager.join_token()?;
        println!("To add a worker to this cluster, run on it:\n\n    swarmnet agent --join {} --token {token} --advertise-addr <its address>\n", id.manager);
    }
    Ok(id)
}

/// A manager on etcd (ADR 0022): it leads when it wins the election, and stands by
/// otherwise (its agent's session goes to the leader; manager verbs on its control socket
/// are forwarded there). It leads until its store says it no longer does, then campaigns
/// again. The first manager on an empty prefix creates the cluster; a manager that finds a
/// cluster and has no identity joins it through the leader with the store's manager secret.
async fn run_manager_on_etcd(cfg: NodeConfig, base: NodeBase, identity: Option<Identity>, mut mcfg: ManagerConfig, ec: EtcdConfig, listen: SocketAddr) -> anyhow::Result<()> {
    let value = Manager::campaign_value(&mcfg);
    let (slot_tx, slot) = tokio::sync::watch::channel(None::<Arc<Manager>>);
    // Imported before (the file set aside): a restart with the same flags goes on as usual.
    let import = ec.import.clone().filter(|p| p.exists() || !p.with_extension("redb.imported").exists());
    let (id, first_term) = if let Some(path) = import {
        // A one-manager cluster moves into etcd: this node leads first, copies it, and goes
        // on as its manager (its tasks and every node's identity stay as they are).
        let Some(id) = identity else { bail!("--import {}: this data dir has no node identity (start the manager on the node whose store it is)", path.display()) };
        if !path.is_file() {
            bail!("--import {}: no such store (expected the manager.redb of a one-manager cluster)", path.display());
        }
        let store = Manager::connect_etcd_expecting(&ec, &mcfg, None)?;
        info!(store = %ec.shown(), from = %path.display(), "importing: campaigning for the leadership");
        store.campaign_async(&value, Duration::from_secs(3600)).await?;
        let (cluster, copied) = Manager::import(&store, &path)?;
        if cluster != id.cluster_id {
            store.resign();
            bail!("--import {}: cluster {cluster} is not this node's ({})", path.display(), id.cluster_id);
        }
        if copied {
            let aside = path.with_extension("redb.imported");
            std::fs::rename(&path, &aside).with_context(|| format!("rename {} to {} (imported into {})", path.display(), aside.display(), ec.shown()))?;
            info!(cluster = %cluster, aside = %aside.display(), "the embedded store is set aside: the cluster lives in etcd now");
        } else {
            info!(cluster = %cluster, "--import: the store holds this cluster already; nothing copied");
        }
        let m = Manager::lead(store, &mcfg)?;
        (id, Some(m))
    } else {
        let store = Manager::connect_etcd(&ec, &mcfg)?;
        match identity {
            // The leader now, as the store says, is where its agent goes first.
            Some(mut id) => {
                if let Some(addr) = store.leader().ok().flatten().as_deref().map(Manager::campaign_addr) {
                    if !id.managers.iter().any(|m| m == addr) {
                        id.managers.insert(0, addr.to_string());
                    }
                }
                (id, None)
            }
            None => match store.load()?.0 {
                // A cluster is there: join it as a manager, through the leader.
                Some(meta) => (join_as_manager(&cfg, &base, &store, &meta, listen).await?, None),
                // None yet: this manager makes it (or another that wins first does; then it joins).
                None => {
                    store.campaign_async(&value, Duration::from_secs(3600)).await?;
                    let m = Manager::lead(store, &mcfg)?;
                    let id = manager_identity(&m, &cfg, listen, None)?;
                    (id, Some(m))
                }
            },
        }
    };
    // Every later term leads as this node, of this cluster.
    mcfg.me = Some((id.node_id.clone(), id.cert.clone()));
    mcfg.expect_cluster = Some(id.cluster_id.clone());
    let mcfg = Arc::new(mcfg);
    let stale = Arc::new(StaleReader { store: Manager::connect_etcd(&ec, &mcfg)?, cfg: mcfg.clone() });
    // 2377 is served for the manager's whole life: by this manager while it leads, relayed
    // to the leader while it stands by.
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
    let role = Arc::new(Role { agent: std::sync::OnceLock::new(), me: SocketAddr::new(mcfg.advertise, mcfg.listen_port) });
    tokio::spawn(serve_2377(listener, slot.clone(), stale.clone(), role.clone()));
    info!(store = %ec.shown(), node = %id.node_id, %listen, "manager on etcd: listening, campaigning for the leadership");
    tokio::spawn(lead_when_elected(ec, mcfg, value, slot_tx, first_term, role.clone()));
    let (agent, _claim) = start_agent(&cfg, base, id).await?;
    let _ = role.agent.set(agent.clone());
    serve_control(&cfg, Some(slot), Some(stale), agent).await
}

/// Joins the cluster in the store as a manager, through the manager that leads it (waiting
/// for one while there is none).
async fn join_as_manager(cfg: &NodeConfig, base: &NodeBase, store: &swarmnet_manager::store::EtcdStore, meta: &swarmnet_manager::store::ClusterMeta, listen: SocketAddr) -> anyhow::Result<Identity> {
    if meta.manager_secret.is_empty() {
        bail!("cluster {} in {} has no manager secret yet: start its manager with this version first", meta.cluster_id, store.describe());
    }
    let ca = swarmnet_manager::pki::Ca::load(&meta.cluster_id, meta.ca.clone())?.digest()?;
    let token = JoinToken { ca_digest: ca, secret: meta.manager_secret.clone() };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let leader = store.leader()?;
        if let Some(addr) = leader.as_deref().map(Manager::campaign_addr) {
            info!(cluster = %meta.cluster_id, leader = %addr, "joining the cluster as a manager");
            match swarmnet_agent::join(&cfg.data_dir, &[addr.to_string()], &token, &cfg.hostname, cfg.advertise, base.underlay.clone(), Some(listen.port())).await {
                Ok(id) => return Ok(id),
                Err(e) if std::time::Instant::now() < deadline => warn!(leader = %addr, error = %format!("{e:#}"), "could not join through the leader; trying again"),
                Err(e) => return Err(e.context(format!("join cluster {} in {} as a manager", meta.cluster_id, store.describe()))),
            }
        } else if std::time::Instant::now() > deadline {
            bail!("cluster {} in {}: no manager leads it (for 60 s) to join through", meta.cluster_id, store.describe());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// 2377 on a manager of several, for the manager's whole life (ADR 0022). While it leads,
/// it serves what it accepts. While it stands by, it relays each connection, unread, to the
/// manager that leads: TLS goes end to end, from the agent to the leader, as swarmkit's
/// followers proxy their dispatcher to the leader. With no leader (an election, etcd
/// without quorum), or once demoted, it closes the connection: the agent tries the next.
/// The per-address cap does not apply to the other managers (each relays many agents).
async fn serve_2377(listener: tokio::net::TcpListener, slot: tokio::sync::watch::Receiver<Option<Arc<Manager>>>, stale: Arc<StaleReader>, role: Arc<Role>) {
    let names = Names { what: "2377", conns: "connections", conn: "connection" };
    let leading = slot.clone();
    let admission = Admission::new(Manager::LIMITS_2377).exempting(Arc::new(move |ip| leading.borrow().as_ref().is_some_and(|m| m.is_manager_addr(ip))));
    admission::serve(listener, names, admission, |tcp: tokio::net::TcpStream, peer| {
        let leader = slot.borrow().clone().filter(|m| m.leads());
        let stale = stale.clone();
        let role = role.clone();
        async move {
            match leader {
                Some(m) => m.serve_conn(tcp, peer).await,
                None if !role.is_manager() => {}
                None => relay(tcp, peer, &stale, role.me).await,
            }
        }
    })
    .await
}

/// A standby's relay of one connection on 2377 to the manager that leads.
async fn relay(mut tcp: tokio::net::TcpStream, peer: Option<SocketAddr>, stale: &StaleReader, me: SocketAddr) {
    let leader = match tokio::task::block_in_place(|| stale.store.leader()) {
        Ok(v) => v.as_deref().map(Manager::campaign_addr).and_then(|a| a.parse::<SocketAddr>().ok()),
        Err(e) => {
            info!(peer = ?peer, store = %stale.store.describe(), error = %e, "2377: no leader to relay to (the store does not say)");
            return;
        }
    };
    // This manager, elected a moment ago and not serving yet, or none: the agent tries again.
    let Some(to) = leader.filter(|a| *a != me) else { return };
    let mut upstream = match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(peer = ?peer, leader = %to, error = %e, "2377: cannot relay to the leader");
            return;
        }
        Err(_) => {
            info!(peer = ?peer, leader = %to, "2377: cannot relay to the leader (no answer within 2 s)");
            return;
        }
    };
    // A leader (or an agent) cut off from the network: what it does not acknowledge ends the
    // relay, as on the agent's own sessions (three heartbeats, at least 2 s), and the agent
    // moves on.
    let unacked = (stale.cfg.heartbeat * 3).max(Duration::from_secs(2));
    for s in [&tcp, &upstream] {
        let _ = s.set_nodelay(true);
        let _ = socket2::SockRef::from(s).set_tcp_user_timeout(Some(unacked));
    }
    debug!(peer = ?peer, leader = %to, "2377: relaying to the leader");
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
}

/// Whether this node is a manager of the cluster, as its agent last heard from the leader
/// (the managers' list every session hands over and updates: a change reaches it within a
/// heartbeat, and costs no read of the store). Before the agent has a session: a manager.
/// A demoted node neither campaigns nor relays on 2377.
struct Role {
    agent: std::sync::OnceLock<Arc<Agent>>,
    /// This manager's address on 2377, as the list names it.
    me: SocketAddr,
}

impl Role {
    fn is_manager(&self) -> bool {
        let me = self.me.to_string();
        self.agent.get().map(|a| a.known_managers()).filter(|l| !l.is_empty()).is_none_or(|l| l.contains(&me))
    }
}

/// Campaigns, leads while elected (its listener serves 2377, it watches heartbeats and
/// rotates keys), and campaigns again when the leadership is lost. `first`: a term already
/// won. A node demoted to a worker does not campaign (a campaign under way ends within 5 s);
/// promoted again, it does.
async fn lead_when_elected(ec: EtcdConfig, mcfg: Arc<ManagerConfig>, value: String, slot: tokio::sync::watch::Sender<Option<Arc<Manager>>>, mut first: Option<Arc<Manager>>, role: Arc<Role>) {
    let mut said = false;
    loop {
        if first.is_none() {
            if !role.is_manager() {
                if !said {
                    warn!(manager = %role.me, "this node is not a manager of the cluster any more: it does not campaign (`swarmnet node promote` makes it one again; or run it as `swarmnet agent`)");
                    said = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if said {
                info!(manager = %role.me, "this node is a manager again (promoted): campaigning for the leadership");
            }
            said = false;
        }
        let manager = match first.take() {
            Some(m) => m,
            None => match campaign(&ec, &mcfg, &value, &role).await {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    warn!(store = %ec.shown(), error = %format!("{e:#}"), "campaign for the leadership failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        info!(listen = %SocketAddr::new(mcfg.advertise, mcfg.listen_port), cluster = %manager.meta.cluster_id, store = %ec.shown(), "this manager leads the cluster");
        // Ending these ends the term; the sessions it serves end on the manager's step-down
        // (and the agents come back to the next leader, directly or through this relay).
        let others = [tokio::spawn(manager.clone().watch_heartbeats()), tokio::spawn(manager.clone().rotate_gossip_keys_periodically()), tokio::spawn(manager.clone().drive_updates())];
        slot.send_replace(Some(manager.clone()));
        manager.lost_leadership().await;
        slot.send_replace(None);
        for t in others {
            t.abort();
        }
        manager.resign();
        drop(manager);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One campaign on a connection of its own: waits until this manager is elected, then
/// reads the state. None: the node was demoted meanwhile (each wait lasts 5 s, then the
/// campaign's key is given up and the role looked at again).
async fn campaign(ec: &EtcdConfig, mcfg: &ManagerConfig, value: &str, role: &Role) -> anyhow::Result<Option<Arc<Manager>>> {
    let store = Manager::connect_etcd(ec, mcfg)?;
    loop {
        match store.campaign_async(value, Duration::from_secs(5)).await {
            Ok(()) => break,
            Err(swarmnet_manager::store::StoreError::NotLeader(_)) if role.is_manager() => continue,
            Err(swarmnet_manager::store::StoreError::NotLeader(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(Manager::lead(store, mcfg)?))
}

pub async fn run_agent(cfg: NodeConfig, join: String, token: Option<String>) -> anyhow::Result<()> {
    let base = NodeBase::read(&cfg).await?;
    let managers: Vec<String> = join.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_string).collect();
    if managers.is_empty() {
        bail!("--join {join:?}: expected HOST:PORT[,HOST:PORT…]");
    }
    let id = match Identity::load(&cfg.data_dir)? {
        Some(mut id) => {
            info!(node = %id.node_id, manager = %id.manager, "using the identity in the data dir");
            // Managers named on the command line are tried too.
            for m in managers {
                if !id.managers.contains(&m) && id.manager != m {
                    id.managers.push(m);
                }
            }
            id
        }
        None => {
            let Some(token) = token else { bail!("--token is required to join (this data dir has no node identity yet)") };
            let token = JoinToken::parse(&token)?;
            swarmnet_agent::join(&cfg.data_dir, &managers, &token, &cfg.hostname, cfg.advertise, base.underlay.clone(), None).await?
        }
    };
    let (agent, _claim) = start_agent(&cfg, base, id).await?;
    serve_control(&cfg, None, None, agent).await
}

/// How a manager that stands by answers when no manager can be reached (ADR 0022): reads
/// from the store's copy, marked stale; changes refused, saying whether the store itself
/// lacks its quorum (the cluster is read-only) or an election is under way.
struct StaleReader {
    store: EtcdStore,
    cfg: Arc<ManagerConfig>,
}

impl StaleReader {
    /// Blocking (etcd calls, bounded by their timeouts): run with `block_in_place`.
    fn answer(&self, req: ApiRequest, unreachable: &str) -> Reply {
        let shown = self.store.describe();
        if !req.is_read() {
            return Reply::err(match self.store.has_quorum() {
                Err(e) => {
                    ApiError::unavailable(format!("the cluster is read-only: its store {shown} does not answer with a quorum ({e}); changes are refused until it does (reads answer, marked stale)"))
                }
                Ok(()) => ApiError::unavailable(format!("no manager leads the cluster right now ({unreachable}); an election is under way: try again")),
            });
        }
        match self.store.load_stale() {
            Ok((Some(meta), state)) => {
                let why = format!("no manager leads the cluster ({unreachable}): the state as a member of {shown} holds it, possibly behind");
                let view = Manager::read_only(meta, state, &self.cfg, format!("the cluster is read-only: {why}"), shown.clone());
                let mut r = view.api(req, None);
                r.stale = Some(why);
                r
            }
            Ok((None, _)) => Reply::err(ApiError::unavailable(format!("no manager leads the cluster ({unreachable}) and {shown} holds no cluster"))),
            Err(e) => Reply::err(ApiError::unavailable(format!("no manager leads the cluster ({unreachable}) and its store cannot be read: {e}"))),
        }
    }
}

pub fn control_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// The manager of a manager daemon, when it leads (None while it stands by); None for a
/// worker.
type ManagerSlot = tokio::sync::watch::Receiver<Option<Arc<Manager>>>;

async fn serve_control(cfg: &NodeConfig, manager: Option<ManagerSlot>, stale: Option<Arc<StaleReader>>, agent: Arc<Agent>) -> anyhow::Result<()> {
    let data_dir = &cfg.data_dir;
    if let Some(addr) = cfg.metrics_addr {
        let h = crate::metrics::handler(agent.clone(), manager.clone());
        let at = crate::http::Endpoint::Tcp(addr);
        // Bound: a scraper or two, and a stranger cannot hold many.
        let bind = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
        drop(bind);
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(at, "metrics", swarmnet_types::admission::Limits { total: 64, per_peer: 16 }, h).await {
                warn!(error = %format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    for at in &cfg.docker_api {
        let at: crate::http::Endpoint = at.parse().map_err(|e: String| anyhow::anyhow!("--docker-api {e}"))?;
        let h = crate::docker::handler(agent.clone(), manager.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(at, "docker api", swarmnet_types::admission::Limits { total: 256, per_peer: 64 }, h).await {
                warn!(error = %format!("{e:#}"), "docker api endpoint stopped");
            }
        });
    }
    let path = control_socket(data_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    info!(socket = %path.display(), node = %agent.id.node_id, "ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Bounded (issues 12 and 19, the shared loop): at most 256 requests at once, 10 s to send
    // one; accept failures back off and are logged once per burst.
    let names = Names { what: "control socket", conns: "requests", conn: "request" };
    // `swarm leave` done: the daemon erases its state and exits.
    let left = Arc::new(tokio::sync::Notify::new());
    let serving = admission::serve(listener, names, Admission::new(Limits { total: 256, per_peer: 256 }), |mut conn: tokio::net::UnixStream, _| {
        let manager = manager.clone();
        let agent = agent.clone();
        let stale = stale.clone();
        let left = left.clone();
        async move {
            let req: ApiRequest = match tokio::time::timeout(std::time::Duration::from_secs(10), read_msg_within(&mut conn, MAX_FIRST_FRAME)).await {
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(e)) => {
                    let _ = write_msg(&mut conn, &Reply::err(ApiError::invalid(format!("bad request: {e}")))).await;
                    return;
                }
            };
            if let ApiRequest::SwarmLeave { force } = req {
                let reply = leave(force, manager.as_ref(), &agent).await;
                let done = reply.ok;
                let _ = write_msg(&mut conn, &reply).await;
                if done {
                    left.notify_one();
                }
                return;
            }
            let (leading, standby) = match &manager {
                None => (None, false),
                Some(slot) => {
                    // A manager that has just stopped leading (its term not yet ended) is a
                    // standby already: the request goes to the leader.
                    let m = slot.borrow().clone().filter(|m| m.leads());
                    let standby = m.is_none();
                    (m, standby)
                }
            };
            if let ApiRequest::ServiceLogs { spec } = &req {
                match &leading {
                    Some(m) => m.serve_logs(spec, &mut conn).await,
                    // A worker or a standby: through the manager that leads.
                    None => {
                        if let Err(e) = agent.call_stream(req.clone(), &mut conn).await {
                            let _ = write_msg(&mut conn, &Reply::err(ApiError::unavailable(format!("service logs: the manager that leads cannot be reached: {e:#}")))).await;
                        }
                    }
                }
                return;
            }
            let reply = answer(req, leading.as_deref(), standby.then_some(stale.as_deref()).flatten(), &agent).await;
            let _ = write_msg(&mut conn, &reply).await;
        }
    });
    tokio::select! {
        _ = serving => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = left.notified() => {
            let _ = std::fs::remove_file(&path);
            remove_api_sockets(cfg);
            info!(data_dir = %data_dir.display(), "left the swarm; exiting");
            return Ok(());
        }
    }
    info!("stopping; tasks keep running and are adopted at the next start");
    remove_api_sockets(cfg);
    // Another manager takes over at once, not when the lease runs out.
    if let Some(m) = manager.as_ref().and_then(|slot| slot.borrow().clone()) {
        m.resign();
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// The unix sockets of `--docker-api`, when the daemon stops or leaves.
fn remove_api_sockets(cfg: &NodeConfig) {
    for at in &cfg.docker_api {
        if let Ok(crate::http::Endpoint::Unix(p)) = at.parse::<crate::http::Endpoint>() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `swarm leave` on this node: refused on a manager without `force` (Docker's rule: demote
/// it first; the last manager's leave ends the cluster, whose state is erased with it).
async fn leave(force: bool, manager: Option<&ManagerSlot>, agent: &Agent) -> Reply {
    if let Some(slot) = manager {
        if !force {
            return Reply::err(ApiError::conflict(
                "this node is a manager: demote it first (`swarmnet node demote NODE`, asked of another manager), or leave with --force (the last manager's leave ends the cluster: its state is erased with this node's)",
            ));
        }
        // Another manager takes over at once, not when the lease runs out.
        if let Some(m) = slot.borrow().clone() {
            m.resign();
        }
    }
    let mut left_behind = agent.leave().await;
    // The state goes only when nothing is left that it would be needed to find again (a
    // task still running is adopted by the next daemon from its state file).
    if left_behind.is_empty() {
        left_behind = erase_state(&agent.data_dir);
    } else {
        left_behind.push(format!("the node's state in {} (kept: something of the node is left)", agent.data_dir.display()));
    }
    Reply::ok(&swarmnet_api::replies::Left { node_id: agent.id.node_id.clone(), left_behind })
}

/// What a node keeps in its data dir, by name: its identity, certificates and gossip keys
/// (`node/`), its tasks' state and files, its sandboxes' records, its load balancer's and
/// mesh's records, its attached containers' record, a manager's store. Anything else there
/// (an operator's log, an imported store kept as `….imported`, TLS files for etcd) is not the
/// node's and stays.
const STATE: [&str; 8] = ["node", "tasks", "sandboxes", "ingress.json", "lb.lock", "lb-nftables.json", "cni.json", "manager.redb"];

/// Erases the node's state once it has left; what could not be removed.
fn erase_state(data_dir: &Path) -> Vec<String> {
    let mut failed = Vec::new();
    for name in STATE {
        let p = data_dir.join(name);
        let r = match std::fs::symlink_metadata(&p) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
        };
        if let Err(e) = r {
            failed.push(format!("{}: {e}", p.display()));
        }
    }
    failed
}

/// One request of the local CLI: the manager's answer, completed with what only this node
/// knows (its gossip table, its resolvers' counters, its failure detector's view).
async fn answer(req: ApiRequest, manager: Option<&Manager>, standby: Option<&StaleReader>, agent: &Arc<Agent>) -> Reply {
    let me = Some(&agent.id.node_id);
    match (req, manager) {
        (ApiRequest::RunLocal { spec, detach }, _) => agent.run_local(spec, detach).await,
        (ApiRequest::CniAdd { req }, _) => Reply::from_result(agent.cni_add(req).await),
        (ApiRequest::CniCheck { req }, _) => Reply::from_result(agent.cni_check(req).await),
        (ApiRequest::CniDel { req }, _) => Reply::from_result(agent.cni_del(req).await),
        (ApiRequest::CniGc { spec }, _) => Reply::from_result(agent.cni_gc(spec).await),
        (ApiRequest::LbLs, _) => agent.lb_table().await,
        (ApiRequest::ExecLocate { task }, _) => Reply::from_result(agent.exec_target(&task).await),
        (req @ (ApiRequest::NodeRm { .. } | ApiRequest::RotateGossipKey), Some(m)) => m.api_async(req, me).await,
        // Inspect works on every node: the manager's record plus what this node's gossip
        // knows.
        (req @ ApiRequest::NetworkInspect { .. }, m) => {
            let r = match (m, standby) {
                (Some(m), _) => m.api(req, me),
                (None, Some(s)) => forward(req, agent, s).await,
                (None, None) => agent.call(req).await.unwrap_or_else(|e| Reply::err(ApiError::unavailable(format!("{e:#}")))),
            };
            let stale = r.stale.clone();
            match r.into_data::<NetworkDetail>() {
                Ok(d) => Reply { stale, ..Reply::ok(&with_local_view(d, agent).await) },
                Err(e) => Reply::err(e.into_api()),
            }
        }
        (req @ ApiRequest::NodeLs, m) if m.is_some() || standby.is_some() => {
            let r = match (m, standby) {
                (Some(m), _) => m.api(req, me),
                (None, Some(s)) => forward(req, agent, s).await,
                (None, None) => Reply::err(ApiError::new(ErrorKind::NotManager, "this node is not a manager")),
            };
            let stale = r.stale.clone();
            match r.into_data::<Vec<NodeInfo>>() {
                Ok(nodes) => Reply { stale, ..Reply::ok(&with_gossip_view(nodes, agent).await) },
                Err(e) => Reply::err(e.into_api()),
            }
        }
        (req, Some(m)) => m.api(req, me),
        // A manager that stands by: the one that leads answers (ADR 0022).
        (req, None) if standby.is_some() => match standby {
            Some(s) => forward(req, agent, s).await,
            None => Reply::err(ApiError::new(ErrorKind::NotManager, "this node is not a manager")),
        },
        (_, None) => Reply::err(ApiError::new(ErrorKind::NotManager, "this node is not a manager")),
    }
}

/// A request of a standby manager's CLI, answered by the manager that leads, through the
/// agent's connection to it. No leader reachable: the store's copy answers reads (stale),
/// changes are refused (an election, or the store without its quorum).
async fn forward(req: ApiRequest, agent: &Agent, stale: &StaleReader) -> Reply {
    match agent.call(req.clone()).await {
        Ok(r) => r,
        Err(e) => {
            let why = format!("this manager stands by and the leader it knows ({}) cannot be reached: {e:#}", agent.manager());
            tokio::task::block_in_place(|| stale.answer(req, &why))
        }
    }
}

/// Adds the network's table as this node's gossip holds it, and this node's DNS counters.
async fn with_local_view(mut d: NetworkDetail, agent: &Agent) -> NetworkDetail {
    d.local_endpoints = match agent.gossip.endpoints(&d.network.id).await {
        Ok(eps) => Some(
            eps.into_iter()
                .map(|e| LocalEndpoint { name: e.task_name.clone(), task_id: e.id.clone(), service: e.service_name.clone(), ip: e.ip, mac: format_mac(e.mac), vtep: e.vtep, state: e.state })
                .collect(),
        ),
        Err(e) => {
            warn!(network = %d.network.name, error = %e, "network inspect: this node's table cannot be read");
            None
        }
    };
    let c = &agent.runtime.dns().shared.counters;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    d.local_gossip = agent.gossip.stats().await.ok().map(|s| swarmnet_api::replies::GossipCounters { unauthenticated: s.unauthenticated, malformed: s.malformed, udp_sent: s.udp_sent });
    d.local_dns = DnsCounters { answered_locally: n(&c.local), forwarded: n(&c.forwarded), upstream_failures: n(&c.upstream_failures), refused_or_malformed: n(&c.refused) };
    d
}

/// Adds each node's gossip state as this (the manager's) node sees it.
async fn with_gossip_view(mut nodes: Vec<NodeInfo>, agent: &Agent) -> Vec<NodeInfo> {
    let alive = agent.gossip.members().await.map(|m| m.into_iter().map(|m| m.node.clone()).collect::<std::collections::BTreeSet<String>>());
    for n in &mut nodes {
        n.gossip = Some(match &alive {
            Err(_) => GossipView::Unknown,
            Ok(_) if n.id == agent.id.node_id => GossipView::Alive,
            Ok(a) if a.contains(&n.id) => GossipView::Alive,
            Ok(_) => GossipView::Unreachable,
        });
    }
    nodes
}
