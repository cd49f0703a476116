//! The ingress routing mesh on the lab (issue 10): published ports answer on every node from
//! a client outside the cluster (a namespace on the lab's underlay), round robin over the
//! service's tasks on all nodes, with the client's own address seen by the task; from the
//! node itself and from a task too; host mode; port changes of a running service; drain;
//! a node that dies; removal frees the port. Real sockets (`ingress_client.py`) against the
//! test server (`ingress_server.py`). Needs root, python3 and nft.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use swarmnet_lab::{in_netns_of, in_ns, wait_for, Lab, UNDERLAY_PREFIX};

const T: Duration = Duration::from_secs(30);
const TARGET: &str = "8000";
const SIGKILL: i32 = 9;

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name).display().to_string()
}

fn client_ip() -> String {
    format!("{UNDERLAY_PREFIX}.250")
}

/// Runs the client in namespace `ns` and parses what it prints.
fn client(ns: &str, args: &[&str]) -> Result<Value> {
    let c = script("ingress_client.py");
    let mut a = vec!["python3", c.as_str()];
    a.extend_from_slice(args);
    let out = in_ns(ns, &a)?;
    serde_json::from_str(out.trim()).with_context(|| format!("client output: {out}"))
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object().map(|m| m.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect()).unwrap_or_default()
}

/// Each of `names` got `total / names.len()` within ±10 %, and nobody else got any.
fn assert_even(what: &str, got: &BTreeMap<String, u64>, names: &[String], total: u64) {
    let share = total / names.len() as u64;
    let keys: Vec<&String> = got.keys().collect();
    assert_eq!(keys, names.iter().collect::<Vec<_>>(), "{what}: exactly these tasks answered: {got:?}");
    for (k, n) in got {
        assert!(n.abs_diff(share) <= share / 10, "{what}: {k} got {n} of {total}, not {share} ± 10 %: {got:?}");
    }
}

/// Connections the node's nftables table handed out on `proto`/`port` (its backend chains'
/// counters): what the eBPF entry left to the kernel's path.
fn table_count(ns: &str, proto: &str, port: u16) -> Result<u64> {
    let text = in_ns(ns, &["nft", "list", "table", "ip", "swarmnet-ingress"])?;
    let mut chain = "";
    let mut n = 0;
    for l in text.lines().map(str::trim) {
        if let Some(c) = l.strip_prefix("chain ") {
            chain = c.trim_end_matches(" {");
        } else if chain.starts_with(&format!("b_{proto}_{port}_")) {
            if let Some(p) = l.split("counter packets ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse::<u64>().ok()) {
                n += p;
            }
        }
    }
    Ok(n)
}

/// The node index (0-based) a task runs on.
fn node_of(lab: &Lab, task: &Value) -> Result<usize> {
    let host = task["node"].as_str().context("task node")?;
    lab.nodes.iter().position(|n| n.ns == host).with_context(|| format!("task on unknown node {host}"))
}

/// Waits until node `i` lists `port/proto` in `lb ls` with `n` active backends.
fn wait_port(lab: &Lab, i: usize, port: u16, proto: &str, n: usize) -> Result<Value> {
    wait_for(&format!("node {} answering {port}/{proto} with {n} active tasks", i + 1), T, || {
        let t = lab.cli_json(i, &["lb", "ls"]).ok()?;
        let p = t["ports"].as_array()?.iter().find(|p| p["published"] == port && p["protocol"] == proto)?.clone();
        let active = p["backends"].as_array()?.iter().filter(|b| b["state"] == "active").count();
        (active == n).then_some(p)
    })
}

/// Waits until every node answers `port` (TCP) from the outside with a task of `svc`.
fn wait_reachable(lab: &Lab, cl: &str, port: &str, svc: &str) -> Result<()> {
    for n in &lab.nodes {
        wait_for(&format!("{}:{port} answering from outside", n.addr), T, || {
            let r = client(cl, &["reach", &n.addr, port]).ok()?;
            r["reached"].as_str().is_some_and(|s| s.starts_with(&format!("{svc}."))).then_some(())
        })?;
    }
    Ok(())
}

