//! The two daemons (`swarmnet manager`, `swarmnet agent`) and the local control socket the
//! CLI talks to.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ipnetwork::Ipv4Network;
use swarmnet_dataplane::netns::NsWorker;
use swarmnet_dataplane::task::underlay_facts;
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::agent::{self, Agent, Identity};
use swarmnet_gossip::server::{self as gossip_server, GossipHandle};
use crate::overlay::Overlay;
use crate::runtime::Net;
use crate::manager::{Manager, ManagerConfig};
use crate::proto::*;
use crate::runtime::Runtime;
use crate::token::JoinToken;

pub struct Common {
    pub data_dir: PathBuf,
    pub advertise: IpAddr,
    /// TCP and UDP port of gossip.
    pub gossip_port: u16,
    pub dns: crate::dns::DnsOpts,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Name of the node: the lab sets SWARMNET_HOSTNAME because its nodes share one UTS name.
fn node_name() -> String {
    std::env::var("SWARMNET_HOSTNAME").unwrap_or_else(|_| hostname())
}

struct NodeBase {
    ns: NsWorker,
    mtu: u32,
    underlay: Vec<ipnetwork::IpNetwork>,
}

/// Gossip, the overlay and the task runtime of this node, wired together.
async fn node_services(c: &Common, base: NodeBase, node_id: &str) -> anyhow::Result<(Arc<Runtime>, tokio::sync::mpsc::UnboundedReceiver<crate::ops::TaskReport>, GossipHandle)> {
    let IpAddr::V4(local) = c.advertise else {
        bail!("--advertise-addr {}: an IPv6 underlay is not supported yet", c.advertise);
    };
    let gen = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1);
    let me = swarmnet_gossip::Ident { node: node_id.to_string(), addr: SocketAddr::new(c.advertise, c.gossip_port), gen };
    let gossip = gossip_server::start(me, swarmnet_gossip::Config::default()).await?;
    let task_mtu = base.mtu.saturating_sub(50);
    let overlay = Arc::new(Overlay::open(base.ns.clone(), &c.data_dir, local, task_mtu)?);
    let (dirty, dirty_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(crate::overlay::follow(overlay.clone(), gossip.clone(), dirty_rx));
    let dns = Arc::new(crate::dns::NodeDns::new(&c.dns)?);
    tokio::spawn(crate::dns::follow(dns.shared.clone(), gossip.clone()));
    let net = Net { overlay, gossip: gossip.clone(), dirty, vtep: c.advertise, dns };
    let (rt, reports) = Runtime::open(base.ns, net, &c.data_dir, base.mtu)?;
    Ok((rt, reports, gossip))
}

async fn node_base(c: &Common) -> anyhow::Result<NodeBase> {
    std::fs::create_dir_all(&c.data_dir).with_context(|| format!("create data dir {}", c.data_dir.display()))?;
    let ns = NsWorker::start().context("start the namespace thread")?;
    let (mtu, underlay) = underlay_facts(&ns, c.advertise).await.context("read the node's addresses")?;
    let Some(mtu) = mtu else {
        bail!("--advertise-addr {}: no interface of this node has that address", c.advertise);
    };
    Ok(NodeBase { ns, mtu, underlay })
}

pub async fn run_manager(c: Common, listen: SocketAddr, pool: Ipv4Network, heartbeat: Duration, data_path_port: u16) -> anyhow::Result<()> {
    let base = node_base(&c).await?;
    let cfg = ManagerConfig { advertise: c.advertise, pool, heartbeat, hostname: node_name(), underlay: base.underlay.clone(), data_path_port };
    let manager = Manager::open(&c.data_dir, &cfg)?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
    info!(%listen, cluster = %manager.meta.cluster_id, "manager listening");
    let first_start = Identity::load(&c.data_dir)?.is_none();
    let id = Identity {
        node_id: manager.meta.manager_node_id.clone(),
        cluster_id: manager.meta.cluster_id.clone(),
        ca_pem: manager.meta.ca.cert_pem.clone(),
        cert: manager.meta.manager_cert.clone(),
        manager: SocketAddr::new(c.advertise, listen.port()).to_string(),
    };
    id.save(&c.data_dir)?;
    if first_start {
        let token = manager.join_token()?;
        println!("To add a worker to this cluster, run on it:\n\n    swarmnet agent --join {} --token {token} --advertise-addr <its address>\n", id.manager);
    }
    tokio::spawn(manager.clone().serve(listener));
    tokio::spawn(manager.clone().watch_heartbeats());
    let (rt, reports, gossip) = node_services(&c, base, &id.node_id).await?;
    let agent = Agent::new(id, rt, reports, gossip, c.gossip_port)?;
    tokio::spawn(agent.clone().run());
    serve_control(&c.data_dir, Some(manager), agent).await
}

pub async fn run_agent(c: Common, join: String, token: Option<String>) -> anyhow::Result<()> {
    let base = node_base(&c).await?;
    let id = match Identity::load(&c.data_dir)? {
        Some(id) => {
            info!(node = %id.node_id, manager = %id.manager, "using the identity in the data dir");
            id
        }
        None => {
            let Some(token) = token else { bail!("--token is required to join (this data dir has no node identity yet)") };
            let token = JoinToken::parse(&token)?;
            agent::join(&c.data_dir, &join, &token, &node_name(), c.advertise, base.underlay.clone()).await?
        }
    };
    let (rt, reports, gossip) = node_services(&c, base, &id.node_id).await?;
    let agent = Agent::new(id, rt, reports, gossip, c.gossip_port)?;
    tokio::spawn(agent.clone().run());
    serve_control(&c.data_dir, None, agent).await
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
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let (mut conn, _) = match acc {
                    Ok(c) => c,
                    Err(e) => { warn!(error = %e, "control socket accept"); continue; }
                };
                let manager = manager.clone();
                let agent = agent.clone();
                tokio::spawn(async move {
                    let req: ApiRequest = match read_msg(&mut conn).await {
                        Ok(Some(r)) => r,
                        Ok(None) => return,
                        Err(e) => { let _ = write_msg(&mut conn, &Reply::err(format!("bad request: {e}"))).await; return; }
                    };
                    let reply = match (req, &manager) {
                        (ApiRequest::RunLocal { spec, detach }, _) => agent.run_local(spec, detach).await,
                        // Inspect works on every node: the manager's record plus what this
                        // node's gossip knows.
                        (req @ ApiRequest::NetworkInspect { .. }, m) => {
                            let r = match m {
                                Some(m) => m.api(req, Some(&agent.id.node_id)),
                                None => agent.call(req).await.unwrap_or_else(|e| Reply::err(format!("{e:#}"))),
                            };
                            with_local_endpoints(r, &agent).await
                        }
                        (req @ ApiRequest::NodeLs, Some(m)) => with_gossip_state(m.api(req, Some(&agent.id.node_id)), &agent).await,
                        (req, Some(m)) => m.api(req, Some(&agent.id.node_id)),
                        (_, None) => Reply::err("this node is not a manager"),
                    };
                    let _ = write_msg(&mut conn, &reply).await;
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("stopping; tasks keep running and are adopted at the next start");
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Adds `local_endpoints`: the network's endpoint table as this node's gossip holds it.
async fn with_local_endpoints(mut r: Reply, agent: &Agent) -> Reply {
    let Some(id) = r.data.get("id").and_then(|v| v.as_str()).map(str::to_string) else { return r };
    let eps: Vec<serde_json::Value> = agent
        .gossip
        .endpoints(&id)
        .await
        .into_iter()
        .map(|e| {
            serde_json::json!({
                "name": e.task_name,
                "task_id": e.id,
                "service": e.service_name,
                "ip": e.ip.to_string(),
                "mac": crate::model::format_mac(e.mac),
                "vtep": e.vtep.to_string(),
                "state": format!("{:?}", e.state).to_lowercase(),
            })
        })
        .collect();
    r.data["local_endpoints"] = serde_json::Value::Array(eps);
    // This node's resolvers (all tasks, all networks) since the daemon started.
    let c = &agent.runtime.dns().shared.counters;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    r.data["local_dns"] = serde_json::json!({
        "answered_locally": n(&c.local),
        "forwarded": n(&c.forwarded),
        "upstream_failures": n(&c.upstream_failures),
        "refused_or_malformed": n(&c.refused),
    });
    r
}

/// Adds each node's gossip state as this (the manager's) node sees it.
async fn with_gossip_state(mut r: Reply, agent: &Agent) -> Reply {
    let alive: std::collections::BTreeSet<String> = agent.gossip.members().await.into_iter().map(|m| m.node).collect();
    if let Some(rows) = r.data.as_array_mut() {
        for row in rows {
            let id = row["id"].as_str().unwrap_or_default().to_string();
            row["gossip"] = serde_json::Value::from(if id == agent.id.node_id || alive.contains(&id) { "alive" } else { "unreachable" });
        }
    }
    r
}
