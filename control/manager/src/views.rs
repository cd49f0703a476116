//! The manager's views: how the cluster's state reads in replies (`node ls`, `network ls`,
//! `service ls|ps|inspect`, ...). Pure functions of the state, tested without a manager.

use std::collections::HashMap;

use swarmnet_api::replies::*;
use swarmnet_api::MeshWarning;

use crate::model::*;

/// `leader`: the node of the manager that leads (the one answering).
pub fn node_info(n: &Node, leader: &Id) -> NodeInfo {
    NodeInfo {
        id: n.id.clone(),
        hostname: n.hostname.clone(),
        address: n.addr,
        status: n.status,
        availability: n.availability,
        labels: n.labels.clone(),
        manager_status: match (n.role, n.status) {
            _ if &n.id == leader => Some(ManagerStatus::Leader),
            (Role::Manager, NodeStatus::Ready) => Some(ManagerStatus::Reachable),
            (Role::Manager, NodeStatus::Down) => Some(ManagerStatus::Unreachable),
            (Role::Worker, _) => None,
        },
        role: n.role,
        gossip: None,
        gossip_key: None,
    }
}

pub fn network_info(n: &Network) -> NetworkInfo {
    NetworkInfo { id: n.id.clone(), name: n.name.clone(), driver: n.driver, scope: Scope::Swarm, attachable: n.attachable, subnet: n.subnet, gateway: n.gateway, vni: n.vni, ingress: n.ingress }
}

pub fn net_name(st: &ClusterState, id: &Id) -> String {
    st.networks.get(id).map_or_else(|| id.clone(), |n| n.name.clone())
}

pub fn service_info(s: &Service, st: &ClusterState) -> ServiceInfo {
    let running = st.tasks.values().filter(|t| t.service_id.as_ref() == Some(&s.id) && t.desired_state == DesiredState::Running && t.state == TaskState::Running).count() as u64;
    let (mode, desired) = match s.mode {
        ServiceMode::Replicated { replicas } => (ServiceModeName::Replicated, replicas),
        ServiceMode::Global => {
            let ready = st.ready_nodes().map(|n| n.id.clone()).collect();
            (ServiceModeName::Global, crate::ops::eligible_nodes(st, s, &ready).0.len() as u64)
        }
    };
    ServiceInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        mode,
        replicas: format!("{running}/{desired}"),
        desired_replicas: desired,
        running_replicas: running,
        networks: s.networks.iter().map(|n| net_name(st, n)).collect(),
        endpoint_mode: s.endpoint_mode,
        vips: s.vips.iter().map(|(n, v)| (net_name(st, n), *v)).collect(),
        aliases: s.aliases.iter().map(|(n, a)| (net_name(st, n), a.clone())).collect(),
        ports: s.ports.clone(),
        command: s.command.clone(),
        constraints: s.constraints.iter().map(ToString::to_string).collect(),
        labels: s.labels.clone(),
        env: s.env.clone(),
        version: s.version,
        update_config: s.update,
        update_status: s.update_status.clone(),
    }
}

/// The routing-mesh problems of ready nodes that touch `svc`'s published ports, as
/// "node <hostname>: <what>" (sorted).
pub fn mesh_warnings(svc: &Service, st: &ClusterState, all: &HashMap<Id, Vec<MeshWarning>>) -> Vec<String> {
    if svc.ports.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (node, ws) in all {
        let Some(n) = st.nodes.get(node).filter(|n| n.status == NodeStatus::Ready) else { continue };
        for w in ws {
            let touches = match w.port {
                None => true,
                Some((proto, port)) => svc.ports.iter().any(|p| p.protocol == proto && p.published == port),
            };
            if touches {
                out.push(format!("node {}: {}", n.hostname, w.message));
            }
        }
    }
    out.sort();
    out
}

