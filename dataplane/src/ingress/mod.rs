//! The ingress routing mesh (issue 10, ADR 0011): a published port answers on every node
//! and spreads new connections over the service's tasks on all nodes, over the ingress
//! network, keeping the client's address.
//!
//! - [`rules`]: the node's and the tasks' nftables tables as text, from the ingress
//!   network's endpoints (pure);
//! - this module: the node's port into the ingress network (`sning0`, holding the
//!   network's gateway and the node's own ingress address), and [`IngressSink`], the mesh's
//!   sink of the endpoint stream, which programs the node's table and the reply tables of
//!   the node's tasks.

pub mod entry;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use swarmnet_types::{is_ingress_node_endpoint, Change, Endpoint, NetworkId, Protocol, PublishMode, Resync, Sink, SinkError, SinkInput, TaskId};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::netns::{NsError, NsWorker};
use crate::overlay::Sandboxes;
use rules::{NODE_IF, NODE_PEER_IF, TABLE};

/// This node's place on the ingress network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Me {
    pub network: NetworkId,
    pub name: String,
    pub vni: u32,
    pub address: Ipv4Addr,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// The cluster's VXLAN port: encapsulated packets skip connection tracking.
    pub vxlan_port: u16,
    /// The ingress network's MTU (of the node's port into it).
    pub mtu: u32,
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NsError> {
    std::fs::write(path, value).map_err(|e| NsError::Io(std::io::Error::new(e.kind(), format!("write {value} to {path}: {e}"))))
}

/// Makes the node's port into the ingress network: a veth whose node end `sning0` holds the
/// network's gateway (the default route of the node's publishing tasks) and the node's own
/// ingress address (/32), and whose other end is on the ingress sandbox's bridge. Also
/// turns on forwarding, and `route_localnet` on `sning0` (a connection to
/// `localhost:PORT` is DNATed out of it). Idempotent: a port an earlier agent made is kept.
pub async fn plug_node_port(ns: &NsWorker, sandboxes: &Sandboxes, me: &Me, mtu: u32) -> Result<(), SinkError> {
    let m = me.clone();
    let exists = ns.run(move |ctx| ctx.block_on(ctx.home().link(NODE_IF)).map(|l| l.is_some())).await.map_err(|e| format!("ingress network {} vni {}: look for {NODE_IF}: {e}", m.name, m.vni))??;
    let replug = exists && sandboxes.plug(&me.network, NODE_PEER_IF).await.is_ok();
    if !replug {
        ns.run(move |ctx| {
            ctx.block_on(async {
                ctx.home().delete_link(NODE_IF).await?;
                ctx.home().create_veth(NODE_IF, NODE_PEER_IF).await?;
                ctx.home().configure_link(NODE_PEER_IF, None, None, Some(mtu)).await
            })
        })
        .await
        .map_err(|e| format!("ingress network {} vni {}: make {NODE_IF}: {e}", me.name, me.vni))?
        .map_err(|e| format!("ingress network {} vni {}: make {NODE_IF}: {e}", me.name, me.vni))?;
        sandboxes.plug(&me.network, NODE_PEER_IF).await.map_err(|e| format!("ingress network {}: plug {NODE_PEER_IF}: {e}", me.name))?;
    }
    let m = me.clone();
    ns.run(move |ctx| {
        ctx.block_on(async {
            let mac = swarmnet_types::mac_for(m.address);
            ctx.home().configure_link(NODE_IF, None, Some(mac), Some(mtu)).await?;
            ctx.home().add_address(NODE_IF, m.gateway.into(), m.subnet.prefix()).await?;
            ctx.home().add_address(NODE_IF, m.address.into(), 32).await
        })
    })
    .await
    .map_err(|e| format!("ingress network {} vni {}: configure {NODE_IF}: {e}", me.name, me.vni))?
    .map_err(|e| format!("ingress network {} vni {}: configure {NODE_IF} ({}): {e}", me.name, me.vni, me.address))?;
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_forward".to_string(), "1"),
        (format!("/proc/sys/net/ipv4/conf/{NODE_IF}/route_localnet"), "1"),
        (format!("/proc/sys/net/ipv4/conf/{NODE_IF}/send_redirects"), "0"),
        (format!("/proc/sys/net/ipv4/conf/{NODE_IF}/rp_filter"), "0"),
        // A task's reply to a client that entered by this node's eBPF entry has this node's
        // own address as its source (ADR 0015).
        (format!("/proc/sys/net/ipv4/conf/{NODE_IF}/accept_local"), "1"),
    ] {
        write_sysctl(&path, value).map_err(|e| format!("ingress network {}: {e}", me.name))?;
    }
    Ok(())
}

