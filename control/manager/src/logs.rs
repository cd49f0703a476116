//! `service logs` on the manager (issue 21, the protocol in `swarmnet_api::logs`): which
//! tasks a target names (pure), asking their nodes over their sessions, and joining the
//! nodes' streams into one for the client.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use swarmnet_api::logs::{LogFrame, LogSource, LogsOpened, LogsRequest, KEEPALIVE};
use swarmnet_api::{read_msg, write_msg, ApiError, ErrorKind, FromManager, LogsWanted, Reply};
use swarmnet_types::Id;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::model::{ClusterState, Task};
use crate::Manager;

/// How long a node has to open its stream once asked.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// What reaches the joined stream from one node's connection.
pub(crate) enum NodeEvent {
    Connected,
    Frame(LogFrame),
}

/// A stream the manager has asked a node for and is waiting to be opened.
pub(crate) struct Pending {
    pub node: Id,
    pub tx: mpsc::Sender<NodeEvent>,
}

/// The tasks `target` names: a service (name or id): all of its tasks that were placed; else
/// a task: by id, by a unique id prefix, or by name (every task of that name, as a slot's
/// history shares it). Oldest slot first.
pub fn resolve<'a>(st: &'a ClusterState, target: &str) -> Result<Vec<&'a Task>, ApiError> {
    let mut tasks: Vec<&Task> = if let Some(s) = st.service_by_name(target) {
        st.tasks.values().filter(|t| t.service_id.as_ref() == Some(&s.id)).collect()
    } else if let Some(t) = st.tasks.get(target) {
        vec![t]
    } else {
        let by_name: Vec<&Task> = st.tasks.values().filter(|t| t.name == target).collect();
        if !by_name.is_empty() {
            by_name
        } else {
            let by_prefix: Vec<&Task> = if target.len() >= 3 { st.tasks.values().filter(|t| t.id.starts_with(target)).collect() } else { Vec::new() };
            match by_prefix.len() {
                0 => return Err(ApiError::new(ErrorKind::NotFound, format!("no service or task {target:?} (a removed service's logs go with it)"))),
                1 => by_prefix,
                n => return Err(ApiError::new(ErrorKind::Conflict, format!("{n} tasks have ids starting with {target:?}: give more of the id"))),
            }
        }
    };
    tasks.retain(|t| t.node_id.is_some());
    tasks.sort_by(|a, b| (a.slot, &a.name, &a.id).cmp(&(b.slot, &b.name, &b.id)));
    Ok(tasks)
}

/// The sources of `tasks`, and their ids by node.
pub fn plan(st: &ClusterState, tasks: &[&Task]) -> (Vec<LogSource>, BTreeMap<Id, Vec<Id>>) {
    let mut by_node: BTreeMap<Id, Vec<Id>> = BTreeMap::new();
    let mut sources = Vec::new();
    for t in tasks {
        let Some(node) = &t.node_id else { continue };
        by_node.entry(node.clone()).or_default().push(t.id.clone());
        let host = st.nodes.get(node).map(|n| n.hostname.clone()).unwrap_or_else(|| node.clone());
        sources.push(LogSource { task_id: t.id.clone(), name: t.name.clone(), node_id: node.clone(), node: host });
    }
    (sources, by_node)
}

