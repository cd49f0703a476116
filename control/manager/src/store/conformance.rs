//! What every store must do, as one suite run against each implementation (redb in this
//! crate's unit tests, etcd in `tests/etcd_store.rs` against a real etcd). Test support:
//! it panics on the first difference.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::{diff, meta_write, ClusterMeta, Store};
use crate::model::*;
use crate::pki::CertKey;

/// A metadata record with made-up secrets (the store keeps it as it is).
pub fn sample_meta(cluster_id: &str) -> ClusterMeta {
    ClusterMeta {
        cluster_id: cluster_id.into(),
        ca: CertKey { cert_pem: "ca cert".into(), key_pem: "ca key".into() },
        worker_secret: "secret".into(),
        manager_secret: "manager secret".into(),
        manager_node_id: "m1".into(),
        manager_cert: CertKey { cert_pem: "cert".into(), key_pem: "key".into() },
        data_path_port: 4789,
        gossip_keys: vec![swarmnet_api::GossipKey { id: 1, key: "00".repeat(32) }],
        gossip_send: 1,
        removed_nodes: BTreeMap::new(),
    }
}

/// A state with a network, a service and `tasks` tasks (each about 400 bytes stored).
pub fn sample_state(tasks: usize) -> ClusterState {
    let mut st = ClusterState::default();
    let subnet: ipnetwork::Ipv4Network = "10.0.0.0/16".parse().expect("subnet");
    st.networks
        .insert("n1".into(), Network { id: "n1".into(), name: "appnet".into(), driver: Driver::Overlay, attachable: true, subnet, gateway: crate::ipam::gateway(subnet), vni: 4096, ingress: false });
    st.services.insert(
        "s1".into(),
        Service {
            id: "s1".into(),
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: tasks as u64 },
            networks: vec!["n1".into()],
            endpoint_mode: EndpointMode::Vip,
            ports: vec![],
            command: vec!["sleep".into(), "infinity".into()],
            vips: BTreeMap::from([("n1".into(), Ipv4Addr::new(10, 0, 0, 2))]),
            aliases: BTreeMap::new(),
            constraints: vec![],
            labels: BTreeMap::new(),
            env: Default::default(),
            version: 0,
            update: Default::default(),
            update_status: None,
        },
    );
    for i in 0..tasks {
        let id = format!("task{i:06}-{}", "x".repeat(24));
        st.tasks.insert(
            id.clone(),
            Task {
                id,
                name: format!("web.{}", i + 1),
                service_id: Some("s1".into()),
                slot: Some(i as u64 + 1),
                node_id: Some("m1".into()),
                desired_state: DesiredState::Running,
                state: TaskState::Running,
                error: String::new(),
                addresses: BTreeMap::from([("n1".into(), Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 1, 0)) + i as u32))]),
                networks: vec!["n1".into()],
                command: vec!["sleep".into(), "infinity".into()],
                restart: true,
                restarts: 0,
                pid: Some(1000 + i as u32),
                aliases: BTreeMap::new(),
                version: 0,
                env: Default::default(),
                container: None,
            },
        );
    }
    st
}

fn same_meta(a: &Option<ClusterMeta>, b: &ClusterMeta) {
    let a = a.as_ref().map(serde_json::to_value).transpose().expect("meta to json");
    assert_eq!(a, Some(serde_json::to_value(b).expect("meta to json")), "the metadata");
}

/// Runs the suite. `open` opens the same (initially empty) store again each time it is
/// called; the suite drops one store before it opens the next.
pub fn run(open: &mut dyn FnMut() -> Box<dyn Store>) {
    let s = open();
    assert!(!s.describe().is_empty());
    let (meta, st) = s.load().expect("load an empty store");
    assert!(meta.is_none(), "an empty store has no cluster");
    assert_eq!(st, ClusterState::default());
    s.commit(&[]).expect("an empty commit does nothing");

    // The cluster's metadata and its first objects, then changes and deletes.
    let meta = sample_meta("c1");
    s.commit(&[meta_write(&meta).expect("meta")]).expect("commit the metadata");
    let one = sample_state(3);
    s.commit(&diff(&ClusterState::default(), &one).expect("diff")).expect("commit objects");
    let mut two = one.clone();
    two.networks.get_mut("n1").expect("n1").name = "renamed".into();
    let first = two.tasks.keys().next().cloned().expect("a task");
    two.tasks.remove(&first);
    two.services.get_mut("s1").expect("s1").mode = ServiceMode::Replicated { replicas: 2 };
    s.commit(&diff(&one, &two).expect("diff")).expect("commit changes");
    let (m, st) = s.load().expect("load");
    same_meta(&m, &meta);
    assert_eq!(st, two, "puts, changes and deletes");

    // One commit larger than an etcd request may be (5,000 objects, about 2 MB).
    let big = sample_state(5_000);
    s.commit(&diff(&two, &big).expect("diff")).expect("commit 5,000 objects at once");
    assert_eq!(s.load().expect("load").1, big, "a large commit");

    // Many small commits.
    let mut cur = big.clone();
    for i in 0..300u32 {
        let mut next = cur.clone();
        let t = next.tasks.values_mut().nth(i as usize).expect("task");
        t.restarts = i + 1;
        t.state = TaskState::Failed;
        s.commit(&diff(&cur, &next).expect("diff")).expect("small commit");
        cur = next;
    }
    assert_eq!(s.load().expect("load").1, cur, "300 small commits");

    // What was committed is there for the next one to open the store.
    drop(s);
    let s = open();
    let (m, st) = s.load().expect("load after reopening");
    same_meta(&m, &meta);
    assert_eq!(st, cur, "after reopening");

    // And removing everything leaves an empty state (the metadata stays).
    s.commit(&diff(&cur, &ClusterState::default()).expect("diff")).expect("remove all");
    let (m, st) = s.load().expect("load");
    same_meta(&m, &meta);
    assert_eq!(st, ClusterState::default());
}
