//! The manager's API: one request, one reply (`ApiRequest` → `Reply`), over 2377 or the
//! control socket. Reads are views of the state (`views`); writes run the operations of
//! `ops` through [`Manager::mutate`] (a clone, committed whole or not at all).

use serde_json::Value;
use swarmnet_api::replies::*;
use swarmnet_api::*;
use tracing::info;

use crate::model::*;
use crate::ops::{self, OpError};
use crate::server::{Manager, ManagerError};
use crate::views::*;

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ManagerError> {
    Ok(serde_json::to_value(v)?)
}

impl Manager {
    /// Answers one API request. `caller` is the node a request came from, if any.
    pub fn api(&self, req: ApiRequest, caller: Option<&Id>) -> Reply {
        let started = std::time::Instant::now();
        let r = match self.api_inner(req, caller) {
            Ok(v) => Reply { ok: true, error: None, data: v, stale: None },
            Err(e) => Reply::err(e.to_api()),
        };
        self.api_latency.observe(started.elapsed());
        r
    }

    /// [`Manager::api`], with the requests that wait (`node rm`: a gossip key rotation;
    /// `swarm rotate-gossip-key`), for a caller on 2377 or the control socket.
    pub async fn api_async(&self, req: ApiRequest, caller: Option<&Id>) -> Reply {
        match req {
            ApiRequest::NodeRm { node, force } => Reply::from_result(self.remove_node(&node, force).await.map_err(|e| e.to_api())),
            ApiRequest::RotateGossipKey => {
                Reply::from_result(self.rotate_gossip_key(self.key_switch_delay()).await.map(|key| GossipKeyRotated { key }).map_err(|e| e.to_api().context("gossip key rotation")))
            }
            req => self.api(req, caller),
        }
    }

    /// Every task (`TaskLs`), read under the lock without copying the state.
    pub fn task_list(&self) -> Vec<TaskInfo> {
        let inner = self.lock();
        inner.state.tasks.values().map(|t| TaskInfo { since_ms: inner.task_since.get(&t.id).copied().unwrap_or(self.started_ms), ..task_info(t, &inner.state) }).collect()
    }

