//! Overlay networks on the lab: VXLAN between nodes, gossip-programmed neighbour and FDB
//! entries, isolation, interoperability with a hand-made Linux VXLAN, failure handling.
//! Needs root; fails with a message saying so without it.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use swarmnet_lab::{in_netns_of, in_ns, wait_for, Lab};

const T: Duration = Duration::from_secs(30);

const ECHO_SERVER: &str = r#"
import socket, threading
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7)); s.listen()
    while True:
        c, _ = s.accept(); c.sendall(c.recv(1024)); c.close()
threading.Thread(target=tcp, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 7))
while True:
    d, a = u.recvfrom(1024); u.sendto(d, a)
"#;

const ECHO_CLIENT: &str = r#"
import socket, sys
ip, proto, msg = sys.argv[1], sys.argv[2], sys.argv[3].encode()
if proto == "tcp":
    s = socket.create_connection((ip, 7), timeout=2); s.sendall(msg); print(s.recv(100).decode())
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(msg, (ip, 7)); print(s.recvfrom(100)[0].decode())
"#;

fn pid(t: &Value) -> u32 {
    t["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("running task has a pid")
}

/// Sends `msg` from inside process `from`'s namespace to `ip` and returns the echo.
fn echo(from: u32, ip: &str, proto: &str, msg: &str) -> Result<String> {
    Ok(in_netns_of(from, &["python3", "-c", ECHO_CLIENT, ip, proto, msg])?.trim().to_string())
}

fn echo_eventually(from: u32, ip: &str, proto: &str) -> Result<String> {
    wait_for(&format!("{proto} echo to {ip}"), T, || echo(from, ip, proto, "ping").ok().filter(|s| s == "ping"))
}

fn echo_service(lab: &Lab, name: &str, replicas: &str, networks: &[&str]) -> Result<()> {
    let mut args = vec!["service", "create", "--name", name, "--replicas", replicas];
    for n in networks {
        args.extend(["--network", n]);
    }
    args.extend(["--", "python3", "-c", ECHO_SERVER]);
    lab.cli_ok(0, &args)?;
    Ok(())
}

/// The holder pid of the sandbox of network `net_id` on node `i`.
fn sandbox_of(lab: &Lab, i: usize, net_id: &str) -> Option<u32> {
    let holders: Value = serde_json::from_slice(&std::fs::read(lab.nodes[i].data_dir.join("sandboxes").join("state.json")).ok()?).ok()?;
    holders[net_id]["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

/// Neighbour IPs and FDB (mac, dst) pairs.
type Entries = (BTreeSet<String>, BTreeSet<(String, String)>);

/// The entries programmed in node `i`'s sandbox for the network.
fn kernel_entries(lab: &Lab, i: usize, net: &Value) -> Result<Entries> {
    let id = net["id"].as_str().context("network id")?;
    let vx = format!("snvx{}", net["vni"]);
    let Some(holder) = sandbox_of(lab, i, id) else { return Ok((BTreeSet::new(), BTreeSet::new())) };
    let neigh: Value = serde_json::from_str(&in_netns_of(holder, &["ip", "-j", "neigh", "show", "dev", &vx, "nud", "permanent"])?)?;
    let fdb: Value = serde_json::from_str(&in_netns_of(holder, &["bridge", "-j", "fdb", "show", "dev", &vx])?)?;
    let n = neigh.as_array().map(|a| a.iter().filter_map(|e| e["dst"].as_str().map(str::to_string)).collect()).unwrap_or_default();
    let f = fdb.as_array().map(|a| a.iter().filter_map(|e| Some((e["mac"].as_str()?.to_string(), e["dst"].as_str()?.to_string()))).collect()).unwrap_or_default();
    Ok((n, f))
}

fn network(lab: &Lab, name: &str) -> Result<Value> {
    Ok(serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", name])?)?)
}

/// What node `i`'s sandbox should hold: every running task of the network on another node.
fn expected_entries(tasks: &[Value], net_name: &str, node_ns: &str, lab: &Lab) -> Entries {
    let mut n = BTreeSet::new();
    let mut f = BTreeSet::new();
    for t in tasks.iter().filter(|t| t["node"] != node_ns) {
        let Some(ip) = t["addresses"][net_name].as_str() else { continue };
        let o: Vec<u8> = ip.split('.').filter_map(|x| x.parse().ok()).collect();
        let mac = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        let vtep = lab.nodes.iter().find(|x| x.ns == t["node"].as_str().unwrap_or("")).map(|x| x.addr.clone()).unwrap_or_default();
        n.insert(ip.to_string());
        f.insert((mac, vtep));
    }
    (n, f)
}

#[test]
fn tasks_on_different_nodes_talk_tcp_and_udp_and_networks_are_isolated() -> Result<()> {
    let lab = Lab::up("snx-ovl", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "red"])?;
    lab.cli_ok(0, &["network", "create", "blue"])?;
    echo_service(&lab, "r", "3", &["red"])?;
    echo_service(&lab, "b", "3", &["blue"])?;
    echo_service(&lab, "both", "1", &["red", "blue"])?;
    let r = lab.wait_service("r", 3, T)?;
    let b = lab.wait_service("b", 3, T)?;
    let both = lab.wait_service("both", 1, T)?;
    let on = |ts: &[Value], node: usize| ts.iter().find(|t| t["node"] == format!("snx-ovl-n{node}")).cloned().context("task on node");
    // TCP and UDP from node 1 to node 3 and back, over VXLAN.
    let (r1, r3) = (on(&r, 1)?, on(&r, 3)?);
    let r3_ip = r3["addresses"]["red"].as_str().context("ip")?;
    let r1_ip = r1["addresses"]["red"].as_str().context("ip")?;
    assert_eq!(echo_eventually(pid(&r1), r3_ip, "tcp")?, "ping");
    assert_eq!(echo(pid(&r1), r3_ip, "udp", "hello-udp")?, "hello-udp");
    assert_eq!(echo(pid(&r3), r1_ip, "tcp", "back")?, "back");
    // Red cannot reach blue (different VNIs, different subnets, different sandboxes).
    let b3_ip = on(&b, 3)?["addresses"]["blue"].as_str().context("ip")?.to_string();
    echo_eventually(pid(&on(&b, 1)?), &b3_ip, "tcp")?;
    assert!(echo(pid(&r1), &b3_ip, "tcp", "x").is_err(), "red reaches blue's {b3_ip}");
    // A task on both networks reaches both, each on its own interface.
    let both = &both[0];
    let r_other = r.iter().find(|t| t["node"] != both["node"]).context("red task elsewhere")?;
    let b_other = b.iter().find(|t| t["node"] != both["node"]).context("blue task elsewhere")?;
    assert_eq!(echo_eventually(pid(both), r_other["addresses"]["red"].as_str().context("ip")?, "tcp")?, "ping");
    assert_eq!(echo_eventually(pid(both), b_other["addresses"]["blue"].as_str().context("ip")?, "udp")?, "ping");
    let routes = in_netns_of(pid(both), &["ip", "-br", "addr"])?;
    assert!(routes.contains("eth0") && routes.contains("eth1"), "{routes}");
    Ok(())
}

#[test]
fn a_hand_made_linux_vxlan_interoperates_with_a_task() -> Result<()> {
    // Node 2 runs no daemon: it gets a plain VXLAN made with iproute2 (RFC 7348 on 4789).
    let lab = Lab::up("snx-interop", 2, 1, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--subnet", "10.77.0.0/24", "plain"])?;
    echo_service(&lab, "e", "1", &["plain"])?;
    let t = lab.wait_service("e", 1, T)?;
    let task_ip = t[0]["addresses"]["plain"].as_str().context("ip")?.to_string();
    let net = network(&lab, "plain")?;
    let vni = net["vni"].to_string();
    let ns = &lab.nodes[1].ns;
    let peer_ip = "10.77.0.200";
    let peer_mac = "02:42:0a:4d:00:c8";
    let o: Vec<u8> = task_ip.split('.').filter_map(|x| x.parse().ok()).collect();
    let task_mac = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    for cmd in [
        vec!["ip", "link", "add", "snhand", "type", "vxlan", "id", &vni, "dstport", "4789", "local", "10.210.0.2", "nolearning", "proxy"],
        vec!["ip", "link", "set", "snhand", "address", peer_mac, "mtu", "1450", "up"],
        vec!["ip", "addr", "add", &format!("{peer_ip}/24"), "dev", "snhand"],
        vec!["ip", "neigh", "add", &task_ip, "lladdr", &task_mac, "dev", "snhand", "nud", "permanent"],
        vec!["bridge", "fdb", "add", &task_mac, "dev", "snhand", "dst", "10.210.0.1", "self", "permanent"],
    ] {
        in_ns(ns, &cmd)?;
    }
    // The swarmnet side learns of the hand-made endpoint the way it learns of any: through
    // its table. Here the test programs the sandbox by hand, as a remote node would be.
    let holder = wait_for("the sandbox", T, || sandbox_of(&lab, 0, net["id"].as_str().unwrap_or("")))?;
    let vx = format!("snvx{vni}");
    in_netns_of(holder, &["ip", "neigh", "replace", peer_ip, "lladdr", peer_mac, "dev", &vx, "nud", "permanent"])?;
    in_netns_of(holder, &["bridge", "fdb", "replace", peer_mac, "dev", &vx, "dst", "10.210.0.2", "self", "permanent"])?;
    let out = wait_for("echo from the hand-made VXLAN to the task", T, || in_ns(ns, &["python3", "-c", ECHO_CLIENT, &task_ip, "tcp", "interop"]).ok().map(|s| s.trim().to_string()))?;
    assert_eq!(out, "interop");
    assert_eq!(in_ns(ns, &["python3", "-c", ECHO_CLIENT, &task_ip, "udp", "interop-udp"])?.trim(), "interop-udp");
    Ok(())
}

#[test]
fn neighbour_and_fdb_entries_match_the_endpoints_exactly_through_scaling() -> Result<()> {
    let lab = Lab::up("snx-ovlscale", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--", "sleep", "3600"])?;
    let net = network(&lab, "appnet")?;
    for n in [3usize, 6, 1] {
        lab.cli_ok(0, &["service", "scale", &format!("web={n}")])?;
        let tasks = lab.wait_service("web", n, T)?;
        // A worker's `network inspect` shows the endpoints its own gossip holds.
        let want: BTreeSet<(String, String)> = tasks
            .iter()
            .map(|t| {
                let node = lab.nodes.iter().find(|x| x.ns == t["node"].as_str().unwrap_or("")).map(|x| x.addr.clone()).unwrap_or_default();
                (t["addresses"]["appnet"].as_str().unwrap_or("").to_string(), node)
            })
            .collect();
        let has_local = tasks.iter().any(|t| t["node"] == lab.nodes[1].ns.as_str());
        wait_for("the worker's view of the endpoints", T, || {
            let v: Value = serde_json::from_str(&lab.cli_ok(1, &["network", "inspect", "appnet"]).ok()?).ok()?;
            let got: BTreeSet<(String, String)> = v["local_endpoints"].as_array()?.iter().map(|e| (e["ip"].as_str().unwrap_or("").to_string(), e["vtep"].as_str().unwrap_or("").to_string())).collect();
            // A node with no task on the network does not take its entries.
            (if has_local { got == want } else { got.is_empty() }).then_some(())
        })?;
        for i in 0..3 {
            let node_ns = lab.nodes[i].ns.clone();
            let want = expected_entries(&tasks, "appnet", &node_ns, &lab);
            let has_local = tasks.iter().any(|t| t["node"] == node_ns.as_str());
            wait_for(&format!("entries on {node_ns} at {n} replicas: want {want:?}"), T, || {
                let got = kernel_entries(&lab, i, &net).ok()?;
                // A node without local tasks has no sandbox, hence no entries at all.
                let want = if has_local { want.clone() } else { (BTreeSet::new(), BTreeSet::new()) };
                (got == want).then_some(())
            })
            .with_context(|| format!("kernel has {:?}", kernel_entries(&lab, i, &net).ok()))?;
        }
    }
    Ok(())
}

#[test]
fn a_killed_agent_keeps_its_entries_and_comes_back_and_a_blip_removes_nothing() -> Result<()> {
    // Heartbeat 5 s: the manager does not reschedule within this test, gossip decides.
    let mut lab = Lab::up("snx-ovlfail", 3, 3, 5.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--", "sleep", "3600"])?;
    let tasks = lab.wait_service("web", 3, T)?;
    let net = network(&lab, "appnet")?;
    let t3 = tasks.iter().find(|t| t["node"] == "snx-ovlfail-n3").context("task on n3")?;
    let ip3 = t3["addresses"]["appnet"].as_str().context("ip")?.to_string();
    let present = |lab: &Lab, i: usize| kernel_entries(lab, i, &net).map(|(n, _)| n.contains(&ip3)).unwrap_or(false);
    wait_for("n3's task on n1 and n2", T, || (present(&lab, 0) && present(&lab, 1)).then_some(()))?;

    // Cut n3's underlay for less than the failure detector needs: nothing is removed.
    in_ns(&format!("{}-ul", lab.name), &["ip", "link", "set", "snv3", "down"])?;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        if !(present(&lab, 0) && present(&lab, 1)) {
            bail!("an entry was removed during a short underlay cut");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    in_ns(&format!("{}-ul", lab.name), &["ip", "link", "set", "snv3", "up"])?;
    // The cut as it really was: `ip link` waits for the kernel's lock, which the teardown of
    // earlier labs' namespaces can hold for a while.
    let cut = start.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        present(&lab, 0) && present(&lab, 1),
        "still there after a blip of {cut:?}: n1 {:?} n2 {:?}; logs:\n{}\n---\n{}\n---\n{}",
        kernel_entries(&lab, 0, &net),
        kernel_entries(&lab, 1, &net),
        lab.log(0).lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n"),
        lab.log(1).lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n"),
        lab.log(2).lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n")
    );
    for i in 0..2 {
        assert!(!lab.log(i).contains("gossip: node down"), "no node declared down after a blip:\n{}", lab.log(i));
    }

    // Kill -9 the agent of n3: gossip declares it down, but its host answers (its task
    // still runs): its entries stay everywhere (issue 12: a dead agent is not a dead host).
    lab.stop_node(2, libc::SIGKILL)?;
    wait_for("n3 unreachable in node ls", T, || {
        let nodes = lab.cli_json(0, &["node", "ls"]).ok()?;
        let n3 = nodes.as_array()?.iter().find(|n| n["hostname"] == "snx-ovlfail-n3")?.clone();
        (n3["gossip"] == "unreachable").then_some(())
    })?;
    for _ in 0..20 {
        assert!(present(&lab, 0) && present(&lab, 1), "n3's task stays reachable while its host is up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lab.log(0).contains("its entries stay while its host answers"), "the log says why the entries stay");
    // Start it again: it adopts its task and its sandbox, and publishes the task under a
    // new generation. The sandbox is the same one (not torn down and made again), and the
    // entries it held for the other nodes' tasks stay in place throughout.
    let net_id = net["id"].as_str().context("network id")?;
    let holder_before = sandbox_of(&lab, 2, net_id).context("n3's sandbox")?;
    let held = kernel_entries(&lab, 2, &net)?;
    assert_eq!(held.0.len(), 2, "n3 holds the other two tasks: {held:?}");
    lab.start_node(2)?;
    for _ in 0..40 {
        assert_eq!(kernel_entries(&lab, 2, &net)?, held, "n3's entries stay during its agent's restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sandbox_of(&lab, 2, net_id), Some(holder_before), "the sandbox was adopted, not rebuilt");
    wait_for("n3's entries back on n1 and n2", T, || (present(&lab, 0) && present(&lab, 1)).then_some(()))?;
    assert!(lab.log(2).contains("adopted a task"), "the restarted agent adopted its running task");
    Ok(())
}

#[test]
fn a_standalone_task_on_a_worker_reaches_service_tasks_and_back() -> Result<()> {
    let lab = Lab::up("snx-attach", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    echo_service(&lab, "svc", "1", &["appnet"])?;
    let svc = lab.wait_service("svc", 1, T)?;
    let svc_ip = svc[0]["addresses"]["appnet"].as_str().context("ip")?.to_string();
    // A worker without the service task runs the probe.
    let worker = (1..3).find(|i| svc[0]["node"] != lab.nodes[*i].ns.as_str()).context("a worker")?;
    let out = lab.cli(worker, &["run", "--name", "probe", "--network", "appnet", "--", "python3", "-c", ECHO_CLIENT, &svc_ip, "tcp", "from-probe"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from-probe");
    // And back: the service task reaches a detached standalone task.
    lab.cli_ok(worker, &["run", "--name", "listener", "--network", "appnet", "--detach", "--", "python3", "-c", ECHO_SERVER])?;
    let ep = wait_for("the listener's endpoint", T, || {
        let n = network(&lab, "appnet").ok()?;
        n["endpoints"].as_array()?.iter().find(|e| e["name"] == "listener").cloned()
    })?;
    let lip = ep["ip"].as_str().context("ip")?;
    assert_eq!(echo_eventually(pid(&svc[0]), lip, "udp")?, "ping");
    Ok(())
}

#[test]
fn the_clusters_data_path_port_is_used_by_every_node() -> Result<()> {
    let lab = Lab::up_with("snx-dport", 2, 2, 1.0, &["--data-path-port", "4790"])?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    echo_service(&lab, "e", "2", &["appnet"])?;
    let t = lab.wait_service("e", 2, T)?;
    let net = network(&lab, "appnet")?;
    let vx = format!("snvx{}", net["vni"]);
    for i in 0..2 {
        let holder = wait_for("sandbox", T, || sandbox_of(&lab, i, net["id"].as_str().unwrap_or("")))?;
        let link = in_netns_of(holder, &["ip", "-d", "link", "show", &vx])?;
        assert!(link.contains("dstport 4790"), "node {} vxlan: {link}", i + 1);
    }
    let ip = t[1]["addresses"]["appnet"].as_str().context("ip")?;
    assert_eq!(echo_eventually(pid(&t[0]), ip, "tcp")?, "ping");
    // No service may publish the cluster's data-path port; the default one is free here.
    let e = lab.cli_err(0, &["service", "create", "--name", "grab", "--publish", "4790:80/udp", "--", "sleep", "60"])?;
    assert!(e.contains("port 4790/udp is the cluster's own (the data path, VXLAN)"), "{e}");
    lab.cli_ok(0, &["service", "create", "--name", "free", "--replicas", "0", "--publish", "4789:80/udp", "--", "sleep", "60"])?;
    Ok(())
}
