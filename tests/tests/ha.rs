//! Managers on etcd (issue 20, ADR 0022). Lab tests: root, network namespaces, and etcd
//! members (Debian's `etcd-server`) on hosts of their own on the lab's underlay.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use swarmnet_lab::{in_ns, wait_for, Lab};

const T: Duration = Duration::from_secs(60);

/// service ps as task name → (node, addresses), for the running tasks.
fn placement(lab: &Lab, service: &str) -> Result<BTreeMap<String, String>> {
    placement_on(lab, 0, service)
}

fn placement_on(lab: &Lab, i: usize, service: &str) -> Result<BTreeMap<String, String>> {
    let ps = lab.cli_json(i, &["service", "ps", service])?;
    let mut out = BTreeMap::new();
    for t in ps.as_array().into_iter().flatten() {
        if t["state"] == "running" {
            out.insert(t["name"].as_str().unwrap_or_default().to_string(), format!("{} {} {}", t["id"], t["node"], t["addresses"]));
        }
    }
    Ok(out)
}

fn inspect(lab: &Lab, service: &str) -> Result<serde_json::Value> {
    inspect_on(lab, 0, service)
}

fn inspect_on(lab: &Lab, i: usize, service: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&lab.cli_ok(i, &["service", "inspect", service])?)?)
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
    let mut lab = Lab::up_etcd("snh-one", 3, 3, 1.0, 1, 1, &[])?;
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "appnet", "--publish", "8080:80", "--", "python3", "-m", "http.server", "80"])?;
    lab.wait_service("web", 3, T)?;
    let before = placement(&lab, "web")?;
    let vip = inspect(&lab, "web")?["vips"].clone();
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(!lab.nodes[0].data_dir.join("manager.redb").exists(), "nothing of the cluster on the manager's disk");
    let keys = etcd_keys(&lab)?;
    assert!(keys.iter().any(|k| k == "/swarmnet/cluster") && keys.iter().any(|k| k.starts_with("/swarmnet/log/")), "the cluster is in etcd: {keys:?}");
    // node inspect says where: the store of a manager, nothing for a worker.
    let me: serde_json::Value = serde_json::from_str(&lab.cli_ok(0, &["node", "inspect", &lab.nodes[0].hostname])?)?;
    assert!(me["store"].as_str().is_some_and(|s| s.starts_with(&format!("etcd://{}", lab.etcd_endpoints())) && s.contains("/swarmnet")), "{me}");
    assert_eq!(me["manager_addr"], format!("{}:2377", lab.nodes[0].addr), "{me}");
    let worker: serde_json::Value = serde_json::from_str(&lab.cli_ok(0, &["node", "inspect", &lab.nodes[1].hostname])?)?;
    assert!(worker["store"].is_null() && worker["status"] == "ready", "{worker}");

    // Killed and started again: the same cluster, the same tasks where they were.
    lab.stop_node(0, libc::SIGKILL)?;
    lab.start_node(0)?;
    // It leads again once its old lease has run out (it stands by until then).
    let n1 = lab.nodes[0].hostname.clone();
    wait_for("the manager to lead again", T, || manager_status(&lab, 0).filter(|s| s.get(&n1).is_some_and(|v| v == "Leader ready")))?;
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
    // The dataplane does not need the manager: the published port still answers (once the
    // other nodes have let go of the stopped node's task: its daemon's gossip is gone).
    let url = format!("http://{}:8080/", lab.nodes[1].addr);
    wait_for("the published port answers 10 times in a row without a manager", T, || {
        (0..10).all(|_| in_ns(&client, &["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &url]).is_ok_and(|p| p.trim() == "200")).then_some(())
    })?;
    Ok(())
}

const PROBE: &str = r#"
import socket, sys, time
ip, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = fail = 0
start = time.time(); end = start + secs; why = []; slow = []
while time.time() < end:
    t = time.time()
    try:
        c = socket.create_connection((ip, port), timeout=3.0); c.close(); ok += 1
        if time.time() - t > 0.5:
            slow.append(f"{t - start:.2f}s:{time.time() - t:.2f}s")
    except OSError as e:
        fail += 1
        why.append(f"{t - start:.2f}s:{type(e).__name__}:{e.errno}")
    time.sleep(max(0.0, 0.1 - (time.time() - t)))
print(f"ok={ok} fail={fail} at={','.join(why[:5])} slow={','.join(slow[:5])} start={start:.3f}")
"#;

/// TCP connects to `ip:port` every 100 ms for `secs`, from `argv` (a command that enters a
/// namespace); `probed` reads the counts. A connect fails after 3 s, as a client's would
/// after the kernel's SYN retransmissions (1 s, then 3 s); one that took over 0.5 s (a SYN
/// lost once) is printed as slow, not counted as failed.
fn probe(enter: &[&str], ip: &str, port: u16, secs: u64) -> Result<std::process::Child> {
    Ok(std::process::Command::new(enter[0])
        .args(&enter[1..])
        .args(["python3", "-c", PROBE, ip, &port.to_string(), &secs.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

fn probed(child: std::process::Child) -> Result<(u64, u64)> {
    let out = child.wait_with_output()?;
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("the prober failed: {s} {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("probe: {}", s.trim());
    let f = |k: &str| s.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok());
    match (f("ok="), f("fail=")) {
        (Some(ok), Some(fail)) => Ok((ok, fail)),
        _ => bail!("prober output {s:?}"),
    }
}

/// `web` (`replicas` tasks of http.server publishing 8080 on `appnet`, asked of node 0),
/// answering through node `entry` to the outside client. Returns its VIP on `appnet` and the
/// client's namespace.
fn web_answering(lab: &Lab, replicas: usize, entry: usize) -> Result<(String, String)> {
    let n = replicas.to_string();
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", &n, "--network", "appnet", "--publish", "8080:80", "--", "python3", "-m", "http.server", "80"])?;
    lab.wait_service("web", replicas, T)?;
    let vip = inspect(lab, "web")?["vips"]["appnet"].as_str().unwrap_or_default().to_string();
    let client = lab.outside_client()?;
    let url = format!("http://{}:8080/", lab.nodes[entry].addr);
    wait_for("the published port answers", T, || {
        let page = in_ns(&client, &["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &url]).ok()?;
        (page.trim() == "200").then_some(())
    })?;
    Ok((vip, client))
}

/// Probes for `secs`: the outside `client` to node `entry`'s 8080, and a task of its own on
/// node `from` to `vip`:80 (`swarmnet run`: in the node's cgroup, where the VIP is
/// translated at connect()).
fn probe_both(lab: &Lab, client: &str, entry: usize, from: usize, vip: &str, secs: u64) -> Result<(std::process::Child, std::process::Child)> {
    let outside = probe(&["ip", "netns", "exec", client], &lab.nodes[entry].addr, 8080, secs)?;
    let bin = swarmnet_lab::binary()?.display().to_string();
    let host = lab.control(from);
    let inside = probe(&[&bin, "--host", &host, "run", "--name", "vprobe", "--network", "appnet", "--"], vip, 80, secs)?;
    Ok((outside, inside))
}

/// Waits until `service` (asked of node `i`) has `n` running tasks.
fn wait_running(lab: &Lab, i: usize, service: &str, n: usize) -> Result<()> {
    wait_for(&format!("{service}: {n} running tasks"), T, || (placement_on(lab, i, service).ok()?.len() == n).then_some(()))
}

/// `node ls` asked of node `i`, as hostname → manager status ("" for a worker).
fn manager_status(lab: &Lab, i: usize) -> Option<BTreeMap<String, String>> {
    let v = lab.cli_json(i, &["node", "ls"]).ok()?;
    Some(
        v.as_array()?
            .iter()
            .map(|n| (n["hostname"].as_str().unwrap_or_default().to_string(), format!("{} {}", n["manager_status"].as_str().unwrap_or(""), n["status"].as_str().unwrap_or(""))))
            .collect(),
    )
}

/// Two managers on a 3-member etcd, two workers. The leader killed: the other manager leads
/// within seconds, the workers' sessions move to it, clients of a VIP and of a published
/// port see no failed connection, and the cluster is as it was and takes changes. The old
/// leader, started again, stands by.
#[test]
fn the_cluster_survives_the_loss_of_its_leader() -> Result<()> {
    let mut lab = Lab::up_etcd("snh-fo", 4, 4, 1.0, 3, 2, &[])?;
    let (n1, n2, n3) = (lab.nodes[0].hostname.clone(), lab.nodes[1].hostname.clone(), lab.nodes[2].hostname.clone());
    // Asked of the manager that stands by, answered by the leader.
    let st = wait_for("node ls through the standby manager", T, || manager_status(&lab, 1).filter(|s| s.values().filter(|v| v.ends_with("ready")).count() == 4))?;
    assert_eq!(st[&n1], "Leader ready", "{st:?}");
    assert_eq!(st[&n2], "Reachable ready", "{st:?}");
    assert_eq!(st[&n3], " ready", "a worker has no manager status: {st:?}");
    // Writes through either manager.
    lab.cli_ok(1, &["network", "create", "--driver", "overlay", "--attachable", "appnet"])?;
    let (vip, client) = web_answering(&lab, 4, 2)?;
    let before = placement(&lab, "web")?;
    // Clients through the failover: from outside to a worker's published port, and from a
    // task on a worker to the VIP, from 3 s before the kill to 6 s after it: the election
    // and the sessions' move. (Later, the dead node is marked down and its task replaced
    // elsewhere: a new task takes connections before its server listens, which is not the
    // failover's doing.)
    let (outside, inside) = probe_both(&lab, &client, 2, 3, &vip, 9)?;
    std::thread::sleep(Duration::from_secs(3));

    let t0 = Instant::now();
    lab.stop_node(0, libc::SIGKILL)?;
    // A change sent during the election: refused with a retryable kind (5 unavailable, 6
    // not the leader), or taken; retried until taken (or found taken: 4, the name exists).
    let create = ["service", "create", "--detach", "--name", "during", "--replicas", "2", "--network", "appnet", "--", "sleep", "infinity"];
    let mut refusals = Vec::new();
    wait_for("the create sent during the failover to be taken", T, || {
        let out = lab.cli(1, &create).ok()?;
        match out.status.code() {
            Some(0) | Some(4) => Some(()),
            c => {
                refusals.push((c, String::from_utf8_lossy(&out.stderr).trim().to_string()));
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        }
    })?;
    assert!(refusals.iter().all(|(c, _)| matches!(c, Some(5) | Some(6))), "only retryable refusals: {refusals:?}");
    wait_for("the other manager to lead", T, || manager_status(&lab, 1).filter(|s| s.get(&n2).is_some_and(|v| v.starts_with("Leader"))))?;
    let elected = t0.elapsed();
    // A change is taken at once by the new leader.
    lab.cli_ok(1, &["service", "create", "--detach", "--name", "after", "--replicas", "2", "--network", "appnet", "--", "sleep", "infinity"])?;
    let created = t0.elapsed();
    // The workers moved their sessions to it; the old leader is down.
    let st = wait_for("the workers with the new leader, the old one down", T, || {
        manager_status(&lab, 1).filter(|s| s.get(&n1).is_some_and(|v| v == "Unreachable down") && s.iter().filter(|(h, v)| **h != n1 && v.ends_with("ready")).count() == 3)
    })?;
    assert_eq!(st[&n2], "Leader ready");
    let (ok_out, fail_out) = probed(outside)?;
    let (ok_in, fail_in) = probed(inside)?;
    println!(
        "HA leader kill -9: {} retryable refusals of the create sent at the kill; new leader after {:.2} s, next service create done after {:.2} s; probes to a published port {fail_out} failed of {}, to a VIP {fail_in} failed of {}",
        refusals.len(),
        elected.as_secs_f64(),
        created.as_secs_f64(),
        ok_out + fail_out,
        ok_in + fail_in
    );
    assert!(ok_out > 50 && ok_in > 50, "the probes ran ({ok_out}, {ok_in})");
    assert_eq!((fail_out, fail_in), (0, 0), "connections failed through the failover");
    // As it was: the VIP, and every task not on the dead node where it was, with its address.
    assert_eq!(inspect_on(&lab, 1, "web")?["vips"]["appnet"].as_str().unwrap_or_default(), vip);
    let now: BTreeMap<String, String> = placement_on(&lab, 1, "web")?;
    for (name, where_) in &before {
        if !where_.contains(&format!("\"{}\"", lab.nodes[0].ns)) {
            assert_eq!(now.get(name), Some(where_), "task {name} moved or changed: before {before:?} after {now:?}");
        }
    }
    wait_running(&lab, 1, "after", 2)?;
    wait_running(&lab, 1, "during", 2)?;
    assert_eq!(lab.cli_json(1, &["service", "ls"])?.as_array().map_or(0, |a| a.iter().filter(|s| s["name"] == "during").count()), 1, "one service, whole");
    wait_running(&lab, 1, "web", 4)?;

    // The old leader comes back and stands by; its CLI is answered by the new leader.
    lab.start_node(0)?;
    let st = wait_for("the old leader back, standing by", T, || manager_status(&lab, 0).filter(|s| s.get(&n1).is_some_and(|v| v == "Reachable ready")))?;
    assert_eq!(st[&n2], "Leader ready");

    // Demote and remove a manager: the leader demotes itself (asked on the standby), the
    // other one leads; the last manager cannot be demoted; a manager is demoted before rm.
    let (code, err) = lab.cli_fail(0, &["node", "rm", "--force", &n2])?;
    assert!(code == 2 && err.contains("demote it first"), "{code} {err}");
    lab.cli_ok(0, &["node", "demote", &n2])?;
    let st = wait_for("the other manager to lead after the leader's demotion", T, || manager_status(&lab, 0).filter(|s| s.get(&n1).is_some_and(|v| v == "Leader ready")))?;
    assert_eq!(st[&n2], " ready", "the demoted node is a worker: {st:?}");
    // (Right after an election the answer may be a retryable refusal, 5 or 6, as for any
    // change: a client tries again.)
    let (code, err) = wait_for("the demotion of the last manager refused", T, || {
        let (code, err) = lab.cli_fail(0, &["node", "demote", &n1]).ok()?;
        if code == 5 || code == 6 {
            std::thread::sleep(Duration::from_millis(200));
            return None;
        }
        Some((code, err))
    })?;
    assert!(code == 4 && err.contains("last manager"), "{code} {err}");
    // A demoted node is a worker: it changes nothing.
    let (code, err) = lab.cli_fail(1, &["service", "scale", "after=1"])?;
    assert!(code == 7 && err.contains("only a manager"), "{code} {err}");
    // Promoted (its daemon still runs `swarmnet manager`), it stands by again; a node that
    // runs `swarmnet agent` cannot be promoted; demoted again for its removal below.
    let n4 = lab.nodes[3].hostname.clone();
    let (code, err) = lab.cli_fail(0, &["node", "promote", &n4])?;
    assert!(code == 2 && err.contains("swarmnet manager --store"), "{code} {err}");
    wait_for("the demoted node to stop campaigning", T, || lab.log(1).contains("not a manager of the cluster any more").then_some(()))?;
    lab.cli_ok(0, &["node", "promote", &n2])?;
    wait_for("the promoted node standing by", T, || manager_status(&lab, 0).filter(|s| s.get(&n2).is_some_and(|v| v == "Reachable ready")))?;
    wait_for("the promoted node campaigning again", T, || lab.log(1).contains("a manager again (promoted)").then_some(()))?;
    lab.cli_ok(0, &["node", "demote", &n2])?;
    lab.stop_node(1, libc::SIGTERM)?;
    wait_for("the demoted node down", T, || manager_status(&lab, 0).filter(|s| s.get(&n2).is_some_and(|v| v == " down")))?;
    lab.cli_ok(0, &["node", "rm", &n2])?;
    let st = manager_status(&lab, 0).unwrap_or_default();
    assert!(!st.contains_key(&n2) && st[&n1] == "Leader ready", "{st:?}");
    lab.cli_ok(0, &["service", "scale", "after=3"])?;
    wait_running(&lab, 0, "after", 3)?;
    Ok(())
}

/// etcd loses its quorum (2 of 3 members killed): the dataplane goes on (no failed
/// connection), changes are refused naming the store and saying the cluster is read-only,
/// `node ls` and `service ls` still answer, marked stale. The members back: changes are
/// taken again, nothing restarted.
#[test]
fn without_etcd_quorum_the_cluster_is_read_only_and_resumes_after() -> Result<()> {
    let mut lab = Lab::up_etcd("snh-q", 3, 3, 1.0, 3, 2, &[])?;
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "--attachable", "appnet"])?;
    let (vip, client) = web_answering(&lab, 3, 2)?;
    let pids: Vec<Option<u32>> = (0..3).map(|i| lab.daemon_pid(i)).collect();
    let (outside, inside) = probe_both(&lab, &client, 2, 2, &vip, 30)?;
    std::thread::sleep(Duration::from_secs(3));

    lab.stop_etcd(1, libc::SIGKILL)?;
    lab.stop_etcd(2, libc::SIGKILL)?;
    let store = lab.etcd_endpoints();
    // Within the lease the leader steps down; from then on, on either manager:
    let (code, err) = wait_for("a change refused as read-only", T, || {
        let (code, err) = lab.cli_fail(0, &["network", "create", "--driver", "overlay", "late"]).ok()?;
        err.contains("read-only").then_some((code, err))
    })?;
    assert_eq!(code, 5, "unavailable, to try again: {err}");
    assert!(err.contains(&store), "the error names the store: {err}");
    for i in [0, 1] {
        let (code, err) = lab.cli_fail(i, &["service", "scale", "web=5"])?;
        assert!(code == 5 && err.contains("read-only"), "manager {i}: {code} {err}");
        let out = lab.cli(i, &["node", "ls"])?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.contains(&lab.nodes[2].hostname), "node ls answers on manager {i}: {stdout} {stderr}");
        assert!(stderr.contains("STALE"), "marked stale: {stderr}");
        let out = lab.cli(i, &["service", "ls"])?;
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("web"), "service ls answers on manager {i}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("STALE"));
    }
    // Quorum back: changes are taken again, by whichever manager is elected. (A `late` sent
    // in the first moments of the loss, whose answer was lost — "no answer", not "refused" —
    // may land once the members are back: etcd's leader had it in its log. So the change
    // asked now has a name of its own.)
    lab.start_etcd(1)?;
    lab.start_etcd(2)?;
    let t0 = Instant::now();
    wait_for("a change taken again", T, || lab.cli_ok(1, &["network", "create", "--driver", "overlay", "back"]).ok())?;
    let back = t0.elapsed();
    let (ok_out, fail_out) = probed(outside)?;
    let (ok_in, fail_in) = probed(inside)?;
    println!(
        "HA etcd quorum lost and back: changes taken {:.2} s after the members restarted; probes to a published port {fail_out} failed of {}, to a VIP {fail_in} failed of {}",
        back.as_secs_f64(),
        ok_out + fail_out,
        ok_in + fail_in
    );
    assert!(ok_out > 100 && ok_in > 100, "the probes ran ({ok_out}, {ok_in})");
    assert_eq!((fail_out, fail_in), (0, 0), "connections failed while etcd had no quorum");
    let after: Vec<Option<u32>> = (0..3).map(|i| lab.daemon_pid(i)).collect();
    assert_eq!(pids, after, "no daemon restarted");
    assert_eq!(placement(&lab, "web")?.len(), 3);
    Ok(())
}

/// Creates sent to both managers at once, hundreds of them: every network gets its own
/// subnet and VNI, every service its own VIP and published port (the standby forwards to
/// the leader; one writer, fenced).
#[test]
fn creates_on_two_managers_at_once_never_hand_out_anything_twice() -> Result<()> {
    let lab = Lab::up_etcd("snh-cc", 2, 2, 1.0, 1, 2, &[])?;
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "shared"])?;
    let per_manager = 100;
    let results: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|m| {
                let lab = &lab;
                s.spawn(move || {
                    let mut errors = Vec::new();
                    for i in 0..per_manager {
                        let r = if i % 5 == 0 {
                            lab.cli_ok(m, &["network", "create", "--driver", "overlay", &format!("net{m}x{i}")])
                        } else {
                            lab.cli_ok(m, &["service", "create", "--detach", "--name", &format!("svc{m}x{i}"), "--replicas", "0", "--network", "shared", "--publish", "80", "--", "true"])
                        };
                        if let Err(e) = r {
                            errors.push(format!("{e:#}"));
                        }
                    }
                    errors
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| vec!["a thread panicked".into()])).collect()
    });
    let errors: Vec<&String> = results.iter().flatten().collect();
    assert!(errors.is_empty(), "every create succeeded; {} did not, the first: {:?}", errors.len(), errors.iter().take(3).collect::<Vec<_>>());
    let nets = lab.cli_json(0, &["network", "ls"])?;
    let nets = nets.as_array().cloned().unwrap_or_default();
    let svcs = lab.cli_json(1, &["service", "ls"])?;
    let svcs = svcs.as_array().cloned().unwrap_or_default();
    let distinct = |vals: Vec<String>| -> (usize, usize) {
        let n = vals.len();
        let set: std::collections::BTreeSet<String> = vals.into_iter().collect();
        (n, set.len())
    };
    let created_nets: Vec<&serde_json::Value> = nets.iter().filter(|n| n["name"].as_str().is_some_and(|s| s.starts_with("net"))).collect();
    assert_eq!(created_nets.len(), 2 * per_manager / 5, "{nets:?}");
    let (n, d) = distinct(nets.iter().map(|n| n["subnet"].to_string()).collect());
    assert_eq!(n, d, "a subnet handed out twice: {nets:?}");
    let (n, d) = distinct(nets.iter().map(|n| n["vni"].to_string()).collect());
    assert_eq!(n, d, "a VNI handed out twice: {nets:?}");
    let created: Vec<&serde_json::Value> = svcs.iter().filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with("svc"))).collect();
    assert_eq!(created.len(), 2 * per_manager * 4 / 5);
    let (n, d) = distinct(created.iter().map(|s| s["vips"]["shared"].to_string()).collect());
    assert_eq!(n, d, "a VIP handed out twice");
    let (n, d) = distinct(created.iter().map(|s| s["ports"].to_string()).collect());
    assert_eq!(n, d, "a published port handed out twice");
    println!("HA concurrent creates: {} networks and {} services through two managers at once, no subnet, VNI, VIP or port twice", created_nets.len(), created.len());
    Ok(())
}

/// A one-manager cluster on the embedded store moves into etcd (`--import`): the same
/// cluster, every task running on (same ids, addresses, processes), no failed connection;
/// the file is set aside and a restart with the same flags goes on; a file that is no store
/// is refused.
#[test]
fn a_one_manager_cluster_moves_into_etcd_with_its_tasks_running_on() -> Result<()> {
    let mut lab = Lab::up_redb_beside_etcd("snh-im", 3, 3, 1.0, 1)?;
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "appnet"])?;
    let (_, client) = web_answering(&lab, 3, 2)?;
    let before = placement(&lab, "web")?;
    let pids: Vec<String> = lab.running_tasks("web")?.iter().map(|t| t["pid"].to_string()).collect();
    let vip = inspect(&lab, "web")?["vips"].clone();
    let outside = probe(&["ip", "netns", "exec", &client], &lab.nodes[2].addr, 8080, 15)?;
    std::thread::sleep(Duration::from_secs(2));

    let redb = lab.nodes[0].data_dir.join("manager.redb");
    let store = format!("etcd://{}", lab.etcd_endpoints());
    let redb_s = redb.display().to_string();
    lab.stop_node(0, libc::SIGTERM)?;
    lab.set_manager_args(&["--store", &store, "--import", &redb_s]);
    lab.start_node(0)?;
    let n1 = lab.nodes[0].hostname.clone();
    wait_for("the manager to lead from etcd", T, || manager_status(&lab, 0).filter(|s| s.get(&n1).is_some_and(|v| v == "Leader ready") && s.values().filter(|v| v.ends_with("ready")).count() == 3))?;
    assert!(!redb.exists() && redb.with_extension("redb.imported").exists(), "the embedded store is set aside");
    assert_eq!(placement(&lab, "web")?, before, "the same tasks, nodes and addresses");
    let after: Vec<String> = lab.running_tasks("web")?.iter().map(|t| t["pid"].to_string()).collect();
    assert_eq!(after, pids, "the same processes: no task restarted");
    assert_eq!(inspect(&lab, "web")?["vips"], vip);
    let (ok, fail) = probed(outside)?;
    println!("HA import: a one-manager cluster moved into etcd; probes to a published port {fail} failed of {}", ok + fail);
    assert!(ok > 50, "the probe ran");
    assert_eq!(fail, 0, "connections failed during the import");
    // A restart with the same flags goes on; changes are taken.
    lab.stop_node(0, libc::SIGTERM)?;
    lab.start_node(0)?;
    wait_for("the manager to lead again", T, || manager_status(&lab, 0).filter(|s| s.get(&n1).is_some_and(|v| v == "Leader ready")))?;
    lab.cli_ok(0, &["service", "scale", "web=4"])?;
    wait_running(&lab, 0, "web", 4)?;
    // Bad input: a file that is no store.
    lab.stop_node(0, libc::SIGTERM)?;
    let bogus = lab.nodes[0].data_dir.join("nothing.redb");
    let bogus_s = bogus.display().to_string();
    lab.set_manager_args(&["--store", &store, "--store-prefix", "/other", "--import", &bogus_s]);
    if lab.start_node(0).is_ok() {
        bail!("the manager started importing a file that does not exist");
    }
    assert!(lab.log(0).contains("no such store"), "{}", lab.log(0));
    Ok(())
}