fn web_lab(name: &str, nodes: usize, replicas: usize, publish: &[&str]) -> Result<(Lab, String)> {
    let lab = Lab::up(name, nodes, nodes, 1.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    let server = script("ingress_server.py");
    let r = replicas.to_string();
    let mut a = vec!["service", "create", "--name", "web", "--replicas", &r, "--network", "appnet"];
    for p in publish {
        a.push("--publish");
        a.push(p);
    }
    a.extend_from_slice(&["--", "python3", &server, TARGET]);
    lab.cli_ok(0, &a)?;
    lab.wait_service("web", replicas, T)?;
    let cl = lab.outside_client()?;
    Ok((lab, cl))
}

/// Every node answers a published port from outside, spread over all tasks, with the
/// client's own address seen by the task: TCP and UDP, through a node without a task too;
/// from the node itself and from a task; `lb ls` reads it back.
#[test]
fn every_node_answers_round_robin_with_the_client_address() -> Result<()> {
    let (lab, cl) = web_lab("snx-ing", 3, 2, &["8080:8000", "8080:8000/udp"])?;
    let tasks = lab.running_tasks("web")?;
    let with: Vec<usize> = tasks.iter().map(|t| node_of(&lab, t)).collect::<Result<_>>()?;
    let empty = (0..3).find(|i| !with.contains(i)).context("a node without a task")?;
    let names = vec!["web.1".to_string(), "web.2".to_string()];
    wait_port(&lab, empty, 8080, "tcp", 2)?;
    wait_reachable(&lab, &cl, "8080", "web")?;
    let me = client_ip();

    // Through the node that runs no task: the mesh, by the node's eBPF entry (ADR 0015).
    let addr = lab.nodes[empty].addr.clone();
    let entry = lab.cli_json(empty, &["lb", "ls"])?;
    assert_eq!(entry["mesh_entry"], "ebpf", "clients from outside enter by the eBPF entry: {entry}");
    let (tcp0, udp0) = (table_count(&lab.nodes[empty].ns, "tcp", 8080)?, table_count(&lab.nodes[empty].ns, "udp", 8080)?);
    let r = client(&cl, &["tcp", &addr, "8080", "600"])?;
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_even("600 connections through a node without a task", &counts(&r["counts"]), &names, 600);
    assert_eq!(counts(&r["peers"]), BTreeMap::from([(me.clone(), 600)]), "every task saw the client's own address: {r}");
    let r = client(&cl, &["udp", &addr, "8080", "200"])?;
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["bad_source"], serde_json::json!([]), "replies come from the address asked: {r}");
    assert_even("200 UDP flows through a node without a task", &counts(&r["counts"]), &names, 200);
    assert_eq!(counts(&r["peers"]), BTreeMap::from([(me.clone(), 200)]), "{r}");
    // None of them went by the node's nftables table.
    let (tcp1, udp1) = (table_count(&lab.nodes[empty].ns, "tcp", 8080)?, table_count(&lab.nodes[empty].ns, "udp", 8080)?);
    assert_eq!((tcp1 - tcp0, udp1 - udp0), (0, 0), "the eBPF entry took every flow from outside (the table counted the rest)");

    // Through the nodes that run one.
    for &i in &with {
        let r = client(&cl, &["tcp", &lab.nodes[i].addr, "8080", "100"])?;
        assert_eq!(r["errors"], serde_json::json!([]), "{r}");
        assert_even(&format!("through node {}", i + 1), &counts(&r["counts"]), &names, 100);
        assert_eq!(counts(&r["peers"]), BTreeMap::from([(me.clone(), 100)]), "{r}");
    }

    // From a node itself: localhost and its own address, and another node's address.
    let ns = &lab.nodes[empty].ns;
    for target in ["127.0.0.1", addr.as_str(), lab.nodes[with[0]].addr.as_str()] {
        let r = client(ns, &["reach", target, "8080"])?;
        assert!(r["reached"].as_str().is_some_and(|s| s.starts_with("web.")), "from node {}: {target}:8080: {r}", empty + 1);
    }
    // From a task to a node's address (its own node's, and another's).
    let pid = tasks[0]["pid"].as_u64().context("pid")? as u32;
    let c = script("ingress_client.py");
    for node in [&lab.nodes[with[0]].addr, &addr] {
        let out = in_netns_of(pid, &["python3", &c, "reach", node, "8080"])?;
        let r: Value = serde_json::from_str(out.trim())?;
        assert!(r["reached"].as_str().is_some_and(|s| s.starts_with("web.")), "from task web: {node}:8080: {r}");
    }

    // `lb ls` reads the kernel's table: the port, its mode, both tasks, what each got.
    let p = wait_port(&lab, empty, 8080, "tcp", 2)?;
    assert_eq!(p["mode"], "ingress", "{p}");
    assert_eq!(p["service"], "web", "{p}");
    let handed: u64 = p["backends"].as_array().context("backends")?.iter().filter_map(|b| b["connections"].as_u64()).sum();
    assert!(handed >= 600, "600 connections or more were handed out through node {}: {p}", empty + 1);
    let table = lab.cli_ok(empty, &["lb", "ls"])?;
    assert!(table.contains("8080/tcp") && table.contains("ingress") && table.contains("web.1"), "{table}");

    // A process on a node bound to a published port gets nothing of it, and is named.
    let listener = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "python3",
            "-c",
            "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(8)\ntime.sleep(120)",
        ])
        .spawn()?;
    let shadow = (|| -> Result<()> {
        wait_for("the local listener bound", T, || in_ns(ns, &["ss", "-Hltn", "sport = :8080"]).ok().filter(|o| o.contains("8080")))?;
        lab.cli_ok(0, &["service", "update", "web", "--publish-add", "9191:8000"])?;
        let t = wait_for("lb ls naming the shadowed port", T, || {
            let t = lab.cli_json(empty, &["lb", "ls"]).ok()?;
            t["ports_warning"].as_str().is_some_and(|w| w.contains("bound to published port 8080/tcp")).then_some(t)
        })?;
        let r = client(&cl, &["reach", &addr, "8080"])?;
        assert!(r["reached"].as_str().is_some_and(|s| s.starts_with("web.")), "the mesh keeps the port: {r} {t}");
        assert!(lab.log(empty).contains("bound to a published port"), "the daemon's log says so");
        // And `service ps` (the manager holds every node's word).
        let want = format!("warning: node {}: a process on this node is bound to published port 8080/tcp", lab.nodes[empty].ns);
        wait_for("service ps naming the shadowed port and its node", T, || {
            let out = lab.cli(0, &["service", "ps", "web"]).ok()?;
            String::from_utf8_lossy(&out.stderr).contains(&want).then_some(())
        })?;
        Ok(())
    })();
    let mut listener = listener;
    let _ = listener.kill();
    let _ = listener.wait();
    shadow?;

    // A running service's ports change without restarting its tasks.
    let before: Vec<Value> = tasks.iter().map(|t| t["id"].clone()).collect();
    lab.cli_ok(0, &["service", "update", "web", "--publish-add", "9090:8000", "--publish-rm", "8080/tcp"])?;
    wait_reachable(&lab, &cl, "9090", "web")?;
    for n in &lab.nodes {
        wait_for(&format!("{}:8080/tcp no longer answering", n.addr), T, || {
            let r = client(&cl, &["reach", &n.addr, "8080"]).ok()?;
            r.get("error").is_some().then_some(())
        })?;
    }
    let r = client(&cl, &["udp", &addr, "8080", "10"])?;
    assert_eq!(r["errors"], serde_json::json!([]), "8080/udp stays: {r}");
    let after: Vec<Value> = lab.running_tasks("web")?.iter().map(|t| t["id"].clone()).collect();
    assert_eq!(before, after, "the same tasks go on");
    // The local listener is gone and 8080/tcp with it: `service ps` warns no more.
    wait_for("service ps without warnings", T, || {
        let out = lab.cli(0, &["service", "ps", "web"]).ok()?;
        (out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("warning")).then_some(())
    })?;

    // Removing the service frees the port on every node.
    lab.cli_ok(0, &["service", "rm", "web"])?;
    for n in &lab.nodes {
        wait_for(&format!("{}:9090 freed", n.addr), T, || {
            let r = client(&cl, &["reach", &n.addr, "9090"]).ok()?;
            r["error"].as_str().is_some_and(|e| e.contains("refused")).then_some(())
        })?;
    }
    Ok(())
}