pub fn task_info(t: &Task, st: &ClusterState) -> TaskInfo {
    TaskInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        node: t.node_id.as_ref().and_then(|id| st.nodes.get(id)).map(|n| n.hostname.clone()).unwrap_or_default(),
        node_id: t.node_id.clone(),
        desired_state: t.desired_state,
        state: t.state,
        error: t.error.clone(),
        addresses: t.addresses.iter().map(|(n, a)| (net_name(st, n), *a)).collect(),
        pid: t.pid,
        restarts: t.restarts,
        version: t.version,
        orphaned: t.desired_state == DesiredState::Shutdown && t.node_id.as_ref().and_then(|n| st.nodes.get(n)).is_some_and(|n| n.status != NodeStatus::Ready),
        service_id: t.service_id.clone(),
        slot: t.slot,
        since_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;

    fn node(id: &str, status: NodeStatus) -> Node {
        Node { status, ..Node::test(id, &format!("host-{id}")) }
    }

    fn state() -> ClusterState {
        let mut st = ClusterState::default();
        st.nodes.insert("a".into(), node("a", NodeStatus::Ready));
        st.nodes.insert("b".into(), node("b", NodeStatus::Down));
        let subnet = "10.0.1.0/24".parse().expect("subnet");
        st.networks.insert(
            "n1".into(),
            Network { id: "n1".into(), name: "appnet".into(), driver: Driver::Overlay, attachable: false, subnet, gateway: Ipv4Addr::new(10, 0, 1, 1), vni: 4096, ingress: false },
        );
        let svc = Service {
            id: "s1".into(),
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: 2 },
            networks: vec!["n1".into()],
            endpoint_mode: EndpointMode::Vip,
            ports: vec![Port { published: 8080, target: 80, protocol: Protocol::Tcp, mode: PublishMode::Ingress }],
            command: vec!["sleep".into()],
            vips: BTreeMap::from([("n1".into(), Ipv4Addr::new(10, 0, 1, 2))]),
            aliases: BTreeMap::new(),
            constraints: vec![],
            labels: BTreeMap::new(),
            env: Default::default(),
            version: 0,
            update: Default::default(),
            update_status: None,
        };
        st.services.insert("s1".into(), svc);
        for (i, (state, node)) in [(TaskState::Running, "a"), (TaskState::Assigned, "a")].into_iter().enumerate() {
            let id = format!("t{i}");
            st.tasks.insert(
                id.clone(),
                Task {
                    id,
                    name: format!("web.{}", i + 1),
                    service_id: Some("s1".into()),
                    slot: Some(i as u64 + 1),
                    node_id: Some(node.into()),
                    desired_state: DesiredState::Running,
                    state,
                    error: String::new(),
                    addresses: BTreeMap::from([("n1".into(), Ipv4Addr::new(10, 0, 1, 3 + i as u8))]),
                    networks: vec!["n1".into()],
                    command: vec!["sleep".into()],
                    restart: true,
                    restarts: 0,
                    pid: None,
                    aliases: BTreeMap::new(),
                    version: 0,
                    env: Default::default(),
                    container: None,
                },
            );
        }
        st
    }

    #[test]
    fn services_count_their_running_tasks_and_name_their_networks() {
        let st = state();
        let s = service_info(&st.services["s1"], &st);
        assert_eq!((s.replicas.as_str(), s.desired_replicas, s.running_replicas), ("1/2", 2, 1));
        assert_eq!(s.networks, vec!["appnet".to_string()]);
        assert_eq!(s.vips["appnet"], Ipv4Addr::new(10, 0, 1, 2));
        assert_eq!(s.mode, ServiceModeName::Replicated);
        let t = task_info(&st.tasks["t0"], &st);
        assert_eq!((t.node.as_str(), t.addresses["appnet"]), ("host-a", Ipv4Addr::new(10, 0, 1, 3)));
        assert_eq!(net_name(&st, &"gone".to_string()), "gone", "an unknown network shows its id");
    }

    #[test]
    fn the_leader_then_managers_by_status_and_workers_have_no_manager_status() {
        let mut st = state();
        let leader = "a".to_string();
        assert_eq!(node_info(&st.nodes["a"], &leader).manager_status, Some(ManagerStatus::Leader));
        assert_eq!(node_info(&st.nodes["b"], &leader).manager_status, None);
        assert_eq!(node_info(&st.nodes["b"], &leader).availability, Availability::Active);
        for (id, status) in [("m1", NodeStatus::Ready), ("m2", NodeStatus::Down)] {
            let mut n = node(id, status);
            n.role = Role::Manager;
            st.nodes.insert(id.into(), n);
        }
        assert_eq!(node_info(&st.nodes["m1"], &leader).manager_status, Some(ManagerStatus::Reachable));
        assert_eq!(node_info(&st.nodes["m2"], &leader).manager_status, Some(ManagerStatus::Unreachable));
    }

    #[test]
    fn mesh_warnings_of_ready_nodes_that_touch_a_services_ports() {
        let st = state();
        let mut all = HashMap::new();
        let w = |port: Option<(Protocol, u16)>, m: &str| MeshWarning { port, message: m.into() };
        all.insert("a".to_string(), vec![w(Some((Protocol::Tcp, 8080)), "shadowed 8080"), w(Some((Protocol::Tcp, 9090)), "shadowed 9090"), w(None, "no entry")]);
        all.insert("b".to_string(), vec![w(None, "node b is down")]);
        assert_eq!(mesh_warnings(&st.services["s1"], &st, &all), vec!["node host-a: no entry".to_string(), "node host-a: shadowed 8080".to_string()]);
    }
}