/// Removes the node's port into the ingress network (its peer goes with it).
pub async fn unplug_node_port(ns: &NsWorker) -> Result<(), SinkError> {
    ns.run(|ctx| ctx.block_on(ctx.home().delete_link(NODE_IF))).await??;
    Ok(())
}

/// Applies `tx` in the daemon's own namespace (the node's).
async fn nft_home(tx: &crate::nft::Tx) -> Result<(), SinkError> {
    Ok(crate::nft::apply(None, tx).await?)
}

/// One row of `lb ls` for a published port: read back from the node's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRow {
    pub port: u16,
    pub protocol: Protocol,
    pub mode: PublishMode,
    pub service: String,
    /// (task name, address, target port, state, connections handed to it)
    pub backends: Vec<(String, Ipv4Addr, u16, bool, u64)>,
}

struct TaskNs {
    netns: File,
    ifname: String,
    applied: Option<String>,
}

struct State {
    me: Option<Me>,
    /// Endpoints with published ports, and nodes' ingress endpoints, of every network
    /// (the ingress network may be known only after its endpoints arrived).
    endpoints: BTreeMap<NetworkId, BTreeMap<TaskId, Arc<Endpoint>>>,
    /// Networks completely resynced since this agent started.
    complete: BTreeSet<NetworkId>,
    /// The ingress endpoints an earlier agent programmed (its record): until the ingress
    /// network's first complete resync they stay programmed beside what the table says, so
    /// a restart never takes a published port's task away; what the table adds is programmed
    /// at once (a warm-up holds back deletions, never additions).
    adopted: BTreeMap<TaskId, Endpoint>,
    /// No record was found but the kernel holds an earlier agent's table (an agent from
    /// before the record existed): the table is left as it is until the ingress network's
    /// first complete resync, as then. None: not checked yet.
    unrecorded_table: Option<bool>,
    /// Whether a record was found at the start.
    recorded: bool,
    node_applied: Option<String>,
    tasks: BTreeMap<TaskId, TaskNs>,
    /// Why the node's table could not be programmed last time.
    failed: Option<String>,
    /// Published ports a local process was found bound to (warned about once).
    shadowed: BTreeSet<(Protocol, u16)>,
}

/// The routing mesh's sink. The follow loop owns it (one writer, ADR 0008): the endpoint
/// stream reaches it as to every sink, and everything else (the node's place on the ingress
/// network, the runtime's tasks, `lb ls`) through its [`IngressHandle`], delivered by the
/// follow loop between batches.
pub struct IngressSink {
    core: Core,
    state: State,
}

/// What the sink works with (fixed at the start) and publishes.
struct Core {
    ns: NsWorker,
    local_vtep: IpAddr,
    /// The sink's record of the ingress endpoints it programmed (`<data-dir>/ingress.json`).
    record: PathBuf,
    /// The eBPF entry program (ADR 0015); None: every published port goes by the node's
    /// nftables table, replies back through the entry node (ADR 0011).
    entry: Option<Arc<std::sync::Mutex<entry::Entry>>>,
    /// Why the eBPF entry did not start, if it was wanted.
    entry_warning: Option<String>,
    /// What keeps the mesh from working fully here now (the session tells the manager).
    warnings: tokio::sync::watch::Sender<Vec<MeshProblem>>,
}

/// The node's published ports as `lb ls` shows them, and what keeps them from working fully.
pub type Ports = (Vec<PortRow>, Option<String>);

/// What reaches the sink from outside the endpoint table (see [`IngressHandle`]).
enum Input {
    SetMe(Option<Me>, oneshot::Sender<Result<(), SinkError>>),
    AddTask { task: TaskId, netns: File, ifname: String, done: oneshot::Sender<Result<(), SinkError>> },
    RemoveTask(TaskId),
    Read(oneshot::Sender<Result<Ports, SinkError>>),
}

/// The way to the routing mesh's sink for everything but the endpoint stream: its inputs go
/// to the follow loop, which hands them to the sink between batches (cheap to clone).
#[derive(Clone)]
pub struct IngressHandle {
    tx: mpsc::UnboundedSender<SinkInput>,
    warnings: tokio::sync::watch::Receiver<Vec<MeshProblem>>,
    ebpf_entry: bool,
}

const SINK: &str = "ingress";

