//! Control plane on the one-machine lab: real daemons in real namespaces, real task
//! processes. Each test builds a lab of its own (named `snx-…`) and removes it after.
//! These tests need root; without it they fail with a message saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use swarmnet_lab::{in_netns_of, in_ns, pid_alive, wait_for, Lab};

const T: Duration = Duration::from_secs(30);

fn pid_of(task: &Value) -> u32 {
    task["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("running task has a pid")
}

fn nodes_of(tasks: &[Value]) -> Vec<String> {
    let mut n: Vec<String> = tasks.iter().map(|t| t["node"].as_str().unwrap_or("").to_string()).collect();
    n.sort();
    n
}

fn ns_inode(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).map(|p| p.display().to_string()).unwrap_or_default()
}

/// The task's kernel state: its own namespaces, the allocated address on eth0, the MAC
/// derived from it, the MTU of the underlay minus 50, a default route via the gateway.
fn check_task_kernel_state(lab: &Lab, task: &Value, gateway: &str) -> Result<()> {
    let pid = pid_of(task);
    let ip = task["addresses"]["appnet"].as_str().context("task address")?;
    let node = task["node"].as_str().context("node")?;
    let i = lab.nodes.iter().position(|n| n.ns == node).context("node of the task")?;
    let daemon = lab.nodes[i].pid.context("daemon pid")?;
    assert_ne!(ns_inode(pid, "net"), ns_inode(daemon, "net"), "task {ip} must have its own network namespace");
    assert_ne!(ns_inode(pid, "mnt"), ns_inode(daemon, "mnt"), "task {ip} must have its own mount namespace");
    let link: Value = serde_json::from_str(&in_netns_of(pid, &["ip", "-j", "addr", "show", "eth0"])?)?;
    let link = &link[0];
    let o: Vec<u8> = ip.split('.').map(|x| x.parse().expect("octet")).collect();
    let mac = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    assert_eq!(link["address"], mac.as_str(), "MAC of {ip}");
    assert_eq!(link["mtu"], 1450, "MTU of {ip} (underlay 1500 - 50)");
    let addrs: Vec<String> =
        link["addr_info"].as_array().context("addr_info")?.iter().filter(|a| a["family"] == "inet").map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"])).collect();
    assert_eq!(addrs, vec![format!("{ip}/24")]);
    let routes = in_netns_of(pid, &["ip", "route", "show", "default"])?;
    assert!(routes.contains(&format!("default via {gateway} dev eth0")), "default route of {ip}: {routes}");
    // The node end of the veth is on the bridge of the network's sandbox on that node.
    let short: String = task["id"].as_str().unwrap_or("").chars().take(10).collect();
    let holders: Value = serde_json::from_slice(&std::fs::read(lab.nodes[i].data_dir.join("sandboxes").join("state.json"))?)?;
    // The node has two sandboxes: appnet's (VNI 4097) and the ingress network's.
    let holder = holders.as_object().and_then(|m| m.values().find(|h| h["vni"] == 4097)).and_then(|h| h["pid"].as_u64()).context("appnet's sandbox holder")?;
    let links = in_netns_of(u32::try_from(holder)?, &["ip", "-br", "link", "show", "master", "br0"])?;
    assert!(links.contains(&format!("snt{short}0")), "node end of the veth on br0 in the sandbox on {node}: {links}");
    Ok(())
}