/// Host mode: the port answers only where a task runs, straight to that node's task; a
/// second task for the port on a node is not started, and `service ps` says why.
#[test]
fn host_mode_answers_only_where_a_task_runs() -> Result<()> {
    let (lab, cl) = web_lab("snx-inghost", 3, 2, &["published=8081,target=8000,mode=host"])?;
    let tasks = lab.running_tasks("web")?;
    let me = client_ip();
    let mut with = Vec::new();
    for t in &tasks {
        let i = node_of(&lab, t)?;
        with.push(i);
        let name = t["name"].as_str().context("name")?;
        wait_port(&lab, i, 8081, "tcp", 1)?;
        let addr = &lab.nodes[i].addr;
        let r = wait_for(&format!("{addr}:8081 answering"), T, || client(&cl, &["tcp", addr, "8081", "20"]).ok().filter(|r| r["errors"] == serde_json::json!([])))?;
        assert_eq!(counts(&r["counts"]), BTreeMap::from([(name.to_string(), 20)]), "straight to the node's own task: {r}");
        assert_eq!(counts(&r["peers"]), BTreeMap::from([(me.clone(), 20)]), "{r}");
    }
    let empty = (0..3).find(|i| !with.contains(i)).context("a node without a task")?;
    let r = client(&cl, &["reach", &lab.nodes[empty].addr, "8081"])?;
    assert!(r["error"].as_str().is_some_and(|e| e.contains("refused")), "no task, no port on node {}: {r}", empty + 1);

    lab.cli_ok(0, &["service", "scale", "--detach", "web=4"])?;
    wait_for("the fourth task pending with the reason", T, || {
        let ps = lab.cli_json(0, &["service", "ps", "web"]).ok()?;
        let stuck: Vec<Value> = ps.as_array()?.iter().filter(|t| t["state"] == "pending").cloned().collect();
        (stuck.len() == 1 && stuck[0]["error"].as_str()?.contains("host-mode port 8081/tcp is taken on all 3 ready nodes")).then_some(())
    })?;
    wait_for("three tasks running, one per node", T, || (lab.running_tasks("web").ok()?.len() == 3).then_some(()))?;
    let ps = lab.cli_ok(0, &["service", "ps", "web"])?;
    assert!(ps.contains("host-mode port 8081/tcp"), "{ps}");
    Ok(())
}

