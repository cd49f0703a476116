//! The agent's parts on one node, wired together: gossip on 7946, the overlay's sandboxes,
//! the node's DNS, membership, the one follow loop with its sinks, and the task runtime.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use swarmnet_api::TaskReport;
use swarmnet_dataplane::ingress::entry::{self, Entry};
use swarmnet_dataplane::ingress::IngressSink;
pub use swarmnet_dataplane::lb::host::Claim;
use swarmnet_dataplane::lb::host::{self, Legacy};
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
    /// How task output is stored: the log writer's command and the size cap.
    pub task_logs: crate::tasklog::LogConfig,
    /// Where to serve metrics (`--metrics-addr`; None: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to serve the read-only Docker Engine API (`--docker-api`, as given).
    pub docker_api: Vec<String>,
    /// The node's display name (`--hostname`, default the machine's hostname): `node ls`
    /// shows it. No kernel object is named after it: they are keyed by the node's id.
    pub hostname: String,
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
    /// This daemon's claim on the node's id: held for its life.
    pub claim: Claim,
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

/// The node's folders in cgroup2 and bpffs (keyed by its id), and those of the layout
/// before issue 19 that its tasks still run in, whose pins they take over.
fn prepare_host(cfg: &NodeConfig, node_id: &str, tasks: &[u32]) -> Result<(Host, Option<Legacy>), String> {
    let host = Host::prepare(node_id, cfg.bpffs.as_deref()).map_err(|e| e.to_string())?;
    let legacy = host.find_legacy(tasks);
    if let Some(l) = &legacy {
        info!(legacy_cgroup = %l.cgroup.display(), tasks = l.ours.len(), others = l.foreign, cgroup = %host.cgroup.display(), "this node's tasks run in a folder of the layout before issue 19 (named after a hostname): taking it over");
        match host.take_legacy_pins(l) {
            Ok(moved) if !moved.is_empty() => info!(folders = ?moved, "moved the pinned maps and links of the old layout into the node's own folders"),
            Ok(_) if l.foreign > 0 => warn!(legacy = %l.pins.display(), others = l.foreign, "the old folder is shared with processes of another node: its pins stay; only this node's processes move"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "the pins of the old layout could not be moved: new ones replace them"),
        }
    }
    Ok((host, legacy))
}

/// Moves this node's processes out of a folder of the old layout (into the node's cgroup,
/// under the programs attached there), then detaches what the old layout attached and
/// removes it if nothing else uses it.
fn finish_legacy(host: &Host, legacy: &Legacy, ebpf: Option<&EbpfLb>) {
    match host.move_tasks(legacy) {
        Ok(n) => info!(processes = n, cgroup = %host.cgroup.display(), "moved this node's task processes into the node's cgroup"),
        Err(e) => error!(error = %e, "could not move this node's task processes out of the old cgroup: their VIPs are translated by programs nothing updates"),
    }
    if let Some(lb) = ebpf {
        let n = lb.release_retired();
        if n > 0 {
            info!(links = n, "detached the load balancer's links of the old layout");
        }
    }
    match host.retire_legacy(legacy) {
        Ok(true) => info!(cgroup = %legacy.cgroup.display(), pins = %legacy.pins.display(), "removed the folders of the old layout"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not remove the folders of the old layout"),
    }
}

/// The load balancer, as `--lb` says: the eBPF programs attached to the node's cgroup, or
/// nftables in each task's namespace. A backend asked for by name that cannot start stops
/// the daemon; with `auto`, eBPF falls back to nftables with a warning, and if neither
/// starts the node runs on without VIPs (overlay, DNS) and says so in its log and `lb ls`.
/// Also returns the eBPF backend itself (it still holds the links it replaced).
/// A load-balancer backend as started: the backend, the node's folders (eBPF only), and the
/// eBPF backend itself (it holds the links it replaced).
type Started = (Arc<dyn LbBackend>, Option<Host>, Option<Arc<EbpfLb>>);

fn start_lb(cfg: &NodeConfig, host: &Result<(Host, Option<Legacy>), String>, ns: &NsWorker, membership: &Arc<Membership>) -> anyhow::Result<(Option<Lb>, Option<Arc<EbpfLb>>)> {
    let ebpf = || -> anyhow::Result<Started> {
        let (host, _) = host.as_ref().map_err(|e| anyhow::anyhow!("the node's cgroup and bpffs folders: {e}"))?;
        let lb = Arc::new(EbpfLb::open(host, ns.clone(), &cfg.data_dir.join("lb.lock"))?);
        Ok((lb.clone(), Some(host.clone()), Some(lb)))
    };
    let nft = || -> anyhow::Result<Started> {
        let b: Arc<dyn LbBackend> = Arc::new(NftLb::open(cfg.data_dir.join("lb-nftables.json")).map_err(anyhow::Error::msg)?);
        // Programs an earlier eBPF agent of this node left attached would translate VIPs
        // before nftables ever sees them, from maps nothing updates any more.
        if let Ok((host, _)) = host {
            match swarmnet_dataplane::lb::ebpf::detach_pinned(host) {
                Ok(0) => {}
                Ok(n) => info!(links = n, "detached the eBPF programs an earlier agent left (this one uses nftables)"),
                Err(e) => bail!("the eBPF programs an earlier agent left cannot be detached, and they would shadow nftables: {e}"),
            }
        }
        Ok((b, None, None))
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
                        return Ok((None, None));
                    }
                }
            }
        },
    };
    let (backend, host, ebpf_lb) = chosen;
    let m = membership.clone();
    let sink = LbSink::new(backend.clone(), Arc::new(move |n: &NetworkId| m.vni_of(n)));
    info!(backend = %backend.kind(), "load balancer ready");
    Ok((Some(Lb { sink, backend, host, warning }), ebpf_lb))
}