/// The leader cut off from the network (its underlay link down, the process alive): it
/// stops leading within its lease (a change asked of it is refused, exit 5), the other
/// manager leads within seconds, the workers move to it; the link back, the old leader
/// stands by.
#[test]
fn a_leader_cut_off_from_the_network_stops_leading_and_another_takes_over() -> Result<()> {
    let lab = Lab::up_etcd("snh-cut", 3, 3, 1.0, 3, 2, &[])?;
    let (n1, n2) = (lab.nodes[0].hostname.clone(), lab.nodes[1].hostname.clone());
    wait_for("n1 leads, n2 stands by", T, || manager_status(&lab, 1).filter(|s| s.get(&n1).is_some_and(|v| v == "Leader ready") && s.get(&n2).is_some_and(|v| v == "Reachable ready")))?;
    let link = |up: bool| in_ns(&format!("{}-ul", lab.name), &["ip", "link", "set", "snv1", if up { "up" } else { "down" }]);
    let t0 = Instant::now();
    link(false)?;
    wait_for("the other manager to lead", T, || manager_status(&lab, 1).filter(|s| s.get(&n2).is_some_and(|v| v.starts_with("Leader"))))?;
    let elected = t0.elapsed();
    // The cut-off manager knows it no longer leads: it takes no change.
    let (code, err) = wait_for("the cut-off manager to refuse changes", T, || lab.cli_fail(0, &["network", "create", "--driver", "overlay", "late"]).ok())?;
    assert_eq!(code, 5, "unavailable: {err}");
    assert!(lab.log(0).contains("no longer leads"), "it stepped down: {}", lab.log(0));
    wait_for("the worker with the new leader", T, || manager_status(&lab, 1).filter(|s| s.get(&lab.nodes[2].hostname).is_some_and(|v| v == " ready")))?;
    lab.cli_ok(1, &["network", "create", "--driver", "overlay", "during"])?;
    println!("HA leader cut off: the other manager leads after {:.2} s", elected.as_secs_f64());
    link(true)?;
    wait_for("the old leader back, standing by", T, || manager_status(&lab, 1).filter(|s| s.get(&n1).is_some_and(|v| v == "Reachable ready")))?;
    let nets = lab.cli_ok(0, &["network", "ls"])?;
    assert!(nets.contains("during") && !nets.contains("late"), "one history: {nets}");
    Ok(())
}