#[test]
fn three_nodes_run_replicas_in_their_own_namespaces() -> Result<()> {
    let lab = Lab::up("snx-basic", 3, 3, 1.0)?;
    let nodes = lab.cli_json(0, &["node", "ls"])?;
    assert_eq!(nodes.as_array().map(|a| a.len()), Some(3));
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "appnet"])?;
    let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"])?)?;
    assert_eq!(net["subnet"], "10.0.0.0/24");
    assert_eq!(net["gateway"], "10.0.0.1");
    assert_eq!(net["vni"], 4097, "4096 is the ingress network's, made with the cluster");
    // `service create` waits until the service has converged, showing progress on stderr;
    // stdout has the id alone.
    let out = lab.cli(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--", "python3", "-m", "http.server", "80"])?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim().len(), 25, "the service's id alone: {stdout:?}");
    assert!(stderr.contains("overall progress: 3 out of 3 tasks") && stderr.trim_end().ends_with("verify: Service converged"), "{stderr}");
    let tasks = lab.running_tasks("web")?;
    assert_eq!(nodes_of(&tasks), vec!["snx-basic-n1", "snx-basic-n2", "snx-basic-n3"], "one task per node, running as the create returns");
    let mut ips = BTreeSet::new();
    for t in &tasks {
        check_task_kernel_state(&lab, t, "10.0.0.1")?;
        ips.insert(t["addresses"]["appnet"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(ips.len(), 3, "distinct addresses");
    let svc: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    let vip = svc["vips"]["appnet"].as_str().context("vip")?;
    assert!(!ips.contains(vip), "the VIP is reserved, not given to a task");
    // The service really serves, inside its namespace, on its address.
    let t = &tasks[0];
    let ip = t["addresses"]["appnet"].as_str().context("ip")?;
    let code = wait_for("http.server answers", T, || {
        let c = in_netns_of(pid_of(t), &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{ip}/")]).ok()?;
        (c == "200").then_some(c)
    })?;
    assert_eq!(code, "200");
    // Its output goes to a log file under the node's data dir.
    let i = lab.nodes.iter().position(|n| n.ns == t["node"].as_str().unwrap_or("")).context("node")?;
    let log = lab.nodes[i].data_dir.join("tasks").join(format!("{}.log", t["id"].as_str().unwrap_or("")));
    let text = std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
    assert!(text.contains("GET / HTTP"), "task log has the request: {text}");
    Ok(())
}

#[test]
fn scale_up_and_down_and_global_mode_with_a_late_node() -> Result<()> {
    let mut lab = Lab::up("snx-scale", 3, 2, 1.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--", "sleep", "3600"])?;
    lab.wait_service("web", 3, T)?;
    lab.cli_ok(0, &["service", "scale", "web=6"])?;
    let six = lab.wait_service("web", 6, T)?;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for n in nodes_of(&six) {
        *per_node.entry(n).or_default() += 1;
    }
    assert_eq!(per_node.values().copied().collect::<Vec<_>>(), vec![3, 3], "6 replicas spread over 2 nodes");
    lab.cli_ok(0, &["service", "scale", "web=1"])?;
    let one = lab.wait_service("web", 1, T)?;
    assert_eq!(one[0]["name"], "web.1");
    // The five removed tasks' processes are gone, not just forgotten.
    for t in &six {
        if t["id"] != one[0]["id"] {
            let pid = pid_of(t);
            wait_for(&format!("process {pid} of a removed task to exit"), T, || (!pid_alive(pid)).then_some(()))?;
        }
    }

    lab.cli_ok(0, &["service", "create", "--name", "agent", "--mode", "global", "--network", "appnet", "--", "sleep", "3600"])?;
    let g = lab.wait_service("agent", 2, T)?;
    assert_eq!(nodes_of(&g), vec!["snx-scale-n1", "snx-scale-n2"]);
    lab.start_node(2)?;
    lab.wait_ready(3, T)?;
    let g = lab.wait_service("agent", 3, T)?;
    assert_eq!(nodes_of(&g), vec!["snx-scale-n1", "snx-scale-n2", "snx-scale-n3"], "the late node runs the global service too");
    // The replicated service did not move onto the new node.
    assert_eq!(lab.running_tasks("web")?.len(), 1);
    Ok(())
}

#[test]
fn killed_agent_has_its_tasks_rescheduled() -> Result<()> {
    let mut lab = Lab::up("snx-kill", 3, 3, 0.5)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--", "sleep", "3600"])?;
    lab.wait_service("web", 3, T)?;
    lab.stop_node(2, libc::SIGKILL)?;
    let v = wait_for("node 3 down", T, || {
        let v = lab.cli_json(0, &["node", "ls"]).ok()?;
        let n3 = v.as_array()?.iter().find(|n| n["hostname"] == "snx-kill-n3")?.clone();
        (n3["status"] == "down").then_some(n3)
    })?;
    assert_eq!(v["status"], "down");
    let tasks = wait_for("3 running tasks on nodes 1 and 2", T, || {
        let t = lab.running_tasks("web").ok()?;
        (t.len() == 3 && t.iter().all(|t| t["node"] != "snx-kill-n3")).then_some(t)
    })?;
    let nodes: BTreeSet<String> = nodes_of(&tasks).into_iter().collect();
    assert_eq!(nodes.len(), 2);
    // The agent comes back: its stale task is stopped and dropped, nothing else moves.
    lab.start_node(2)?;
    lab.wait_ready(3, T)?;
    let after = lab.wait_service("web", 3, T)?;
    let ids = |v: &[Value]| v.iter().map(|t| t["id"].to_string()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&after), ids(&tasks));
    Ok(())
}

#[test]
fn manager_restart_keeps_state_and_restarts_no_task() -> Result<()> {
    let mut lab = Lab::up("snx-restart", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--", "sleep", "3600"])?;
    let before = lab.wait_service("web", 3, T)?;
    let token = lab.cli_ok(0, &["join-token", "worker", "-q"])?;
    let nets = lab.cli_json(0, &["network", "ls"])?;
    let svcs = lab.cli_ok(0, &["service", "inspect", "web"])?;
    let sessions: Vec<usize> = (0..3).map(|i| lab.log(i).matches("session open").count()).collect();

    lab.stop_node(0, libc::SIGTERM)?;
    // The tasks keep running while the manager is away, the manager's own included.
    for t in &before {
        assert!(pid_alive(pid_of(t)), "task {} kept running", t["name"]);
    }
    lab.start_node(0)?;
    lab.wait_ready(3, T)?;
    wait_for("agents reconnected", T, || (1..3).all(|i| lab.log(i).matches("session open").count() > sessions[i]).then_some(()))?;
    assert_eq!(lab.cli_ok(0, &["join-token", "worker", "-q"])?, token);
    assert_eq!(lab.cli_json(0, &["network", "ls"])?, nets);
    let after = lab.wait_service("web", 3, T)?;
    // Same tasks, same processes, no restart: the reports after reconnection are the same.
    let key = |v: &[Value]| v.iter().map(|t| (t["id"].to_string(), t["pid"].to_string(), t["restarts"].to_string(), t["addresses"].to_string())).collect::<BTreeSet<_>>();
    assert_eq!(key(&after), key(&before));
    let svcs_after: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    let svcs: Value = serde_json::from_str(&svcs)?;
    assert_eq!(svcs_after["vips"], svcs["vips"]);
    assert_eq!(svcs_after["id"], svcs["id"]);
    Ok(())
}

fn store_snapshot(lab: &Lab) -> Result<(Value, Value, Value)> {
    Ok((lab.cli_json(0, &["node", "ls"])?, lab.cli_json(0, &["network", "ls"])?, lab.cli_json(0, &["service", "ls"])?))
}

/// Runs `swarmnet agent` for node `i` with `token` in a fresh data dir; it must fail.
fn join_must_fail(lab: &Lab, i: usize, token: &str) -> Result<String> {
    let node = &lab.nodes[i];
    let dir = node.data_dir.join("refused");
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.ns])
        .arg(&lab.bin)
        .args(["agent", "--join", &format!("{}:2377", lab.nodes[0].addr), "--token", token, "--advertise-addr", &node.addr])
        .arg("--data-dir")
        .arg(&dir)
        .env("SWARMNET_LAB", &lab.name)
        .output()?;
    assert!(!out.status.success(), "agent with a bad token must exit non-zero");
    assert!(!dir.join("node").join("identity.json").exists(), "no identity is written");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn wrong_tokens_and_missing_certificates_are_refused() -> Result<()> {
    // Node 3 is left free to host a second, unrelated cluster's manager.
    let mut lab = Lab::up("snx-auth", 3, 2, 1.0)?;
    let token = lab.cli_ok(0, &["join-token", "worker", "-q"])?.trim().to_string();
    let before = store_snapshot(&lab)?;

    // The right CA digest with a wrong secret.
    let (head, _) = token.rsplit_once('-').context("token")?;
    let err = join_must_fail(&lab, 2, &format!("{head}-{}", "a".repeat(25)))?;
    assert!(err.contains("secret is not valid"), "{err}");

    // A malformed token never reaches the manager.
    let err = join_must_fail(&lab, 2, "SWMTKN-1-nope")?;
    assert!(err.contains("malformed join token"), "{err}");

    // The token of another cluster: its CA digest does not match this manager's CA.
    let other_dir = lab.nodes[2].data_dir.join("other-cluster");
    std::fs::create_dir_all(&other_dir)?;
    let mut other = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[2].ns])
        .arg(&lab.bin)
        .args(["manager", "--advertise-addr", &lab.nodes[2].addr])
        .arg("--data-dir")
        .arg(&other_dir)
        .arg("--bpffs")
        .arg(swarmnet_lab::lab_bpffs()?)
        .env("SWARMNET_LAB", &lab.name)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let sock = format!("unix://{}", other_dir.join("control.sock").display());
    let other_token = wait_for("the other cluster's manager", T, || {
        let out = std::process::Command::new(&lab.bin).args(["--host", &sock, "join-token", "-q"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })?;
    let _ = other.kill();
    let _ = other.wait();
    let err = join_must_fail(&lab, 2, &other_token)?;
    assert!(err.contains("does not match the CA digest"), "{err}");

    // A TLS client with no certificate may only join; anything else is refused.
    let py = r#"
import socket, ssl, struct, json, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection((sys.argv[1], 2377), timeout=5))
body = json.dumps({"type": "api", "request": {"verb": "network_create", "spec": {"name": "sneaky", "driver": "overlay", "attachable": False, "subnet": None}}}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
n = struct.unpack(">I", s.recv(4))[0]
data = b""
while len(data) < n:
    data += s.recv(n - len(data))
print(data.decode())
"#;
    let out = in_ns(&lab.nodes[2].ns, &["python3", "-c", py, &lab.nodes[0].addr])?;
    let reply: Value = serde_json::from_str(out.trim())?;
    assert_eq!(reply["ok"], false);
    assert!(reply["error"]["message"].as_str().unwrap_or("").contains("client certificate of this cluster is required"), "{reply}");
    assert_eq!(reply["error"]["kind"], "refused", "{reply}");

    // Garbage on 2377: raw bytes, then inside TLS a malformed frame and an oversized length.
    let garbage = r#"
import os, socket, ssl, struct, sys
addr = (sys.argv[1], 2377)
s = socket.create_connection(addr, timeout=5); s.sendall(os.urandom(4096)); s.close()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
for payload in [struct.pack(">I", 5) + b"{{{{{", struct.pack(">I", 0xFFFFFFF0), b"\x00\x00"]:
    t = ctx.wrap_socket(socket.create_connection(addr, timeout=5))
    t.sendall(payload)
    try:
        t.recv(100)
    except Exception:
        pass
    t.close()
print("sent")
"#;
    assert_eq!(in_ns(&lab.nodes[2].ns, &["python3", "-c", garbage, &lab.nodes[0].addr])?.trim(), "sent");
    assert_eq!(store_snapshot(&lab)?.1, before.1, "the manager still answers, unchanged");

    // A certificate of another cluster: node 2 restarts with an identity whose cert was
    // issued by the other cluster's CA.
    let other_id: Value = serde_json::from_slice(&std::fs::read(other_dir.join("node").join("identity.json"))?)?;
    let id_path = lab.nodes[1].data_dir.join("node").join("identity.json");
    let mut mine: Value = serde_json::from_slice(&std::fs::read(&id_path)?)?;
    mine["cert"] = other_id["cert"].clone();
    lab.stop_node(1, libc::SIGTERM)?;
    std::fs::write(&id_path, serde_json::to_vec(&mine)?)?;
    lab.start_node(1)?;
    wait_for("node 2's session to be refused", T, || lab.log(1).contains("refused this node's certificate").then_some(())).with_context(|| format!("log of node 2:\n{}", lab.log(1)))?;

    assert_eq!(store_snapshot(&lab)?.1, before.1, "no network was written");
    assert_eq!(store_snapshot(&lab)?.2, before.2, "no service was written");
    let nodes = store_snapshot(&lab)?.0;
    assert_eq!(nodes.as_array().map(|a| a.len()), before.0.as_array().map(|a| a.len()), "no node was added");
    Ok(())
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() -> Result<()> {
    let lab = Lab::up("snx-bad", 2, 2, 1.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    lab.cli_ok(0, &["network", "create", "--subnet", "10.9.9.0/30", "tiny"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--network", "appnet", "--", "sleep", "3600"])?;
    lab.wait_service("web", 1, T)?;
    let before = store_snapshot(&lab)?;
    // Each refusal says why, and exits with its kind's code (README "Exit codes"): 2
    // invalid (also a flag the CLI refuses itself), 3 not found, 4 conflict, 5 unavailable,
    // 7 not a manager.
    let cases: &[(&[&str], &str, i32)] = &[
        (&["network", "create", "appnet"], "network appnet already exists", 4),
        (&["network", "create", "--subnet", "10.0.0.128/25", "over"], "overlaps network appnet", 4),
        (&["network", "create", "--subnet", "10.210.0.0/16", "under"], "overlaps the underlay of node", 4),
        (&["network", "create", "--subnet", "10.1.2.300/24", "bad"], "invalid --subnet", 2),
        (&["network", "create", "--subnet", "10.1.2.5/24", "hostbits"], "host bits are set", 2),
        (&["network", "create", "--driver", "bridge", "br"], "not supported", 2),
        (&["network", "rm", "appnet"], "in use by service web", 4),
        (&["network", "rm", "nope"], "network nope not found", 3),
        (&["service", "create", "--name", "web", "--network", "appnet", "--", "true"], "service web already exists", 4),
        (&["service", "create", "--name", "x", "--network", "nope", "--", "true"], "network nope not found", 3),
        (&["service", "create", "--name", "x", "--replicas", "-1", "--network", "appnet", "--", "true"], "must be 0 or more", 2),
        (&["service", "create", "--name", "x", "--mode", "global", "--replicas", "2", "--network", "appnet", "--", "true"], "--replicas is for a replicated service", 2),
        (&["service", "create", "--name", "x", "--mode", "sideways", "--network", "appnet", "--", "true"], "sideways", 2),
        (&["service", "create", "--name", "x", "--replicas", "1", "--network", "tiny", "--", "true"], "no free address left", 4),
        (&["service", "create", "--name", "x", "--network", "appnet", "--publish", "70000:80", "--", "true"], "published port \"70000\" is not 1 to 65535", 2),
        (&["service", "create", "--name", "x", "--network", "appnet", "--publish", "0:80", "--", "true"], "published port \"0\" is not 1 to 65535", 2),
        (&["service", "create", "--name", "x", "--network", "appnet", "--publish", "8080:80/sctp", "--", "true"], "protocol \"sctp\" is not tcp or udp", 2),
        (&["service", "create", "--name", "x", "--network", "appnet", "--publish", "published=8080,target=80,mode=bridge", "--", "true"], "mode \"bridge\" is not ingress or host", 2),
        (&["service", "create", "--name", "x", "--network", "ingress", "--", "true"], "the ingress network is the cluster's own", 2),
        (&["service", "update", "nope", "--publish-add", "9000:80"], "service nope not found", 3),
        (&["service", "update", "web", "--publish-rm", "9999"], "does not publish port 9999", 3),
        (&["service", "update", "web", "--publish-rm", "9999/sctp"], "expected PUBLISHED[/tcp|/udp]", 2),
        (&["service", "update", "web"], "nothing to change", 2),
        (&["service", "scale", "web=-3"], "must be 0 or more", 2),
        (&["service", "scale", "nope=2"], "service nope not found", 3),
        (&["service", "ps", "nope"], "service nope not found", 3),
        (&["run", "--name", "p", "--network", "appnet", "--", "true"], "not attachable", 2),
        (&["join-token", "admin"], "expected worker or manager", 2),
        (&["join-token", "manager"], "only worker tokens exist", 2),
    ];
    for (args, want, code) in cases {
        let (got, err) = lab.cli_fail(0, args)?;
        assert!(err.contains(want), "swarmnet {}: expected {want:?} in {err:?}", args.join(" "));
        assert_eq!(got, *code, "swarmnet {}: exit code ({err})", args.join(" "));
    }
    // A bad flag is refused by the CLI itself.
    let (code, err) = lab.cli_fail(0, &["service", "create", "--name", "x", "--bogus", "--", "true"])?;
    assert!(err.contains("--bogus") && code == 2, "{code}: {err}");
    // Manager verbs on a worker.
    let (code, err) = lab.cli_fail(1, &["service", "ls"])?;
    assert!(err.contains("this node is not a manager") && code == 7, "{code}: {err}");
    // A daemon that is not there: unavailable, worth retrying.
    let out = std::process::Command::new(&lab.bin).args(["--host", "unix:///run/swarmnet-lab/no-such.sock", "service", "ls"]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the swarmnet daemon") && out.status.code() == Some(5), "{:?}: {err}", out.status.code());
    assert_eq!(store_snapshot(&lab)?, before, "state unchanged");
    // The /30 fits a VIP and nothing else: a dnsrr service with one task fits exactly.
    lab.cli_ok(0, &["service", "create", "--name", "fits", "--endpoint-mode", "dnsrr", "--network", "tiny", "--", "sleep", "3600"])?;
    lab.wait_service("fits", 1, T)?;
    let err = lab.cli_err(0, &["service", "scale", "fits=2"])?;
    assert!(err.contains("no free address left"), "{err}");
    Ok(())
}

#[test]
fn run_on_a_worker_gets_an_address_and_returns_the_exit_code() -> Result<()> {
    let lab = Lab::up("snx-run", 2, 2, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    let out = lab.cli(1, &["run", "--name", "probe", "--network", "appnet", "--", "sh", "-c", "ip -4 -o addr show eth0; exit 3"])?;
    assert_eq!(out.status.code(), Some(3), "exit code of the task");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("inet 10.0.0."), "the task has an overlay address: {text}");
    // A detached one keeps running and shows where it runs; the name is then taken.
    let id = lab.cli_ok(1, &["run", "--name", "bg", "--network", "appnet", "--detach", "--", "sleep", "3600"])?;
    assert!(!id.trim().is_empty());
    let err = lab.cli_err(1, &["run", "--name", "bg", "--network", "appnet", "--", "true"])?;
    assert!(err.contains("already exists"), "{err}");
    let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"])?)?;
    let eps = net["endpoints"].as_array().context("endpoints")?;
    assert_eq!(eps.len(), 1, "the finished probe released its address: {eps:?}");
    assert_eq!(eps[0]["name"], "bg");
    assert_eq!(eps[0]["node"], "snx-run-n2");
    Ok(())
}

#[test]
fn an_exiting_task_is_restarted_with_backoff_and_the_status_says_why() -> Result<()> {
    let lab = Lab::up("snx-crash", 1, 1, 1.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    // A service that cannot converge: the create waits --timeout, then fails (exit 9) with
    // what its task does; the service stays created.
    let (code, err) = lab.cli_fail(0, &["service", "create", "--timeout", "4s", "--name", "crash", "--network", "appnet", "--", "sh", "-c", "echo started; sleep 0.2; exit 7"])?;
    assert_eq!(code, 9, "{err}");
    assert!(err.contains("service crash did not converge within 4s: 0 of 1 tasks running; crash.1: ") && err.contains("exited with status 7 (restarted"), "{err}");
    let t = wait_for("two restarts", T, || {
        let v = lab.cli_json(0, &["service", "ps", "crash"]).ok()?;
        let t = v.as_array()?.first()?.clone();
        (t["restarts"].as_u64()? >= 2).then_some(t)
    })?;
    assert_eq!(t["desired_state"], "running");
    // Between runs the status shows the last exit.
    let failed = wait_for("a failed state with the exit status", T, || {
        let v = lab.cli_json(0, &["service", "ps", "crash"]).ok()?;
        let t = v.as_array()?.first()?.clone();
        (t["state"] == "failed").then_some(t)
    })?;
    assert_eq!(failed["error"], "exited with status 7");
    // Same task, same address: restarted in place, not replaced.
    assert_eq!(failed["id"], t["id"]);
    assert_eq!(failed["addresses"], t["addresses"]);
    let log = lab.nodes[0].data_dir.join("tasks").join(format!("{}.log", t["id"].as_str().unwrap_or("")));
    let runs = std::fs::read_to_string(&log)?.matches("started").count();
    assert!(runs >= 3, "the log keeps every run's output: {runs} runs");
    Ok(())
}

#[test]
fn an_exhausted_network_shows_in_service_ps() -> Result<()> {
    let mut lab = Lab::up("snx-full", 3, 2, 1.0)?;
    // /29: 6 hosts, the gateway takes one, 5 left.
    lab.cli_ok(0, &["network", "create", "--subnet", "10.9.9.0/29", "small"])?;
    lab.cli_ok(0, &["service", "create", "--name", "g", "--mode", "global", "--endpoint-mode", "dnsrr", "--network", "small", "--", "sleep", "3600"])?;
    lab.cli_ok(0, &["service", "create", "--name", "r", "--replicas", "3", "--endpoint-mode", "dnsrr", "--network", "small", "--", "sleep", "3600"])?;
    lab.wait_service("g", 2, T)?;
    lab.wait_service("r", 3, T)?;
    // A third node joins: the global service wants a task there, and there is no address.
    lab.start_node(2)?;
    lab.wait_ready(3, T)?;
    let pending = wait_for("a pending task of g with an error", T, || {
        let v = lab.cli_json(0, &["service", "ps", "g"]).ok()?;
        v.as_array()?.iter().find(|t| t["state"] == "pending").cloned()
    })?;
    assert_eq!(pending["error"], "network small (10.9.9.0/29) has no free address left");
    assert_eq!(pending["desired_state"], "running");
    let table = lab.cli_ok(0, &["service", "ps", "g"])?;
    assert!(table.contains("no free address left"), "the table shows it too:\n{table}");
    // Freeing addresses lets it run.
    lab.cli_ok(0, &["service", "scale", "r=1"])?;
    let g = lab.wait_service("g", 3, T)?;
    assert_eq!(nodes_of(&g), vec!["snx-full-n1", "snx-full-n2", "snx-full-n3"]);
    Ok(())
}

/// `exec` runs a command inside a task: in its namespaces and its cgroup, so the cluster's
/// DNS and the service's VIP answer it as they answer the task, and the command's exit code
/// comes back. A task that is not on the node, or is gone, is a clear error.
#[test]
fn exec_runs_a_command_inside_a_task_with_its_dns_and_vips() -> Result<()> {
    let lab = Lab::up("snx-exec", 2, 2, 1.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "2", "--network", "appnet", "--", "python3", "-m", "http.server", "80"])?;
    let tasks = lab.wait_service("web", 2, T)?;
    let t = &tasks[0];
    let name = t["name"].as_str().context("task name")?.to_string();
    let i = lab.nodes.iter().position(|n| t["node"] == n.ns.as_str()).context("the task's node")?;
    let pid = pid_of(t);
    // Its namespaces (network, mount, UTS) and its cgroup.
    let out = lab.cli_ok(i, &["exec", &name, "--", "sh", "-c", "readlink /proc/self/ns/net /proc/self/ns/mnt; hostname; cat /proc/self/cgroup"])?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first().copied(), Some(ns_inode(pid, "net").as_str()), "the task's network namespace: {out}");
    assert_eq!(lines.get(1).copied(), Some(ns_inode(pid, "mnt").as_str()), "the task's mount namespace: {out}");
    let id = t["id"].as_str().context("task id")?;
    assert_eq!(lines.get(2).copied(), Some(&id[..12]), "the task's hostname, its short id: {out}");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    assert_eq!(lines.get(3..).map(|l| l.join("\n")), Some(cgroup.trim_end().to_string()), "the task's cgroup: {out}");
    // The cluster's DNS and the service's VIP answer it.
    let vip = serde_json::from_str::<Value>(&lab.cli_ok(0, &["service", "inspect", "web"])?)?["vips"]["appnet"].as_str().context("web's VIP")?.to_string();
    let hosts = lab.cli_ok(i, &["exec", &name, "--", "getent", "hosts", "web"])?;
    assert!(hosts.starts_with(&format!("{vip} ")), "web is its VIP {vip}: {hosts}");
    let fetch = "import urllib.request; print(urllib.request.urlopen('http://web/', timeout=5).status)";
    // (Once the servers listen and the node's load balancer has the tasks.)
    wait_for("the VIP answering from inside the task", T, || lab.cli_ok(i, &["exec", &name, "--", "python3", "-c", fetch]).ok().filter(|o| o.trim() == "200"))?;
    // The command's exit code.
    let out = lab.cli(i, &["exec", &name, "--", "sh", "-c", "exit 7"])?;
    assert_eq!(out.status.code(), Some(7));
    // Not on that node; gone.
    let err = lab.cli_err(1 - i, &["exec", &name, "--", "true"])?;
    assert!(err.contains(&format!("task {name} is not on this node")) && err.contains("service ps"), "{err}");
    lab.cli_ok(0, &["service", "rm", "web"])?;
    wait_for("web's task gone from its node", T, || {
        let err = lab.cli_err(i, &["exec", &name, "--", "true"]).ok()?;
        (err.contains("not on this node") || err.contains("not running") || err.contains("no running process")).then_some(err)
    })?;
    Ok(())
}

/// What a node made on the machine, as seen from outside its daemon: links of its namespace
/// besides the lab's (`lo`, `eth0`), its nftables tables, the holders of its sandboxes'
/// namespaces, its cgroup and bpffs folders, processes of its tasks and
/// sandboxes, and what its data dir holds besides the lab's own files.
fn made_by(lab: &Lab, i: usize, id: &str) -> Result<Vec<String>> {
    let node = &lab.nodes[i];
    let mut out = Vec::new();
    for l in in_ns(&node.ns, &["ip", "-o", "link", "show"])?.lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("").to_string();
        if name != "lo" && name != "eth0" {
            out.push(format!("link {name}"));
        }
    }
    for t in in_ns(&node.ns, &["nft", "list", "tables"])?.lines() {
        out.push(format!("nft {t}"));
    }
    // A sandbox's namespace is held by a process writing to `<data dir>/sandboxes/`.
    let sandboxes = node.data_dir.join("sandboxes");
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|t| t.starts_with(&sandboxes)) {
            out.push(format!("sandbox holder {pid}"));
        }
    }
    if let Some(cg) = swarmnet_dataplane::lb::host::node_cgroup(id).filter(|p| p.exists()) {
        out.push(format!("cgroup {}", cg.display()));
    }
    let pins = swarmnet_lab::lab_bpffs()?.join("swarmnet").join(swarmnet_dataplane::lb::host::dir_name(id));
    if pins.exists() {
        out.push(format!("bpffs {}", pins.display()));
    }
    for (task, pid, _) in swarmnet_dataplane::task::find_task_processes(&node.data_dir) {
        out.push(format!("task process {pid} ({task})"));
    }
    for e in std::fs::read_dir(&node.data_dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name != "daemon.log" && name != "daemon.pid" {
            out.push(format!("file {name}"));
        }
    }
    Ok(out)
}

/// `swarm leave` on a worker: its tasks stop and run elsewhere, everything it made on the
/// machine goes (links, nftables tables, cgroup and bpffs folders, task processes, sandbox
/// holders, its data dir's content) and its daemon exits; the manager shows it down. A
/// manager is refused without --force, and changes nothing.
#[test]
fn a_node_that_leaves_takes_everything_it_made_with_it() -> Result<()> {
    let lab = Lab::up("snx-leave", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--publish", "8080:80", "--", "python3", "-m", "http.server", "80"])?;
    let n3 = lab.nodes[2].ns.clone();
    let mine: Vec<u32> = lab.running_tasks("web")?.iter().filter(|t| t["node"] == n3.as_str()).map(pid_of).collect();
    assert!(!mine.is_empty(), "a task of web on {n3}");
    let id = lab.node_id(2)?;
    let daemon = lab.daemon_pid(2).context("the daemon's pid")?;
    // The checks see what the node made while it runs.
    let before = made_by(&lab, 2, &id)?;
    for want in ["link ", "nft ", "sandbox holder ", "cgroup ", "bpffs ", "task process ", "file node"] {
        assert!(before.iter().any(|o| o.starts_with(want)), "before leaving, {want:?} among {before:#?}");
    }

    let (code, err) = lab.cli_fail(0, &["swarm", "leave"])?;
    assert!(code == 4 && err.contains("this node is a manager") && err.contains("--force"), "{code}: {err}");
    assert!(lab.daemon_pid(0).is_some_and(pid_alive));

    let out = lab.cli_ok(2, &["swarm", "leave"])?;
    assert_eq!(out.trim(), format!("node {id} left the swarm"));
    wait_for("the daemon of the node that left to exit", T, || (!pid_alive(daemon)).then_some(()))?;
    for p in &mine {
        assert!(!pid_alive(*p), "its task process {p} is gone");
    }
    let after = made_by(&lab, 2, &id)?;
    assert!(after.is_empty(), "nothing of the node is left: {after:#?}");
    // The cluster goes on without it: down, its task running elsewhere.
    wait_for("the node that left shown down", T, || {
        let ls = lab.cli_json(0, &["node", "ls"]).ok()?;
        ls.as_array()?.iter().any(|n| n["id"] == id.as_str() && n["status"] == "down").then_some(())
    })?;
    // (Its old task is listed until the node comes back or is removed, as in Docker.)
    wait_for("web's three tasks running on the other nodes", T, || {
        let web = lab.running_tasks("web").ok()?;
        (web.len() == 3 && web.iter().all(|t| t["node"] != n3.as_str())).then_some(())
    })?;
    Ok(())
}

/// `service logs` (issue 21): every task's output from every node, prefixed with its task
/// and node, stderr apart, stamped; `--tail`, `--since`, a task alone; `-f` streams what
/// comes next; a node's files stay under `--log-opt max-size` and `max-file`, rotated,
/// with the newest lines kept in order; unknown and removed targets are refused.
#[test]
fn service_logs_come_from_every_node_and_follow_what_comes_next() -> Result<()> {
    let lab = Lab::up_full("snx-logs", 3, 3, 1.0, &[], &["--log-opt", "max-size=64k", "--log-opt", "max-file=2"])?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    let talk = "i=0; while true; do echo \"out $SWARMNET_TASK_NAME $i\"; echo \"err $SWARMNET_TASK_NAME $i\" >&2; i=$((i+1)); sleep 0.1; done";
    lab.cli_ok(0, &["service", "create", "--name", "talk", "--replicas", "3", "--network", "appnet", "--", "sh", "-c", talk])?;
    let tasks = lab.running_tasks("talk")?;
    assert_eq!(nodes_of(&tasks).len(), 3, "spread: {tasks:?}");
    std::thread::sleep(Duration::from_secs(1));

    // From a worker: every task, each line prefixed `talk.N.<id>@<node> | `.
    let out = lab.cli(2, &["service", "logs", "talk"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    for t in &tasks {
        let (name, id, node) = (t["name"].as_str().unwrap_or(""), t["id"].as_str().unwrap_or(""), t["node"].as_str().unwrap_or(""));
        let prefix = format!("{name}.{id}@{node}");
        let mine: Vec<&str> = stdout.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert!(mine.len() >= 5, "{prefix}: its lines on stdout: {stdout}");
        assert!(mine.iter().all(|l| l.contains(&format!("| out {name} "))), "{prefix}: only its stdout lines: {mine:?}");
        // In the order written.
        let nums: Vec<u64> = mine.iter().filter_map(|l| l.rsplit(' ').next()?.parse().ok()).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{prefix}: in order: {nums:?}");
        assert!(stderr.lines().any(|l| l.starts_with(&prefix) && l.contains(&format!("| err {name} "))), "{prefix}: its stderr lines on stderr: {stderr}");
    }

    // --tail: the last N lines of each task (stdout and stderr together).
    let out = lab.cli(0, &["service", "logs", "--tail", "2", "talk"])?;
    let n = String::from_utf8_lossy(&out.stdout).lines().count() + String::from_utf8_lossy(&out.stderr).lines().count();
    assert_eq!(n, 6, "two lines of each of three tasks: {out:?}");
    // --since a time to come: nothing. -t: each line's time after its prefix.
    let later = lab.cli_ok(0, &["service", "logs", "--since", "2099-01-01T00:00:00Z", "talk"])?;
    assert!(later.trim().is_empty(), "{later}");
    // (The last 4 lines: about two on stdout, two on stderr.)
    let stamped = lab.cli_ok(0, &["service", "logs", "-t", "--tail", "4", "--raw", "talk.1"])?;
    assert!((1..=4).contains(&stamped.lines().count()) && stamped.lines().all(|l| l.starts_with("20") && l.contains("Z out talk.1 ")), "{stamped}");
    let since = lab.cli_ok(0, &["service", "logs", "--since", "1s", "--raw", "talk.2"])?;
    let since_n = since.lines().count();
    assert!((1..=15).contains(&since_n), "about a second of talk.2's stdout: {since_n} lines");

    // -f: what comes next, within moments.
    let mut child = std::process::Command::new(&lab.bin)
        .args(["--host", &lab.control(1), "service", "logs", "-f", "--tail", "0", "--raw", "talk.3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut followed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while followed.len() < 10 && std::time::Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
            followed.push(l);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(followed.len() >= 10, "-f printed new lines as they came: {followed:?}");
    assert!(followed.iter().all(|l| l.starts_with("out talk.3 ")), "{followed:?}");

    // Rotation: a task that writes 20000 lines keeps at most two files of at most 64 KiB,
    // and the newest lines, in order.
    lab.cli_ok(0, &["service", "create", "--name", "flood", "--network", "appnet", "--", "sh", "-c", "seq 1 20000; sleep infinity"])?;
    let flood = lab.running_tasks("flood")?;
    let (fid, fnode) = (flood[0]["id"].as_str().unwrap_or("").to_string(), flood[0]["node"].as_str().unwrap_or("").to_string());
    let i = lab.nodes.iter().position(|n| n.hostname == fnode).context("flood's node")?;
    let last = wait_for("flood's last line", T, || {
        let l = lab.cli_ok(0, &["service", "logs", "--tail", "1", "--raw", "flood"]).ok()?;
        (l.trim() == "20000").then_some(l)
    })?;
    assert_eq!(last.trim(), "20000");
    let dir = lab.nodes[i].data_dir.join("tasks");
    let files: Vec<(String, u64)> = std::fs::read_dir(&dir)?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n == format!("{fid}.log") || n.strip_prefix(&format!("{fid}.log.")).is_some_and(|k| k.parse::<u32>().is_ok())
        })
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect();
    assert!(files.len() == 2 && files.iter().all(|(_, len)| *len <= 64 << 10), "two files of at most 64 KiB: {files:?}");
    let all = lab.cli_ok(0, &["service", "logs", "--raw", "flood"])?;
    let nums: Vec<u64> = all.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(nums.len() > 1000 && nums.last() == Some(&20000), "the newest lines kept: {} lines, from {:?} to {:?}", nums.len(), nums.first(), nums.last());
    assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "in order, none missing within what is kept");

    // Bad input: unknown and removed targets, a bad --tail.
    let (_, err) = lab.cli_fail(0, &["service", "logs", "nope"])?;
    assert!(err.contains("no service or task \"nope\""), "{err}");
    lab.cli_ok(0, &["service", "rm", "flood"])?;
    let (_, err) = lab.cli_fail(0, &["service", "logs", "flood"])?;
    assert!(err.contains("no service or task \"flood\""), "{err}");
    let (_, err) = lab.cli_fail(0, &["service", "logs", "--tail", "x", "talk"])?;
    assert!(err.contains("expected a number of lines"), "{err}");
    Ok(())
}

/// Metrics (issue 21): `--metrics-addr` on every daemon serves Prometheus's format, which
/// `promtool check metrics` passes, with the node's gossip members, its load balancer's
/// services and connections, DNS queries by type, and on the manager the cluster's nodes
/// and tasks; a path or method it does not serve is refused.
#[test]
fn every_daemon_serves_metrics_that_promtool_accepts() -> Result<()> {
    // (The lab turns metrics on: `--metrics-addr <node>:9323`.)
    let lab = Lab::up("snx-metrics", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--publish", "8080:80", "--", "python3", "-m", "http.server", "80"])?;
    let tasks = lab.running_tasks("web")?;
    // Some DNS queries and connections through the VIP from a task (`exec`: in its cgroup,
    // where the socket load balancer is).
    let node = tasks[0]["node"].as_str().unwrap_or("").to_string();
    let ti = lab.nodes.iter().position(|n| n.hostname == node).context("the task's node")?;
    let name = tasks[0]["name"].as_str().unwrap_or("").to_string();
    let get = ["exec", &name, "--", "python3", "-c", "import urllib.request; urllib.request.urlopen('http://web/', timeout=5).read()"];
    wait_for("web's VIP answering from a task", T, || lab.cli_ok(ti, &get).ok())?;
    for _ in 0..5 {
        lab.cli_ok(ti, &get)?;
    }
    let scrape = |i: usize, path: &str| -> Result<String> { in_ns(&lab.nodes[i].ns, &["curl", "-sS", "-m", "5", &format!("http://{}:9323{path}", lab.nodes[i].addr)]) };
    let value = |text: &str, series: &str| -> Option<f64> { text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok()) };
    for i in 0..3 {
        let text = wait_for("gossip members and probe round trips in the metrics", T, || {
            let t = scrape(i, "/metrics").ok()?;
            (value(&t, "swarmnet_gossip_members{state=\"alive\"}") == Some(2.0)
                && value(&t, "swarmnet_gossip_members{state=\"down\"}") == Some(0.0)
                && value(&t, "swarmnet_gossip_probe_rtt_seconds_count").is_some_and(|n| n > 0.0))
            .then_some(t)
        })?;
        let mut check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("promtool (Debian's prometheus)")?;
        std::io::Write::write_all(check.stdin.as_mut().context("stdin")?, text.as_bytes())?;
        let out = check.wait_with_output()?;
        assert!(out.status.success(), "node {i}: promtool check metrics: {}{}\n{text}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(value(&text, "swarmnet_lb_services"), Some(1.0), "node {i}: one VIP (web's)\n{text}");
        assert!(value(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6), "node {i}: RSS\n{text}");
        assert!(text.contains("swarmnet_overlay_remote_endpoints "), "node {i}");
        // OpenMetrics when asked for, as Prometheus asks.
        let om = in_ns(&lab.nodes[i].ns, &["curl", "-sS", "-m", "5", "-H", "Accept: application/openmetrics-text;version=1.0.0", &format!("http://{}:9323/metrics", lab.nodes[i].addr)])?;
        assert!(om.trim_end().ends_with("# EOF") && om.contains("# TYPE swarmnet_dns_queries counter"), "node {i}: OpenMetrics\n{om}");
        let managed = text.contains("swarmnet_manager_nodes");
        assert_eq!(managed, i == 0, "node {i}: the manager's metrics only on the manager\n{text}");
    }
    let m = scrape(0, "/metrics")?;
    assert_eq!(value(&m, "swarmnet_manager_tasks{state=\"running\"}"), Some(3.0), "{m}");
    assert_eq!(value(&m, "swarmnet_manager_nodes{role=\"manager\",status=\"ready\",availability=\"active\"}"), Some(1.0), "{m}");
    assert_eq!(value(&m, "swarmnet_manager_leader"), Some(1.0));
    // The node of the task that asked: its DNS queries and the VIP's connections counted.
    let t = scrape(ti, "/metrics")?;
    assert!(value(&t, "swarmnet_dns_queries_total{type=\"A\"}").is_some_and(|v| v >= 5.0), "{t}");
    let conns: f64 = t.lines().filter(|l| l.starts_with("swarmnet_lb_connections_handed{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
    assert!(conns >= 5.0, "connections through web's VIP counted: {conns}\n{t}");
    // What it does not serve.
    let nf = in_ns(&lab.nodes[1].ns, &["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}:9323/nope", lab.nodes[1].addr)])?;
    assert_eq!(nf.trim(), "404");
    let post = in_ns(&lab.nodes[1].ns, &["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", &format!("http://{}:9323/metrics", lab.nodes[1].addr)])?;
    assert_eq!(post.trim(), "405");
    Ok(())
}

/// The Docker Engine API (issue 21): on a worker's `--docker-api` socket, the docker CLI's
/// `node ls`, `service ls`, `service ps` and `network ls` list what swarmnet's own tables
/// list; a write is refused naming swarmnet's command; a version or path it does not serve
/// gets Docker's error JSON. Then Debian's Prometheus, pointed at the manager's socket,
/// finds every node through `dockerswarm_sd_configs` (role nodes, port 9323: every daemon's
/// metrics, all up) and the tasks (role tasks) with their service, node and network.
#[test]
fn the_docker_api_serves_the_docker_cli_and_prometheus() -> Result<()> {
    let lab = Lab::up("snx-docker", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--publish", "8080:80", "--label", "tier=front", "--", "python3", "-m", "http.server", "80"])?;
    lab.cli_ok(0, &["service", "create", "--name", "agent", "--mode", "global", "--endpoint-mode", "dnsrr", "--network", "appnet", "--", "sleep", "infinity"])?;
    lab.wait_service("agent", 3, T)?;
    let worker = &lab.nodes[2];
    lab.cli_ok(0, &["node", "update", "--label-add", "zone=a", &worker.hostname])?;
    let sock = |i: usize| lab.nodes[i].data_dir.join(swarmnet_lab::LAB_DOCKER_SOCKET);
    let docker = |i: usize, args: &[&str]| -> Result<std::process::Output> {
        std::process::Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", sock(i).display()))
            .env("DOCKER_CONFIG", lab.nodes[i].data_dir.join("docker-config"))
            .output()
            .context("docker (Debian's docker.io)")
    };
    let docker_ok = |i: usize, args: &[&str]| -> Result<String> {
        let out = docker(i, args)?;
        anyhow::ensure!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let sorted = |s: String| -> Vec<String> {
        let mut v: Vec<String> = s.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|l| !l.is_empty()).collect();
        v.sort();
        v
    };

    // docker node ls (from a worker) lists swarmnet's nodes, the leader, the label.
    let ours = lab.cli_json(0, &["node", "ls"])?;
    let mut want: Vec<String> = ours
        .as_array()
        .context("nodes")?
        .iter()
        .map(|n| format!("{} {} Ready Active {}", n["id"].as_str().unwrap_or(""), n["hostname"].as_str().unwrap_or(""), if n["role"] == "manager" { "Leader" } else { "" }).trim().to_string())
        .collect();
    want.sort();
    let got = sorted(docker_ok(2, &["node", "ls", "--format", "{{.ID}} {{.Hostname}} {{.Status}} {{.Availability}} {{.ManagerStatus}}"])?);
    assert_eq!(got, want, "docker node ls");
    let me = docker_ok(2, &["node", "ls", "--format", "{{.Self}} {{.Hostname}}"])?;
    assert!(me.lines().any(|l| l == format!("true {}", worker.hostname)), "the node asked is marked as itself: {me}");
    let labels = docker_ok(2, &["node", "inspect", "--format", "{{json .Spec.Labels}}", &worker.hostname])?;
    assert_eq!(labels.trim(), r#"{"zone":"a"}"#);

    // docker service ls: name, mode, replicas, ports.
    let got = sorted(docker_ok(2, &["service", "ls", "--format", "{{.Name}} {{.Mode}} {{.Replicas}} {{.Ports}}"])?);
    assert_eq!(got, vec!["agent global 3/3".to_string(), "web replicated 3/3 *:8080->80/tcp".to_string()], "docker service ls");

    // docker service ps web: every task on the node swarmnet says, running.
    let ps = lab.cli_json(0, &["service", "ps", "web"])?;
    let mut want: Vec<String> = ps
        .as_array()
        .context("tasks")?
        .iter()
        .filter(|t| t["desired_state"] == "running")
        .map(|t| format!("{} {} Running", t["name"].as_str().unwrap_or(""), t["node"].as_str().unwrap_or("")))
        .collect();
    want.sort();
    let got: Vec<String> = sorted(docker_ok(2, &["service", "ps", "web", "--format", "{{.Name}} {{.Node}} {{.DesiredState}} {{.CurrentState}}"])?)
        .into_iter()
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .collect();
    let running: Vec<String> = sorted(docker_ok(2, &["service", "ps", "web", "--format", "{{.CurrentState}}"])?);
    assert_eq!(got, want, "docker service ps web");
    assert!(running.iter().all(|s| s.starts_with("Running ")), "{running:?}");

    // docker network ls.
    let got = sorted(docker_ok(2, &["network", "ls", "--format", "{{.Name}} {{.Driver}} {{.Scope}}"])?);
    assert_eq!(got, vec!["appnet overlay swarm".to_string(), "ingress overlay swarm".to_string()], "docker network ls");

    // A write: refused, naming the command.
    let out = docker(2, &["service", "rm", "web"])?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("swarmnet service rm"), "{out:?}");
    assert_eq!(lab.running_tasks("web")?.len(), 3, "nothing removed");
    // Docker's errors for what is not served.
    let curl = |path: &str| -> Result<String> {
        let out = std::process::Command::new("curl").args(["-sS", "--unix-socket"]).arg(sock(0)).args(["-w", " %{http_code}", &format!("http://docker{path}")]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let v = curl("/v1.99/nodes")?;
    assert!(v.ends_with(" 400") && v.contains(r#"{"message":"client version 1.99 is too new"#), "{v}");
    let v = curl("/v1.41/containers/json")?;
    assert!(v.ends_with(" 404") && v.starts_with(r#"{"message":"#), "{v}");
    let v = curl("/v1.41/services/nope")?;
    assert!(v.ends_with(" 404") && v.contains("service nope not found"), "{v}");

    // Prometheus with dockerswarm_sd_configs on the manager's socket, in node 1's namespace.
    let dir = lab.nodes[0].data_dir.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: swarmnet\n    dockerswarm_sd_configs:\n      - host: unix://{s}\n        role: nodes\n        port: {p}\n        refresh_interval: 2s\n  - job_name: tasks\n    dockerswarm_sd_configs:\n      - host: unix://{s}\n        role: tasks\n        refresh_interval: 2s\n",
        s = sock(0).display(),
        p = swarmnet_lab::LAB_METRICS_PORT
    );
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let mut prom = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[0].ns, "prometheus", "--web.listen-address=127.0.0.1:9090"])
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .env("SWARMNET_LAB", &lab.name)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
        .spawn()
        .context("prometheus (Debian's)")?;
    let r = (|| -> Result<()> {
        let targets = wait_for("Prometheus: three swarmnet nodes up, and web's tasks", Duration::from_secs(60), || {
            let t = in_ns(&lab.nodes[0].ns, &["curl", "-sS", "-m", "2", "http://127.0.0.1:9090/api/v1/targets"]).ok()?;
            let v: Value = serde_json::from_str(&t).ok()?;
            let active = v["data"]["activeTargets"].as_array()?.clone();
            let nodes: Vec<&Value> = active.iter().filter(|t| t["labels"]["job"] == "swarmnet").collect();
            let web: Vec<&Value> = active.iter().filter(|t| t["labels"]["job"] == "tasks" && t["discoveredLabels"]["__meta_dockerswarm_service_name"] == "web").collect();
            (nodes.len() == 3 && nodes.iter().all(|t| t["health"] == "up") && web.len() >= 3).then_some(active)
        })?;
        let node =
            targets.iter().find(|t| t["discoveredLabels"]["__meta_dockerswarm_node_hostname"] == worker.hostname.as_str() && t["labels"]["job"] == "swarmnet").context("the worker as a target")?;
        let d = &node["discoveredLabels"];
        assert_eq!(d["__address__"], format!("{}:{}", worker.addr, swarmnet_lab::LAB_METRICS_PORT).as_str(), "{d}");
        assert_eq!(d["__meta_dockerswarm_node_role"], "worker");
        assert_eq!(d["__meta_dockerswarm_node_status"], "ready");
        assert_eq!(d["__meta_dockerswarm_node_label_zone"], "a");
        let task = targets.iter().find(|t| t["labels"]["job"] == "tasks" && t["discoveredLabels"]["__meta_dockerswarm_service_name"] == "web").context("a web task")?;
        let d = &task["discoveredLabels"];
        assert_eq!(d["__meta_dockerswarm_task_state"], "running", "{d}");
        assert_eq!(d["__meta_dockerswarm_service_label_tier"], "front", "{d}");
        assert_eq!(d["__meta_dockerswarm_service_mode"], "replicated", "{d}");
        assert!(d["__meta_dockerswarm_network_name"] == "appnet" || d["__meta_dockerswarm_network_name"] == "ingress", "{d}");
        assert!(d["__meta_dockerswarm_node_hostname"].as_str().is_some_and(|h| lab.nodes.iter().any(|n| n.hostname == h)), "{d}");
        Ok(())
    })();
    let _ = prom.kill();
    let _ = prom.wait();
    r
}