impl IngressHandle {
    fn send(&self, i: Input) -> Result<(), SinkError> {
        self.tx.send(SinkInput { sink: SINK, input: Box::new(i) }).map_err(|_| "routing mesh: the follow loop has stopped".into())
    }

    async fn ask<R>(&self, make: impl FnOnce(oneshot::Sender<Result<R, SinkError>>) -> Input) -> Result<R, SinkError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| SinkError::from("routing mesh: the follow loop dropped the request"))?
    }

    /// The node is on the ingress network at `me` (None: it is not, its table goes).
    pub async fn set_me(&self, me: Option<Me>) -> Result<(), SinkError> {
        self.ask(|done| Input::SetMe(me, done)).await
    }

    /// A task's namespace with its interface on the ingress network: replies of the
    /// connections that reach it there go back through their entry node.
    pub async fn add_task(&self, task: &TaskId, netns: &File, ifname: &str) -> Result<(), SinkError> {
        let netns = netns.try_clone()?;
        self.ask(|done| Input::AddTask { task: task.clone(), netns, ifname: ifname.to_string(), done }).await
    }

    /// The task is gone: its namespace is forgotten.
    pub fn remove_task(&self, task: &TaskId) {
        let _ = self.send(Input::RemoveTask(task.clone()));
    }

    /// This node's published ports as the kernel holds them (`lb ls`), with the service
    /// and mode the sink knows them by, and what keeps them from working fully.
    pub async fn read(&self) -> Result<Ports, SinkError> {
        self.ask(Input::Read).await
    }

    /// The node's mesh problems as they change.
    pub fn warnings(&self) -> tokio::sync::watch::Receiver<Vec<MeshProblem>> {
        self.warnings.clone()
    }

    /// True if clients from outside enter this node by the eBPF entry (direct return);
    /// else by the node's nftables table (`lb ls`).
    pub fn has_ebpf_entry(&self) -> bool {
        self.ebpf_entry
    }
}

/// One routing-mesh problem of this node: about one published port, or all of them.
pub type MeshProblem = (Option<(Protocol, u16)>, String);

impl IngressSink {
    /// `entry`: the eBPF entry, or why it did not start (None: not wanted). `record`: where
    /// the sink keeps what it programmed, for the next agent. `inputs`: the follow loop's
    /// inputs, where the handle sends.
    pub fn new(ns: NsWorker, local_vtep: IpAddr, entry: Result<Option<entry::Entry>, String>, record: PathBuf, inputs: mpsc::UnboundedSender<SinkInput>) -> (IngressSink, IngressHandle) {
        let (adopted, recorded): (BTreeMap<TaskId, Endpoint>, bool) = match crate::state::read_json::<Vec<Endpoint>>(&record) {
            Ok(eps) => (eps.iter().flatten().map(|e| (e.id.clone(), e.clone())).collect(), eps.is_some()),
            Err(e) => {
                warn!(error = %e, "routing mesh: the record of the published ports an earlier agent programmed cannot be read");
                (BTreeMap::new(), false)
            }
        };
        let state = State {
            me: None,
            endpoints: BTreeMap::new(),
            complete: BTreeSet::new(),
            adopted,
            unrecorded_table: None,
            recorded,
            node_applied: None,
            tasks: BTreeMap::new(),
            failed: None,
            shadowed: BTreeSet::new(),
        };
        let (entry, entry_warning) = match entry {
            Ok(e) => (e, None),
            Err(why) => (None, Some(format!("the eBPF entry could not start ({why}): clients from outside enter by nftables, replies go back through the entry node"))),
        };
        let (warnings, warnings_rx) = tokio::sync::watch::channel(Vec::new());
        let handle = IngressHandle { tx: inputs, warnings: warnings_rx, ebpf_entry: entry.is_some() };
        let core = Core { ns, local_vtep, record, entry: entry.map(|e| Arc::new(std::sync::Mutex::new(e))), entry_warning, warnings };
        core.publish_warnings(None, &BTreeSet::new());
        (IngressSink { core, state }, handle)
    }

    /// The node is on the ingress network at `me` (None: it is not, its table goes).
    async fn set_me(&mut self, me: Option<Me>) -> Result<(), SinkError> {
        let st = &mut self.state;
        if st.me == me {
            return Ok(());
        }
        st.me = me;
        self.core.configure_entry(st.me.as_ref()).await?;
        if st.me.is_none() {
            st.node_applied = None;
            nft_home(&rules::node_table_delete()).await?;
            info!("routing mesh: no ingress network, published ports removed");
            return Ok(());
        }
        self.core.program(st, true).await
    }

