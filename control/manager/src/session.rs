//! A node's session on 2377: what the manager tells a node and when. The protocol is pure
//! ([`Snapshot`] of what the node should know, [`Sent`] of what it was told, the messages
//! between them), tested without a socket; [`Manager::session`] runs it over a connection.
//!
//! Order at the start: the gossip keys first (the node's gossip says nothing until it has
//! them), then every assignment (`full`), the ready nodes, the VIPs, the node's place on the
//! ingress network. Then, at every change of the state, only what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use swarmnet_api::*;
use tracing::info;

use crate::model::*;
use crate::ops;
use crate::server::Manager;

/// What a node should know now.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub assignments: BTreeMap<Id, Assignment>,
    /// Tasks of the node that should stop and have not been reported stopped.
    pub stopping: BTreeSet<Id>,
    pub nodes: Vec<(Id, IpAddr)>,
    pub vips: Vec<ServiceVip>,
    pub keys: GossipKeySet,
    pub ingress: Option<NodeIngress>,
    /// The managers (`host:port`), the leader first.
    pub managers: Vec<String>,
}

impl Snapshot {
    /// What `node` should know of `st`, with the cluster's gossip keys `keys`, from the
    /// manager `leader`.
    pub fn of(st: &ClusterState, node: &Id, keys: GossipKeySet, leader: &Id) -> Snapshot {
        Snapshot {
            assignments: assignments(st, node),
            stopping: shutting_down(st, node),
            nodes: ready_nodes(st),
            vips: vips(st),
            keys,
            ingress: node_ingress(st, node),
            managers: managers(st, leader),
        }
    }
}

/// What a node has been told.
pub struct Sent(Snapshot);

impl Sent {
    /// The messages that open a session, and what they told.
    pub fn open(now: Snapshot) -> (Vec<FromManager>, Sent) {
        let msgs = vec![
            FromManager::GossipKeys { keys: now.keys.keys.clone(), send: now.keys.send },
            // Removals are also sent for tasks the node may never have seen (made and removed
            // between two notifications): it answers "shutdown" for those it does not have.
            FromManager::Assign { full: true, upsert: now.assignments.values().cloned().collect(), remove: now.stopping.iter().cloned().collect() },
            FromManager::Nodes { nodes: now.nodes.clone() },
            FromManager::Vips { vips: now.vips.clone() },
            FromManager::Ingress { ingress: now.ingress.clone() },
        ];
        (msgs, Sent(now))
    }

    /// The messages that bring the node from what it was told to `now` (none if nothing it
    /// knows changed).
    pub fn update(&mut self, now: Snapshot) -> Vec<FromManager> {
        let was = &self.0;
        let mut msgs = Vec::new();
        let upsert: Vec<Assignment> = now.assignments.iter().filter(|(k, v)| was.assignments.get(*k) != Some(*v)).map(|(_, v)| v.clone()).collect();
        let mut remove: Vec<Id> = was.assignments.keys().filter(|k| !now.assignments.contains_key(*k)).cloned().collect();
        let newly: Vec<Id> = now.stopping.iter().filter(|id| !was.stopping.contains(*id) && !remove.contains(*id)).cloned().collect();
        remove.extend(newly);
        if !upsert.is_empty() || !remove.is_empty() {
            msgs.push(FromManager::Assign { full: false, upsert, remove });
        }
        if now.vips != was.vips {
            msgs.push(FromManager::Vips { vips: now.vips.clone() });
        }
        if now.keys != was.keys {
            msgs.push(FromManager::GossipKeys { keys: now.keys.keys.clone(), send: now.keys.send });
        }
        if now.ingress != was.ingress {
            msgs.push(FromManager::Ingress { ingress: now.ingress.clone() });
        }
        if now.nodes != was.nodes {
            msgs.push(FromManager::Nodes { nodes: now.nodes.clone() });
        }
        if now.managers != was.managers {
            msgs.push(FromManager::Managers { managers: now.managers.clone() });
        }
        self.0 = now;
        msgs
    }
}