impl Manager {
    /// Opens `service logs`: the tasks whose output comes, and the joined stream of their
    /// nodes' frames (ends with [`LogFrame::End`] without `follow`). Dropping the receiver
    /// ends every node's stream.
    pub fn open_logs(self: &Arc<Self>, spec: &LogsRequest) -> Result<(LogsOpened, mpsc::Receiver<LogFrame>), ApiError> {
        let st = self.state();
        let tasks = resolve(&st, &spec.target)?;
        let (sources, by_node) = plan(&st, &tasks);
        let (tx, rx) = mpsc::channel::<LogFrame>(64);
        let mut nodes = tokio::task::JoinSet::new();
        for (node, task_ids) in by_node {
            let host = st.nodes.get(&node).map(|n| n.hostname.clone()).unwrap_or_else(|| node.clone());
            let stream = self.next_log_stream.fetch_add(1, Ordering::Relaxed);
            let (ntx, nrx) = mpsc::channel::<NodeEvent>(16);
            self.log_streams().insert(stream, Pending { node: node.clone(), tx: ntx });
            let wanted = FromManager::Logs(LogsWanted { stream, tasks: task_ids, follow: spec.follow, tail: spec.tail, since_ns: spec.since_ns });
            let asked = self.sessions_out().get(&node).is_some_and(|s| s.try_send(wanted).is_ok());
            let me = self.clone();
            let tx = tx.clone();
            nodes.spawn(async move {
                if asked {
                    relay_node(nrx, &tx, &host).await;
                } else {
                    let _ = tx.send(LogFrame::Warning { message: format!("node {host} ({node}) is not connected to the manager: its tasks' logs cannot be read now") }).await;
                }
                me.log_streams().remove(&stream);
            });
        }
        let follow = spec.follow;
        tokio::spawn(async move {
            while nodes.join_next().await.is_some() {}
            if !follow {
                let _ = tx.send(LogFrame::End).await;
            }
        });
        Ok((LogsOpened { sources }, rx))
    }

    /// Answers `service logs` on a connection: the reply, then every frame until the stream
    /// ends or the client leaves.
    pub async fn serve_logs<W: AsyncWrite + Unpin>(self: &Arc<Self>, spec: &LogsRequest, w: &mut W) {
        let (opened, mut rx) = match self.open_logs(spec) {
            Ok(v) => v,
            Err(e) => {
                let _ = write_msg(w, &Reply::err(e)).await;
                return;
            }
        };
        info!(target = %spec.target, tasks = opened.sources.len(), follow = spec.follow, "service logs: streaming");
        if write_msg(w, &Reply::ok(&opened)).await.is_err() {
            return;
        }
        while let Some(f) = rx.recv().await {
            let end = f == LogFrame::End;
            if write_msg(w, &f).await.is_err() || end {
                return;
            }
        }
    }