    async fn add_task(&mut self, task: TaskId, netns: File, ifname: String) -> Result<(), SinkError> {
        let st = &mut self.state;
        st.tasks.insert(task.clone(), TaskNs { netns, ifname, applied: None });
        let entries = Core::entries(st);
        self.core.program_task(st, &task, &entries).await
    }
}

impl Core {
    fn publish_warnings(&self, failed: Option<&String>, shadowed: &BTreeSet<(Protocol, u16)>) {
        let mut now: Vec<MeshProblem> = self.entry_warning.iter().chain(failed).map(|w| (None, w.clone())).collect();
        for (proto, port) in shadowed {
            now.push((Some((*proto, *port)), format!("a process on this node is bound to published port {port}/{proto}: the routing mesh takes the port first, it gets none of its connections")));
        }
        self.warnings.send_if_modified(|cur| {
            let changed = *cur != now;
            if changed {
                *cur = now;
            }
            changed
        });
    }

    /// Runs `f` on the entry program, off the async threads; Ok(None) without one.
    async fn with_entry<R: Send + 'static>(&self, f: impl FnOnce(&mut entry::Entry) -> Result<R, crate::lb::EbpfError> + Send + 'static) -> Result<Option<R>, SinkError> {
        let Some(e) = self.entry.clone() else { return Ok(None) };
        let r = tokio::task::spawn_blocking(move || f(&mut e.lock().unwrap_or_else(|p| p.into_inner()))).await.map_err(|e| format!("routing mesh: eBPF entry worker: {e}"))?;
        Ok(Some(r.map_err(|e| format!("routing mesh: eBPF entry: {e}"))?))
    }

    /// Points the entry program at the node's port into the ingress network (or at nothing).
    async fn configure_entry(&self, me: Option<&Me>) -> Result<(), SinkError> {
        if self.entry.is_none() {
            return Ok(());
        }
        let to = match (me, self.local_vtep) {
            (Some(m), IpAddr::V4(vtep)) => {
                let uplink = self.entry.as_ref().map(|e| e.lock().unwrap_or_else(|p| p.into_inner()).iface.clone()).unwrap_or_default();
                let (port, up) = self
                    .ns
                    .run(move |ctx| ctx.block_on(async { Ok::<_, crate::netlink::Error>((ctx.home().link(NODE_IF).await?, ctx.home().link(&uplink).await?)) }))
                    .await
                    .map_err(|e| format!("ingress network {}: look for {NODE_IF}: {e}", m.name))??;
                let port = port.ok_or_else(|| format!("ingress network {}: {NODE_IF} is missing", m.name))?;
                let up = up.ok_or_else(|| format!("ingress network {}: the underlay interface is missing", m.name))?;
                Some(entry::EntryConfig { vtep, uplink_index: up.index, port_index: port.index, port_mac: swarmnet_types::mac_for(m.address), mtu: m.mtu, vni: m.vni, vxlan_port: m.vxlan_port })
            }
            _ => None,
        };
        let clear = to.is_none();
        self.with_entry(move |e| {
            e.configure(to.as_ref())?;
            if clear {
                e.set(&BTreeMap::new())?;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// The ingress network's endpoints to program: the table's, and until its first complete
    /// resync, those an earlier agent programmed that the table has not spoken of.
    fn ingress_endpoints(st: &State) -> Vec<Endpoint> {
        let Some(me) = &st.me else { return Vec::new() };
        let mut eps: BTreeMap<TaskId, Endpoint> = st.endpoints.get(&me.network).into_iter().flatten().map(|(id, e)| (id.clone(), Endpoint::clone(e))).collect();
        if !st.complete.contains(&me.network) {
            for (id, e) in st.adopted.iter().filter(|(_, e)| e.network == me.network) {
                eps.entry(id.clone()).or_insert_with(|| e.clone());
            }
        }
        eps.into_values().collect()
    }

    fn entries(st: &State) -> Vec<Ipv4Addr> {
        let mut e = rules::entry_nodes(&Self::ingress_endpoints(st));
        // This node is an entry point before its own endpoint comes back from gossip.
        if let Some(me) = &st.me {
            if !e.contains(&me.address) {
                e.push(me.address);
                e.sort();
            }
        }
        e
    }

    async fn program_task(&self, st: &mut State, task: &TaskId, entries: &[Ipv4Addr]) -> Result<(), SinkError> {
        let own = st.me.as_ref().and_then(|m| st.endpoints.get(&m.network)).and_then(|eps| eps.get(task)).map(|e| rules::direct_return(e)).unwrap_or_default();
        let Some(t) = st.tasks.get_mut(task) else { return Ok(()) };
        let tx = rules::task_tables(&t.ifname, entries, &own);
        let text = tx.json();
        if t.applied.as_ref() == Some(&text) {
            return Ok(());
        }
        // Applied by a child that enters the task's namespace: the namespace worker never
        // waits on nft.
        crate::nft::apply(Some(&t.netns), &tx).await.map_err(|e| format!("task {task}: {e}"))?;
        t.applied = Some(text);
        Ok(())
    }

    /// Brings the node's table and every task's reply tables in step with what is known.
    /// Local processes bound to published ports are looked for when the table is written,
    /// and with `check_bound` (complete resyncs) also when it is unchanged: not on every
    /// batch of changes, since it reads the node's whole socket tables.
    async fn program(&self, st: &mut State, check_bound: bool) -> Result<(), SinkError> {
        let Some(me) = st.me.clone() else { return Ok(()) };
        let mut errors = Vec::new();
        // Programmed as soon as the node is on the ingress network: what an earlier agent
        // programmed stays beside it until the network's first complete resync.
        if !st.complete.contains(&me.network) && !st.recorded && st.unrecorded_table.is_none() {
            let exists = matches!(crate::nft::list_table(None, crate::nft::NfFamily::IP, TABLE).await, Ok(Some(_)));
            st.unrecorded_table = Some(exists);
        }
        if st.complete.contains(&me.network) || st.unrecorded_table != Some(true) {
            let eps = Self::ingress_endpoints(st);
            let published = rules::plan(&eps, self.local_vtep);
            let tx = rules::node_table(&published, me.address, me.subnet, me.vxlan_port, &rules::node_vteps(&eps));
            let text = tx.json();
            if st.node_applied.as_ref() == Some(&text) {
                if check_bound {
                    Self::warn_shadowed(st, &published);
                }
            } else {
                match nft_home(&tx).await {
                    Ok(()) => {
                        info!(ports = published.len(), "routing mesh: published ports programmed");
                        st.node_applied = Some(text);
                        st.failed = None;
                        Self::warn_shadowed(st, &published);
                        if let Err(e) = crate::state::write_json(&self.record, &eps, 0o600) {
                            warn!(error = %e, "routing mesh: cannot record the published ports programmed (the next agent starts from the table)");
                        }
                    }
                    Err(e) => {
                        let e = format!("ingress network {} vni {}: program the node's table: {e}", me.name, me.vni);
                        st.failed = Some(e.clone());
                        errors.push(e);
                    }
                }
            }
            let want = rules::entry_ports(&published);
            if let Err(e) = self.with_entry(move |e| e.set(&want)).await {
                errors.push(format!("ingress network {} vni {}: {e}", me.name, me.vni));
            }
        }
        let entries = Self::entries(st);
        let ids: Vec<TaskId> = st.tasks.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.program_task(st, &id, &entries).await {
                // A task that is going away loses its namespace first: not this sink's fault.
                warn!(task = %id, error = %e, "routing mesh: a task's reply tables could not be programmed");
            }
        }
        self.publish_warnings(st.failed.as_ref(), &st.shadowed);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; ").into())
        }
    }

    /// A process on the node bound to a published port gets none of its traffic (the mesh's
    /// DNAT comes first): say so, once per port, instead of letting it wonder.
    fn warn_shadowed(st: &mut State, published: &[rules::Published]) {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let tcp = read("/proc/net/tcp") + &read("/proc/net/tcp6").lines().skip(1).map(|l| format!("{l}\n")).collect::<String>();
        let udp = read("/proc/net/udp") + &read("/proc/net/udp6").lines().skip(1).map(|l| format!("{l}\n")).collect::<String>();
        let bound: BTreeSet<(Protocol, u16)> = rules::bound_ports(&tcp, &udp).into_iter().collect();
        let now: BTreeSet<(Protocol, u16)> = published.iter().map(|p| (p.protocol, p.port)).filter(|k| bound.contains(k)).collect();
        for (proto, port) in now.difference(&st.shadowed) {
            let svc = published.iter().find(|p| p.protocol == *proto && p.port == *port).map(|p| p.service.as_str()).unwrap_or_default();
            warn!(port = *port, protocol = %proto, service = svc, "a process on this node is bound to a published port: the routing mesh takes the port first, that process gets none of its connections");
        }
        st.shadowed = now;
    }

    /// This node's published ports as the kernel holds them (`lb ls`), with the service
    /// and mode the sink knows them by. An error if the table cannot be read.
    async fn read(&self, st: &State) -> Result<Ports, SinkError> {
        let published = match &st.me {
            Some(_) => rules::plan(&Self::ingress_endpoints(st), self.local_vtep),
            None => Vec::new(),
        };
        let mut warnings: Vec<String> = st.failed.iter().cloned().collect();
        for (proto, port) in &st.shadowed {
            warnings.push(format!("a process on this node is bound to published port {port}/{proto}: the routing mesh takes the port first, it gets none of its connections"));
        }
        let failed = (!warnings.is_empty()).then(|| warnings.join("; "));
        let Some(objs) = crate::nft::list_table(None, crate::nft::NfFamily::IP, TABLE).await? else {
            // No table: no published port answers on this node.
            return Ok((Vec::new(), failed));
        };
        let mut counts = rules::counts(&objs, &published);
        // Flows the eBPF entry handed out never met the table's counters.
        if let Some(handed) = self.with_entry(|e| e.handed()).await? {
            rules::add_entry_counts(&mut counts, &published, &handed);
        }
        let mut rows: Vec<PortRow> = Vec::new();
        for p in &published {
            let backends = p
                .backends
                .iter()
                .map(|b| {
                    let c = counts.iter().find(|c| c.protocol == p.protocol && c.port == p.port && c.ip == b.ip && c.target == b.port).map(|c| c.connections);
                    (b.task.clone(), b.ip, b.port, b.active && c.is_some(), c.unwrap_or(0))
                })
                .collect();
            rows.push(PortRow { port: p.port, protocol: p.protocol, mode: p.mode, service: p.service.clone(), backends });
        }
        // What an earlier agent programmed is in the plan until the first complete resync
        // (its record, ADR 0019): nothing the table holds is unknown to the sink.
        Ok((rows, failed))
    }

    fn keep(e: &Endpoint) -> bool {
        !e.ports.is_empty() || is_ingress_node_endpoint(&e.id)
    }
}

#[async_trait::async_trait]
impl Sink for IngressSink {
    fn name(&self) -> &'static str {
        SINK
    }

    async fn apply(&mut self, changes: &[Change]) -> Result<(), SinkError> {
        let st = &mut self.state;
        let mut touched = false;
        for c in changes {
            let net = st.endpoints.entry(c.network.clone()).or_default();
            let had = net.remove(&c.id).is_some();
            let kept = match &c.new {
                Some(e) if Core::keep(e) => {
                    net.insert(c.id.clone(), e.clone());
                    true
                }
                _ => false,
            };
            touched |= (had || kept) && st.me.as_ref().is_none_or(|m| m.network == c.network);
        }
        if touched {
            self.core.program(st, false).await
        } else {
            Ok(())
        }
    }

    async fn resync(&mut self, network: &NetworkId, endpoints: &[Arc<Endpoint>], how: Resync) -> Result<(), SinkError> {
        let st = &mut self.state;
        let net = st.endpoints.entry(network.clone()).or_default();
        if how == Resync::Complete {
            net.clear();
        }
        for e in endpoints.iter().filter(|e| Core::keep(e)) {
            net.insert(e.id.clone(), e.clone());
        }
        if how == Resync::Complete {
            st.complete.insert(network.clone());
            st.adopted.retain(|_, e| &e.network != network);
        }
        if st.me.as_ref().is_some_and(|m| &m.network == network) {
            self.core.program(st, how == Resync::Complete).await
        } else {
            Ok(())
        }
    }

    async fn forget(&mut self, network: &NetworkId) -> Result<(), SinkError> {
        self.state.endpoints.remove(network);
        self.state.complete.remove(network);
        Ok(())
    }

    async fn input(&mut self, input: Box<dyn std::any::Any + Send>) -> Result<(), SinkError> {
        let input = input.downcast::<Input>().map_err(|_| "routing mesh: an input of another sink")?;
        match *input {
            Input::SetMe(me, done) => {
                let _ = done.send(self.set_me(me).await);
            }
            Input::AddTask { task, netns, ifname, done } => {
                let _ = done.send(self.add_task(task, netns, ifname).await);
            }
            Input::RemoveTask(task) => {
                self.state.tasks.remove(&task);
            }
            Input::Read(done) => {
                let _ = done.send(self.core.read(&self.state).await);
            }
        }
        Ok(())
    }
}