/// The tasks `node` should run, as it needs them.
pub fn assignments(st: &ClusterState, node: &Id) -> BTreeMap<Id, Assignment> {
    st.tasks
        .values()
        // A container's attachment runs nothing of swarmnet's: its node's CNI side has it.
        .filter(|t| t.node_id.as_ref() == Some(node) && t.desired_state == DesiredState::Running && t.state != TaskState::Pending && t.container.is_none())
        .filter_map(|t| {
            let svc = t.service_id.as_ref().and_then(|s| st.services.get(s));
            let attachments = t
                .networks
                .iter()
                .map(|n| {
                    let aliases = svc.map_or(&t.aliases, |s| &s.aliases).get(n).cloned().unwrap_or_default();
                    Some(Attachment { network: st.networks.get(n)?.clone(), address: *t.addresses.get(n)?, vip: svc.and_then(|s| s.vips.get(n).copied()), aliases })
                })
                .collect::<Option<Vec<_>>>()?;
            Some((
                t.id.clone(),
                Assignment {
                    task_id: t.id.clone(),
                    name: t.name.clone(),
                    service_id: t.service_id.clone(),
                    service_name: svc.map(|s| s.name.clone()),
                    ports: svc.map(|s| s.ports.clone()).unwrap_or_default(),
                    command: t.command.clone(),
                    env: t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    restart: t.restart,
                    attachments,
                },
            ))
        })
        .collect()
}

/// The node's place on the ingress network.
pub fn node_ingress(st: &ClusterState, node: &Id) -> Option<NodeIngress> {
    let address = st.nodes.get(node)?.ingress_ip?;
    let network = st.networks.values().find(|n| n.ingress)?.clone();
    Some(NodeIngress { network, address })
}

/// The ready nodes: where gossip finds its peers.
pub fn ready_nodes(st: &ClusterState) -> Vec<(Id, IpAddr)> {
    st.ready_nodes().map(|n| (n.id.clone(), n.addr)).collect()
}

/// Every manager's `host:port`: `leader` first, then the ready ones, then the others.
pub fn managers(st: &ClusterState, leader: &Id) -> Vec<String> {
    let mut m: Vec<&Node> = st.nodes.values().filter(|n| n.role == Role::Manager && n.manager_port.is_some()).collect();
    m.sort_by_key(|n| (&n.id != leader, n.status != NodeStatus::Ready, n.id.clone()));
    m.iter().filter_map(|n| Some(std::net::SocketAddr::new(n.addr, n.manager_port?).to_string())).collect()
}

/// Every service VIP, sorted.
pub fn vips(st: &ClusterState) -> Vec<ServiceVip> {
    let mut v: Vec<ServiceVip> = st.services.values().flat_map(|s| s.vips.iter().map(|(n, vip)| ServiceVip { network: n.clone(), vip: *vip, service: s.name.clone() })).collect();
    v.sort();
    v
}

/// Tasks of `node` that should stop and have not been reported stopped.
pub fn shutting_down(st: &ClusterState, node: &Id) -> BTreeSet<Id> {
    st.tasks.values().filter(|t| t.node_id.as_ref() == Some(node) && t.desired_state == DesiredState::Shutdown && !t.state.is_terminal()).map(|t| t.id.clone()).collect()
}

impl Manager {
    /// What `node` should know now.
    fn snapshot(&self, node: &Id) -> Snapshot {
        let keys = self.gossip_keys();
        Snapshot::of(&self.lock().state, node, keys, &self.node_id)
    }

