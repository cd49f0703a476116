//! Managers on etcd (issue 20, ADR 0022). Lab tests: root, network namespaces, and etcd
//! members (Debian's `etcd-server`) on hosts of their own on the lab's underlay.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use swarmnet_lab::{in_ns, wait_for, Lab};

const T: Duration = Duration::from_secs(60);

/// service ps as task name → (node, addresses), for the running tasks.
fn placement(lab: &Lab, service: &str) -> Result<BTreeMap<String, String>> {
    let ps = lab.cli_json(0, &["service", "ps", service])?;
    let mut out = BTreeMap::new();
    for t in ps.as_array().into_iter().flatten() {
        if t["state"] == "running" {
            out.insert(t["name"].as_str().unwrap_or_default().to_string(), format!("{} {} {}", t["id"], t["node"], t["addresses"]));
        }
    }
    Ok(out)
}

fn inspect(lab: &Lab, service: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", service])?)?)
}

fn etcd_keys(lab: &Lab) -> Result<Vec<String>> {
    let m = &lab.etcd[0];
    let out = in_ns(&m.ns, &["env", "ETCDCTL_API=3", "etcdctl", "--endpoints", &format!("{}:2379", m.addr), "get", "--prefix", "--keys-only", "/swarmnet/"])?;
    Ok(out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect())
}

/// The manager keeps the cluster in etcd, not on its disk: killed and started again it finds
/// every network, service, task and address there; a store that is not its cluster's, or
/// that cannot be reached, stops it with an error that names the store.
#[test]
fn a_manager_on_etcd_keeps_the_cluster_in_etcd() -> Result<()> {
    let mut lab = Lab::up_etcd("snh-one", 3, 3, 1.0, 1, &[])?;
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--publish", "8080:80", "--", "python3", "-m", "http.server", "80"])?;
    lab.wait_service("web", 3, T)?;
    let before = placement(&lab, "web")?;
    let vip = inspect(&lab, "web")?["vips"].clone();
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(!lab.nodes[0].data_dir.join("manager.redb").exists(), "nothing of the cluster on the manager's disk");
    let keys = etcd_keys(&lab)?;
    assert!(keys.iter().any(|k| k == "/swarmnet/cluster") && keys.iter().any(|k| k.starts_with("/swarmnet/log/")), "the cluster is in etcd: {keys:?}");

    // Killed and started again: the same cluster, the same tasks where they were.
    lab.stop_node(0, libc::SIGKILL)?;
    lab.start_node(0)?;
    lab.wait_ready(3, T)?;
    assert_eq!(placement(&lab, "web")?, before, "the same tasks, nodes and addresses");
    assert_eq!(inspect(&lab, "web")?["vips"], vip);
    // And it takes changes.
    lab.cli_ok(0, &["service", "scale", "web=4"])?;
    lab.wait_service("web", 4, T)?;
    let client = lab.outside_client()?;
    let url = format!("http://{}:8080/", lab.nodes[2].addr);
    wait_for("the published port answers", T, || {
        let page = in_ns(&client, &["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &url]).ok()?;
        (page.trim() == "200").then_some(())
    })?;

    // Bad input. A prefix that holds no cluster while the node belongs to one:
    lab.stop_node(0, libc::SIGTERM)?;
    let store = format!("etcd://{}", lab.etcd_endpoints());
    lab.set_manager_args(&["--store", &store, "--store-prefix", "/elsewhere"]);
    if lab.start_node(0).is_ok() {
        bail!("the manager started on a prefix without its cluster: {}", lab.log(0));
    }
    let log = lab.log(0);
    assert!(log.contains("holds no cluster") && log.contains("/elsewhere"), "the error names the store: {log}");
    // etcd that cannot be reached (its member stopped):
    lab.stop_etcd(0, libc::SIGKILL)?;
    lab.set_manager_args(&["--store", &store]);
    let t = std::time::Instant::now();
    if lab.start_node(0).is_ok() {
        bail!("the manager started without its store");
    }
    let log = lab.log(0);
    assert!(log.contains(&store), "the error names the endpoints: {log}");
    assert!(t.elapsed() < Duration::from_secs(20), "refused within the timeout, not hung");
    // The dataplane does not need the manager: the published port still answers.
    let page = in_ns(&client, &["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}:8080/", lab.nodes[1].addr)])?;
    assert_eq!(page.trim(), "200");
    Ok(())
}