    /// A node's connection for stream `stream` (`Hello::LogStream`): its frames go to the
    /// client's joined stream until it ends, goes silent, or the client leaves.
    pub(crate) async fn node_log_stream<R: AsyncRead + Unpin>(&self, node: &Id, stream: u64, r: &mut R) -> Result<(), ApiError> {
        let pending = self.log_streams().remove(&stream);
        let Some(p) = pending.filter(|p| &p.node == node) else {
            return Err(ApiError::new(ErrorKind::NotFound, format!("log stream {stream}: not asked of node {node} (ended, or never asked)")));
        };
        if p.tx.send(NodeEvent::Connected).await.is_err() {
            return Ok(());
        }
        let host = self.lock().state.nodes.get(node).map(|n| n.hostname.clone()).unwrap_or_else(|| node.clone());
        loop {
            let why = match tokio::time::timeout(KEEPALIVE * 3, read_msg::<_, LogFrame>(r)).await {
                Err(_) => format!("nothing for {} s", (KEEPALIVE * 3).as_secs()),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(f))) => {
                    if p.tx.send(NodeEvent::Frame(f)).await.is_err() {
                        debug!(node = %node, stream, "log stream: the client left");
                        return Ok(());
                    }
                    continue;
                }
            };
            // The client is told: its lines from that node may be cut short.
            let _ = p.tx.send(NodeEvent::Frame(LogFrame::Warning { message: format!("node {host}: its log stream broke off ({why}): lines may be missing") })).await;
            return Err(ApiError::unavailable(format!("log stream {stream} of node {node}: {why}")));
        }
    }

    fn log_streams(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Pending>> {
        self.log_streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn sessions_out(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Id, mpsc::Sender<FromManager>>> {
        self.sessions_out.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One node's part of the joined stream: its frames, or a warning when it cannot send them.
async fn relay_node(mut nrx: mpsc::Receiver<NodeEvent>, tx: &mpsc::Sender<LogFrame>, host: &str) {
    match tokio::time::timeout(CONNECT_WITHIN, nrx.recv()).await {
        Ok(Some(NodeEvent::Connected)) => {}
        Ok(Some(NodeEvent::Frame(_))) | Ok(None) => return,
        Err(_) => {
            let _ = tx.send(LogFrame::Warning { message: format!("node {host} did not open its log stream within {} s", CONNECT_WITHIN.as_secs()) }).await;
            return;
        }
    }
    while let Some(ev) = nrx.recv().await {
        let NodeEvent::Frame(f) = ev else { continue };
        if tx.send(f).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Driver, EndpointMode, Node, ServiceMode};
    use crate::ops;
    use swarmnet_api::{NetworkAttach, NetworkCreate, ServiceCreate};

    /// Two nodes (hostnames alpha and beta), service web with 3 tasks placed, and one task
    /// of it still pending.
    fn state() -> ClusterState {
        let mut st = ClusterState::default();
        for (id, host) in [("n1", "alpha"), ("n2", "beta")] {
            st.nodes.insert(id.into(), Node::test(id, host));
        }
        let mut n = 0;
        let mut g = move || {
            n += 1;
            format!("id{n:03}")
        };
        ops::create_network(&mut st, &NetworkCreate { name: "appnet".into(), driver: Driver::Overlay, attachable: true, subnet: None, ingress: false }, "10.0.0.0/8".parse().expect("pool"), &mut g)
            .expect("network");
        let spec = ServiceCreate {
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: 4 },
            networks: vec![NetworkAttach { name: "appnet".into(), aliases: vec![] }],
            endpoint_mode: EndpointMode::Vip,
            publish: vec![],
            command: vec!["sleep".into(), "infinity".into()],
            constraints: vec![],
            labels: Default::default(),
            env: Default::default(),
            update: Default::default(),
        };
        let own = ops::OwnPorts { manager: 2377, gossip: 7946, data_path: 4789 };
        ops::create_service(&mut st, &spec, &own, &mut g).expect("service");
        ops::reconcile(&mut st, &mut g);
        let pending = st.tasks.values_mut().find(|t| t.name == "web.4").expect("web.4");
        pending.node_id = None;
        st
    }

    fn names(ts: &[&Task]) -> Vec<String> {
        ts.iter().map(|t| t.name.clone()).collect()
    }

    #[test]
    fn a_target_names_a_service_a_task_a_slot_or_an_id_prefix() {
        let st = state();
        assert_eq!(names(&resolve(&st, "web").expect("service")), ["web.1", "web.2", "web.3"], "placed tasks only, by slot");
        let svc_id = st.services.values().next().map(|s| s.id.clone()).expect("service id");
        assert_eq!(resolve(&st, &svc_id).expect("by service id").len(), 3);
        let t2 = st.tasks.values().find(|t| t.name == "web.2").expect("web.2").id.clone();
        assert_eq!(names(&resolve(&st, &t2).expect("task id")), ["web.2"]);
        assert_eq!(names(&resolve(&st, "web.3").expect("name")), ["web.3"]);
        assert_eq!(resolve(&st, "id0").map(|_| ()).expect_err("ambiguous prefix").kind, ErrorKind::Conflict);
        assert_eq!(resolve(&st, "i").map(|_| ()).expect_err("too short for a prefix").kind, ErrorKind::NotFound);
        assert_eq!(resolve(&st, "nope").map(|_| ()).expect_err("unknown").kind, ErrorKind::NotFound);
    }

    #[test]
    fn a_plan_groups_tasks_by_node_with_the_hostnames_to_show() {
        let st = state();
        let tasks = resolve(&st, "web").expect("service");
        let (sources, by_node) = plan(&st, &tasks);
        assert_eq!(sources.len(), 3);
        for s in &sources {
            let want = if s.node_id == "n1" { "alpha" } else { "beta" };
            assert_eq!(s.node, want, "{s:?}");
        }
        assert_eq!(by_node.values().map(Vec::len).sum::<usize>(), 3);
        assert!(by_node.keys().all(|n| n == "n1" || n == "n2"));
    }
}