/// A task leaving drains (established connections go on, new ones go elsewhere), hostile
/// packets harm nothing, and a node that dies stops receiving mesh traffic while the other
/// nodes keep answering.
#[test]
fn drain_and_a_node_that_dies() -> Result<()> {
    let (mut lab, cl) = web_lab("snx-ingdrain", 3, 3, &["8082:8000"])?;
    // Node 1 is the manager: the entry point here. Kill another node later.
    let entry = lab.nodes[0].addr.clone();
    wait_port(&lab, 0, 8082, "tcp", 3)?;
    wait_reachable(&lab, &cl, "8082", "web")?;
    let dir = std::env::temp_dir().join(format!("snx-ingdrain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let d = dir.display().to_string();
    let c = script("ingress_client.py");
    let holder = std::process::Command::new("ip").args(["netns", "exec", &cl, "python3", &c, "hold", &entry, "8082", "web.3", &d]).stdout(std::process::Stdio::null()).spawn()?;
    let result = (|| -> Result<()> {
        wait_for("a connection held to web.3", T, || dir.join("held").exists().then_some(()))?;
        // Hostile packets harm nothing: segments of the held connection out of its window
        // (no reset may reach either end: k8s #74839), a SYN scan, garbage datagrams.
        let held = std::fs::read_to_string(dir.join("held"))?;
        let port = held.split_whitespace().nth(1).context("the held connection's port")?.to_string();
        let craft = script("craft.py");
        let me = client_ip();
        for args in [vec!["invalid", me.as_str(), entry.as_str(), port.as_str(), "8082"], vec!["scan", me.as_str(), entry.as_str(), "8082"]] {
            let mut a = vec!["python3", craft.as_str()];
            a.extend(args);
            let out: Value = serde_json::from_str(in_ns(&cl, &a)?.trim())?;
            assert!(out["sent"].as_u64().is_some_and(|n| n > 0), "{out}");
        }
        let r = client(&cl, &["tcp", &entry, "8082", "30"])?;
        assert_eq!(r["errors"], serde_json::json!([]), "new connections after the hostile packets: {r}");
        lab.cli_ok(0, &["service", "scale", "--detach", "web=2"])?;
        wait_for("web.3 out of node 1's rotation", T, || {
            let t = lab.cli_json(0, &["lb", "ls"]).ok()?;
            let p = t["ports"].as_array()?.iter().find(|p| p["published"] == 8082)?.clone();
            let b = p["backends"].as_array()?;
            let active: Vec<&Value> = b.iter().filter(|b| b["state"] == "active").collect();
            (active.len() == 2 && !active.iter().any(|b| b["task"] == "web.3")).then_some(())
        })?;
        let r = client(&cl, &["tcp", &entry, "8082", "60"])?;
        assert_eq!(r["errors"], serde_json::json!([]), "{r}");
        assert!(!counts(&r["counts"]).contains_key("web.3"), "no new connection reaches the leaving task: {r}");
        std::fs::write(dir.join("go"), b"")?;
        let res = wait_for("the holder's result", T, || std::fs::read_to_string(dir.join("result")).ok())?;
        let res: Value = serde_json::from_str(&res)?;
        assert_eq!(res["ok"], true, "the established connection goes on (through the hostile packets and the drain): {res}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let mut holder = holder;
    let _ = holder.wait();
    result?;

    // A node that dies (its daemon killed, its underlay cut): the others stop sending to
    // its task (the manager starts a replacement elsewhere, under the same name) and keep
    // answering.
    let tasks = lab.running_tasks("web")?;
    let victim_task = tasks.iter().find(|t| node_of(&lab, t).is_ok_and(|i| i != 0)).context("a task off node 1")?.clone();
    let victim = node_of(&lab, &victim_task)?;
    let dead_ip = victim_task["addresses"]["ingress"].as_str().context("the task's ingress address")?.to_string();
    lab.stop_node(victim, SIGKILL)?;
    in_ns(&lab.nodes[victim].ns, &["ip", "link", "set", "eth0", "down"])?;
    for i in (0..3).filter(|&i| i != victim) {
        wait_for(&format!("node {} no longer sending to {dead_ip} (node {} is dead)", i + 1, victim + 1), Duration::from_secs(45), || {
            let t = lab.cli_json(i, &["lb", "ls"]).ok()?;
            let p = t["ports"].as_array()?.iter().find(|p| p["published"] == 8082)?.clone();
            (!p["backends"].as_array()?.iter().any(|b| b["ip"] == dead_ip.as_str())).then_some(())
        })?;
        let addr = lab.nodes[i].addr.clone();
        let r = wait_for(&format!("{addr}:8082 answering every connection"), T, || client(&cl, &["tcp", &addr, "8082", "20"]).ok().filter(|r| r["errors"] == serde_json::json!([])))?;
        assert_eq!(counts(&r["counts"]).values().sum::<u64>(), 20, "{r}");
    }
    Ok(())
}

/// An agent killed and restarted: its eBPF entry stays attached while it is down (pinned),
/// a connection that entered by it goes on, and the restarted agent adopts the program
/// (replaced in its pinned link, not attached twice) and its maps.
#[test]
fn an_agent_restart_keeps_the_entry_and_its_flows() -> Result<()> {
    let (mut lab, cl) = web_lab("snx-ingrst", 3, 2, &["8083:8000"])?;
    let tasks = lab.running_tasks("web")?;
    let with: Vec<usize> = tasks.iter().map(|t| node_of(&lab, t)).collect::<Result<_>>()?;
    // An agent (not the manager), preferably one without a task.
    let i = (1..3).find(|i| !with.contains(i)).unwrap_or(1);
    let addr = lab.nodes[i].addr.clone();
    wait_port(&lab, i, 8083, "tcp", 2)?;
    wait_reachable(&lab, &cl, "8083", "web")?;
    let dir = std::env::temp_dir().join(format!("snx-ingrst-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let d = dir.display().to_string();
    let c = script("ingress_client.py");
    let holder = std::process::Command::new("ip").args(["netns", "exec", &cl, "python3", &c, "hold", &addr, "8083", "web.1", &d]).stdout(std::process::Stdio::null()).spawn()?;
    let result = (|| -> Result<()> {
        wait_for("a connection held to web.1", T, || dir.join("held").exists().then_some(()))?;
        lab.stop_node(i, SIGKILL)?;
        // While the agent is down the entry keeps answering from its pinned maps.
        let r = client(&cl, &["tcp", &addr, "8083", "20"])?;
        assert_eq!(r["errors"], serde_json::json!([]), "node {} answers with its agent down: {r}", i + 1);
        lab.start_node(i)?;
        wait_for(&format!("node {}'s agent adopting its eBPF entry", i + 1), T, || lab.log(i).contains("adopted=true").then_some(()))?;
        wait_port(&lab, i, 8083, "tcp", 2)?;
        std::fs::write(dir.join("go"), b"")?;
        let res = wait_for("the holder's result", T, || std::fs::read_to_string(dir.join("result")).ok())?;
        let res: Value = serde_json::from_str(&res)?;
        assert_eq!(res["ok"], true, "the connection that entered before the restart goes on: {res}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let mut holder = holder;
    let _ = holder.wait();
    result?;
    let before = table_count(&lab.nodes[i].ns, "tcp", 8083)?;
    let r = client(&cl, &["tcp", &addr, "8083", "100"])?;
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_even("100 connections after the restart", &counts(&r["counts"]), &["web.1".to_string(), "web.2".to_string()], 100);
    assert_eq!(table_count(&lab.nodes[i].ns, "tcp", 8083)? - before, 0, "the adopted entry took them all");
    Ok(())
}

/// Connects to port PORT of every ADDR every 20 ms until each has answered once (or 40 s
/// pass); prints `{addr: epoch seconds of its first answer}`.
const FIRST_ANSWER: &str = r#"
import json, socket, sys, time
port, addrs = int(sys.argv[1]), sys.argv[2:]
first, end = {}, time.time() + 40
while len(first) < len(addrs) and time.time() < end:
    for a in addrs:
        if a in first: continue
        try:
            c = socket.create_connection((a, port), timeout=0.2); c.close(); first[a] = time.time()
        except OSError:
            pass
    time.sleep(0.02)
print(json.dumps(first), flush=True)
"#;

/// A service published on a cluster that started a second ago answers on every node as soon
/// as its tasks run (before issue 19 the routing mesh waited for the end of its 5 s warm-up:
/// ECONNREFUSED for about 4 s after the tasks ran). A warm-up may hold back deletions, never
/// additions.
#[test]
fn a_just_started_clusters_published_port_answers_as_soon_as_its_tasks_run() -> Result<()> {
    let lab = Lab::up("snx-ingfresh", 3, 3, 1.0)?;
    let cl = lab.outside_client()?;
    let addrs: Vec<String> = lab.nodes.iter().map(|n| n.addr.clone()).collect();
    let mut args = vec!["netns", "exec", cl.as_str(), "python3", "-c", FIRST_ANSWER, "8080"];
    args.extend(addrs.iter().map(String::as_str));
    let prober = std::process::Command::new("ip").args(&args).stdout(std::process::Stdio::piped()).spawn()?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--publish", &format!("8080:{TARGET}"), "--", "python3", &script("ingress_server.py"), TARGET])?;
    let running = wait_for("web's 3 tasks running", T, || {
        lab.running_tasks("web").ok().filter(|t| t.len() == 3).map(|_| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0))
    })?;
    let out = prober.wait_with_output()?;
    let first: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("prober: {}", String::from_utf8_lossy(&out.stdout)))?;
    let mut after = Vec::new();
    for a in &addrs {
        let t = first[a.as_str()].as_f64().with_context(|| format!("node {a} never answered 8080: {first}"))?;
        after.push((a.clone(), t - running));
    }
    println!("INGRESS just-started cluster: first answer after the tasks ran (s): {}", after.iter().map(|(a, d)| format!("{a} {d:+.2}")).collect::<Vec<_>>().join(", "));
    for (a, d) in &after {
        // The goal is 1 s; this deadline leaves room for a busy machine, and still fails the
        // warm-up that held new ports back (about 4 s).
        assert!(*d < 2.0, "node {a} answered {d:.2} s after the tasks ran");
    }
    Ok(())
}
