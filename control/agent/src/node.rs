//! The agent's parts on one node, wired together: gossip on 7946, the overlay's sandboxes,
//! the node's DNS, membership, the one follow loop with its sinks, and the task runtime.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use swarmnet_api::TaskReport;
use swarmnet_dataplane::ingress::entry::{self, Entry};
use swarmnet_dataplane::ingress::IngressSink;
use swarmnet_dataplane::lb::{EbpfError, EbpfLb, Host, LbBackend, LbSink, NftLb};
use swarmnet_dataplane::netns::NsWorker;
use swarmnet_dataplane::overlay::{OverlaySink, Sandboxes};
use swarmnet_dataplane::task::underlay_facts;
use swarmnet_dns::sink::DnsSink;
use swarmnet_gossip::server::{self as gossip_server, Cmd, GossipHandle};
use swarmnet_types::{Network, NetworkId, Sink, SinkError};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::dns::{DnsOpts, NodeDns};
use crate::follow::{self, FollowConfig};
use crate::membership::{Fabric, Membership};
use crate::runtime::{Deps, Lb, Runtime};

pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// The node's underlay address: its VTEP and its gossip address.
    pub advertise: IpAddr,
    pub gossip_port: u16,
    pub dns: DnsOpts,
    /// argv of the process that holds a sandbox namespace open.
    pub holder_cmd: Vec<String>,
    /// The node's name (its cgroup and bpffs folders are named after it).
    pub node_name: String,
    /// The bpffs to pin the load balancer in (None: the mounted one, or /sys/fs/bpf).
    pub bpffs: Option<PathBuf>,
    /// Which load-balancer backend to use.
    pub lb: LbMode,
    /// How clients from outside enter the routing mesh.
    pub mesh_entry: MeshEntry,
}

/// `--mesh-entry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshEntry {
    /// The eBPF entry with direct return if it loads, else nftables (with a warning).
    Auto,
    /// The node's nftables table only; replies go back through the entry node.
    Nftables,
}

/// `--lb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbMode {
    /// eBPF if the programs load, else nftables (with a warning).
    Auto,
    Ebpf,
    Nftables,
}

/// What the node is made of before it has an identity: the namespace thread and the
/// underlay's facts.
pub struct NodeBase {
    pub ns: NsWorker,
    pub mtu: u32,
    pub underlay: Vec<ipnetwork::IpNetwork>,
    /// The interface holding the advertise address.
    pub iface: String,
}

impl NodeBase {
    pub async fn read(cfg: &NodeConfig) -> anyhow::Result<NodeBase> {
        std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("create data dir {}", cfg.data_dir.display()))?;
        let ns = NsWorker::start().context("start the namespace thread")?;
        let (mtu, underlay) = underlay_facts(&ns, cfg.advertise).await.context("read the node's addresses")?;
        let Some((mtu, iface)) = mtu else {
            bail!("--advertise-addr {}: no interface of this node has that address", cfg.advertise);
        };
        Ok(NodeBase { ns, mtu, underlay, iface })
    }
}

pub struct Node {
    pub runtime: Arc<Runtime>,
    pub reports: mpsc::UnboundedReceiver<TaskReport>,
    pub gossip: GossipHandle,
    /// The manager's word on the node's place on the ingress network goes here.
    pub ingress: tokio::sync::watch::Sender<Option<swarmnet_api::NodeIngress>>,
}

/// The sandbox and the gossip of a network, as membership joins and leaves them.
struct NodeFabric {
    sandboxes: Arc<Sandboxes>,
    gossip: GossipHandle,
}

#[async_trait::async_trait]
impl Fabric for NodeFabric {
    async fn join(&self, net: &Network) -> Result<bool, SinkError> {
        let made = self.sandboxes.ensure(net).await?;
        self.gossip.send(Cmd::Join(net.id.clone())).map_err(|e| format!("network {} vni {}: join its gossip: {e}", net.name, net.vni))?;
        Ok(made)
    }