    fn api_inner(&self, req: ApiRequest, caller: Option<&Id>) -> Result<Value, ManagerError> {
        let pool = self.pool;
        let v = match req {
            ApiRequest::NodeLs => {
                let st = self.state();
                let current = self.gossip_keys().keys.iter().map(|k| k.id).max().unwrap_or(0);
                let held = self.lock().keys_held.clone();
                to_value(
                    st.nodes
                        .values()
                        .map(|n| {
                            let mut i = node_info(n, &self.node_id);
                            i.gossip_key = held.get(&n.id).map(|h| KeyHolding { held: h.clone(), current });
                            i
                        })
                        .collect::<Vec<_>>(),
                )?
            }
            ApiRequest::JoinToken { role } => match role {
                Role::Worker => to_value(JoinTokenInfo { role, token: self.join_token()?, manager: self.node_id.clone() })?,
                Role::Manager => return Err(OpError::Invalid(format!("join-token {role}: this version runs one manager; only worker tokens exist")).into()),
            },
            ApiRequest::NetworkCreate { spec } => {
                let n = self.mutate(|st, g| ops::create_network(st, &spec, pool, g))?;
                info!(network = %n.name, vni = n.vni, subnet = %n.subnet, "network created");
                to_value(network_info(&n))?
            }
            ApiRequest::NetworkLs => to_value(self.state().networks.values().map(network_info).collect::<Vec<_>>())?,
            ApiRequest::NetworkInspect { name } => {
                let st = self.state();
                let n = st.network_by_name(&name).ok_or_else(|| OpError::NotFound(format!("network {name} not found")))?;
                let endpoints = st
                    .tasks
                    .values()
                    .filter_map(|t| {
                        let ip = *t.addresses.get(&n.id)?;
                        Some(AssignedEndpoint {
                            name: t.name.clone(),
                            task_id: t.id.clone(),
                            ip,
                            mac: format_mac(mac_for(ip)),
                            node: t.node_id.as_ref().and_then(|id| st.nodes.get(id)).map(|n| n.hostname.clone()),
                        })
                    })
                    .collect();
                to_value(NetworkDetail { network: network_info(n), endpoints, local_endpoints: None, local_dns: DnsCounters::default(), local_gossip: None })?
            }
            ApiRequest::NetworkRm { name } => {
                let n = self.mutate(|st, _| ops::remove_network(st, &name))?;
                to_value(Removed { id: n.id, name: n.name })?
            }
            ApiRequest::ServiceCreate { spec } => {
                let s = self.mutate(|st, g| ops::create_service(st, &spec, &self.own_ports, g))?;
                info!(service = %s.name, "service created");
                to_value(service_info(&s, &self.state()))?
            }
            ApiRequest::ServiceLs => {
                let st = self.state();
                to_value(st.services.values().map(|s| service_info(s, &st)).collect::<Vec<_>>())?
            }
            ApiRequest::ServicePs { name } => {
                let st = self.state();
                let s = st.service_by_name(&name).ok_or_else(|| OpError::NotFound(format!("service {name} not found")))?;
                let mut tasks: Vec<&Task> = st.tasks.values().filter(|t| t.service_id.as_ref() == Some(&s.id)).collect();
                tasks.sort_by_key(|t| (t.slot, t.name.clone(), t.desired_state != DesiredState::Running));
                let tasks = tasks.iter().map(|t| task_info(t, &st)).collect::<Vec<_>>();
                let warnings = mesh_warnings(s, &st, &self.lock().mesh_warnings);
                to_value(ServicePsReply { tasks, warnings })?
            }
            ApiRequest::TaskLs => to_value(self.task_list())?,
            ApiRequest::ServiceInspect { name } => {
                let st = self.state();
                let s = st.service_by_name(&name).ok_or_else(|| OpError::NotFound(format!("service {name} not found")))?;
                to_value(service_info(s, &st))?
            }
            ApiRequest::ServiceScale { name, replicas } => {
                let s = self.mutate(|st, g| ops::scale_service(st, &name, replicas, g))?;
                to_value(service_info(&s, &self.state()))?
            }
            ApiRequest::ServiceUpdate { name, spec } => {
                let s = self.mutate(|st, g| ops::update_service(st, &name, &spec, &self.own_ports, crate::server::now_ms(), g))?;
                to_value(service_info(&s, &self.state()))?
            }
            ApiRequest::ServiceRm { name } => {
                let s = self.mutate(|st, g| ops::remove_service(st, &name, g))?;
                to_value(Removed { id: s.id, name: s.name })?
            }
            ApiRequest::Run { spec } => {
                let node = caller.ok_or_else(|| OpError::Invalid("run: no calling node".into()))?;
                let t = self.mutate(|st, g| ops::create_standalone(st, &spec, node, g))?;
                to_value(task_info(&t, &self.state()))?
            }
            ApiRequest::Attach { spec } => {
                let node = caller.ok_or_else(|| OpError::Invalid("attach: no calling node".into()))?;
                let t = self.mutate(|st, g| ops::attach_container(st, &spec, node, g))?;
                let st = self.state();
                let attachment = t
                    .networks
                    .first()
                    .and_then(|n| Some(swarmnet_api::Attachment { network: st.networks.get(n)?.clone(), address: *t.addresses.get(n)?, vip: None, aliases: Vec::new() }))
                    .ok_or_else(|| OpError::Invalid(format!("container {}: its attachment has no network", spec.container_id)))?;
                to_value(swarmnet_api::cni::ContainerAttached { task_id: t.id, name: t.name, attachment })?
            }
            ApiRequest::Detach { spec } => {
                let node = caller.ok_or_else(|| OpError::Invalid("detach: no calling node".into()))?;
                let t = self.mutate(|st, _| ops::detach_container(st, &spec, node))?;
                to_value(swarmnet_api::cni::ContainerDetached { task_id: t.map(|t| t.id) })?
            }
            ApiRequest::NodeInspect { node } => {
                let st = self.state();
                let n = st.nodes.values().find(|n| n.id == node || n.hostname == node).ok_or_else(|| OpError::NotFound(format!("node {node} not found")))?;
                let manager = n.role == Role::Manager;
                to_value(NodeDetail {
                    node: node_info(n, &self.node_id),
                    manager_addr: n.manager_port.filter(|_| manager).map(|p| std::net::SocketAddr::new(n.addr, p).to_string()),
                    store: manager.then(|| self.store_description()),
                    underlay: n.underlay.iter().map(ToString::to_string).collect(),
                })?
            }
            ApiRequest::NodeDemote { node } => {
                let n = self.mutate(|st, _| ops::demote_node(st, &node))?;
                info!(node = %n.id, hostname = %n.hostname, "manager demoted to a worker");
                if n.id == self.node_id {
                    // The leader demoted itself: another manager takes over.
                    info!("this manager was demoted: giving the leadership up");
                    self.resign();
                }
                to_value(Removed { id: n.id, name: n.hostname })?
            }
            ApiRequest::NodeUpdate { node, availability, label_add, label_rm } => {
                let n = self.mutate(|st, g| ops::update_node(st, &node, availability, &label_add, &label_rm, g))?;
                info!(node = %n.id, hostname = %n.hostname, availability = %n.availability, labels = ?n.labels, "node updated");
                to_value(node_info(&n, &self.node_id))?
            }
            ApiRequest::NodePromote { node } => {
                let n = self.mutate(|st, _| ops::promote_node(st, &node))?;
                info!(node = %n.id, hostname = %n.hostname, "worker promoted to a manager");
                to_value(Removed { id: n.id, name: n.hostname })?
            }
            ApiRequest::RunLocal { .. }
            | ApiRequest::CniAdd { .. }
            | ApiRequest::CniCheck { .. }
            | ApiRequest::CniDel { .. }
            | ApiRequest::CniGc { .. }
            | ApiRequest::ExecLocate { .. }
            | ApiRequest::LbLs
            | ApiRequest::RotateGossipKey
            | ApiRequest::NodeRm { .. }
            | ApiRequest::SwarmLeave { .. } => {
                return Err(OpError::Invalid("this request is answered by the node's own daemon".into()).into());
            }
            ApiRequest::ServiceLogs { .. } => return Err(OpError::Invalid("service logs is a stream: it is answered on a connection of its own".into()).into()),
        };
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::server::ManagerConfig;

    /// A manager on a store of its own in a temporary folder (no root, no socket).
    fn manager(name: &str) -> (Arc<Manager>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sn-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = ManagerConfig {
            advertise: IpAddr::from([10, 210, 0, 1]),
            pool: "10.0.0.0/8".parse().expect("pool"),
            heartbeat: Duration::from_secs(5),
            hostname: "m".into(),
            underlay: vec!["10.210.0.0/24".parse().expect("underlay")],
            data_path_port: 4789,
            ingress_subnet: None,
            gossip_key_rotation: Duration::from_secs(3600),
            expect_cluster: None,
            force_new_cluster: false,
            listen_port: 2377,
            gossip_port: 7946,
            store: crate::store::StoreChoice::Redb,
            me: None,
        };
        (Manager::open(&dir, &cfg).expect("open"), dir)
    }

    fn kind(r: Reply) -> ErrorKind {
        r.into_data::<Value>().expect_err("refused").kind()
    }

    #[test]
    fn requests_are_answered_typed_and_refusals_carry_their_kind() {
        let (m, dir) = manager("kinds");
        let net = NetworkCreate { name: "appnet".into(), driver: Driver::Overlay, attachable: true, subnet: None, ingress: false };
        let n: NetworkInfo = m.api(ApiRequest::NetworkCreate { spec: net.clone() }, None).into_data().expect("created");
        assert_eq!((n.name.as_str(), n.scope), ("appnet", Scope::Swarm));
        assert_eq!(kind(m.api(ApiRequest::NetworkCreate { spec: net }, None)), ErrorKind::Conflict);
        let spec = ServiceCreate {
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: 2 },
            networks: vec!["appnet".parse().expect("net")],
            endpoint_mode: EndpointMode::Vip,
            publish: vec!["8080:80".parse().expect("publish")],
            command: vec!["sleep".into()],
            constraints: vec![],
            labels: Default::default(),
            env: Default::default(),
            update: Default::default(),
        };
        let s: ServiceInfo = m.api(ApiRequest::ServiceCreate { spec: spec.clone() }, None).into_data().expect("service");
        assert_eq!((s.desired_replicas, s.ports[0].published), (2, 8080));
        assert_eq!(kind(m.api(ApiRequest::ServiceCreate { spec: spec.clone() }, None)), ErrorKind::Conflict, "the name is taken");
        let mut bad = spec;
        bad.name = "other".into();
        bad.publish = vec![PublishSpec { published: Some(0), target: 80, protocol: Protocol::Tcp, mode: PublishMode::Ingress }];
        assert_eq!(kind(m.api(ApiRequest::ServiceCreate { spec: bad }, None)), ErrorKind::Invalid, "a spec no CLI sends is checked again");
        assert_eq!(kind(m.api(ApiRequest::ServicePs { name: "nope".into() }, None)), ErrorKind::NotFound);
        assert_eq!(
            kind(m.api(
                ApiRequest::NetworkCreate {
                    spec: NetworkCreate { name: "huge".into(), driver: Driver::Overlay, attachable: false, subnet: Some("10.0.0.5/24".parse().expect("subnet")), ingress: false }
                },
                None
            )),
            ErrorKind::Invalid,
            "host bits set"
        );
        assert_eq!(kind(m.api(ApiRequest::JoinToken { role: Role::Manager }, None)), ErrorKind::Invalid);
        let ps: ServicePsReply = m.api(ApiRequest::ServicePs { name: "web".into() }, None).into_data().expect("ps");
        assert_eq!(ps.tasks.len(), 2, "placed on the manager's own node");
        let scaled: ServiceInfo = m.api(ApiRequest::ServiceScale { name: "web".into(), replicas: 0 }, None).into_data().expect("scaled");
        assert_eq!(scaled.desired_replicas, 0);
        assert_eq!(
            kind(m.api(ApiRequest::Run { spec: StandaloneCreate { name: "p".into(), networks: vec!["appnet".parse().expect("net")], command: vec!["true".into()] } }, None)),
            ErrorKind::Invalid,
            "run needs a calling node"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