/// A standby manager serves agents on 2377 by relaying their connections, unread, to the
/// leader. An agent that knows only the standby joins through it, holds its session through
/// it and runs its tasks; the standby killed, the agent moves to the
/// leader it learned of at the session's start, its task running on untouched.
#[test]
fn a_standby_manager_serves_agents_by_relaying_to_the_leader() -> Result<()> {
    let mut lab = Lab::up_etcd("snh-relay", 3, 2, 1.0, 3, 2, &[])?;
    let (n1, n2, n3) = (lab.nodes[0].hostname.clone(), lab.nodes[1].hostname.clone(), lab.nodes[2].hostname.clone());
    wait_for("n1 leads, n2 stands by", T, || manager_status(&lab, 0).filter(|s| s.get(&n1).is_some_and(|v| v == "Leader ready") && s.get(&n2).is_some_and(|v| v == "Reachable ready")))?;
    let (leader, standby) = (format!("{}:2377", lab.nodes[0].addr), format!("{}:2377", lab.nodes[1].addr));
    lab.nodes[2].join = Some(vec![1]);
    lab.start_node(2)?;
    wait_for("the worker joined through the standby, ready", T, || manager_status(&lab, 0).filter(|s| s.get(&n3).is_some_and(|v| v == " ready")))?;
    let on_standby = |l: &str| l.lines().filter(|l| l.contains("session open") && l.contains(&format!("manager={standby}"))).count();
    // (A node is ready from its join on; its session opens a moment later.)
    let log = wait_for("the worker's session through the standby", T, || Some(lab.log(2)).filter(|l| on_standby(l) >= 1))?;
    assert!(log.contains("joined the cluster") && log.contains(&format!("manager=\"{standby}\"")), "joined through the standby: {log}");
    // Its tasks run.
    lab.cli_ok(0, &["service", "create", "--name", "w", "--replicas", "3", "--", "sleep", "infinity"])?;
    wait_running(&lab, 0, "w", 3)?;
    let mine = |lab: &Lab| -> Result<Vec<(String, String)>> { Ok(placement(lab, "w")?.into_iter().filter(|(_, w)| w.contains(&format!("\"{n3}\""))).collect()) };
    let before = mine(&lab)?;
    assert!(!before.is_empty(), "a task on the worker: {:?}", placement(&lab, "w")?);
    // The standby killed: the agent moves to the leader, nothing restarted.
    lab.stop_node(1, libc::SIGKILL)?;
    wait_for("the worker's session with the leader", T, || lab.log(2).lines().any(|l| l.contains("session open") && l.contains(&format!("manager={leader}"))).then_some(()))?;
    wait_for("the worker ready, the standby down", T, || manager_status(&lab, 0).filter(|s| s.get(&n3).is_some_and(|v| v == " ready") && s.get(&n2).is_some_and(|v| v == "Unreachable down")))?;
    assert_eq!(mine(&lab)?, before, "the worker's task ran on, untouched");
    Ok(())
}