    /// Runs a node's session: its first report, then [`Sent`]'s messages at every change,
    /// and the node's heartbeats, reports and notes, until it goes silent or closes.
    pub(crate) async fn session<R, W>(self: Arc<Self>, node: Id, reports: Vec<ops::TaskReport>, hostname: Option<String>, mut r: R, mut w: W) -> anyhow::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin + Send,
        W: tokio::io::AsyncWrite + Unpin + Send,
    {
        self.touch(&node);
        self.mutate(|st, g| {
            ops::set_node_status(st, &node, NodeStatus::Ready, g);
            ops::apply_reports(st, &node, &reports, true, g);
            // A node's display name follows the machine (a new hostname after a restart).
            if let (Some(h), Some(n)) = (hostname.as_ref().filter(|h| !h.is_empty()), st.nodes.get_mut(&node)) {
                if &n.hostname != h {
                    info!(node = %node, from = %n.hostname, to = %h, "node's hostname changed");
                    n.hostname = h.clone();
                }
            }
            Ok(())
        })?;
        info!(node = %node, tasks = reports.len(), "node session opened");
        let hb = u64::try_from(self.heartbeat.as_millis()).unwrap_or(5000);
        let managers = managers(&self.lock().state, &self.node_id);
        write_msg(&mut w, &Reply::ok(&SessionOpened { node_id: node.clone(), heartbeat_ms: hb, data_path_port: self.meta.data_path_port, managers })).await?;
        let mut rx = self.changed.subscribe();
        // What is sent beside the state (a log request), registered for this session; a
        // newer session of the node replaces it.
        let (otx, mut orx) = tokio::sync::mpsc::channel::<FromManager>(16);
        self.sessions_out().insert(node.clone(), otx.clone());
        // Unregistered however the session ends (an error, or its future dropped).
        struct Unregister<'a>(&'a Manager, Id, tokio::sync::mpsc::Sender<FromManager>);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                let mut out = self.0.sessions_out();
                if out.get(&self.1).is_some_and(|s| s.same_channel(&self.2)) {
                    out.remove(&self.1);
                }
            }
        }
        let _unregister = Unregister(&self, node.clone(), otx);
        let (first, mut sent) = Sent::open(self.snapshot(&node));
        for m in &first {
            write_msg(&mut w, m).await?;
        }
        let me = self.clone();
        let n2 = node.clone();
        // A session that says nothing for this long is dead (its node sends a heartbeat
        // every interval): closing it frees its connection.
        let silence = self.heartbeat * 4 + Duration::from_secs(5);
        let reader = async move {
            loop {
                let next = tokio::time::timeout(silence, read_msg::<_, FromAgent>(&mut r)).await.map_err(|_| anyhow::anyhow!("nothing from the node for {} s", silence.as_secs()))?;
                match next? {
                    None => return Ok::<(), anyhow::Error>(()),
                    Some(FromAgent::Heartbeat) => me.touch(&n2),
                    Some(FromAgent::GossipKeysHeld { ids }) => {
                        me.touch(&n2);
                        me.lock().keys_held.insert(n2.clone(), ids);
                    }
                    Some(FromAgent::MeshWarnings { warnings }) => {
                        me.touch(&n2);
                        me.lock().mesh_warnings.insert(n2.clone(), warnings);
                    }
                    Some(FromAgent::Reports { reports }) => {
                        me.touch(&n2);
                        me.mutate(|st, g| {
                            ops::apply_reports(st, &n2, &reports, false, g);
                            Ok(())
                        })?;
                    }
                }
            }
        };
        let writer = async {
            loop {
                tokio::select! {
                    r = rx.changed() => {
                        r?;
                        for m in sent.update(self.snapshot(&node)) {
                            write_msg(&mut w, &m).await?;
                        }
                    }
                    Some(m) = orx.recv() => write_msg(&mut w, &m).await?,
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        };
        // A manager that no longer leads ends its sessions: the nodes go to the one that does.
        let mut down = self.stepped_down.subscribe();
        let r = tokio::select! {
            r = reader => r,
            w = writer => w,
            _ = down.wait_for(|d| *d) => Err(anyhow::anyhow!("this manager no longer leads the cluster")),
        };
        info!(node = %node, "node session closed");
        r
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn kinds(msgs: &[FromManager]) -> Vec<&'static str> {
        msgs.iter()
            .map(|m| match m {
                FromManager::Assign { full: true, .. } => "assign-full",
                FromManager::Assign { .. } => "assign",
                FromManager::Nodes { .. } => "nodes",
                FromManager::Vips { .. } => "vips",
                FromManager::Ingress { .. } => "ingress",
                FromManager::GossipKeys { .. } => "keys",
                FromManager::Managers { .. } => "managers",
                FromManager::Logs(_) => "logs",
            })
            .collect()
    }

    fn state() -> ClusterState {
        let mut st = ClusterState::default();
        st.nodes.insert("a".into(), Node::test("a", "a"));
        let subnet = "10.0.1.0/24".parse().expect("subnet");
        st.networks
            .insert("n1".into(), Network { id: "n1".into(), name: "appnet".into(), driver: Driver::Overlay, attachable: true, subnet, gateway: Ipv4Addr::new(10, 0, 1, 1), vni: 4096, ingress: false });
        st
    }

    fn task(st: &mut ClusterState, id: &str, desired: DesiredState, state: TaskState) {
        st.tasks.insert(
            id.into(),
            Task {
                id: id.into(),
                name: id.into(),
                service_id: None,
                slot: None,
                node_id: Some("a".into()),
                desired_state: desired,
                state,
                error: String::new(),
                addresses: std::collections::BTreeMap::from([("n1".into(), Ipv4Addr::new(10, 0, 1, 9))]),
                networks: vec!["n1".into()],
                command: vec!["true".into()],
                restart: false,
                restarts: 0,
                pid: None,
                aliases: Default::default(),
                version: 0,
                env: Default::default(),
                container: None,
            },
        );
    }

    #[test]
    fn a_session_opens_with_the_keys_then_everything_the_node_needs() {
        let mut st = state();
        task(&mut st, "t1", DesiredState::Running, TaskState::Assigned);
        task(&mut st, "t2", DesiredState::Shutdown, TaskState::Running);
        let (msgs, _) = Sent::open(Snapshot::of(&st, &"a".to_string(), GossipKeySet::default(), &"a".to_string()));
        assert_eq!(kinds(&msgs), vec!["keys", "assign-full", "nodes", "vips", "ingress"]);
        let FromManager::Assign { upsert, remove, .. } = &msgs[1] else { panic!("{msgs:?}") };
        assert_eq!(upsert.iter().map(|a| a.task_id.as_str()).collect::<Vec<_>>(), vec!["t1"]);
        assert_eq!(remove, &vec!["t2".to_string()], "a task that should stop is named from the start");
    }

    #[test]
    fn only_what_changed_is_sent_and_nothing_when_nothing_did() {
        let node = "a".to_string();
        let mut st = state();
        task(&mut st, "t1", DesiredState::Running, TaskState::Assigned);
        let (_, mut sent) = Sent::open(Snapshot::of(&st, &node, GossipKeySet::default(), &"a".to_string()));
        assert!(sent.update(Snapshot::of(&st, &node, GossipKeySet::default(), &"a".to_string())).is_empty());
        // A new task, and t1 asked to stop.
        task(&mut st, "t3", DesiredState::Running, TaskState::Assigned);
        if let Some(t) = st.tasks.get_mut("t1") {
            t.desired_state = DesiredState::Shutdown;
        }
        let msgs = sent.update(Snapshot::of(&st, &node, GossipKeySet::default(), &"a".to_string()));
        assert_eq!(kinds(&msgs), vec!["assign"]);
        let FromManager::Assign { upsert, remove, .. } = &msgs[0] else { panic!("{msgs:?}") };
        assert_eq!((upsert.len(), upsert[0].task_id.as_str()), (1, "t3"));
        assert_eq!(remove, &vec!["t1".to_string()], "told once");
        assert!(sent.update(Snapshot::of(&st, &node, GossipKeySet::default(), &"a".to_string())).is_empty(), "not told twice");
        // New keys, a node down: only those.
        let keys = GossipKeySet { keys: vec![GossipKey::from_bytes(2, &[7; 32])], send: 2 };
        if let Some(n) = st.nodes.get_mut("a") {
            n.status = NodeStatus::Down;
        }
        assert_eq!(kinds(&sent.update(Snapshot::of(&st, &node, keys, &"a".to_string()))), vec!["keys", "nodes"]);
    }
}
