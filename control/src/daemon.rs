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
use swarmnet_manager::store::StoreChoice;
use swarmnet_manager::{Manager, ManagerConfig};
use swarmnet_types::admission::{self, Admission, Limits, Names};
use swarmnet_types::format_mac;
use tokio::net::UnixListener;
use tracing::{info, warn};

/// The machine's hostname (the default display name of its node).
pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

/// The argv that holds a sandbox namespace: this binary, `sandbox-hold`.
pub fn holder_cmd() -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("find this binary (for the sandbox holder)")?;
    Ok(vec![exe.display().to_string(), "sandbox-hold".into()])
}

/// Starts the node's parts and its agent; the claim on the node's id must be held for as
/// long as the daemon runs.
async fn start_agent(cfg: &NodeConfig, base: NodeBase, id: Identity) -> anyhow::Result<(Arc<Agent>, Claim)> {
    let n = node::start(cfg, base, &id.node_id).await?;
    let agent = Agent::new(id, n.runtime, n.reports, n.gossip, n.ingress, AgentConfig { gossip_port: cfg.gossip_port, data_dir: cfg.data_dir.clone(), hostname: cfg.hostname.clone() })?;
    tokio::spawn(agent.clone().run());
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
    let expect_cluster = Identity::load(&cfg.data_dir)?.map(|i| i.cluster_id);
    let mcfg = ManagerConfig {
        advertise: cfg.advertise,
        pool,
        heartbeat,
        hostname: cfg.hostname.clone(),
        underlay: base.underlay.clone(),
        data_path_port,
        ingress_subnet,
        gossip_key_rotation,
        expect_cluster,
        force_new_cluster,
        listen_port: listen.port(),
        gossip_port: cfg.gossip_port,
        store,
    };
    let manager = Manager::open(&cfg.data_dir, &mcfg)?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
    info!(%listen, cluster = %manager.meta.cluster_id, "manager listening");
    let first_start = Identity::load(&cfg.data_dir)?.is_none();
    let id = Identity {
        node_id: manager.meta.manager_node_id.clone(),
        cluster_id: manager.meta.cluster_id.clone(),
        ca_pem: manager.meta.ca.cert_pem.clone(),
        cert: manager.meta.manager_cert.clone(),
        manager: SocketAddr::new(cfg.advertise, listen.port()).to_string(),
    };
    id.save(&cfg.data_dir)?;
    if first_start {
        let token = manager.join_token()?;
        println!("To add a worker to this cluster, run on it:\n\n    swarmnet agent --join {} --token {token} --advertise-addr <its address>\n", id.manager);
    }
    tokio::spawn(manager.clone().serve(listener));
    tokio::spawn(manager.clone().watch_heartbeats());
    tokio::spawn(manager.clone().rotate_gossip_keys_periodically());
    let (agent, _claim) = start_agent(&cfg, base, id).await?;
    serve_control(&cfg.data_dir, Some(manager), agent).await
}

pub async fn run_agent(cfg: NodeConfig, join: String, token: Option<String>) -> anyhow::Result<()> {
    let base = NodeBase::read(&cfg).await?;
    let id = match Identity::load(&cfg.data_dir)? {
        Some(id) => {
            info!(node = %id.node_id, manager = %id.manager, "using the identity in the data dir");
            id
        }
        None => {
            let Some(token) = token else { bail!("--token is required to join (this data dir has no node identity yet)") };
            let token = JoinToken::parse(&token)?;
            swarmnet_agent::join(&cfg.data_dir, &join, &token, &cfg.hostname, cfg.advertise, base.underlay.clone()).await?
        }
    };
    let (agent, _claim) = start_agent(&cfg, base, id).await?;
    serve_control(&cfg.data_dir, None, agent).await
}

pub fn control_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

async fn serve_control(data_dir: &Path, manager: Option<Arc<Manager>>, agent: Arc<Agent>) -> anyhow::Result<()> {
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
    let serving = admission::serve(listener, names, Admission::new(Limits { total: 256, per_peer: 256 }), |mut conn: tokio::net::UnixStream, _| {
        let manager = manager.clone();
        let agent = agent.clone();
        async move {
            let req: ApiRequest = match tokio::time::timeout(std::time::Duration::from_secs(10), read_msg_within(&mut conn, MAX_FIRST_FRAME)).await {
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(e)) => {
                    let _ = write_msg(&mut conn, &Reply::err(ApiError::invalid(format!("bad request: {e}")))).await;
                    return;
                }
            };
            let reply = answer(req, manager.as_deref(), &agent).await;
            let _ = write_msg(&mut conn, &reply).await;
        }
    });
    tokio::select! {
        _ = serving => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("stopping; tasks keep running and are adopted at the next start");
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// One request of the local CLI: the manager's answer, completed with what only this node
/// knows (its gossip table, its resolvers' counters, its failure detector's view).
async fn answer(req: ApiRequest, manager: Option<&Manager>, agent: &Agent) -> Reply {
    let me = Some(&agent.id.node_id);
    match (req, manager) {
        (ApiRequest::RunLocal { spec, detach }, _) => agent.run_local(spec, detach).await,
        (ApiRequest::LbLs, _) => agent.lb_table().await,
        (ApiRequest::NodeRm { node, force }, Some(m)) => Reply::from_result(m.remove_node(&node, force).await.map_err(|e| e.to_api())),
        (ApiRequest::RotateGossipKey, Some(m)) => {
            Reply::from_result(m.rotate_gossip_key(m.key_switch_delay()).await.map(|key| swarmnet_api::replies::GossipKeyRotated { key }).map_err(|e| e.to_api().context("gossip key rotation")))
        }
        // Inspect works on every node: the manager's record plus what this node's gossip
        // knows.
        (req @ ApiRequest::NetworkInspect { .. }, m) => {
            let r = match m {
                Some(m) => m.api(req, me),
                None => agent.call(req).await.unwrap_or_else(|e| Reply::err(ApiError::unavailable(format!("{e:#}")))),
            };
            match r.into_data::<NetworkDetail>() {
                Ok(d) => Reply::ok(&with_local_view(d, agent).await),
                Err(e) => Reply::err(e.into_api()),
            }
        }
        (req @ ApiRequest::NodeLs, Some(m)) => match m.api(req, me).into_data::<Vec<NodeInfo>>() {
            Ok(nodes) => Reply::ok(&with_gossip_view(nodes, agent).await),
            Err(e) => Reply::err(e.into_api()),
        },
        (req, Some(m)) => m.api(req, me),
        (_, None) => Reply::err(ApiError::new(ErrorKind::NotManager, "this node is not a manager")),
    }
}

/// Adds the network's table as this node's gossip holds it, and this node's DNS counters.
async fn with_local_view(mut d: NetworkDetail, agent: &Agent) -> NetworkDetail {
    d.local_endpoints = match agent.gossip.endpoints(&d.network.id).await {
        Ok(eps) => Some(eps.into_iter().map(|e| LocalEndpoint { name: e.task_name, task_id: e.id, service: e.service_name, ip: e.ip, mac: format_mac(e.mac), vtep: e.vtep, state: e.state }).collect()),
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
    let alive = agent.gossip.members().await.map(|m| m.into_iter().map(|m| m.node).collect::<std::collections::BTreeSet<String>>());
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