    async fn leave(&self, net: &NetworkId) {
        if self.gossip.send(Cmd::Leave(net.clone())).is_err() {
            error!(network = %net, "gossip is not running: cannot leave the network's gossip");
        }
        self.sandboxes.remove(net).await;
    }
}

/// The load balancer, as `--lb` says: the eBPF programs attached to the node's cgroup, or
/// nftables in each task's namespace. A backend asked for by name that cannot start stops
/// the daemon; with `auto`, eBPF falls back to nftables with a warning, and if neither
/// starts the node runs on without VIPs (overlay, DNS) and says so in its log and `lb ls`.
fn start_lb(cfg: &NodeConfig, ns: &NsWorker, membership: &Arc<Membership>) -> anyhow::Result<Option<Lb>> {
    let ebpf = || -> anyhow::Result<(Arc<dyn LbBackend>, Option<Host>)> {
        let host = Host::prepare(&cfg.node_name, cfg.bpffs.as_deref())?;
        let b: Arc<dyn LbBackend> = Arc::new(EbpfLb::open(&host, ns.clone(), &cfg.data_dir.join("lb.lock"))?);
        Ok((b, Some(host)))
    };
    let nft = || -> anyhow::Result<(Arc<dyn LbBackend>, Option<Host>)> {
        let b: Arc<dyn LbBackend> = Arc::new(NftLb::open(ns.clone()).map_err(anyhow::Error::msg)?);
        // Programs an earlier eBPF agent of this node left attached would translate VIPs
        // before nftables ever sees them, from maps nothing updates any more.
        if let Ok(host) = Host::prepare(&cfg.node_name, cfg.bpffs.as_deref()) {
            match swarmnet_dataplane::lb::ebpf::detach_pinned(&host) {
                Ok(0) => {}
                Ok(n) => info!(links = n, "detached the eBPF programs an earlier agent left (this one uses nftables)"),
                Err(e) => bail!("the eBPF programs an earlier agent left cannot be detached, and they would shadow nftables: {e}"),
            }
        }
        Ok((b, None))
    };
    let (chosen, warning) = match cfg.lb {
        LbMode::Ebpf => (ebpf().context("--lb ebpf")?, None),
        LbMode::Nftables => (nft().context("--lb nftables")?, None),
        LbMode::Auto => match ebpf() {
            Ok(b) => (b, None),
            // Another agent runs this node's load balancer: falling back would fight it.
            Err(e) if e.downcast_ref::<EbpfError>().is_some_and(|e| matches!(e, EbpfError::Locked(_))) => return Err(e),
            Err(e) => {
                let why = format!("the eBPF load balancer cannot start here ({e:#}): using nftables");
                warn!("{why}");
                match nft() {
                    Ok(b) => (b, Some(why)),
                    Err(e2) => {
                        error!(ebpf = %format!("{e:#}"), nftables = %format!("{e2:#}"), "no load balancer can start on this node: service VIPs will not answer");
                        return Ok(None);
                    }
                }
            }
        },
    };
    let (backend, host) = chosen;
    let m = membership.clone();
    let sink = LbSink::new(backend.clone(), Arc::new(move |n: &NetworkId| m.vni_of(n)));
    info!(backend = %backend.kind(), "load balancer ready");
    Ok(Some(Lb { sink, backend, host, warning }))
}