/// The routing mesh's eBPF entry on the underlay interface (ADR 0015), as `--mesh-entry`
/// says; None: clients from outside enter by the node's nftables table (ADR 0011); Err: why
/// the entry could not start.
fn start_mesh_entry(cfg: &NodeConfig, host: &Result<(Host, Option<Legacy>), String>, iface: &str) -> Result<Option<Entry>, String> {
    let detach = || match host.as_ref().map_err(|e| anyhow::anyhow!("{e}")).and_then(|(h, _)| Ok(entry::detach_pinned(&h.ingress_pins)?)) {
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
        let (host, _) = host.as_ref().map_err(|e| anyhow::anyhow!("the node's bpffs folder: {e}"))?;
        Ok(Entry::open(&host.ingress_pins, iface)?)
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
    // One daemon per node id on this machine, before anything of the node's is touched.
    let claim = host::claim(node_id, &cfg.data_dir)?;
    let IpAddr::V4(local) = cfg.advertise else {
        bail!("--advertise-addr {}: an IPv6 underlay is not supported yet", cfg.advertise);
    };
    let gen = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1);
    let me = swarmnet_gossip::Ident::new(node_id.to_string(), SocketAddr::new(cfg.advertise, cfg.gossip_port), gen);
    let gossip = gossip_server::start(me, swarmnet_gossip::Config::default()).await?;
    // Gossip is sealed (issue 11): the keys of the last run, until the manager's arrive.
    crate::gossip_keys::restore(&gossip, &cfg.data_dir);
    let task_mtu = base.mtu.saturating_sub(50);
    let sandboxes = Arc::new(Sandboxes::open(base.ns.clone(), &cfg.data_dir, local, task_mtu, cfg.holder_cmd.clone())?);
    let dns = Arc::new(NodeDns::new(&cfg.dns)?);
    let (notices_tx, notices) = mpsc::unbounded_channel();
    let fabric = Arc::new(NodeFabric { sandboxes: sandboxes.clone(), gossip: gossip.clone() });
    let membership = Arc::new(Membership::new(fabric, sandboxes.networks().await, notices_tx));
    // The node's kernel state outside its namespaces is keyed by its id (issue 19).
    let tasks: Vec<u32> = swarmnet_dataplane::task::find_task_processes(&cfg.data_dir).into_iter().map(|(_, pid, _)| pid).collect();
    let host = prepare_host(cfg, node_id, &tasks);
    let (lb, ebpf_lb) = start_lb(cfg, &host, &base.ns, &membership)?;
    if let Ok((h, Some(legacy))) = &host {
        finish_legacy(h, legacy, ebpf_lb.as_deref());
    }
    // In the order a batch reaches them: the in-memory record store first (a DNS answer
    // then never waits), the load balancer's maps, then the overlay's netlink work.
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(DnsSink::new(dns.shared.records.clone()))];
    if let Some(lb) = &lb {
        sinks.push(Box::new(lb.sink.clone()));
    }
    let overlay_stats = Arc::new(swarmnet_dataplane::overlay::sink::OverlayStats::default());
    sinks.push(Box::new(OverlaySink::new(sandboxes.clone(), cfg.advertise).with_stats(overlay_stats.clone())));
    // After the overlay: a published port is programmed once its tasks are reachable.
    // Inputs from outside the endpoint table reach a sink through the follow loop.
    let (inputs_tx, inputs) = mpsc::unbounded_channel();
    let (ingress_sink, ingress) = IngressSink::new(base.ns.clone(), cfg.advertise, start_mesh_entry(cfg, &host, &base.iface), cfg.data_dir.join("ingress.json"), inputs_tx);
    sinks.push(Box::new(ingress_sink));
    tokio::spawn(follow::follow(gossip.clone(), sinks, notices, inputs, FollowConfig::default()));
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
    let deps = Deps { sandboxes, membership, gossip: gossip.clone(), vtep: cfg.advertise, dns, lb, ingress, task_logs: cfg.task_logs.clone(), overlay_stats };
    let (runtime, reports) = Runtime::open(base.ns, deps, &cfg.data_dir, task_mtu)?;
    Ok(Node { runtime, reports, gossip, ingress: ingress_tx, claim })
}