/// The routing mesh's eBPF entry on the underlay interface (ADR 0015), as `--mesh-entry`
/// says; None: clients from outside enter by the node's nftables table (ADR 0011); Err: why
/// the entry could not start.
fn start_mesh_entry(cfg: &NodeConfig, iface: &str) -> Result<Option<Entry>, String> {
    let detach = || match Host::prepare(&cfg.node_name, cfg.bpffs.as_deref()).map_err(anyhow::Error::from).and_then(|h| Ok(entry::detach_pinned(&h.pins)?)) {
        Ok(true) => info!("routing mesh: detached the eBPF entry an earlier agent left"),
        Ok(false) => {}
        Err(e) => error!(error = %format!("{e:#}"), "routing mesh: the eBPF entry an earlier agent left cannot be detached: it keeps handing flows out from maps nothing updates"),
    };
    if cfg.mesh_entry == MeshEntry::Nftables {
        detach();
        info!("routing mesh: clients enter by nftables (--mesh-entry nftables), replies go back through the entry node");
        return Ok(None);
    }
    let open = || -> anyhow::Result<Entry> {
        let host = Host::prepare(&cfg.node_name, cfg.bpffs.as_deref())?;
        Ok(Entry::open(&host.pins, iface)?)
    };
    match open() {
        Ok(e) => Ok(Some(e)),
        Err(e) => {
            warn!(iface, error = %format!("{e:#}"), "routing mesh: the eBPF entry cannot start here: clients enter by nftables, replies go back through the entry node");
            detach();
            Err(format!("{e:#}"))
        }
    }
}

/// Starts the node's parts; the session with the manager is started by the caller.
pub async fn start(cfg: &NodeConfig, base: NodeBase, node_id: &str) -> anyhow::Result<Node> {
    let IpAddr::V4(local) = cfg.advertise else {
        bail!("--advertise-addr {}: an IPv6 underlay is not supported yet", cfg.advertise);
    };
    let gen = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1);
    let me = swarmnet_gossip::Ident { node: node_id.to_string(), addr: SocketAddr::new(cfg.advertise, cfg.gossip_port), gen };
    let gossip = gossip_server::start(me, swarmnet_gossip::Config::default()).await?;
    // Gossip is sealed (issue 11): the keys of the last run, until the manager's arrive.
    crate::gossip_keys::restore(&gossip, &cfg.data_dir);
    let task_mtu = base.mtu.saturating_sub(50);
    let sandboxes = Arc::new(Sandboxes::open(base.ns.clone(), &cfg.data_dir, local, task_mtu, cfg.holder_cmd.clone())?);
    let dns = Arc::new(NodeDns::new(&cfg.dns)?);
    let (notices_tx, notices) = mpsc::unbounded_channel();
    let fabric = Arc::new(NodeFabric { sandboxes: sandboxes.clone(), gossip: gossip.clone() });
    let membership = Arc::new(Membership::new(fabric, sandboxes.networks().await, notices_tx));
    let lb = start_lb(cfg, &base.ns, &membership)?;
    // In the order a batch reaches them: the in-memory record store first (a DNS answer
    // then never waits), the load balancer's maps, then the overlay's netlink work.
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(DnsSink::new(dns.shared.records.clone()))];
    if let Some(lb) = &lb {
        sinks.push(Box::new(lb.sink.clone()));
    }
    sinks.push(Box::new(OverlaySink::new(sandboxes.clone(), cfg.advertise)));
    // After the overlay: a published port is programmed once its tasks are reachable.
    let ingress = IngressSink::new(base.ns.clone(), cfg.advertise, start_mesh_entry(cfg, &base.iface));
    sinks.push(Box::new(ingress.clone()));
    tokio::spawn(follow::follow(gossip.clone(), sinks, notices, FollowConfig::default()));
    let (ingress_tx, ingress_rx) = tokio::sync::watch::channel(None);
    let ingress_deps = crate::ingress::NodeIngressDeps {
        ns: base.ns.clone(),
        sandboxes: sandboxes.clone(),
        membership: membership.clone(),
        gossip: gossip.clone(),
        sink: ingress.clone(),
        node_id: node_id.to_string(),
        vtep: cfg.advertise,
        mtu: task_mtu,
    };
    tokio::spawn(crate::ingress::run(ingress_deps, ingress_rx));
    let deps = Deps { sandboxes, membership, gossip: gossip.clone(), vtep: cfg.advertise, dns, lb, ingress };
    let (runtime, reports) = Runtime::open(base.ns, deps, &cfg.data_dir, task_mtu)?;
    Ok(Node { runtime, reports, gossip, ingress: ingress_tx })
}
